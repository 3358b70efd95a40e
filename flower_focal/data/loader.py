"""Feeding the accelerator: in-memory image tensors, batch augmentation and DataLoader settings.

This module owns how images reach the model once a split is known:

* :class:`ImageTensorDataset` - a split held as one ``(N, C, S, S)`` float32 tensor (the output
  of the deterministic transforms) plus ``(N,)`` labels. Indexing gives MONAI-style dicts, with
  the per-item random augmentation when there is one, so any loop works; the training and
  embedding loops of flower-focal instead slice whole batches from the tensor (no per-item
  Python, no collation) and apply :class:`BatchAugment` on the device.
* :func:`materialise` - runs the deterministic prefix of a MONAI ``Compose`` over a datalist:
  vectorised over the whole array for in-memory images, in ``num_workers`` worker processes
  for files and synthetic recipes.
* :func:`resolve_num_workers` / :func:`make_loader` - DataLoader workers, pinned memory and
  collation for any other map-style dataset.

Callers pick ``num_workers`` (``None`` or a negative number: :func:`resolve_num_workers` chooses).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from flower_focal.data.fields import IMAGE, LABEL

__all__ = [
    "BatchAugment",
    "ImageTensorDataset",
    "available_cpus",
    "batch_loader",
    "collate_pairs",
    "device_batches",
    "make_loader",
    "materialise",
    "resolve_num_workers",
]

Batch = tuple[torch.Tensor, torch.Tensor]
"""``(images, labels)`` of one batch."""

MAX_AUTO_WORKERS = 8
"""Upper bound of the automatic worker count (more rarely pays for one accelerator)."""

MIN_ITEMS_FOR_WORKERS = 256
"""Below this many items, building a split in worker processes costs more than it saves."""


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_num_workers(num_workers: int | None, device: torch.device | str | None = None) -> int:
    """The number of DataLoader worker processes to use.

    An explicit ``num_workers >= 0`` is returned as is. ``None`` or a negative value means
    automatic: ``min(cpus - 1, 8)`` when ``device`` is CUDA (the host must decode and collate
    while the GPU computes), ``0`` on CPU (workers would compete with the model's own threads
    for the same cores) and ``0`` in a daemonic process (which cannot start children).
    """
    if num_workers is not None and num_workers >= 0:
        return int(num_workers)
    if multiprocessing.current_process().daemon:
        return 0
    if device is not None and torch.device(device).type == "cuda":
        return max(0, min(available_cpus() - 1, MAX_AUTO_WORKERS))
    return 0


def build_workers(num_workers: int | None, n_items: int) -> int:
    """Worker processes for decoding/rendering ``n_items`` once (any device): the explicit
    value, else ``min(cpus - 1, 8)`` when there are at least 4 CPUs and 256 items, else 0."""
    if num_workers is not None and num_workers >= 0:
        return int(num_workers)
    if multiprocessing.current_process().daemon or n_items < MIN_ITEMS_FOR_WORKERS:
        return 0
    cpus = available_cpus()
    return min(cpus - 1, MAX_AUTO_WORKERS) if cpus >= 4 else 0


# ----------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------
def _pair(item: Any) -> tuple[Any, Any]:
    if isinstance(item, Mapping):
        if IMAGE not in item or LABEL not in item:
            raise ValueError(f"dict items need keys {IMAGE!r} and {LABEL!r}, got {sorted(item)}")
        return item[IMAGE], item[LABEL]
    if isinstance(item, tuple | list) and len(item) == 2:
        return item[0], item[1]
    raise ValueError(
        f"items must be dicts with {IMAGE!r}/{LABEL!r} or (image, label) pairs, "
        f"got {type(item).__name__}"
    )


def collate_pairs(items: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack dict or pair items into ``(images float32 (B, ...), labels long (B,))``.

    Plain tensors out (MONAI ``MetaTensor`` metadata is dropped: it follows every op and slows
    it down), one ``torch.stack`` per field instead of ``default_collate``'s recursion.
    """
    pairs = [_pair(item) for item in items]
    images = torch.stack([torch.as_tensor(img).as_subclass(torch.Tensor) for img, _ in pairs])
    labels = torch.stack([torch.as_tensor(lab).as_subclass(torch.Tensor).reshape(())
                          for _, lab in pairs])
    return images.float(), labels.long()


