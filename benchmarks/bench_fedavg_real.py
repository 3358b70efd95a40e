"""FedAvg on real MedMNIST data: 5 institutions, trained on `train`, evaluated on `val`.

    python benchmarks/bench_fedavg_real.py                       # PathMNIST + RetinaMNIST, IID + Dirichlet(0.5)
    python benchmarks/bench_fedavg_real.py --datasets pathmnist --partitions iid --rounds 5

Each setting runs a real Flower simulation (Ray) and then evaluates the final global model with
``flower-focal evaluate --split val`` (the same command a user runs). Needs ../shared/data.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, machine, shared_npz

from flower_focal.config import RunConfig
from flower_focal.simulation import Federation, simulate


def run_setting(dataset: str, partition: str, args: argparse.Namespace, out: Path) -> dict:
    data = shared_npz(dataset)
    if data is None:
        return {"dataset": dataset, "partition": partition, "skipped": "data not found"}
    cfg = RunConfig(
        dataset="medmnist",
        data_path=str(data),
        num_server_rounds=args.rounds,
        local_epochs=args.local_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        model=args.model,
        image_size=args.image_size,
        partitioner=partition,
        dirichlet_alpha=0.5,
        min_available_nodes=args.institutions,
        seed=args.seed,
        run_dir=str(out / f"{dataset}-{partition}"),
    )
    t0 = time.time()
    result = simulate(cfg, Federation(num_supernodes=args.institutions), echo=False)
    wall = time.time() - t0
    evaluated = subprocess.run(
        [sys.executable, "-m", "flower_focal.cli", "evaluate", "--run-dir", str(result.run_dir),
         "--data", str(data), "--split", "val"],
        capture_output=True, text=True, check=True,
    )
    final = json.loads(evaluated.stdout)
    rounds = result.metrics()["rounds"]
    return {
        "dataset": dataset,
        "partition": partition if partition == "iid" else f"dirichlet(alpha=0.5)",
        "val_accuracy": round(final["accuracy"], 4),
        "val_auroc_macro": round(final["auroc_macro"], 4),
        "val_n": final["n"],
        "federated_val_auroc_last_round": rounds[-1]["evaluate"].get("auroc"),
        "best_federated_val_auroc": max((r["evaluate"].get("auroc") or 0) for r in rounds),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["pathmnist", "retinamnist"])
    p.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"])
    p.add_argument("--institutions", type=int, default=5)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--model", default="small-cnn")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ff-real-") as tmp:
        rows = [run_setting(d, part, args, Path(tmp)) for d in args.datasets for part in args.partitions]
    emit({
        "benchmark": "fedavg_real_medmnist",
        "settings": {k: v for k, v in vars(args).items() if k not in ("datasets", "partitions")},
        "evaluation": "flower-focal evaluate --split val on the final global model (pooled val split)",
        "machine": machine(),
        "results": rows,
    })


if __name__ == "__main__":
    main()
