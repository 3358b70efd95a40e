"""Differential privacy: accuracy vs client-level (epsilon, delta) on real PathMNIST.

    python benchmarks/bench_dp.py                                 # 10 rounds, z = 0.01 0.1 1.0, clip 1.0
    python benchmarks/bench_dp.py --rounds 5 --zs 0.1 0.3 1.0 --clip 0.5

Settings (each a real Flower simulation through ``flower_focal.simulation.simulate``, 5
institutions, IID split of ../shared/data/pathmnist, small-cnn, same seed):

* ``fedavg`` without DP (the reference);
* ``fedavg`` + Flower's ``DifferentialPrivacyClientSideFixedClipping`` (``dp-noise-multiplier``
  z, ``dp-clipping-norm`` S): institutions clip, the server adds N(0, (zS/m)^2) to the average;
* ``he-fedavg`` with ``he-clip-norm`` S and ``he-noise-multiplier`` z: each institution adds
  N(0, (zS/sqrt(m))^2) to its clipped update before encrypting (and, as a control, clipping
  only, z = 0).

The final global model is evaluated with ``flower-focal evaluate --split val`` (pooled val
split), as a user would. The privacy figure is client-level (one institution's whole dataset)
epsilon at ``--delta`` from :mod:`flower_focal.privacy` (RDP, no subsampling amplification),
both for the configured z and for the effective multiplier of the largest institution given
the actual training-set sizes (the calibration assumes equal weights). Prints one JSON object.
The README's DP table is rendered from ``benchmarks/results/dp.json`` by
``python benchmarks/readme_tables.py --write`` (epsilon recomputed by the accountant).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, loadavg, machine, shared_npz

from flower_focal.config import RunConfig
from flower_focal.privacy import ACCOUNTING, client_level_epsilon, effective_noise_multiplier
from flower_focal.simulation import Federation, SimulationFailed, simulate


def _evaluate(run_dir: Path, data: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "flower_focal.cli", "evaluate", "--run-dir", str(run_dir),
         "--data", str(data), "--split", "val", "--device", "cpu"],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["evaluate failed"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _clean(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, nd)


def _privacy(strategy: str, z: float, metrics: dict, sampled: int, rounds: int, delta: float) -> dict:
    if z <= 0:
        return {"epsilon": None, "note": "no noise: no DP guarantee"}
    weights = [
        [float(v["num-examples"]) for v in r["train_institutions"].values()]
        for r in metrics["rounds"] if r.get("train_institutions")
    ]
    mechanism = "central" if strategy == "fedavg" else "distributed"
    z_eff = min(effective_noise_multiplier(z, w, mechanism=mechanism, num_sampled=sampled) for w in weights)
    nominal = client_level_epsilon(z, rounds, delta)
    actual = client_level_epsilon(z_eff, rounds, delta)
    return {
        "epsilon": _clean(nominal.epsilon, 3),
        "z_effective_largest_institution": round(z_eff, 5),
        "epsilon_effective": _clean(actual.epsilon, 3),
        "train_sizes": sorted({int(x) for w in weights for x in w}),
    }


def run_setting(strategy: str, z: float, args: argparse.Namespace, data: Path, out: Path) -> dict:
    name = f"{strategy}-z{z:g}" if strategy == "fedavg" and z == 0 else f"{strategy}-z{z:g}-clip{args.clip:g}"
    dp: dict = {}
    if strategy == "fedavg" and z > 0:
        dp = {"dp_noise_multiplier": z, "dp_clipping_norm": args.clip}
    elif strategy == "he-fedavg":
        dp = {"he_noise_multiplier": z, "he_clip_norm": args.clip}
    cfg = RunConfig(
        strategy=strategy, dataset="medmnist", data_path=str(data), image_size=28,
        partitioner="iid", model=args.model, num_server_rounds=args.rounds,
        local_epochs=args.local_epochs, lr=args.lr, batch_size=args.batch_size,
        min_available_nodes=args.institutions, seed=args.seed, run_dir=str(out / name), **dp,
    )
    row: dict = {"strategy": strategy, "noise_multiplier": z,
                 "clip_norm": args.clip if (z > 0 or strategy == "he-fedavg") else None, "load_before": loadavg()}
    t0 = time.time()
    try:
        result = simulate(cfg, Federation(num_supernodes=args.institutions), echo=False)
    except SimulationFailed as exc:
        row.update(error=str(exc)[:300], wall_s=round(time.time() - t0, 1), load_after=loadavg())
        return row
    metrics = result.metrics()
    final = _evaluate(result.run_dir, data)
    last = metrics["rounds"][-1].get("evaluate", {})
    row.update({
        "val_auroc_macro": _clean(final.get("auroc_macro")),
        "val_accuracy": _clean(final.get("accuracy")),
        "val_loss": _clean(final.get("loss")),
        "evaluate_error": final.get("error"),
        "federated_val_auroc_last_round": _clean(last.get("auroc")),
        "federated_val_loss_per_round": [_clean(r.get("evaluate", {}).get("loss"), 3) for r in metrics["rounds"]],
        "privacy": _privacy(strategy, z, metrics, args.institutions, args.rounds, args.delta),
        "wall_s": round(result.wall_time_s, 1),
        "load_after": loadavg(),
    })
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--zs", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--strategies", nargs="+", default=["fedavg", "he-fedavg"])
    p.add_argument("--no-controls", action="store_true", help="skip fedavg without DP and he-fedavg clip-only")
    p.add_argument("--institutions", type=int, default=5)
    p.add_argument("--model", default="small-cnn")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    data = shared_npz("pathmnist")
    if data is None:
        emit({"benchmark": "dp_tradeoff", "skipped": "../shared/data/pathmnist/pathmnist.npz not found"})
        return
    settings = [] if args.no_controls else [(s, 0.0) for s in args.strategies]  # no DP / clip only
    settings += [(s, z) for s in args.strategies for z in args.zs]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="ff-dp-") as tmp:
        rows = [run_setting(s, z, args, data, Path(tmp)) for s, z in settings]
    emit({
        "benchmark": "dp_tradeoff",
        "command": "python benchmarks/bench_dp.py " + " ".join(sys.argv[1:]),
        "settings": {**vars(args), "data": "pathmnist (../shared/data), IID", "image_size": 28},
        "privacy_accounting": ACCOUNTING + f"; delta={args.delta:g}; T={args.rounds} rounds",
        "evaluation": "flower-focal evaluate --split val on the final global model (pooled val split)",
        "machine": machine(),
        "total_wall_s": round(time.time() - t0, 1),
        "results": rows,
    })


if __name__ == "__main__":
    main()
