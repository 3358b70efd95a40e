"""Server-side strategies (Flower Message API) and their registry.

``FedAvg`` is a drop-in for ``flwr.serverapp.strategy.FedAvg``; ``HEFedAvg`` and ``Focal`` are
imported on first use (they pull in TenSEAL).
"""

from flower_focal.strategy.fedavg import FedAvg, NothingAggregated
from flower_focal.strategy.registry import STRATEGIES, build_strategy

__all__ = ["STRATEGIES", "FedAvg", "Focal", "HEFedAvg", "NothingAggregated", "build_strategy"]


def __getattr__(name: str):
    if name == "HEFedAvg":
        from flower_focal.strategy.he_fedavg import HEFedAvg

        return HEFedAvg
    if name == "Focal":
        from flower_focal.strategy.focal import Focal

        return Focal
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
