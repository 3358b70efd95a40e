"""Benchmark the HE presets for HE-FedAvg; prints ONE JSON object on stdout.

For each preset and model size, 10 institutions each encrypt ``w_i * x_i`` (client-side
weighting, ``x_i = base + noise`` in [-1, 1], ``w_i = n_i / sum(n)``), the server streams the
10 uploads into an :class:`~flower_focal.crypto.Accumulator`, and an institution decrypts the
sum. Reported per preset and size:

* ``upload_bytes_per_param`` / ``download_bytes_per_param``: envelope bytes / parameters.
* ``encrypt_s_w1``: median per-client encrypt + serialize, in-process (all clients).
* ``encrypt_s_w2``: the same with ``workers=2`` and a warm process pool (``w2_clients`` timed);
  ``pool_start_s`` is the one-off cost of the first ``workers=2`` call over a warm one.
* ``aggregate_s``: server time to check + deserialize + add all uploads (``Accumulator.add``);
  ``result_s``: serializing the sum (``Accumulator.to_bytes``).
* ``numpy_aggregate_s``: float32 weighted sum of the same updates, for the ratio.
* ``decrypt_s``: load + decrypt of the sum; ``rel_error``: ``max|dec - true| / max|true|``
  against the float64 weighted sum.

Usage::

    python benchmarks/bench_crypto.py                  # 1M params, all presets
    python benchmarks/bench_crypto.py --large          # also 11M params
    python benchmarks/bench_crypto.py --presets compact ckks --speedup-params 4000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from flower_focal.crypto import PRESETS, Accumulator, PublicContext, SecretContext, keygen


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_preset(
    name: str, n_params: int, institutions: int, w2_clients: int, seed: int
) -> dict[str, Any]:
    """Run the full client -> server -> client loop once for one preset and size."""
    with tempfile.TemporaryDirectory() as d:
        keydir = keygen(Path(d), name)
        secret, public = SecretContext.load(keydir), PublicContext.load(keydir)
    rng = np.random.default_rng(seed)
    n = rng.uniform(100, 5000, institutions)
    w = n / n.sum()
    base = rng.uniform(-0.9, 0.9, n_params)

    acc = Accumulator(public)
    true = np.zeros(n_params)
    plain32 = np.zeros(n_params, dtype=np.float32)
    enc_w1: list[float] = []
    enc_w2: list[float] = []
    agg_s = 0.0
    numpy_s = 0.0
    up_bytes = 0
    pool_start = float("nan")
    try:
        for i in range(institutions):
            update = w[i] * (base + rng.uniform(-0.1, 0.1, n_params))
            true += update
            t0 = time.perf_counter()
            blob = secret.encrypt(update).to_bytes()
            enc_w1.append(time.perf_counter() - t0)
            if i < w2_clients:
                t0 = time.perf_counter()
                blob2 = secret.encrypt(update, workers=2).to_bytes()
                dt = time.perf_counter() - t0
                if i == 0:
                    t0 = time.perf_counter()
                    blob2 = secret.encrypt(update, workers=2).to_bytes()
                    warm = time.perf_counter() - t0
                    pool_start = dt - warm
                    dt = warm
                enc_w2.append(dt)
                del blob2
            up_bytes = max(up_bytes, len(blob))
            t0 = time.perf_counter()
            acc.add(blob)
            agg_s += time.perf_counter() - t0
            del blob
            u32 = update.astype(np.float32)
            t0 = time.perf_counter()
            plain32 += u32  # what a plaintext FedAvg server does per upload
            numpy_s += time.perf_counter() - t0
            _log(f"  {name} {n_params:,}: client {i} done")
    finally:
        secret.close()
    t0 = time.perf_counter()
    down = acc.to_bytes()
    result_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec = secret.decrypt(down)
    decrypt_s = time.perf_counter() - t0
    return {
        "preset": name,
        "params": n_params,
        "institutions": institutions,
        "upload_bytes_per_param": round(up_bytes / n_params, 3),
        "download_bytes_per_param": round(len(down) / n_params, 3),
        "upload_mb": round(up_bytes / 2**20, 2),
        "encrypt_s_w1": round(statistics.median(enc_w1), 4),
        "encrypt_s_w2": round(statistics.median(enc_w2), 4) if enc_w2 else None,
        "w2_clients": len(enc_w2),
        "w2_speedup": (
            round(statistics.median(enc_w1) / statistics.median(enc_w2), 3) if enc_w2 else None
        ),
        "pool_start_s": round(pool_start, 3),
        "aggregate_s": round(agg_s, 4),
        "result_s": round(result_s, 4),
        "numpy_aggregate_s": round(numpy_s, 5),
        "aggregate_vs_numpy": round(agg_s / numpy_s, 1) if numpy_s > 0 else None,
        "decrypt_s": round(decrypt_s, 4),
        "rel_error": float(f"{np.abs(dec - true).max() / np.abs(true).max():.3e}"),
    }


def bench_speedup(name: str, n_params: int, reps: int) -> dict[str, Any]:
    """Encrypt ``n_params`` values with workers=1 and workers=2 (warm pool), best of ``reps``."""
    secret = SecretContext.generate(name)
    x = np.random.default_rng(1).uniform(-1, 1, n_params)
    try:
        secret.encrypt(x[: 4 * secret.preset.values_per_chunk], workers=2)  # start the pool
        timings: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(reps):
            for workers in (1, 2):
                t0 = time.perf_counter()
                secret.encrypt(x, workers=workers).to_bytes()
                timings[workers].append(time.perf_counter() - t0)
    finally:
        secret.close()
    w1, w2 = min(timings[1]), min(timings[2])
    return {
        "preset": name,
        "params": n_params,
        "reps": reps,
        "encrypt_s_w1": round(w1, 3),
        "encrypt_s_w2": round(w2, 3),
        "speedup": round(w1 / w2, 3),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--large", action="store_true", help="also run 11M parameters (ResNet18-size)")
    ap.add_argument("--presets", nargs="+", default=sorted(PRESETS), choices=sorted(PRESETS))
    ap.add_argument("--institutions", type=int, default=10)
    ap.add_argument("--w2-clients", type=int, default=3, help="clients also timed with workers=2")
    ap.add_argument("--speedup-params", type=int, default=4_000_000, help="0 to skip")
    ap.add_argument("--speedup-reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    sizes = [args.params] + ([11_000_000] if args.large else [])
    out: dict[str, Any] = {
        "benchmark": "crypto_presets",
        "settings": vars(args),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "platform": platform.platform(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "results": [],
    }
    t_start = time.perf_counter()
    for size in sizes:
        for name in args.presets:
            _log(f"{name} @ {size:,} params")
            row = bench_preset(name, size, args.institutions, args.w2_clients, args.seed)
            out["results"].append(row)
    if args.speedup_params:
        out["parallel_speedup"] = [
            bench_speedup(name, args.speedup_params, args.speedup_reps)
            for name in args.presets
            if name in ("compact", "ckks")
        ]
    out["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
