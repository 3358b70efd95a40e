"""The one description of every strategy a run can pick with ``strategy=<name>``.

Pure data (imports nothing heavy, so the CLI, the report and the audit's config can read it):
each :class:`StrategySpec` says how the strategy is built, whether its institutions share an HE
key, which run-config keys are its own, which keys hold its DP clip and noise, and from which
position the privacy audit attacks it. Every caller iterates over :data:`STRATEGY_SPECS`;
adding a strategy is its module, one entry here and its Hydra yaml.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TRAINING_KEYS = ("model", "lr", "lr-schedule", "local-epochs", "batch-size", "optimizer", "fedprox-mu",
                 "fedbn", "personal-epochs", "ditto-lambda")
SERVER_OPT_KEYS = ("server-momentum", "server-lr")
AUDIT_KINDS = ("plaintext", "he-fedavg", "focal")


@dataclass(frozen=True)
class StrategySpec:
    """How one strategy is built, keyed, reported and audited."""

    name: str
    builder: str
    """``"module:function"`` taking a :class:`~flower_focal.config.RunConfig`, imported on use."""
    keyed: bool = False
    """Institutions share an HE key (the simulation launcher makes a temporary key set)."""
    focal_keys: bool = False
    """Needs a FOCAL key preset (``flower-focal keygen --preset focal``)."""
    settings: tuple[str, ...] = TRAINING_KEYS
    """Run-config keys listed per run in the comparison report (they may differ between runs)."""
    dp: tuple[str, str] | None = None
    """Run-config keys of its DP ``(clip norm, noise multiplier)``, if it has DP."""
    audit: str = "plaintext"
    """What the privacy audit attacks: ``plaintext`` updates, ``he-fedavg`` ciphertexts or ``focal``."""

    def build(self, cfg: Any) -> Any:
        """The ready Flower strategy for run config ``cfg``."""
        module, function = self.builder.split(":")
        builder: Callable[[Any], Any] = getattr(importlib.import_module(module), function)
        return builder(cfg)


STRATEGY_SPECS: dict[str, StrategySpec] = {spec.name: spec for spec in (
    StrategySpec("fedavg", "flower_focal.strategy.registry:build_fedavg",
                 settings=(*TRAINING_KEYS, *SERVER_OPT_KEYS, "dp-noise-multiplier", "dp-clipping-norm"),
                 dp=("dp-clipping-norm", "dp-noise-multiplier")),
    StrategySpec("he-fedavg", "flower_focal.strategy.registry:build_he_fedavg", keyed=True,
                 settings=(*TRAINING_KEYS, *SERVER_OPT_KEYS, "he-preset", "he-clip-norm", "he-noise-multiplier"),
                 dp=("he-clip-norm", "he-noise-multiplier"), audit="he-fedavg"),
    StrategySpec("focal", "flower_focal.strategy.registry:build_focal", keyed=True, focal_keys=True,
                 settings=("backbone", "backbone-input-size", "focal-lr", "focal-step-scale", "focal-momentum",
                           "focal-standardize", "focal-guard", "focal-steps-per-round", "focal-class-weights"),
                 audit="focal"),
)}


def strategy_spec(name: str) -> StrategySpec:
    """The spec of ``name``.

    Raises
    ------
    ValueError
        For a name that is not registered (the message lists the valid ones).
    """
    try:
        return STRATEGY_SPECS[name]
    except KeyError:
        raise ValueError(
            f"Unknown strategy {name!r}; choose one of: {', '.join(STRATEGY_SPECS)}") from None
