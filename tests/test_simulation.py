"""Real Flower simulations (Ray backend through `flwr run`), the Hydra launcher and the CLI.

Slow (each simulation starts a local SuperLink and Ray: ~30 s on 2 cores); still run in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flower_focal.config import RunConfig
from flower_focal.simulation import Federation, SimulationFailed, repo_root, simulate
from tests.conftest import write_synthetic_npz

pytestmark = pytest.mark.slow

PERSONAL = ("personal-loss", "personal-accuracy", "personal-auroc")
ENV = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    return write_synthetic_npz(tmp_path_factory.mktemp("data") / "synthpath.npz")


@pytest.fixture(scope="module")
def launcher_run(npz, tmp_path_factory) -> Path:
    """One run through the Hydra launcher: 3 institutions, 2 rounds, MedMNIST-format file."""
    run_dir = tmp_path_factory.mktemp("hydra") / "run"
    cmd = [
        sys.executable, "-m", "simulations.run", "dataset=medmnist", f"dataset.path={npz}",
        "dataset.image_size=28", "num_institutions=3", "num_rounds=2", "seed=5",
        "partition=dirichlet", "partition.alpha=1.0", f"run_dir={run_dir}",
        f"hydra.run.dir={run_dir.parent / 'hydra'}",
    ]
    out = subprocess.run(cmd, cwd=repo_root(), env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir


def test_launcher_runs_a_real_ray_simulation_and_writes_the_run_directory(launcher_run):
    for name in ("metrics.json", "curves.png", "summary.md", "model.pt", "model.json", "config.json", "flwr.log"):
        assert (launcher_run / name).is_file(), name
    metrics = json.loads((launcher_run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["config"]["num-server-rounds"] == 2
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for rnd in metrics["rounds"]:
        assert sorted(rnd["train_institutions"]) == ["0", "1", "2"]
        assert sorted(rnd["evaluate_institutions"]) == ["0", "1", "2"]
        ev = rnd["evaluate"]
        assert 0.0 <= ev["accuracy"] <= 1.0 and 0.0 <= ev["auroc"] <= 1.0
        assert ev["num-examples"] == 60  # the whole val split, spread over institutions
        assert rnd["bytes_up"] > 0 and rnd["bytes_down"] > 0 and not rnd["failures"]
    assert "Ray" in (launcher_run / "flwr.log").read_text() or "simulation" in (launcher_run / "flwr.log").read_text().lower()
    assert "| 2 |" in (launcher_run / "summary.md").read_text()


def test_evaluate_cli_scores_the_final_model(launcher_run, npz):
    out = subprocess.run(
        [sys.executable, "-m", "flower_focal.cli", "evaluate", "--run-dir", str(launcher_run),
         "--data", str(npz), "--split", "test"],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(out.stdout)
    assert result["n"] == 60
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["auroc_macro"] <= 1.0


def test_same_seed_gives_the_same_global_model(launcher_run, npz, tmp_path):
    """A second run (through simulate() directly) with the launcher's config is bit-identical."""
    cfg = RunConfig.from_mapping(json.loads((launcher_run / "config.json").read_text()))
    again = simulate(cfg.replace(run_dir=str(tmp_path / "again")), Federation(num_supernodes=3), echo=False)
    a = torch.load(launcher_run / "model.pt")
    b = torch.load(again.run_dir / "model.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_run_raises_instead_of_looking_like_success(tmp_path):
    cfg = RunConfig(dataset="medmnist", data_path=str(tmp_path / "missing.npz"),
                    num_server_rounds=1, run_dir=str(tmp_path / "run"))
    with pytest.raises(SimulationFailed, match="finished:failed"):  # a failure inside Flower's run:
        simulate(cfg, Federation(num_supernodes=2), echo=False, check=False)  # preflight skipped
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert "describe" in metrics["info"]["error"] or "missing.npz" in metrics["info"]["error"]


def test_hydra_multirun_runs_each_setting(tmp_path):
    cmd = [
        sys.executable, "-m", "simulations.run", "-m", "seed=1,2", "num_institutions=2", "num_rounds=1",
        "dataset=synthetic_pathology", "dataset.num_samples=120", f"hydra.sweep.dir={tmp_path}",
    ]
    out = subprocess.run(cmd, cwd=repo_root(), env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = sorted(tmp_path.glob("*/metrics.json"))
    assert len(runs) == 2
    seeds = {json.loads(p.read_text())["config"]["seed"] for p in runs}
    assert seeds == {1, 2}


def test_he_fedavg_equals_fedavg_in_a_real_ray_simulation(npz, tmp_path):
    """Same seed, same data, 3 rounds on Flower's Ray engine: HE-FedAvg == FedAvg (<= 1e-5),
    with Ditto's personal models (which never leave the institutions) and their metrics too."""
    base = RunConfig(dataset="medmnist", data_path=str(npz), image_size=28, model="lenet-sigmoid",
                     lr=0.01, num_server_rounds=3, min_available_nodes=3, seed=11,
                     ditto_lambda=0.1, personal_epochs=1)
    runs = {}
    for strategy in ("fedavg", "he-fedavg"):
        cfg = base.replace(strategy=strategy, run_dir=str(tmp_path / strategy))
        runs[strategy] = simulate(cfg, Federation(num_supernodes=3), echo=False)
    plain = torch.load(runs["fedavg"].run_dir / "model.pt")
    he = torch.load(runs["he-fedavg"].run_dir / "model.pt")  # decrypted by the launcher
    assert max(float((plain[k].double() - he[k].double()).abs().max()) for k in plain) <= 1e-5
    mp, mh = runs["fedavg"].metrics()["rounds"], runs["he-fedavg"].metrics()["rounds"]
    for rp, rh in zip(mp, mh, strict=True):
        for key in ("loss", "accuracy", "auroc"):
            assert rh["evaluate"][key] == pytest.approx(rp["evaluate"][key], abs=1e-5)
        assert sorted(rp["evaluate_institutions"]) == sorted(rh["evaluate_institutions"]) == ["0", "1", "2"]
        for pid, m in rp["evaluate_institutions"].items():
            for key in PERSONAL:
                assert rh["evaluate_institutions"][pid][key] == pytest.approx(m[key], abs=1e-5), (pid, key)
    assert any(m["personal-loss"] != m["loss"] for m in mp[-1]["evaluate_institutions"].values())
    assert not list(runs["he-fedavg"].run_dir.glob("*.ctx"))  # no key files in the run directory
    # Ray keeps each institution's personal model across rounds as the in-process grid does
    # (tests/test_personalised.py checks there that it persists): same personal metrics
    from clients.client_app import app as client_app
    from flower_focal.server import run_server
    from flower_focal.testing import LoopbackGrid

    cfg = base.replace(run_dir=str(tmp_path / "loopback"))
    run_server(LoopbackGrid(client_app, 3, cfg.to_flower()), cfg)
    loop = json.loads((tmp_path / "loopback" / "metrics.json").read_text())["rounds"]
    for rp, rl in zip(mp, loop, strict=True):
        for pid, m in rp["evaluate_institutions"].items():
            for key in PERSONAL:
                assert rl["evaluate_institutions"][pid][key] == pytest.approx(m[key], abs=1e-5), (pid, key)


def test_a_killed_simulation_resumes_to_the_uninterrupted_result(npz, tmp_path):
    import threading
    import time

    from flower_focal.checkpoint import load_checkpoint
    from flower_focal.simulation import stop_processes_under

    cfg = RunConfig(dataset="medmnist", data_path=str(npz), image_size=28, model="lenet-sigmoid",
                    lr=0.01, local_epochs=3, num_server_rounds=4, min_available_nodes=2, seed=21)
    whole = simulate(cfg.replace(run_dir=str(tmp_path / "whole")), Federation(num_supernodes=2), echo=False)

    killed_dir, home = tmp_path / "killed", tmp_path / "home"
    outcome = {}

    def run():
        try:
            simulate(cfg.replace(run_dir=str(killed_dir)), Federation(num_supernodes=2), echo=False, flwr_home=home)
        except Exception as exc:  # the kill makes the run fail
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and not (killed_dir / "checkpoint.npz").exists():
        time.sleep(0.2)
    assert stop_processes_under(home, grace_s=0) > 0  # SIGTERM the SuperLink, SuperExec, ServerApp, Ray
    thread.join(timeout=120)
    done = load_checkpoint(killed_dir).server_round
    assert 1 <= done < 4 and "error" in outcome

    resumed = simulate(cfg.replace(run_dir=str(killed_dir), resume=True), Federation(num_supernodes=2), echo=False)
    metrics = resumed.metrics()
    assert metrics["status"] == "completed" and len(metrics["rounds"]) == 4
    assert metrics["info"]["resumed_after_round"] == done
    a, b = torch.load(whole.run_dir / "model.pt"), torch.load(killed_dir / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_packaged_app_runs_without_a_checkout(tmp_path):
    """From an installed wheel there is no pyproject next to the package: the generated app
    (flower_focal.apps, RunConfig's own run-config table) runs the same simulation."""
    from flower_focal.simulation import packaged_app_dir

    app = packaged_app_dir(tmp_path / "app")
    assert "flower_focal.apps:server_app" in (app / "pyproject.toml").read_text()
    result = simulate(RunConfig(num_server_rounds=1, num_samples=120, run_dir=str(tmp_path / "run")),
                      Federation(num_supernodes=2), app_dir=app, echo=False)
    assert result.status == "finished:completed"
    assert result.metrics()["status"] == "completed" and (result.run_dir / "model.pt").is_file()
