"""FOCAL quality at its defaults: encrypted FOCAL vs pooled logistic regression, same features.

    python benchmarks/bench_focal_quality.py                       # PathMNIST + RetinaMNIST, 3 seeds
    python benchmarks/bench_focal_quality.py --datasets pathmnist --seeds 0 --partitions iid

Setting (per dataset): every image of the ``train`` split embedded once with the frozen
default backbone (EfficientNet-Lite0, packaged ImageNet weights, default input size; cached
under ``--cache-dir``), split over ``--institutions`` institutions IID or Dirichlet(0.5) with
``flower_focal.data.partition`` (seeded); evaluated on the whole pooled ``val`` split.

Methods, on the same embeddings, for each seed:

* ``focal``: :func:`flower_focal.focal.train_encrypted` at its **defaults** (global
  standardisation under HE, derived step, Nesterov through the institutions, loss guard,
  CKKS preset ``focal``, a fresh key set per run), ``--steps`` full-batch steps. With
  ``--twin`` the plaintext twin (:func:`flower_focal.focal.train_plaintext`, the same algorithm
  on numpy) instead: minutes faster, equal up to CKKS noise (parity tests).
* ``logreg_pooled``: scikit-learn ``StandardScaler`` + ``LogisticRegression(C=--C)`` on all
  training embeddings pooled (not federated: the reference).

Per (dataset, partition): mean and spread (max - min) over seeds of validation macro AUROC and
accuracy; ``focal_minus_logreg``; ``loss_rose`` (a run whose last training loss is above its
first). Prints one JSON object. :func:`quality` is importable (``benchmarks/bench_quality.py``).
Needs ../shared/data (skips a dataset that is absent).
"""

from __future__ import annotations

import argparse
import hashlib
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
