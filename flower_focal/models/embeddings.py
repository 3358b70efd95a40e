"""Embedding extraction with a frozen backbone, and its on-disk cache per institution.

This module owns the step ``images -> embeddings`` of FOCAL split training:
:func:`extract_embeddings` runs a :class:`~flower_focal.models.backbones.Backbone` over a
dataset in batches, and :func:`cached_embeddings` stores the result as one ``.npz`` per
(backbone identity, data identity) so a client embeds its images once, not every round.

Callers own the data identity: pass :func:`data_key_parts` (built from a ``RunConfig``) or any
JSON-able dict naming the dataset, its file and mtime, the partition, seed, split and image
size. Embed deterministic (evaluation) transforms only: a dataset with random augmentation
would be frozen at one random draw by the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from flower_focal.data.loader import batch_loader, device_batches
from flower_focal.models.backbones import Backbone

__all__ = [
    "CACHE_FORMAT",
    "cache_key",
    "cache_path",
    "cached_embeddings",
    "data_key_parts",
    "extract_embeddings",
]

logger = logging.getLogger("flower_focal.models")

CACHE_FORMAT = 1
"""Version of the cache file layout; part of every key, bump it when the layout changes."""

DEVICE_BATCH_SIZE = {"cuda": 256, "cpu": 64}
"""Default ``batch_size`` of :func:`extract_embeddings` per device type."""

_FLUSH_BATCHES = 64
"""Embeddings stay on the device for this many batches before one copy to the host."""


def extract_embeddings(
    backbone: Backbone,
    dataset: Dataset,
    *,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
    num_workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed every item of ``dataset`` in order; returns ``(X (n, d) float32, y (n,) int64)``.

    The backbone is moved to ``device`` (``"auto"``: CUDA when available) and stays there.
    ``batch_size`` ``None`` picks :data:`DEVICE_BATCH_SIZE` for the device. An
    :class:`~flower_focal.data.loader.ImageTensorDataset` without augmentation is sliced batch
    by batch (on the device when it fits); other datasets are loaded by ``num_workers``
    processes (``None``: :func:`~flower_focal.data.loader.resolve_num_workers`). Features are
    copied to the host every few dozen batches, not after each one, so the GPU never waits for
    the host. ``progress`` shows a tqdm bar counting images. An empty dataset gives
    ``(0, d)`` / ``(0,)``.
    """
    backbone.to(device)
    if batch_size is None:
        batch_size = DEVICE_BATCH_SIZE.get(backbone.device.type, 64)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset)  # type: ignore[arg-type]
    features = np.empty((n, backbone.embed_dim), dtype=np.float32)
    labels = np.empty((n,), dtype=np.int64)
    loader, _ = batch_loader(dataset, batch_size, backbone.device, num_workers, shuffle=False)
    done = 0
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        nonlocal done
        if not pending:
            return
        out = torch.cat([f for f, _ in pending]).cpu().numpy()
        if done + len(out) > n:
            raise ValueError(f"dataset yielded more than its length {n} items")
        features[done:done + len(out)] = out
        labels[done:done + len(out)] = torch.cat([t for _, t in pending]).cpu().numpy()
        done += len(out)
        pending.clear()

    with tqdm(total=n, disable=not progress, unit="img",
              desc=f"embed {backbone.name}@{backbone.input_size}") as bar:
        for images, targets in device_batches(loader, backbone.device):
            pending.append((backbone.embed(images), targets))
            bar.update(len(targets))
            if len(pending) >= _FLUSH_BATCHES:
                flush()
        flush()
    if done != n:
        raise ValueError(f"dataset yielded {done} items but has length {n}")
    return features, labels


