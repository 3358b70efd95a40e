"""Checkpoints every round, resume after a killed server, min-train-replies (loopback grid)."""

from __future__ import annotations

import json

import pytest
import torch

from clients.client_app import app as client_app
from flower_focal.artifacts import decrypt_model
from flower_focal.checkpoint import CHECKPOINT_FILE, load_checkpoint
from flower_focal.config import RunConfig
from flower_focal.crypto import keygen
from flower_focal.server import run_server
from flower_focal.testing import LoopbackGrid


class ServerKilled(Exception):
    """Stands for the ServerApp process dying."""


class DyingGrid(LoopbackGrid):
    """A loopback grid whose server dies when it sends round ``die_at``'s training messages."""

    die_at = 10**9

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type == "train" and m.content["config"]["server-round"] >= self.die_at:
                raise ServerKilled()
        return super().push_messages(messages)


def _cfg(run_dir, strategy="fedavg", **kw):
    settings = dict(num_server_rounds=3, num_samples=120, min_available_nodes=3, model="lenet-sigmoid", lr=0.01)
    return RunConfig(strategy=strategy, run_dir=str(run_dir), **{**settings, **kw})


def _grid(cfg, die_at=None):
    grid = DyingGrid(client_app, 3, cfg.to_flower())
    if die_at:
        grid.die_at = die_at
    return grid


@pytest.mark.parametrize("strategy", ["fedavg", "he-fedavg"])
def test_resume_after_a_killed_server_reaches_the_uninterrupted_result(tmp_path, strategy):
    extra = {}
    if strategy == "he-fedavg":
        extra["he_key_dir"] = str(keygen(tmp_path / "keys", "compact"))
    whole = _cfg(tmp_path / "whole", strategy, **extra)
    run_server(_grid(whole), whole)

    killed = _cfg(tmp_path / "killed", strategy, **extra)
    with pytest.raises(ServerKilled):
        run_server(_grid(killed, die_at=3), killed)
    ckpt = load_checkpoint(tmp_path / "killed")
    assert ckpt is not None and ckpt.server_round == 2
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["status"] == "failed"

    resumed = killed.replace(resume=True)
    run_server(_grid(resumed), resumed)
    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert metrics["info"]["resumed_after_round"] == 2
    if strategy == "he-fedavg":
        assert ckpt.arrays["ciphertext"].stype == "he/flower-focal"  # the server checkpoints ciphertext
        decrypt_model(tmp_path / "whole", extra["he_key_dir"])
        decrypt_model(tmp_path / "killed", extra["he_key_dir"])
    a = torch.load(tmp_path / "whole" / "model.pt")
    b = torch.load(tmp_path / "killed" / "model.pt")
    if strategy == "fedavg":
        assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    else:  # fresh CKKS noise per encryption
        assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) <= 1e-5
    whole_rounds = json.loads((tmp_path / "whole" / "metrics.json").read_text())["rounds"]
    assert metrics["rounds"][-1]["evaluate"]["accuracy"] == pytest.approx(whole_rounds[-1]["evaluate"]["accuracy"])


def test_resume_refuses_a_checkpoint_with_other_settings(tmp_path):
    cfg = _cfg(tmp_path / "run")
    with pytest.raises(ServerKilled):
        run_server(_grid(cfg, die_at=2), cfg)
    other = cfg.replace(resume=True, lr=0.5)
    with pytest.raises(ValueError, match="lr"):
        run_server(_grid(other), other)


def test_checkpoint_is_written_every_round_and_a_damaged_one_is_named(tmp_path):
    cfg = _cfg(tmp_path / "run", num_server_rounds=2)
    run_server(_grid(cfg), cfg)
    assert load_checkpoint(tmp_path / "run").server_round == 2
    (tmp_path / "run" / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="damaged"):
        load_checkpoint(tmp_path / "run")


def test_too_few_replies_keep_the_previous_model(tmp_path):
    cfg = _cfg(tmp_path / "run", num_server_rounds=2, min_train_replies=3)
    grid = _grid(cfg)
    grid.crash_from_round[grid.node_ids[0]] = 2
    run_server(grid, cfg)
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert any("min-train-replies" in f for f in rounds[1]["failures"])
    assert rounds[1]["train"] == {}
    # round 2 evaluated round 1's model: each surviving institution reports the same loss
    survivors = rounds[1]["evaluate_institutions"]
    assert len(survivors) == 2
    for pid, m in survivors.items():
        assert m["loss"] == pytest.approx(rounds[0]["evaluate_institutions"][pid]["loss"])


