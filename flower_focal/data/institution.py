"""One institution's data: the entry point the Flower client and the server use.

This module owns the glue: source (:mod:`.sources`) -> partition (:mod:`.partition`) ->
:class:`~flower_focal.data.loader.ImageTensorDataset` built with the transforms of
:mod:`.transforms` (what a MONAI ``CacheDataset`` caches, as one tensor). Results are cached per
process (Flower calls a client many times per process) in the ``sources``, ``partitions``,
``institutions`` and ``splits`` regions of :data:`flower_focal.cache.CACHE`, keyed by the data
fields of the :class:`~flower_focal.config.RunConfig` only, so changing e.g. ``lr`` reuses the
cache.

Callers use :func:`load_institution` (client), :func:`load_split` (central evaluation) and
:func:`describe_partitions` (logging; loads no image).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from flower_focal.cache import CACHE, nbytes, region
from flower_focal.config import RunConfig
from flower_focal.data import prepared
from flower_focal.data.fields import IMAGE
from flower_focal.data.loader import ImageTensorDataset, materialise
from flower_focal.data.partition import histogram, partition_train_val
from flower_focal.data.prepared import InstitutionData
from flower_focal.data.sources import SourceData, load_source

logger = logging.getLogger("flower_focal.data")

DATA_FIELDS: tuple[str, ...] = RunConfig.settings("data")
"""The RunConfig fields that determine the data (the per-process cache key; ``setting(data=True)``)."""


def _data_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with every non-data field at its default: a hashable cache key."""
    return RunConfig(**{name: getattr(cfg, name) for name in DATA_FIELDS})


def _source(key: RunConfig) -> SourceData:
    return CACHE.get_or_build("sources", key, lambda: load_source(key))


def _partitions(
    key: RunConfig, num_partitions: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    def build() -> tuple[list[np.ndarray], list[np.ndarray]]:
        src = _source(key)
        return partition_train_val(
            src.labels("train"), src.labels("val"), num_partitions, key.partitioner, key.seed,
            alpha=key.dirichlet_alpha, train_sites=src.sites("train"),
            val_sites=src.sites("val"), min_size=key.min_partition_size,
        )

    return CACHE.get_or_build("partitions", (key, num_partitions), build, nbytes=nbytes)


def _check_partition(partition_id: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}.")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id {partition_id} out of range for {num_partitions} partitions "
            f"(valid: 0..{num_partitions - 1})."
        )


def make_dataset(items: Sequence[dict[str, Any]], transform: Any, from_files: bool, *,
                 image_size: int | None = None, in_channels: int | None = None,
                 num_workers: int | None = None) -> ImageTensorDataset:
    """Run ``transform``'s deterministic prefix over ``items`` now and hold the result as one
    tensor (:class:`~flower_focal.data.loader.ImageTensorDataset`); its random tail (if any)
    runs per item on indexing, and as :data:`BATCH_AUGMENT` in ``train_local``.

    In-memory arrays (``.npz``) are transformed many images per call when ``image_size`` is
    given; files and synthetic recipes one by one, in ``num_workers`` processes (``None``:
    automatic, see :func:`~flower_focal.data.loader.build_workers`). A bad image raises
    ``ValueError`` naming the file instead of MONAI's wrapped ``RuntimeError``.
    """
    from flower_focal.data.transforms import (
        BATCH_AUGMENT,
        ImageDataError,
        find_data_error,
        first_random,
        load_image,
        pixel_chain,
    )

    first = first_random(transform)
    prefix = functools.partial(transform, end=first) if first is not None else transform
    arrays = (image_size is not None and not from_files and len(items) > 0
              and all(isinstance(item.get(IMAGE), np.ndarray) for item in items))
    shape = (in_channels or 0, image_size or 0, image_size or 0)
    try:
        images, labels = materialise(
            items, prefix, array_chain=pixel_chain(image_size) if arrays else None,  # type: ignore[arg-type]
            item_shape=shape, channels=in_channels, num_workers=num_workers)
    except Exception as err:
        own = find_data_error(err)
        if own is not None:
            raise ImageDataError(str(own)) from err
        if from_files:  # find the unreadable file (load_image names it)
            for item in items:
                load_image(item[IMAGE])
        raise
    return ImageTensorDataset(images, labels, transform=transform, augment_from=first,
                              batch_augment=BATCH_AUGMENT if first is not None else None)


def _dataset_options(key: RunConfig, src: SourceData, num_workers: int | None,
                     ) -> dict[str, Any]:
    """:func:`make_dataset` options of a source: output shape and build workers (< 0: auto)."""
    return {"image_size": key.image_size, "in_channels": src.in_channels,
            "num_workers": None if num_workers is None or num_workers < 0 else num_workers}


