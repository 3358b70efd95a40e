"""Run a flower-focal app in Flower's simulation engine (Ray) through ``flwr run``, safely.

``flwr run . --stream`` exits 0 even when the run fails and leaves a local SuperLink daemon
running on shared ports. :func:`simulate` wraps it:

* a private ``FLWR_HOME`` and free ports, so runs never collide with each other or a user's
  own Flower setup;
* Flower's runtime ``uv sync`` of app dependencies disabled (the library is pip-installed);
* the run's final status read back with ``flwr ls --format json``: anything but
  ``finished:completed`` raises :class:`SimulationFailed` naming the status and the log;
* the managed SuperLink (and its SuperExec/Ray children) stopped afterwards;
* for HE strategies without ``he-key-dir``: a temporary key set for the run (this process
  plays the institutions' key holder), and the encrypted final model decrypted into
  ``model.pt`` afterwards; the server side only ever gets ``public.ctx``.

Used by the Hydra launcher (``python -m simulations.run``), the benchmarks and the tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flower_focal.artifacts import ENCRYPTED_FILE, MODEL_FILE, decrypt_model
from flower_focal.config import RunConfig
from flower_focal.strategy.specs import STRATEGY_SPECS, strategy_spec

KEYED_STRATEGIES = frozenset(n for n, s in STRATEGY_SPECS.items() if s.keyed)  # institutions share an HE key


def key_preset(cfg: RunConfig) -> str:
    """The preset of the launcher's temporary key set (FOCAL needs a FOCAL preset)."""
    from flower_focal.crypto import FOCAL_PRESETS

    if strategy_spec(cfg.strategy).focal_keys and cfg.he_preset not in FOCAL_PRESETS:
        return "focal"
    return cfg.he_preset


class SimulationFailed(RuntimeError):
    """A ``flwr run`` that did not finish as ``finished:completed``."""


@dataclass(frozen=True)
class Federation:
    """Simulation engine settings (Flower's federation config for the local SuperLink)."""

    num_supernodes: int = 5
    client_cpus: int = 1
    client_gpus: float = 0.0
    ray_num_cpus: int | None = None  # Ray's own CPU budget (None: all cores)
    ray_num_gpus: int | None = None
    ray_address: str | None = None  # an existing Ray cluster ("HOST:PORT" of its head); None: a private one

    def __post_init__(self) -> None:
        if self.ray_address and (self.ray_num_cpus is not None or self.ray_num_gpus is not None):
            raise ValueError("ray_num_cpus / ray_num_gpus size a Ray instance flower-focal starts; with "
                             f"ray_address={self.ray_address!r} the cluster's own nodes give the resources")

    def ray_env(self) -> dict[str, str]:
        """Environment that makes Flower's ``ray.init()`` join :attr:`ray_address` or start a
        private Ray. Without it ``ray.init()`` joins the cluster of the last ``ray start`` on
        this machine (``/tmp/ray/ray_current_cluster``; a dead one hangs the run)."""
        return {"RAY_ADDRESS": self.ray_address or "local"}

    def to_flower(self) -> str:
        """The ``--federation-config`` string."""
        if self.num_supernodes < 1:
            raise ValueError(f"num_supernodes must be >= 1, got {self.num_supernodes}")
        if self.client_cpus < 1:
            raise ValueError("client_cpus must be a whole number >= 1 (a flwr run limit)")
        items = [
            f"num-supernodes={self.num_supernodes}",
            f"client-resources-num-cpus={int(self.client_cpus)}",
            f"client-resources-num-gpus={float(self.client_gpus)}",
            "init-args-log-to-driver=false",
            "init-args-logging-level='ERROR'",
            "backend='ray'",
        ]
        if self.ray_num_cpus is not None:
            items.append(f"init-args-num-cpus={int(self.ray_num_cpus)}")
        if self.ray_num_gpus is not None:
            items.append(f"init-args-num-gpus={int(self.ray_num_gpus)}")
        return " ".join(items)


