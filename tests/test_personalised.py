"""FedBN and personalised evaluation: local normalisation layers, HE equivalence, personal metrics."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from clients.client_app import app as client_app
from flower_focal import wire
from flower_focal.artifacts import decrypt_model
from flower_focal.client import handlers
from flower_focal.client.handlers import _LOCAL_NORM, _PERSONAL
from flower_focal.config import RunConfig, check_personalisation
from flower_focal.crypto import PublicContext, keygen
from flower_focal.crypto.envelope import EnvelopeLayout
from flower_focal.flatten import ArrayLayout
from flower_focal.models import arrays_into_model, build_model, norm_keys, norm_layers
from flower_focal.preflight import PreflightError, preflight
from flower_focal.server import run_server
from flower_focal.testing import LoopbackGrid
from flower_focal.training import evaluate_model

DITTO = {"ditto_lambda": 0.1, "personal_epochs": 1}
PERSONAL = ("personal-loss", "personal-accuracy", "personal-auroc")


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


def _personal_states(grid):
    """Each institution's Ditto personal model in its node state: partition -> state dict."""
    return {grid.partition[nid]: ctx.state.array_records[_PERSONAL].to_torch_state_dict()
            for nid, ctx in grid.contexts.items()}


def _institutions(run_dir):
    """Per round, each institution's evaluate metrics (partition label -> metrics)."""
    return [r["evaluate_institutions"] for r in json.loads((run_dir / "metrics.json").read_text())["rounds"]]


def _replies(grid):
    """Every reply by (node, message type, its number among that node's replies of that type)."""
    out, seen = {}, {}
    for reply in grid.received:
        key = (reply.metadata.src_node_id, reply.metadata.message_type)
        out[(*key, seen.get(key, 0))] = reply
        seen[key] = seen.get(key, 0) + 1
    return out


def _fresh(grid, partition):
    """A new node context for ``partition`` (same configs, empty state): a node that saw nothing."""
    from flwr.app import Context, RecordDict

    ctx = grid.contexts[grid.node_ids[partition]]
    return Context(run_id=1, node_id=ctx.node_id, node_config=dict(ctx.node_config), state=RecordDict(),
                   run_config=dict(ctx.run_config))


@pytest.mark.parametrize("changes, match", [
    ({"ditto_lambda": 0.1, "personal_epochs": 0}, r"ditto-lambda=0\.1 .* personal-epochs=0"),
    ({"ditto_lambda": -0.1, "personal_epochs": 1}, r"ditto-lambda must be a finite number >= 0"),
    ({"ditto_lambda": float("nan"), "personal_epochs": 1}, r"ditto-lambda must be a finite number >= 0"),
    ({"ditto_lambda": float("inf"), "personal_epochs": 1}, r"ditto-lambda must be a finite number >= 0"),
    ({"personal_epochs": -1}, r"personal-epochs must be >= 0"),
])
def test_bad_personalisation_settings_are_refused_naming_them(changes, match):
    cfg = RunConfig(**changes)
    with pytest.raises(ValueError, match=match):
        check_personalisation(cfg)
    with pytest.raises(PreflightError, match=match):  # the launcher stops before Flower starts
        preflight(cfg, 3)
    check_personalisation(RunConfig(ditto_lambda=0.1, personal_epochs=1))  # Ditto on: accepted
    check_personalisation(RunConfig())  # off


