"""FOCAL on Flower: loopback parity with the plaintext twin (also with balanced class weights and
several steps per round), ciphertext-only replies, dropout, min-train-replies, fraction-evaluate,
resume of a killed server, and one real Ray simulation (slow) launched through the Hydra
launcher with the default EfficientNet-Lite0 backbone, checked with ``flower-focal evaluate``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from clients.client_app import app as client_app
from flower_focal import wire
from flower_focal.artifacts import decrypt_model, load_model
from flower_focal.cache import CACHE
from flower_focal.checkpoint import load_checkpoint, save_checkpoint
from flower_focal.client.focal import site_embeddings, validation_metrics
from flower_focal.client.handlers import site_from_context
from flower_focal.config import RunConfig
from flower_focal.crypto import keygen
from flower_focal.focal import (
    FocalLayout,
    balanced_class_weights,
    predict_logits,
    softmax,
)
from flower_focal.server import run_server
from flower_focal.simulation import repo_root
from flower_focal.strategy import build_strategy
from flower_focal.strategy.focal import Focal
from flower_focal.testing import InstitutionEmbeddings, LoopbackGrid, train_plaintext
from tests.conftest import write_synthetic_npz

ROUNDS, LR = 3, 0.5


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory) -> Path:
    return keygen(tmp_path_factory.mktemp("keys"), "focal")


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    return write_synthetic_npz(tmp_path_factory.mktemp("data") / "synth.npz", sizes=(90, 45, 30))


def _cfg(tmp_path: Path, npz: Path, key_dir: Path, name: str, **kw) -> RunConfig:
    settings = dict(
        strategy="focal", num_server_rounds=ROUNDS, min_available_nodes=3, lr=LR,  # focal ignores lr
        dataset="medmnist", data_path=str(npz), image_size=28, partitioner="iid",
        backbone="monai-resnet18", backbone_input_size=32, embedding_cache_dir=str(tmp_path / "emb"),
        he_key_dir=str(key_dir), run_dir=str(tmp_path / name), device="cpu", seed=7,
    )
    return RunConfig(**{**settings, **kw})


def _run(cfg: RunConfig, hook=None, grid_class=LoopbackGrid) -> LoopbackGrid:
    grid = grid_class(client_app, 3, cfg.to_flower())
    if hook:
        hook(grid)
    run_server(grid, cfg)
    return grid


class ServerKilled(Exception):
    """Stands for the ServerApp process dying."""


class DyingGrid(LoopbackGrid):
    """The server dies when it sends round ``DIE_AT``'s first FOCAL step."""

    DIE_AT = 3

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            if (m.metadata.message_type == wire.ACTION_FOCAL
                    and m.content[wire.CONFIG][wire.SERVER_ROUND] >= self.DIE_AT):
                raise ServerKilled()
        return super().push_messages(messages)


def _institutions(grid: LoopbackGrid, split: str) -> list[InstitutionEmbeddings]:
    out = []
    for nid in grid.node_ids:
        site = site_from_context(grid.contexts[nid])
        x, y = site_embeddings(site, split)
        out.append(InstitutionEmbeddings(str(site.partition_id), x, y))
    return sorted(out, key=lambda i: int(i.name))


def _head(run_dir: Path, key_dir: Path) -> np.ndarray:
    decrypt_model(run_dir, key_dir)
    model, spec = load_model(run_dir)
    assert spec.backbone == "monai-resnet18" and spec.model == "focal-linear"
    w = model.head.weight.detach().double().numpy().T
    return np.vstack([w, model.head.bias.detach().double().numpy()[None, :]])


def _auroc(head: np.ndarray, val: list[InstitutionEmbeddings]) -> float:
    x = np.vstack([i.x for i in val])
    y = np.concatenate([i.y for i in val])
    lay = FocalLayout(x.shape[1], head.shape[1])
    p = softmax(predict_logits(head, lay, x))
    present = np.unique(y)
    return float(roc_auc_score(y, p[:, present] / p[:, present].sum(1, keepdims=True),
                               multi_class="ovr", average="macro", labels=present))