# ----------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------
def data_key_parts(
    cfg: Any, *, split: str, partition_id: int | None = None, num_partitions: int | None = None,
) -> dict[str, Any]:
    """Data identity of one institution's split for :func:`cached_embeddings`.

    :func:`flower_focal.data.prepared.data_identity` (every data setting, the data file's
    path, size and mtime, every image file's for folders and CSV manifests), the split and
    the partition.
    """
    from flower_focal.data.prepared import data_identity

    parts = data_identity(cfg)
    parts.update(split=split, partition_id=partition_id, num_partitions=num_partitions)
    return parts


def cache_key(backbone: Backbone, key_parts: Mapping[str, Any]) -> str:
    """SHA-256 over the backbone identity, the caller's data identity and :data:`CACHE_FORMAT`."""
    payload = json.dumps({"format": CACHE_FORMAT, "backbone": backbone.identity,
                          "data": dict(key_parts)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_path(backbone: Backbone, cache_dir: str | Path, key_parts: Mapping[str, Any]) -> Path:
    """Where :func:`cached_embeddings` stores this (backbone, data) pair."""
    return Path(cache_dir) / f"{backbone.name}-{cache_key(backbone, key_parts)[:24]}.npz"


def _checksum(features: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    for arr in (features, labels):
        digest.update(str((arr.dtype.str, arr.shape)).encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def _read_cache(path: Path, key: str, embed_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Load and verify a cache file; raises ``ValueError`` on any inconsistency."""
    try:
        with np.load(path, allow_pickle=False) as data:
            features, labels = data["X"], data["y"]
            stored_key, stored_sum = str(data["key"]), str(data["checksum"])
    except Exception as err:  # zip/CRC/pickle/missing-member errors all mean "corrupted"
        raise ValueError(f"unreadable ({type(err).__name__}: {err})") from err
    if stored_key != key:
        raise ValueError("written for another key")
    if features.dtype != np.float32 or features.ndim != 2 or features.shape[1] != embed_dim:
        raise ValueError(f"bad embeddings array {features.dtype} {features.shape}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels {labels.shape} do not match embeddings {features.shape}")
    if _checksum(features, labels) != stored_sum:
        raise ValueError("checksum mismatch")
    return features, labels


def _write_cache(path: Path, key: str, features: np.ndarray, labels: np.ndarray,
                 meta: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, X=features, y=labels, key=np.array(key),
                     checksum=np.array(_checksum(features, labels)),
                     meta=np.array(json.dumps(meta, sort_keys=True, default=str)))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_embeddings(
    backbone: Backbone,
    dataset: Dataset,
    cache_dir: str | Path,
    key_parts: Mapping[str, Any],
    *,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
    num_workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`extract_embeddings`, memoised on disk under ``cache_dir``.

    The file name hashes ``backbone.identity`` (name, weights fingerprint, preprocessing),
    ``key_parts`` (the caller's data identity, see :func:`data_key_parts`) and the dataset
    length. A file that cannot be read, was written for another key or fails its checksum is
    recomputed with a ``RuntimeWarning``, never used.
    """
    parts = {**dict(key_parts), "n_items": len(dataset)}  # type: ignore[arg-type]
    key = cache_key(backbone, parts)
    path = cache_path(backbone, cache_dir, parts)
    if path.exists():
        try:
            features, labels = _read_cache(path, key, backbone.embed_dim)
        except ValueError as err:
            message = f"embedding cache {path} is corrupted ({err}); recomputing"
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        else:
            if len(features) == parts["n_items"]:
                logger.info("embedding cache hit: %s (%d x %d)", path, *features.shape)
                return features, labels
            warnings.warn(f"embedding cache {path} has {len(features)} rows for "
                          f"{parts['n_items']} items; recomputing", RuntimeWarning, stacklevel=2)
    features, labels = extract_embeddings(backbone, dataset, batch_size=batch_size,
                                          device=device, progress=progress,
                                          num_workers=num_workers)
    _write_cache(path, key, features, labels,
                 {"backbone": backbone.identity, "data": parts, "device": str(backbone.device)})
    logger.info("embedding cache written: %s (%d x %d)", path, *features.shape)
    return features, labels
