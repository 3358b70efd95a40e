"""FOCAL quality at its defaults: encrypted FOCAL vs pooled logistic regression, same features.

    python benchmarks/bench_focal_quality.py                       # PathMNIST + RetinaMNIST, 3 seeds
    python benchmarks/bench_focal_quality.py --datasets pathmnist --seeds 0 --partitions iid

Setting (per dataset): every image of the ``train`` split embedded once with the frozen
default backbone (EfficientNet-Lite0, packaged ImageNet weights, default input size; cached
under ``--cache-dir``), split over ``--institutions`` institutions IID or Dirichlet(0.5) with
``flower_focal.data.partition`` (seeded); evaluated on the whole pooled ``val`` split.

Methods, on the same embeddings, for each seed:

* ``focal``: :func:`flower_focal.testing.train_encrypted` at its **defaults** (global
  standardisation under HE, derived step, Nesterov through the institutions, loss guard,
  CKKS preset ``focal``, a fresh key set per run), ``--steps`` full-batch steps. With
  ``--twin`` the plaintext twin (:func:`flower_focal.testing.train_plaintext`, the same algorithm
  on numpy) instead: minutes faster, equal up to CKKS noise (parity tests).
* ``logreg_pooled``: scikit-learn ``StandardScaler`` + ``LogisticRegression(C=--C)`` on all
  training embeddings pooled (not federated: the reference).

Per (dataset, partition): mean and spread (max - min) over seeds of validation macro AUROC and
accuracy; ``focal_minus_logreg``; ``loss_rose`` (a run whose last training loss is above its
first). Prints one JSON object. :func:`quality` is importable (``benchmarks/bench_quality.py``).
The README's FOCAL convergence table is rendered from this JSON
(``benchmarks/results/focal_quality-*.json``) by ``python benchmarks/readme_tables.py --write``;
save a new run's output there to update it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, loadavg, machine, shared_npz  # noqa: E402

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "flower-focal-embeddings"


def load_features(dataset: str, *, backbone_name: str = "efficientnet-lite0",
                  cache_dir: str | Path = DEFAULT_CACHE) -> dict[str, Any] | None:
    """``{"train": (X, y), "val": (X, y), "k": K}`` of a shared MedMNIST dataset (cached), or None."""
    from flower_focal.config import RunConfig
    from flower_focal.data import source_info
    from flower_focal.data.institution import make_dataset
    from flower_focal.data.transforms import build_transforms
    from flower_focal.models.backbones import build_backbone
    from flower_focal.models.embeddings import cached_embeddings

    path = shared_npz(dataset)
    if path is None:
        return None
    src = source_info(RunConfig(dataset="medmnist", data_path=str(path), image_size=28))
    transform = build_transforms(28, False, False, synthetic_items=False, in_channels=src.in_channels)
    backbone = build_backbone(backbone_name, device="cpu")
    out: dict[str, Any] = {"k": src.num_classes}
    for split, items in (("train", src.train), ("val", src.val)):
        key = {"benchmark": "bench_focal_quality", "dataset": dataset, "split": split,
               "data_size": path.stat().st_size}
        x, y = cached_embeddings(backbone, make_dataset(list(items), transform, False), cache_dir, key,
                                 batch_size=64, device="cpu")
        out[split] = (np.asarray(x, np.float64), np.asarray(y, np.int64))
    return out


def logreg_pooled(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], k: int,
                  C: float = 0.1) -> dict[str, float]:
    """scikit-learn ``StandardScaler`` + ``LogisticRegression(C)`` on the pooled embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from flower_focal.metrics import accuracy, macro_auroc

    scaler = StandardScaler().fit(train[0])
    clf = LogisticRegression(C=C, max_iter=5000).fit(scaler.transform(train[0]), train[1])
    probs = np.zeros((len(val[1]), k))
    probs[:, clf.classes_] = clf.predict_proba(scaler.transform(val[0]))
    return {"val_auroc_macro": round(macro_auroc(probs, val[1], k), 4),
            "val_accuracy": round(accuracy(probs, val[1]), 4)}


