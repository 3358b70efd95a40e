"""Strategy comparison report (flower_focal.compare, `flower-focal report`, the Hydra callback).

Fast tests compare run directories written by real runs (``run_server`` on a loopback grid of
real ClientApps); the slow test launches the one command (a Hydra multirun over fedavg,
he-fedavg and focal on Flower's Ray engine) and checks that the report's numbers are the
numbers its runs wrote.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from clients.client_app import app as client_app
from flower_focal import cli
from flower_focal.compare import (
    PLOTS,
    REPORT_JSON,
    NotComparable,
    collect,
    differences,
    expand_run_dirs,
    fmt_bytes,
    write_report,
)
from flower_focal.config import RunConfig
from flower_focal.crypto import keygen
from flower_focal.server import run_server
from flower_focal.testing import LoopbackGrid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A fedavg and a he-fedavg run on the same data/partition/seed (2 institutions, 2 rounds)."""
    base = tmp_path_factory.mktemp("runs")
    key_dir = keygen(base / "keys", "compact")
    for strategy in ("fedavg", "he-fedavg"):
        cfg = RunConfig(
            strategy=strategy, num_server_rounds=2, min_available_nodes=2, dataset="synthetic-pathology",
            num_samples=60, image_size=28, model="lenet-sigmoid", lr=0.01, seed=3, device="cpu",
            he_key_dir=str(key_dir), run_dir=str(base / "sweep" / strategy),
        )
        run_server(LoopbackGrid(client_app, 2, cfg.to_flower()), cfg)
    return base / "sweep"


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _copy_run(src: Path, dst: Path, **config_changes) -> Path:
    """A copy of a run directory whose config.json / metrics.json config differ by ``config_changes``."""
    shutil.copytree(src, dst)
    for name in ("config.json", "metrics.json"):
        doc = json.loads((dst / name).read_text())
        target = doc if name == "config.json" else doc["config"]
        target.update(config_changes)
        (dst / name).write_text(json.dumps(doc))
    return dst


def _summary_row(report_md: str, label: str) -> list[str]:
    section = report_md.split("## Summary", 1)[1].split("\n\n", 2)[1]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no summary row for {label!r} in:\n{section}")


def check_report_matches_runs(out_dir: Path, run_dirs: list[Path]) -> dict:
    """Every number in report.json / report.md is the one in the run's metrics.json."""
    doc = json.loads((out_dir / REPORT_JSON).read_text())
    md = (out_dir / "report.md").read_text()
    by_dir = {Path(r["run_dir"]): r for r in doc["runs"]}
    assert set(by_dir) == {d.resolve() for d in run_dirs}
    for run_dir in run_dirs:
        metrics, entry = _metrics(run_dir), by_dir[run_dir.resolve()]
        rounds, n_inst = metrics["rounds"], metrics["info"]["institutions"]
        assert entry["strategy"] == metrics["strategy"] and entry["status"] == metrics["status"]
        assert entry["institutions"] == n_inst
        assert entry["final_accuracy"] == rounds[-1]["evaluate"]["accuracy"]
        assert entry["final_auroc"] == rounds[-1]["evaluate"]["auroc"]
        assert entry["wall_time_s"] == pytest.approx(sum(r["wall_time_s"] for r in rounds), rel=1e-12)
        assert entry["bytes_up_total"] == sum(r["bytes_up"] for r in rounds)
        assert entry["bytes_down_total"] == sum(r["bytes_down"] for r in rounds)
        assert [r["round"] for r in entry["rounds"]] == [r["round"] for r in rounds]
        for got, want in zip(entry["rounds"], rounds, strict=True):
            assert got["accuracy"] == want["evaluate"]["accuracy"]
            assert got["auroc"] == want["evaluate"]["auroc"]
            assert got["wall_time_s"] == want["wall_time_s"]
            assert got["bytes_up"] == want["bytes_up"] > 0
            assert got["bytes_down"] == want["bytes_down"] > 0
            assert got["bytes_up_per_institution"] == want["bytes_up"] / n_inst
            assert got["bytes_down_per_institution"] == want["bytes_down"] / n_inst
        audit = run_dir / "audit.json"
        if audit.is_file():
            assert entry["leakage"]["leakage_rate"] == json.loads(audit.read_text())["leakage_rate"]
        else:
            assert entry["leakage"] is None
        # the Markdown table shows the same numbers
        row = _summary_row(md, entry["label"])
        up_per_round = sum(r["bytes_up"] for r in rounds) / n_inst / len(rounds)
        assert row[2] == f"{rounds[-1]['evaluate']['accuracy']:.4f}"
        assert row[3] == f"{rounds[-1]['evaluate']['auroc']:.4f}"
        assert row[4] == f"{sum(r['wall_time_s'] for r in rounds):.1f}"
        assert row[5] == fmt_bytes(up_per_round)
        assert row[8].startswith("not audited" if not audit.is_file()
                                 else f"{json.loads(audit.read_text())['leakage_rate']:.2f}")
    audited = any((d / "audit.json").is_file() for d in run_dirs)
    for key, name in PLOTS.items():
        if key == "leakage" and not audited:  # no empty chart when nothing was audited
            assert not (out_dir / name).exists() and name not in md and key not in doc["plots"]
            continue
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        assert f"]({name})" in md
    return doc


