"""Partitioners: split a dataset's indices among federated institutions.

This module owns *who gets which item*: ``iid``, ``dirichlet`` (label skew) and ``by-site``
(one institution per site value), chosen through the :data:`PARTITIONERS` registry. It works
on label / site arrays only, never on images. Every partitioner is deterministic in ``seed``.

:func:`partition_train_val` partitions the validation split *consistently* with train: the
Dirichlet per-class proportions drawn for train are reused for val, so each institution's
val has its own train label distribution; ``by-site`` sends each val item to its site.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

MAX_DIRICHLET_TRIES = 100
"""Dirichlet draws tried (deterministically, from ``seed``) before giving up on ``min_size``."""

ValAssigner = Callable[[np.ndarray, np.ndarray | None], list[np.ndarray]]


@dataclass(frozen=True)
class _Plan:
    """A partitioner's result: train index arrays and how to split a val set the same way."""

    train: list[np.ndarray]
    assign_val: ValAssigner


def _rng(seed: int, tag: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**32, tag]))


def _split_by_proportions(idx: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    """Cut ``idx`` into ``len(proportions)`` consecutive chunks of the given shares."""
    cuts = (np.cumsum(proportions)[:-1] * len(idx)).round().astype(int)
    return np.split(idx, cuts)


def _iid(
    labels: np.ndarray, num_partitions: int, seed: int, alpha: float,
    sites: np.ndarray | None, min_size: int,
) -> _Plan:
    del alpha, sites
    if len(labels) < num_partitions * min_size:
        raise ValueError(
            f"iid: {len(labels)} training items cannot give {num_partitions} institutions "
            f"at least {min_size} each; use fewer institutions or more data."
        )
    train = np.array_split(_rng(seed, 1).permutation(len(labels)), num_partitions)

    def assign_val(val_labels: np.ndarray, val_sites: np.ndarray | None) -> list[np.ndarray]:
        del val_sites
        parts = np.array_split(_rng(seed, 2).permutation(len(val_labels)), num_partitions)
        return [np.sort(p) for p in parts]

    return _Plan([np.sort(p) for p in train], assign_val)


def _dirichlet(
    labels: np.ndarray, num_partitions: int, seed: int, alpha: float,
    sites: np.ndarray | None, min_size: int,
) -> _Plan:
    del sites
    if alpha <= 0:
        raise ValueError(f"dirichlet: alpha must be > 0, got {alpha}.")
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    rng = _rng(seed, 3)
    order = {c: rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)}
    smallest = 0
    for _ in range(MAX_DIRICHLET_TRIES):
        props = rng.dirichlet(np.full(num_partitions, alpha), size=max(num_classes, 1))
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for c in range(num_classes):
            for k, chunk in enumerate(_split_by_proportions(order[c], props[c])):
                parts[k].append(chunk)
        train = [np.sort(np.concatenate(p)) if p else np.array([], dtype=np.int64)
                 for p in parts]
        smallest = min(len(p) for p in train)
        if smallest >= min_size:
            break
    else:
        raise ValueError(
            f"dirichlet: no draw in {MAX_DIRICHLET_TRIES} tries gave each of "
            f"{num_partitions} institutions >= {min_size} training items "
            f"({len(labels)} items, {num_classes} classes, alpha={alpha}; smallest "
            f"institution got {smallest}). Use fewer institutions, a larger alpha "
            "(dirichlet-alpha), a smaller min-partition-size, or partitioner='iid'."
        )

    def assign_val(val_labels: np.ndarray, val_sites: np.ndarray | None) -> list[np.ndarray]:
        del val_sites
        vrng = _rng(seed, 4)
        parts = [[] for _ in range(num_partitions)]
        for c in np.unique(val_labels):
            idx = vrng.permutation(np.flatnonzero(val_labels == c))
            if c < len(props):
                share = props[c]
            else:  # class absent from train: spread it evenly
                share = np.full(num_partitions, 1.0 / num_partitions)
            for k, chunk in enumerate(_split_by_proportions(idx, share)):
                parts[k].append(chunk)
        return [np.sort(np.concatenate(p)) if p else np.array([], dtype=np.int64)
                for p in parts]

    return _Plan(train, assign_val)


