"""Tests for flower_focal.data.partition: iid, dirichlet, by-site and train/val consistency."""

from __future__ import annotations

import numpy as np
import pytest

from flower_focal.data.partition import (
    PARTITIONERS,
    histogram,
    partition_indices,
    partition_train_val,
)


def _labels(n: int = 1000, num_classes: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, n)


def _is_partition(parts: list[np.ndarray], n: int) -> bool:
    allidx = np.concatenate(parts)
    return len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))


def _skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between institution and global label distributions."""
    glob = np.bincount(labels, minlength=labels.max() + 1) / len(labels)
    tv = []
    for p in parts:
        h = np.bincount(labels[p], minlength=len(glob)) / max(len(p), 1)
        tv.append(0.5 * np.abs(h - glob).sum())
    return float(np.mean(tv))


def test_registry_names() -> None:
    assert set(PARTITIONERS) == {"iid", "dirichlet", "by-site"}


def test_iid_sizes_balanced_and_complete() -> None:
    labels = _labels(1003)
    parts = partition_indices(labels, 4, "iid", seed=1)
    assert _is_partition(parts, 1003)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_deterministic_per_seed() -> None:
    labels = _labels()
    a = partition_indices(labels, 5, "dirichlet", seed=7, alpha=0.5)
    b = partition_indices(labels, 5, "dirichlet", seed=7, alpha=0.5)
    c = partition_indices(labels, 5, "dirichlet", seed=8, alpha=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert _is_partition(a, len(labels))


def test_dirichlet_skew_increases_as_alpha_decreases() -> None:
    labels = _labels(3000)
    skews = [
        np.mean([_skew(partition_indices(labels, 5, "dirichlet", seed=s, alpha=a), labels)
                 for s in range(3)])
        for a in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < skews[1] < skews[2]


def test_dirichlet_min_size_respected() -> None:
    labels = _labels(300)
    parts = partition_indices(labels, 6, "dirichlet", seed=3, alpha=0.3, min_size=15)
    assert min(len(p) for p in parts) >= 15


def test_dirichlet_impossible_raises_with_numbers_and_fix() -> None:
    labels = _labels(30)
    with pytest.raises(ValueError) as err:
        partition_indices(labels, 10, "dirichlet", seed=0, alpha=0.05, min_size=3)
    msg = str(err.value)
    assert "10 institutions" in msg and ">= 3" in msg and "alpha=0.05" in msg
    assert "iid" in msg and "fewer institutions" in msg


def test_iid_too_many_institutions_raises() -> None:
    with pytest.raises(ValueError, match="5 training items"):
        partition_indices(_labels(5), 6, "iid", seed=0)


def test_unknown_partitioner_lists_valid() -> None:
    with pytest.raises(ValueError, match=r"'shards'.*by-site, dirichlet, iid"):
        partition_indices(_labels(), 2, "shards", seed=0)


def test_by_site_sorted_sites_and_errors() -> None:
    sites = np.array(["b", "a", "c", "a", "b", "c", "a"])
    labels = np.zeros(7, dtype=int)
    parts = partition_indices(labels, 3, "by-site", seed=0, sites=sites)
    assert [p.tolist() for p in parts] == [[1, 3, 6], [0, 4], [2, 5]]
    with pytest.raises(ValueError, match=r"3 site\(s\) \['a', 'b', 'c'\] but 2 institutions"):
        partition_indices(labels, 2, "by-site", seed=0, sites=sites)
    with pytest.raises(ValueError, match="no site column"):
        partition_indices(labels, 3, "by-site", seed=0)


def test_train_val_dirichlet_same_distribution() -> None:
    train, val = _labels(4000, seed=1), _labels(2000, seed=2)
    tr, va = partition_train_val(train, val, 4, "dirichlet", seed=5, alpha=0.3)
    assert _is_partition(tr, len(train)) and _is_partition(va, len(val))
    for p_tr, p_va in zip(tr, va):
        h_tr = np.array(histogram(train[p_tr], 5)) / len(p_tr)
        h_va = np.array(histogram(val[p_va], 5)) / max(len(p_va), 1)
        assert 0.5 * np.abs(h_tr - h_va).sum() < 0.12  # same label mix in train and val
    # val shares of each class follow the train shares
    frac_tr = [len(p) / len(train) for p in tr]
    frac_va = [len(p) / len(val) for p in va]
    assert np.allclose(frac_tr, frac_va, atol=0.05)


def test_train_val_val_may_be_empty_but_train_not() -> None:
    train = _labels(200)
    tr, va = partition_train_val(train, np.array([0, 1]), 4, "dirichlet", seed=0, alpha=0.5)
    assert all(len(p) >= 1 for p in tr)
    assert sum(len(p) for p in va) == 2 and any(len(p) == 0 for p in va)
    tr, va = partition_train_val(train, np.array([], dtype=int), 3, "iid", seed=0)
    assert [len(p) for p in va] == [0, 0, 0]
    with pytest.raises(ValueError, match=r"institution\(s\) \[.*\] would get no training"):
        partition_train_val(train[:2], np.array([0]), 3, "iid", seed=0, min_size=0)


def test_train_val_by_site() -> None:
    tr, va = partition_train_val(
        np.zeros(4, int), np.zeros(3, int), 2, "by-site", seed=0,
        train_sites=["x", "y", "x", "y"], val_sites=["y", "y", "x"],
    )
    assert [p.tolist() for p in tr] == [[0, 2], [1, 3]]
    assert [p.tolist() for p in va] == [[2], [0, 1]]
    with pytest.raises(ValueError, match=r"validation site\(s\) \['z'\]"):
        partition_train_val(np.zeros(2, int), np.zeros(1, int), 2, "by-site", seed=0,
                            train_sites=["x", "y"], val_sites=["z"])
