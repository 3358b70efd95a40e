"""A real Flower deployment on loopback: one SuperLink and N SuperNodes as OS processes.

:class:`LoopbackDeployment` starts ``flower-superlink`` and ``flower-supernode`` exactly as a
consortium would (no simulation engine), each with its own node config (data path, secret key
path, partition), submits runs with ``flwr run . <connection>``, reads their final status with
``flwr ls`` and stops every process by PID. ``flower-focal deploy-local`` (a quick way to try a
deployment on one machine) is built on it; the deployment tests and benchmarks use it too.

Secure by default: a throw-away consortium PKI (:mod:`flower_focal.pki`) is made and handed out
as a real consortium would hand it out (``superlink-tls/``: CA certificate, SuperLink
certificate and TLS key, the SuperNodes' *public* keys; ``supernodeI/``: CA certificate and
node I's private key; the CA key is discarded). The SuperLink serves HTTPS with
``--enable-supernode-auth``; every SuperNode's public key is registered with
``flwr supernode register`` before it starts with ``--root-certificates`` and
``--auth-supernode-private-key``; the ``flwr`` CLI connection uses ``root-certificates``.
``insecure=True`` gives a plaintext, open-registration deployment (an explicit opt-out)::

    with LoopbackDeployment(node_configs=[{"data-path": "/data/a.npz"}, {"data-path": "/data/b.npz"}]) as dep:
        result = dep.run(RunConfig(strategy="fedavg", dataset="medmnist", run_dir="/tmp/run"))
"""

from __future__ import annotations

import json
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

from flower_focal import pki
from flower_focal.config import RunConfig
from flower_focal.simulation import (
    SimulationFailed,
    SimulationResult,
    flower_env,
    flwr_executable,
    free_port,
    repo_root,
    require_completed,
    write_run_config,
)

