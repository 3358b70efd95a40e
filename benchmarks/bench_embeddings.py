"""Frozen-backbone embeddings: CPU time per image and linear-probe quality on real MedMNIST.

    python benchmarks/bench_embeddings.py                 # efficientnet-lite0 at 224 and 112 px
    python benchmarks/bench_embeddings.py --sizes 112 64 --threads 2 --datasets pathmnist

For each input size: time per image of ``Backbone.embed`` on batches of ``--batch-size``
random 28 px images (median over ``--timing-batches`` after one warm-up batch), then for each
dataset a linear probe: embed the whole ``train`` and ``val`` splits (28 px MedMNIST through the
data layer), fit ``StandardScaler`` + ``LogisticRegression`` on train, report macro AUROC and
accuracy on val. Needs ../shared/data (datasets not found are reported as skipped). Prints one
JSON object, with the load average so timings on a shared machine can be judged.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import numpy as np
import torch
from _common import emit, machine, shared_npz
from threadpoolctl import threadpool_limits

from flower_focal.config import RunConfig
from flower_focal.data import load_split, source_info
from flower_focal.metrics import accuracy, macro_auroc
from flower_focal.models.backbones import build_backbone
from flower_focal.models.embeddings import extract_embeddings


def time_per_image(backbone: Any, batch_size: int, batches: int) -> dict[str, float]:
    """Median / min milliseconds per image of ``embed`` on random 28 px batches."""
    x = torch.rand(batch_size, 3, 28, 28) * 2 - 1
    backbone.embed(x)  # warm-up
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        backbone.embed(x)
        times.append((time.perf_counter() - start) / batch_size * 1000)
    return {"ms_per_image_median": round(statistics.median(times), 2),
            "ms_per_image_min": round(min(times), 2)}


def probe(backbone: Any, dataset: str, batch_size: int, c: float) -> dict[str, Any]:
    """Linear probe: train on ``train`` embeddings, evaluate on ``val``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    path = shared_npz(dataset)
    if path is None:
        return {"skipped": "data not found"}
    cfg = RunConfig(dataset="medmnist", data_path=str(path), image_size=28)
    start = time.perf_counter()
    X, y = extract_embeddings(backbone, load_split(cfg, "train"), batch_size=batch_size)
    Xv, yv = extract_embeddings(backbone, load_split(cfg, "val"), batch_size=batch_size)
    embed_s = time.perf_counter() - start
    scaler = StandardScaler().fit(X)
    clf = LogisticRegression(max_iter=3000, C=c).fit(scaler.transform(X), y)
    probs = clf.predict_proba(scaler.transform(Xv))
    k = source_info(cfg).num_classes
    return {"n_train": len(y), "n_val": len(yv), "num_classes": k,
            "macro_auroc": round(macro_auroc(probs, yv, k), 4),
            "accuracy": round(accuracy(probs, yv), 4),
            "embed_ms_per_image": round(embed_s / (len(y) + len(yv)) * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 112])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timing-batches", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch and BLAS threads (1 is steadier on a busy machine)")
    parser.add_argument("--datasets", nargs="*", default=["pathmnist", "retinamnist"])
    parser.add_argument("--C", type=float, default=0.1, help="inverse L2 strength of the probe")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "benchmark": "embeddings", "backbone": args.backbone, "device": "cpu",
        "batch_size": args.batch_size, "threads": args.threads, "probe_C": args.C,
        "machine": machine(), "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "sizes": {},
    }
    with threadpool_limits(args.threads):
        for size in args.sizes:
            backbone = build_backbone(args.backbone, input_size=size, device="cpu")
            row: dict[str, Any] = {"embed_dim": backbone.embed_dim,
                                   "preprocess": backbone.preprocess.id,
                                   **time_per_image(backbone, args.batch_size,
                                                    args.timing_batches)}
            for dataset in args.datasets:
                row[dataset] = probe(backbone, dataset, args.batch_size, args.C)
            result["sizes"][str(size)] = row
    result["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    emit(result)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
