"""Classification metrics and NaN-aware federated aggregation of metric records.

This module owns how predictions become numbers (:func:`accuracy`, :func:`macro_auroc`)
and how the server combines the clients' ``MetricRecord`` replies
(:func:`nan_weighted_average`, a drop-in for flwr's ``aggregate_metricrecords``).

Macro-AUROC rule: one-vs-rest AUROC is computed per class with MONAI's
``compute_roc_auc(..., average="none")``; the macro value is the unweighted mean over the
classes that have at least one positive *and* one negative example in ``labels``. Classes
without both are skipped (a small client partition often lacks some classes), and the
result is NaN when no class qualifies. With every class present this equals scikit-learn's
``roc_auc_score(labels, probs, multi_class="ovr", average="macro")``; for two classes it
equals the binary AUROC of ``probs[:, 1]``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from flwr.app import MetricRecord, RecordDict

__all__ = ["accuracy", "classification_report", "confusion_matrix", "macro_auroc",
           "nan_weighted_average", "per_class_auroc"]


def _check(probs: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(
            f"probs must have shape (n, K) and labels shape (n,), got {p.shape} and {y.shape}"
        )
    return p, y.astype(np.int64)


def accuracy(probs: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Fraction of rows whose arg-max class equals the label; NaN when there are no rows."""
    p, y = _check(probs, labels)
    if y.size == 0:
        return math.nan
    return float(np.mean(p.argmax(axis=1) == y))


def per_class_auroc(probs: npt.ArrayLike, labels: npt.ArrayLike, num_classes: int) -> np.ndarray:
    """One-vs-rest AUROC of each class, shape ``(num_classes,)``; NaN where undefined.

    A class's AUROC is undefined (NaN) when ``labels`` has no positive or no negative
    example of it. Computed as the Mann-Whitney statistic over average ranks (ties count one
    half), which is exactly the area under the trapezoidal ROC curve that MONAI's
    ``compute_roc_auc`` integrates (a test checks they agree); numpy only, so an institution
    answering an evaluate message imports neither torch nor MONAI for it.
    """
    p, y = _check(probs, labels)
    if p.shape[1] != num_classes:
        raise ValueError(f"probs has {p.shape[1]} columns but num_classes={num_classes}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    result = np.full(num_classes, np.nan)
    counts = np.bincount(y, minlength=num_classes)
    defined = (counts > 0) & (counts < y.size)
    if not defined.any():
        return result
    for k in np.flatnonzero(defined):
        result[k] = _binary_auroc(p[:, k], y == k)
    return result


def _binary_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie), via average ranks."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], scores.size]
    average = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(average, ends - starts)
    n_pos = int(positive.sum())
    n_neg = scores.size - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auroc(probs: npt.ArrayLike, labels: npt.ArrayLike, num_classes: int) -> float:
    """Mean one-vs-rest AUROC over classes with positives and negatives (see module doc)."""
    values = per_class_auroc(probs, labels, num_classes)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def confusion_matrix(probs: npt.ArrayLike, labels: npt.ArrayLike, num_classes: int) -> np.ndarray:
    """Counts ``(num_classes, num_classes)``: row = true class, column = predicted (arg-max)."""
    p, y = _check(probs, labels)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    out = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(out, (y, p.argmax(axis=1)), 1)
    return out


def classification_report(probs: npt.ArrayLike, labels: npt.ArrayLike, num_classes: int,
                          class_names: tuple[str, ...] | list[str] = ()) -> dict:
    """Per-class and overall metrics of one evaluation, JSON-ready (NaN -> None).

    ``per_class``: for each class its name, ``n`` (true examples), ``auroc`` (one-vs-rest,
    None when undefined), ``recall`` (sensitivity; None without examples) and ``precision``
    (None when never predicted). ``confusion_matrix``: rows true class, columns predicted.
    ``auroc_macro`` is :func:`macro_auroc`; ``recall_macro`` (balanced accuracy) the mean
    recall over classes with examples.
    """
    cm = confusion_matrix(probs, labels, num_classes)
    auroc = per_class_auroc(probs, labels, num_classes)
    names = list(class_names) if len(class_names) == num_classes else [str(i) for i in range(num_classes)]

    def clean(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    rows, recalls = [], []
    for k in range(num_classes):
        n, predicted = int(cm[k].sum()), int(cm[:, k].sum())
        recall = cm[k, k] / n if n else math.nan
        if n:
            recalls.append(recall)
        rows.append({"class": k, "name": names[k], "n": n, "auroc": clean(auroc[k]),
                     "recall": clean(recall),
                     "precision": clean(cm[k, k] / predicted if predicted else math.nan)})
    finite = auroc[np.isfinite(auroc)]
    return {
        "auroc_macro": clean(float(finite.mean())) if finite.size else None,
        "recall_macro": clean(float(np.mean(recalls))) if recalls else None,
        "per_class": rows,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_axes": "rows: true class, columns: predicted class",
    }


def nan_weighted_average(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Average every numeric metric over replies, weighted by ``weighted_by_key``, skipping NaN.

    Drop-in for flwr's ``aggregate_metricrecords`` (pass it as ``train_metrics_aggr_fn`` /
    ``evaluate_metrics_aggr_fn``). Differences:

    - for each metric key, replies whose value is NaN/Inf are left out and the weights are
      renormalised over the remaining replies; a key with no finite value becomes NaN;
    - replies with weight 0 are ignored (they carry no examples);
    - the weight key itself is returned as the sum of the weights (total examples);
    - values that are not ``int``/``float`` (e.g. lists) are skipped.

    Each reply's weight is read from the first of its MetricRecords that holds
    ``weighted_by_key``; a reply without it, or with a negative or non-finite weight,
    raises ``ValueError``.
    """
    from flwr.app import MetricRecord

    weights: list[float] = []
    for i, record in enumerate(records):
        weight = next(
            (m[weighted_by_key] for m in record.metric_records.values() if weighted_by_key in m),
            None,
        )
        if not _is_number(weight) or not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"reply {i} has no valid weight {weighted_by_key!r} (got {weight!r}); "
                "every reply must report a finite, non-negative number of examples"
            )
        weights.append(weight)

    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for record, weight in zip(records, weights, strict=True):
        for metric_record in record.metric_records.values():
            for key, value in metric_record.items():
                if key == weighted_by_key or not _is_number(value):
                    continue
                sums.setdefault(key, 0.0)
                totals.setdefault(key, 0.0)
                if weight > 0 and math.isfinite(value):
                    sums[key] += weight * value
                    totals[key] += weight

    aggregated = MetricRecord()
    for key, total in totals.items():
        aggregated[key] = sums[key] / total if total > 0 else math.nan
    total_weight = sum(weights)
    aggregated[weighted_by_key] = (
        int(total_weight) if all(isinstance(w, int) for w in weights) else float(total_weight)
    )
    return aggregated


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
