"""FedAvg composes with Flower's client-side DP wrapper and clipping mod."""

from __future__ import annotations

import json

import torch
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from clients.client_app import app as client_app
from flower_focal.config import RunConfig
from flower_focal.server import run_server
from flower_focal.strategy import FedAvg, build_strategy
from flower_focal.strategy.registry import core_strategy
from flower_focal.testing import LoopbackGrid


def _run(tmp_path, name, **kw):
    cfg = RunConfig(num_server_rounds=2, num_samples=120, min_available_nodes=3, model="lenet-sigmoid",
                    lr=0.01, run_dir=str(tmp_path / name), **kw)
    run_server(LoopbackGrid(client_app, 3, cfg.to_flower()), cfg)
    return tmp_path / name


def test_dp_wraps_flower_focal_fedavg():
    strategy = build_strategy(RunConfig(dp_noise_multiplier=1.0, min_available_nodes=4))
    assert isinstance(strategy, DifferentialPrivacyClientSideFixedClipping)
    assert isinstance(core_strategy(strategy), FedAvg)


def test_fedavg_with_flower_dp_runs_clips_and_adds_noise(tmp_path, caplog):
    plain = _run(tmp_path, "plain")
    caplog.set_level("INFO")
    dp = _run(tmp_path, "dp", dp_noise_multiplier=0.5, dp_clipping_norm=0.5)
    assert "parameters are clipped" in caplog.text  # Flower's fixedclipping_mod ran at the clients
    metrics = json.loads((dp / "metrics.json").read_text())
    assert metrics["status"] == "completed" and len(metrics["rounds"]) == 2
    a, b = torch.load(plain / "model.pt"), torch.load(dp / "model.pt")
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) > 1e-3  # noise changed it


def test_without_dp_the_clipping_mod_is_a_pass_through(tmp_path, caplog):
    caplog.set_level("INFO")
    _run(tmp_path, "plain")
    assert "parameters are clipped" not in caplog.text