def _dlogits(a: np.ndarray, b: np.ndarray, insts: list[InstitutionEmbeddings]) -> float:
    """Largest logit difference of two heads on the institutions' embeddings (heads for raw
    embeddings have the standardisation folded in: compare what they compute, not their rows,
    which 1 / std scales up for near-constant features)."""
    x1 = np.hstack([np.vstack([i.x for i in insts]), np.ones((sum(len(i.y) for i in insts), 1))])
    return float(np.abs(x1 @ (a - b)).max() / max(1.0, np.abs(x1 @ b).max()))


def plain_first_loss(metrics: dict) -> float:
    """Round 1's federated training loss (the guard's reference, kept across a resume)."""
    return float(metrics["rounds"][0]["train"]["train-loss"])


def _rounds_match_twin(metrics: dict, plain, steps: int = 1) -> None:
    """Every round's federated training loss is the twin's loss at that round's last step."""
    for i, rnd in enumerate(metrics["rounds"]):
        hist = plain.history[(i + 1) * steps - 1]
        assert rnd["train"]["train-loss"] == pytest.approx(hist["loss"], abs=1e-4)


@pytest.mark.parametrize("class_weights,steps", [
    ("none", 1),
    pytest.param("balanced", 2, marks=pytest.mark.slow),
])
def test_focal_matches_plaintext_twin_and_server_sees_only_ciphertext(
    tmp_path, npz, key_dir, class_weights, steps
):
    rounds = ROUNDS if steps == 1 else 2
    cfg = _cfg(tmp_path, npz, key_dir, "run", num_server_rounds=rounds,
               focal_class_weights=class_weights, focal_steps_per_round=steps)
    strategy = build_strategy(cfg)
    assert isinstance(strategy, Focal) and not strategy.he_public.holds_secret_key
    assert not strategy.evaluator.holds_secret_key

    for name in ("backbones", "embeddings", "key-holders"):
        CACHE.clear(name)
    grid = _run(cfg)
    run_dir = Path(cfg.run_dir)
    assert not (run_dir / "model.pt").exists()  # the server only wrote model.he
    # this process served the three institutions: one backbone, one key holder, each
    # institution's train and val embeddings computed once and held in the process cache
    stats = CACHE.stats()
    assert (stats["backbones"]["entries"], stats["backbones"]["misses"]) == (1, 1)
    assert (stats["key-holders"]["entries"], stats["key-holders"]["misses"]) == (1, 1)
    assert (stats["embeddings"]["entries"], stats["embeddings"]["misses"]) == (6, 6)
    assert stats["backbones"]["bytes"] > 10**6 and stats["embeddings"]["bytes"] > 0
    assert (run_dir / "model.he").is_file()

    # every Array that reached the server is a ciphertext envelope
    actions = set()
    for reply in grid.received:
        assert not reply.has_error(), reply.error.reason
        actions.add(reply.metadata.message_type)
        for record in reply.content.array_records.values():
            for name, arr in record.items():
                assert arr.stype == wire.HE_STYPE, (reply.metadata.message_type, name)
    assert {wire.ACTION_EMBED, wire.ACTION_FOCAL, wire.ACTION_FOCAL_EVALUATE} <= actions
    # each forward message carries one institution's logits only (+ the encrypted class total)
    fwd = [m for m in grid.sent if m.metadata.message_type == wire.ACTION_FOCAL]
    check = [m for m in fwd if m.content[wire.CONFIG][wire.FOCAL_CHECK_ONLY]]
    fwd = [m for m in fwd if not m.content[wire.CONFIG][wire.FOCAL_CHECK_ONLY]]
    assert len(fwd) == 3 * rounds * steps and len(check) == 3  # + the guard's final check
    # the statistics exchange, then the embeddings; the server only ever adds the moments
    embeds = [m for m in grid.sent if m.metadata.message_type == wire.ACTION_EMBED]
    assert [bool(m.content[wire.CONFIG].get(wire.FOCAL_STATS_ONLY, False)) for m in embeds] == [True] * 3 + [False] * 3
    assert all(wire.FOCAL_MOMENTS in m.content[wire.ARRAYS] for m in embeds[3:])
    expected = [wire.FOCAL_LOGITS] + ([wire.FOCAL_CLASS_COUNTS] if class_weights == "balanced" else [])
    for m in fwd:
        assert list(m.content[wire.ARRAYS].keys()) == expected
        assert all(a.stype == wire.HE_STYPE for a in m.content[wire.ARRAYS].values())
    assert [m.content[wire.CONFIG][wire.FOCAL_STEP] for m in fwd[::3]] == list(range(1, rounds * steps + 1))

    train, val = _institutions(grid, "train"), _institutions(grid, "val")
    assert CACHE.stats("embeddings")["misses"] == 6  # read back from the cache
    assert CACHE.stats("embeddings")["bytes"] == sum(i.x.nbytes + i.y.nbytes for i in train + val)
    k = int(json.loads((run_dir / "model.json").read_text())["num_classes"])
    weights = None
    if class_weights == "balanced":
        weights = balanced_class_weights(np.bincount(np.concatenate([i.y for i in train]), minlength=k))
    plain = train_plaintext(train, k, epochs=rounds * steps, init_seed=cfg.seed,
                            block=cfg.focal_block, class_weights=weights)
    head = _head(run_dir, key_dir)
    dw = _dlogits(head, plain.head, train + val)
    a_he, a_pl = _auroc(head, val), _auroc(plain.head, val)
    print(f"focal loopback ({class_weights}, {steps} steps/round): max rel. dlogits={dw:.2e}, "
          f"auroc {a_he:.4f} vs {a_pl:.4f}")
    assert dw < 1e-3 and abs(a_he - a_pl) < 0.002
    if weights is not None:  # the weights really changed the training
        unweighted = train_plaintext(train, k, epochs=rounds * steps, init_seed=cfg.seed)
        assert _dlogits(head, unweighted.head, train) > 100 * dw

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and len(metrics["rounds"]) == rounds
    assert metrics["info"]["final_train_loss"] == pytest.approx(plain.final_loss, abs=1e-4)
    assert metrics["info"]["model_parameters"] == (train[0].x.shape[1] + 1) * k  # the head only
    _rounds_match_twin(metrics, plain, steps)
    # the updates that stand: the twin's applied ones less those its guard rolled back (a step not
    # applied undoes the one before it; the final check may undo the last)
    applied = [h["applied"] for h in plain.history]
    undone = applied.count(0.0) + any("head before the last update is kept" in x for x in plain.guard_log)
    assert metrics["info"]["focal_guard_state"]["standing"] == applied.count(1.0) - undone > 0
    for rnd in metrics["rounds"]:
        assert sorted(rnd["train_institutions"]) == ["0", "1", "2"]
        assert 0.0 <= rnd["evaluate"]["auroc"] <= 1.0 and not rnd["failures"]
    # the last evaluation (the server's forward on the encrypted validation embeddings) is the
    # twin's final head on the raw validation embeddings
    lay = FocalLayout(train[0].x.shape[1], k, block=cfg.focal_block)
    for inst in val:
        want = validation_metrics(predict_logits(plain.head, lay, inst.x), inst.y, k)
        got = metrics["rounds"][-1]["evaluate_institutions"][inst.name]
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-3) and got["num-examples"] == len(inst.y)


