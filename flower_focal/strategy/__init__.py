"""Server-side strategies (Flower Message API), their descriptions and their registry.

``FedAvg`` is a drop-in for ``flwr.serverapp.strategy.FedAvg``; ``HEFedAvg`` and ``Focal`` add
encryption. Everything is imported on first use (``HEFedAvg`` and ``Focal`` pull in TenSEAL),
so reading :mod:`flower_focal.strategy.specs` costs nothing.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FedAvg": "flower_focal.strategy.fedavg",
    "NothingAggregated": "flower_focal.strategy.fedavg",
    "HEFedAvg": "flower_focal.strategy.he_fedavg",
    "Focal": "flower_focal.strategy.focal",
    "STRATEGIES": "flower_focal.strategy.registry",
    "build_strategy": "flower_focal.strategy.registry",
    "STRATEGY_SPECS": "flower_focal.strategy.specs",
    "StrategySpec": "flower_focal.strategy.specs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
