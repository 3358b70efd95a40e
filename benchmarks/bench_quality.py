"""Model quality at the defaults: centralised bound vs federated strategies, 3 seeds.

    python benchmarks/bench_quality.py --he-seeds 0                       # everything (about 1 h on 2 cores)
    python benchmarks/bench_quality.py --datasets pathmnist --partitions iid --seeds 0 \\
        --methods central fedavg                                          # one quick cell

Setting: the shared MedMNIST ``train`` split over ``--institutions`` institutions (IID or
Dirichlet(0.5), flower-focal's seeded partitioners), scored on the whole pooled ``val`` split
(macro one-vs-rest AUROC and accuracy). Everything runs at the run-config defaults
(:class:`flower_focal.config.RunConfig`: model, lr and its schedule, local epochs, batch size,
optimiser) except ``num-server-rounds`` (``--rounds``) and the image size (28, MedMNIST's own).

Methods, for each seed:

* ``central``: the same model on the pooled training set with the same local-training code
  (:func:`flower_focal.training.train_local`, same augmentation), ``rounds x local-epochs``
  epochs with the lr schedule stepped per epoch: the centralised bound (it does not depend on
  the partition, so it is trained once per dataset and seed).
* ``fedavg``, ``he-fedavg``, ``fedprox``: a real Flower simulation
  (:func:`flower_focal.simulation.simulate`, Ray; he-fedavg with real TenSEAL CKKS and a fresh
  key set), final global model scored with ``flower-focal evaluate --split val``.
  ``fedprox`` is fedavg with ``fedprox-mu`` = ``--fedprox-mu``. For he-fedavg the
  largest absolute weight difference to the fedavg model of the same seed is reported
  (``max_abs_weight_diff_vs_fedavg``).
* ``fedbn``: fedavg with ``fedbn=true``; its final global model holds the initial
  normalisation layers, so only its federated evaluation is reported (``fed_*``).
* ``--server-momentum`` / ``--server-lr`` (default 0 / 1: plain FedAvg) set the server optimiser
  (FedAvgM, run config ``server-momentum`` / ``server-lr``) of every federated method, e.g.
  ``--methods fedavg --server-momentum 0.9``; they are recorded in the JSON's ``settings``.
* ``fedavg`` and ``fedbn`` also report ``personal_*``: the federated evaluation after
  ``--personal-epochs`` of local fine-tuning at each institution (``personal-epochs``).
* ``ditto``: fedavg with Ditto (``ditto-lambda`` = ``--ditto-lambda``, ``personal-epochs`` =
  ``--personal-epochs`` per round): each institution's persistent personal model, reported as
  ``personal_*``; its global model (``auroc``, ``fed_*``) is fedavg's of the same seed.
* Every federated method reports ``fed_*``: the last round's federated evaluation (each
  institution scores on its own share of val, which follows its training label mix under
  Dirichlet; weighted mean, classes absent at an institution skipped).
* ``focal`` and ``logreg_pooled`` (frozen-backbone features): taken from
  ``benchmarks/bench_focal_quality.py``'s ``quality()`` when that module provides one
  (``--methods focal``); otherwise reported as not available.

Per (dataset, partition, method): mean, std and spread (max - min) over seeds. Prints one JSON
object (also written to ``--out`` after every run, so a long sweep keeps partial results).
The README's training-quality table is rendered from this JSON (the files
``benchmarks/results/quality-*.json`` that ``readme_tables.QUALITY_FILES`` lists, one per dataset
and partition today) by ``python benchmarks/readme_tables.py --write``; save a new run's output
there to update it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, loadavg, machine, shared_npz  # noqa: E402

from flower_focal.config import RunConfig  # noqa: E402

FEDERATED: dict[str, dict[str, Any]] = {
    "fedavg": {}, "he-fedavg": {"strategy": "he-fedavg"}, "fedprox": {}, "fedbn": {"fedbn": True},
    "ditto": {}}  # ditto: ditto_lambda and personal_epochs from the arguments (main)
ALL_METHODS = ("central", "fedavg", "he-fedavg", "fedprox", "fedbn", "ditto", "focal")
METRICS = ("auroc", "accuracy", "fed_auroc", "fed_accuracy", "personal_auroc", "personal_accuracy")


def base_config(dataset: str, partition: str, seed: int, args: argparse.Namespace, **changes: Any) -> RunConfig:
    """The run config of one cell: defaults plus data, partition, rounds and seed."""
    return RunConfig(
        dataset="medmnist", data_path=str(shared_npz(dataset)), image_size=28,
        partitioner=partition, dirichlet_alpha=0.5, num_server_rounds=args.rounds,
        min_available_nodes=args.institutions, seed=seed, device="cpu", **changes,
    )


def central(cfg: RunConfig) -> dict[str, Any]:
    """Centralised bound: the run's model and local-training code on the pooled training set."""
    import torch

    from flower_focal.data import load_institution
    from flower_focal.data.institution import load_split
    from flower_focal.models import build_model
    from flower_focal.training import evaluate_model, round_lr, train_local

    torch.set_num_threads(1)  # like one ClientApp actor (client-cpus 1); 2 cores are shared here
    pooled = load_institution(cfg.replace(partitioner="iid"), 0, 1)
    epochs = cfg.num_server_rounds * cfg.local_epochs
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, pooled.in_channels, pooled.num_classes, cfg.image_size)
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        train_local(model, pooled.train, epochs=1, lr=round_lr(cfg.lr, cfg.lr_schedule, epoch, epochs),
                    batch_size=cfg.batch_size, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    optimizer=cfg.optimizer, device="cpu", seed=cfg.seed * 1000 + epoch,
                    precision=cfg.precision)
    ev = evaluate_model(model, load_split(cfg, "val"), batch_size=256, device="cpu",
                        num_classes=pooled.num_classes)
    return {"auroc": ev["auroc"], "accuracy": ev["accuracy"], "epochs": epochs, "wall_s": time.time() - t0}


