"""What a privacy audit attacks: :class:`AuditConfig` (imports nothing heavy)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flower_focal.strategy.specs import STRATEGY_SPECS, strategy_spec

if TYPE_CHECKING:
    from flower_focal.config import RunConfig

STRATEGIES = tuple(STRATEGY_SPECS)
ATTACKS = ("inverting-gradients", "idlg")
"""Attack names (see :mod:`flower_focal.audit.attacks`)."""
SSIM_THRESHOLD = 0.6
"""A sample leaks when its reconstruction reaches this SSIM to the true image."""

REAL_SETS = {"pathmnist": "synthetic-pathology", "retinamnist": "synthetic-retina"}
"""MedMNIST names the audit finds in ``../shared/data`` by itself, and their synthetic stand-ins."""


@dataclass(frozen=True)
class AuditConfig:
    """Settings of one privacy audit (see :func:`flower_focal.audit.run_audit`).

    The attacked institutions each hold exactly one batch (``batch_size`` images) and train on
    it for ``local_steps`` SGD steps (local epochs over that one batch) with the real client
    code; ``num_samples`` images are attacked in all (``num_samples / batch_size``
    institutions, rounded up to whole batches).

    ``dataset``: ``pathmnist`` / ``retinamnist`` (read from ``data_path``, else from
    ``../shared/data/<name>/<name>.npz``, else the synthetic set of the same kind is used and
    the output says so), ``medmnist`` / ``folder`` / ``csv`` (need ``data_path``) or a
    synthetic set (``synthetic-retina``, ``synthetic-pathology``; ``num_samples_source``
    images). ``dp_clip_norm`` / ``dp_noise_multiplier`` switch on the strategy's DP option
    (fedavg: Flower's client-side fixed clipping + server noise; he-fedavg: clip and noise
    before encryption). ``aggregate_size``: victims whose updates are in the aggregate a
    curious institution attacks (he-fedavg, institution side). ``he_key_dir``: a key set with
    ``secret.ctx`` to use instead of a fresh temporary one. ``iterations``: L-BFGS budget
    (objective-and-gradient evaluations) per attacked update.
    """

    strategy: str = "fedavg"
    dataset: str = "pathmnist"
    data_path: str = ""
    num_samples_source: int = 1200
    image_size: int = 32
    model: str = "small-cnn"
    batch_size: int = 1
    local_steps: int = 1
    lr: float = 0.05
    momentum: float = 0.0
    optimizer: str = "sgd"
    num_samples: int = 16
    attack: str = "inverting-gradients"
    iterations: int = 400
    tv_weight: float = 1e-3
    ssim_threshold: float = SSIM_THRESHOLD
    seed: int = 0
    dp_clip_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    aggregate_size: int = 2
    he_preset: str = ""
    he_key_dir: str = ""
    backbone: str = "efficientnet-lite0"
    backbone_weights: str = ""
    backbone_input_size: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
        if self.attack not in ATTACKS:
            raise ValueError(f"Unknown attack {self.attack!r}; expected one of {', '.join(ATTACKS)}")
        for name in ("batch_size", "local_steps", "num_samples", "iterations", "aggregate_size",
                     "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer != "sgd":
            raise ValueError(
                f"the audit's gradient estimate (w_global - w_returned) / (lr * steps) needs "
                f"optimizer 'sgd', got {self.optimizer!r}"
            )
        if self.dp_noise_multiplier < 0 or self.dp_clip_norm < 0:
            raise ValueError("dp_clip_norm and dp_noise_multiplier must be >= 0")
        if self.dp_noise_multiplier > 0 and self.dp_clip_norm <= 0:
            raise ValueError("dp_noise_multiplier needs dp_clip_norm > 0 (noise is calibrated to the clip)")
        if not 0.0 < self.ssim_threshold <= 1.0:
            raise ValueError(f"ssim_threshold must be in (0, 1], got {self.ssim_threshold}")

    @property
    def num_institutions(self) -> int:
        """Attacked institutions (one batch each)."""
        return -(-self.num_samples // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> AuditConfig:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_run_config(cls, cfg: RunConfig, **overrides: Any) -> AuditConfig:
        """An audit of the run ``cfg`` describes: same strategy, data, model, training, seed.

        ``local_steps`` is the run's ``local_epochs`` (an attacked institution holds one
        batch, so one epoch is one step); the DP settings are the strategy's (fedavg:
        ``dp-clipping-norm`` / ``dp-noise-multiplier`` when noise is on; he-fedavg:
        ``he-clip-norm`` / ``he-noise-multiplier``). The run's key directory is not used (the
        audit plays the institutions too, so it makes its own key set of the run's preset).
        ``overrides`` (field names) win.
        """
        spec = strategy_spec(cfg.strategy)
        run = cfg.to_flower()
        clip, noise = 0.0, 0.0
        if spec.dp is not None and run[spec.dp[1]] > 0:  # DP on: the strategy's own clip and noise
            clip, noise = float(run[spec.dp[0]]), float(run[spec.dp[1]])
        elif spec.dp is not None and spec.audit == "he-fedavg":  # HE clips without noise too
            clip = float(run[spec.dp[0]])
        values: dict[str, Any] = {
            "strategy": cfg.strategy,
            "dataset": cfg.dataset,
            "data_path": cfg.data_path,
            "num_samples_source": cfg.num_samples,
            "image_size": cfg.image_size,
            "model": cfg.model,
            "batch_size": cfg.batch_size,
            "local_steps": cfg.local_epochs,
            "lr": cfg.lr,
            "momentum": cfg.momentum,
            "optimizer": cfg.optimizer,
            "seed": cfg.seed,
            "dp_clip_norm": clip,
            "dp_noise_multiplier": noise,
            "he_preset": cfg.he_preset if spec.audit == "he-fedavg" else "",
            "backbone": cfg.backbone,
            "backbone_weights": cfg.backbone_weights,
            "backbone_input_size": cfg.backbone_input_size,
            "device": "cpu" if cfg.device == "auto" else cfg.device,
        }
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown AuditConfig field(s) {unknown}")
        values.update(overrides)
        return cls(**values)


def default_real_data(name: str) -> Path | None:
    """``../shared/data/<name>/<name>.npz`` next to the working directory or this checkout."""
    roots = [Path.cwd(), Path(__file__).resolve().parents[2]]
    for root in roots:
        path = root.parent / "shared" / "data" / name / f"{name}.npz"
        if path.is_file():
            return path
    return None
