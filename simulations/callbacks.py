"""Hydra callbacks of the launcher (registered in ``conf/config.yaml`` under ``hydra.callbacks``).

:class:`CompareReport` writes the strategy comparison report (``flower_focal.compare``) into
``<sweep dir>/report/`` after a multirun:

    python -m simulations.run -m strategy=fedavg,he_fedavg,focal num_rounds=5 audit.enabled=true

It only reads what the runs wrote. When the runs are not comparable (e.g. a sweep over seeds)
it writes nothing and logs why; ``flower-focal report --runs DIR... --out DIR --allow-mismatch``
writes one anyway. ``report.enabled=false`` switches it off.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

log = logging.getLogger("flower_focal.report")


class CompareReport(Callback):
    """After a multirun, compare the runs it launched in ``<sweep dir>/<report.dir>``."""

    def __init__(self) -> None:
        self.run_dirs: list[Path] = []
        self.report: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.run_dirs = []
        self.report = None

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Remember the run directory of each job that completed (same-process launchers)."""
        if job_return.status != JobStatus.COMPLETED or job_return.cfg is None:
            return
        try:
            self.run_dirs.append(Path(to_absolute_path(str(job_return.cfg.run_dir))))
        except Exception as exc:  # noqa: BLE001 - a callback must never break the run
            log.warning("comparison report: cannot resolve the run_dir of a job: %s", exc)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from flower_focal.compare import NotComparable, write_report

        settings = config.get("report") or {}
        if not settings.get("enabled", True):
            return
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        run_dirs = [d for d in self.run_dirs if (d / "metrics.json").is_file()]
        if not run_dirs:  # jobs ran in other processes (e.g. a joblib launcher): scan the sweep
            run_dirs = sorted(p.parent for p in sweep_dir.glob("*/metrics.json"))
        if len(run_dirs) < 2:
            log.info("comparison report: %d run(s) in this multirun, nothing to compare", len(run_dirs))
            return
        overrides = " ".join(str(o) for o in config.hydra.overrides.task)
        out_dir = sweep_dir / str(settings.get("dir") or "report")
        try:
            self.report = write_report(
                run_dirs, out_dir, allow_mismatch=bool(settings.get("allow_mismatch", False)),
                command=f"python -m simulations.run -m {overrides}".strip(),
            )
        except NotComparable as exc:
            log.warning("comparison report not written: %s\nTo write one anyway: "
                        "flower-focal report --runs %s --out DIR --allow-mismatch", exc, sweep_dir)
            return
        log.info("comparison report: %s", self.report)
        print(f"comparison report: {self.report}", flush=True)