def test_a_setting_added_after_the_checkpoint_counts_as_its_default():
    """A checkpoint written before a setting existed (e.g. server-momentum) resumes when the run
    leaves that setting at its default, and is refused when it does not."""
    from flwr.app import ArrayRecord

    from flower_focal.checkpoint import Checkpoint, check_compatible

    config = RunConfig().to_flower()
    older = {k: v for k, v in config.items() if k not in ("server-momentum", "server-lr")}
    checkpoint = Checkpoint(2, ArrayRecord(), {}, older)
    check_compatible(checkpoint, config)  # no error
    with pytest.raises(ValueError, match=r"server-momentum \(0\.0 -> 0\.5\)"):
        check_compatible(checkpoint, {**config, "server-momentum": 0.5})


@pytest.mark.slow
def test_he_fedbn_resumes_and_a_checkpoint_of_the_full_layout_is_refused(tmp_path):
    """FedBN under he-fedavg: the checkpoint holds the ciphertext (normalisation layers left out)
    and their plaintext initial values; a server killed after round 1 resumes to the uninterrupted
    result (with institutions that kept their node state: only the ServerApp died). A checkpoint
    whose ciphertext was made with the full layout (a flower-focal that still encrypted FedBN's
    layers) is refused with the reason, before any institution trains."""
    from flwr.app import ArrayRecord

    from flower_focal import wire
    from flower_focal.checkpoint import Checkpoint, save_checkpoint
    from flower_focal.client.he_mod import encrypt_record
    from flower_focal.crypto import SecretContext
    from flower_focal.flatten import ArrayLayout
    from flower_focal.models import build_model, norm_keys

    keys = keygen(tmp_path / "keys", "compact")
    kw = dict(he_key_dir=str(keys), fedbn=True, model="small-cnn", num_server_rounds=2)
    whole = _cfg(tmp_path / "whole", "he-fedavg", **kw)
    run_server(_grid(whole), whole)
    killed = _cfg(tmp_path / "killed", "he-fedavg", **kw)
    grid = _grid(killed, die_at=2)
    with pytest.raises(ServerKilled):
        run_server(grid, killed)
    ckpt = load_checkpoint(tmp_path / "killed")
    names = norm_keys(build_model("small-cnn", 3, 2, 32))
    assert ckpt.server_round == 1 and set(ckpt.arrays.keys()) == {wire.HE_CIPHERTEXT, wire.HE_WEIGHTS, *names}
    assert all(ckpt.arrays[k].stype != wire.HE_STYPE for k in names)  # plaintext: the public initial values
    grid.die_at = 10**9
    resumed = killed.replace(resume=True)
    run_server(grid, resumed)
    decrypt_model(tmp_path / "whole", str(keys))
    decrypt_model(tmp_path / "killed", str(keys))
    a = torch.load(tmp_path / "whole" / "model.pt")
    b = torch.load(tmp_path / "killed" / "model.pt")
    assert list(a) == list(b) and max(float((a[k].double() - b[k].double()).abs().max()) for k in a) <= 1e-5
    for k in names:
        assert torch.equal(b[k], torch.from_numpy(ckpt.arrays[k].numpy()))
    last = [json.loads((tmp_path / run / "metrics.json").read_text())["rounds"][-1] for run in ("whole", "killed")]
    for pid, metrics in last[0]["evaluate_institutions"].items():
        assert last[1]["evaluate_institutions"][pid]["loss"] == pytest.approx(metrics["loss"], abs=1e-5)
    # a round-1 checkpoint as the full-layout flower-focal wrote it: every array in the ciphertext
    full = ArrayRecord(a)
    old = encrypt_record(full, SecretContext.load(keys), ArrayLayout.of(full), 1.0)
    old[wire.HE_WEIGHTS] = ckpt.arrays[wire.HE_WEIGHTS]
    save_checkpoint(tmp_path / "killed", Checkpoint(1, old, ckpt.history, ckpt.config))
    sent = len(grid.sent)
    with pytest.raises(ValueError, match="another layout.*start the run again"):
        run_server(grid, resumed)
    assert not [m for m in grid.sent[sent:] if m.metadata.message_type == "train"]
