"""Server-side strategies (Flower Message API) and their registry."""

from flower_focal.strategy.fedavg import FedAvg
from flower_focal.strategy.registry import STRATEGIES, build_strategy

__all__ = ["STRATEGIES", "FedAvg", "build_strategy"]
