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
  ``personal_*``; its global model (``auroc``, ``fed_*``) is fedavg's of the same seed. It is
  part of the default method list; ``--personal-epochs 0`` with it is refused before any run.
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

Cross-validation (``--cv K``, default 0 = off): the 100 / 120 validation images move a seed's
AUROC by about 0.006, too much to decide targets such as "fedavg >= 0.97" or "within 0.01 of
central". With ``--cv K`` the npz's ``train`` and ``val`` are pooled and split into K stratified
folds (:func:`cv_folds`: per class a permutation seeded by ``--cv-fold-seed``, default
:data:`CV_FOLD_SEED`, never by the run seed, so every method and seed sees the same folds); fold
``f`` is written to ``<work-dir>/cv/<dataset>_cv<K>-seed<S>-fold<f>.npz`` (train = the other
folds, val = fold f; never into the repository) and every method runs on it exactly as above,
once per (fold, seed), so each pooled image is scored once per seed. The training set is
(K-1)/K of train+val (PathMNIST 5 folds: 640-641 images instead of 701). ``focal`` is not
available under CV (bench_focal_quality scores the fixed val split): ``--cv`` with ``--methods
focal`` is refused, and without ``--methods`` the default under CV is every other method. Per
method the summary adds ``folds``, ``n_runs``, ``val_<metric>_per_fold`` (means over seeds; the
``val_<metric>_mean/std/spread`` are over all (fold, seed) runs and ``val_<metric>_per_seed`` are
means over folds), ``val_images`` (distinct pooled images scored) and ``val_images_scored``
(summed over runs); every method with a final-model AUROC gets ``val_auroc_minus_central_paired``
(mean and std of its per-(fold, seed) difference to central: what decides "within 0.01 of
central") and the cell ``fedavg_minus_central_auroc_paired``. ``settings.cv`` records ``folds``,
``fold_seed`` and ``fold_sizes`` per dataset. The full CV sweep of one cell (about K times the
plain run's time; store it as ``benchmarks/results/quality-cv-<dataset>-<partition>.json``, the
files the README's ``quality-cv`` table reads)::

    python benchmarks/bench_quality.py --cv 5 --seeds 0 1 2 --datasets pathmnist --partitions iid \\
        --methods central fedavg he-fedavg fedprox fedbn --he-seeds 0 \\
        --out benchmarks/results/quality-cv-pathmnist-iid.json --work-dir /tmp/quality-cv
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, loadavg, machine, shared_npz  # noqa: E402

from flower_focal.config import RunConfig  # noqa: E402

CV_FOLD_SEED = 17
"""Default seed of the cross-validation folds (issue 17); independent of the run seeds."""
FEDERATED: dict[str, dict[str, Any]] = {
    "fedavg": {}, "he-fedavg": {"strategy": "he-fedavg"}, "fedprox": {}, "fedbn": {"fedbn": True},
    "ditto": {}}  # ditto: ditto_lambda and personal_epochs from the arguments (see the run loop)
ALL_METHODS = ("central", *FEDERATED, "focal")
METRICS = ("auroc", "accuracy", "fed_auroc", "fed_accuracy", "personal_auroc", "personal_accuracy")


def base_config(dataset: str, partition: str, seed: int, args: argparse.Namespace,
                data: Path | None = None, **changes: Any) -> RunConfig:
    """The run config of one cell: defaults plus data (``data``, e.g. a CV fold's npz, or the
    shared npz), partition, rounds and seed."""
    return RunConfig(
        dataset="medmnist", data_path=str(data or shared_npz(dataset)), image_size=28,
        partitioner=partition, dirichlet_alpha=0.5, num_server_rounds=args.rounds,
        min_available_nodes=args.institutions, seed=seed, device="cpu", **changes,
    )


def cv_folds(labels: np.ndarray, k: int, seed: int = CV_FOLD_SEED) -> list[np.ndarray]:
    """``k`` stratified, disjoint folds of ``range(len(labels))`` (sorted index arrays).

    Each class's indices are permuted with ``seed`` and the classes, one after another, are dealt
    round-robin over the folds: every fold holds each class's count / k (rounded either way) and
    the fold sizes differ by at most one. Depends only on ``labels``, ``k`` and ``seed``.
    """
    labels = np.asarray(labels).reshape(-1)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 2:
        raise ValueError(f"--cv: the number of folds must be an integer >= 2, got {k!r}")
    classes, counts = np.unique(labels, return_counts=True)
    if len(labels) == 0 or k > counts.min():
        smallest = "no images" if len(labels) == 0 else (
            f"class {classes[counts.argmin()]} has {counts.min()} images")
        raise ValueError(f"--cv {k}: every fold must hold every class, but {smallest} in train+val; "
                         f"use at most {0 if len(labels) == 0 else counts.min()} folds")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in classes])
    assignment = np.empty(len(labels), dtype=np.int64)
    assignment[order] = np.arange(len(order)) % k
    return [np.flatnonzero(assignment == f) for f in range(k)]


