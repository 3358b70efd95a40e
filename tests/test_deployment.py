"""Real Flower deployment on loopback: flower-superlink + flower-supernode processes, `flwr run`.

Every deployment here is the secure default: HTTPS with a consortium CA and SuperNode
authentication (registered public keys). Slow (the SuperLink and SuperNodes poll every 3 s):
~1 min per run. Still run in CI.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch

from flower_focal.artifacts import decrypt_model
from flower_focal.config import RunConfig
from flower_focal.crypto import keygen, server_share
from flower_focal.deployment import LoopbackDeployment
from flower_focal.simulation import flwr_executable
from tests.conftest import write_synthetic_npz

pytestmark = pytest.mark.slow


def _keyset(tmp_path_factory, preset: str) -> tuple[Path, Path]:
    """Keygen output (institutions) and the server host's copy: public.ctx + manifest only."""
    keys = keygen(tmp_path_factory.mktemp(f"institution-keys-{preset}"), preset)
    return keys, server_share(keys, tmp_path_factory.mktemp(f"server-keys-{preset}"))


def _secret_key_bytes(secret_file: Path) -> bytes:
    """The ``secret_key`` section of a key file, parsed from the documented layout (not the
    whole file: secret.ctx also holds parameters and, for FOCAL, evaluation keys that
    public.ctx legitimately shares)."""
    data = secret_file.read_bytes()
    assert data[:4] == b"FFHK"
    (meta_len,) = struct.unpack_from("<I", data, 6)
    pos = 10 + meta_len
    (count,) = struct.unpack_from("<H", data, pos)
    pos += 2
    sections = {}
    for _ in range(count):
        name_len = data[pos]
        name = data[pos + 1 : pos + 1 + name_len].decode()
        (size,) = struct.unpack_from("<Q", data, pos + 1 + name_len)
        pos += 9 + name_len
        sections[name] = data[pos : pos + size]
        pos += size
    assert "secret_key" in sections and len(sections["secret_key"]) > 1000, sorted(sections)
    return sections["secret_key"]