def focal_run(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], k: int, *,
              partition: str, seed: int, institutions: int = 5, steps: int = 50,
              encrypted: bool = True, secret: Any = None) -> dict[str, Any]:
    """FOCAL at its defaults on ``train`` split over institutions; scores on ``val``."""
    from flower_focal.data.partition import partition_indices
    from flower_focal.focal import FocalLayout, predict_logits, softmax
    from flower_focal.testing import InstitutionEmbeddings as Institution, train_encrypted, train_plaintext
    from flower_focal.metrics import accuracy, macro_auroc

    x, y = train
    parts = partition_indices(y, institutions, partition, seed, alpha=0.5)
    insts = [Institution(str(i), x[p], y[p]) for i, p in enumerate(parts)]
    t = time.perf_counter()
    if encrypted:
        from flower_focal.crypto import SecretContext

        res = train_encrypted(insts, k, secret=secret or SecretContext.generate("focal"),
                              epochs=steps, init_seed=seed)
    else:
        res = train_plaintext(insts, k, epochs=steps, init_seed=seed)
    probs = softmax(predict_logits(res.head, FocalLayout(x.shape[1], k), val[0]))
    losses = [h["loss"] for h in res.history]
    return {
        "val_auroc_macro": round(macro_auroc(probs, val[1], k), 4),
        "val_accuracy": round(accuracy(probs, val[1]), 4),
        "steps": steps,
        "first_train_loss": round(losses[0], 5),
        "final_train_loss": round(res.final_loss, 5),
        "loss_rose": bool(res.final_loss > losses[0]),
        "backoffs": len(res.guard_log),
        "step": round(res.history[-1]["lr"], 6),
        "per_institution": [len(p) for p in parts],
        "train_s": round(time.perf_counter() - t, 1),
        "encrypted": encrypted,
    }


def _summary(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": round(float(arr.mean()), 4), "spread": round(float(arr.max() - arr.min()), 4),
            "values": [round(float(v), 4) for v in arr]}


def quality(datasets: tuple[str, ...] = ("pathmnist", "retinamnist"),
            partitions: tuple[str, ...] = ("iid", "dirichlet"), seeds: tuple[int, ...] = (0, 1, 2), *,
            steps: int = 50, institutions: int = 5, C: float = 0.1, twin: bool = False,
            also_C: tuple[float, ...] = (0.01,),
            cache_dir: str | Path = DEFAULT_CACHE) -> dict[str, Any]:
    """The benchmark as a function: ``{dataset: {partition: {...}}}`` (see the module doc)."""
    out: dict[str, Any] = {}
    for dataset in datasets:
        feats = load_features(dataset, cache_dir=cache_dir)
        if feats is None:
            out[dataset] = {"skipped": "data not found"}
            continue
        k, train, val = feats["k"], feats["train"], feats["val"]
        ref = logreg_pooled(train, val, k, C)
        entry: dict[str, Any] = {"n_train": int(len(train[1])), "n_val": int(len(val[1])), "classes": k,
                                 "embed_dim": int(train[0].shape[1]),
                                 "logreg_pooled": {**ref, "C": C}}
        for c in also_C:  # other regularisation strengths, for context (the target uses C)
            entry[f"logreg_pooled_C{c:g}"] = logreg_pooled(train, val, k, c)
        for partition in partitions:
            runs = []
            for s in seeds:
                runs.append(focal_run(train, val, k, partition=partition, seed=s,
                                      institutions=institutions, steps=steps, encrypted=not twin))
                print(f"{dataset} {partition} seed {s}: {runs[-1]}", file=sys.stderr, flush=True)
            auroc = _summary([r["val_auroc_macro"] for r in runs])
            entry[partition] = {
                "focal_val_auroc_macro": auroc,
                "focal_val_accuracy": _summary([r["val_accuracy"] for r in runs]),
                "focal_minus_logreg": round(auroc["mean"] - ref["val_auroc_macro"], 4),
                "meets_target": bool(min(auroc["values"]) >= ref["val_auroc_macro"] - 0.005),
                "loss_rose": any(r["loss_rose"] for r in runs),
                "runs": [{"seed": s, **r} for s, r in zip(seeds, runs)],
            }
        out[dataset] = entry
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["pathmnist", "retinamnist"])
    p.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=50, help="full-batch steps (= rounds at 1 step/round)")
    p.add_argument("--institutions", type=int, default=5)
    p.add_argument("--C", type=float, default=0.1, help="inverse L2 strength of the pooled reference")
    p.add_argument("--twin", action="store_true", help="the plaintext twin instead of CKKS (faster)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    args = p.parse_args()
    t = time.perf_counter()
    load0 = loadavg()
    results = quality(tuple(args.datasets), tuple(args.partitions), tuple(args.seeds), steps=args.steps,
                      institutions=args.institutions, C=args.C, twin=args.twin, cache_dir=args.cache_dir)
    emit({"benchmark": "bench_focal_quality", "machine": machine(),
          "settings": {k: v for k, v in vars(args).items() if k != "cache_dir"},
          "backbone": "efficientnet-lite0", "target": "focal >= logreg_pooled - 0.005 (val macro AUROC)",
          "results": results, "seconds": round(time.perf_counter() - t, 1),
          "loadavg": [load0, loadavg()]})


if __name__ == "__main__":
    main()