def federated(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """One real Flower simulation, its final model scored by ``flower-focal evaluate``.

    ``auroc`` / ``accuracy``: the final global model on the pooled val split (not for FedBN,
    whose global model has no trained normalisation layers). ``fed_*``: the last round's
    federated evaluation (each institution's val share, weighted mean; FedBN with its own
    normalisation layers). ``personal_*``: the same after local fine-tuning (personal-epochs).
    """
    from flower_focal.simulation import Federation, simulate

    t0 = time.time()
    result = simulate(cfg.replace(run_dir=str(run_dir)), Federation(num_supernodes=cfg.min_available_nodes),
                      echo=False)
    wall = time.time() - t0
    rounds = result.metrics()["rounds"]
    last = rounds[-1]["evaluate"]
    row: dict[str, Any] = {"auroc": None, "accuracy": None,
                           "fed_auroc": last.get("auroc"), "fed_accuracy": last.get("accuracy"),
                           "personal_auroc": last.get("personal-auroc"),
                           "personal_accuracy": last.get("personal-accuracy"), "wall_s": wall,
                           "federated_val_auroc_by_round": [r["evaluate"].get("auroc") for r in rounds]}
    if not cfg.fedbn:
        evaluated = subprocess.run(
            [sys.executable, "-m", "flower_focal.cli", "evaluate", "--run-dir", str(result.run_dir),
             "--data", cfg.data_path, "--split", "val", "--device", "cpu"],
            capture_output=True, text=True, check=True)
        final = json.loads(evaluated.stdout)
        row.update(auroc=final["auroc_macro"], accuracy=final["accuracy"])
    return row


def weight_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between two runs' final ``model.pt`` weights."""
    from flower_focal.artifacts import load_model

    sa, sb = load_model(a)[0].state_dict(), load_model(b)[0].state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, std and spread of AUROC and accuracy over the seeds of one cell."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in rows]}
    for metric in METRICS:
        values = [r[metric] for r in rows if r.get(metric) is not None]
        if not values:
            continue
        out[f"val_{metric}_mean"] = round(statistics.fmean(values), 4)
        out[f"val_{metric}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
        out[f"val_{metric}_spread"] = round(max(values) - min(values), 4)
        out[f"val_{metric}_per_seed"] = [round(v, 4) for v in values]
    return out


def focal_rows(dataset: str, partition: str, args: argparse.Namespace) -> dict[str, Any]:
    """FOCAL and pooled logistic regression from bench_focal_quality.quality(), if it exists."""
    try:
        import bench_focal_quality  # type: ignore[import-not-found]
    except ImportError:
        return {"skipped": "benchmarks/bench_focal_quality.py not present"}
    quality = getattr(bench_focal_quality, "quality", None)
    if quality is None:
        return {"skipped": "bench_focal_quality has no quality()"}
    return quality(dataset=dataset, partition=partition, seeds=args.seeds, institutions=args.institutions)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["pathmnist", "retinamnist"])
    p.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument("--institutions", type=int, default=5)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--fedprox-mu", type=float, default=0.01)
    p.add_argument("--server-momentum", type=float, default=0.0,
                   help="FedAvgM server momentum of every federated method (run config server-momentum)")
    p.add_argument("--server-lr", type=float, default=1.0,
                   help="FedAvgM server learning rate of every federated method (run config server-lr)")
    p.add_argument("--personal-epochs", type=int, default=1,
                   help="fedavg and fedbn runs also report personal-* metrics after this much local fine-tuning; "
                   "ditto: the personal model's epochs per round")
    p.add_argument("--ditto-lambda", type=float, default=0.1,
                   help="ditto: its run config ditto-lambda (personal-epochs: --personal-epochs)")
    p.add_argument("--he-seeds", nargs="+", type=int, default=None,
                   help="seeds he-fedavg runs for (default: all; it is the slowest method)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here (after every run)")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the run directories here (default: a temporary one)")
    args = p.parse_args()
    FEDERATED["ditto"].update(ditto_lambda=args.ditto_lambda, personal_epochs=args.personal_epochs)
    defaults = RunConfig()
    result: dict[str, Any] = {
        "benchmark": "quality",
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "defaults": {k: getattr(defaults, k) for k in (
                         "model", "lr", "lr_schedule", "local_epochs", "batch_size", "optimizer",
                         "momentum", "weight_decay")}},
        "evaluation": "pooled val split, macro one-vs-rest AUROC and accuracy of the final model",
        "machine": machine(), "load_before": loadavg(), "cells": [],
    }

    def save() -> None:
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=2))

    pooled_rows: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ff-quality-") as scratch:
        tmp = str(args.work_dir or scratch)
        for dataset in args.datasets:
            if shared_npz(dataset) is None:
                result["cells"].append({"dataset": dataset, "skipped": "data not found"})
                continue
            for partition in args.partitions:
                cell: dict[str, Any] = {"dataset": dataset, "partition": partition, "methods": {}}
                result["cells"].append(cell)
                for method in (m for m in args.methods if m != "focal"):
                    rows = []
                    for seed in args.seeds:
                        if method == "central":  # pooled data: the same for every partition
                            if (dataset, seed) not in pooled_rows:
                                pooled_rows[dataset, seed] = central(base_config(dataset, partition, seed, args))
                            row = pooled_rows[dataset, seed]
                        else:
                            changes: dict[str, Any] = dict(FEDERATED[method])
                            changes.update(server_momentum=args.server_momentum, server_lr=args.server_lr)
                            if method == "fedprox":
                                changes["fedprox_mu"] = args.fedprox_mu
                            if method in ("fedavg", "fedbn"):
                                changes["personal_epochs"] = args.personal_epochs
                            if method == "he-fedavg" and seed not in (args.he_seeds or args.seeds):
                                continue
                            run_dir = Path(tmp) / f"{dataset}-{partition}-{method}-{seed}"
                            row = federated(base_config(dataset, partition, seed, args, **changes), run_dir)
                            twin = Path(tmp) / f"{dataset}-{partition}-fedavg-{seed}"
                            if method == "he-fedavg" and (twin / "model.pt").exists():
                                row["max_abs_weight_diff_vs_fedavg"] = weight_diff(run_dir, twin)
                        rows.append({"seed": seed, **row})
                        cell["methods"][method] = {**summarise(rows), "runs": rows}
                        save()
                if "focal" in args.methods:
                    cell["methods"]["focal"] = focal_rows(dataset, partition, args)
                    save()
                methods = cell["methods"]
                if "central" in methods and "fedavg" in methods:
                    cell["fedavg_minus_central_auroc"] = round(
                        methods["fedavg"]["val_auroc_mean"] - methods["central"]["val_auroc_mean"], 4)
                save()
    result["load_after"] = loadavg()
    save()
    emit(result)


if __name__ == "__main__":
    main()
