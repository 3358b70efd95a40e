"""A simulation on an existing two-node Ray cluster (slow, real processes).

``ray start --head`` and a second ``ray start --address ...`` on this machine, one CPU each, stand
for two machines. The launcher joins the cluster (``Federation(ray_address=...)``, Hydra
``federation.ray_address``, ``flower-focal simulate --ray-address``) instead of starting a
private Ray; with one CPU per ClientApp actor Ray must place one institution on each node, and a
watcher sees a ``ray::ClientAppActor`` process under each node's raylet. The cluster is stopped by
PID afterwards (``ray stop`` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from flower_focal.config import RunConfig
from flower_focal.simulation import Federation, _process_tree, free_port, simulate, stop_processes_under

pytestmark = pytest.mark.slow


def _cmdlines() -> dict[int, str]:
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            out[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


def _session_dir(port: int) -> Path:
    """The cluster's session directory, from its GCS server's command line."""
    for cmd in _cmdlines().values():
        if "gcs_server" in cmd and f"--gcs_server_port={port}" in cmd:
            match = re.search(r"--log_dir=(\S+)/logs", cmd)
            if match:
                return Path(match.group(1))
    raise RuntimeError(f"no GCS server on port {port}")


def _ray(tmp: Path, *args: str) -> None:
    """``ray ARGS`` with its own temporary directory: its session and its ray_current_cluster
    (which a later plain ray.init() would join) stay out of /tmp/ray."""
    ray = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_TMPDIR": str(tmp)}
    proc = subprocess.run([str(ray) if ray.exists() else "ray", *args, "--disable-usage-stats"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


class ActorWatcher(threading.Thread):
    """Counts ``ray::ClientAppActor`` processes under each raylet of the cluster while it runs."""

    def __init__(self, session: Path) -> None:
        super().__init__(daemon=True)
        self.session, self.seen, self.stop_flag = str(session), {}, threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            cmds = _cmdlines()
            raylets = [p for p, c in cmds.items() if c.split(" ", 1)[0].endswith("/raylet") and self.session in c]
            for raylet in raylets:
                actors = {p for p in _process_tree({raylet}) if cmds.get(p, "").startswith("ray::ClientAppActor")}
                self.seen.setdefault(raylet, set()).update(actors)
            time.sleep(0.3)


def test_simulation_schedules_institutions_on_both_nodes_of_a_ray_cluster(tmp_path):
    port = free_port()
    memory = "--object-store-memory=100000000"
    session, ray_tmp = None, None
    try:
        ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths are limited
        _ray(ray_tmp, "start", "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
             "--include-dashboard=false", memory)
        _ray(ray_tmp, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--num-gpus=0", memory)
        session = _session_dir(port)
        assert str(session).startswith(str(ray_tmp))
        watcher = ActorWatcher(session)
        watcher.start()
        cfg = RunConfig(num_server_rounds=1, min_available_nodes=2, seed=1, run_dir=str(tmp_path / "run"))
        result = simulate(cfg, Federation(num_supernodes=2, ray_address=f"127.0.0.1:{port}"), echo=False,
                          timeout_s=600)
        watcher.stop_flag.set()
        watcher.join()
        metrics = json.loads((result.run_dir / "metrics.json").read_text())
        assert metrics["status"] == "completed" and len(metrics["rounds"][0]["train_institutions"]) == 2
        print(json.dumps({"actors_per_raylet": {str(k): len(v) for k, v in watcher.seen.items()}}))
        assert len(watcher.seen) == 2  # the head's raylet and the second node's
        assert all(len(actors) >= 1 for actors in watcher.seen.values()), watcher.seen  # both nodes ran one
    finally:
        if session is None:
            try:
                session = _session_dir(port)
            except RuntimeError:
                session = None
        if session is not None:
            stop_processes_under(session)  # by PID: this cluster's processes only
        stop_processes_under(Path(f":{port}"))  # and those naming only its address (Ray client server)
        if ray_tmp is not None:
            shutil.rmtree(ray_tmp, ignore_errors=True)
