"""Tests for flower_focal.data.institution and transforms: datasets, caching, bad images."""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flower_focal.config import RunConfig
from flower_focal.data import (
    IMAGE,
    LABEL,
    build_transforms,
    clear_caches,
    describe_partitions,
    load_institution,
    load_split,
    source_info,
)
from flower_focal.data.institution import DATA_FIELDS

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SYNTH = RunConfig(dataset="synthetic-pathology", num_samples=60, image_size=16, seed=3,
                  partitioner="dirichlet", dirichlet_alpha=1.0)


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test builds from the source: no in-process cache, no prepared file (the tests of
    prepared files turn them on with their own directory)."""
    clear_caches()
    monkeypatch.setenv("FLOWER_FOCAL_DATA_STORE", "off")


def _img(path: Path, channels: int = 3, size: int = 10, value: int = 0) -> None:
    rng = np.random.default_rng(value)
    shape = (size, size, channels) if channels > 1 else (size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def _manifest(root: Path, rows: list[list[object]], header: list[str]) -> Path:
    path = root / "m.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_data_fields_are_config_fields() -> None:
    assert set(DATA_FIELDS) <= {f.name for f in dataclasses.fields(RunConfig)}


def test_synthetic_institution_tensors_and_histograms(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="flower_focal.data"):
        inst = load_institution(SYNTH, 1, 3)
    assert any("institution 1/3" in r.getMessage() for r in caplog.records)
    item = inst.train[0]
    assert item[IMAGE].shape == (3, 16, 16) and item[IMAGE].dtype == torch.float32
    assert item[LABEL].dtype == torch.long and item[LABEL].ndim == 0
    assert type(item[IMAGE]) is torch.Tensor and set(item) == {IMAGE, LABEL}
    assert -1.0 <= float(item[IMAGE].min()) <= float(item[IMAGE].max()) <= 1.0
    assert inst.num_classes == 9 and inst.in_channels == 3
    assert len(inst.train) == inst.n_train == sum(inst.train_histogram)
    assert len(inst.val) == inst.n_val == sum(inst.val_histogram)
    labels = [int(inst.train[i][LABEL]) for i in range(len(inst.train))]
    assert np.bincount(labels, minlength=9).tolist() == inst.train_histogram


def test_partitions_cover_split_and_match_description() -> None:
    described = describe_partitions(SYNTH, 3)
    assert sum(d["n_train"] for d in described) == 60
    assert sum(d["n_val"] for d in described) == 36
    for k, d in enumerate(described):
        inst = load_institution(SYNTH, k, 3)
        assert (inst.n_train, inst.n_val) == (d["n_train"], d["n_val"])
        assert inst.train_histogram == d["train_histogram"]


def test_cache_keyed_on_data_fields_only() -> None:
    a = load_institution(SYNTH, 0, 2)
    assert load_institution(SYNTH.replace(lr=0.5, strategy="focal"), 0, 2) is a
    assert load_institution(SYNTH.replace(seed=4), 0, 2) is not a


def test_cache_keeps_every_institution_a_worker_serves_within_its_byte_budget(monkeypatch) -> None:
    """A Ray worker serving 10 institutions must not rebuild them every round (a count-bounded
    cache of 8 did); the bound is bytes, evicting least recently used, never the newest."""
    from flower_focal.cache import CACHE
    from flower_focal.data.institution import CACHE_BUDGET_ENV, dataset_nbytes

    def builds() -> int:
        return CACHE.stats("institutions")["misses"]

    cfg = SYNTH.replace(partitioner="iid", num_samples=200)
    first = [load_institution(cfg, k, 10) for k in range(10)]
    for _ in range(2):  # later rounds: every institution comes from the cache
        assert all(load_institution(cfg, k, 10) is first[k] for k in range(10))
    assert builds() == 10
    one = dataset_nbytes(first[0].train) + dataset_nbytes(first[0].val)
    assert one >= 3 * 16 * 16 * 4 * first[0].n_train  # the cached float32 tiles are counted

    clear_caches()
    monkeypatch.setenv(CACHE_BUDGET_ENV, str(2.5 * one / 2**20))  # room for about two
    a = [load_institution(cfg, k, 10) for k in range(3)]
    assert [k[1] for k in CACHE.keys("institutions")] == [1, 2]  # 0 evicted (least recent)
    assert load_institution(cfg, 2, 10) is a[2]
    assert load_institution(cfg, 0, 10) is not a[0] and builds() == 4

    monkeypatch.setenv(CACHE_BUDGET_ENV, "0")  # even no budget keeps the newest one
    b = load_institution(cfg, 5, 10)
    assert [k[1] for k in CACHE.keys("institutions")] == [5] and load_institution(cfg, 5, 10) is b
    monkeypatch.setenv(CACHE_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=CACHE_BUDGET_ENV):
        load_institution(cfg, 6, 10)
    assert builds() == 5  # refused before building


def test_val_is_deterministic_train_augments() -> None:
    inst = load_institution(SYNTH.replace(partitioner="iid"), 0, 1)
    assert torch.equal(inst.val[0][IMAGE], inst.val[0][IMAGE])
    draws = [inst.train[0][IMAGE] for _ in range(12)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # random flips/rotations


def test_load_split_whole_split() -> None:
    val = load_split(SYNTH, "val")
    assert len(val) == 36 and val[0][IMAGE].shape == (3, 16, 16)
    assert load_split(SYNTH, "train") is load_split(SYNTH, SYNTH.train_split)
    test = load_split(SYNTH, "test")  # any other split name replaces val
    assert len(test) == 36 and not torch.equal(test[0][IMAGE], val[0][IMAGE])
    assert source_info(SYNTH).num_classes == 9


def test_bad_partition_id() -> None:
    with pytest.raises(ValueError, match=r"partition_id 3 out of range for 3 partitions"):
        load_institution(SYNTH, 3, 3)


def test_real_medmnist_institution() -> None:
    path = SHARED_DATA / "retinamnist" / "retinamnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    cfg = RunConfig(dataset="medmnist", data_path=str(path), image_size=32)
    inst = load_institution(cfg, 0, 4)
    assert inst.train[0][IMAGE].shape == (3, 32, 32) and inst.num_classes == 5
    if "test_images" in np.load(path).files:
        assert len(load_split(cfg, "test")) == len(np.load(path)["test_labels"])
    with pytest.raises(ValueError, match=r"'nosuch_images'.*keys found"):
        load_split(cfg, "nosuch")
    assert sum(d["n_train"] for d in describe_partitions(cfg, 4)) == 1080


def test_grayscale_csv_by_site(tmp_path: Path) -> None:
    rows = []
    for i in range(12):
        _img(tmp_path / "images" / f"p{i}.png", channels=1, value=i)
        rows.append([f"p{i}", i % 2, f"site-{'AB'[i % 2]}" if i < 6 else "site-C"])
    cfg = RunConfig(dataset="csv", data_path=str(_manifest(tmp_path, rows, [
        "image", "label", "site"])), partitioner="by-site", image_size=8, min_partition_size=1)
    desc = describe_partitions(cfg, 3)
    assert [d["site"] for d in desc] == ["site-A", "site-B", "site-C"]
    assert sum(d["n_train"] + d["n_val"] for d in desc) == 12
    inst = load_institution(cfg, 2, 3)
    assert inst.in_channels == 1 and inst.train[0][IMAGE].shape == (1, 8, 8)
    with pytest.raises(ValueError, match=r"3 site\(s\).*but 2 institutions"):
        load_institution(cfg, 0, 2)


def test_by_site_without_site_column(tmp_path: Path) -> None:
    for i in range(4):
        _img(tmp_path / f"q{i}.png", value=i)
    cfg = RunConfig(dataset="csv", data_path=str(_manifest(
        tmp_path, [[f"q{i}.png", i % 2] for i in range(4)], ["image", "label"])),
        partitioner="by-site", min_partition_size=1)
    with pytest.raises(ValueError, match="by-site: the data has no site column"):
        load_institution(cfg, 0, 1)


def test_corrupt_image_named(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for i in range(4):
            _img(tmp_path / split / "cls0" / f"a{i}.png", value=i)
            _img(tmp_path / split / "cls1" / f"b{i}.png", value=10 + i)
    (tmp_path / "train" / "cls1" / "b9.png").write_bytes(b"\x89PNG but truncated garbage")
    cfg = RunConfig(dataset="folder", data_path=str(tmp_path), partitioner="iid",
                    min_partition_size=1)
    with pytest.raises(ValueError, match=r"Cannot read image file .*train/cls1/b9\.png"):
        load_institution(cfg, 0, 1)


def test_institution_generates_only_its_own_images(monkeypatch: pytest.MonkeyPatch) -> None:
    from flower_focal.data import synthetic

    calls: list[tuple[str, int]] = []
    real = synthetic.generate_image

    def counting(name: str, label: int, index: int, split: str, seed: int,
                 size: int) -> np.ndarray:
        calls.append((split, index))
        return real(name, label, index, split, seed, size)

    monkeypatch.setattr(synthetic, "generate_image", counting)
    inst = load_institution(SYNTH, 2, 3)
    assert len(calls) == inst.n_train + inst.n_val < 96
    assert len(set(calls)) == len(calls)


def test_inconsistent_channels_named(tmp_path: Path) -> None:
    rows = []
    for i in range(8):
        _img(tmp_path / f"r{i}.png", channels=3, value=i)
        rows.append([f"r{i}.png", i % 2, "train"])
    _img(tmp_path / "gray.png", channels=1)
    rows.append(["gray.png", 1, "train"])
    cfg = RunConfig(dataset="csv", data_path=str(_manifest(tmp_path, rows, [
        "image", "label", "split"])), partitioner="iid", min_partition_size=1)
    with pytest.raises(ValueError, match=r"gray\.png has 1 channel\(s\), expected 3"):
        load_institution(cfg, 0, 1)


def test_build_transforms_array_items() -> None:
    t = build_transforms(20, train=False, from_files=False)
    out = t({IMAGE: np.full((8, 8, 1), 255, dtype=np.uint8), LABEL: 2})
    assert out[IMAGE].shape == (1, 20, 20) and torch.allclose(out[IMAGE], torch.ones(1))
    assert out[LABEL].item() == 2 and out[LABEL].dtype == torch.long
