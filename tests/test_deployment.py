"""Real Flower deployment on loopback: flower-superlink + flower-supernode processes, `flwr run`.

Slow (the SuperLink and SuperNodes poll every 3 s): ~1 min per run. Still run in CI.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from flower_focal.artifacts import decrypt_model
from flower_focal.config import RunConfig
from flower_focal.crypto import MANIFEST_FILE, PUBLIC_FILE, keygen
from flower_focal.deployment import LoopbackDeployment
from tests.conftest import write_synthetic_npz

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site_keys(tmp_path_factory):
    """Keygen output; the server host gets a copy of public.ctx + manifest only."""
    keys = keygen(tmp_path_factory.mktemp("institution-keys"), "compact")
    server = tmp_path_factory.mktemp("server-keys")
    for name in (PUBLIC_FILE, MANIFEST_FILE):
        shutil.copy(keys / name, server / name)
    return keys, server


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, site_keys):
    keys, _ = site_keys
    data = write_synthetic_npz(tmp_path_factory.mktemp("data") / "site.npz", sizes=(160, 40, 40))
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


def test_he_fedavg_runs_and_the_superlink_host_never_holds_the_secret_key(deployment, site_keys, tmp_path):
    keys, server_keys = site_keys
    result = deployment.run(_cfg(tmp_path, "he-fedavg", he_key_dir=str(server_keys)))
    metrics = result.metrics()
    assert metrics["status"] == "completed"
    assert [len(r["train_institutions"]) for r in metrics["rounds"]] == [2, 2]
    assert not (result.run_dir / "model.pt").exists() and (result.run_dir / "model.he").is_file()
    secret = (keys / "secret.ctx").read_bytes()
    probe = secret[len(secret) // 2 : len(secret) // 2 + 64]
    server_side = [*result.run_dir.rglob("*"), *server_keys.rglob("*"), deployment.workdir / "superlink.log",
                   deployment.workdir / "state.db"]
    for path in server_side:
        if path.is_file():
            assert probe not in path.read_bytes(), path
    assert str(keys) not in (result.run_dir / "run_config.toml").read_text()
    decrypt_model(result.run_dir, keys)  # where the key lives: an institution
    state = torch.load(result.run_dir / "model.pt")
    assert all(torch.isfinite(v.double()).all() for v in state.values())


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
    assert trained[-1] == 3  # the restarted SuperNode rejoined (new node id, same partition)
