"""FedBN and personalised evaluation: local normalisation layers, HE equivalence, personal metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clients.client_app import app as client_app
from flower_focal import wire
from flower_focal.artifacts import decrypt_model
from flower_focal.client.handlers import _LOCAL_NORM
from flower_focal.config import RunConfig
from flower_focal.crypto import PublicContext, keygen
from flower_focal.crypto.envelope import EnvelopeLayout
from flower_focal.flatten import ArrayLayout
from flower_focal.models import build_model, norm_keys, norm_layers
from flower_focal.server import run_server
from flower_focal.testing import LoopbackGrid


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("keys"), "compact")


def _run(run_dir, strategy, key_dir, **overrides):
    cfg = RunConfig(strategy=strategy, num_server_rounds=2, num_samples=150, min_available_nodes=3,
                    run_dir=str(run_dir), he_key_dir=str(key_dir), model="small-cnn", local_epochs=1,
                    partitioner="dirichlet", seed=3, **overrides)
    grid = LoopbackGrid(client_app, 3, cfg.to_flower())
    run_server(grid, cfg)
    return grid, run_dir


def test_norm_keys_name_every_batchnorm_entry_and_nothing_else():
    model = build_model("small-cnn", 3, 4, 28)
    names = norm_keys(model)
    assert len(names) == 4 * 5  # 4 BatchNorms: weight, bias, running mean/var, step counter
    bn = {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {n.rsplit(".", 1)[0] for n in names} == bn
    assert not any(n.startswith("classifier") or "weight" in n and n.rsplit(".", 1)[0] not in bn for n in names)


def test_fedbn_keeps_normalisation_local_and_he_fedavg_equals_fedavg(tmp_path, key_dir):
    grid, plain = _run(tmp_path / "fedbn", "fedavg", key_dir, fedbn=True)
    he_grid, enc = _run(tmp_path / "he-fedbn", "he-fedavg", key_dir, fedbn=True)
    decrypt_model(enc, key_dir)
    a, b = torch.load(plain / "model.pt"), torch.load(enc / "model.pt")
    assert list(a) == list(b)  # a complete state dict, in the model's order
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) <= 1e-5
    torch.manual_seed(3)
    initial = build_model("small-cnn", 3, 2, 32).state_dict()
    names = norm_keys(build_model("small-cnn", 3, 2, 32))
    # under HE the normalisation layers are not even encrypted: every upload is one ciphertext of
    # the other parameters only, and they travel in plaintext (their initial values) next to it
    vector = sum(v.numel() for k, v in b.items() if k not in names)  # the run's model (its classes)
    assert sum(b[k].numel() for k in names) > 0
    fingerprint = PublicContext.from_key_dir(key_dir).fingerprint
    uploads = [r.content["arrays"] for r in he_grid.received
               if r.metadata.message_type == "train" and not r.has_error()]
    assert len(uploads) == 2 * 3
    for upload in uploads:
        assert list(upload.keys()) == [wire.HE_CIPHERTEXT]
        assert EnvelopeLayout.parse(upload[wire.HE_CIPHERTEXT].data, fingerprint).length == vector
    encrypted = [m for m in he_grid.sent if wire.HE_CIPHERTEXT in m.content.array_records.get("arrays", {})]
    assert len(encrypted) == 3 + 3 * 2  # round 2's training, both rounds' evaluation
    for message in encrypted:
        layout = ArrayLayout.from_config(message.content[wire.CONFIG])
        assert layout.size == vector and set(layout.local) == set(names)
        for key in names:
            assert np.array_equal(message.content["arrays"][key].numpy(), initial[key].numpy()), key
    # the same per-institution metrics as fedavg, round by round
    rounds_a = json.loads((plain / "metrics.json").read_text())["rounds"]
    rounds_b = json.loads((enc / "metrics.json").read_text())["rounds"]
    for ra, rb in zip(rounds_a, rounds_b, strict=True):
        for phase in ("train_institutions", "evaluate_institutions"):
            assert sorted(ra[phase]) == sorted(rb[phase]) and len(ra[phase]) == 3
            for pid, ma in ra[phase].items():
                shared = [k for k in (wire.LOSS, wire.ACCURACY, wire.AUROC, wire.TRAIN_LOSS, wire.NUM_EXAMPLES)
                          if k in ma]
                assert len(shared) >= 2, ma
                for key in shared:
                    want, got = ma[key], rb[phase][pid][key]
                    assert (want is None and got is None) or got == pytest.approx(want, abs=1e-5, nan_ok=True), \
                        (phase, pid, key)
    # the aggregate's normalisation layers are the initial ones: no local statistic left an institution
    for key in names:
        assert torch.equal(a[key].to(initial[key].dtype), initial[key]), key
        assert torch.equal(b[key], initial[key]), key  # he-fedavg: exact (plaintext, never encrypted)
    assert any(not torch.equal(a[k], initial[k]) for k in a if k not in names)  # the rest trained
    held = [ctx.state.array_records[_LOCAL_NORM].to_torch_state_dict() for ctx in grid.contexts.values()]
    assert all(set(h) == set(names) for h in held)
    mean = "features.1.running_mean"
    assert not torch.equal(held[0][mean], held[1][mean])  # each institution's own statistics
    assert not torch.equal(held[0][mean], initial[mean])
    # model.json says so: evaluate refuses it unless told (tests/test_cli.py)
    layers = norm_layers(build_model("small-cnn", 3, 2, 32))
    for run in (plain, enc):
        spec = json.loads((run / "model.json").read_text())
        assert spec["fedbn"] is True and spec["local_layers"] == layers, run


def test_personal_metrics_are_reported_next_to_the_global_ones(tmp_path, key_dir):
    _, run_dir = _run(tmp_path / "personal", "fedavg", key_dir, personal_epochs=1, personal_lr=0.01)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    last = rounds[-1]
    for key in ("auroc", "accuracy", "loss"):
        assert f"personal-{key}" in last["evaluate"]
    per_inst = last["evaluate_institutions"]
    assert len(per_inst) == 3 and all("personal-auroc" in m for m in per_inst.values())
    assert any(m["personal-loss"] != m["loss"] for m in per_inst.values())
