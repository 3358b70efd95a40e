"""Server-side HE-FedAvg sum: per-upload check + add time vs workers; prints ONE JSON object.

For one preset (default ``compact``) and ``--params`` values (default 11 M, ResNet-18 size),
``--distinct`` institutions encrypt ``w_i * x_i`` once; an institution count of ``N`` is
simulated by adding those fresh encryptions in turn ``N`` times (the server cannot tell: each
is a full, valid upload that it checks, parses and adds). For every ``workers`` value
(``Accumulator(public, workers=k)``) and every ``N`` it reports:

* ``per_upload_s``: median wall time of one ``Accumulator.add`` after the first (the first
  upload only loads; ``first_add_s``), i.e. envelope check + intake validation + SEAL load + add.
* ``round_s``: all ``N`` adds; ``result_s``: serializing the sum (``to_bytes``).
* ``pool_start_s``: spawning the worker processes (once per server run, not per round).
* ``identical_to_serial``: the sum's bytes equal the ``workers=1`` sum's bytes.
* ``peak_rss_mib``: peak summed RSS of this process and its workers during the round (RSS
  double-counts shared pages: an upper bound).

``numpy`` holds the plaintext reference measured in the same run: per-upload median of a
float32 weighted sum ``acc += w_i * x_i`` over the same ``N``, and ``ratio`` = HE per-upload
time / numpy per-upload time for each ``workers`` value.

Usage::

    python benchmarks/bench_server_sum.py                 # 11 M params, N = 10 and 100
    python benchmarks/bench_server_sum.py --quick         # 11 M params, N = 10 and 25
    python benchmarks/bench_server_sum.py --workers 1 2 8 16 --params 4000000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import TreeMemorySampler
from flower_focal.crypto import Accumulator, SecretContext


def _numpy_reference(xs: list[np.ndarray], weights: list[float], n: int) -> dict[str, float]:
    acc = np.zeros_like(xs[0])
    times = []
    for i in range(n):
        t = time.perf_counter()
        acc += weights[i % len(xs)] * xs[i % len(xs)]
        times.append(time.perf_counter() - t)
    return {"per_upload_s": statistics.median(times), "round_s": sum(times)}


def _he_round(public: Any, blobs: list[bytes], n: int, workers: int) -> dict[str, Any]:
    sampler = TreeMemorySampler(interval_s=0.2)
    sampler.__enter__()
    acc = Accumulator(public, workers=workers)
    t0 = time.perf_counter()
    acc.add(blobs[0])
    first = time.perf_counter() - t0
    times, split = [], []
    for i in range(1, n):
        t = time.perf_counter()
        acc.add(blobs[i % len(blobs)])
        times.append(time.perf_counter() - t)
        if workers > 1:
            split.append(public._sum_pool.last_timings)
    round_s = time.perf_counter() - t0
    t = time.perf_counter()
    out = acc.to_bytes()
    result_s = time.perf_counter() - t
    sampler.__exit__(None, None, None)
    return {
        "per_upload_s": statistics.median(times),
        "per_upload_mean_s": statistics.fmean(times),
        "first_add_s": first,
        "round_s": round_s,
        "result_s": result_s,
        "peak_rss_mib": round(sampler.peak_kib / 1024, 1),
        "_sha256": hashlib.sha256(out).hexdigest(),
        # where one add's time goes with workers: copying the other ranges into the shared
        # buffer, summing the own range, waiting for the slowest worker (medians)
        "split_s": {k: round(statistics.median(d[k] for d in split), 4) for k in split[0]}
        if split
        else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="compact")
    ap.add_argument("--params", type=int, default=11_000_000)
    ap.add_argument("--institutions", type=int, nargs="+", default=None)
    ap.add_argument("--workers", type=int, nargs="+", default=None)
    ap.add_argument("--distinct", type=int, default=4, help="fresh encryptions to cycle through")
    ap.add_argument("--quick", action="store_true", help="N = 10 and 25 instead of 10 and 100")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    workers = args.workers or ([1, 2, 16] if cores >= 16 else [1, 2])
    ns = args.institutions or ([10, 25] if args.quick else [10, 100])

    rng = np.random.default_rng(0)
    secret = SecretContext.generate(args.preset)
    public = secret.public_context()
    base = rng.uniform(-1, 1, args.params).astype(np.float32)
    xs = [base + rng.normal(0, 0.01, args.params).astype(np.float32) for _ in range(args.distinct)]
    counts = rng.integers(100, 5000, args.distinct)
    weights = [float(c / counts.sum()) for c in counts]
    t = time.perf_counter()
    enc_workers = min(cores, 16)
    blobs = [
        secret.encrypt(w * x.astype(np.float64), workers=enc_workers).to_bytes()
        for w, x in zip(weights, xs)
    ]
    encrypt_s = (time.perf_counter() - t) / len(blobs)
    secret.close()

    result: dict[str, Any] = {
        "benchmark": "server_sum",
        "preset": args.preset,
        "params": args.params,
        "upload_mb": round(len(blobs[0]) / 1e6, 1),
        "distinct_uploads": len(blobs),
        "encrypt_s_per_upload": round(encrypt_s, 3),
        "encrypt_workers": enc_workers,
        "cpu_count": cores,
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "rounds": [],
    }
    for n in ns:
        row: dict[str, Any] = {"institutions": n, "numpy": _numpy_reference(xs, weights, n)}
        serial_hash = None
        for k in workers:
            pool_start = None
            if k > 1:
                t = time.perf_counter()
                public.sum_pool(k).reset()  # spawned and answering
                pool_start = time.perf_counter() - t
            r = _he_round(public, blobs, n, k)
            digest = r.pop("_sha256")
            if k == 1:
                serial_hash = digest
            r["identical_to_serial"] = None if k == 1 or serial_hash is None else digest == serial_hash
            r["pool_start_s"] = pool_start
            r["ratio_to_numpy"] = round(r["per_upload_s"] / row["numpy"]["per_upload_s"], 2)
            row[f"workers_{k}"] = {
                key: (round(v, 4) if isinstance(v, float) else v) for key, v in r.items()
            }
            print(f"N={n} workers={k}: {r['per_upload_s']:.4f} s per upload", file=sys.stderr)
        row["numpy"] = {key: round(v, 4) for key, v in row["numpy"].items()}
        result["rounds"].append(row)
        public.close()  # next N starts with fresh pools, as a server run would once
    result["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
