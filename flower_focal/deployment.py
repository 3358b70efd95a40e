"""A real Flower deployment on loopback: one SuperLink and N SuperNodes as OS processes.

:class:`LoopbackDeployment` starts ``flower-superlink`` and ``flower-supernode`` exactly as a
consortium would (no simulation engine), each with its own node config (data path, secret key
path, partition), submits runs with ``flwr run . <connection>``, reads their final status with
``flwr ls`` and stops every process by PID. Used by the deployment tests and benchmarks, and a
quick way to try a deployment on one machine::

    with LoopbackDeployment(node_configs=[{"data-path": "/data/a.npz"}, {"data-path": "/data/b.npz"}]) as dep:
        result = dep.run(RunConfig(strategy="fedavg", dataset="medmnist", run_dir="/tmp/run"))
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flower_focal.config import RunConfig
from flower_focal.simulation import (
    SimulationFailed,
    _toml_value,
    SimulationResult,
    flwr_executable,
    free_port,
    flower_env,
    repo_root,
    require_completed,
    write_run_config,
)

CONNECTION = "loopback"


def _node_config_string(config: Mapping[str, Any]) -> str:
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, int | float):
            parts.append(f"{key}={value}")
        else:
            parts.append(f'{key}="{value}"')
    return " ".join(parts)


class LoopbackDeployment:
    """SuperLink + SuperNodes on 127.0.0.1 with a private FLWR_HOME and free ports.

    Parameters
    ----------
    node_configs
        One mapping per SuperNode (``--node-config``), e.g. ``data-path``, ``he-secret-key``,
        ``partition-id`` / ``num-partitions``.
    workdir
        Where logs and the Flower home go (a temporary directory when omitted).
    """

    def __init__(self, node_configs: Sequence[Mapping[str, Any]], workdir: Path | None = None) -> None:
        if not node_configs:
            raise ValueError("a deployment needs at least one SuperNode")
        self.node_configs = [dict(c) for c in node_configs]
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="flower-focal-deploy-"))
        self.flwr_home = self.workdir / "flwr-home"
        self.port = free_port()
        self.env = flower_env(self.flwr_home)
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen | None] = []

    # ------------------------------------------------------------------ processes
    def _spawn(self, cmd: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.workdir / log_name, "ab")  # noqa: SIM115 (kept open for the process)
        return subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self) -> LoopbackDeployment:
        """Start the SuperLink and every SuperNode; register the CLI connection."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.superlink = self._spawn(
            ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
             "--disable-runtime-dependency-installation",
             "--database", str(self.workdir / "state.db")],
            "superlink.log",
        )
        with open(self.flwr_home / "config.toml", "a") as fh:
            fh.write(f'\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self._wait_for_superlink()
        self.supernodes = [self._start_node(i) for i in range(len(self.node_configs))]
        return self

    def _start_node(self, index: int) -> subprocess.Popen:
        return self._spawn(
            ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
             "--port", str(free_port()), "--node-config", _node_config_string(self.node_configs[index])],
            f"supernode{index}.log",
        )

    def _wait_for_superlink(self, timeout_s: float = 60.0) -> None:
        import httpx

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited; see {self.workdir / 'superlink.log'}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"flower-superlink did not come up in {timeout_s:.0f} s")

    def kill_node(self, index: int) -> None:
        """SIGKILL one SuperNode (a site that dies)."""
        proc = self.supernodes[index]
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.supernodes[index] = None

    def restart_node(self, index: int) -> None:
        """Start a SuperNode again with its original node config (a site that rejoins)."""
        self.kill_node(index)
        self.supernodes[index] = self._start_node(index)

    def stop(self) -> None:
        """SIGTERM every process (SIGKILL after a grace period), newest first."""
        procs = [p for p in [*self.supernodes, self.superlink] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 15
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __enter__(self) -> LoopbackDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ runs
    def run(self, cfg: RunConfig, *, app_dir: Path | None = None, timeout_s: float = 900.0) -> SimulationResult:
        """Submit ``cfg`` with ``flwr run . <connection>`` and wait for its final status.

        Raises
        ------
        SimulationFailed
            If the run does not end as ``finished:completed``.
        """
        if not cfg.run_dir:
            raise ValueError("run() needs cfg.run_dir")
        run_dir = Path(cfg.run_dir).resolve()
        toml_path = write_run_config(cfg.replace(run_dir=str(run_dir)), run_dir / "run_config.toml")
        log_path = run_dir / "flwr.log"
        run_id, status, wall = self.run_app(app_dir or repo_root(), toml_path, log_path, timeout_s=timeout_s)
        return SimulationResult(run_id, status, run_dir, wall, log_path)

    def run_app(self, app_dir: Path, run_config: Path | Mapping[str, Any] | None, log_path: Path,
                *, timeout_s: float = 900.0) -> tuple[int, str, float]:
        """Submit *any* Flower app with ``flwr run APP_DIR <connection>``; wait for its final status.

        ``run_config`` is a TOML file or a mapping of the app's own keys. Returns
        ``(run_id, status, wall seconds)``.

        Raises
        ------
        SimulationFailed
            If the run does not end as ``finished:completed`` (with Flower's status details).
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if run_config is not None and not isinstance(run_config, Path):
            toml_path = log_path.with_name("run_config.toml")
            toml_path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
            run_config = toml_path
        start = time.time()
        with open(log_path, "w") as log:
            proc = subprocess.run(
                [flwr_executable(), "run", str(app_dir), CONNECTION, "--stream",
                 *(["--run-config", str(run_config)] if run_config else [])],
                cwd=app_dir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                timeout=timeout_s, check=False,
            )
        wall = time.time() - start
        match = re.search(r"run (\d+)", log_path.read_text())
        if match is None:
            raise SimulationFailed(f"`flwr run` did not start a run (exit {proc.returncode}); log: {log_path}")
        run_id = int(match.group(1))
        return run_id, require_completed(run_id, self.env, log_path, CONNECTION), wall
