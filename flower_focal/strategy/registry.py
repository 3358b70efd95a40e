"""The closed set of strategies a run can pick with ``strategy=<name>``.

Each entry builds a ready :class:`~flwr.serverapp.strategy.Strategy` from a
:class:`~flower_focal.config.RunConfig`. Adding a strategy means adding one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.serverapp.strategy import Strategy

from flower_focal.config import RunConfig
from flower_focal.strategy.fedavg import FedAvg


def fedavg_kwargs(cfg: RunConfig) -> dict[str, object]:
    """Flower FedAvg arguments every strategy shares, taken from the run config."""
    min_nodes = min(2, cfg.min_available_nodes)
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": min_nodes,
        "min_available_nodes": cfg.min_available_nodes,
    }


def _build_fedavg(cfg: RunConfig) -> Strategy:
    return FedAvg(seed=cfg.seed, **fedavg_kwargs(cfg))


def _build_he_fedavg(cfg: RunConfig) -> Strategy:
    from flower_focal.crypto import PUBLIC_FILE, PublicContext
    from flower_focal.strategy.he_fedavg import HEFedAvg

    if not cfg.he_key_dir:
        raise ValueError(
            "strategy he-fedavg needs keys: run `flower-focal keygen --out DIR` and set "
            "run config he-key-dir=DIR (the server reads only DIR/public.ctx)"
        )
    he_public = PublicContext.load(Path(cfg.he_key_dir) / PUBLIC_FILE)
    return HEFedAvg(he_public=he_public, clip_norm=cfg.he_clip_norm, seed=cfg.seed, **fedavg_kwargs(cfg))


STRATEGIES: dict[str, Callable[[RunConfig], Strategy]] = {
    "fedavg": _build_fedavg,
    "he-fedavg": _build_he_fedavg,
}


def build_strategy(cfg: RunConfig) -> Strategy:
    """Build the strategy named by ``cfg.strategy``.

    Raises
    ------
    ValueError
        For a name that is not registered (the message lists the valid ones).
    """
    try:
        builder = STRATEGIES[cfg.strategy]
    except KeyError:
        raise ValueError(
            f"Unknown strategy {cfg.strategy!r}; choose one of: {', '.join(sorted(STRATEGIES))}"
        ) from None
    return builder(cfg)
