"""``flower-focal stop-local``: real processes, no mocks (slow). ``deploy-local`` runs as the README
writes it in ``tests/test_readme_commands.py``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flower_focal.simulation import (
    Federation,
    flower_env,
    flwr_executable,
    processes_mentioning,
    repo_root,
    write_run_config,
)

pytestmark = pytest.mark.slow




def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flower_focal.cli", *args], cwd=repo_root(), env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_stop_local_stops_the_superlink_a_plain_flwr_run_leaves_running(tmp_path):
    home = tmp_path / "flwr-home"
    env = flower_env(home)
    config = write_run_config({"num-server-rounds": 1, "run-dir": str(tmp_path / "run")}, tmp_path / "run.toml")
    proc = subprocess.run([flwr_executable(), "run", str(repo_root()), "--stream", "--run-config", str(config),
                           "--federation-config", Federation(num_supernodes=2).to_flower()],
                          cwd=repo_root(), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:]
    marker = str(home / "local-superlink")
    try:
        assert processes_mentioning(marker), "flwr run no longer leaves its local SuperLink running"
        out = _cli("stop-local", "--flwr-home", str(home))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["processes_stopped"] >= 1
        assert processes_mentioning(marker) == []
    finally:
        from flower_focal.simulation import stop_processes_under

        stop_processes_under(home)


def test_each_loopback_supernode_gets_its_share_of_the_cores(tmp_path, monkeypatch) -> None:
    """N SuperNodes on one host must not each start a thread per core (oversubscribed OpenMP
    threads made local training 30x slower with 2 nodes on 2 cores)."""
    import os

    from flower_focal.deployment import LoopbackDeployment

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    dep = LoopbackDeployment([{}, {}, {}], workdir=tmp_path / "dep")
    assert dep.node_env()["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 3))
    assert "OMP_NUM_THREADS" not in dep.env  # the SuperLink's own processes are not limited
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert LoopbackDeployment([{}], workdir=tmp_path / "d2").node_env()["OMP_NUM_THREADS"] == "7"
