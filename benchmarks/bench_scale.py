"""Simulation scale: wall time and peak memory of one FedAvg round with many institutions.

    python benchmarks/bench_scale.py --institutions 10 100 1000

Runs Flower's Ray simulation engine through ``flwr run`` (flower_focal.simulation.simulate)
with the small CNN on built-in synthetic fundus images (IID, 4 images per institution at
least), one round of train + evaluate on every institution. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import TreeMemorySampler, emit, machine

from flower_focal.config import RunConfig
from flower_focal.simulation import Federation, simulate


def one(n: int, args: argparse.Namespace, out: Path) -> dict:
    cfg = RunConfig(
        num_server_rounds=1,
        num_samples=max(args.min_samples, args.images_per_institution * n),
        partitioner="iid",
        min_partition_size=1,
        image_size=args.image_size,
        model="small-cnn",
        min_available_nodes=n,
        run_dir=str(out / f"n{n}"),
        seed=0,
    )
    fed = Federation(num_supernodes=n, client_cpus=args.client_cpus)
    with TreeMemorySampler(marker="flower-focal-home-") as mem:
        t0 = time.time()
        result = simulate(cfg, fed, echo=False, timeout_s=args.timeout)
        wall = time.time() - t0
    rnd = result.metrics()["rounds"][0]
    return {
        "institutions": n,
        "train_replies": len(rnd["train_institutions"]),
        "evaluate_replies": len(rnd["evaluate_institutions"]),
        "failures": len(rnd["failures"]),
        "round_wall_s": round(rnd["wall_time_s"], 2),
        "simulation_wall_s": round(wall, 2),
        "peak_rss_gib": round(mem.peak_kib / 2**20, 2),
        "val_accuracy": rnd["evaluate"].get("accuracy"),
        "images_total": cfg.num_samples,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--institutions", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--images-per-institution", type=int, default=4)
    p.add_argument("--min-samples", type=int, default=1200)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--client-cpus", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ff-scale-") as tmp:
        rows = [one(n, args, Path(tmp)) for n in args.institutions]
    emit({
        "benchmark": "simulation_scale_fedavg_one_round",
        "model": "small-cnn",
        "client_cpus": args.client_cpus,
        "note": "round_wall_s: train+evaluate of one round (metrics.json); simulation_wall_s adds "
                "SuperLink/Ray start-up and the one-off describe query; peak_rss_gib sums RSS of "
                "the whole process tree (upper bound: shared pages counted per process)",
        "machine": machine(),
        "results": rows,
    })


if __name__ == "__main__":
    main()