def _seed_worker(worker_id: int) -> None:
    """Give each worker's MONAI random transforms their own stream (torch seeds the rest)."""
    del worker_id
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=info.seed % 2**32)


def make_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int | None = None,
    shuffle: bool = False,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
    collate_fn: Callable[[Sequence[Any]], Any] = collate_pairs,
) -> DataLoader[Any]:
    """A DataLoader that keeps an accelerator fed: ``num_workers`` processes (resolved by
    :func:`resolve_num_workers`) prefetching 4 batches each, pinned memory on CUDA.

    Workers are not persistent: an iterator per epoch draws the shuffle order from
    ``generator`` exactly as with ``num_workers=0``, so the order does not depend on the
    worker count.
    """
    workers = resolve_num_workers(num_workers, device)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
        generator=generator, num_workers=workers, collate_fn=collate_fn,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
        worker_init_fn=_seed_worker if workers else None,
    )


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a small CPU tensor) on ``device`` without making the host wait for the GPU: a
    copy from pageable memory would synchronise, one from (cached) pinned memory does not."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)  # already on a device (rows kept on the GPU): no host copy at all
    return t.pin_memory().to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------
# Batch augmentation (random flips and 90-degree rotations, on any device)
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchAugment:
    """Per-sample random flips of each spatial axis and 90-degree rotations of a batch.

    The same distribution as the per-item MONAI chain of
    :func:`flower_focal.data.transforms.build_transforms` (``RandFlipd`` on each axis with
    ``flip_prob``, ``RandRotate90d`` with ``rotate_prob`` and k in 1..3), applied to whole
    ``(B, C, S, S)`` batches where they lie (GPU or CPU) as one pixel gather. :meth:`draw`
    takes the choices for many samples at once from a CPU ``torch.Generator`` (they depend on
    the seed only, not on device or worker count); :meth:`apply` uses them.
    """

    flip_prob: float = 0.5
    rotate_prob: float = 0.5
    max_k: int = 3

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``(n,)`` int64 codes ``8 * flip_h + 4 * flip_w + k`` (k quarter turns)."""
        u = torch.rand(n, 3, generator=generator)
        k = torch.randint(1, self.max_k + 1, (n,), generator=generator)
        k = torch.where(u[:, 2] < self.rotate_prob, k, torch.zeros_like(k))
        return 8 * (u[:, 0] < self.flip_prob).long() + 4 * (u[:, 1] < self.flip_prob).long() + k

    def apply(self, images: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Transform sample ``i`` of ``images`` as ``codes[i]`` says (codes on its device)."""
        if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"BatchAugment needs square (B, C, S, S) batches, got "
                             f"{tuple(images.shape)}")
        b, c, side, _ = images.shape
        index = _dihedral_maps(side, images.device)[codes]  # (B, S*S)
        flat = images.reshape(b, c, side * side)
        return flat.gather(2, index.unsqueeze(1).expand(b, c, -1)).view_as(images)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draw and apply for one batch."""
        return self.apply(images, to_device_async(self.draw(len(images), generator),
                                                  images.device))


@functools.lru_cache(maxsize=32)
def _dihedral_maps(side: int, device: torch.device) -> torch.Tensor:
    """``(16, S*S)`` source pixel of every output pixel for each code of
    :meth:`BatchAugment.draw`: flip rows, flip columns, then rotate by k quarter turns."""
    base = torch.arange(side * side).view(side, side)
    maps = []
    for code in range(16):
        m = base.flip(0) if code & 8 else base
        m = m.flip(1) if code & 4 else m
        maps.append(m.rot90(code & 3, (0, 1)).reshape(-1))
    return torch.stack(maps).to(device)


# ----------------------------------------------------------------------------------------
# A split held as one tensor
# ----------------------------------------------------------------------------------------
class ImageTensorDataset(Dataset[dict[str, torch.Tensor]]):
    """One split as an ``(N, C, S, S)`` float32 tensor of deterministic-transform outputs.

    ``dataset[i]`` is ``{"image": (C, S, S) float32 copy, "label": long scalar}``, passed
    through ``transform(item, start=augment_from)`` (the random tail of a MONAI ``Compose``)
    when ``augment_from`` is given: any training loop sees the same data as from a MONAI
    ``CacheDataset`` over that chain, and ``transform.set_random_state(seed)`` re-seeds it.
    ``batch_augment`` is the same augmentation for whole batches; flower-focal's own loops
    use :attr:`images` / :attr:`labels` and ``batch_augment`` instead of indexing.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *,
                 transform: Any = None, augment_from: int | None = None,
                 batch_augment: BatchAugment | None = None) -> None:
        if images.ndim != 4 or labels.shape != (images.shape[0],):
            raise ValueError(f"need images (N, C, H, W) and labels (N,), got "
                             f"{tuple(images.shape)} and {tuple(labels.shape)}")
        if augment_from is not None and transform is None:
            raise ValueError("augment_from needs the transform chain it indexes")
        self.images = images.float().contiguous()
        self.labels = labels.long()
        self.transform = transform
        self.augment_from = augment_from
        self.batch_augment = batch_augment

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {IMAGE: self.images[index].clone(), LABEL: self.labels[index].clone()}
        if self.augment_from is not None:
            item = self.transform(item, start=self.augment_from)
        return item

    @property
    def nbytes(self) -> int:
        """Bytes held by the images and labels."""
        return (self.images.element_size() * self.images.nelement()
                + self.labels.element_size() * self.labels.nelement())

    @property
    def deterministic(self) -> bool:
        """True when indexing applies no random transform."""
        return self.augment_from is None


