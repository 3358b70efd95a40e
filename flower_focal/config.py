"""Typed run configuration: the only reader of Flower's ``context.run_config``.

Every key a run can take is declared in ``pyproject.toml`` under ``[tool.flwr.app.config]``
(Flower rejects undeclared keys) and mirrored here as a field of :class:`RunConfig`.
Keys are kebab-case in Flower (``local-epochs``) and snake_case here (``local_epochs``);
:meth:`RunConfig.from_mapping` is the one place that maps between them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class RunConfig:
    """All settings of one federated run, with the defaults of ``flwr run .``.

    Callers build it with :meth:`from_mapping` (a Flower ``run_config`` or any dict with
    kebab-case keys); unknown keys and wrongly typed values raise ``ValueError``.
    """

    # --- federation / strategy --------------------------------------------------------
    strategy: str = "fedavg"
    num_server_rounds: int = 3
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_available_nodes: int = 2
    round_timeout: float = 3600.0
    min_train_replies: int = 1
    resume: bool = False
    # --- local training ---------------------------------------------------------------
    local_epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    optimizer: str = "sgd"
    # --- data -------------------------------------------------------------------------
    dataset: str = "synthetic-retina"
    data_path: str = ""
    num_samples: int = 1200
    image_size: int = 32
    train_split: str = "train"
    val_split: str = "val"
    label_column: str = "label"
    image_column: str = "image"
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    site_column: str = "site"
    min_partition_size: int = 2
    # --- model ------------------------------------------------------------------------
    model: str = "small-cnn"
    # --- homomorphic encryption (he-fedavg, focal) --------------------------------
    he_preset: str = "compact"
    he_key_dir: str = ""
    he_workers: int = 1
    he_clip_norm: float = 0.0
    he_noise_multiplier: float = 0.0
    # --- FOCAL split training (strategy focal) ----------------------------------------
    backbone: str = "efficientnet-lite0"
    backbone_weights: str = ""
    backbone_input_size: int = 0
    embedding_cache_dir: str = ""
    focal_block: int = 64
    focal_class_weights: str = "none"
    focal_steps_per_round: int = 1
    # --- differential privacy (fedavg: Flower's DP wrapper + clipping mod) -------------
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 1.0
    # --- reproducibility and outputs -------------------------------------------------
    seed: int = 42
    run_dir: str = ""
    device: str = "auto"

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> RunConfig:
        """Build a config from kebab-case (Flower) or snake_case keys; validate types."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for raw_key, value in mapping.items():
            key = raw_key.replace("-", "_")
            if key not in known:
                raise ValueError(
                    f"Unknown run-config key {raw_key!r}. Known keys: "
                    + ", ".join(sorted(k.replace("_", "-") for k in known))
                )
            values[key] = _coerce(raw_key, value, type(getattr(cls(), key)))
        return cls(**values)

    def to_flower(self) -> dict[str, Any]:
        """Return the kebab-case mapping Flower's ``--run-config`` accepts."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        """Return a copy with ``changes`` applied (snake_case field names)."""
        return dataclasses.replace(self, **changes)


def _coerce(key: str, value: Any, target: type) -> Any:
    """Convert ``value`` to ``target``; Flower's TOML parser may give ints for floats."""
    if target is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"run-config key {key!r} must be a boolean, got {value!r}")
    if target is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if target is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if target is str and isinstance(value, str):
        return value
    raise ValueError(
        f"run-config key {key!r} must be of type {target.__name__}, got {value!r}"
    )