def _histograms(src: SourceData, tr: np.ndarray, va: np.ndarray) -> tuple[list[int], list[int]]:
    return (histogram(src.labels("train")[tr], src.num_classes),
            histogram(src.labels("val")[va], src.num_classes))


CACHE_BUDGET_ENV = region("institutions").env
"""Environment variable (``FLOWER_FOCAL_DATA_CACHE_MB``): per-process budget (MiB) of cached
institution datasets (the ``institutions`` region of :data:`flower_focal.cache.CACHE`)."""
DEFAULT_CACHE_BUDGET_MB = region("institutions").default


def dataset_nbytes(ds: Dataset) -> int:
    """Bytes held by an ``ImageTensorDataset`` or a ``CacheDataset``'s cache (0 for a dataset
    that caches nothing)."""
    if isinstance(ds, ImageTensorDataset):
        return ds.nbytes
    return nbytes(getattr(ds, "_cache", None) or [])


def _train_transforms(key: RunConfig, src: SourceData, partition_id: int) -> dict[str, Any]:
    """``build_transforms`` kwargs of institution ``partition_id``'s training chain."""
    return {"image_size": key.image_size, "train": True, "from_files": src.from_files,
            "synthetic_items": src.synthetic, "in_channels": src.in_channels,
            "seed": key.seed + partition_id}


def _transform_institution(key: RunConfig, partition_id: int, num_partitions: int, *,
                           num_workers: int | None = None) -> InstitutionData:
    from flower_focal.data.transforms import build_transforms

    src = _source(key)
    train_parts, val_parts = _partitions(key, num_partitions)
    tr, va = train_parts[partition_id], val_parts[partition_id]
    build = _dataset_options(key, src, num_workers)
    train = make_dataset([src.train[i] for i in tr],
                         build_transforms(**_train_transforms(key, src, partition_id)),
                         src.from_files, **build)
    val = make_dataset([src.val[i] for i in va],
                       build_transforms(key.image_size, False, src.from_files,
                                        synthetic_items=src.synthetic, in_channels=src.in_channels),
                       src.from_files, **build)
    tr_hist, va_hist = _histograms(src, tr, va)
    logger.info(
        "institution %d/%d (%s, %s): %d train, %d val; train histogram %s; val histogram %s",
        partition_id, num_partitions, key.dataset, key.partitioner, len(tr), len(va),
        tr_hist, va_hist,
    )
    return InstitutionData(
        partition_id=partition_id, train=train, val=val, num_classes=src.num_classes,
        in_channels=src.in_channels, n_train=len(tr), n_val=len(va),
        train_histogram=tr_hist, val_histogram=va_hist, class_names=src.class_names,
    )


def _build_institution(key: RunConfig, partition_id: int, num_partitions: int, *,
                       num_workers: int | None = None) -> InstitutionData:
    """Institution ``partition_id``: from its prepared file when one is stored for exactly
    this data (:mod:`.prepared`), else read, partitioned and transformed, then stored."""
    store = prepared.store_dir()
    path = skey = None
    if store is not None:
        skey = prepared.store_key(key, partition_id, num_partitions)
        path = prepared.store_path(store, skey)
        if path.exists():
            try:
                inst = prepared.load_institution_file(path, skey)
                logger.info(
                    "institution %d/%d (%s, %s): %d train, %d val; train histogram %s; val "
                    "histogram %s (prepared file %s)", partition_id, num_partitions, key.dataset,
                    key.partitioner, inst.n_train, inst.n_val, inst.train_histogram,
                    inst.val_histogram, path.name)
                return inst
            except ValueError as err:
                logger.warning("prepared data not used, rebuilding it: %s", err)
    inst = _transform_institution(key, partition_id, num_partitions, num_workers=num_workers)
    if path is not None and skey is not None:
        try:
            src = _source(key)
            prepared.save_institution(inst, path, skey,
                                      train_transforms=_train_transforms(key, src, partition_id))
        except OSError as err:
            logger.warning("could not store prepared data at %s (%s); later messages rebuild it",
                           path, err)
    return inst


