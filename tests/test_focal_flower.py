"""FOCAL on Flower: loopback parity with the plaintext twin, ciphertext-only replies, dropout,
and one real Ray simulation (slow) through ``simulate()`` and ``flower-focal evaluate``."""

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
from flower_focal import keys
from flower_focal.artifacts import decrypt_model, load_model
from flower_focal.client.focal import site_embeddings
from flower_focal.client.handlers import site_from_context
from flower_focal.config import RunConfig
from flower_focal.crypto import keygen
from flower_focal.focal import FocalLayout, Institution, predict_logits, softmax, train_plaintext
from flower_focal.server import run_server
from flower_focal.strategy import build_strategy
from flower_focal.strategy.focal import Focal
from tests.conftest import LoopbackGrid, write_synthetic_npz

ROUNDS, LR = 3, 0.5


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory) -> Path:
    return keygen(tmp_path_factory.mktemp("keys"), "focal")


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    return write_synthetic_npz(tmp_path_factory.mktemp("data") / "synth.npz", sizes=(90, 45, 30))


def _cfg(tmp_path: Path, npz: Path, key_dir: Path, name: str, **kw) -> RunConfig:
    return RunConfig(
        strategy="focal", num_server_rounds=ROUNDS, min_available_nodes=3, lr=LR,
        dataset="medmnist", data_path=str(npz), image_size=28, partitioner="iid",
        backbone="monai-resnet18", backbone_input_size=32, embedding_cache_dir=str(tmp_path / "emb"),
        he_key_dir=str(key_dir), run_dir=str(tmp_path / name), device="cpu", seed=7, **kw,
    )


def _run(cfg: RunConfig, hook=None) -> LoopbackGrid:
    grid = LoopbackGrid(client_app, 3, cfg.to_flower())
    if hook:
        hook(grid)
    run_server(grid, cfg)
    return grid


def _institutions(grid: LoopbackGrid, split: str) -> list[Institution]:
    out = []
    for nid in grid.node_ids:
        site = site_from_context(grid.contexts[nid])
        x, y = site_embeddings(site, split)
        out.append(Institution(str(site.partition_id), x, y))
    return sorted(out, key=lambda i: int(i.name))


def _head(run_dir: Path, key_dir: Path) -> np.ndarray:
    decrypt_model(run_dir, key_dir)
    model, spec = load_model(run_dir)
    assert spec.backbone == "monai-resnet18" and spec.model == "focal-linear"
    w = model.head.weight.detach().double().numpy().T
    return np.vstack([w, model.head.bias.detach().double().numpy()[None, :]])


def _auroc(head: np.ndarray, val: list[Institution]) -> float:
    x = np.vstack([i.x for i in val])
    y = np.concatenate([i.y for i in val])
    lay = FocalLayout(x.shape[1], head.shape[1])
    p = softmax(predict_logits(head, lay, x))
    present = np.unique(y)
    return float(roc_auc_score(y, p[:, present] / p[:, present].sum(1, keepdims=True),
                               multi_class="ovr", average="macro", labels=present))


def test_focal_matches_plaintext_twin_and_server_sees_only_ciphertext(tmp_path, npz, key_dir):
    cfg = _cfg(tmp_path, npz, key_dir, "run")
    strategy = build_strategy(cfg)
    assert isinstance(strategy, Focal) and not strategy.he_public.holds_secret_key
    assert not strategy.evaluator.holds_secret_key

    grid = _run(cfg)
    run_dir = Path(cfg.run_dir)
    assert not (run_dir / "model.pt").exists()  # the server only wrote model.he
    assert (run_dir / "model.he").is_file()

    # every Array that reached the server is a ciphertext envelope
    actions = set()
    for reply in grid.received:
        assert not reply.has_error(), reply.error.reason
        actions.add(reply.metadata.message_type)
        for record in reply.content.array_records.values():
            for name, arr in record.items():
                assert arr.stype == keys.HE_STYPE, (reply.metadata.message_type, name)
    assert {keys.ACTION_EMBED, keys.ACTION_FOCAL, keys.ACTION_FOCAL_EVALUATE} <= actions
    # each forward message carries one institution's logits only
    fwd = [m for m in grid.sent if m.metadata.message_type == keys.ACTION_FOCAL]
    assert len(fwd) == 3 * ROUNDS
    assert all(list(m.content[keys.ARRAYS].keys()) == [keys.FOCAL_LOGITS] for m in fwd)

    train, val = _institutions(grid, "train"), _institutions(grid, "val")
    k = int(json.loads((run_dir / "model.json").read_text())["num_classes"])
    plain = train_plaintext(train, k, epochs=ROUNDS, lr=LR, init_seed=cfg.seed, block=cfg.focal_block)
    head = _head(run_dir, key_dir)
    dw = float(np.abs(head - plain.head).max())
    a_he, a_pl = _auroc(head, val), _auroc(plain.head, val)
    print(f"focal loopback: max|dW|={dw:.2e}, auroc {a_he:.4f} vs {a_pl:.4f}")
    assert dw < 1e-4 and abs(a_he - a_pl) < 0.002

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and len(metrics["rounds"]) == ROUNDS
    for rnd, hist in zip(metrics["rounds"], plain.history):
        assert sorted(rnd["train_institutions"]) == ["0", "1", "2"]
        assert rnd["train"]["train-loss"] == pytest.approx(hist["loss"], abs=1e-4)
        assert 0.0 <= rnd["evaluate"]["auroc"] <= 1.0 and not rnd["failures"]