def test_norm_keys_name_every_batchnorm_entry_and_nothing_else():
    model = build_model("small-cnn", 3, 4, 28)
    names = norm_keys(model)
    assert len(names) == 4 * 5  # 4 BatchNorms: weight, bias, running mean/var, step counter
    bn = {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {n.rsplit(".", 1)[0] for n in names} == bn
    assert not any(n.startswith("classifier") or "weight" in n and n.rsplit(".", 1)[0] not in bn for n in names)


@pytest.mark.slow  # two simulations, one under CKKS: about 25 s on 2 cores
def test_fedbn_and_ditto_keep_local_state_and_he_fedavg_equals_fedavg(tmp_path, key_dir):
    """FedBN with Ditto on top (Ditto leaves the global model bit for bit as it is, see below):
    he-fedavg equals fedavg in the global model, the per-institution metrics, each institution's
    personal model and its personal metrics (gold: 1e-5); under he-fedavg the normalisation
    layers are not even encrypted."""
    grid, plain = _run(tmp_path / "fedbn", "fedavg", key_dir, fedbn=True, **DITTO)
    he_grid, enc = _run(tmp_path / "he-fedbn", "he-fedavg", key_dir, fedbn=True, **DITTO)
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
    # Ditto: the personal models (never sent) agree to 1e-5 across fedavg and he-fedavg ...
    personal, he_personal = _personal_states(grid), _personal_states(he_grid)
    assert sorted(personal) == sorted(he_personal) == [0, 1, 2]
    for i, v in personal.items():
        assert set(v) == set(a)  # a whole model, with normalisation layers of its own
        assert max(float((v[k].double() - he_personal[i][k].double()).abs().max()) for k in v) <= 1e-5
        assert not torch.equal(v[mean], initial[mean])
        assert max(float((v[k].double() - a[k].double()).abs().max()) for k in v if k not in names) > 1e-3
    # ... and so do the personal metrics of every institution in every round
    ours, theirs = _institutions(plain), _institutions(enc)
    assert len(ours) == len(theirs) == 2
    for rp, rh in zip(ours, theirs, strict=True):
        assert sorted(rp) == sorted(rh) == ["0", "1", "2"]
        for pid in rp:
            for key in PERSONAL:
                assert rh[pid][key] == pytest.approx(rp[pid][key], abs=1e-5), (pid, key)
    assert any(m["personal-loss"] != m["loss"] for m in ours[-1].values())


def test_personal_metrics_of_fine_tuning_and_of_ditto_personal_models(tmp_path, key_dir):
    tuned_grid, run_dir = _run(tmp_path / "personal", "fedavg", key_dir, personal_epochs=1, personal_lr=0.01)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    last = rounds[-1]
    for key in ("auroc", "accuracy", "loss"):
        assert f"personal-{key}" in last["evaluate"]
    per_inst = last["evaluate_institutions"]
    assert len(per_inst) == 3 and all("personal-auroc" in m for m in per_inst.values())
    assert any(m["personal-loss"] != m["loss"] for m in per_inst.values())
    assert all(_PERSONAL not in ctx.state.array_records for ctx in tuned_grid.contexts.values())

    # Ditto, same run otherwise: every reply, and so the global model, is bit for bit the same
    grid, ditto_dir = _run(tmp_path / "ditto", "fedavg", key_dir, personal_lr=0.01, **DITTO)
    a, b = torch.load(run_dir / "model.pt"), torch.load(ditto_dir / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(grid.received) == len(tuned_grid.received) == 15  # describe, then 2 rounds x (train, evaluate), x 3
    personal = _personal_states(grid)
    replies, tuned_replies = _replies(grid), _replies(tuned_grid)
    assert replies.keys() == tuned_replies.keys()
    for key, ours in replies.items():
        theirs = tuned_replies[key]
        assert ours.content.array_records.keys() == theirs.content.array_records.keys()
        for name, record in ours.content.array_records.items():
            got = record.to_torch_state_dict()
            want = theirs.content[name].to_torch_state_dict()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
            for v in personal.values():  # the personal model is in no reply
                assert not torch.equal(got["classifier.weight"], v["classifier.weight"])
    # its metrics are the personal model's (no fine-tuned copy), and not the fine-tuning's
    ditto_last = _institutions(ditto_dir)[-1]
    for pid, v in personal.items():
        site = handlers.site_from_context(grid.contexts[grid.node_ids[pid]])
        model = arrays_into_model(build_model("small-cnn", site.data.in_channels, site.data.num_classes, 32),
                                  grid.contexts[grid.node_ids[pid]].state.array_records[_PERSONAL])
        scored = evaluate_model(model, site.data.val, batch_size=32, device="cpu",
                                num_classes=site.data.num_classes)
        for key in PERSONAL:
            assert ditto_last[str(pid)][key] == pytest.approx(scored[key.removeprefix("personal-")], abs=1e-9)
    assert any(ditto_last[p]["personal-loss"] != per_inst[p]["personal-loss"] for p in per_inst)

    # it persists: replaying institution 0's round-2 train message on a node that saw nothing
    # starts v from that round's global and ends elsewhere; replaying rounds 1 and 2 ends at v
    train_msgs = grid.sent_to(0, "train")
    assert len(train_msgs) == 2
    replayed = _fresh(grid, 0)
    for msg in train_msgs:
        handlers.train(copy.deepcopy(msg), replayed)
    again = replayed.state.array_records[_PERSONAL].to_torch_state_dict()
    assert all(torch.equal(again[k], personal[0][k]) for k in again)
    late = _fresh(grid, 0)
    handlers.train(copy.deepcopy(train_msgs[1]), late)
    only_round_2 = late.state.array_records[_PERSONAL].to_torch_state_dict()
    assert max(float((only_round_2[k] - personal[0][k]).abs().max()) for k in personal[0]
               if only_round_2[k].is_floating_point()) > 1e-4
    # a node that has not trained yet reports the received global's metrics as its personal ones
    reply = handlers.evaluate(copy.deepcopy(grid.sent_to(0, "evaluate")[0]), _fresh(grid, 0))
    metrics = reply.content["metrics"]
    for key in PERSONAL:
        assert metrics[key] == metrics[key.removeprefix("personal-")]