def test_report_numbers_are_the_runs_numbers(runs, tmp_path):
    report = write_report([runs / "fedavg", runs / "he-fedavg"], tmp_path / "report")
    assert report == (tmp_path / "report" / "report.md").resolve()
    doc = check_report_matches_runs(tmp_path / "report", [runs / "fedavg", runs / "he-fedavg"])
    assert [r["strategy"] for r in doc["runs"]] == ["fedavg", "he-fedavg"]
    assert doc["differences"] == []
    assert doc["common"]["seed"] == 3 and doc["common"]["institutions"] == 2
    # he-fedavg's ciphertext uploads are larger than fedavg's float32 model (and both are counted)
    assert doc["runs"][1]["bytes_up_total"] > doc["runs"][0]["bytes_up_total"]
    md = report.read_text()
    assert "not comparable" not in md and md.count("not audited") >= 2


def test_a_sweep_directory_stands_for_its_runs_in_strategy_order(runs, tmp_path):
    assert expand_run_dirs([runs]) == sorted([(runs / "fedavg").resolve(), (runs / "he-fedavg").resolve()])
    ordered = collect([runs / "he-fedavg", runs / "fedavg"])
    assert [r.strategy for r in ordered] == ["fedavg", "he-fedavg"]
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        expand_run_dirs([tmp_path])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect([tmp_path / "missing"])


def test_audit_json_gives_the_leakage_rate_and_a_bad_one_is_refused(runs, tmp_path):
    audited = _copy_run(runs / "fedavg", tmp_path / "fedavg")
    (audited / "audit.json").write_text(json.dumps({
        "strategy": "fedavg", "threat": "server", "leakage_rate": 0.75, "ssim_threshold": 0.6,
        "rule": "SSIM >= 0.6", "ssim": [0.9, 0.8, 0.7, 0.1], "psnr": [30.0, 25.0, 22.0, 9.0],
        "attackable": True, "reason": "plaintext gradients", "institution_side": None,
        "config": {"attack": "idlg", "num_samples": 4}, "wall_time_s": 1.0,
    }))
    out = tmp_path / "report"
    write_report([audited, runs / "he-fedavg"], out)
    doc = check_report_matches_runs(out, [audited, runs / "he-fedavg"])
    leak = doc["runs"][0]["leakage"]
    assert leak["leakage_rate"] == 0.75 and leak["attacked_samples"] == 4 and leak["attackable"]
    assert doc["runs"][1]["leakage"] is None
    assert "| fedavg (synthetic-pathology) | 0.75 | yes | 4 |" in (out / "report.md").read_text()

    (audited / "audit.json").write_text(json.dumps({"leakage_rate": 1.5}))
    with pytest.raises(ValueError, match=r"audit.json.*leakage_rate"):
        collect([audited])