def test_focal_evaluation_sends_each_institution_only_its_validation_logits(tmp_path, npz, key_dir,
                                                                            monkeypatch):
    """evaluate.focal: the server's forward pass on each institution's encrypted validation
    embeddings (uploaded with its training ones), only its logits down; the metrics are the
    plaintext twin's at every round; the message is >= 10x smaller than the head it replaces
    (block 128: the head is 17 x 5 ciphertexts, 15 validation images 1 x 5); an institution
    without a validation split gets no evaluation message and still trains."""
    from flower_focal.client import focal as client_focal

    real = client_focal.site_embeddings

    def no_val_at_2(site, split, *, where=None):
        if split == "val" and site.partition_id == 2:
            x, y = real(site, split)
            return x[:0], y[:0]
        return real(site, split, where=where)

    monkeypatch.setattr(client_focal, "site_embeddings", no_val_at_2)
    rounds = 2
    cfg = _cfg(tmp_path, npz, key_dir, "eval", num_server_rounds=rounds, focal_block=128)
    grid = _run(cfg)
    run_dir = Path(cfg.run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    evals = [m for m in grid.sent if m.metadata.message_type == wire.ACTION_FOCAL_EVALUATE]
    pid_of = {nid: i for i, nid in enumerate(grid.node_ids)}
    assert sorted(pid_of[m.metadata.dst_node_id] for m in evals) == [0, 0, 1, 1]  # never 2
    assert len(metrics["info"]["focal_unevaluated"]) == 1  # ... and the run says so
    head_bytes = (run_dir / "model.he").stat().st_size  # what each evaluation message used to carry
    lay = FocalLayout(512, 9, block=128)
    ev = build_strategy(cfg).evaluator  # the server's key-less evaluator
    assert len(ev.open_envelope((run_dir / "model.he").read_bytes())) == lay.n_groups * lay.n_pairs == 85
    for m in evals:
        assert list(m.content[wire.ARRAYS].keys()) == [wire.FOCAL_LOGITS]  # no head, no moments
        logits = m.content[wire.ARRAYS][wire.FOCAL_LOGITS].data
        assert len(ev.open_envelope(logits)) == lay.n_chunks(15) * lay.n_pairs == 5
        assert 10 * len(logits) <= head_bytes, (len(logits), head_bytes)
    # the embed exchange carried the validation embeddings of 0 and 1 only
    embeds = [r for r in grid.received if r.metadata.message_type == wire.ACTION_EMBED
              and wire.FOCAL_EMBEDDINGS in r.content.array_records.get(wire.ARRAYS, {})]
    assert sorted(pid_of[r.metadata.src_node_id] for r in embeds
                  if wire.FOCAL_VAL_EMBEDDINGS in r.content[wire.ARRAYS]) == [0, 1]

    train = _institutions(grid, "train")
    val = [i for i in _institutions(grid, "val") if i.name != "2"]
    k = int(json.loads((run_dir / "model.json").read_text())["num_classes"])
    assert k == 9 and train[0].x.shape[1] == 512
    for rnd in metrics["rounds"]:
        assert sorted(rnd["train_institutions"]) == ["0", "1", "2"]
        assert sorted(rnd["evaluate_institutions"]) == ["0", "1"] and not rnd["failures"]
        plain = train_plaintext(train, k, epochs=rnd["round"], init_seed=cfg.seed, block=128)
        for inst in val:
            want = validation_metrics(predict_logits(plain.head, lay, inst.x), inst.y, k)
            got = rnd["evaluate_institutions"][inst.name]
            assert got["num-examples"] == want["num-examples"] == len(inst.y) > 0
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-3), (rnd["round"], inst.name)
            assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1.01 / len(inst.y))
            assert got["auroc"] == pytest.approx(want["auroc"], abs=0.02)