@dataclass(frozen=True)
class SimulationResult:
    """Outcome of one :func:`simulate` call."""

    run_id: int
    status: str
    run_dir: Path
    wall_time_s: float
    log_path: Path

    def metrics(self) -> dict[str, Any]:
        """The run's ``metrics.json``."""
        return json.loads((self.run_dir / "metrics.json").read_text())


def repo_root() -> Path:
    """The Flower app directory: the checkout's root, or (installed wheel) a generated one.

    A checkout has ``pyproject.toml`` with ``[tool.flwr.app]`` next to the package; an installed
    wheel has none, so a minimal app directory pointing at :mod:`flower_focal.apps` is written
    (its run-config table is :meth:`RunConfig.pyproject_table`).
    """
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text():
        return root
    return packaged_app_dir()


def packaged_app_dir(where: Path | None = None) -> Path:
    """Write a Flower app directory whose ServerApp/ClientApp are :mod:`flower_focal.apps`."""
    from flower_focal import __version__

    app = Path(where or tempfile.mkdtemp(prefix="flower-focal-app-"))
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        f'[project]\nname = "flower-focal-app"\nversion = "{__version__}"\n'
        'description = "flower-focal\'s own Flower app (the library must be installed)"\n'
        "dependencies = []\n\n"
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "flower-focal"\n\n'
        '[tool.flwr.app.components]\nserverapp = "flower_focal.apps:server_app"\n'
        'clientapp = "flower_focal.apps:client_app"\n\n'
        "[tool.flwr.app.config]\n" + RunConfig.pyproject_table())
    (app / "README.md").write_text("flower-focal's own Flower app, generated by flower_focal.simulation.\n")
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def write_run_config(cfg: RunConfig | Mapping[str, Any], path: Path) -> Path:
    """Write a run config (a :class:`RunConfig` or any app's key -> value mapping) as the TOML
    file ``flwr run --run-config`` accepts."""
    values = cfg.to_flower() if isinstance(cfg, RunConfig) else cfg
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))
    return path


RAY_ACCEL_TIP_FILTER = "ignore::FutureWarning:ray._private.worker"
NOISE = (
    # Flower 1.42 logs this in every simulation, whatever num-supernodes says (we always set it).
    "Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.",
)
"""Lines of Flower's log stream that say nothing about this run: kept in ``flwr.log``, not echoed."""


SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
"""Flower's environment variable: seconds between a SuperExec's requests for work (default 1)."""
SUPEREXEC_POLL_S = "0.2"


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for ``flwr``: private home and ports, no runtime installs, no telemetry."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    # Every SuperExec (one per SuperNode, one beside the SuperLink) asks for work once a second
    # by default: up to 1 s before each ClientApp/ServerApp process starts. 0.2 s costs a few
    # milliseconds of CPU per second and keeps that wait short; a value the user set wins.
    env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S)
    # Ray's FutureWarning about a default it will change (CUDA_VISIBLE_DEVICES with num_gpus=0)
    # is printed by every run; keep today's behaviour (CPU-only actors see no GPU), not the tip.
    warnings = [w for w in env.get("PYTHONWARNINGS", "").split(",") if w]
    env["PYTHONWARNINGS"] = ",".join([*warnings, RAY_ACCEL_TIP_FILTER])
    # The ServerApp/ClientApps are started from PATH: make sure it is this interpreter's.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def flwr_executable() -> str:
    exe = Path(sys.executable).parent / "flwr"
    return str(exe) if exe.exists() else "flwr"


