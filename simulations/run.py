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

import dataclasses
import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from flower_focal.config import RunConfig
from flower_focal.preflight import PreflightError, failure_line
from flower_focal.simulation import Federation, simulate

log = logging.getLogger("flower_focal.launcher")


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Map the composed Hydra config onto the Flower run config.

    Every field of :class:`~flower_focal.config.RunConfig` names its Hydra path in its metadata
    (``setting(hydra=...)``): values missing from the composed config (e.g. ``strategy.he.*``
    under fedavg) keep the run config's default, paths become absolute (ClientApps run in other
    working directories), and ``+run.<key>=value`` (kebab-case run-config keys) overrides any
    setting last.
    """
    values: dict[str, object] = {}
    for f in dataclasses.fields(RunConfig):
        path = f.metadata.get("hydra")
        value = OmegaConf.select(cfg, path, default=None, throw_on_missing=True) if path else None
        if value is None:
            continue
        if f.metadata.get("path") and value:
            value = to_absolute_path(str(value))
        values[f.name] = value
    if not values.get("min_available_nodes"):
        values["min_available_nodes"] = cfg.num_institutions  # default: every institution
    if not values.get("num_samples"):
        values.pop("num_samples", None)  # file datasets: not used
    values.update({str(k).replace("-", "_"): v for k, v in (cfg.get("run") or {}).items()})
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
        ray_address=fed.get("ray_address") or None,
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
        sys.exit(failure_line(exc))
    metrics = result.metrics()
    final = metrics["rounds"][-1]["evaluate"] if metrics["rounds"] else {}
    log.info("run %d finished in %.1f s: %s", result.run_id, result.wall_time_s, json.dumps(final))
    run_audit_for(cfg, run_cfg, run_dir)
    log.info("run directory: %s", run_dir)
    return final.get("auroc")


if __name__ == "__main__":
    main()