def test_focal_stops_a_diverging_run_with_a_clear_message(tmp_path, npz, key_dir, monkeypatch):
    """A step far too large: the guard restores the head and halves the step; when halving does
    not help (here: allowed 0 times) the run fails, saying why and what to change."""
    import functools

    from flower_focal.focal import FocalDiverged, LossGuard
    from flower_focal.strategy import focal as focal_strategy

    monkeypatch.setattr(focal_strategy, "LossGuard", functools.partial(LossGuard, max_backoffs=0))
    cfg = _cfg(tmp_path, npz, key_dir, "diverge", num_server_rounds=2, focal_step_scale=1e4)
    with pytest.raises(FocalDiverged, match="focal-step-scale"):
        _run(cfg)
    metrics = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "training loss rose" in metrics["info"]["error"]
    assert len(metrics["rounds"]) == 2 and "train" not in metrics["rounds"][1] or not metrics["rounds"][1].get("train")


def test_focal_run_whose_every_update_rolled_back_fails_instead_of_completing(tmp_path, npz, key_dir):
    """One round with a step far too large: the final check rolls its only update back, so the
    head is the initial one; the run must fail saying so, not complete with an untrained head."""
    from flower_focal.focal import FocalDiverged

    cfg = _cfg(tmp_path, npz, key_dir, "all-rolled-back", num_server_rounds=1, focal_step_scale=1e4)
    with pytest.raises(FocalDiverged, match="every head update of this run was rolled back"):
        _run(cfg)
    run_dir = Path(cfg.run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "nothing was trained" in metrics["info"]["error"]
    assert metrics["info"]["focal_guard_state"]["standing"] == 0
    assert any("head before it is kept" in line for line in metrics["info"]["focal_guard"])
    assert not (run_dir / "model.he").exists() and not (run_dir / "model.json").exists()
    assert "failed" in (run_dir / "summary.md").read_text()
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None and ckpt.history["info"]["focal_guard_state"]["standing"] == 0
    with pytest.raises(FocalDiverged, match="resumed checkpoint holds no head update"):
        _run(cfg.replace(resume=True))  # nothing left to run must not turn into "completed"
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"


class DyingAtRound2(DyingGrid):
    DIE_AT = 2


def test_focal_resumed_run_rolls_back_to_the_checkpointed_head_and_goes_on(tmp_path, npz, key_dir):
    """The checkpointed head's loss rose (here: the checkpoint's reference losses are lowered):
    the resumed run keeps that head (its setup snapshot), halves the step, compares from the
    head's loss on and trains, instead of rejecting the same head until the run fails."""
    cfg = _cfg(tmp_path, npz, key_dir, "resumed-rise", num_server_rounds=3)
    run_dir = Path(cfg.run_dir)
    with pytest.raises(ServerKilled):
        _run(cfg, grid_class=DyingAtRound2)
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None and ckpt.server_round == 1
    state = ckpt.history["info"]["focal_guard_state"]
    assert state["standing"] == 1  # round 1's update, not yet checked by a loss
    lr = state["lr"]
    state["prev"] = state["first"] = state["prev"] / 4  # as if the last update had raised the loss
    save_checkpoint(run_dir, ckpt)

    grid = _run(cfg.replace(resume=True))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    guard = metrics["info"]["focal_guard"]
    assert len(guard) == 1 and "resumed checkpoint's head rose" in guard[0], guard
    loss2, loss3 = (metrics["rounds"][i]["train"]["train-loss"] for i in (1, 2))
    assert loss3 == pytest.approx(loss2, rel=1e-5)  # round 3 measured the kept (checkpointed) head
    state = metrics["info"]["focal_guard_state"]
    assert state["lr"] == pytest.approx(lr / 2) and state["prev"] == pytest.approx(loss3)
    assert state["standing"] == 2  # the checkpoint's update and round 3's
    assert metrics["info"]["final_train_loss"] < loss3  # round 3's update was applied and kept
    fwd = [m for m in grid.sent if m.metadata.message_type == wire.ACTION_FOCAL
           and not m.content[wire.CONFIG][wire.FOCAL_CHECK_ONLY]]
    assert [m.content[wire.CONFIG][wire.SERVER_ROUND] for m in fwd] == [2, 2, 2, 3, 3, 3]


def test_focal_resumed_run_whose_checkpointed_head_overflows_fails_at_once(tmp_path, npz, key_dir):
    """The checkpointed head's logits are beyond CKKS's safe range: it is the only rollback point,
    so halving the step cannot help. The resumed run fails at its first step, naming the
    checkpoint, instead of rejecting the same head until ten halvings stop it."""
    from flower_focal.crypto import CkksKeyHolder, SecretContext
    from flower_focal.focal import FocalDiverged, init_head
    from flower_focal.checkpoint import Checkpoint
    from flwr.app import ArrayRecord

    cfg = _cfg(tmp_path, npz, key_dir, "resumed-overflow", num_server_rounds=2,
               fraction_evaluate=0.0)  # no validation uploads or evaluation: only the steps matter
    run_dir = Path(cfg.run_dir)
    with pytest.raises(ServerKilled):
        _run(cfg, grid_class=DyingAtRound2)
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None and ckpt.server_round == 1
    info = ckpt.history["info"]
    holder = CkksKeyHolder(SecretContext.load(key_dir / "secret.ctx"))
    k = int(info["num_classes"])
    lay = FocalLayout(info["model_parameters"] // k - 1, k, holder.slots, cfg.focal_block)
    huge = wire.he_array(init_head(holder, lay, seed=0, std=1e3))  # logits ~1e4: far out of range
    save_checkpoint(run_dir, Checkpoint(1, ArrayRecord({wire.FOCAL_HEAD: huge}), ckpt.history, ckpt.config))

    grids: list[LoopbackGrid] = []
    said = r"checkpoint \S+checkpoint\.npz \(after round 1\) gives logits beyond.*without resume"
    with pytest.raises(FocalDiverged, match=said):
        _run(cfg.replace(resume=True), hook=grids.append)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "halving the step cannot help" in metrics["info"]["error"]
    assert metrics["info"]["focal_guard_state"]["backoffs"] == 0  # no halving was tried
    steps = [m for m in grids[0].sent if m.metadata.message_type == wire.ACTION_FOCAL]
    assert [m.content[wire.CONFIG][wire.FOCAL_STEP] for m in steps] == [2, 2, 2]  # one step, not ten


@pytest.mark.parametrize("min_replies", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_institution_crashing_mid_training_is_left_out(tmp_path, npz, key_dir, min_replies):
    # also: fraction-evaluate 0.5 evaluates 2 of the 3 institutions (min-evaluate-nodes 2)
    cfg = _cfg(tmp_path, npz, key_dir, "crash", min_train_replies=min_replies, fraction_evaluate=0.5)

    def crash_pid2(grid: LoopbackGrid) -> None:
        grid.crash_from_round[grid.node_ids[2]] = 2  # partition 2 dies from round 2 on

    grid = _run(cfg, crash_pid2)
    metrics = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    # only round 1's update stands: with min-train-replies 3 rounds 2 and 3 update nothing; with 1,
    # round 3's loss rose (the twin's guard does the same) and round 2's update was rolled back
    assert metrics["info"]["focal_guard_state"]["standing"] == 1
    assert len(metrics["info"].get("focal_guard", [])) == (1 if min_replies == 1 else 0)
    assert [sorted(r["train_institutions"]) for r in metrics["rounds"]] == [
        ["0", "1", "2"], ["0", "1"], ["0", "1"]]
    assert any("institution 2" in f for f in metrics["rounds"][1]["failures"])
    evaluated = [m for m in grid.sent if m.metadata.message_type == wire.ACTION_FOCAL_EVALUATE]
    assert len(evaluated) == 2 * ROUNDS
    train = _institutions(grid, "train")
    k = int(json.loads((Path(cfg.run_dir) / "model.json").read_text())["num_classes"])
    if min_replies == 1:  # rounds 2 and 3 train with the two survivors
        plain = train_plaintext(train, k, epochs=ROUNDS, init_seed=cfg.seed,
                                absent={1: {"2"}, 2: {"2"}, 3: {"2"}})
    else:  # 2 replies < min-train-replies 3: the head is left as round 1 made it
        plain = train_plaintext(train, k, epochs=1, init_seed=cfg.seed)
        for rnd in metrics["rounds"][1:]:
            assert rnd["train"] == {} and any("min-train-replies" in f for f in rnd["failures"])
    assert _dlogits(_head(Path(cfg.run_dir), key_dir), plain.head, train) < 1e-3


@pytest.mark.slow
def test_focal_resumes_a_killed_server_to_the_uninterrupted_result(tmp_path, npz, key_dir):
    # momentum restarts on resume (institutions' velocities are not checkpointed): compare without;
    # the loss guard's state (step, reference losses) is restored from metrics.json
    cfg = _cfg(tmp_path, npz, key_dir, "killed", focal_momentum=0.0)
    run_dir = Path(cfg.run_dir)
    with pytest.raises(ServerKilled):
        _run(cfg, grid_class=DyingGrid)
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None and ckpt.server_round == DyingGrid.DIE_AT - 1
    assert list(ckpt.arrays.keys()) == [wire.FOCAL_HEAD]  # the server checkpoints the encrypted head
    assert ckpt.arrays[wire.FOCAL_HEAD].stype == wire.HE_STYPE

    grid = _run(cfg.replace(resume=True))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert metrics["info"]["resumed_after_round"] == 2
    # the resumed server re-collected the embeddings, kept the checkpointed head, ran round 3 only
    embed = [m for m in grid.sent if m.metadata.message_type == wire.ACTION_EMBED
             and not m.content[wire.CONFIG].get(wire.FOCAL_STATS_ONLY, False)]  # (+ 3 statistics)
    assert len(embed) == 3 and not any(m.content[wire.CONFIG][wire.FOCAL_INIT_HEAD] for m in embed)
    fwd = [m for m in grid.sent if m.metadata.message_type == wire.ACTION_FOCAL
           and not m.content[wire.CONFIG][wire.FOCAL_CHECK_ONLY]]  # (+ 3 final loss checks)
    assert [m.content[wire.CONFIG][wire.SERVER_ROUND] for m in fwd] == [3, 3, 3]
    assert metrics["info"]["focal_guard_state"]["first"] == pytest.approx(plain_first_loss(metrics), abs=1e-4)
    assert {m.content[wire.CONFIG][wire.FOCAL_STEP] for m in fwd} == {3}
    # same head as an uninterrupted run (its twin; fresh CKKS noise per encryption)
    train = _institutions(grid, "train")
    k = int(json.loads((run_dir / "model.json").read_text())["num_classes"])
    plain = train_plaintext(train, k, epochs=ROUNDS, init_seed=cfg.seed, momentum=0.0)
    assert _dlogits(_head(run_dir, key_dir), plain.head, train) < 1e-3
    _rounds_match_twin(metrics, plain)


def test_focal_refuses_a_secret_context_and_a_non_focal_preset(key_dir, tmp_path):
    from flower_focal.crypto import PublicContext, SecretContext

    with pytest.raises(ValueError, match="public context"):
        Focal(he_public=SecretContext.load(key_dir), lr=0.1)  # type: ignore[arg-type]
    other = keygen(tmp_path / "compact", "compact")
    with pytest.raises(ValueError, match="FOCAL preset"):
        Focal(he_public=PublicContext.load(other / "public.ctx"), lr=0.1)


@pytest.mark.slow
def test_focal_hydra_ray_simulation_with_the_default_backbone(tmp_path):
    """``python -m simulations.run strategy=focal``: Ray, EfficientNet-Lite0 (at 32 px), temporary
    focal keys, model.he decrypted into model.pt, scored by ``flower-focal evaluate``."""
    # 5 classes: 3 ciphertext class pairs instead of the 9-class fixture's 5 (server work per step)
    npz = write_synthetic_npz(tmp_path / "retina.npz", "synthetic-retina", sizes=(60, 30, 30))
    run_dir = tmp_path / "sim"
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    cmd = [
        sys.executable, "-m", "simulations.run", "strategy=focal", "dataset=medmnist",
        f"dataset.path={npz}", "dataset.image_size=28", "partition=iid", "num_institutions=3",
        "num_rounds=2", "train.lr=0.05", "device=cpu", "strategy.fraction_evaluate=0.67",
        "strategy.focal.backbone=efficientnet-lite0", "strategy.focal.backbone_input_size=32",
        f"strategy.focal.embedding_cache_dir={tmp_path / 'emb'}", "federation.ray_num_cpus=2",
        f"run_dir={run_dir}", f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    out = subprocess.run(cmd, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["config"]["strategy"] == "focal" and metrics["config"]["backbone"] == "efficientnet-lite0"
    assert metrics["info"]["model_parameters"] == 1281 * 5  # d=1280 (+ bias) x 5 classes
    for rnd in metrics["rounds"]:
        assert sorted(rnd["train_institutions"]) == ["0", "1", "2"]
        assert len(rnd["evaluate_institutions"]) == 2  # fraction-evaluate 0.67 of 3
        assert 0.0 <= rnd["evaluate"]["auroc"] <= 1.0 and not rnd["failures"]
    assert metrics["rounds"][1]["train"]["train-loss"] < metrics["rounds"][0]["train"]["train-loss"]
    for name in ("model.he", "model.pt", "model.json", "metrics.json", "summary.md"):
        assert (run_dir / name).is_file(), name
    spec = json.loads((run_dir / "model.json").read_text())
    assert spec["model"] == "focal-linear" and spec["backbone"] == "efficientnet-lite0"
    assert spec["backbone_input_size"] == 32
    out = subprocess.run(
        [sys.executable, "-m", "flower_focal.cli", "evaluate", "--run-dir", str(run_dir),
         "--data", str(npz), "--split", "test", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["strategy"] == "focal" and report["n"] == 30 and 0.0 <= report["auroc_macro"] <= 1.0
