"""Harness for tests, benchmarks and experiments: the ServerApp and ClientApp never import it.

    from flower_focal.testing import LoopbackGrid, train_plaintext
    grid = LoopbackGrid(build_client_app(), 3, cfg.to_flower())   # real ClientApps, in-process
    run_server(grid, cfg)

Modules: :mod:`.grid` (:class:`LoopbackGrid`: a Flower Grid that runs a real ClientApp per node
in this process and records the traffic), :mod:`.plaintext` (the numpy twin of the CKKS
evaluator and key holder), :mod:`.focal_driver` (FOCAL's epoch loop over in-memory
institutions, encrypted or on the plaintext twin).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flower_focal.testing.focal_driver import (
        InstitutionEmbeddings,
        TrainResult,
        he_evaluator_factory,
        train_encrypted,
        train_plaintext,
    )
    from flower_focal.testing.grid import LoopbackGrid
    from flower_focal.testing.plaintext import PlainEvaluator, PlainKeyHolder

_HOME = {
    "LoopbackGrid": "grid",
    "PlainEvaluator": "plaintext",
    "PlainKeyHolder": "plaintext",
    "InstitutionEmbeddings": "focal_driver",
    "TrainResult": "focal_driver",
    "he_evaluator_factory": "focal_driver",
    "train_encrypted": "focal_driver",
    "train_plaintext": "focal_driver",
}

__all__ = [
    "InstitutionEmbeddings",
    "LoopbackGrid",
    "PlainEvaluator",
    "PlainKeyHolder",
    "TrainResult",
    "he_evaluator_factory",
    "train_encrypted",
    "train_plaintext",
]


def __getattr__(name: str) -> Any:  # Flower loads on first use of the grid only
    if name in _HOME:
        return getattr(import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
