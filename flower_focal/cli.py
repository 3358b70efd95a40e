"""The ``flower-focal`` command line.

    flower-focal evaluate --run-dir DIR --data FILE.npz --split test
    flower-focal keygen --out keys/ [--preset compact]
    flower-focal decrypt-model --run-dir DIR --key keys/
    flower-focal report --runs RUN_DIR... --out DIR     # compare strategies (report.md + plots)

Subcommands are registered in ``COMMANDS``; each owns its arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

_DATASET_BY_SUFFIX = {".npz": "medmnist", ".csv": "csv"}


def _infer_dataset(path: Path) -> str:
    if path.is_dir():
        return "folder"
    try:
        return _DATASET_BY_SUFFIX[path.suffix.lower()]
    except KeyError:
        raise ValueError(
            f"cannot tell the format of {path}: give a .npz, a .csv or an image folder, "
            "or pass --dataset"
        ) from None


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a run's final global model on a data split; prints one JSON object",
    )
    p.add_argument("--run-dir", required=True, type=Path, help="run directory with model.pt/model.json")
    p.add_argument("--data", required=True, type=Path, help=".npz (MedMNIST format), .csv manifest or image folder")
    p.add_argument("--split", default="test", help="split to evaluate (train/val/test); default: test")
    p.add_argument("--dataset", default=None, help="medmnist | csv | folder (default: from --data)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--label-column", default="label")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from flower_focal.artifacts import load_model
    from flower_focal.config import RunConfig
    from flower_focal.data import load_split
    from flower_focal.training import evaluate_model, resolve_device

    data = args.data.expanduser().resolve()
    if not data.exists():
        raise FileNotFoundError(f"--data {data} does not exist")
    model, spec = load_model(args.run_dir)
    cfg = RunConfig(
        dataset=args.dataset or _infer_dataset(data),
        data_path=str(data),
        image_size=spec.image_size,
        image_column=args.image_column,
        label_column=args.label_column,
    )
    dataset = load_split(cfg, args.split)
    metrics = evaluate_model(
        model, dataset, batch_size=args.batch_size,
        device=resolve_device(args.device), num_classes=spec.num_classes,
    )

    def clean(v: float) -> float | None:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    print(json.dumps({
        "accuracy": clean(metrics["accuracy"]),
        "auroc_macro": clean(metrics["auroc"]),
        "loss": clean(metrics["loss"]),
        "n": int(metrics["num-examples"]),
        "split": args.split,
        "data": str(data),
        "run_dir": str(args.run_dir.resolve()),
        "model": spec.model,
        "strategy": spec.strategy,
    }))
    return 0


def _add_keygen(sub: argparse._SubParsersAction) -> None:
    from flower_focal.crypto import ALL_PRESETS, DEFAULT_PRESET

    p = sub.add_parser(
        "keygen",
        help="make the institutions' shared HE key set: secret.ctx (institutions only), "
        "public.ctx (the server) and manifest.json",
    )
    p.add_argument("--out", required=True, type=Path, help="directory to write the key set into")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(ALL_PRESETS))
    p.add_argument("--overwrite", action="store_true", help="replace an existing key set")
    p.set_defaults(handler=_keygen)


def _keygen(args: argparse.Namespace) -> int:
    from flower_focal.crypto import keygen, read_manifest

    out = keygen(args.out, args.preset, overwrite=args.overwrite)
    manifest = read_manifest(out)
    print(json.dumps({
        "out": str(out.resolve()),
        "preset": manifest["preset"],
        "fingerprint": manifest["fingerprint"],
        "institutions_get": str((out / manifest["files"]["secret"]).resolve()),
        "server_gets": str((out / manifest["files"]["public"]).resolve()),
    }))
    return 0


def _add_decrypt_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "decrypt-model",
        help="decrypt an HE run's encrypted final model (model.he) into model.pt; needs the secret key",
    )
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--key", required=True, type=Path, help="secret.ctx or the keygen directory")
    p.set_defaults(handler=_decrypt_model)


def _decrypt_model(args: argparse.Namespace) -> int:
    from flower_focal.artifacts import decrypt_model

    print(json.dumps({"model": str(decrypt_model(args.run_dir, args.key))}))
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="compare runs (e.g. fedavg, he-fedavg, focal on the same data): report.md, "
        "report.json and plots, read from the runs' metrics.json / config.json / audit.json",
    )
    p.add_argument("--runs", required=True, nargs="+", type=Path,
                   help="run directories, or a sweep directory standing for its runs")
    p.add_argument("--out", required=True, type=Path, help="directory to write the report into")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="compare runs that differ in data, partition, institutions, seed or rounds "
                   "(the report lists the differences)")
    p.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from flower_focal.compare import REPORT_JSON, write_report

    report = write_report(args.runs, args.out, allow_mismatch=args.allow_mismatch)
    doc = json.loads((report.parent / REPORT_JSON).read_text())
    print(json.dumps({"report": str(report), "runs": [r["run_dir"] for r in doc["runs"]],
                      "differences": doc["differences"]}))
    return 0


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_evaluate,
    _add_keygen,
    _add_decrypt_model,
    _add_report,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="flower-focal", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flower-focal`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"flower-focal {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
