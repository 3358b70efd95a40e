"""What it costs to touch memory that was freed a while ago (why fresh buffers matter here).

    python benchmarks/bench_cold_memory.py
    python benchmarks/bench_cold_memory.py --mib 88 --idle 0 0.5 2 5 --reps 3

Allocates and writes --mib MiB (88 MiB = one 11 M-parameter model as float64), frees it,
waits --idle seconds, then times allocating and writing the same amount again. On a bare
machine the time does not depend on the wait. In a VM whose balloon driver reports free
pages to the host (Firecracker / cloud VMs with free page reporting), memory that stayed
free for a second or two is handed back to the host, and touching it again faults each page
in from the host: HE-FedAvg's per-upload buffers then cost far more in long rounds (tens of
seconds of training between two encryptions on a worker) than in short ones. Also prints the kernel's
``page_reporting_order`` when the module exposes it. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from _common import emit, machine


def _touch_s(n: int) -> float:
    t = time.perf_counter()
    a = np.ones(n)  # allocate and write every page
    dt = time.perf_counter() - t
    del a
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=88)
    p.add_argument("--idle", type=float, nargs="+", default=[0.0, 0.5, 2.0, 5.0])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    n = args.mib * 2**20 // 8
    _touch_s(n)
    rows = []
    for idle in args.idle:
        times = []
        for _ in range(args.reps):
            _touch_s(n)  # allocated and freed just before the wait
            time.sleep(idle)
            times.append(_touch_s(n))
        med = statistics.median(times)
        rows.append({"idle_s": idle, "touch_s": [round(t, 4) for t in times], "median_s": round(med, 4),
                     "ms_per_mib": round(1e3 * med / args.mib, 3)})
    order = Path("/sys/module/page_reporting/parameters/page_reporting_order")
    emit({"benchmark": "cold_memory", "machine": machine(), "settings": vars(args),
          "page_reporting_order": order.read_text().strip() if order.exists() else None, "rows": rows})


if __name__ == "__main__":
    main()
