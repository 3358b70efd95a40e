"""legacyapp: a Flower / PyTorch ServerApp (legacy strategy)."""

from pathlib import Path

import torch
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg

from legacyapp.task import Net, get_weights


def server_fn(context: Context):
    num_rounds = context.run_config["num-server-rounds"]
    fraction_fit = context.run_config["fraction-fit"]
    lr = context.run_config["learning-rate"]
    out_dir = Path(context.run_config["out-dir"])

    torch.manual_seed(0)
    parameters = ndarrays_to_parameters(get_weights(Net()))

    strategy = FedAvg(
        fraction_fit=fraction_fit,
        fraction_evaluate=1.0,
        min_available_clients=2,
        initial_parameters=parameters,
        on_fit_config_fn=lambda server_round: {"server-round": server_round, "lr": lr},
    )
    config = ServerConfig(num_rounds=num_rounds)
    return ServerAppComponents(strategy=strategy, config=config)


app = ServerApp(server_fn=server_fn)