def test_institution_crashing_mid_training_is_left_out(tmp_path, npz, key_dir):
    cfg = _cfg(tmp_path, npz, key_dir, "crash")

    def crash_pid2(grid: LoopbackGrid) -> None:
        grid.crash_from_round[grid.node_ids[2]] = 2  # partition 2 dies from round 2 on

    grid = _run(cfg, crash_pid2)
    metrics = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [sorted(r["train_institutions"]) for r in metrics["rounds"]] == [
        ["0", "1", "2"], ["0", "1"], ["0", "1"]]
    assert any("institution 2" in f for f in metrics["rounds"][1]["failures"])
    train = _institutions(grid, "train")
    k = int(json.loads((Path(cfg.run_dir) / "model.json").read_text())["num_classes"])
    plain = train_plaintext(train, k, epochs=ROUNDS, lr=LR, init_seed=cfg.seed,
                            absent={1: {"2"}, 2: {"2"}})
    assert float(np.abs(_head(Path(cfg.run_dir), key_dir) - plain.head).max()) < 1e-4


def test_focal_refuses_a_secret_context_and_a_non_focal_preset(key_dir, tmp_path):
    from flower_focal.crypto import PublicContext, SecretContext

    with pytest.raises(ValueError, match="public context"):
        Focal(he_public=SecretContext.load(key_dir), lr=0.1)  # type: ignore[arg-type]
    other = keygen(tmp_path / "compact", "compact")
    with pytest.raises(ValueError, match="FOCAL preset"):
        Focal(he_public=PublicContext.load(other / "public.ctx"), lr=0.1)


@pytest.mark.slow
def test_focal_real_ray_simulation_end_to_end(tmp_path, npz):
    from flower_focal.simulation import Federation, simulate

    cfg = RunConfig(
        strategy="focal", num_server_rounds=2, min_available_nodes=3, lr=LR,
        dataset="medmnist", data_path=str(npz), image_size=28, partitioner="iid",
        backbone="monai-resnet18", backbone_input_size=32, embedding_cache_dir=str(tmp_path / "emb"),
        run_dir=str(tmp_path / "sim"), device="cpu",
    )
    result = simulate(cfg, Federation(num_supernodes=3, ray_num_cpus=2), timeout_s=900, echo=False)
    assert result.status == "finished:completed"
    metrics = result.metrics()
    assert metrics["status"] == "completed" and [r["round"] for r in metrics["rounds"]] == [1, 2]
    for rnd in metrics["rounds"]:
        assert sorted(rnd["train_institutions"]) == ["0", "1", "2"]
        assert sorted(rnd["evaluate_institutions"]) == ["0", "1", "2"]
        assert 0.0 <= rnd["evaluate"]["auroc"] <= 1.0
    for name in ("model.he", "model.pt", "model.json", "metrics.json", "summary.md"):
        assert (result.run_dir / name).is_file(), name
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    out = subprocess.run(
        [sys.executable, "-m", "flower_focal.cli", "evaluate", "--run-dir", str(result.run_dir),
         "--data", str(npz), "--split", "test", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["strategy"] == "focal" and report["n"] == 30 and 0.0 <= report["auroc_macro"] <= 1.0