def test_runs_that_differ_in_seed_or_data_are_refused_unless_allowed(runs, tmp_path):
    other = _copy_run(runs / "he-fedavg", tmp_path / "he-seed9", seed=9, **{"num-samples": 80})
    with pytest.raises(NotComparable) as exc:
        write_report([runs / "fedavg", other], tmp_path / "refused")
    assert "seed differs: fedavg (synthetic-pathology)=3, he-fedavg (synthetic-pathology)=9" in str(exc.value)
    assert "num-samples differs" in str(exc.value)
    assert not (tmp_path / "refused").exists()
    report = write_report([runs / "fedavg", other], tmp_path / "forced", allow_mismatch=True)
    md = report.read_text()
    assert "The runs are not comparable" in md and "seed differs" in md


def test_a_failed_run_or_other_institution_count_is_a_difference(runs, tmp_path):
    failed = _copy_run(runs / "he-fedavg", tmp_path / "failed")
    doc = json.loads((failed / "metrics.json").read_text())
    doc["status"] = "failed"
    doc["info"]["institutions"] = 3
    (failed / "metrics.json").write_text(json.dumps(doc))
    problems = differences(collect([runs / "fedavg", failed]))
    assert any("did not complete" in p and "'failed'" in p for p in problems)
    assert any(p.startswith("institutions differ") for p in problems)


def test_two_runs_of_one_strategy_are_labelled_by_dataset_and_directory(runs, tmp_path):
    again = _copy_run(runs / "fedavg", tmp_path / "fedavg-again")
    labels = [r.label for r in collect([runs / "fedavg", again])]
    assert labels == ["fedavg (synthetic-pathology, fedavg)", "fedavg (synthetic-pathology, fedavg-again)"]
    assert [r.label for r in collect([runs])] == ["fedavg (synthetic-pathology)",
                                                  "he-fedavg (synthetic-pathology)"]


def _medmnist_run(src: Path, dst: Path, name: str) -> Path:
    """A copy of ``src`` that says it ran on ``/data/<name>/<name>.npz``."""
    return _copy_run(src, dst, dataset="medmnist", **{"data-path": f"/data/{name}/{name}.npz"})


