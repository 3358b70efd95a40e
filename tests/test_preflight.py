"""Preflight: every first-hour mistake stops in the launcher process with one clear message,
before Flower or Ray is started."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flower_focal.config import RunConfig
from flower_focal.preflight import PreflightError, preflight
from tests.conftest import shared_npz


def _npz(path: Path, n_train: int = 60, n_val: int = 20, classes: int = 3, **extra) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 255, (n_train, 28, 28, 3), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % classes).reshape(-1, 1),
        "val_images": rng.integers(0, 255, (n_val, 28, 28, 3), dtype=np.uint8),
        "val_labels": (np.arange(n_val) % classes).reshape(-1, 1),
    }
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def _cfg(path: Path, **kw) -> RunConfig:
    return RunConfig(dataset="medmnist", data_path=str(path), partitioner="iid", **kw)


def _folder(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(1)
    for cls in ("benign", "malignant"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                root / cls / f"img{i:02d}.png")
    return root


def test_a_good_setup_passes_and_names_the_institution_sizes(tmp_path):
    report = preflight(_cfg(_npz(tmp_path / "ok.npz")), 4)
    assert report.num_classes == 3 and report.n_train == 60 and report.n_val == 20
    assert report.institution_train_sizes == [15, 15, 15, 15]
    assert "4 institutions with 15..15 training items" in report.summary()


def test_the_launcher_shows_every_institutions_size_and_class_histogram(tmp_path):
    """Printed by the launcher before Flower starts (simulation workers' own logs do not reach
    the user); institutions in a deployment log theirs in their SuperNode's log."""
    cfg = _cfg(_npz(tmp_path / "ok.npz", n_train=61)).replace(partitioner="dirichlet", dirichlet_alpha=0.3)
    report = preflight(cfg, 3)
    assert [sum(h) for h in report.institution_train_histograms] == report.institution_train_sizes
    assert sum(map(sum, report.institution_train_histograms)) == 61
    table = report.institutions_table().splitlines()
    assert table[0] == "institutions (items per class):" and len(table) == 4
    hist = report.institution_train_histograms[2]
    assert table[3].startswith(f"  institution 2: {report.institution_train_sizes[2]:>5} train {hist}")
    many = preflight(_cfg(_npz(tmp_path / "many.npz", n_train=300, n_val=90)), 40).institutions_table(limit=6)
    assert [line.split(":")[0].strip() for line in many.splitlines()[1:]] == [
        "institution  0", "institution  1", "institution  2", "... 34 more institutions",
        "institution 37", "institution 38", "institution 39"]


def test_missing_data_file_names_the_file(tmp_path):
    missing = tmp_path / "nope" / "pathmnist.npz"
    with pytest.raises(PreflightError, match=r"file not found: .*nope/pathmnist\.npz"):
        preflight(_cfg(missing), 3)


def test_npz_without_the_expected_keys_names_the_keys(tmp_path):
    path = tmp_path / "odd.npz"
    np.savez(path, x_train=np.zeros((4, 28, 28), np.uint8), y_train=np.zeros(4))
    with pytest.raises(PreflightError) as err:
        preflight(_cfg(path), 2)
    msg = str(err.value)
    assert str(path) in msg and "'train_images'" in msg and "x_train" in msg


def test_corrupt_png_in_a_folder_dataset_names_the_file(tmp_path):
    root = _folder(tmp_path / "imgs")
    bad = root / "malignant" / "zz_truncated.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    cfg = RunConfig(dataset="folder", data_path=str(root), partitioner="iid")
    with pytest.raises(PreflightError, match=r"cannot read image file .*zz_truncated\.png: UnidentifiedImageError"):
        preflight(cfg, 2)
    bad.unlink()
    assert preflight(cfg, 2).images_decoded == 12  # every file decoded once the bad one is gone


def test_mixed_channel_counts_in_a_folder_are_named(tmp_path):
    root = _folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "benign" / "zz_gray.png")
    cfg = RunConfig(dataset="folder", data_path=str(root), partitioner="iid")
    with pytest.raises(PreflightError, match=r"zz_gray\.png has 1 channel"):
        preflight(cfg, 2)