def _process_tree(roots: set[int]) -> list[int]:
    """``roots`` and all their descendants (from /proc), children after parents."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    order, stack = [], sorted(roots)
    while stack:
        pid = stack.pop(0)
        if pid not in order:
            order.append(pid)
            stack.extend(children.get(pid, []))
    return order


def processes_mentioning(marker: str) -> list[int]:
    """PIDs (not this one) whose command line contains ``marker`` (from /proc)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (proc / "cmdline").read_bytes() and int(proc.name) != os.getpid():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def stop_processes_under(flwr_home: Path, grace_s: float = 10.0) -> int:
    """SIGTERM (then SIGKILL) every process whose command line mentions ``flwr_home``, and
    all their descendants.

    That is the managed local SuperLink started for this run and everything it started
    (SuperExec, the simulation runtime with the ServerApp, Ray). Returns the number of
    processes signalled.
    """
    pids = [p for p in _process_tree(set(processes_mentioning(str(flwr_home)))) if p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def run_status(run_id: int, env: dict[str, str], connection: str | None = None) -> dict[str, Any]:
    """The run's entry of ``flwr ls --format json`` (keys: status, status-details, ...)."""
    out = subprocess.run(
        [flwr_executable(), "ls", *([connection] if connection else []), "--run-id", str(run_id),
         "--format", "json"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    try:
        runs = json.loads(out.stdout)["runs"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise SimulationFailed(f"`flwr ls` gave no run status: {out.stdout}{out.stderr}") from exc
    return runs[0]


def require_completed(run_id: int, env: dict[str, str], log_path: Path,
                      connection: str | None = None) -> str:
    """Read the run's final status; raise :class:`SimulationFailed` unless it completed."""
    entry = run_status(run_id, env, connection)
    status = str(entry.get("status", "unknown"))
    if status != "finished:completed":
        details = entry.get("status-details") or entry
        raise SimulationFailed(f"run {run_id} ended as {status!r}: {details}; log: {log_path}")
    return status


def simulate(
    cfg: RunConfig,
    federation: Federation,
    *,
    app_dir: Path | None = None,
    timeout_s: float | None = None,
    echo: bool = True,
    flwr_home: Path | None = None,
    check: bool = True,
) -> SimulationResult:
    """Run ``cfg`` in Flower's Ray simulation engine with ``federation`` institutions.

    ``cfg.run_dir`` must be set (the ServerApp writes there); it also receives
    ``run_config.toml``, ``flwr.log`` (the streamed run log) and ``superlink.log``.
    ``flwr_home`` (default: a new temporary directory, removed afterwards) is where Flower
    keeps its state; every process of the run carries it on its command line. ``check``
    (default) runs :func:`flower_focal.preflight.preflight` first.

    Raises
    ------
    flower_focal.preflight.PreflightError
        Before anything is started, if the settings, data or keys cannot work
        (:func:`flower_focal.preflight.preflight`).
    SimulationFailed
        If the run ends in any state but ``finished:completed`` (or times out).
    """
    if not cfg.run_dir:
        raise ValueError("simulate() needs cfg.run_dir (where the run directory goes)")
    if check:
        _preflight(cfg, federation, echo)
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    cfg = cfg.replace(run_dir=str(run_dir))
    app_dir = app_dir or repo_root()
    cfg, key_dir = _with_run_keys(cfg)
    toml_path = write_run_config(cfg, run_dir / "run_config.toml")
    try:
        run_id, status, wall = run_app(app_dir, toml_path, federation, run_dir / "flwr.log",
                                       timeout_s=timeout_s, echo=echo, flwr_home=flwr_home,
                                       superlink_log=run_dir / "superlink.log")
        _decrypt_final_model(cfg, run_dir, echo)
        return SimulationResult(run_id, status, run_dir, wall, run_dir / "flwr.log")
    finally:
        if key_dir is not None:
            shutil.rmtree(key_dir, ignore_errors=True)


def _preflight(cfg: RunConfig, federation: Federation, echo: bool) -> None:
    """:func:`flower_focal.preflight.preflight` (``PreflightError`` before Flower starts)."""
    from flower_focal.preflight import preflight

    report = preflight(cfg, federation.num_supernodes)
    if echo:
        print(f"flower-focal: {report.summary()}\n{report.institutions_table()}")


def _with_run_keys(cfg: RunConfig) -> tuple[RunConfig, Path | None]:
    """A keyed strategy without ``he-key-dir``: a fresh key set for this run only.

    In a simulation this process plays the institutions' key holder; the keys live in a private
    temporary directory (never in the run directory), returned so the caller removes it.
    """
    if cfg.strategy not in KEYED_STRATEGIES or cfg.he_key_dir:
        return cfg, None
    from flower_focal.crypto import keygen

    key_dir = keygen(Path(tempfile.mkdtemp(prefix="flower-focal-keys-")), key_preset(cfg))
    return cfg.replace(he_key_dir=str(key_dir)), key_dir


def _decrypt_final_model(cfg: RunConfig, run_dir: Path, echo: bool) -> None:
    """Decrypt the server's ``model.he`` into ``model.pt`` with the institutions' key."""
    if not ((run_dir / ENCRYPTED_FILE).exists() and cfg.he_key_dir):
        return
    decrypt_model(run_dir, cfg.he_key_dir)
    if echo:
        print(f"flower-focal: decrypted the final global model with the institutions' key "
              f"into {run_dir / MODEL_FILE} (the server only ever held {ENCRYPTED_FILE})")


def run_app(
    app_dir: Path,
    run_config: Path | dict[str, Any] | None,
    federation: Federation,
    log_path: Path,
    *,
    timeout_s: float | None = None,
    echo: bool = True,
    flwr_home: Path | None = None,
    superlink_log: Path | None = None,
) -> tuple[int, str, float]:
    """``flwr run APP_DIR --stream`` for *any* Flower app in the simulation engine, safely.

    ``run_config`` is a TOML file or a mapping of the app's own keys (written next to
    ``log_path``). Returns ``(run_id, status, wall seconds)``; the managed SuperLink and
    everything it started are stopped afterwards.

    Raises
    ------
    SimulationFailed
        If the run ends in any state but ``finished:completed`` (the message carries Flower's
        status details, i.e. the ServerApp's exception) or times out.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(run_config, Mapping):
        run_config = write_run_config(run_config, log_path.with_name("run_config.toml"))
    flwr_home = Path(flwr_home or tempfile.mkdtemp(prefix="flower-focal-home-"))
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = flower_env(flwr_home)
    env.update(federation.ray_env())
    cmd = [flwr_executable(), "run", str(app_dir), "--stream",
           *(["--run-config", str(run_config)] if run_config else []),
           "--federation-config", federation.to_flower()]
    start = time.time()
    try:
        run_id, returncode = _stream_run(cmd, app_dir, env, log_path, echo, timeout_s, start)
        wall = time.time() - start
        if run_id is None:
            raise SimulationFailed(f"`flwr run` did not start a run (exit {returncode}); log: {log_path}")
        return run_id, require_completed(run_id, env, log_path), wall
    finally:
        _stop_flower_home(flwr_home, superlink_log)


def _stream_run(cmd: list[str], app_dir: Path, env: dict[str, str], log_path: Path, echo: bool,
                timeout_s: float | None, start: float) -> tuple[int | None, int]:
    """Run ``flwr run --stream``, copying its output to ``log_path`` (and, without Flower's
    noise, to stdout); return the run ID it announced (None: none) and its exit code."""
    run_id: int | None = None
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=app_dir, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        for line in proc.stdout or ():
            log_file.write(line)
            if echo and not any(noise in line for noise in NOISE):
                sys.stdout.write(line)
            if run_id is None and (m := re.search(r"run (\d+)", line)):
                run_id = int(m.group(1))
            if timeout_s is not None and time.time() - start > timeout_s:
                proc.kill()
                raise SimulationFailed(f"simulation exceeded {timeout_s:.0f} s; log: {log_path}")
        proc.wait()
    return run_id, proc.returncode


def _stop_flower_home(flwr_home: Path, superlink_log: Path | None) -> None:
    """Stop every process of ``flwr_home``, keep the SuperLink's log, remove the directory."""
    stop_processes_under(flwr_home)
    link_log = flwr_home / "local-superlink" / "superlink.log"
    if superlink_log is not None and link_log.exists():
        shutil.copy(link_log, superlink_log)
    shutil.rmtree(flwr_home, ignore_errors=True)