def test_the_same_strategy_on_two_datasets_is_refused_and_rows_name_the_dataset(runs, tmp_path):
    # two Hydra sweeps give the same job directory name: 0-fedavg-medmnist
    path = _medmnist_run(runs / "fedavg", tmp_path / "a" / "0-fedavg-medmnist", "pathmnist")
    retina = _medmnist_run(runs / "fedavg", tmp_path / "b" / "0-fedavg-medmnist", "retinamnist")
    with pytest.raises(NotComparable, match=r"data-path differs: fedavg \(pathmnist\)='/data/pathmnist/"
                       r"pathmnist.npz', fedavg \(retinamnist\)='/data/retinamnist/retinamnist.npz'"):
        write_report([path, retina], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    # the same dataset twice under one directory name: still distinguishable, still checked
    again = _medmnist_run(runs / "fedavg", tmp_path / "c" / "0-fedavg-medmnist", "pathmnist")
    assert [r.label for r in collect([path, again])] == [
        "fedavg (pathmnist, a/0-fedavg-medmnist)", "fedavg (pathmnist, c/0-fedavg-medmnist)"]
    seed9 = _copy_run(again, tmp_path / "d" / "0-fedavg-medmnist", seed=9)
    with pytest.raises(NotComparable, match="seed differs"):
        write_report([path, seed9], tmp_path / "refused")


def test_allow_mismatch_separates_the_incomparable_runs(runs, tmp_path):
    path = _medmnist_run(runs / "fedavg", tmp_path / "a" / "0-fedavg-medmnist", "pathmnist")
    path_he = _medmnist_run(runs / "he-fedavg", tmp_path / "a" / "1-he-fedavg-medmnist", "pathmnist")
    retina = _medmnist_run(runs / "fedavg", tmp_path / "b" / "0-fedavg-medmnist", "retinamnist")
    report = write_report([path, retina, path_he], tmp_path / "forced", allow_mismatch=True)
    md = report.read_text()
    doc = json.loads((tmp_path / "forced" / REPORT_JSON).read_text())
    assert [g["runs"] for g in doc["groups"]] == [["fedavg (pathmnist)", "he-fedavg (pathmnist)"],
                                                  ["fedavg (retinamnist)"]]
    assert "data-path" not in doc["common"]  # not "the same for every run"
    assert doc["groups"][1]["common"]["data-path"] == "/data/retinamnist/retinamnist.npz"
    assert "## Summary, group 1 of 2: data-path=/data/pathmnist/pathmnist.npz" in md
    assert "## Summary, group 2 of 2: data-path=/data/retinamnist/retinamnist.npz" in md
    group1 = md.split("group 1 of 2", 1)[1].split("## Summary, group 2", 1)[0]
    assert "| fedavg (pathmnist) |" in group1 and "retinamnist) |" not in group1
    assert "compare rows only within a group" in md


def test_report_cli(runs, tmp_path, capsys):
    assert cli.main(["report", "--runs", str(runs), "--out", str(tmp_path / "cli")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report"] == str((tmp_path / "cli" / "report.md").resolve())
    assert printed["differences"] == []
    check_report_matches_runs(tmp_path / "cli", [runs / "fedavg", runs / "he-fedavg"])

    other = _copy_run(runs / "he-fedavg", tmp_path / "other", seed=9)
    assert cli.main(["report", "--runs", str(runs / "fedavg"), str(other), "--out", str(tmp_path / "x")]) == 2
    assert "seed differs" in capsys.readouterr().err


def _callback_config(sweep_dir: Path, **report) -> object:
    return OmegaConf.create({
        "report": {"enabled": True, "dir": "report", "allow_mismatch": False, **report},
        "hydra": {"sweep": {"dir": str(sweep_dir)}, "overrides": {"task": ["strategy=fedavg,he_fedavg"]}},
    })


def test_hydra_callback_is_registered_and_writes_or_explains(runs, tmp_path, caplog):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from simulations.callbacks import CompareReport

    conf = Path(__file__).resolve().parents[1] / "simulations" / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="config", return_hydra_config=True)
    callback = instantiate(cfg.hydra.callbacks.compare_report)
    assert isinstance(callback, CompareReport)
    assert cfg.audit.enabled is False and cfg.report.enabled is True

    # no run directories recorded by on_job_end: the callback scans the sweep directory
    callback.on_multirun_end(_callback_config(runs))
    assert callback.report == runs / "report" / "report.md"
    check_report_matches_runs(runs / "report", [runs / "fedavg", runs / "he-fedavg"])
    assert "python -m simulations.run -m strategy=fedavg,he_fedavg" in callback.report.read_text()
    shutil.rmtree(runs / "report")

    sweep = tmp_path / "seeds"
    shutil.copytree(runs / "fedavg", sweep / "0")
    _copy_run(runs / "fedavg", sweep / "1", seed=4)
    callback = CompareReport()
    with caplog.at_level("WARNING", logger="flower_focal.report"):
        callback.on_multirun_end(_callback_config(sweep))
    assert callback.report is None and not (sweep / "report").exists()
    assert "seed differs" in caplog.text and "--allow-mismatch" in caplog.text

    callback.on_multirun_end(_callback_config(sweep, enabled=False))
    assert not (sweep / "report").exists()


def test_hydra_callback_compares_the_run_dirs_its_jobs_reported(runs, tmp_path):
    """Runs outside the sweep directory (run_dir=...) are found through on_job_end."""
    from hydra.core.utils import JobReturn, JobStatus

    from simulations.callbacks import CompareReport

    callback = CompareReport()
    callback.on_multirun_start(_callback_config(tmp_path))
    for name in ("he-fedavg", "fedavg"):
        ret = JobReturn(cfg=OmegaConf.create({"run_dir": str(runs / name)}), status=JobStatus.COMPLETED)
        callback.on_job_end(OmegaConf.create({}), job_return=ret)
    failed = JobReturn(cfg=OmegaConf.create({"run_dir": str(tmp_path / "x")}), status=JobStatus.FAILED)
    callback.on_job_end(OmegaConf.create({}), job_return=failed)
    callback.on_multirun_end(_callback_config(tmp_path))  # the sweep dir itself holds no runs
    assert callback.report == tmp_path / "report" / "report.md"
    check_report_matches_runs(tmp_path / "report", [runs / "fedavg", runs / "he-fedavg"])


def test_audit_hook_is_off_by_default_and_named_when_unavailable(tmp_path):
    from simulations.run import run_audit_for

    cfg = OmegaConf.create({"audit": {"enabled": False}})
    assert run_audit_for(cfg, RunConfig(), tmp_path) is None
    try:
        from flower_focal.audit import AuditConfig, run_audit  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="flower_focal.audit"):
            run_audit_for(OmegaConf.create({"audit": {"enabled": True}}), RunConfig(), tmp_path)
    assert not (tmp_path / "audit.json").exists()


def _audit_available() -> bool:
    try:
        from flower_focal.audit import AuditConfig, run_audit  # noqa: F401
    except ImportError:
        return False
    return True


TINY_AUDIT = {"enabled": True, "num_samples": 1, "iterations": 2, "batch_size": 1, "attack": None, "model": None}


@pytest.mark.skipif(not _audit_available(), reason="flower_focal.audit is not available")
def test_audit_hook_audits_the_run_and_the_report_shows_its_leakage(runs, tmp_path):
    from simulations.run import run_audit_for

    run_dir = shutil.copytree(runs / "fedavg", tmp_path / "fedavg")
    run_cfg = RunConfig.from_mapping(json.loads((run_dir / "config.json").read_text()))
    result = run_audit_for(OmegaConf.create({"audit": TINY_AUDIT}), run_cfg, run_dir)
    audit = json.loads((run_dir / "audit.json").read_text())
    assert audit == json.loads(json.dumps(result))
    cfg = audit["config"]
    assert (cfg["strategy"], cfg["dataset"], cfg["seed"], cfg["model"]) == ("fedavg", "synthetic-pathology", 3, "lenet-sigmoid")
    assert (cfg["num_samples"], cfg["iterations"], cfg["batch_size"]) == (1, 2, 1)
    out = tmp_path / "report"
    write_report([run_dir, runs / "he-fedavg"], out)
    doc = check_report_matches_runs(out, [run_dir, runs / "he-fedavg"])
    assert doc["runs"][0]["leakage"]["leakage_rate"] == audit["leakage_rate"]
    assert doc["runs"][0]["leakage"]["attackable"] is True


# ------------------------------------------------------------------------------ the one command
@pytest.mark.slow
def test_one_multirun_command_writes_the_report_of_the_runs_it_launched(tmp_path):
    """`python -m simulations.run -m strategy=fedavg,he_fedavg,focal ...` on Flower's Ray engine:
    3 runs (2 institutions, 2 rounds, synthetic data, cheap FOCAL backbone) and the report."""
    from flower_focal.simulation import repo_root

    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "simulations.run", "-m", "strategy=fedavg,he_fedavg,focal",
        "num_institutions=2", "num_rounds=2", "dataset=synthetic_pathology", "dataset.num_samples=120",
        "++strategy.focal.backbone=monai-resnet18", "++strategy.focal.backbone_input_size=32",
        f"++strategy.focal.embedding_cache_dir={tmp_path / 'emb'}", "federation.ray_num_cpus=2",
        f"hydra.sweep.dir={sweep}",
    ]
    audited = _audit_available()
    if audited:  # the leakage column from a real (tiny) audit of each run
        cmd += [f"audit.{k}={'null' if v is None else str(v).lower()}" for k, v in TINY_AUDIT.items()]
    env = {**__import__("os").environ}
    env["PATH"] = str(Path(sys.executable).parent) + ":" + env.get("PATH", "")
    out = subprocess.run(cmd, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dirs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [d.name for d in run_dirs] == [
        "0-fedavg-synthetic-pathology", "1-he-fedavg-synthetic-pathology", "2-focal-synthetic-pathology"]
    assert f"comparison report: {sweep / 'report' / 'report.md'}" in out.stdout
    doc = check_report_matches_runs(sweep / "report", run_dirs)
    assert [r["strategy"] for r in doc["runs"]] == ["fedavg", "he-fedavg", "focal"]
    assert doc["differences"] == [] and doc["common"]["institutions"] == 2
    for entry in doc["runs"]:
        assert entry["status"] == "completed" and len(entry["rounds"]) == 2
        assert 0.0 <= entry["final_auroc"] <= 1.0
        assert (entry["leakage"] is not None) == audited
    if audited:  # the server of he-fedavg and focal holds only ciphertexts
        assert [e["leakage"]["attackable"] for e in doc["runs"]] == [True, False, False]
        assert all(e["leakage"]["leakage_rate"] == 0.0 for e in doc["runs"][1:])


def test_plot_titles_name_the_dataset_and_bytes_ticks_cover_the_lines(runs, tmp_path):
    from flower_focal.compare import (
        bytes_figure,
        leakage_figure,
        metric_figure,
        wall_figure,
    )

    summaries = collect([runs])
    fig = metric_figure(summaries, "auroc", "macro AUROC")
    assert "synthetic-pathology" in fig.axes[0].get_title()
    assert "synthetic-pathology" in wall_figure(summaries)._suptitle.get_text()
    fig = bytes_figure(summaries)
    assert "synthetic-pathology" in fig._suptitle.get_text()
    fig.canvas.draw()
    for ax in fig.axes:
        top = max(max(line.get_ydata()) for line in ax.get_lines())
        ticks = ax.get_yticks()
        assert ticks.max() >= top and ax.get_ylim()[1] >= top  # no line above the top tick
        assert not [t.get_text() for t in ax.get_yticklabels(minor=True) if t.get_text()]
        labels = [t for t in ax.get_yticklabels() if t.get_text()]
        boxes = sorted((t.get_window_extent().y0, t.get_window_extent().y1) for t in labels)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(boxes)), "tick labels overlap"
    assert leakage_figure(summaries) is None  # nothing audited: no chart


