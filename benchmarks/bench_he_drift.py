"""How far he-fedavg drifts from fedavg over rounds, next to fedavg's drift from itself.

    python benchmarks/bench_he_drift.py                    # rounds 1 2 3 5 10
    python benchmarks/bench_he_drift.py --rounds 2 3 --lr 0.01

Runs the real strategies and ClientApp in this process (the audit's in-process grid, no
Ray): 3 institutions on synthetic pathology tiles, small-cnn (BatchNorm), SGD with
momentum, 2 local epochs. For each round count R it trains from scratch with fedavg, with
he-fedavg (`compact`, fresh keys) and with fedavg whose learning rate is changed by
--perturbation (relative, default 1e-7, about CKKS's error), and prints the largest
absolute difference of the final models (every floating tensor, BatchNorm statistics
included) and their validation AUROC. If he-fedavg's drift follows the perturbed fedavg's,
the growth comes from the training's sensitivity, not from HE. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from _common import emit, machine

from flower_focal.artifacts import decrypt_model
from flower_focal.testing import LoopbackGrid
from flower_focal.client.app import build_client_app
from flower_focal.config import RunConfig
from flower_focal.crypto import keygen
from flower_focal.server import run_server


def _max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def _train(cfg: RunConfig, key_dir: Path, institutions: int) -> tuple[dict, float | None]:
    run_server(LoopbackGrid(build_client_app(), institutions, cfg.to_flower()), cfg)
    run_dir = Path(cfg.run_dir)
    if cfg.strategy == "he-fedavg":
        decrypt_model(run_dir, key_dir)
    last = json.loads((run_dir / "metrics.json").read_text())["rounds"][-1]
    return torch.load(run_dir / "model.pt"), last["evaluate"].get("auroc")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, nargs="+", default=[1, 2, 3, 5, 10])
    p.add_argument("--institutions", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--perturbation", type=float, default=1e-7)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ff-drift-") as tmp:
        key_dir = keygen(Path(tmp) / "keys", "compact")
        for r in args.rounds:
            runs = {}
            for name, strategy, lr in (("fedavg", "fedavg", args.lr),
                                       ("he-fedavg", "he-fedavg", args.lr),
                                       ("fedavg-perturbed", "fedavg", args.lr * (1 + args.perturbation))):
                cfg = RunConfig(strategy=strategy, num_server_rounds=r, num_samples=100 * args.institutions,
                                min_available_nodes=args.institutions, dataset="synthetic-pathology",
                                image_size=32, local_epochs=2, lr=lr, he_key_dir=str(key_dir),
                                run_dir=str(Path(tmp) / f"{name}-{r}"))
                runs[name] = _train(cfg, key_dir, args.institutions)
            plain = runs["fedavg"][0]
            rows.append({
                "rounds": r,
                "he_vs_fedavg_max_abs_diff": _max_abs_diff(plain, runs["he-fedavg"][0]),
                "perturbed_fedavg_vs_fedavg_max_abs_diff": _max_abs_diff(plain, runs["fedavg-perturbed"][0]),
                "val_auroc": {k: v[1] for k, v in runs.items()},
            })
    emit({"benchmark": "he_drift", "machine": machine(), "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