def test_too_many_institutions_is_one_error_naming_the_counts(tmp_path):
    cfg = _cfg(_npz(tmp_path / "small.npz"), min_partition_size=2)
    with pytest.raises(PreflightError) as err:
        preflight(cfg, 400)
    msg = str(err.value)
    assert msg.startswith("400 institutions on ") and "60 training items" in msg
    assert "\n" not in msg


def test_too_many_institutions_on_real_pathmnist_dirichlet():
    path = shared_npz("pathmnist")
    cfg = RunConfig(dataset="medmnist", data_path=str(path))  # dirichlet, the default
    start = time.time()
    with pytest.raises(PreflightError, match=r"400 institutions on .*pathmnist\.npz: dirichlet"):
        preflight(cfg, 400)
    assert time.time() - start < 15


def test_unknown_strategy_lists_the_valid_ones(tmp_path):
    cfg = _cfg(_npz(tmp_path / "ok.npz"), strategy="fedprox")
    with pytest.raises(PreflightError, match=r"Unknown strategy 'fedprox'; choose one of: fedavg, "
                       r"he-fedavg, focal"):
        preflight(cfg, 2)


@pytest.mark.parametrize(("change", "pattern"), [
    ({"model": "resnet99"}, r"model: unknown model 'resnet99'"),
    ({"device": "tpu"}, r"device: Unknown device 'tpu'"),
    ({"optimizer": "lion"}, r"optimizer: unknown optimizer 'lion'"),
    ({"min_available_nodes": 9}, r"min-available-nodes=9 but only 3 institutions"),
    ({"fedprox_mu": float("nan")}, r"fedprox-mu must be a finite number >= 0 \(0 = off\), got nan"),
    ({"fedprox_mu": -0.1}, r"fedprox-mu must be a finite number >= 0"),
])
def test_bad_settings_are_named(tmp_path, change, pattern):
    with pytest.raises(PreflightError, match=pattern):
        preflight(_cfg(tmp_path / "never-read.npz", **change), 3)  # settings come before data


def test_key_dir_checks(tmp_path):
    from flower_focal.crypto import keygen

    data = _npz(tmp_path / "ok.npz")
    with pytest.raises(PreflightError, match="he-key-dir: directory not found"):
        preflight(_cfg(data, strategy="he-fedavg", he_key_dir=str(tmp_path / "nokeys")), 2)
    keys = keygen(tmp_path / "keys", "compact")
    report = preflight(_cfg(data, strategy="he-fedavg", he_key_dir=str(keys)), 2)
    assert report.key_preset == "compact"
    with pytest.raises(PreflightError, match=r"needs keys of a FOCAL preset .* holds preset 'compact'"):
        preflight(_cfg(data, strategy="focal", he_key_dir=str(keys)), 2, decode_images=False)
    (keys / "secret.ctx").unlink()
    with pytest.raises(PreflightError, match=r"has no secret\.ctx"):
        preflight(_cfg(data, strategy="he-fedavg", he_key_dir=str(keys)), 2)
    # the server side of a deployment only holds public.ctx
    assert preflight(_cfg(data, strategy="he-fedavg", he_key_dir=str(keys)), 2,
                     key_role="server").key_dir == str(keys.resolve())
    with pytest.raises(PreflightError, match="needs the institutions' HE key set"):
        preflight(_cfg(data, strategy="he-fedavg"), 2, require_keys=True)


def test_simulate_raises_before_flower_is_started(tmp_path):
    from flower_focal.simulation import Federation, simulate

    home = tmp_path / "flwr-home"
    cfg = _cfg(tmp_path / "missing.npz", run_dir=str(tmp_path / "run"))
    start = time.time()
    with pytest.raises(PreflightError, match="file not found"):
        simulate(cfg, Federation(num_supernodes=3), flwr_home=home, echo=False)
    assert time.time() - start < 15
    assert not home.exists()  # run_app creates it first thing: flwr was never spawned
    assert not (tmp_path / "run" / "flwr.log").exists()
