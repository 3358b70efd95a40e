"""The ``flower-focal`` command line.

    flower-focal evaluate --run-dir DIR --data FILE.npz --split test
    flower-focal keygen --out keys/ [--preset compact]
    flower-focal decrypt-model --run-dir DIR --key keys/
    flower-focal decrypt-model --model final_model.he --key keys/ --out final_model.pt
    flower-focal report --runs RUN_DIR... --out DIR     # compare strategies (report.md + plots)
    flower-focal audit --strategy fedavg --dataset pathmnist --out DIR   # gradient-inversion audit

Subcommands are registered in ``COMMANDS``; each owns its arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from flower_focal.strategy.specs import STRATEGY_SPECS

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
        help="decrypt an encrypted final model (a run's model.he, or any file saved by "
        "HEFedAvg.save_final_model) into a PyTorch state dict; needs the secret key",
        description="Decrypt an encrypted final model where the institutions' secret key lives. "
        "--run-dir: a flower-focal run directory (writes model.pt next to model.he). --model: any "
        "HE-FedAvg model file with its .json (any network; writes a plain state dict to --out).",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run-dir", type=Path, help="flower-focal run directory holding model.he")
    where.add_argument("--model", type=Path, help="an encrypted model file (e.g. final_model.he)")
    p.add_argument("--key", required=True, type=Path, help="secret.ctx or the keygen directory")
    p.add_argument("--out", type=Path, help="with --model: where the state dict goes "
                   "(default: the model file with suffix .pt)")
    p.set_defaults(handler=_decrypt_model)


def _decrypt_model(args: argparse.Namespace) -> int:
    from flower_focal.artifacts import decrypt_model, decrypt_model_file

    if args.model is not None:
        out = args.out or args.model.with_suffix(".pt")
        print(json.dumps({"model": str(decrypt_model_file(args.model, args.key, out))}))
        return 0
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


def _add_audit(sub: argparse._SubParsersAction) -> None:
    from flower_focal.audit import AuditConfig

    d = AuditConfig()
    p = sub.add_parser(
        "audit",
        help="attack what the server observes (gradient inversion) under a strategy; writes "
        "audit.json and audit.png, prints a JSON summary",
    )
    p.add_argument("--strategy", default=d.strategy, choices=tuple(STRATEGY_SPECS))
    p.add_argument("--dataset", default=d.dataset,
                   help="pathmnist | retinamnist (found in ../shared/data, else synthetic), medmnist, "
                   "folder, csv, synthetic-retina, synthetic-pathology; default: %(default)s")
    p.add_argument("--data", default="", help="data file or folder (default: ../shared/data/<dataset>)")
    p.add_argument("--model", default=d.model, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--local-steps", type=int, default=d.local_steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="images attacked")
    p.add_argument("--attack", default=d.attack, choices=("inverting-gradients", "idlg"))
    p.add_argument("--iterations", type=int, default=d.iterations, help="L-BFGS evaluations")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dp-clip-norm", type=float, default=d.dp_clip_norm)
    p.add_argument("--dp-noise-multiplier", type=float, default=d.dp_noise_multiplier)
    p.add_argument("--aggregate-size", type=int, default=d.aggregate_size,
                   help="he-fedavg: other institutions in the aggregate a curious institution attacks")
    p.add_argument("--backbone", default=d.backbone, help="focal: frozen backbone")
    p.add_argument("--backbone-input-size", type=int, default=d.backbone_input_size)
    p.add_argument("--device", default=d.device)
    p.add_argument("--out", required=True, type=Path, help="directory for audit.json and audit.png")
    p.set_defaults(handler=_audit)


def _audit(args: argparse.Namespace) -> int:
    from flower_focal.audit import AuditConfig, run_audit

    cfg = AuditConfig(
        strategy=args.strategy, dataset=args.dataset, data_path=args.data, model=args.model,
        batch_size=args.batch_size, local_steps=args.local_steps, lr=args.lr,
        num_samples=args.num_samples, attack=args.attack, iterations=args.iterations,
        image_size=args.image_size, seed=args.seed, dp_clip_norm=args.dp_clip_norm,
        dp_noise_multiplier=args.dp_noise_multiplier, aggregate_size=args.aggregate_size,
        backbone=args.backbone, backbone_input_size=args.backbone_input_size, device=args.device,
    )
    result = run_audit(cfg, out_dir=args.out)
    inst = result.get("institution_side") or {}
    after = (result.get("dp") or {}).get("after_noise") or {}
    print(json.dumps({
        "strategy": result["strategy"],
        "threat": result["threat"],
        "attackable": result["attackable"],
        "leakage_rate": result["leakage_rate"],
        "attacked": result["attacked"],
        "ssim_median": result["ssim_summary"]["median"],
        "psnr_median": result["psnr_summary"]["median"],
        "institution_side_leakage_rate": inst.get("leakage_rate") if inst.get("attacked") else None,
        "dp_after_noise_leakage_rate": after.get("leakage_rate"),
        "rule": result["rule"],
        "reason": result["reason"],
        "json": str((args.out / "audit.json").resolve()),
        "png": str((args.out / "audit.png").resolve()),
    }))
    return 0


def _add_certs(sub: argparse._SubParsersAction) -> None:
    """``flower-focal certs --out DIR --supernodes N [--hosts H ...]``: a test consortium's PKI."""
    from flower_focal.pki import DEFAULT_HOSTS, make_consortium

    p = sub.add_parser("certs", help="make a consortium CA, the SuperLink's TLS certificate and SuperNode "
                       "authentication key pairs (see README: multi-site operations)")
    p.add_argument("--out", required=True, type=Path, help="directory to write into (must not exist)")
    p.add_argument("--supernodes", required=True, type=int, help="how many SuperNode key pairs")
    p.add_argument("--hosts", nargs="+", default=list(DEFAULT_HOSTS),
                   help="names/IPs SuperNodes dial the SuperLink by (certificate SANs)")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates")

    def run(args: argparse.Namespace) -> int:
        if args.out.exists():
            raise ValueError(f"{args.out} exists; certs never overwrites keys")
        c = make_consortium(args.out, args.supernodes, args.hosts, days=args.days)
        print(json.dumps({
            "out": str(c.root.resolve()), "hosts": args.hosts,
            "superlink_gets": [str(x) for x in (c.ca_cert, c.server_cert, c.server_key, *c.node_public_keys)],
            "supernodes_get": [[str(c.ca_cert), str(k)] for k in c.node_keys],
            "keep_offline": str(c.ca_key), "checksums": str(c.root / "SHA256SUMS"),
        }))
        return 0

    p.set_defaults(handler=run)


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_evaluate,
    _add_keygen,
    _add_decrypt_model,
    _add_report,
    _add_audit,
    _add_certs,
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
