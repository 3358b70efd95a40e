"""Server-side strategies (Flower Message API), their descriptions and their registry.

``FedAvg`` is a drop-in for ``flwr.serverapp.strategy.FedAvg``; ``HEFedAvg`` and ``Focal`` add
encryption. All three are ``RecordingStrategy`` (the interface the server uses) and hold a
``RunRecorder`` (history, bytes, checkpoints). Everything is imported on first use
(``HEFedAvg`` and ``Focal`` pull in TenSEAL), so reading :mod:`flower_focal.strategy.specs`
costs nothing.
"""

from __future__ import annotations

from flower_focal._compat import lazy_exports

_EXPORTS = {
    "FedAvg": "flower_focal.strategy.fedavg",
    "NothingAggregated": "flower_focal.strategy.fedavg",
    "HEFedAvg": "flower_focal.strategy.he_fedavg",
    "Focal": "flower_focal.strategy.focal",
    "RecordingStrategy": "flower_focal.strategy.base",
    "RunRecorder": "flower_focal.strategy.recorder",
    "STRATEGIES": "flower_focal.strategy.registry",
    "build_strategy": "flower_focal.strategy.registry",
    "STRATEGY_SPECS": "flower_focal.strategy.specs",
    "StrategySpec": "flower_focal.strategy.specs",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
