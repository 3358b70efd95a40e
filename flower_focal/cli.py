"""The flower-focal command line: check a setup, make HE keys, evaluate, decrypt, compare, audit.

    flower-focal check --run-config run.toml --num-institutions 5   # preflight, starts nothing
    flower-focal evaluate --run-dir DIR --data FILE.npz --split test
    flower-focal keygen --out keys/ [--preset compact]
    flower-focal decrypt-model --run-dir DIR --key keys/
    flower-focal decrypt-model --model final_model.he --key keys/ --out final_model.pt
    flower-focal report --runs RUN_DIR... --out DIR     # compare strategies (report.md + plots)
    flower-focal audit --strategy fedavg --dataset pathmnist --out DIR   # gradient-inversion audit
    flower-focal deploy-local --run-config "strategy='he-fedavg'" --num-institutions 2   # real SuperLink + SuperNodes
    flower-focal stop-local                              # the SuperLink a plain `flwr run .` leaves running

Subcommands are registered in ``COMMANDS``; each owns its arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
        description="Evaluate a run's final global model (model.pt + model.json) on one split of "
        "a data source, e.g. an external test set (a file holding only that split is enough). "
        "Prints one JSON object: accuracy, macro AUROC and recall, loss, per-class AUROC / "
        "recall / precision and the confusion matrix.",
    )
    p.add_argument("--run-dir", required=True, type=Path, help="run directory with model.pt/model.json")
    p.add_argument("--data", required=True, type=Path, help=".npz (MedMNIST format), .csv manifest or image folder")
    p.add_argument("--split", default="test", help="split to evaluate (train/val/test); default: test")
    p.add_argument("--dataset", default=None, help="medmnist | csv | folder (default: from --data)")
    p.add_argument("--image-column", default="image",
                   help="CSV: column holding the image path or id; default: %(default)s")
    p.add_argument("--label-column", default="label",
                   help="CSV: column holding the integer label; default: %(default)s")
    p.add_argument("--batch-size", type=int, default=128,
                   help="images per forward pass; default: %(default)s")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]; default: %(default)s")
    p.add_argument("--initial-norm-layers", action="store_true",
                   help="FedBN runs: evaluate the global model although its normalisation layers "
                   "hold their initial (untrained) values (refused without this flag; each "
                   "institution's trained layers stay at the institution)")
    p.set_defaults(handler=_evaluate)


def _trained_on(run_dir: Path, spec: object) -> str:
    """The data a run trained on (the data file's stem from its config.json), for messages."""
    from flower_focal.reporting import dataset_label

    try:
        return dataset_label(json.loads((Path(run_dir) / "config.json").read_text()))
    except (OSError, ValueError):
        return str(getattr(spec, "dataset", "unknown data"))


def _evaluate(args: argparse.Namespace) -> int:
    from flower_focal.artifacts import load_model
    from flower_focal.config import RunConfig
    from flower_focal.data.institution import make_dataset
    from flower_focal.data.sources import load_eval_split
    from flower_focal.data.transforms import build_transforms
    from flower_focal.metrics import classification_report
    from flower_focal.training import evaluate_model, predict_proba, resolve_device

    data = args.data.expanduser().resolve()
    if not data.exists():
        raise FileNotFoundError(f"--data {data} does not exist")
    model, spec = load_model(args.run_dir)
    spec = spec.with_local_layers(model)  # a model.json written before local_layers existed
    if spec.untrained_norm and not args.initial_norm_layers:
        raise ValueError(
            f"{spec.norm_warning}. Its scores would describe no trained model: use the federated "
            "evaluation of the run instead, or pass --initial-norm-layers to evaluate it anyway")
    if spec.untrained_norm:
        print(f"flower-focal evaluate: warning: {spec.norm_warning}", file=sys.stderr)
    cfg = RunConfig(
        dataset=args.dataset or _infer_dataset(data),
        data_path=str(data),
        image_size=spec.image_size,
        image_column=args.image_column,
        label_column=args.label_column,
    )
    src = load_eval_split(cfg, args.split)  # a file holding only this split is enough
    labels = src.labels("val")
    top = int(labels.max()) if len(labels) else -1
    if top >= spec.num_classes or src.num_classes > spec.num_classes:
        raise ValueError(
            f"--data {data} ({args.split}) has {src.num_classes} classes (labels up to {top}) but the "
            f"model of {args.run_dir} was trained on {spec.num_classes} classes ({_trained_on(args.run_dir, spec)}); "
            "evaluate it on data with the same label space")
    if src.in_channels != spec.in_channels and not spec.backbone:  # a backbone adapts channels
        raise ValueError(
            f"--data {data} has {src.in_channels}-channel images but the model of {args.run_dir} "
            f"takes {spec.in_channels} channel(s)")
    if not len(labels):
        raise ValueError(f"--data {data} has no items in split {args.split!r}")
    dataset = make_dataset(
        src.val, build_transforms(spec.image_size, False, src.from_files,
                                  synthetic_items=src.synthetic, in_channels=src.in_channels),
        src.from_files)
    device = resolve_device(args.device)
    metrics = evaluate_model(model, dataset, batch_size=args.batch_size, device=device,
                             num_classes=spec.num_classes)
    probs, y = predict_proba(model, dataset, args.batch_size, device)
    names = src.class_names if src.num_classes == spec.num_classes else ()
    detail = classification_report(probs, y, spec.num_classes, names)

    def clean(v: float) -> float | None:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    print(json.dumps({
        "accuracy": clean(metrics["accuracy"]),
        "auroc_macro": clean(metrics["auroc"]),
        "recall_macro": detail["recall_macro"],
        "loss": clean(metrics["loss"]),
        "n": int(metrics["num-examples"]),
        "split": args.split,
        "data": str(data),
        "run_dir": str(args.run_dir.resolve()),
        "model": spec.model,
        "strategy": spec.strategy,
        "per_class": detail["per_class"],
        "confusion_matrix": detail["confusion_matrix"],
        "confusion_matrix_axes": detail["confusion_matrix_axes"],
        **({"warning": spec.norm_warning, "fedbn_local_layers": list(spec.local_layers)}
           if spec.untrained_norm else {}),
    }))
    return 0


def parse_run_config(items: Sequence[str]) -> dict[str, object]:
    """``--run-config`` items: TOML files and ``key=value`` pairs (TOML values; a bare word is
    a string), later items overriding earlier ones, as ``flwr run --run-config`` takes them."""
    import shlex

    import tomllib

    values: dict[str, object] = {}
    for item in items:
        for part in shlex.split(item) if "=" in item and not Path(item).is_file() else [item]:
            if "=" not in part:
                path = Path(part)
                if not path.is_file():
                    raise FileNotFoundError(f"--run-config {part}: no such TOML file (or give key=value)")
                try:
                    values.update(tomllib.loads(path.read_text()))
                except tomllib.TOMLDecodeError as exc:
                    raise ValueError(f"--run-config {path}: not valid TOML: {exc}") from None
                continue
            key, raw = part.split("=", 1)
            try:
                values[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                values[key.strip()] = raw
    return values


def _add_check(sub: argparse._SubParsersAction) -> None:
    from flower_focal.preflight import KEY_ROLES

    p = sub.add_parser(
        "check",
        help="check a run config, its data and HE keys without starting Flower (seconds)",
        description="Check settings (strategy, model, device, ...), the data source exactly as "
        "the institutions load it (missing file, npz keys, every image file), the partition into "
        "--num-institutions and the HE key directory. Prints one line and exits 0 when the run "
        "can start; prints the problem and exits 2 otherwise. Nothing is started.",
    )
    p.add_argument("--run-config", nargs="*", default=[], metavar="TOML|KEY=VALUE",
                   help="run config as for `flwr run --run-config`: TOML files and/or key=value "
                   "pairs (e.g. strategy='he-fedavg' data-path=/data/pathmnist.npz); unset keys "
                   "take the app's defaults")
    p.add_argument("--num-institutions", type=int, default=2,
                   help="institutions (SuperNodes) the data is partitioned into; default: %(default)s")
    p.add_argument("--role", default="all", choices=KEY_ROLES,
                   help="which key files must be in he-key-dir: all (both), server (public.ctx), "
                   "institution (secret.ctx); default: %(default)s")
    p.add_argument("--no-decode", action="store_true",
                   help="do not decode every image file of a folder/CSV source (faster on large sets)")
    p.add_argument("--json", action="store_true", help="print the checked facts as JSON")
    p.set_defaults(handler=_check)


def _check(args: argparse.Namespace) -> int:
    from flower_focal.config import RunConfig
    from flower_focal.preflight import preflight

    cfg = RunConfig.from_mapping(parse_run_config(args.run_config))
    report = preflight(cfg, args.num_institutions, decode_images=not args.no_decode,
                       require_keys=True, key_role=args.role)
    print(json.dumps(report.to_dict()) if args.json
          else f"flower-focal check: {report.summary()}\n{report.institutions_table()}")
    return 0


def _add_keygen(sub: argparse._SubParsersAction) -> None:
    from flower_focal.crypto import ALL_PRESETS, DEFAULT_PRESET

    p = sub.add_parser(
        "keygen",
        help="make the institutions' shared HE key set: secret.ctx (institutions only), "
        "public.ctx (the server) and manifest.json",
        description="Make the institutions' shared HE key set in --out: secret.ctx (give it to "
        "the institutions only, never commit it), public.ctx (the server's copy) and "
        "manifest.json. A .gitignore listing secret.ctx is written next to it, and a warning is "
        "printed when --out is inside a git work tree.",
    )
    p.add_argument("--out", required=True, type=Path, help="directory to write the key set into")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(ALL_PRESETS),
                   help="CKKS parameter preset (strategy focal needs a FOCAL preset, e.g. focal); "
                   "default: %(default)s")
    p.add_argument("--overwrite", action="store_true", help="replace an existing key set")
    p.set_defaults(handler=_keygen)


def git_work_tree(path: Path) -> Path | None:
    """The git work tree ``path`` lies in (the folder holding ``.git``), or None."""
    for folder in (path.resolve(), *path.resolve().parents):
        if (folder / ".git").exists():
            return folder
    return None


def protect_secret(key_dir: Path) -> Path:
    """Keep ``secret.ctx`` out of version control: a ``.gitignore`` listing it in ``key_dir``
    (added to an existing one), and a warning on stderr when ``key_dir`` is in a git work tree."""
    from flower_focal.crypto import SECRET_FILE

    ignore = key_dir / ".gitignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    if SECRET_FILE not in lines:
        header = [] if lines else [("# written by flower-focal keygen: the shared HE secret key "
                                    "must never be committed")]
        ignore.write_text("\n".join([*lines, *header, SECRET_FILE]) + "\n")
    tree = git_work_tree(key_dir)
    if tree is not None:
        print(f"flower-focal keygen: warning: {key_dir.resolve()} is inside the git work tree "
              f"{tree}; the .gitignore written there keeps {SECRET_FILE} out of commits, but consider keeping the "
              "keys outside any repository (and never force-add it)", file=sys.stderr)
    return ignore


def _keygen(args: argparse.Namespace) -> int:
    from flower_focal.crypto import keygen, read_manifest

    out = keygen(args.out, args.preset, overwrite=args.overwrite)
    ignore = protect_secret(out)
    manifest = read_manifest(out)
    print(json.dumps({
        "out": str(out.resolve()),
        "preset": manifest["preset"],
        "fingerprint": manifest["fingerprint"],
        "institutions_get": str((out / manifest["files"]["secret"]).resolve()),
        "server_gets": str((out / manifest["files"]["public"]).resolve()),
        "gitignore": str(ignore.resolve()),
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
        description="Compare runs of different strategies on the same data, partition, "
        "institutions, seed and rounds: writes report.md, report.json and plots into --out. "
        "Runs that are not comparable are refused (exit 2, the differences listed) unless "
        "--allow-mismatch, which shows them in separate groups.",
    )
    p.add_argument("--runs", required=True, nargs="+", type=Path,
                   help="run directories, or a sweep directory standing for its runs")
    p.add_argument("--out", required=True, type=Path, help="directory to write the report into")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="compare runs that differ in data, partition, institutions, seed or rounds "
                   "(the report lists the differences at the top and shows one summary table per group of "
                   "comparable runs)")
    p.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from flower_focal.compare import REPORT_JSON, write_report

    report = write_report(args.runs, args.out, allow_mismatch=args.allow_mismatch)
    doc = json.loads((report.parent / REPORT_JSON).read_text())
    print(json.dumps({"report": str(report), "runs": [r["run_dir"] for r in doc["runs"]],
                      "labels": [r["label"] for r in doc["runs"]],
                      "differences": doc["differences"], "groups": len(doc["groups"])}))
    return 0


def _add_audit(sub: argparse._SubParsersAction) -> None:
    from flower_focal.audit import AuditConfig

    d = AuditConfig()
    p = sub.add_parser(
        "audit",
        help="attack what the server observes (gradient inversion) under a strategy; writes "
        "audit.json and audit.png, prints a JSON summary",
        description="Privacy audit: train institutions' updates with the real client code, let "
        "the server (or, for he-fedavg, a curious institution) run a gradient-inversion attack "
        "on what it observes, and count the images reconstructed (SSIM rule). Writes audit.json "
        "and audit.png into --out and prints a JSON summary.",
    )
    p.add_argument("--strategy", default=d.strategy, choices=tuple(STRATEGY_SPECS),
                   help="strategy whose server-side view is attacked; default: %(default)s")
    p.add_argument("--dataset", default=d.dataset,
                   help="pathmnist | retinamnist (found in ../shared/data, else synthetic), medmnist, "
                   "folder, csv, synthetic-retina, synthetic-pathology; default: %(default)s")
    p.add_argument("--data", default="", help="data file or folder (default: ../shared/data/<dataset>)")
    p.add_argument("--model", default=d.model, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images behind each attacked update; default: %(default)s")
    p.add_argument("--local-steps", type=int, default=d.local_steps,
                   help="local SGD steps on that batch before the update is sent; default: %(default)s")
    p.add_argument("--lr", type=float, default=d.lr, help="local learning rate; default: %(default)s")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="images attacked")
    p.add_argument("--attack", default=d.attack, choices=("inverting-gradients", "idlg"),
                   help="gradient-inversion attack; default: %(default)s")
    p.add_argument("--iterations", type=int, default=d.iterations, help="L-BFGS evaluations")
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help="side of the images the model sees; default: %(default)s")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of data, model and attack; default: %(default)s")
    p.add_argument("--dp-clip-norm", type=float, default=d.dp_clip_norm,
                   help="the strategy's DP L2 clip of each update (0: off); default: %(default)s")
    p.add_argument("--dp-noise-multiplier", type=float, default=d.dp_noise_multiplier,
                   help="the strategy's DP noise multiplier (0: off); default: %(default)s")
    p.add_argument("--aggregate-size", type=int, default=d.aggregate_size,
                   help="he-fedavg: other institutions in the aggregate a curious institution attacks")
    p.add_argument("--backbone", default=d.backbone, help="focal: frozen backbone")
    p.add_argument("--backbone-input-size", type=int, default=d.backbone_input_size,
                   help="focal: backbone input size (0: the backbone's own); default: %(default)s")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda[:i]; default: %(default)s")
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


def _add_run_arguments(p: argparse.ArgumentParser, institutions: int, what: str, run_dir: str) -> None:
    """The options simulate and deploy-local share."""
    p.add_argument("--run-config", nargs="*", default=[], metavar="TOML|KEY=VALUE",
                   help="run config as for flwr run --run-config (TOML files and/or key=value)")
    p.add_argument("--num-institutions", type=int, default=institutions, help=f"{what}; default: %(default)s")
    p.add_argument("--run-dir", type=Path, default=None, help=f"where the run directory goes (default: {run_dir})")


def _print_run(result: Any, **extra: Any) -> None:
    """One JSON line: the run directory, its status and the final evaluation."""
    rounds = result.metrics()["rounds"]
    print(json.dumps({"run_dir": str(result.run_dir), "status": result.status,
                      "wall_time_s": round(result.wall_time_s, 1), **extra,
                      "final_evaluate": rounds[-1]["evaluate"] if rounds else {}}))


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federated simulation (Flower's Ray engine) without a checkout or Hydra",
        description="Check the setup (as the check command does), then run the run config in Flower's simulation "
        "engine with --num-institutions simulated institutions, from an installed wheel too (the "
        "Flower app is generated from flower_focal.apps when there is no checkout). he-fedavg and "
        "focal without he-key-dir get a temporary key set; the encrypted final model is decrypted "
        "into model.pt afterwards. Prints the run directory and the final evaluation as JSON.",
    )
    _add_run_arguments(p, 5, "simulated institutions (SuperNodes)", "runs/<date>-<time>-<strategy>")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="run the institutions on an existing Ray cluster (its head's address; every node "
                   "needs the same Python environment and data paths); default: a private Ray per run")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p.set_defaults(handler=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    import time

    from flower_focal.config import RunConfig
    from flower_focal.simulation import Federation, simulate

    cfg = RunConfig.from_mapping(parse_run_config(args.run_config))
    run_dir = args.run_dir or Path("runs") / f"{time.strftime('%Y-%m-%d-%H-%M-%S')}-{cfg.strategy}"
    cfg = cfg.replace(run_dir=str(run_dir.resolve()),
                      min_available_nodes=min(cfg.min_available_nodes, args.num_institutions))
    result = simulate(cfg, Federation(num_supernodes=args.num_institutions, ray_address=args.ray_address),
                      timeout_s=args.timeout, echo=False)
    _print_run(result)
    return 0


def _add_deploy_local(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy-local",
        help="run a real deployment on this machine: one SuperLink and N SuperNode processes",
        description="Check the setup, then start flower-superlink and --num-institutions flower-supernode "
        "processes on loopback exactly as a consortium would (TLS and SuperNode authentication with a "
        "throw-away PKI unless --insecure; no simulation engine), submit the run config with flwr run, wait "
        "for its final status and stop every process. he-fedavg and focal without he-key-dir get a key set: "
        "secret.ctx for the SuperNodes (node config he-secret-key), public.ctx only for the server. The "
        "SuperLink's and each SuperNode's logs stay in <run-dir>/deployment/. Prints the run directory and "
        "the final evaluation as JSON.",
    )
    _add_run_arguments(p, 2, "SuperNode processes (institutions)", "runs/<date>-<time>-deploy-<strategy>")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext gRPC and open SuperNode registration (an explicit opt-out, for debugging)")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    p.set_defaults(handler=_deploy_local)


def _deploy_local(args: argparse.Namespace) -> int:
    import time

    from flower_focal.config import RunConfig
    from flower_focal.crypto import SECRET_FILE, keygen, server_share
    from flower_focal.deployment import LoopbackDeployment
    from flower_focal.preflight import preflight
    from flower_focal.simulation import KEYED_STRATEGIES, key_preset

    n = args.num_institutions
    cfg = RunConfig.from_mapping(parse_run_config(args.run_config))
    run_dir = (args.run_dir or Path("runs") / f"{time.strftime('%Y-%m-%d-%H-%M-%S')}-deploy-{cfg.strategy}").resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"{run_dir} exists and is not empty")
    cfg = cfg.replace(run_dir=str(run_dir), min_available_nodes=min(cfg.min_available_nodes, n))
    report = preflight(cfg, n)
    print(f"flower-focal deploy-local: {report.summary()}\n{report.institutions_table()}", file=sys.stderr)
    workdir = run_dir / "deployment"
    workdir.mkdir(parents=True)
    secret: Path | None = None
    if cfg.strategy in KEYED_STRATEGIES:
        if cfg.he_key_dir:
            secret = Path(cfg.he_key_dir).resolve() / SECRET_FILE
        else:  # institutions get secret.ctx, the server host only public.ctx (+ manifest)
            institution_keys = keygen(workdir / "institution-keys", key_preset(cfg))
            server_keys = server_share(institution_keys, workdir / "server-keys")
            secret, cfg = institution_keys / SECRET_FILE, cfg.replace(he_key_dir=str(server_keys))
    nodes = [{"partition-id": i, "num-partitions": n, **({"he-secret-key": str(secret)} if secret else {})}
             for i in range(n)]
    with LoopbackDeployment(nodes, workdir=workdir, insecure=args.insecure) as deployment:
        result = deployment.run(cfg, timeout_s=args.timeout)
    if secret is not None and (run_dir / "model.he").is_file():
        from flower_focal.artifacts import decrypt_model

        decrypt_model(run_dir, secret.parent)  # as an institution would, with its secret key
    _print_run(result, secure=not args.insecure, logs=sorted(str(p) for p in workdir.glob("*.log")))
    return 0


