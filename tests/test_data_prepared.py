"""Prepared institution files (flower_focal.data.prepared): what a deployed SuperNode's later
messages read instead of re-reading, re-partitioning and re-transforming with MONAI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flower_focal.cache import CACHE
from flower_focal.config import RunConfig
from flower_focal.data import IMAGE, LABEL, clear_caches, load_institution
from flower_focal.data import prepared

from conftest import write_synthetic_npz

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    clear_caches()
    directory = tmp_path / "store"
    monkeypatch.setenv(prepared.STORE_ENV, str(directory))
    yield directory
    clear_caches()


@pytest.fixture()
def npz_cfg(tmp_path: Path) -> RunConfig:
    data = write_synthetic_npz(tmp_path / "site.npz", sizes=(60, 20, 20), size=16)
    return RunConfig(dataset="medmnist", data_path=str(data), image_size=16, partitioner="iid",
                     seed=2)


def _files(directory: Path) -> list[Path]:
    return sorted(directory.glob("institution-*.npz"))


def test_stored_institution_equals_the_built_one(store: Path, npz_cfg: RunConfig) -> None:
    built = load_institution(npz_cfg, 1, 2)
    (path,) = _files(store)
    clear_caches()  # a new process: nothing in memory
    read = load_institution(npz_cfg, 1, 2)
    assert read is not built and _files(store) == [path]
    for a, b in ((built.train, read.train), (built.val, read.val)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert read.train.batch_augment == built.train.batch_augment is not None
    assert read.train.augment_from == built.train.augment_from is not None
    assert read.val.deterministic and not read.train.deterministic
    for field in ("partition_id", "num_classes", "in_channels", "n_train", "n_val",
                  "train_histogram", "val_histogram", "class_names"):
        assert getattr(read, field) == getattr(built, field), field
    # Item by item, the training split augments exactly as the MONAI chain it was built with.
    for ds in (built.train, read.train):
        ds.transform.set_random_state(seed=7)
    for i in range(5):
        x, y = built.train[i], read.train[i]
        assert torch.equal(x[IMAGE], y[IMAGE]) and torch.equal(x[LABEL], y[LABEL])


def test_a_later_process_reads_it_without_monai(store: Path, npz_cfg: RunConfig) -> None:
    load_institution(npz_cfg, 0, 2)  # the first message: builds and stores
    probe = (
        "import sys, json; from flower_focal.config import RunConfig; "
        "from flower_focal.data import load_institution; "
        f"cfg = RunConfig(**json.loads({json.dumps(json.dumps(npz_cfg.__dict__))})); "
        "d = load_institution(cfg, 0, 2); "
        "print(json.dumps([d.n_train, float(d.train.images.sum()), 'monai' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**__import__("os").environ, prepared.STORE_ENV: str(store)})
    n_train, total, monai_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    here = load_institution(npz_cfg, 0, 2)
    assert n_train == here.n_train and total == pytest.approx(float(here.train.images.sum()))
    assert monai_loaded is False


def test_a_damaged_or_foreign_file_is_never_used(store: Path, npz_cfg: RunConfig,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    good = load_institution(npz_cfg, 0, 2)
    (path,) = _files(store)
    with np.load(path) as f:
        parts = {k: f[k] for k in f.files}
    parts["train_images"] = parts["train_images"] + 1.0  # tampered images, same key
    np.savez(path, **parts)
    clear_caches()
    with caplog.at_level(logging.WARNING, logger="flower_focal.data"):
        again = load_institution(npz_cfg, 0, 2)
    assert "checksum mismatch" in caplog.text
    assert torch.equal(again.train.images, good.train.images)  # rebuilt from the source
    key = prepared.store_key(npz_cfg, 0, 2)
    assert prepared.load_institution_file(path, key).n_train == good.n_train  # rewritten intact
    with pytest.raises(ValueError, match="another run configuration"):
        prepared.load_institution_file(path, prepared.store_key(npz_cfg, 1, 2))
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="unreadable"):
        prepared.load_institution_file(path, key)


def test_the_key_follows_data_settings_and_the_data_file(store: Path, npz_cfg: RunConfig) -> None:
    key = prepared.store_key(npz_cfg, 0, 2)
    assert prepared.store_key(npz_cfg.replace(lr=0.5, strategy="focal"), 0, 2) == key
    assert prepared.store_key(npz_cfg.replace(image_size=20), 0, 2) != key
    assert prepared.store_key(npz_cfg.replace(seed=3), 0, 2) != key
    assert prepared.store_key(npz_cfg, 1, 2) != key and prepared.store_key(npz_cfg, 0, 3) != key
    write_synthetic_npz(Path(npz_cfg.data_path), sizes=(60, 20, 20), size=16, seed=9)  # new file
    assert prepared.store_key(npz_cfg, 0, 2) != key


def test_off_stores_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            npz_cfg: RunConfig) -> None:
    clear_caches()
    monkeypatch.setenv(prepared.STORE_ENV, "off")
    assert prepared.store_dir() is None
    load_institution(npz_cfg, 0, 2)
    assert CACHE.stats("institutions")["misses"] == 1
    assert not list(tmp_path.rglob("institution-*.npz"))


def test_rewriting_one_image_of_a_folder_is_new_data(store: Path, tmp_path: Path) -> None:
    """A folder's own size and mtime do not change when an image inside is rewritten: the
    key covers every image file (the same key as FOCAL's embedding cache)."""
    from PIL import Image

    from flower_focal.models.embeddings import data_key_parts

    for c in range(2):
        for i in range(4):
            p = tmp_path / "f" / "train" / str(c) / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((12, 12, 3), 30 * i + c, np.uint8)).save(p)
    cfg = RunConfig(dataset="folder", data_path=str(tmp_path / "f"), image_size=8, partitioner="iid",
                    min_partition_size=1)
    key, parts = prepared.store_key(cfg, 0, 1), data_key_parts(cfg, split="train")
    first = load_institution(cfg, 0, 1).train.images.clone()
    Image.fromarray(np.full((12, 12, 3), 255, np.uint8)).save(tmp_path / "f" / "train" / "1" / "2.png")
    clear_caches()
    assert prepared.store_key(cfg, 0, 1) != key and data_key_parts(cfg, split="train") != parts
    assert not torch.equal(load_institution(cfg, 0, 1).train.images, first)
    assert len(_files(store)) == 2


