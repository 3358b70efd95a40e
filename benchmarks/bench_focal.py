"""FOCAL split training: server cost per head weight per epoch, communication, HE/plain parity.

    python benchmarks/bench_focal.py                       # d=1280, K=9, 5 x 150, blocks 64 and 32
    python benchmarks/bench_focal.py --epochs 3 --blocks 64 --workers 1 2

Part 1: full epochs (no extrapolation: every head weight is updated in every timed epoch) of
FOCAL on CKKS ciphertexts (preset ``focal``) for an EfficientNet-Lite0-sized embedding
(d=1280), K=9 classes, 5 institutions x 150 synthetic samples; server time = forward +
backward/update, divided by (d+1)*K weights and by the epochs. Compared with the 22 ms per
weight per epoch of he-measurements.md Part 2 design (a) (one feature per ciphertext, slot sum
by 12 rotations per weight). Communication per sample: one-time embedding upload, and per
epoch logits down + errors up. Part 2: d=64 end-to-end parity (HE vs the plaintext twin).
The machine load (os.getloadavg) is recorded next to every timing.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import emit, loadavg, machine
from sklearn.metrics import roc_auc_score

from flower_focal.crypto import SecretContext
from flower_focal.focal import (
    FocalLayout,
    predict_logits,
    softmax,
)
from flower_focal.testing import InstitutionEmbeddings as Institution, train_encrypted, train_plaintext

BASELINE_MS_PER_WEIGHT = 22.0  # he-measurements.md Part 2, design (a), N=8192, 1 core


def _data(seed: int, sizes: list[int], d: int, k: int, sep: float, n_test: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, sep, (k, d))

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, k, n)
        return means[y] + rng.normal(0, 1, (n, d)), y

    insts = [Institution(f"inst{i}", *make(n)) for i, n in enumerate(sizes)]
    return insts, (make(n_test) if n_test else None)


def bench_cost(secret: SecretContext, args: argparse.Namespace) -> list[dict]:
    d, k = 1280, 9
    insts, _ = _data(0, [150] * 5, d, k, sep=0.05)
    n_total = sum(len(i.y) for i in insts)
    rows = []
    for block in args.blocks:
        for workers in args.workers:
            load_before = loadavg()
            t = time.perf_counter()
            r = train_encrypted(insts, k, secret=secret, epochs=args.epochs, lr=0.5,
                                block=block, workers=workers)
            wall = time.perf_counter() - t
            s = r.seconds
            server = (s["server_forward"] + s["server_backward"]) / args.epochs
            lay = FocalLayout(d, k, block=block)
            ms_w = 1e3 * server / ((d + 1) * k)
            rows.append({
                "block": block,
                "workers": workers,
                "lanes_per_ciphertext": lay.lanes,
                "feature_groups": lay.n_groups,
                "class_pairs": lay.n_pairs,
                "rotations_per_epoch": lay.n_groups * lay.n_pairs * len(lay.lane_sum_steps()),
                "rotations_per_weight_per_epoch": round(
                    lay.n_groups * lay.n_pairs * len(lay.lane_sum_steps()) / ((d + 1) * k), 4),
                "epochs_timed": args.epochs,
                "extrapolated": False,
                "server_s_per_epoch": round(server, 3),
                "server_forward_s_per_epoch": round(s["server_forward"] / args.epochs, 3),
                "server_backward_s_per_epoch": round(s["server_backward"] / args.epochs, 3),
                "institutions_s_per_epoch_all": round(s["institution"] / args.epochs, 3),
                "ms_per_weight_per_epoch": round(ms_w, 4),
                "speedup_vs_22ms_baseline": round(BASELINE_MS_PER_WEIGHT / ms_w, 1),
                "setup_s": {key: round(s[key], 2) for key in ("setup", "encrypt_x", "server_add")},
                "bytes_per_sample_x_upload_once": round(r.nbytes["x_upload"] / n_total),
                "bytes_per_sample_per_epoch_down": round(r.nbytes["forward_per_epoch"] / n_total),
                "bytes_per_sample_per_epoch_up": round(r.nbytes["error_per_epoch"] / n_total),
                "head_bytes": r.nbytes["head"],
                "wall_s": round(wall, 2),
                "loadavg_before": load_before,
                "loadavg_after": loadavg(),
            })
    return rows


def bench_parity(secret: SecretContext, epochs: int) -> dict:
    d, k = 64, 5
    insts, test = _data(1, [80, 150, 60], d, k, sep=0.3, n_test=2000)
    he = train_encrypted(insts, k, secret=secret, epochs=epochs, lr=1.0, init_seed=0)
    pl = train_plaintext(insts, k, epochs=epochs, lr=1.0, init_seed=0)
    lay = FocalLayout(d, k)
    out: dict = {"d": d, "K": k, "institutions": [len(i.y) for i in insts], "epochs": epochs,
                 "lr": 1.0, "n_test": len(test[1])}
    for name, r in (("he", he), ("plain", pl)):
        p = softmax(predict_logits(r.head, lay, test[0]))
        out[f"auroc_{name}"] = round(float(roc_auc_score(test[1], p, multi_class="ovr")), 6)
        out[f"accuracy_{name}"] = round(float((p.argmax(1) == test[1]).mean()), 6)
    out["max_abs_dW"] = float(f"{np.abs(he.head - pl.head).max():.3g}")
    out["max_abs_W"] = round(float(np.abs(pl.head).max()), 4)
    out["he_server_s"] = round(he.seconds["server_forward"] + he.seconds["server_backward"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--parity-epochs", type=int, default=20)
    args = ap.parse_args()
    secret = SecretContext.generate("focal")
    emit({
        "benchmark": "focal",
        "machine": machine(),
        "preset": secret.preset.params(),
        "public_context_bytes": len(secret.public_bytes()),
        "baseline_ms_per_weight_per_epoch": BASELINE_MS_PER_WEIGHT,
        "setting": "d=1280 (+bias), K=9, 5 institutions x 150 samples, synthetic Gaussian classes",
        "cost": bench_cost(secret, args),
        "parity_d64": bench_parity(secret, args.parity_epochs),
    })


if __name__ == "__main__":
    main()