def _add_stop_local(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stop-local",
        help="stop the local SuperLink that a plain flwr run . leaves running",
        description="A plain flwr run . (no SuperLink address) starts Flower's managed local SuperLink in the "
        "background and leaves it running for later flwr run / flwr ls / flwr log calls, with its SuperExec "
        "and any simulation it still runs. This stops that SuperLink and every process it started "
        "(FLWR_HOME, default ~/.flwr, names it). flower-focal's own launchers use a private SuperLink per run "
        "and stop it themselves.",
    )
    p.add_argument("--flwr-home", type=Path, default=None,
                   help="Flower's home directory (default: $FLWR_HOME or ~/.flwr)")
    p.set_defaults(handler=_stop_local)


def _stop_local(args: argparse.Namespace) -> int:
    from flwr.supercore.utils import get_flwr_home

    from flower_focal.simulation import stop_processes_under

    home = (args.flwr_home or get_flwr_home()).expanduser().resolve()
    stopped = stop_processes_under(home / "local-superlink")
    print(json.dumps({"flwr_home": str(home), "processes_stopped": stopped}))
    return 0


def _add_certs(sub: argparse._SubParsersAction) -> None:
    """``flower-focal certs --out DIR --supernodes N [--hosts H ...]``: a test consortium's PKI."""
    from flower_focal.pki import DEFAULT_HOSTS, make_consortium

    p = sub.add_parser(
        "certs", help="make a consortium CA, the SuperLink's TLS certificate and SuperNode key pairs",
        description="Write a self-signed consortium CA (ca.crt, ca.key: keep it offline), the SuperLink's TLS "
        "certificate for --hosts (superlink.crt, superlink.key: server host only) and --supernodes "
        "authentication key pairs (supernodes/node-I: institution I only; node-I.pub: registered with "
        "flwr supernode register), plus SHA256SUMS of the public files. For a test consortium or a pilot; "
        "see the README section Multi-site operations.",
    )
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
    _add_simulate,
    _add_check,
    _add_evaluate,
    _add_keygen,
    _add_decrypt_model,
    _add_report,
    _add_audit,
    _add_certs,
    _add_deploy_local,
    _add_stop_local,
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flower-focal")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="flower-focal", description=__doc__.splitlines()[0],
                                     epilog="Run flower-focal COMMAND -h for a command's description and options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the installed flower-focal version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