def test_a_rewrite_that_keeps_size_and_mtime_is_still_new_data(store: Path, npz_cfg: RunConfig) -> None:
    """cp -p / rsync -t / tar x restore a file's mtime; its inode and ctime still change."""
    import os

    path = Path(npz_cfg.data_path)
    key = prepared.store_key(npz_cfg, 0, 2)
    before = os.stat(path)
    data = dict(np.load(path))
    data["train_images"] = 255 - data["train_images"]  # other pixels, same size
    tmp = path.with_suffix(".new.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns
    assert prepared.store_key(npz_cfg, 0, 2) != key


def test_a_directory_others_can_write_to_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    npz_cfg: RunConfig, caplog: pytest.LogCaptureFixture) -> None:
    shared = tmp_path / "shared-store"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # as if another user had made the name first, writable by all
    monkeypatch.setenv(prepared.STORE_ENV, str(shared))
    clear_caches()
    assert not prepared.private_dir(shared)
    with caplog.at_level(logging.WARNING, logger="flower_focal.data"):
        load_institution(npz_cfg, 0, 2)
    assert "not a private directory" in caplog.text and not list(shared.iterdir())
    private = tmp_path / "mine"
    monkeypatch.setenv(prepared.STORE_ENV, str(private))
    clear_caches()
    load_institution(npz_cfg, 0, 2)
    (path,) = _files(private)
    private.chmod(0o777)
    with pytest.raises(ValueError, match="not a private directory"):
        prepared.load_institution_file(path, prepared.store_key(npz_cfg, 0, 2))