def load_institution(cfg: RunConfig, partition_id: int, num_partitions: int) -> InstitutionData:
    """Return institution ``partition_id`` of ``num_partitions`` (cached per process, within
    the ``FLOWER_FOCAL_DATA_CACHE_MB`` budget: the ``institutions`` region of
    :data:`flower_focal.cache.CACHE`, least recently used dropped first, the newest always kept;
    a simulation worker serves whichever institutions the engine hands it, round after round,
    and a bound by count could either rebuild them every round or exhaust memory on large
    images).

    Raises ``ValueError`` / ``FileNotFoundError`` for bad data, an impossible partition or
    an out-of-range ``partition_id``.
    """
    _check_partition(partition_id, num_partitions)
    key = _data_config(cfg)
    return CACHE.get_or_build(
        "institutions", (key, partition_id, num_partitions),
        lambda: _build_institution(key, partition_id, num_partitions, num_workers=cfg.num_workers),
        nbytes=lambda inst: dataset_nbytes(inst.train) + dataset_nbytes(inst.val))


def load_institution_train_eval(cfg: RunConfig, partition_id: int, num_partitions: int) -> Dataset:
    """Institution ``partition_id``'s training split with the deterministic transforms only.

    Same items and order as :func:`load_institution`'s ``train``, without random
    augmentation: what a frozen backbone embeds once (FOCAL) and what an embedding cache may
    store.
    """
    _check_partition(partition_id, num_partitions)
    from flower_focal.data.transforms import build_transforms

    key = _data_config(cfg)
    src = _source(key)
    train_parts, _ = _partitions(key, num_partitions)
    transform = build_transforms(key.image_size, False, from_files=src.from_files,
                                 synthetic_items=src.synthetic, in_channels=src.in_channels)
    return make_dataset([src.train[i] for i in train_parts[partition_id]], transform,
                        src.from_files, **_dataset_options(key, src, cfg.num_workers))


def _split(key: RunConfig, role: str, num_workers: int) -> Dataset:
    def build() -> Dataset:
        from flower_focal.data.transforms import build_transforms

        src = _source(key)
        items = src.train if role == "train" else src.val
        transform = build_transforms(key.image_size, False, src.from_files,
                                     synthetic_items=src.synthetic, in_channels=src.in_channels)
        return make_dataset(items, transform, src.from_files,
                            **_dataset_options(key, src, num_workers))

    return CACHE.get_or_build("splits", (key, role, num_workers), build, nbytes=dataset_nbytes)


def load_split(cfg: RunConfig, split: str) -> Dataset:
    """Whole ``split``, unpartitioned, with evaluation transforms: for central evaluation.

    ``"train"`` / ``cfg.train_split`` and ``"val"`` / ``cfg.val_split`` are the run's
    splits; any other name (e.g. ``"test"``) is loaded in place of val (npz keys
    ``test_images``/``test_labels``, a ``test/`` folder, CSV rows with ``split=test``, or a
    synthetic split seeded by that name). Cached per process.
    """
    if split in ("train", cfg.train_split):
        return _split(_data_config(cfg), "train", cfg.num_workers)
    if split in ("val", cfg.val_split):
        return _split(_data_config(cfg), "val", cfg.num_workers)
    return _split(_data_config(cfg.replace(val_split=split)), "val", cfg.num_workers)


def source_info(cfg: RunConfig) -> SourceData:
    """The (cached) :class:`SourceData` of ``cfg``: label space and channels, for building
    a model on the server without loading images."""
    return _source(_data_config(cfg))


def describe_partitions(cfg: RunConfig, num_partitions: int) -> list[dict[str, Any]]:
    """Sizes and class histograms of every institution (no image is loaded or generated).

    Each dict has ``partition_id``, ``n_train``, ``n_val``, ``train_histogram``,
    ``val_histogram`` and, for ``by-site``, ``site``.
    """
    _check_partition(0, num_partitions)
    key = _data_config(cfg)
    src = _source(key)
    train_parts, val_parts = _partitions(key, num_partitions)
    sites = src.sites("train")
    out = []
    for k, (tr, va) in enumerate(zip(train_parts, val_parts)):
        tr_hist, va_hist = _histograms(src, tr, va)
        row: dict[str, Any] = {"partition_id": k, "n_train": len(tr), "n_val": len(va),
                               "train_histogram": tr_hist, "val_histogram": va_hist}
        if cfg.partitioner == "by-site" and sites is not None:
            row["site"] = str(sites[tr[0]])
        out.append(row)
    return out


DATA_REGIONS = ("npz", "sources", "partitions", "institutions", "splits")
"""The regions of :data:`flower_focal.cache.CACHE` that hold data (what :func:`clear_caches` forgets)."""


def clear_caches() -> None:
    """Forget every cached source, partition and dataset of this process (tests, notebooks)."""
    for name in DATA_REGIONS:
        CACHE.clear(name)


__all__ = [
    "DATA_FIELDS",
    "InstitutionData",
    "clear_caches",
    "dataset_nbytes",
    "describe_partitions",
    "load_institution",
    "load_split",
    "make_dataset",
    "source_info",
]
