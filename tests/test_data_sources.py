"""Tests for flower_focal.data.sources: MedMNIST .npz, image folders, CSV manifests, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flower_focal.config import RunConfig
from flower_focal.data import IMAGE, LABEL, SITE, load_source
from flower_focal.data.sources import (
    SOURCES,
    load_csv,
    load_folder,
    load_medmnist,
    medmnist_name,
    read_npz,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real MedMNIST files shipped next to the repository; skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available at {SHARED_DATA}")
    return SHARED_DATA


def _img(path: Path, channels: int = 3, size: int = 12, value: int = 0) -> Path:
    rng = np.random.default_rng(value)
    shape = (size, size, channels) if channels > 1 else (size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _gray_arrays(n_train: int = 10, n_val: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train_images": rng.integers(0, 256, (n_train, 8, 8), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 3)[:, None],
        "val_images": rng.integers(0, 256, (n_val, 8, 8), dtype=np.uint8),
        "val_labels": np.arange(n_val) % 3,
    }


# --------------------------------------------------------------------------- real MedMNIST


@pytest.mark.parametrize(
    ("stem", "n_train", "n_val", "num_classes"),
    [("retinamnist", 1080, 120, 5), ("pathmnist", 701, 100, 9)],
)
def test_real_medmnist(shared_data: Path, stem: str, n_train: int, n_val: int,
                       num_classes: int) -> None:
    path = shared_data / stem / f"{stem}.npz"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    src = load_source(RunConfig(dataset="medmnist", data_path=str(path)))
    assert (len(src.train), len(src.val)) == (n_train, n_val)
    assert src.num_classes == num_classes == len(src.class_names)
    assert src.in_channels == 3 and not src.from_files
    item = src.train[0]
    assert item[IMAGE].shape == (28, 28, 3) and item[IMAGE].dtype == np.uint8
    assert isinstance(item[LABEL], int)
    labels = np.concatenate([src.labels("train"), src.labels("val")])
    assert labels.min() == 0 and labels.max() == num_classes - 1
    assert read_npz(path) is read_npz(path)  # cached per process


def test_medmnist_name_table() -> None:
    assert medmnist_name("/x/retinamnist_64.npz") == "retinamnist"
    assert medmnist_name("organamnist.npz") == "organamnist"
    assert medmnist_name("mydata.npz") is None


# --------------------------------------------------------------------------- npz edge cases


def test_npz_grayscale_gets_channel_axis_and_max_label_classes(tmp_path: Path) -> None:
    src = load_medmnist(_npz(tmp_path / "mine.npz", **_gray_arrays()))
    assert src.in_channels == 1 and src.train[0][IMAGE].shape == (8, 8, 1)
    assert src.num_classes == 3 and src.class_names == ("0", "1", "2")


def test_npz_cache_invalidated_by_mtime(tmp_path: Path) -> None:
    import os

    path = _npz(tmp_path / "mine.npz", **_gray_arrays())
    first = read_npz(path)
    _npz(path, **_gray_arrays(n_train=12))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert len(read_npz(path)["train_images"]) == 12 and read_npz(path) is not first


def test_npz_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        load_medmnist(tmp_path / "nothere.npz")


def test_npz_missing_keys_names_found_keys(tmp_path: Path) -> None:
    arrays = _gray_arrays()
    del arrays["val_labels"]
    path = _npz(tmp_path / "nokeys.npz", **arrays)
    with pytest.raises(ValueError, match=r"nokeys\.npz.*'val_labels'.*keys found.*train_images"):
        load_medmnist(path)


def test_npz_count_mismatch(tmp_path: Path) -> None:
    arrays = _gray_arrays()
    arrays["train_labels"] = arrays["train_labels"][:7]
    with pytest.raises(ValueError, match=r"mismatch\.npz: 10 images .* but 7 labels"):
        load_medmnist(_npz(tmp_path / "mismatch.npz", **arrays))


@pytest.mark.parametrize(
    ("labels", "pattern"),
    [
        (np.array([0, 1, -2, 0, 1, 0, 1, 0, 1, 0]), "negative label -2 at index 2"),
        (np.array([0, 1, 1.5, 0, 1, 0, 1, 0, 1, 0]), r"must be integers, got (np\.float64\()?1\.5"),
        (np.array(list("abcdefghij")), "must be integers, got dtype"),
        (np.zeros((10, 3), dtype=int), r"shape \(N,\) or \(N, 1\).*multi-label"),
    ],
)
def test_npz_bad_labels(tmp_path: Path, labels: np.ndarray, pattern: str) -> None:
    arrays = _gray_arrays()
    arrays["train_labels"] = labels
    with pytest.raises(ValueError, match=r"bad\.npz 'train_labels'.*" + pattern):
        load_medmnist(_npz(tmp_path / "bad.npz", **arrays))


def test_npz_label_out_of_range_for_known_set(tmp_path: Path) -> None:
    arrays = _gray_arrays()
    arrays["val_labels"] = np.array([0, 1, 7, 0])
    with pytest.raises(ValueError, match=r"label 7 at index 2 is out of range for 5 classes"):
        load_medmnist(_npz(tmp_path / "retinamnist_small.npz", **arrays))


def test_npz_inconsistent_channels(tmp_path: Path) -> None:
    arrays = _gray_arrays()
    arrays["val_images"] = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"chan\.npz: inconsistent channel counts.*1.*3"):
        load_medmnist(_npz(tmp_path / "chan.npz", **arrays))


def test_npz_custom_split_names(tmp_path: Path) -> None:
    arrays = _gray_arrays()
    arrays["test_images"], arrays["test_labels"] = arrays.pop("val_images"), arrays.pop(
        "val_labels")
    src = load_source(RunConfig(dataset="medmnist", data_path=str(
        _npz(tmp_path / "t.npz", **arrays)), val_split="test"))
    assert len(src.val) == 4


# --------------------------------------------------------------------------- image folder


def _folder(root: Path, per_class: int = 10) -> None:
    exts = [".png", ".jpg", ".jpeg", ".tif", ".tiff"]
    for c, name in enumerate(["benign", "malignant", "normal"]):
        for i in range(per_class):
            _img(root / name / f"img{i}{exts[i % len(exts)]}", value=c * 100 + i)


def test_folder_carves_stratified_val(tmp_path: Path) -> None:
    _folder(tmp_path)
    (tmp_path / "benign" / "notes.txt").write_text("ignored")
    src = load_folder(tmp_path, seed=1)
    assert src.class_names == ("benign", "malignant", "normal") and src.num_classes == 3
    assert len(src.train) == 24 and len(src.val) == 6
    assert np.bincount(src.labels("val")).tolist() == [2, 2, 2]
    assert src.from_files and src.in_channels == 3
    assert Path(src.train[0][IMAGE]).is_absolute()
    again = load_folder(tmp_path, seed=1)
    assert [d[IMAGE] for d in again.val] == [d[IMAGE] for d in src.val]
    other = load_folder(tmp_path, seed=2)
    assert [d[IMAGE] for d in other.val] != [d[IMAGE] for d in src.val]


def test_folder_with_train_val_subfolders(tmp_path: Path) -> None:
    _folder(tmp_path / "train", per_class=4)
    _img(tmp_path / "val" / "malignant" / "v.png", channels=1)
    _img(tmp_path / "train" / "benign" / "g.png", channels=1)  # first file: grayscale probe
    src = load_source(RunConfig(dataset="folder", data_path=str(tmp_path)))
    assert len(src.train) == 13 and len(src.val) == 1 and src.val[0][LABEL] == 1
    assert src.in_channels == 1  # first training image (benign/g.png) is grayscale


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        load_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no class sub-folders in .*empty"):
        load_folder(tmp_path / "empty")
    _img(tmp_path / "data" / "a" / "x.png")
    (tmp_path / "data" / "b").mkdir()
    with pytest.raises(ValueError, match=r"Class folder .*data/b contains no images"):
        load_folder(tmp_path / "data")
    _folder(tmp_path / "s" / "train", per_class=2)
    _img(tmp_path / "s" / "val" / "extra" / "x.png")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['extra'\]"):
        load_folder(tmp_path / "s")


def test_folder_corrupt_first_image_named(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match=r"broken\.png"):
        load_folder(tmp_path)


# --------------------------------------------------------------------------- CSV manifest


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _aptos(root: Path, n: int = 20) -> Path:
    exts = [".png", ".jpg", ".tif"]
    rows = []
    for i in range(n):
        code = f"{i:04x}abcd"
        _img(root / "train_images" / f"{code}{exts[i % 3]}", value=i)
        rows.append([code, i % 5])
    return _write_csv(root / "train.csv", ["id_code", "diagnosis"], rows)


def test_csv_aptos_ids_without_extension(tmp_path: Path) -> None:
    manifest = _aptos(tmp_path)
    cfg = RunConfig(dataset="csv", data_path=str(manifest), image_column="id_code",
                    label_column="diagnosis")
    src = load_source(cfg)
    assert len(src.train) == 15 and len(src.val) == 5 and src.num_classes == 5
    assert np.bincount(src.labels("val")).tolist() == [1, 1, 1, 1, 1]
    assert all(Path(d[IMAGE]).is_file() for d in src.train + src.val)
    assert {Path(d[IMAGE]).suffix for d in src.train} == {".png", ".jpg", ".tif"}


def test_csv_site_and_split_columns(tmp_path: Path) -> None:
    _img(tmp_path / "images" / "a.png")
    _img(tmp_path / "sub" / "b.jpeg")
    _img(tmp_path / "c.tiff")
    manifest = _write_csv(tmp_path / "m.csv", ["file", "y", "hospital", "split"], [
        ["a", 0, "H1", "train"], ["sub/b.jpeg", 1, "H2", "train"],
        [str(tmp_path / "c.tiff"), 1, "H1", "val"], ["a", 0, "H2", "test"],
    ])
    src = load_csv(manifest, "file", "y", "hospital")
    assert [d[SITE] for d in src.train] == ["H1", "H2"] and len(src.val) == 1
    assert src.sites("train").tolist() == ["H1", "H2"]
    no_site = load_csv(manifest, "file", "y", "site")
    assert SITE not in no_site.train[0] and no_site.sites("train") is None


def test_csv_missing_columns(tmp_path: Path) -> None:
    manifest = _aptos(tmp_path, n=3)
    with pytest.raises(ValueError, match=r"train\.csv: missing column\(s\) \['image', 'label'\]"
                                         r"; columns found: \['id_code', 'diagnosis'\]"):
        load_source(RunConfig(dataset="csv", data_path=str(manifest)))


def test_csv_missing_image_and_bad_labels(tmp_path: Path) -> None:
    _img(tmp_path / "ok.png")
    m = _write_csv(tmp_path / "a.csv", ["image", "label"], [["ok", 0], ["ghost", 1]])
    with pytest.raises(FileNotFoundError, match=r"a\.csv: no image file for id 'ghost' \(row 3\)"):
        load_csv(m)
    m = _write_csv(tmp_path / "b.csv", ["image", "label"], [["missing.png", 0]])
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        load_csv(m)
    for bad, pattern in [("abc", "label 'abc'.*row 2 is not an integer"),
                         ("1.5", "label '1.5'.*not an integer"),
                         ("-1", "negative label '-1'")]:
        m = _write_csv(tmp_path / "c.csv", ["image", "label"], [["ok", bad]])
        with pytest.raises(ValueError, match=r"c\.csv: " + pattern):
            load_csv(m)


def test_csv_missing_file_and_empty_path() -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        load_source(RunConfig(dataset="csv", data_path="/nonexistent/nowhere.csv"))
    with pytest.raises(ValueError, match="data-path is empty"):
        load_source(RunConfig(dataset="csv", data_path=""))


# --------------------------------------------------------------------------- registry


def test_unknown_dataset_lists_valid() -> None:
    with pytest.raises(ValueError, match=r"Unknown dataset 'mnist'; valid: csv, folder, "
                                         r"medmnist, synthetic-pathology, synthetic-retina"):
        load_source(RunConfig(dataset="mnist"))
    assert set(SOURCES) == {"synthetic-retina", "synthetic-pathology", "medmnist", "folder",
                            "csv"}


def test_synthetic_source_is_lazy_recipes() -> None:
    src = load_source(RunConfig(dataset="synthetic-retina", num_samples=50))
    assert (len(src.train), len(src.val)) == (50, 20)
    assert src.synthetic and not src.from_files and IMAGE not in src.train[0]
    assert src.num_classes == 5 and src.in_channels == 3