def _node_key_probes(node_key: Path) -> list[bytes]:
    """Pieces of a SuperNode's authentication private key as they could leak: the raw P-384
    scalar, its hex, lines of the OpenSSH file and of the same key re-encoded as PKCS#8 PEM."""
    from cryptography.hazmat.primitives import serialization

    text = node_key.read_bytes()
    key = serialization.load_ssh_private_key(text, password=None)
    scalar = key.private_numbers().private_value.to_bytes(48, "big")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    body = [line for line in text.splitlines() if line and not line.startswith(b"-----")]
    pem_body = [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
    return [scalar[:24], scalar[24:], scalar.hex().encode(), body[len(body) // 2], body[-1], pem_body[1]]


def server_side_files(run_dir: Path, server_keys: Path, deployment) -> list[Path]:
    """The run directory, the server's HE key directory and the whole deployment workdir except
    what belongs to an institution (``supernodeI.log``, ``supernodeI/``: its keys)."""
    workdir = deployment.workdir
    deployment_side = (p for p in workdir.rglob("*")
                       if not p.relative_to(workdir).parts[0].startswith("supernode"))
    return [p for p in [*run_dir.rglob("*"), *server_keys.rglob("*"), *deployment_side] if p.is_file()]


def assert_server_side_never_saw_the_secret_key(keys: Path, server_keys: Path, run_dir: Path,
                                                deployment: LoopbackDeployment) -> int:
    """Scan every server-side file for pieces of the HE secret key and of every SuperNode's
    authentication private key; returns the files scanned.

    Server side: the run directory (outputs, checkpoint, run config, `flwr run` log), the
    server's key directory, and everything of the SuperLink (log, state.db, its FLWR_HOME with
    the installed app, its TLS directory with the registered public keys) -- all of the
    deployment's workdir except the SuperNodes' own logs and key directories.
    """
    secret = _secret_key_bytes(keys / "secret.ctx")
    probes = [secret[i : i + 48] for i in (0, len(secret) // 3, len(secret) // 2, len(secret) - 48)]
    probes += [p.hex().encode() for p in probes]
    node_keys = deployment.node_private_keys()
    for node_key in node_keys:
        assert node_key.is_file()
        probes += _node_key_probes(node_key)
    files = server_side_files(run_dir, server_keys, deployment)
    workdir = deployment.workdir
    assert workdir / "superlink.log" in files and workdir / "state.db" in files
    assert not any(f in files for f in node_keys)
    for path in files:
        blob = path.read_bytes()
        for probe in probes:
            assert probe not in blob, path
    assert str(keys) not in (run_dir / "run_config.toml").read_text()
    return len(files)


@pytest.fixture(scope="module")
def site_keys(tmp_path_factory):
    return _keyset(tmp_path_factory, "compact")


@pytest.fixture(scope="module")
def site_data(tmp_path_factory):
    return write_synthetic_npz(tmp_path_factory.mktemp("data") / "site.npz", sizes=(160, 40, 40))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, site_keys, site_data):
    keys, _ = site_keys
    data = site_data
    nodes = [
        {"partition-id": i, "num-partitions": 2, "data-path": str(data), "he-secret-key": str(keys / "secret.ctx")}
        for i in range(2)
    ]
    with LoopbackDeployment(nodes, workdir=tmp_path_factory.mktemp("deploy")) as dep:
        yield dep


def _cfg(tmp_path, strategy, **kw):
    return RunConfig(strategy=strategy, dataset="medmnist", image_size=28, num_server_rounds=2,
                     min_available_nodes=2, seed=3, run_dir=str(tmp_path / strategy), **kw)


def test_fedavg_runs_on_real_superlink_and_supernodes(deployment, tmp_path):
    result = deployment.run(_cfg(tmp_path, "fedavg"))
    metrics = result.metrics()
    assert metrics["status"] == "completed"
    assert [len(r["train_institutions"]) for r in metrics["rounds"]] == [2, 2]
    assert (result.run_dir / "model.pt").is_file()
    # ... over TLS, with SuperNode authentication: both nodes are the registered ones
    superlink_log = (deployment.workdir / "superlink.log").read_text()
    assert "Uvicorn running on https://" in superlink_log
    assert "SuperNode authentication is disabled" not in superlink_log
    online = {int(n["node-id"]) for n in deployment.registered_nodes() if n["status"] == "online"}
    assert online == set(deployment.node_ids) and len(online) == 2
    # each institution logs its own size and class histogram in its SuperNode's log
    for index in range(2):
        node_log = (deployment.workdir / f"supernode{index}.log").read_text()
        assert re.search(rf"institution {index}/2 \(medmnist, \w+\): \d+ train, \d+ val; train histogram \[",
                         node_log), node_log[-2000:]


def _wait_exit(proc, timeout_s: float = 180.0) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_an_unregistered_supernode_is_refused_and_never_receives_a_message(deployment, tmp_path):
    """Valid TLS (trusts the CA), but a key the SuperLink operator never registered: activation
    is refused, the process exits, it never gets a node ID or a message. At the protocol level,
    its signed Fleet requests for a registered node's ID are rejected (401), while the same
    request signed with that node's own key is served."""
    import httpx
    from cryptography.hazmat.primitives import serialization
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    from flower_focal.pki import make_node_key

    stranger_key, _ = make_node_key(tmp_path / "stranger" / "node-x")
    proc = deployment.spawn_supernode("supernode-stranger.log", deployment.node_configs[0],
                                      root_certificates=deployment.ca_cert, private_key=stranger_key)
    assert _wait_exit(proc) != 0
    log = (deployment.workdir / "supernode-stranger.log").read_text()
    assert "Failed to activate SuperNode" in log
    assert "SuperNode ID:" not in log and "[RUN" not in log  # never joined, never got a message
    assert "No SuperNode found with the given public key" in (deployment.workdir / "superlink.log").read_text()
    known = {int(n["node-id"]) for n in deployment.registered_nodes() if n["status"] != "unregistered"}
    assert known == set(deployment.node_ids)  # the refused key left no node behind

    def pull_as(private_key_path):
        key = serialization.load_ssh_private_key(private_key_path.read_bytes(), password=None)
        client = FleetHttpClient.from_server_address(
            deployment.address, False, str(deployment.ca_cert),
            interceptors=[NodeAuthHttpInterceptor(key, key.public_key())])
        return client.PullMessages(PullMessagesRequest(node=Node(node_id=deployment.node_ids[0])))

    with pytest.raises(httpx.HTTPStatusError) as refused:
        pull_as(stranger_key)
    assert refused.value.response.status_code == 401
    assert list(pull_as(deployment.node_key(0)).messages_list) == []  # the owner is served (no run now)


def test_a_supernode_that_does_not_trust_the_ca_cannot_connect(deployment, tmp_path):
    """A registered key, but no ``--root-certificates`` (only the system trust store): the TLS
    handshake fails before any request. Control: the same key with the CA connects."""
    from flower_focal.pki import make_node_key

    key, public = make_node_key(tmp_path / "site-c" / "node-c")
    node_id = deployment.register_node(public)
    proc = deployment.spawn_supernode("supernode-untrusting.log", deployment.node_configs[0], private_key=key)
    assert _wait_exit(proc) != 0
    log = (deployment.workdir / "supernode-untrusting.log").read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in log and "SuperNode ID:" not in log
    status = {int(n["node-id"]): n["status"] for n in deployment.registered_nodes()}
    assert status[node_id] == "registered"  # never activated

    proc = deployment.spawn_supernode("supernode-trusting.log", deployment.node_configs[0],
                                      root_certificates=deployment.ca_cert, private_key=key)
    try:
        log = deployment.workdir / "supernode-trusting.log"
        deadline = time.time() + 120
        while time.time() < deadline and "SuperNode ID:" not in log.read_text() and proc.poll() is None:
            time.sleep(0.5)
        assert f"SuperNode ID: {node_id}" in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # graceful: the node deactivates itself
        _wait_exit(proc, 30)
    subprocess.run([flwr_executable(), "supernode", "unregister", str(node_id), "loopback"],
                   env=deployment.env, capture_output=True, timeout=120, check=True)
    status = {int(n["node-id"]): n["status"] for n in deployment.registered_nodes()}
    assert status.get(node_id, "unregistered") == "unregistered"
    # revoked: the same key, trusting the CA, no longer gets in (the README's key rotation step)
    proc = deployment.spawn_supernode("supernode-revoked.log", deployment.node_configs[0],
                                      root_certificates=deployment.ca_cert, private_key=key)
    assert _wait_exit(proc) != 0
    log = (deployment.workdir / "supernode-revoked.log").read_text()
    assert "Failed to activate SuperNode" in log and "SuperNode ID:" not in log


def test_known_limit_the_control_api_registers_a_key_for_anyone_who_reaches_the_port(deployment, tmp_path):
    """Flower 1.42 OSS has no account authentication on the Control API (same port as the Fleet
    API): a stranger with nothing but the public ``ca.crt`` registers its own SuperNode key.
    SuperNode authentication therefore holds only if the port is firewalled to the consortium
    (README, multi-site operations). If Flower closes this, this test fails: update the README."""
    from flower_focal.pki import make_node_key
    from flower_focal.simulation import flower_env

    home = tmp_path / "stranger-flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink.target]\naddress = "{deployment.address}"\nroot-certificates = "{deployment.ca_cert}"\n')
    _, public = make_node_key(tmp_path / "stranger" / "node-s")
    proc = subprocess.run([flwr_executable(), "supernode", "register", str(public), "target", "--format", "json"],
                          env=flower_env(home), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and '"success": true' in proc.stdout, proc.stdout + proc.stderr
    node_id = int(json.loads(proc.stdout[proc.stdout.index("{"):])["node-id"])
    try:
        assert node_id in {int(n["node-id"]) for n in deployment.registered_nodes()}
    finally:
        subprocess.run([flwr_executable(), "supernode", "unregister", str(node_id), "loopback"],
                       env=deployment.env, capture_output=True, timeout=120, check=True)


def test_he_fedavg_runs_and_the_superlink_host_never_holds_the_secret_key(deployment, site_keys, tmp_path):
    keys, server_keys = site_keys
    result = deployment.run(_cfg(tmp_path, "he-fedavg", he_key_dir=str(server_keys)))
    metrics = result.metrics()
    assert metrics["status"] == "completed"
    assert [len(r["train_institutions"]) for r in metrics["rounds"]] == [2, 2]
    assert not (result.run_dir / "model.pt").exists() and (result.run_dir / "model.he").is_file()
    assert_server_side_never_saw_the_secret_key(keys, server_keys, result.run_dir, deployment)
    decrypt_model(result.run_dir, keys)  # where the key lives: an institution
    state = torch.load(result.run_dir / "model.pt")
    assert all(torch.isfinite(v.double()).all() for v in state.values())


def test_foreign_app_under_he_fedavg_runs_on_real_supernodes(deployment, site_keys, tmp_path):
    """The quickstart-style app with the README's he-fedavg diff, on real SuperLink/SuperNodes.

    Its ClientApp answers no describe query, so every round is sealed in a second exchange and
    the held update must survive in the SuperNode's context between two ClientApp processes.
    """
    from tests.test_foreign_app import app_with, decrypt

    keys, server_keys = site_keys
    out = tmp_path / "out"
    out.mkdir()
    app = app_with(tmp_path, "he-fedavg")
    deployment.run_app(app, {"out-dir": str(out), "he-key-dir": str(server_keys), "num-server-rounds": 2},
                       out / "flwr.log")
    log = (out / "flwr.log").read_text()
    assert log.count("summed 2 ciphertexts") == 2  # both rounds, both institutions sealed
    state = decrypt(out / "final_model.he", keys)
    assert sorted(state) == sorted(("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                                    "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
    assert all(torch.isfinite(v).all() for v in state.values())


def test_focal_runs_on_real_superlink_and_supernodes_and_the_server_never_holds_the_secret_key(
        tmp_path_factory, tmp_path, site_data):
    """FOCAL through a real SuperLink: each SuperNode gets its data and the FOCAL secret key by
    node config, the server only public.ctx (relin + Galois keys, no secret key)."""
    keys, server_keys = _keyset(tmp_path_factory, "focal")
    nodes = [{"partition-id": i, "num-partitions": 2, "data-path": str(site_data),
              "he-secret-key": str(keys / "secret.ctx")} for i in range(2)]
    cfg = RunConfig(strategy="focal", dataset="medmnist", image_size=28, num_server_rounds=1,
                    min_available_nodes=2, lr=0.5, seed=5, backbone="monai-resnet18", backbone_input_size=32,
                    embedding_cache_dir=str(tmp_path / "institution-embeddings"), he_key_dir=str(server_keys),
                    run_dir=str(tmp_path / "focal"))
    with LoopbackDeployment(nodes, workdir=tmp_path_factory.mktemp("deploy-focal")) as dep:
        result = dep.run(cfg)
        assert result.status == "finished:completed"  # read back with `flwr ls`
        metrics = result.metrics()
        # one round (~6 s per message exchange in deployment): embed, one head step, evaluate
        assert metrics["status"] == "completed" and [r["round"] for r in metrics["rounds"]] == [1]
        (rnd,) = metrics["rounds"]
        assert sorted(rnd["train_institutions"]) == ["0", "1"] and not rnd["failures"]
        assert sorted(rnd["evaluate_institutions"]) == ["0", "1"]
        assert math.isfinite(rnd["train"]["train-loss"]) and 0.0 <= rnd["evaluate"]["auroc"] <= 1.0
        assert not (result.run_dir / "model.pt").exists() and (result.run_dir / "model.he").is_file()
        scanned = assert_server_side_never_saw_the_secret_key(keys, server_keys, result.run_dir, dep)
        assert scanned >= 6
    decrypt_model(result.run_dir, keys)  # an institution turns model.he into backbone + head
    state = torch.load(result.run_dir / "model.pt")
    assert all(torch.isfinite(v.double()).all() for v in state.values())


def test_the_secret_scan_catches_a_leaked_key(tmp_path_factory, tmp_path, site_keys):
    """Negative control for the scan above: an HE secret key or a SuperNode's private key that
    did reach the server side is found, in any of the encodings it could leak in."""
    from types import SimpleNamespace

    from cryptography.hazmat.primitives import serialization

    from flower_focal.pki import make_node_key

    keys, server_keys = site_keys
    run_dir, workdir = tmp_path / "run", tmp_path / "deploy"
    for d in (run_dir, workdir / "flwr-home", workdir / "superlink-tls", workdir / "supernode0"):
        d.mkdir(parents=True)
    node_key, node_pub = make_node_key(workdir / "supernode0" / "node-0")  # institution side: fine
    (workdir / "superlink-tls" / "node-0.pub").write_bytes(node_pub.read_bytes())  # public: fine
    (run_dir / "run_config.toml").write_text("strategy = 'he-fedavg'\n")
    (workdir / "state.db").write_bytes(b"\0" * 64)
    (workdir / "supernode0.log").write_bytes((keys / "secret.ctx").read_bytes())  # institution side: fine
    (workdir / "superlink.log").write_text("INFO clean\n")
    fake = SimpleNamespace(workdir=workdir, node_private_keys=lambda: [node_key])
    # run config, 2 server keys, log, db, the registered public key
    assert assert_server_side_never_saw_the_secret_key(keys, server_keys, run_dir, fake) == 6
    key = serialization.load_ssh_private_key(node_key.read_bytes(), password=None)
    leaks = [(workdir / "superlink.log", lambda: "key " + _secret_key_bytes(keys / "secret.ctx").hex()),
             (run_dir / "checkpoint.npz", lambda: (keys / "secret.ctx").read_bytes()),
             (workdir / "superlink-tls" / "node-0", lambda: node_key.read_bytes()),
             (workdir / "flwr-home" / "k.pem", lambda: key.private_bytes(
                 serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
             (workdir / "state.db", lambda: b"\0" + key.private_numbers().private_value.to_bytes(48, "big")),
             (workdir / "superlink.log", lambda: f"d={key.private_numbers().private_value:096x}")]
    for path, content in leaks:
        data = content()
        before = path.read_bytes() if path.exists() else None
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        with pytest.raises(AssertionError):
            assert_server_side_never_saw_the_secret_key(keys, server_keys, run_dir, fake)
        if before is None:
            path.unlink()
        else:
            path.write_bytes(before)
    assert_server_side_never_saw_the_secret_key(keys, server_keys, run_dir, fake)  # clean again


def test_a_killed_supernode_leaves_the_round_to_the_survivors_and_rejoins(tmp_path_factory, tmp_path):
    import threading
    import time

    from flower_focal.checkpoint import load_checkpoint

    data = write_synthetic_npz(tmp_path_factory.mktemp("data3") / "site.npz", sizes=(180, 45, 45))
    nodes = [{"partition-id": i, "num-partitions": 3, "data-path": str(data)} for i in range(3)]
    cfg = RunConfig(dataset="medmnist", image_size=28, num_server_rounds=4, min_available_nodes=2,
                    min_train_replies=2, round_timeout=300.0, seed=4, run_dir=str(tmp_path / "run"))
    with LoopbackDeployment(nodes, workdir=tmp_path_factory.mktemp("deploy3")) as dep:
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.setdefault("result", dep.run(cfg)))
        thread.start()
        ckpt = tmp_path / "run"
        deadline = time.time() + 600
        while time.time() < deadline and not (ckpt / "checkpoint.npz").exists():
            time.sleep(0.5)
        dep.kill_node(2)  # site 2 dies during round 2
        while time.time() < deadline and load_checkpoint(ckpt).server_round < 2:
            time.sleep(0.5)
        dep.restart_node(2)  # and comes back
        thread.join(timeout=900)
    metrics = outcome["result"].metrics()
    assert metrics["status"] == "completed"
    trained = [len(r["train_institutions"]) for r in metrics["rounds"]]
    assert trained[0] == 3 and min(trained[1:]) == 2  # the round(s) without site 2 completed
    assert trained[-1] == 3  # the restarted SuperNode rejoined (same registered node id and key)


def test_a_failed_start_leaves_no_process_behind(tmp_path):
    """The SuperLink cannot bind (port taken): start() raises and stops what it had started."""
    import socket

    dep = LoopbackDeployment([{"partition-id": 0, "num-partitions": 1}], workdir=tmp_path / "dep")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", dep.port))
        taken.listen()
        with pytest.raises(RuntimeError, match="superlink"):
            dep.start()
    assert dep.superlink is not None and dep.superlink.poll() is not None
    assert dep.supernodes == []
    assert (dep.workdir / "superlink-tls" / "superlink.crt").is_file()  # it got as far as the PKI