def write_cv_folds(npz: Path, k: int, seed: int, out_dir: Path) -> tuple[list[Path], list[int]]:
    """Pool ``npz``'s train and val, split them with :func:`cv_folds` and write one MedMNIST npz
    per fold to ``out_dir`` (train = the other folds, val = the fold; other keys, e.g.
    ``test_*``, copied unchanged). The file names start with the dataset's name, which
    flower-focal's loader reads the class names from. Returns the paths and the fold sizes."""
    with np.load(npz, allow_pickle=False) as z:
        arrays = {key: z[key] for key in z.files}
    missing = [key for key in ("train_images", "train_labels", "val_images", "val_labels") if key not in arrays]
    if missing:
        raise ValueError(f"--cv: {npz} lacks {missing}; it needs MedMNIST train_* and val_* arrays")
    images = np.concatenate([arrays["train_images"], arrays["val_images"]])
    labels = np.concatenate([arrays["train_labels"], arrays["val_labels"]])
    folds = cv_folds(labels, k, seed)
    rest = {key: v for key, v in arrays.items() if not key.startswith(("train_", "val_"))}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for f, val_idx in enumerate(folds):
        train_idx = np.concatenate([folds[g] for g in range(k) if g != f])
        train_idx.sort()
        path = out_dir / f"{npz.stem}_cv{k}-seed{seed}-fold{f}.npz"
        np.savez(path, train_images=images[train_idx], train_labels=labels[train_idx],
                 val_images=images[val_idx], val_labels=labels[val_idx], **rest)
        paths.append(path)
    return paths, [len(v) for v in folds]


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
    """Mean, std and spread of AUROC and accuracy over the runs of one cell: its seeds, or with
    ``--cv`` (rows with a ``fold``) its (fold, seed) runs, plus per-seed means over folds,
    per-fold means over seeds and the validation images scored."""
    cv = any("fold" in r for r in rows)
    seeds = sorted({r["seed"] for r in rows}) if cv else [r["seed"] for r in rows]
    out: dict[str, Any] = {"seeds": seeds}
    if cv:
        folds = sorted({r["fold"] for r in rows})
        out.update(folds=folds, n_runs=len(rows),
                   val_images=sum({r["fold"]: r["val_images"] for r in rows}.values()),
                   val_images_scored=sum(r["val_images"] for r in rows))
    for metric in METRICS:
        values = [r[metric] for r in rows if r.get(metric) is not None]
        if not values:
            continue
        out[f"val_{metric}_mean"] = round(statistics.fmean(values), 4)
        out[f"val_{metric}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
        out[f"val_{metric}_spread"] = round(max(values) - min(values), 4)
        if not cv:
            out[f"val_{metric}_per_seed"] = [round(v, 4) for v in values]
            continue
        for group, name in (("seed", "per_seed"), ("fold", "per_fold")):
            means = [statistics.fmean(vs) for g in sorted({r[group] for r in rows})
                     if (vs := [r[metric] for r in rows if r[group] == g and r.get(metric) is not None])]
            out[f"val_{metric}_{name}"] = [round(v, 4) for v in means]
    return out


def paired_difference(rows: list[dict[str, Any]], reference: list[dict[str, Any]],
                      metric: str = "auroc") -> dict[str, Any] | None:
    """Mean and std of ``rows``' ``metric`` minus ``reference``'s, paired on (fold, seed): the
    same validation images and seed. None when no run pairs."""
    ref = {(r.get("fold"), r["seed"]): r.get(metric) for r in reference}
    diffs = [(r.get("fold"), r["seed"], r[metric] - ref[r.get("fold"), r["seed"]]) for r in rows
             if r.get(metric) is not None and ref.get((r.get("fold"), r["seed"])) is not None]
    if not diffs:
        return None
    values = [d for _, _, d in diffs]
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "n": len(values), "per_run": [{"fold": f, "seed": s, "diff": round(d, 4)} for f, s, d in diffs]}


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["pathmnist", "retinamnist"])
    p.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None, choices=ALL_METHODS,
                   help="default: all of them (with --cv all but focal)")
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
    p.add_argument("--cv", type=int, default=0, metavar="K",
                   help="K-fold cross-validation over the pooled train+val (0: score on the val split)")
    p.add_argument("--cv-fold-seed", type=int, default=CV_FOLD_SEED,
                   help="seed of the CV folds (the same for every method and run seed)")
    args = p.parse_args(argv)
    if args.cv:
        if args.cv < 2:
            p.error(f"--cv: the number of folds must be >= 2 (0 = no cross-validation), got {args.cv}")
        if args.methods and "focal" in args.methods:
            p.error("--cv: --methods focal is not available under cross-validation "
                    "(bench_focal_quality scores the fixed val split); run focal without --cv")
    args.methods = args.methods or [m for m in ALL_METHODS if not (args.cv and m == "focal")]
    if "ditto" in args.methods:  # refused now, not after hours of the other methods' runs
        from flower_focal.config import check_personalisation

        try:
            check_personalisation(RunConfig(ditto_lambda=args.ditto_lambda, personal_epochs=args.personal_epochs))
        except ValueError as exc:
            p.error(f"--methods ditto: {exc}")
    defaults = RunConfig()
    settings: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                if k not in ("cv", "cv_fold_seed")}
    if args.cv:
        settings["cv"] = {"folds": args.cv, "fold_seed": args.cv_fold_seed, "fold_sizes": {}}
    result: dict[str, Any] = {
        "benchmark": "quality",
        "settings": {**settings,
                     "defaults": {k: getattr(defaults, k) for k in (
                         "model", "lr", "lr_schedule", "local_epochs", "batch_size", "optimizer",
                         "momentum", "weight_decay")}},
        "evaluation": "pooled val split, macro one-vs-rest AUROC and accuracy of the final model" if not args.cv else (
            f"{args.cv}-fold cross-validation over the pooled train+val (stratified, fold seed "
            f"{args.cv_fold_seed}): each fold scored by the final model trained on the other folds, "
            "macro one-vs-rest AUROC and accuracy"),
        "machine": machine(), "load_before": loadavg(), "cells": [],
    }

    def save() -> None:
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=2))

    pooled_rows: dict[tuple[str, int | None, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ff-quality-") as scratch:
        tmp = Path(args.work_dir or scratch)
        for dataset in args.datasets:
            npz = shared_npz(dataset)
            if npz is None:
                result["cells"].append({"dataset": dataset, "skipped": "data not found"})
                continue
            folds: list[tuple[int | None, Path | None]] = [(None, None)]
            fold_sizes: list[int] = []
            if args.cv:  # the same folds for every partition, method and seed
                paths, fold_sizes = write_cv_folds(npz, args.cv, args.cv_fold_seed, tmp / "cv")
                result["settings"]["cv"]["fold_sizes"][dataset] = fold_sizes
                folds = list(enumerate(paths))
            for partition in args.partitions:
                cell: dict[str, Any] = {"dataset": dataset, "partition": partition, "methods": {}}
                result["cells"].append(cell)
                for method in (m for m in args.methods if m != "focal"):
                    rows = []
                    for fold, data in folds:
                        for seed in args.seeds:
                            tag = str(seed) if fold is None else f"fold{fold}-{seed}"
                            if method == "central":  # pooled data: the same for every partition
                                if (dataset, fold, seed) not in pooled_rows:
                                    pooled_rows[dataset, fold, seed] = central(
                                        base_config(dataset, partition, seed, args, data))
                                row = pooled_rows[dataset, fold, seed]
                            else:
                                changes: dict[str, Any] = dict(FEDERATED[method])
                                changes.update(server_momentum=args.server_momentum, server_lr=args.server_lr)
                                if method == "fedprox":
                                    changes["fedprox_mu"] = args.fedprox_mu
                                if method in ("fedavg", "fedbn", "ditto"):
                                    changes["personal_epochs"] = args.personal_epochs
                                if method == "ditto":
                                    changes["ditto_lambda"] = args.ditto_lambda
                                if method == "he-fedavg" and seed not in (args.he_seeds or args.seeds):
                                    continue
                                run_dir = tmp / f"{dataset}-{partition}-{method}-{tag}"
                                row = federated(base_config(dataset, partition, seed, args, data, **changes), run_dir)
                                twin = tmp / f"{dataset}-{partition}-fedavg-{tag}"
                                if method == "he-fedavg" and (twin / "model.pt").exists():
                                    row["max_abs_weight_diff_vs_fedavg"] = weight_diff(run_dir, twin)
                            where = {} if fold is None else {"fold": fold, "val_images": fold_sizes[fold]}
                            rows.append({"seed": seed, **where, **row})
                            cell["methods"][method] = {**summarise(rows), "runs": rows}
                            save()
                if "focal" in args.methods:
                    cell["methods"]["focal"] = focal_rows(dataset, partition, args)
                    save()
                methods = cell["methods"]
                if "central" in methods and "fedavg" in methods:
                    cell["fedavg_minus_central_auroc"] = round(
                        methods["fedavg"]["val_auroc_mean"] - methods["central"]["val_auroc_mean"], 4)
                if args.cv and "central" in methods:  # paired on (fold, seed): same images, same seed
                    for name in FEDERATED:
                        if name in methods:
                            paired = paired_difference(methods[name]["runs"], methods["central"]["runs"])
                            if paired is not None:
                                methods[name]["val_auroc_minus_central_paired"] = paired
                    if "val_auroc_minus_central_paired" in methods.get("fedavg", {}):
                        cell["fedavg_minus_central_auroc_paired"] = methods["fedavg"]["val_auroc_minus_central_paired"]
                save()
    result["load_after"] = loadavg()
    save()
    emit(result)


if __name__ == "__main__":
    main()