CONNECTION = "loopback"
SERVER_TLS_DIR = "superlink-tls"  # the SuperLink host's TLS material (and registered public keys)


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
        Where logs and the Flower home go (a temporary directory when omitted). Everything in it
        is the SuperLink host's, except ``supernodeI*`` (institution I's log and keys).
    insecure
        ``True``: plaintext HTTP and open SuperNode registration (``--insecure`` everywhere).
        Default ``False``: TLS + SuperNode authentication.
    """

    def __init__(self, node_configs: Sequence[Mapping[str, Any]], workdir: Path | None = None,
                 *, insecure: bool = False) -> None:
        if not node_configs:
            raise ValueError("a deployment needs at least one SuperNode")
        self.node_configs = [dict(c) for c in node_configs]
        self.insecure = insecure
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="flower-focal-deploy-"))
        self.flwr_home = self.workdir / "flwr-home"
        self.port = free_port()
        self.env = flower_env(self.flwr_home)
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen | None] = []
        self.node_ids: list[int | None] = [None] * len(self.node_configs)  # registered ids (secure)

    # ------------------------------------------------------------------ PKI (secure mode)
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def server_tls(self) -> Path:
        return self.workdir / SERVER_TLS_DIR

    @property
    def ca_cert(self) -> Path:
        """The consortium CA certificate, as the SuperLink host holds it."""
        return self.server_tls / pki.CA_CERT

    def node_dir(self, index: int) -> Path:
        """Institution ``index``'s own directory: its copy of the CA certificate and its key."""
        return self.workdir / f"supernode{index}"

    def node_key(self, index: int) -> Path:
        """SuperNode ``index``'s authentication private key (institution side only)."""
        return self.node_dir(index) / f"node-{index}"

    def node_private_keys(self) -> list[Path]:
        """Every SuperNode's authentication private key (none when insecure)."""
        return [] if self.insecure else [self.node_key(i) for i in range(len(self.node_configs))]

    def _make_pki(self) -> None:
        """Issue the consortium PKI elsewhere and hand each party only its share."""
        issuing = Path(tempfile.mkdtemp(prefix="flower-focal-ca-"))
        try:
            made = pki.make_consortium(issuing, len(self.node_configs))
            pki.verify_sha256sums(made.root)
            self.server_tls.mkdir(parents=True, exist_ok=True)
            for src in (made.ca_cert, made.server_cert, made.server_key):
                shutil.copy2(src, self.server_tls / src.name)
            (self.server_tls / pki.NODES_DIR).mkdir(exist_ok=True)
            for i, (private, public) in enumerate(zip(made.node_keys, made.node_public_keys, strict=True)):
                shutil.copy2(public, self.server_tls / pki.NODES_DIR / public.name)
                self.node_dir(i).mkdir(parents=True, exist_ok=True)
                shutil.copy2(made.ca_cert, self.node_dir(i) / pki.CA_CERT)
                shutil.copy2(private, self.node_key(i))
        finally:
            shutil.rmtree(issuing, ignore_errors=True)  # the CA key goes with it

    def register_node(self, public_key: Path) -> int:
        """``flwr supernode register KEY.pub <connection>`` (the SuperLink operator's step)."""
        proc = subprocess.run([flwr_executable(), "supernode", "register", str(public_key), CONNECTION,
                               "--format", "json"], env=self.env, capture_output=True, text=True,
                              timeout=120, check=False)
        out = proc.stdout[proc.stdout.find("{"):] if "{" in proc.stdout else ""
        try:
            reply = json.loads(out)
        except json.JSONDecodeError:
            reply = {}
        if proc.returncode != 0 or not reply.get("success"):
            raise RuntimeError(f"could not register {public_key}: {proc.stdout}{proc.stderr}")
        return int(reply["node-id"])

    def registered_nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode ls <connection>``: every node the SuperLink knows, with its status."""
        proc = subprocess.run([flwr_executable(), "supernode", "ls", CONNECTION, "--format", "json"],
                              env=self.env, capture_output=True, text=True, timeout=120, check=False)
        out = proc.stdout[proc.stdout.find("{"):] if "{" in proc.stdout else "{}"
        reply = json.loads(out)
        if not reply.get("success"):
            raise RuntimeError(f"flwr supernode ls failed: {proc.stdout}{proc.stderr}")
        return list(reply["nodes"])

    # ------------------------------------------------------------------ processes
    def _spawn(self, cmd: list[str], log_name: str, env: Mapping[str, str] | None = None
               ) -> subprocess.Popen:
        log = open(self.workdir / log_name, "ab")  # noqa: SIM115 (kept open for the process)
        return subprocess.Popen(cmd, env=dict(env or self.env), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self) -> LoopbackDeployment:
        """Start the SuperLink; register every SuperNode's key (secure); start the SuperNodes and
        wait until each is connected; register the CLI connection. On failure every process
        started so far is stopped before the error propagates."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> LoopbackDeployment:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        if self.insecure:
            tls = ["--insecure"]
            connection = "insecure = true"
        else:
            self._make_pki()
            tls = ["--ssl-certfile", str(self.server_tls / pki.SERVER_CERT),
                   "--ssl-keyfile", str(self.server_tls / pki.SERVER_KEY),
                   "--ssl-ca-certfile", str(self.ca_cert), "--enable-supernode-auth"]
            connection = f"root-certificates = {json.dumps(str(self.ca_cert.resolve()))}"
        self.superlink = self._spawn(
            ["flower-superlink", *tls, "--host", "127.0.0.1", "--port", str(self.port),
             "--disable-runtime-dependency-installation",
             "--database", str(self.workdir / "state.db")],
            "superlink.log",
        )
        with open(self.flwr_home / "config.toml", "a") as fh:
            fh.write(f'\n[superlink.{CONNECTION}]\naddress = "{self.address}"\n{connection}\n')
        self._wait_for_superlink()
        if not self.insecure:
            self.node_ids = [self.register_node(self.server_tls / pki.NODES_DIR / f"node-{i}.pub")
                             for i in range(len(self.node_configs))]
        self.supernodes = [self._start_node(i) for i in range(len(self.node_configs))]
        for i in range(len(self.node_configs)):
            self._wait_for_node(i)
        return self

    def spawn_supernode(self, log_name: str, node_config: Mapping[str, Any], *,
                        root_certificates: Path | None = None, private_key: Path | None = None,
                        insecure: bool = False) -> subprocess.Popen:
        """Start one ``flower-supernode`` against this SuperLink with the given credentials
        (also how a test plays a stranger: an unregistered key, or no trust in the CA)."""
        creds = ["--insecure"] if insecure else [
            *(["--root-certificates", str(root_certificates)] if root_certificates else []),
            *(["--auth-supernode-private-key", str(private_key)] if private_key else []),
        ]
        return self._spawn(
            ["flower-supernode", *creds, "--superlink", self.address, "--port", str(free_port()),
             "--node-config", _node_config_string(node_config)],
            log_name, self.node_env(),
        )

    def node_env(self) -> dict[str, str]:
        """A SuperNode's environment: the deployment's, with its share of this host's cores.

        Every SuperNode here shares one machine, and each ClientApp process would otherwise
        start as many torch/OpenMP threads as the host has cores: N nodes training at once
        oversubscribe the cores and spin-waiting threads slow local training many times over
        (30x measured with 2 nodes on 2 cores). Each node gets ``cores // N`` threads (at
        least 1), as Ray gives a simulated node its ``num_cpus``; an ``OMP_NUM_THREADS`` the
        user set wins.
        """
        env = dict(self.env)
        share = max(1, (os.cpu_count() or 1) // max(1, len(self.node_configs)))
        env.setdefault("OMP_NUM_THREADS", str(share))
        return env

    def _start_node(self, index: int) -> subprocess.Popen:
        if self.insecure:
            return self.spawn_supernode(f"supernode{index}.log", self.node_configs[index], insecure=True)
        return self.spawn_supernode(f"supernode{index}.log", self.node_configs[index],
                                    root_certificates=self.node_dir(index) / pki.CA_CERT,
                                    private_key=self.node_key(index))

    def _wait_for_node(self, index: int, timeout_s: float = 120.0, log_offset: int = 0) -> bool:
        """Wait until SuperNode ``index`` reports its node ID; False if it exited first."""
        log = self.workdir / f"supernode{index}.log"
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if "SuperNode ID:" in log.read_bytes()[log_offset:].decode(errors="replace"):
                return True
            proc = self.supernodes[index]
            if proc is None or proc.poll() is not None:
                return False
            time.sleep(0.3)
        raise RuntimeError(f"SuperNode {index} did not connect in {timeout_s:.0f} s; see {log}")

    def _wait_for_superlink(self, timeout_s: float = 60.0) -> None:
        import ssl

        import httpx

        scheme, verify = ("http", True) if self.insecure else (
            "https", ssl.create_default_context(cafile=str(self.ca_cert)))
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited; see {self.workdir / 'superlink.log'}")
            try:
                if httpx.get(f"{scheme}://{self.address}/health", timeout=1.0, verify=verify).is_success:
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

    def restart_node(self, index: int, timeout_s: float = 180.0) -> None:
        """Start a SuperNode again with its original node config (a site that rejoins) and wait
        until it is connected.

        With authentication the node keeps its registered node ID, and the SuperLink only
        re-activates it once it counts as offline (missed heartbeats after a SIGKILL): a
        refused activation is retried until ``timeout_s``.
        """
        self.kill_node(index)
        log = self.workdir / f"supernode{index}.log"
        deadline = time.time() + timeout_s
        while True:
            offset = log.stat().st_size if log.exists() else 0
            self.supernodes[index] = self._start_node(index)
            if self._wait_for_node(index, max(1.0, deadline - time.time()), log_offset=offset):
                return
            if time.time() > deadline:
                raise RuntimeError(f"SuperNode {index} could not rejoin in {timeout_s:.0f} s; see {log}")
            time.sleep(3.0)

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
            run_config = write_run_config(run_config, log_path.with_name("run_config.toml"))
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
