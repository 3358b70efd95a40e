"""One real federated round in this process, recording exactly what the server observes.

The audit does not re-implement any client: it writes the attacked institutions' images into
a MedMNIST-format ``.npz``, and runs :func:`flower_focal.server.run_server` (the real
strategy from the registry, Flower's DP wrappers included) against a real Flower
``ClientApp`` whose handlers and mods are the library's own, wired like
``clients/client_app.py``. :class:`~flower_focal.testing.LoopbackGrid` delivers the messages
in-process and records every message the server sent and every reply it received.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message
from flwr.clientapp import ClientApp

from flower_focal.config import RunConfig
from flower_focal.testing.grid import LoopbackGrid

logger = logging.getLogger("flower_focal.audit")


def build_client_app() -> ClientApp:
    """The library's ClientApp (:func:`flower_focal.client.app.build_client_app`)."""
    from flower_focal.client.app import build_client_app as build

    return build()


@dataclass
class AuditData:
    """The ``.npz`` written for the federation and the label space of its source."""

    npz: Path
    num_classes: int
    in_channels: int


def _render(item: dict[str, Any]) -> np.ndarray:
    """An ``HxWxC`` uint8 image from a source item (synthetic recipes are rendered)."""
    from flower_focal.data.fields import IMAGE
    from flower_focal.data.synthetic import GENERATOR
    from flower_focal.data.transforms import GenerateSyntheticd, load_image

    if GENERATOR in item:
        return np.asarray(GenerateSyntheticd()(dict(item))[IMAGE], dtype=np.uint8)
    img = item[IMAGE]
    if isinstance(img, str):  # a file (folder / csv sources)
        arr = np.asarray(load_image(img))  # (C, H, W)
        return np.clip(np.moveaxis(arr, 0, -1), 0, 255).astype(np.uint8)
    arr = np.asarray(img)
    return arr[..., None] if arr.ndim == 2 else arr


def write_audit_npz(cfg: RunConfig, path: Path, num_images: int, seed: int, start: int = 0) -> AuditData:
    """Pick ``num_images`` training images of ``cfg``'s data and write them as ``path``.

    Images ``start .. start + num_images`` of a permutation seeded by ``seed`` are taken, so
    calls with consecutive ranges never pick the same image twice.

    The file is MedMNIST-format: ``train_*`` holds the picked images (in the order the iid
    partitioner will group them into institutions of equal size), ``val_*`` one image of every
    class (so the label space is the source's) taken from its validation split.
    """
    from flower_focal.data.fields import LABEL
    from flower_focal.data.sources import load_source

    src = load_source(cfg)
    if len(src.train) < start + num_images:
        raise ValueError(
            f"the audit needs {start + num_images} training images but {cfg.dataset} has "
            f"{len(src.train)}; lower num_samples"
        )
    picks = np.random.default_rng(seed).permutation(len(src.train))[start:start + num_images]
    train = np.stack([_render(src.train[int(i)]) for i in picks])
    train_labels = np.array([int(src.train[int(i)][LABEL]) for i in picks], dtype=np.int64)
    picked = set(picks.tolist())
    val_items = []
    for k in range(src.num_classes):  # one image per class: validation split first, else train
        item = next((d for d in src.val if int(d[LABEL]) == k), None)
        if item is None:
            item = next((d for i, d in enumerate(src.train)
                         if i not in picked and int(d[LABEL]) == k), None)
        if item is not None:
            val_items.append(item)
    val = np.stack([_render(d) for d in val_items])
    val_labels = np.array([int(d[LABEL]) for d in val_items], dtype=np.int64)
    if train.shape[1:] != val.shape[1:]:
        raise ValueError(f"images of {cfg.dataset} differ in size: {train.shape[1:]} vs {val.shape[1:]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, train_images=train, train_labels=train_labels.reshape(-1, 1),
             val_images=val, val_labels=val_labels.reshape(-1, 1))
    return AuditData(npz=path, num_classes=src.num_classes, in_channels=src.in_channels)


def run_round(cfg: RunConfig, num_institutions: int) -> tuple[LoopbackGrid, Any]:
    """Run ``cfg`` (one round) with ``num_institutions`` real ClientApps; return grid and result."""
    from flower_focal.server import run_server

    grid = LoopbackGrid(build_client_app(), num_institutions, cfg.to_flower())
    result = run_server(grid, cfg)
    return grid, result


def institution_truth(cfg: RunConfig, partition_id: int, num_partitions: int) -> torch.Tensor:
    """The institution's training images as the model sees them before augmentation ``(B, C, H, W)``."""
    from flower_focal.data.institution import load_institution_train_eval
    from flower_focal.data.fields import IMAGE

    ds = load_institution_train_eval(cfg, partition_id, num_partitions)
    return torch.stack([torch.as_tensor(ds[i][IMAGE]).as_subclass(torch.Tensor).float()
                        for i in range(len(ds))])


def partition_labels(cfg: RunConfig, partition_id: int, num_partitions: int) -> list[int]:
    """The institution's training labels (for scoring label recovery)."""
    from flower_focal.data.institution import load_institution_train_eval
    from flower_focal.data.fields import LABEL

    ds = load_institution_train_eval(cfg, partition_id, num_partitions)
    return [int(ds[i][LABEL]) for i in range(len(ds))]


def array_summary(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """What the replies carried: every Array's record, name, dtype, shape, stype and size."""
    out = []
    for m in messages:
        if m.has_error():
            out.append({"error": m.error.reason})
            continue
        for rname, record in m.content.array_records.items():
            for name, arr in record.items():
                out.append({"record": rname, "array": name, "dtype": arr.dtype,
                            "shape": list(arr.shape), "stype": arr.stype, "bytes": len(arr.data)})
    return out
