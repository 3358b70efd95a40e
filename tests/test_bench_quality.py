"""bench_quality's cross-validation (``--cv K``): the folds, the fold files, the summary and the
``quality-cv`` README renderer that reads it."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from flower_focal.simulation import repo_root
from tests.conftest import shared_npz

ROOT = repo_root()


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # readme_tables' dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


bench_quality = _module("bench_quality")
readme_tables = _module("readme_tables")

# imbalanced like RetinaMNIST: 7 classes, the smallest with 5 members
LABELS = np.repeat(np.arange(7), [40, 23, 17, 9, 5, 31, 12]).astype(np.uint8)[np.random.default_rng(3).permutation(137)]


def test_cv_folds_are_stratified_disjoint_and_cover_every_image():
    k = 5
    folds = bench_quality.cv_folds(LABELS, k)
    assert len(folds) == k
    joined = np.concatenate(folds)
    assert sorted(joined.tolist()) == list(range(len(LABELS)))  # disjoint and complete
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for c, count in enumerate(np.bincount(LABELS)):
        per_fold = [int((LABELS[f] == c).sum()) for f in folds]
        assert all(count // k <= n <= -(-count // k) for n in per_fold), (c, per_fold)


def test_cv_folds_depend_on_the_fold_seed_only():
    a = bench_quality.cv_folds(LABELS, 5, seed=bench_quality.CV_FOLD_SEED)
    np.random.seed(1)  # global RNG state (what a run seed touches) plays no part
    b = bench_quality.cv_folds(LABELS, 5, seed=bench_quality.CV_FOLD_SEED)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    other = bench_quality.cv_folds(LABELS, 5, seed=bench_quality.CV_FOLD_SEED + 1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, other, strict=True))


def test_cv_folds_refuse_bad_fold_counts():
    with pytest.raises(ValueError, match="--cv: the number of folds must be an integer >= 2"):
        bench_quality.cv_folds(LABELS, 1)
    with pytest.raises(ValueError, match=r"--cv 6: .*class 4 has 5 images.*at most 5 folds"):
        bench_quality.cv_folds(LABELS, 6)


@pytest.mark.parametrize("argv, message", [
    (["--cv", "5", "--methods", "central", "focal"], "--methods focal is not available under cross-validation"),
    (["--cv", "1"], "--cv: the number of folds must be >= 2"),
    (["--cv", "-3"], "--cv: the number of folds must be >= 2"),
])
def test_bad_cv_settings_are_refused_before_any_run(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_quality.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_fold_files_load_through_flower_focals_medmnist_loader(tmp_path):
    from flower_focal.config import RunConfig
    from flower_focal.data.institution import load_split
    from flower_focal.data.sources import MEDMNIST_CLASSES, load_medmnist

    npz = shared_npz("retinamnist")
    with np.load(npz) as z:
        images = np.concatenate([z["train_images"], z["val_images"]])
        labels = np.concatenate([z["train_labels"], z["val_labels"]])
    paths, sizes = bench_quality.write_cv_folds(npz, 5, 17, tmp_path / "a")
    again, _ = bench_quality.write_cv_folds(npz, 5, 17, tmp_path / "b")  # another run seed, another run
    folds = bench_quality.cv_folds(labels, 5, 17)
    assert sizes == [len(f) for f in folds] and sum(sizes) == len(labels) == 1200
    seen = []
    for f, (path, twin) in enumerate(zip(paths, again, strict=True)):
        assert path.name == f"retinamnist_cv5-seed17-fold{f}.npz" and path.parent == tmp_path / "a"
        with np.load(path) as z, np.load(twin) as t:
            assert sorted(z.files) == ["train_images", "train_labels", "val_images", "val_labels"]
            assert all(np.array_equal(z[key], t[key]) for key in z.files)
            assert np.array_equal(z["val_images"], images[folds[f]])
            assert np.array_equal(z["val_labels"], labels[folds[f]])
            assert len(z["train_images"]) == len(labels) - sizes[f]
            seen.append(z["val_images"].reshape(len(z["val_images"]), -1))
        source = load_medmnist(path)
        assert source.num_classes == 5 and source.class_names == MEDMNIST_CLASSES["retinamnist"]
        assert len(source.train) + len(source.val) == 1200
        assert [item["label"] for item in source.val] == labels[folds[f]].ravel().tolist()
    # every pooled image is in exactly one fold's val (compared as image bytes, order-free)
    pooled = sorted(map(bytes, images.reshape(len(images), -1)))
    assert sorted(map(bytes, np.concatenate(seen))) == pooled
    cfg = RunConfig(dataset="medmnist", data_path=str(paths[2]), image_size=28)
    assert len(load_split(cfg, "val")) == sizes[2]  # the split central / evaluate score


def _rows(offset: float, seeds=(0, 1), folds=(0, 1, 2), sizes=(40, 40, 39)) -> list[dict]:
    return [{"seed": s, "fold": f, "val_images": sizes[f], "auroc": 0.9 + offset + 0.01 * f + 0.002 * s,
             "accuracy": 0.7, "fed_auroc": None if offset else 0.5}
            for f in folds for s in seeds]


def test_cv_summary_and_paired_difference():
    rows = _rows(0.0)
    out = bench_quality.summarise(rows)
    assert out["seeds"] == [0, 1] and out["folds"] == [0, 1, 2] and out["n_runs"] == 6
    assert out["val_images"] == 119 and out["val_images_scored"] == 238
    assert out["val_auroc_mean"] == pytest.approx(0.911)
    assert out["val_auroc_std"] == pytest.approx(0.009, abs=1e-4)
    assert out["val_auroc_per_fold"] == pytest.approx([0.901, 0.911, 0.921])
    assert out["val_auroc_per_seed"] == pytest.approx([0.91, 0.912])
    assert out["val_auroc_spread"] == pytest.approx(0.022)
    assert out["val_fed_auroc_per_fold"] == pytest.approx([0.5, 0.5, 0.5])
    # paired on (fold, seed), whatever the order of the runs
    other = list(reversed(_rows(0.004)))
    other[0]["auroc"] += 0.006  # one run differs more
    paired = bench_quality.paired_difference(other, rows)
    assert paired["n"] == 6
    assert paired["mean"] == pytest.approx(0.005)
    assert paired["std"] == pytest.approx(np.std([0.004] * 5 + [0.010], ddof=1), abs=1e-4)
    assert bench_quality.paired_difference([{"seed": 9, "fold": 0, "auroc": 0.5}], rows) is None


def test_summary_without_cv_keeps_todays_keys():
    rows = [{"seed": s, "auroc": 0.9 + 0.01 * s, "accuracy": 0.5} for s in (0, 1, 2)]
    out = bench_quality.summarise(rows)
    assert set(out) == {"seeds"} | {f"val_{m}_{k}" for m in ("auroc", "accuracy")
                                    for k in ("mean", "std", "spread", "per_seed")}
    assert out["seeds"] == [0, 1, 2] and out["val_auroc_per_seed"] == [0.9, 0.91, 0.92]


def test_quality_cv_table_renders_bench_quality_summaries():
    def method(rows):
        return {**bench_quality.summarise(rows), "runs": rows}

    central, fedavg, fedbn = _rows(0.0), _rows(-0.012), _rows(0.0)
    for r in fedavg:
        r["personal_auroc"] = 0.8
    for r in fedbn:
        r["auroc"] = None
    for r in central:
        r["fed_auroc"] = None
    cell = {"dataset": "pathmnist", "partition": "dirichlet",
            "methods": {"fedbn": method(fedbn), "fedavg": method(fedavg), "central": method(central)}}
    cell["methods"]["fedavg"]["val_auroc_minus_central_paired"] = bench_quality.paired_difference(fedavg, central)
    doc = {"settings": {"cv": {"folds": 3, "fold_seed": 17, "fold_sizes": {"pathmnist": [40, 40, 39]}}},
           "cells": [cell]}
    lines = readme_tables.render_quality_cv([json.loads(json.dumps(doc))]).splitlines()
    assert lines[0].startswith("| data, partition | method | runs (folds × seeds) | val macro AUROC")
    # central first (the README's method order), fedavg with its paired gap, fedbn without a final model
    assert lines[2] == "| pathmnist, Dirichlet 0.5 | centralised bound (pooled) | 3 × 2 (119 images) | 0.911 ± 0.009 | – | – | – |"
    assert lines[3] == "| pathmnist, Dirichlet 0.5 | fedavg | 3 × 2 (119 images) | 0.899 ± 0.009 | – | 0.800 ± 0.000 | -0.012 ± 0.000 |"
    assert lines[4].startswith("| pathmnist, Dirichlet 0.5 | fedbn | 3 × 2 (119 images) | – |")
    assert len(lines) == 5
    with pytest.raises(ValueError, match="settings.cv"):
        readme_tables.render_quality_cv([{"settings": {}, "cells": []}])


def _readme_tables_over(tmp_path, cv_files: list[str]):
    """readme_tables loaded from a copy whose results folder holds only ``cv_files``."""
    import shutil

    bench = tmp_path / "benchmarks"
    (bench / "results").mkdir(parents=True)
    for name in ("readme_tables.py", "_common.py"):
        shutil.copy(ROOT / "benchmarks" / name, bench / name)
    for name in cv_files:
        (bench / "results" / name).write_text("{}")
    name = f"readme_tables_copy_{len(cv_files)}"
    spec = importlib.util.spec_from_file_location(name, bench / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_quality_cv_table_is_registered_only_with_its_results(tmp_path):
    without = _readme_tables_over(tmp_path / "a", [])
    assert without.QUALITY_CV_FILES == [] and "quality-cv" not in without.TABLES
    with_files = _readme_tables_over(tmp_path / "b", ["quality-cv-x-iid.json", "quality-x-iid.json"])
    assert with_files.QUALITY_CV_FILES == ["quality-cv-x-iid.json"] and "quality-cv" in with_files.TABLES
    assert with_files.TABLES["quality-cv"].sources == ("quality-cv-x-iid.json",)


@pytest.mark.slow
def test_cv_run_of_the_centralised_bound(tmp_path, capsys):
    # The real --cv loop end to end, centralised bound only (no Flower): 2 folds, 1 round.
    shared_npz("retinamnist")
    out = tmp_path / "q.json"
    bench_quality.main(["--cv", "2", "--seeds", "0", "--datasets", "retinamnist", "--partitions", "iid",
                        "--methods", "central", "--rounds", "1", "--out", str(out), "--work-dir", str(tmp_path / "wd")])
    doc = json.loads(out.read_text())
    assert doc["settings"]["cv"] == {"folds": 2, "fold_seed": bench_quality.CV_FOLD_SEED,
                                     "fold_sizes": {"retinamnist": [600, 600]}}
    assert "cv_fold_seed" not in doc["settings"] and doc["settings"]["methods"] == ["central"]
    central = doc["cells"][0]["methods"]["central"]
    assert [(r["fold"], r["seed"], r["val_images"]) for r in central["runs"]] == [(0, 0, 600), (1, 0, 600)]
    assert central["val_images"] == 1200 and len(central["val_auroc_per_fold"]) == 2
    assert all(0.5 < r["auroc"] <= 1 for r in central["runs"])
    assert sorted(p.name for p in (tmp_path / "wd" / "cv").iterdir()) == [
        f"retinamnist_cv2-seed{bench_quality.CV_FOLD_SEED}-fold{f}.npz" for f in (0, 1)]


def test_ditto_without_personal_epochs_is_refused_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_quality.main(["--methods", "central", "ditto", "--personal-epochs", "0", "--datasets", "pathmnist",
                            "--work-dir", str(tmp_path)])
    assert "--methods ditto: ditto-lambda=0.1 turns Ditto on" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_each_method_runs_with_its_own_settings(tmp_path, monkeypatch, capsys):
    """--ditto-lambda and --personal-epochs reach the ditto runs (and only personal-epochs the
    fedavg ones): the run configs bench_quality hands to the simulation, captured."""
    shared_npz("retinamnist")
    seen = {}

    def fake_federated(cfg, run_dir):
        seen[run_dir.name] = cfg
        return {"auroc": 0.5, "accuracy": 0.5, "fed_auroc": 0.5, "fed_accuracy": 0.5,
                "personal_auroc": 0.5, "personal_accuracy": 0.5, "wall_s": 0.0}

    monkeypatch.setattr(bench_quality, "federated", fake_federated)
    bench_quality.main(["--methods", "fedavg", "ditto", "--seeds", "0", "--datasets", "retinamnist",
                        "--partitions", "iid", "--ditto-lambda", "0.7", "--personal-epochs", "2",
                        "--work-dir", str(tmp_path)])
    ditto, fedavg = seen["retinamnist-iid-ditto-0"], seen["retinamnist-iid-fedavg-0"]
    assert (ditto.ditto_lambda, ditto.personal_epochs) == (0.7, 2)
    assert (fedavg.ditto_lambda, fedavg.personal_epochs) == (0.0, 2)
