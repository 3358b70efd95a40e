"""Tests for flower_focal.data.synthetic: determinism, independence, label dependence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flower_focal.config import RunConfig
from flower_focal.data import load_source
from flower_focal.data.synthetic import (
    GENERATORS,
    generate_image,
    split_sizes,
    synthetic_datalist,
    synthetic_labels,
    write_synthetic,
)

NAMES = sorted(GENERATORS)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes_other_seed_differs(name: str) -> None:
    a = generate_image(name, 2, 7, "train", seed=1, size=32)
    b = generate_image(name, 2, 7, "train", seed=1, size=32)
    c = generate_image(name, 2, 7, "train", seed=2, size=32)
    d = generate_image(name, 2, 7, "val", seed=1, size=32)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes() and a.tobytes() != d.tobytes()


@pytest.mark.parametrize("name", NAMES)
def test_image_independent_of_how_many_generated(name: str) -> None:
    items = synthetic_datalist(name, "train", 10, seed=3, size=24)
    in_order = [generate_image(name, d["label"], d["index"], "train", 3, 24) for d in items]
    np.random.seed(123)  # global numpy state must not matter either
    alone = generate_image(name, items[7]["label"], 7, "train", 3, 24)
    assert alone.tobytes() == in_order[7].tobytes()


@pytest.mark.parametrize("name", NAMES)
def test_labels_seeded_every_class_mildly_imbalanced(name: str) -> None:
    k = GENERATORS[name].num_classes
    a = synthetic_labels(name, "train", 500, seed=0)
    assert np.array_equal(a, synthetic_labels(name, "train", 500, seed=0))
    assert not np.array_equal(a, synthetic_labels(name, "train", 500, seed=1))
    counts = np.bincount(a, minlength=k)
    assert counts.min() > 0 and counts.max() / counts.min() < 5
    assert np.bincount(synthetic_labels(name, "val", k, seed=0), minlength=k).min() == 1


def test_split_sizes() -> None:
    assert split_sizes("synthetic-retina", 1200) == (1200, 240)
    assert split_sizes("synthetic-pathology", 50) == (50, 36)  # 9 classes * 4
    with pytest.raises(ValueError, match="num-samples"):
        split_sizes("synthetic-retina", 0)


def test_retina_lesions_grow_with_grade() -> None:
    def lesion_fraction(grade: int) -> float:
        ims = np.stack([generate_image("synthetic-retina", grade, i, "train", 0, 48)
                        for i in range(30)]).astype(float)
        r, g = ims[..., 0], ims[..., 1]
        return float(((g > 0.75 * r) & (r > 150)).mean())  # yellow exudate / cotton-wool

    f0, f2, f4 = (lesion_fraction(g) for g in (0, 2, 4))
    assert f0 < f2 < f4


def test_pathology_texture_depends_on_class() -> None:
    def stats(c: int) -> tuple[float, float]:
        ims = np.stack([generate_image("synthetic-pathology", c, i, "train", 0, 32)
                        for i in range(20)]).astype(float)
        return float(ims.mean()), float((ims[..., 2] - ims[..., 0]).mean())

    background, lymph, muscle = stats(1), stats(3), stats(5)
    assert background[0] > muscle[0] > lymph[0]  # empty glass is bright, lymphocytes dark
    assert lymph[1] > muscle[1]  # haematoxylin (blue) vs eosin (pink)


def test_large_sizes_render_at_requested_size() -> None:
    assert generate_image("synthetic-retina", 4, 0, "train", 0, 96).shape == (96, 96, 3)


def test_bad_generator_and_label() -> None:
    with pytest.raises(ValueError, match=r"'synthetic-xray'.*synthetic-pathology"):
        generate_image("synthetic-xray", 0, 0, "train", 0, 32)
    with pytest.raises(ValueError, match="label 5 out of range"):
        generate_image("synthetic-retina", 5, 0, "train", 0, 32)


def test_write_synthetic_loads_through_csv(tmp_path: Path) -> None:
    cfg = RunConfig(dataset="synthetic-pathology", num_samples=20, image_size=16, seed=4)
    manifest = write_synthetic(cfg, tmp_path / "cache")
    src = load_source(cfg.replace(dataset="csv", data_path=str(manifest)))
    assert (len(src.train), len(src.val)) == split_sizes(cfg.dataset, 20)
    assert src.from_files and src.in_channels == 3
    first = synthetic_datalist(cfg.dataset, "train", 20, 4, 16)
    assert [d["label"] for d in src.train] == [d["label"] for d in first]
    assert Path(src.train[0]["image"]).is_file()
