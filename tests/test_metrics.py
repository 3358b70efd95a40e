"""Tests for flower_focal.metrics: accuracy, macro AUROC, NaN-aware metric aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from sklearn.metrics import roc_auc_score

from flower_focal.metrics import accuracy, macro_auroc, nan_weighted_average, per_class_auroc


def _random_probs(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.concatenate([np.arange(k), rng.integers(0, k, size=n - k)])
    return probs, labels


@pytest.mark.parametrize("k", [3, 5])
def test_macro_auroc_matches_sklearn(k: int) -> None:
    probs, labels = _random_probs(200, k, seed=k)
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert macro_auroc(probs, labels, k) == pytest.approx(expected, abs=1e-12)


def test_binary_auroc_matches_sklearn() -> None:
    probs, labels = _random_probs(100, 2, seed=0)
    expected = roc_auc_score(labels, probs[:, 1])
    assert macro_auroc(probs, labels, 2) == pytest.approx(expected, abs=1e-12)


def test_perfect_predictions() -> None:
    labels = np.array([0, 1, 2, 2, 1, 0])
    probs = np.eye(3)[labels]
    assert macro_auroc(probs, labels, 3) == 1.0
    assert accuracy(probs, labels) == 1.0


def test_missing_class_is_skipped() -> None:
    probs, labels = _random_probs(120, 4, seed=1)
    labels = np.where(labels == 3, 0, labels)  # class 3 never occurs
    per_class = per_class_auroc(probs, labels, 4)
    assert math.isnan(per_class[3]) and np.isfinite(per_class[:3]).all()
    expected = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in range(3)])
    assert macro_auroc(probs, labels, 4) == pytest.approx(expected, abs=1e-12)


def test_single_class_or_empty_gives_nan() -> None:
    probs, _ = _random_probs(10, 3, seed=2)
    assert math.isnan(macro_auroc(probs, np.zeros(10, dtype=int), 3))
    assert math.isnan(macro_auroc(np.empty((0, 3)), np.empty(0, dtype=int), 3))
    assert math.isnan(accuracy(np.empty((0, 3)), np.empty(0, dtype=int)))


def test_accuracy_and_shape_checks() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert accuracy(probs, [0, 1, 1]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shape"):
        accuracy(probs, [0, 1])
    with pytest.raises(ValueError, match="num_classes"):
        macro_auroc(probs, [0, 1, 1], 3)
    with pytest.raises(ValueError, match="labels"):
        macro_auroc(probs, [0, 1, 2], 2)


def _reply(**metrics: float | int | list[float]) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(metrics)})


def test_nan_weighted_average_matches_hand_computation() -> None:
    replies = [
        _reply(**{"loss": 1.0, "auroc": 0.5, "num-examples": 10}),
        _reply(**{"loss": 2.0, "auroc": 0.7, "num-examples": 30}),
        _reply(**{"loss": 4.0, "auroc": 0.9, "num-examples": 60}),
    ]
    out = nan_weighted_average(replies, "num-examples")
    assert out["loss"] == pytest.approx((10 * 1 + 30 * 2 + 60 * 4) / 100)
    assert out["auroc"] == pytest.approx((10 * 0.5 + 30 * 0.7 + 60 * 0.9) / 100)
    assert out["num-examples"] == 100 and isinstance(out["num-examples"], int)


def test_nan_weighted_average_skips_nan_and_zero_weight() -> None:
    replies = [
        _reply(**{"loss": 1.0, "auroc": math.nan, "num-examples": 10}),
        _reply(**{"loss": 3.0, "auroc": 0.8, "num-examples": 30}),
        _reply(**{"loss": math.nan, "auroc": math.nan, "num-examples": 0}),
        _reply(**{"loss": 2.0, "auroc": 0.6, "num-examples": 10, "hist": [1.0, 2.0]}),
    ]
    out = nan_weighted_average(replies, "num-examples")
    assert out["loss"] == pytest.approx((10 * 1 + 30 * 3 + 10 * 2) / 50)
    assert out["auroc"] == pytest.approx((30 * 0.8 + 10 * 0.6) / 40)
    assert out["num-examples"] == 50
    assert "hist" not in out


def test_nan_weighted_average_all_nan_key_and_bad_weight() -> None:
    out = nan_weighted_average(
        [
            _reply(**{"auroc": math.nan, "num-examples": 5}),
            _reply(**{"auroc": math.nan, "num-examples": 2}),
        ],
        "num-examples",
    )
    assert math.isnan(out["auroc"]) and out["num-examples"] == 7
    with pytest.raises(ValueError, match="num-examples"):
        nan_weighted_average([_reply(loss=1.0)], "num-examples")


def test_per_class_auroc_equals_monais_compute_roc_auc_with_ties():
    """The numpy rank statistic is MONAI's trapezoidal ROC area, ties included."""
    import warnings

    import torch
    from monai.metrics import compute_roc_auc

    from flower_focal.metrics import per_class_auroc

    rng = np.random.default_rng(0)
    compared = 0
    for trial in range(100):
        n, k = int(rng.integers(5, 60)), int(rng.integers(2, 6))
        p = rng.random((n, k)) + 1e-3
        if trial % 2:
            p = np.round(p, 1)  # many ties
        y = rng.integers(0, k, n)
        ours = per_class_auroc(p, y, k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = np.asarray(compute_roc_auc(torch.from_numpy(p), torch.from_numpy(np.eye(k, dtype=np.int64)[y]),
                                             average="none"), dtype=float)
        defined = np.isfinite(ours)
        np.testing.assert_allclose(ours[defined], ref[defined], atol=1e-12)
        compared += int(defined.sum())
    assert compared > 300
