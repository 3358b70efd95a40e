"""BatchNorm running variances under a server optimiser: Flower's FedAvgM vs flower-focal's.

    python benchmarks/bench_server_opt_bn.py --momentum 0.5 --server-lr 1.0 --rounds 4

Flower's :class:`flwr.serverapp.strategy.FedAvgM` steps every array of the model, BatchNorm's
running statistics included; flower-focal's server optimiser
(:class:`flower_focal.server_opt.ServerOpt`) averages the statistics and steps the rest. Both
drive the same institutions (the project's ClientApp on a :class:`~flower_focal.testing.LoopbackGrid`,
``small-cnn`` with BatchNorm, ``synthetic-pathology``, 3 institutions, in-process) from the same
public initial model; the JSON gives the smallest running variance of the global model after
each round (a negative one makes every evaluation of that model NaN).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import emit, loadavg, machine  # noqa: E402


def min_running_var(strategy_cls, kwargs: dict, cfg, rounds: int) -> list[float]:
    """The global model's smallest running variance after each round's aggregation."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord

    from clients.client_app import app as client_app
    from flower_focal import wire
    from flower_focal.models import build_model
    from flower_focal.testing import LoopbackGrid

    mins: list[float] = []

    class Recorded(strategy_cls):
        def aggregate_train(self, server_round, replies):
            arrays, metrics = super().aggregate_train(server_round, replies)
            if arrays is not None:
                mins.append(min(float(a.numpy().min()) for k, a in arrays.items() if k.endswith("running_var")))
            return arrays, metrics

    grid = LoopbackGrid(client_app, 3, cfg.to_flower())
    torch.manual_seed(cfg.seed)
    initial = ArrayRecord(build_model(cfg.model, 3, 9, cfg.image_size).state_dict())
    shared = {wire.NUM_CLASSES: 9, wire.IN_CHANNELS: 3}  # synthetic-pathology: 9 classes, RGB
    Recorded(min_available_nodes=3, **kwargs).start(
        grid, initial, num_rounds=rounds, train_config=ConfigRecord(dict(shared)),
        evaluate_config=ConfigRecord(dict(shared)))
    return mins


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--momentum", type=float, default=0.5)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()

    from flwr.serverapp.strategy import FedAvgM

    from flower_focal.config import RunConfig
    from flower_focal.strategy.fedavg import FedAvg

    cfg = RunConfig(num_server_rounds=args.rounds, num_samples=300, min_available_nodes=3, model="small-cnn",
                    dataset="synthetic-pathology", server_momentum=args.momentum, server_lr=args.server_lr)
    t0 = time.time()
    result = {
        "benchmark": "server_opt_bn", "settings": vars(args),
        "setting": "small-cnn (BatchNorm), synthetic-pathology, 3 institutions, run-config defaults otherwise",
        "min_running_var_after_each_round": {
            "flower FedAvgM": min_running_var(
                FedAvgM, {"server_momentum": args.momentum, "server_learning_rate": args.server_lr}, cfg, args.rounds),
            "flower-focal FedAvg": min_running_var(
                FedAvg, {"server_momentum": args.momentum, "server_lr": args.server_lr}, cfg, args.rounds),
        },
        "wall_s": None, "machine": machine(), "load": loadavg(),
    }
    result["wall_s"] = round(time.time() - t0, 1)
    emit(result)


if __name__ == "__main__":
    main()
