"""Hydra launcher: compose an experiment, run it in Flower's Ray simulation, report.

    python -m simulations.run                                   # defaults: fedavg, synthetic-retina, 5 institutions
    python -m simulations.run dataset=pathmnist num_institutions=5 num_rounds=10
    python -m simulations.run dataset=medmnist dataset.path=/data/dermamnist.npz
    python -m simulations.run -m strategy=fedavg seed=1,2,3     # Hydra multirun
    python -m simulations.run -m strategy=fedavg,he_fedavg,focal audit.enabled=true   # + comparison report

Each run directory (``run_dir``, by default Hydra's output dir) receives ``metrics.json``,
``curves.png``, ``summary.md``, ``model.pt`` + ``model.json``, ``config.json`` and the logs;
with ``audit.enabled=true`` also ``audit.json`` (a gradient-inversion audit of the run). A
multirun ends with a comparison report of its runs in ``<sweep dir>/report/``
(``simulations/callbacks.py``).
The mapping from this Hydra config to Flower's run config is :func:`to_run_config`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from flower_focal.config import RunConfig
from flower_focal.preflight import PreflightError
from flower_focal.simulation import Federation, simulate

log = logging.getLogger("flower_focal.launcher")


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Map the composed Hydra config onto the Flower run config (one place, explicit)."""
    ds, part, train, fed = cfg.dataset, cfg.partition, cfg.train, cfg.federation
    data_path = str(ds.path or "")  # raises MissingMandatoryValue for file datasets without a path
    he = cfg.strategy.get("he") or {}
    he_key_dir = str(he.get("key_dir") or "")
    focal = cfg.strategy.get("focal") or {}
    bb_weights = str(focal.get("backbone_weights") or "")
    cache_dir = str(focal.get("embedding_cache_dir") or "")
    values = {
        "strategy": cfg.strategy.name,
        "num-server-rounds": cfg.num_rounds,
        "fraction-train": cfg.strategy.fraction_train,
        "fraction-evaluate": cfg.strategy.fraction_evaluate,
        "min-available-nodes": fed.min_available_nodes or cfg.num_institutions,
        "round-timeout": float(fed.round_timeout),
        "local-epochs": train.local_epochs,
        "lr": float(train.lr),
        "momentum": float(train.momentum),
        "weight-decay": float(train.weight_decay),
        "batch-size": train.batch_size,
        "optimizer": train.optimizer,
        "dataset": ds.name,
        # ClientApps run in other working directories: hand them absolute paths.
        "data-path": to_absolute_path(data_path) if data_path else "",
        "num-samples": ds.get("num_samples", 0) or RunConfig.num_samples,
        "image-size": ds.image_size,
        "train-split": ds.get("train_split", "train"),
        "val-split": ds.get("val_split", "val"),
        "image-column": ds.get("image_column", "image"),
        "label-column": ds.get("label_column", "label"),
        "partitioner": part.name,
        "dirichlet-alpha": float(part.alpha),
        "site-column": part.get("site_column", "site"),
        "min-partition-size": part.min_size,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "run-dir": to_absolute_path(str(cfg.run_dir)),
        "device": cfg.device,
        "he-preset": he.get("preset", RunConfig.he_preset),
        "he-key-dir": to_absolute_path(he_key_dir) if he_key_dir else "",
        "he-workers": he.get("workers", RunConfig.he_workers),
        "he-clip-norm": float(he.get("clip_norm", RunConfig.he_clip_norm)),
        "he-noise-multiplier": float(he.get("noise_multiplier", RunConfig.he_noise_multiplier)),
        "backbone": focal.get("backbone", RunConfig.backbone),
        "backbone-weights": to_absolute_path(bb_weights) if bb_weights else "",
        "backbone-input-size": int(focal.get("backbone_input_size", RunConfig.backbone_input_size)),
        "embedding-cache-dir": to_absolute_path(cache_dir) if cache_dir else "",
        "focal-block": int(focal.get("block", RunConfig.focal_block)),
        "focal-class-weights": focal.get("class_weights", RunConfig.focal_class_weights),
        "focal-steps-per-round": int(focal.get("steps_per_round", RunConfig.focal_steps_per_round)),
    }
    return RunConfig.from_mapping(values)


def to_federation(cfg: DictConfig) -> Federation:
    """Simulation-engine settings of the composed config."""
    fed = cfg.federation
    return Federation(
        num_supernodes=cfg.num_institutions,
        client_cpus=fed.client_cpus,
        client_gpus=float(fed.client_gpus),
        ray_num_cpus=fed.ray_num_cpus,
        ray_num_gpus=fed.ray_num_gpus,
    )


AUDIT_OVERRIDES = ("num_samples", "iterations", "attack", "model", "batch_size")  # audit.* passed on when set


def run_audit_for(cfg: DictConfig, run_cfg: RunConfig, run_dir: Path) -> dict | None:
    """``audit.enabled``: attack the run just launched (same data, model, seed, strategy) and
    write ``audit.json`` into its run directory; returns the audit result (None when off)."""
    audit = cfg.get("audit") or {}
    if not audit.get("enabled", False):
        return None
    try:
        from flower_focal.audit import AuditConfig, run_audit
    except ImportError as exc:
        raise RuntimeError(
            f"audit.enabled=true but the privacy audit (flower_focal.audit) cannot be imported: {exc}"
        ) from exc
    overrides = {k: audit[k] for k in AUDIT_OVERRIDES if audit.get(k) is not None}
    result = run_audit(AuditConfig.from_run_config(run_cfg, **overrides), out_dir=run_dir)
    log.info("audit of %s: leakage rate %s (%s)", run_cfg.strategy, result.get("leakage_rate"),
             result.get("reason") or result.get("rule", ""))
    return result


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float | None:
    """Run one composed experiment; returns the final validation AUROC (for sweepers)."""
    run_cfg = to_run_config(cfg)
    run_dir = Path(run_cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "hydra_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        result = simulate(run_cfg, to_federation(cfg), timeout_s=cfg.federation.timeout_s)
    except PreflightError as exc:  # nothing was started: one line, no traceback
        sys.exit(f"flower-focal: preflight failed, nothing was started: {exc}")
    metrics = result.metrics()
    final = metrics["rounds"][-1]["evaluate"] if metrics["rounds"] else {}
    log.info("run %d finished in %.1f s: %s", result.run_id, result.wall_time_s, json.dumps(final))
    run_audit_for(cfg, run_cfg, run_dir)
    log.info("run directory: %s", run_dir)
    return final.get("auroc")


if __name__ == "__main__":
    main()
