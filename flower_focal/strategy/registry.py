"""Builders of the strategies described in :mod:`flower_focal.strategy.specs`.

Each builder makes a ready :class:`~flwr.serverapp.strategy.Strategy` from a
:class:`~flower_focal.config.RunConfig`; :func:`build_strategy` picks the one named by
``cfg.strategy`` through its spec.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import Strategy

from flower_focal.config import RunConfig
from flower_focal.strategy.base import RecordingStrategy
from flower_focal.strategy.fedavg import FedAvg
from flower_focal.strategy.specs import STRATEGY_SPECS, strategy_spec


def fedavg_kwargs(cfg: RunConfig) -> dict[str, object]:
    """Flower FedAvg arguments every strategy shares, taken from the run config."""
    min_nodes = min(2, cfg.min_available_nodes)
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": min_nodes,
        "min_available_nodes": cfg.min_available_nodes,
        "min_train_replies": cfg.min_train_replies,
        "seed": cfg.seed,
    }


def server_opt_kwargs(cfg: RunConfig) -> dict[str, float]:
    """The FedAvgM settings of the FedAvg family (``server-momentum``, ``server-lr``)."""
    return {"server_momentum": cfg.server_momentum, "server_lr": cfg.server_lr}


def build_fedavg(cfg: RunConfig) -> Strategy:
    """FedAvg, wrapped in Flower's client-side DP when ``dp-noise-multiplier`` > 0.

    Raises
    ------
    ValueError
        For a server optimiser together with Flower's DP wrapper: the wrapper adds its noise to
        the strategy's output, after the FedAvgM step, so the server's momentum would hold
        un-noised aggregates (he-fedavg's noise is added before the step and allows both).
    """
    strategy = FedAvg(**fedavg_kwargs(cfg), **server_opt_kwargs(cfg))
    if cfg.dp_noise_multiplier <= 0:
        return strategy
    if strategy.server_opt.active:
        raise ValueError(
            f"fedavg: server-momentum {cfg.server_momentum:g} / server-lr {cfg.server_lr:g} cannot be "
            f"combined with dp-noise-multiplier {cfg.dp_noise_multiplier:g}: Flower's DP wrapper adds "
            "its noise after the server step, so the momentum would accumulate un-noised aggregates. "
            "Use server-momentum=0 server-lr=1 with DP, or he-fedavg (its noise is added before the step)"
        )
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    # Flower's own DP wrapper: clients clip (flower_focal.client.dp.dp_clipping_mod), the
    # server adds Gaussian noise of std noise_multiplier * clipping_norm / num_sampled.
    sampled = max(1, round(cfg.min_available_nodes * cfg.fraction_train))
    return DifferentialPrivacyClientSideFixedClipping(
        strategy,
        noise_multiplier=cfg.dp_noise_multiplier,
        clipping_norm=cfg.dp_clipping_norm,
        num_sampled_clients=sampled,
    )


def server_public_context(cfg: RunConfig, keygen_hint: str = ""):
    """The server's key-less context from ``cfg.he_key_dir`` (it reads only ``public.ctx``)."""
    from flower_focal.crypto import PublicContext

    if not cfg.he_key_dir:
        raise ValueError(
            f"strategy {cfg.strategy} needs keys: run `flower-focal keygen --out DIR{keygen_hint}` "
            "and set run config he-key-dir=DIR (the server reads only DIR/public.ctx)"
        )
    return PublicContext.from_key_dir(cfg.he_key_dir, keygen_hint)


def fedbn_local_keys(cfg: RunConfig) -> tuple[str, ...]:
    """With ``fedbn``: the ``state_dict`` names of ``cfg.model``'s normalisation layers (what
    FedBN keeps at the institutions), else none.

    The names depend on the architecture only, not on the data's channels and classes (which
    the server learns later, from the institutions), so a throw-away instance (3 channels, 2
    classes) names them; HEFedAvg checks them against the real initial model when it binds it.
    The global random state is left as it was.
    """
    if not cfg.fedbn:
        return ()
    import torch

    from flower_focal.models import build_model, norm_keys

    with torch.random.fork_rng(devices=[]):
        return tuple(norm_keys(build_model(cfg.model, 3, 2, cfg.image_size)))


def build_he_fedavg(cfg: RunConfig) -> Strategy:
    """HE-FedAvg with the server's ``public.ctx`` from ``he-key-dir``; with ``fedbn`` the
    normalisation layers are left out of the encrypted vector (``local_keys``)."""
    from flower_focal.strategy.he_fedavg import HEFedAvg

    he_public = server_public_context(cfg)
    return HEFedAvg(he_public=he_public, clip_norm=cfg.he_clip_norm, server_workers=cfg.he_server_workers,
                    noise_multiplier=cfg.he_noise_multiplier, local_keys=fedbn_local_keys(cfg),
                    **fedavg_kwargs(cfg), **server_opt_kwargs(cfg))


def build_focal(cfg: RunConfig) -> Strategy:
    """FOCAL with the server's FOCAL ``public.ctx`` from ``he-key-dir``."""
    from flower_focal.strategy.focal import Focal

    he_public = server_public_context(cfg, keygen_hint=" --preset focal")
    kwargs = fedavg_kwargs(cfg)
    kwargs["fraction_train"] = 1.0  # every institution takes part in every step
    return Focal(
        he_public=he_public, lr=cfg.focal_lr or None, step_scale=cfg.focal_step_scale,
        momentum=cfg.focal_momentum, standardize=cfg.focal_standardize, guard=cfg.focal_guard,
        block=cfg.focal_block, num_rounds=cfg.num_server_rounds,
        class_weights=cfg.focal_class_weights, steps_per_round=cfg.focal_steps_per_round,
        exchange_timeout=cfg.round_timeout, backbone=cfg.backbone,
        backbone_weights=cfg.backbone_weights, backbone_input_size=cfg.backbone_input_size,
        **kwargs,
    )


STRATEGIES: dict[str, Callable[[RunConfig], Strategy]] = {
    name: spec.build for name, spec in STRATEGY_SPECS.items()
}


def core_strategy(strategy: Strategy) -> RecordingStrategy:
    """The flower-focal strategy inside any wrappers (e.g. Flower's DP wrappers): what the
    server talks to (:class:`~flower_focal.strategy.base.RecordingStrategy`)."""
    inner = strategy
    while not isinstance(inner, RecordingStrategy):
        inner = getattr(inner, "strategy", None)
        if inner is None:
            raise TypeError(f"{type(strategy).__name__} wraps no flower-focal strategy")
    return inner


def build_strategy(cfg: RunConfig) -> Strategy:
    """Build the strategy named by ``cfg.strategy``.

    Raises
    ------
    ValueError
        For a name that is not registered (the message lists the valid ones).
    """
    return strategy_spec(cfg.strategy).build(cfg)