def test_two_runs_of_one_strategy_do_not_look_alike_in_a_plot(runs, tmp_path):
    from flower_focal.compare import metric_figure

    retina = _medmnist_run(runs / "fedavg", tmp_path / "b" / "0-fedavg-medmnist", "retinamnist")
    ax = metric_figure(collect([runs / "fedavg", retina]), "auroc", "macro AUROC").axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["fedavg (synthetic-pathology)", "fedavg (retinamnist)"]
    assert lines[0].get_color() != lines[1].get_color()
    assert lines[0].get_marker() != lines[1].get_marker()
    assert "synthetic-pathology, retinamnist" in ax.get_title()
    assert list(ax.get_xticks()) == [1, 2]  # one tick per round


def test_curves_png_has_institution_curves_a_chance_line_and_the_dataset(runs):
    from flower_focal.history import RunHistory
    from flower_focal.reporting import curves_figure

    doc = _metrics(runs / "fedavg")
    history = RunHistory(strategy=doc["strategy"], config=doc["config"])
    history.restore(doc)
    history.info.update(doc["info"])
    fig = curves_figure(history)
    assert fig._suptitle.get_text() == "fedavg on synthetic-pathology, 2 institutions"
    titles = [ax.get_title() for ax in fig.axes]
    acc = fig.axes[titles.index("validation accuracy")]
    auroc = fig.axes[titles.index("validation macro AUROC")]
    for ax, chance in ((acc, 1 / 9), (auroc, 0.5)):
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels.count("federation") == 1 and "institutions" in labels
        grey = [line for line in ax.get_lines() if line.get_color() == "0.6"]
        assert len(grey) == 2  # one thin curve per institution
        chance_line = next(line for line in ax.get_lines() if line.get_label().startswith("chance"))
        assert list(chance_line.get_ydata()) == pytest.approx([chance, chance])
    assert not [line for line in fig.axes[0].get_lines() if line.get_label().startswith("chance")]
