"""Typed run configuration: the only reader of Flower's ``context.run_config``.

Every key a run can take is declared in ``pyproject.toml`` under ``[tool.flwr.app.config]``
(Flower rejects undeclared keys) and mirrored here as a field of :class:`RunConfig`.
Keys are kebab-case in Flower (``local-epochs``) and snake_case here (``local_epochs``);
:meth:`RunConfig.from_mapping` is the one place that maps between them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


def setting(default: Any, help: str, *, hydra: str | None = None, path: bool = False,
            data: bool = False, resumable: bool = False) -> Any:
    """A :class:`RunConfig` field with everything every entry point needs to know about it.

    ``help`` is the comment of its line in ``pyproject.toml``; ``hydra`` the dotted path the
    Hydra launcher reads it from (``None``: set it with ``+run.<key>=...``); ``path``: a
    filesystem path (the launcher makes it absolute); ``data``: it determines the data (part
    of the per-process data cache key); ``resumable``: it may change when a run resumes.
    """
    return field(default=default, metadata={"help": help, "hydra": hydra, "path": path, "data": data,
                                            "resumable": resumable})


@dataclass(frozen=True)
class RunConfig:
    """All settings of one federated run, with the defaults of ``flwr run .``.

    Each field is declared once, here, with its help text and where each entry point finds it
    (:func:`setting`); ``pyproject.toml``'s ``[tool.flwr.app.config]`` is
    :meth:`pyproject_table` (a test checks they agree), the Hydra launcher reads the paths in
    the metadata, the data cache and checkpoint compatibility read ``data`` / ``resumable``.
    Callers build it with :meth:`from_mapping` (a Flower ``run_config`` or any dict with
    kebab-case keys); unknown keys and wrongly typed values raise ``ValueError``.
    """

    # --- federation / strategy --------------------------------------------------------
    strategy: str = setting("fedavg", "fedavg | he-fedavg | focal", hydra="strategy.name")
    num_server_rounds: int = setting(3, "", hydra="num_rounds", resumable=True)
    fraction_train: float = setting(1.0, "", hydra="strategy.fraction_train")
    fraction_evaluate: float = setting(1.0, "", hydra="strategy.fraction_evaluate")
    min_available_nodes: int = setting(2, "", hydra="federation.min_available_nodes")
    round_timeout: float = setting(3600.0, "seconds to wait for replies in one round",
                                   hydra="federation.round_timeout", resumable=True)
    min_train_replies: int = setting(
        1, "fewer training replies than this: the round keeps the previous model",
        hydra="federation.min_train_replies")
    resume: bool = setting(False, "continue from run-dir/checkpoint.npz if it exists", hydra="resume",
                           resumable=True)
    # --- local training ---------------------------------------------------------------
    local_epochs: int = setting(3, "", hydra="train.local_epochs")
    lr: float = setting(0.05, "", hydra="train.lr")
    momentum: float = setting(0.9, "", hydra="train.momentum")
    weight_decay: float = setting(0.0, "", hydra="train.weight_decay")
    batch_size: int = setting(32, "", hydra="train.batch_size")
    optimizer: str = setting("sgd", "sgd | adam", hydra="train.optimizer")
    lr_schedule: str = setting(
        "cosine", "constant | cosine: lr of round r = lr * (1 + cos(pi (r-1) / num-server-rounds)) / 2",
        hydra="train.lr_schedule")
    fedprox_mu: float = setting(
        0.0, "FedProx: proximal term mu/2 ||w - w_global||^2 in local training (0 = off; fedavg, he-fedavg)",
        hydra="train.fedprox_mu")
    fedbn: bool = setting(
        False, "FedBN: normalisation layers stay at each institution (their values never leave it; "
        "fedavg, he-fedavg)", hydra="train.fedbn")
    server_momentum: float = setting(
        0.0, "FedAvgM: server momentum beta on the pseudo-gradient (0 = off; fedavg, he-fedavg)",
        hydra="server_opt.momentum")
    server_lr: float = setting(
        1.0, "FedAvgM: server learning rate (1 with momentum 0 = plain FedAvg; fedavg, he-fedavg)",
        hydra="server_opt.lr")
    personal_epochs: int = setting(
        0, "evaluate also a copy fine-tuned locally for this many epochs: personal-* metrics (0 = off); "
        "with ditto-lambda > 0: epochs of the personal model per round",
        hydra="train.personal_epochs")
    personal_lr: float = setting(0.005, "learning rate of that local fine-tuning (constant; not used by Ditto)",
                                 hydra="train.personal_lr")
    ditto_lambda: float = setting(
        0.0, "Ditto: > 0 = each institution keeps a personal model v, trained with lambda/2 ||v - w_global||^2; "
        "personal-* metrics are v's (0 = off; fedavg, he-fedavg)",
        hydra="train.ditto_lambda")
    # --- data -------------------------------------------------------------------------
    dataset: str = setting("synthetic-retina",
                           "synthetic-retina | synthetic-pathology | medmnist | folder | csv",
                           hydra="dataset.name", data=True)
    data_path: str = setting("", ".npz, image folder or CSV manifest (not for synthetic-*)",
                             hydra="dataset.path", path=True, data=True)
    num_samples: int = setting(1200, "synthetic-* only: training images generated",
                               hydra="dataset.num_samples", data=True)
    image_size: int = setting(32, "", hydra="dataset.image_size", data=True)
    train_split: str = setting("train", "", hydra="dataset.train_split", data=True)
    val_split: str = setting("val", "", hydra="dataset.val_split", data=True)
    label_column: str = setting("label", "csv only", hydra="dataset.label_column", data=True)
    image_column: str = setting("image", "csv only (APTOS: id_code)", hydra="dataset.image_column", data=True)
    partitioner: str = setting("dirichlet", "iid | dirichlet | by-site", hydra="partition.name", data=True)
    dirichlet_alpha: float = setting(0.5, "", hydra="partition.alpha", data=True)
    site_column: str = setting("site", "by-site only (CSV column)", hydra="partition.site_column", data=True)
    min_partition_size: int = setting(2, "", hydra="partition.min_size", data=True)
    # --- model ------------------------------------------------------------------------
    model: str = setting("small-cnn", "small-cnn | medium-cnn | small-cnn-gn | medium-cnn-gn | resnet18 | densenet121 | lenet-sigmoid",
                         hydra="model.name")
    # --- homomorphic encryption (he-fedavg, focal) --------------------------------
    he_preset: str = setting(
        "compact", "he-fedavg: compact | ckks | bfv | nvflare; focal always uses a FOCAL preset (focal) "
        "(used by the launcher's keygen)", hydra="strategy.he.preset")
    he_key_dir: str = setting(
        "", "he-fedavg / focal: keygen directory (server reads public.ctx, institutions secret.ctx)",
        hydra="strategy.he.key_dir", path=True)
    he_workers: int = setting(1, "he-fedavg: encryption processes per institution", hydra="strategy.he.workers",
                              resumable=True)
    he_server_workers: int = setting(
        1, "he-fedavg: server processes that check and add the uploads (byte-identical sum)",
        hydra="strategy.he.server_workers", resumable=True)
    he_clip_norm: float = setting(
        0.0, "he-fedavg: clip each update to this L2 norm before encrypting (0 = off)",
        hydra="strategy.he.clip_norm")
    he_noise_multiplier: float = setting(
        0.0, "he-fedavg: Gaussian noise (z * clip / sqrt(sampled) per institution) before encrypting",
        hydra="strategy.he.noise_multiplier")
    # --- FOCAL split training (strategy focal) ----------------------------------------
    backbone: str = setting(
        "efficientnet-lite0",
        "focal: frozen feature extractor (efficientnet-lite0 | monai-resnet18 | monai-densenet121 | vit-local)",
        hydra="strategy.focal.backbone")
    backbone_weights: str = setting(
        "", "focal: local weights file of the backbone (\"\" = packaged / seeded init; required for vit-local)",
        hydra="strategy.focal.backbone_weights", path=True)
    backbone_input_size: int = setting(
        0, "focal: side images are resized to for the backbone (0 = the backbone's default)",
        hydra="strategy.focal.backbone_input_size")
    embedding_cache_dir: str = setting(
        "", "focal: where institutions cache their embeddings (\"\" = <tmp>/flower-focal-embeddings)",
        hydra="strategy.focal.embedding_cache_dir", path=True)
    focal_block: int = setting(64, "focal: sample positions per ciphertext (power of two, 2..256)",
                               hydra="strategy.focal.block")
    focal_class_weights: str = setting(
        "none", "focal: none | balanced (global class counts are summed under HE)",
        hydra="strategy.focal.class_weights")
    focal_steps_per_round: int = setting(
        1, "focal: full-batch gradient steps per Flower round (num-server-rounds x this = steps)",
        hydra="strategy.focal.steps_per_round")
    focal_lr: float = setting(
        0.0, "focal: step size on the standardised features (0 = derived: focal-step-scale x K / (d + 1)); "
        "the shared `lr` is not used by focal", hydra="strategy.focal.lr")
    focal_step_scale: float = setting(4.0, "focal: multiplier of the derived step (the loss guard halves it "
                                      "if the loss rises)", hydra="strategy.focal.step_scale")
    focal_momentum: float = setting(0.5, "focal: Nesterov momentum, applied by the institutions (0 = off)",
                                    hydra="strategy.focal.momentum")
    focal_standardize: bool = setting(
        True, "focal: standardise features with global mean / std summed under HE (institutions decrypt)",
        hydra="strategy.focal.standardize")
    focal_guard: bool = setting(
        True, "focal: roll back + halve the step when the decrypted training loss rises; stop if that fails",
        hydra="strategy.focal.guard")
    # --- differential privacy (fedavg: Flower's DP wrapper + clipping mod) -------------
    dp_noise_multiplier: float = setting(
        0.0, "fedavg: > 0 wraps it in Flower's DifferentialPrivacyClientSideFixedClipping",
        hydra="strategy.dp.noise_multiplier")
    dp_clipping_norm: float = setting(
        1.0, "fedavg with DP: L2 clipping norm of each update (fixedclipping_mod)",
        hydra="strategy.dp.clipping_norm")
    # --- reproducibility and outputs -------------------------------------------------
    seed: int = setting(42, "", hydra="seed", data=True)
    run_dir: str = setting(
        "", "where metrics.json, curves.png, summary.md, model.pt go (\"\" = ./runs/<run-id>)",
        hydra="run_dir", path=True, resumable=True)
    device: str = setting("auto", "auto | cpu | cuda", hydra="device")
    num_workers: int = setting(
        -1, "data-loading worker processes (-1 = auto: min(cpus-1, 8) on CUDA, 0 on CPU)",
        hydra="num_workers")
    precision: str = setting(
        "auto", "auto | fp32 | bf16: autocast of local training and the FOCAL backbone "
        "(auto = bf16 on CUDA, fp32 on CPU)", hydra="precision")

    @classmethod
    def settings(cls, flag: str | None = None) -> tuple[str, ...]:
        """Field names (snake_case), or those whose metadata ``flag`` is true."""
        return tuple(f.name for f in fields(cls) if flag is None or f.metadata.get(flag))

    @classmethod
    def pyproject_table(cls) -> str:
        """The ``[tool.flwr.app.config]`` lines of ``pyproject.toml`` (keys, defaults, comments)."""
        lines = []
        for f in fields(cls):
            value = f.default
            text = ("true" if value else "false") if isinstance(value, bool) else (
                json.dumps(value) if isinstance(value, str) else repr(value))
            line = f"{f.name.replace('_', '-')} = {text}"
            help_text = f.metadata.get("help", "")
            lines.append(f"{line:<35} # {help_text}" if help_text else line)
        return "\n".join(lines) + "\n"

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, others: str = "raise") -> RunConfig:
        """Build a config from kebab-case (Flower) or snake_case keys; validate types.

        ``others="ignore"`` skips keys that are not flower-focal's: inside a ClientApp the run
        config is the whole app's (Flower has already checked it against the app's pyproject),
        and an app that also uses flower-focal's handlers keeps its own keys.
        """
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for raw_key, value in mapping.items():
            key = raw_key.replace("-", "_")
            if key not in known and others == "ignore":
                continue
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


def check_personalisation(cfg: RunConfig) -> None:
    """Refuse personalisation settings that cannot run: ``ValueError`` naming the setting.

    ``personal-epochs`` >= 0 and ``personal-lr`` > 0; ``ditto-lambda`` a finite number >= 0,
    and > 0 (Ditto on) only with ``personal-epochs`` >= 1 (the personal model's epochs per
    round). The launcher's preflight and the institutions' handlers both call it.
    """
    if cfg.personal_epochs < 0 or not cfg.personal_lr > 0:
        raise ValueError(f"personal-epochs must be >= 0 and personal-lr > 0, got {cfg.personal_epochs} "
                         f"and {cfg.personal_lr}")
    if not (math.isfinite(cfg.ditto_lambda) and cfg.ditto_lambda >= 0):
        raise ValueError(f"ditto-lambda must be a finite number >= 0 (0 = off), got {cfg.ditto_lambda}")
    if cfg.ditto_lambda > 0 and cfg.personal_epochs < 1:
        raise ValueError(
            f"ditto-lambda={cfg.ditto_lambda:g} turns Ditto on, which trains each institution's personal "
            f"model for personal-epochs epochs every round, but personal-epochs={cfg.personal_epochs}; "
            "set personal-epochs >= 1 (or ditto-lambda=0)")