def _by_site(
    labels: np.ndarray, num_partitions: int, seed: int, alpha: float,
    sites: np.ndarray | None, min_size: int,
) -> _Plan:
    del labels, seed, alpha
    if sites is None:
        raise ValueError(
            "by-site: the data has no site column; add one (site-column) to the CSV "
            "manifest or use partitioner='iid' or 'dirichlet'."
        )
    sites = np.asarray(sites).astype(str)
    names = sorted(set(sites.tolist()))
    if len(names) != num_partitions:
        raise ValueError(
            f"by-site: the data has {len(names)} site(s) {names} but {num_partitions} "
            "institutions were requested; run exactly one institution per site."
        )
    train = [np.flatnonzero(sites == n) for n in names]
    small = {n: len(p) for n, p in zip(names, train) if len(p) < min_size}
    if small:
        raise ValueError(f"by-site: site(s) with fewer than {min_size} training items: {small}.")

    def assign_val(val_labels: np.ndarray, val_sites: np.ndarray | None) -> list[np.ndarray]:
        if len(val_labels) == 0:
            return [np.array([], dtype=np.int64) for _ in names]
        if val_sites is None:
            raise ValueError("by-site: the validation split has no site column.")
        vs = np.asarray(val_sites).astype(str)
        unknown = sorted(set(vs.tolist()) - set(names))
        if unknown:
            raise ValueError(
                f"by-site: validation site(s) {unknown} have no training data "
                f"(training sites: {names})."
            )
        return [np.flatnonzero(vs == n) for n in names]

    return _Plan(train, assign_val)


PartitionerFn = Callable[[np.ndarray, int, int, float, np.ndarray | None, int], _Plan]

PARTITIONERS: dict[str, PartitionerFn] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "by-site": _by_site,
}
"""``cfg.partitioner`` -> partitioner."""


def _plan(
    labels: np.ndarray, num_partitions: int, method: str, seed: int, alpha: float,
    sites: Sequence[str] | np.ndarray | None, min_size: int,
) -> _Plan:
    try:
        fn = PARTITIONERS[method]
    except KeyError:
        raise ValueError(
            f"Unknown partitioner {method!r}; valid: {', '.join(sorted(PARTITIONERS))}."
        ) from None
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}.")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    site_arr = None if sites is None else np.asarray(sites, dtype=object)
    if site_arr is not None and len(site_arr) != len(labels):
        raise ValueError(f"{len(site_arr)} site values for {len(labels)} labels.")
    plan = fn(labels, num_partitions, seed, alpha, site_arr, min_size)
    empty = [k for k, p in enumerate(plan.train) if len(p) == 0]
    if empty:
        raise ValueError(
            f"{method}: institution(s) {empty} would get no training data "
            f"({len(labels)} items over {num_partitions} institutions)."
        )
    return plan


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    method: str,
    seed: int,
    alpha: float = 0.5,
    sites: Sequence[str] | None = None,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``num_partitions`` sorted index arrays.

    Args:
        labels: class index per item.
        num_partitions: number of institutions.
        method: ``"iid"``, ``"dirichlet"`` or ``"by-site"``.
        seed: same seed, same partition.
        alpha: Dirichlet concentration (smaller = more label skew).
        sites: site per item (``by-site`` only; sorted unique sites -> institutions).
        min_size: minimum training items per institution.

    Raises:
        ValueError: unknown method, impossible ``min_size``, site count != ``num_partitions``,
            or an institution left without data.
    """
    return _plan(labels, num_partitions, method, seed, alpha, sites, min_size).train


def partition_train_val(
    train_labels: np.ndarray,
    val_labels: np.ndarray,
    num_partitions: int,
    method: str,
    seed: int,
    alpha: float = 0.5,
    train_sites: Sequence[str] | None = None,
    val_sites: Sequence[str] | None = None,
    min_size: int = 1,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Partition train as :func:`partition_indices` and val consistently with it.

    ``dirichlet`` reuses the train per-class proportion matrix for val; ``iid`` splits val
    uniformly at random; ``by-site`` sends val items to their site. Val partitions may be
    empty (never an error); an empty train partition raises ``ValueError``.
    """
    plan = _plan(train_labels, num_partitions, method, seed, alpha, train_sites, min_size)
    val = np.asarray(val_labels, dtype=np.int64).reshape(-1)
    vs = None if val_sites is None else np.asarray(val_sites, dtype=object)
    return plan.train, [np.asarray(p, dtype=np.int64) for p in plan.assign_val(val, vs)]


def histogram(labels: np.ndarray, num_classes: int) -> list[int]:
    """Class counts of ``labels`` as a list of ``num_classes`` ints."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()


__all__ = ["PARTITIONERS", "histogram", "partition_indices", "partition_train_val"]