def materialise(
    items: Sequence[dict[str, Any]],
    prefix: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    array_chain: Callable[[torch.Tensor], torch.Tensor] | None = None,
    item_shape: tuple[int, ...],
    channels: int | None = None,
    num_workers: int | None = None,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the deterministic ``prefix`` over ``items``; return stacked images and labels
    (``(0, *item_shape)`` images when there are no items).

    With ``array_chain`` (items whose images are ``H x W x C`` arrays of one shape, with
    ``channels`` channels when given) the images are transformed ``chunk`` at a time as one
    ``(chunk * C, H, W)`` MONAI image: every transform of that chain must act per channel.
    Otherwise each item goes through ``prefix``, in ``num_workers`` processes
    (:func:`build_workers`); the first failing item raises its error in this process.
    """
    n = len(items)
    if array_chain is not None and n:
        arrays = [np.asarray(item[IMAGE]) for item in items]
        shapes = {a.shape for a in arrays}
        if (len(shapes) == 1 and arrays[0].ndim == 3
                and channels in (None, arrays[0].shape[-1])):
            stacked = torch.from_numpy(np.stack(arrays))  # (N, H, W, C)
            n_ch = stacked.shape[-1]
            out = []
            for start in range(0, n, chunk):
                part = stacked[start:start + chunk].permute(0, 3, 1, 2)
                flat = part.reshape(-1, *part.shape[2:])  # (chunk * C, H, W)
                res = torch.as_tensor(array_chain(flat)).as_subclass(torch.Tensor)
                out.append(res.reshape(part.shape[0], n_ch, *res.shape[1:]))
            labels = torch.as_tensor([int(item[LABEL]) for item in items], dtype=torch.long)
            return torch.cat(out).float().contiguous(), labels
    from monai.data import Dataset as MonaiDataset

    workers = build_workers(num_workers, n)
    if workers:
        try:
            loader = DataLoader(MonaiDataset(list(items), prefix), batch_size=16,
                                num_workers=workers, collate_fn=collate_pairs)
            parts = list(loader)
        except Exception:  # noqa: BLE001 - redo in process: the error then names its item
            parts = None
        if parts is not None:
            return (torch.cat([p[0] for p in parts]).contiguous(),
                    torch.cat([p[1] for p in parts]))
    done = [prefix(dict(item)) for item in items]
    if not done:
        return torch.empty(0, *item_shape), torch.empty(0, dtype=torch.long)
    images, labels = collate_pairs(done)
    return images.contiguous(), labels


# ----------------------------------------------------------------------------------------
# Batches for the training and embedding loops
# ----------------------------------------------------------------------------------------
class _Indices(Dataset[torch.Tensor]):
    """``0..n-1``, fetched a whole batch at a time: a DataLoader over it draws the order."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return torch.as_tensor(indices)


class _RowBatches:
    """Batches of tensor rows in the order of an index DataLoader: per epoch, the whole order
    is drawn and copied to where the rows are once; each batch is then one gather there
    (and one pinned, asynchronous copy to ``device`` when the rows stay on the host)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 indices: DataLoader[Any], device: torch.device) -> None:
        self.images, self.labels, self.indices, self.device = images, labels, indices, device

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = list(self.indices)
        if not order:
            return
        where = to_device_async(torch.cat(order), self.images.device)
        start = 0
        for batch in order:
            rows = where[start:start + len(batch)]
            start += len(batch)
            images, labels = self.images[rows], self.labels[rows]
            if images.device != self.device:
                images = to_device_async(images, self.device)
                labels = to_device_async(labels, self.device)
            yield images, labels


def _whole_batch(batch: Any) -> Any:
    return batch


def _fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` take at most a quarter of ``device``'s free memory (CUDA only)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free // 4


def batch_loader(
    dataset: Dataset[Any], batch_size: int, device: torch.device, num_workers: int | None, *,
    shuffle: bool, drop_last: bool = False, generator: torch.Generator | None = None,
) -> tuple[Iterable[Batch], BatchAugment | None]:
    """Batches of ``(images, labels)`` of ``dataset`` and the batch augmentation to apply
    (``None`` when there is none or the items augment themselves).

    An :class:`ImageTensorDataset` is fetched as tensor rows (moved to ``device`` first when
    they fit in a quarter of its free memory; no worker is needed) when it has no
    augmentation, or for training (``shuffle``) when its augmentation exists per batch; other
    datasets (and evaluation of an augmented one) item by item through :func:`make_loader`.
    Either way the sampler, hence the order drawn from ``generator``, is DataLoader's own.
    """
    common = {"batch_size": batch_size, "shuffle": shuffle, "drop_last": drop_last,
              "generator": generator}
    if isinstance(dataset, ImageTensorDataset) and (
            dataset.deterministic or (shuffle and dataset.batch_augment is not None)):
        images, labels = dataset.images, dataset.labels
        if _fits_on(device, dataset.nbytes):
            images, labels = images.to(device), labels.to(device)
        indices = DataLoader(_Indices(len(dataset)), collate_fn=_whole_batch, **common)
        return _RowBatches(images, labels, indices, device), dataset.batch_augment
    return make_loader(dataset, device=device, num_workers=num_workers, **common), None


def device_batches(
    loader: Iterable[Batch], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images float32, labels long (B,))`` on ``device`` from ``(images, labels)``
    batches (:func:`~flower_focal.data.loader.collate_pairs` or tensor rows)."""
    for images, labels in loader:
        yield (
            images.to(device, torch.float32, non_blocking=True),
            labels.reshape(-1).to(device, torch.long, non_blocking=True),
        )
