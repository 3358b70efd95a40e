"""One institution's prepared tensors, kept on its own disk for the later messages of a run.

A deployed SuperNode (Flower 1.42) starts a fresh ``flwr-clientapp`` process for every
message, so an in-process cache never survives to the next message: each one would re-read
the data file, re-partition and re-run the MONAI transforms, and import MONAI to do so. The
first message that needs the data builds it as usual and writes the result here (the
deterministic transform outputs as one float32 tensor per split, the labels, the label space,
the histograms and how to rebuild the random augmentation); later messages read that file
with numpy and torch alone. MONAI is imported again only if something indexes the training
split item by item (the random tail of the MONAI chain is rebuilt on first use); flower-focal's
own loops use the tensors and the batch augmentation directly.

The file name and its stored key are a SHA-256 over :func:`data_identity` (every data setting,
the data file's and every image file's path, size, mtime, inode and ctime), the partition, the
data package's source and the torch/MONAI/numpy/Pillow versions; the arrays carry a checksum.
A file that cannot be read, was written for another key, fails its checksum or lies in a
directory others can write to is never used (the data is built again and the file rewritten).
This module imports no MONAI.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from flower_focal.config import RunConfig
from flower_focal.data.fields import IMAGE
from flower_focal.data.loader import BatchAugment, ImageTensorDataset

STORE_FORMAT = 1
"""Bumped whenever what is stored (or how it is built) changes: older files are rebuilt."""


@dataclass(frozen=True)
class InstitutionData:
    """The train and val datasets of one institution (partition).

    ``train`` / ``val`` yield ``{"image": float32 tensor (in_channels, S, S), "label":
    torch.long scalar}``; ``train`` applies random flips/rotations, ``val`` does not.
    ``val`` may be empty (``n_val == 0``): skip local evaluation then.
    """

    partition_id: int
    train: Dataset
    val: Dataset
    num_classes: int
    in_channels: int
    n_train: int
    n_val: int
    train_histogram: list[int]
    val_histogram: list[int]
    class_names: tuple[str, ...] = ()


STORE_ENV = "FLOWER_FOCAL_DATA_STORE"
"""Environment variable: the directory for prepared institutions, or ``off``."""


def store_dir() -> Path | None:
    """Where prepared institutions are kept: ``$FLOWER_FOCAL_DATA_STORE``, else a directory of
    this user's in the system temp dir; ``None`` when the variable is ``off``."""
    raw = os.environ.get(STORE_ENV, "").strip()
    if raw.lower() in ("off", "0", "none", "false"):
        return None
    if raw:
        return Path(raw).expanduser()
    return Path(tempfile.gettempdir()) / f"flower-focal-data-{_uid()}"


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


def private_dir(directory: Path) -> bool:
    """Create ``directory`` (mode 0700) if needed; True only if it is a real directory of this
    user that nobody else can write to (a name in a shared temp dir can be taken first)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(directory)
    except OSError:
        return False
    if not hasattr(os, "getuid"):
        return stat.S_ISDIR(st.st_mode)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == _uid() and not st.st_mode & 0o022


def _versions() -> dict[str, str]:
    """The libraries whose behaviour is inside a prepared file (read without importing them)."""
    from importlib import metadata

    out = {}
    for name in ("torch", "monai", "numpy", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _file_identity(path: Path) -> str:
    """Path, size, mtime, inode and ctime (which no tool can set back, unlike mtime)."""
    st = os.stat(path)
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """SHA-256 of the data package's source: a changed transform or generator is new data."""
    digest = hashlib.sha256()
    for file in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


FILE_SOURCES = ("folder", "csv")
"""Datasets whose images are files of their own: their identity is every file's, not the
folder's or the manifest's alone (rewriting an image changes neither)."""


def data_identity(cfg: RunConfig) -> dict[str, Any]:
    """Every data setting of ``cfg`` and the identity of the data on disk: the data file's
    resolved path, size, mtime, inode and ctime, and for image folders / CSV manifests a digest
    of every image file's. What a cache of anything derived from the data is keyed on."""
    parts: dict[str, Any] = {name: getattr(cfg, name) for name in RunConfig.settings("data")}
    if cfg.data_path:
        path = Path(cfg.data_path).expanduser()
        parts["data_path"] = str(path.resolve())
        if path.exists():
            parts["data_file"] = _file_identity(path.resolve())
    if cfg.dataset in FILE_SOURCES and cfg.data_path:
        from flower_focal.data.institution import source_info

        digest = hashlib.sha256()
        src = source_info(cfg)
        for item in (*src.train, *src.val):
            file = str(item[IMAGE])
            try:
                digest.update(f"{_file_identity(Path(file))}\n".encode())
            except OSError:
                digest.update(f"{file}|missing\n".encode())
        parts["files"] = digest.hexdigest()
    return parts


def store_key(cfg: RunConfig, partition_id: int, num_partitions: int) -> str:
    """SHA-256 over :func:`data_identity`, flower-focal's data code and the partition."""
    parts = data_identity(cfg)
    parts.update(format=STORE_FORMAT, code=_code_fingerprint(), libraries=_versions(),
                 partition_id=partition_id, num_partitions=num_partitions)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def store_path(store_dir: str | Path, key: str) -> Path:
    return Path(store_dir) / f"institution-{key[:24]}.npz"


class DeferredTransforms:
    """The training split's MONAI chain, built on first use (``build_transforms`` kwargs).

    Only indexing a stored training split item by item needs it; ``set_random_state`` before
    that is remembered, not a reason to import MONAI.
    """

    def __init__(self, **build_kwargs: Any) -> None:
        self.build_kwargs = build_kwargs
        self._chain: Any = None
        self._seed: int | None = None

    def _built(self) -> Any:
        if self._chain is None:
            from flower_focal.data.transforms import build_transforms

            self._chain = build_transforms(**self.build_kwargs)
            if self._seed is not None:
                self._chain.set_random_state(seed=self._seed)
        return self._chain

    def __call__(self, item: Any, *args: Any, **kwargs: Any) -> Any:
        return self._built()(item, *args, **kwargs)

    def set_random_state(self, seed: int | None = None, state: Any = None) -> DeferredTransforms:
        if self._chain is not None:
            self._chain.set_random_state(seed=seed, state=state)
        else:
            self._seed = seed
        return self


def _checksum(arrays: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for arr in arrays:
        digest.update(str((arr.dtype.str, arr.shape)).encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def save_institution(inst: InstitutionData, path: str | Path, key: str, *,
                     train_transforms: dict[str, Any]) -> Path:
    """Write ``inst`` (both splits must be :class:`ImageTensorDataset`) to ``path`` atomically.

    ``train_transforms``: the ``build_transforms`` kwargs of the training chain, so a reader
    can rebuild its random tail.
    """
    tr, va = inst.train, inst.val
    if not (isinstance(tr, ImageTensorDataset) and isinstance(va, ImageTensorDataset)):
        raise TypeError("only ImageTensorDataset splits can be stored")
    arrays = [tr.images.numpy(), tr.labels.numpy(), va.images.numpy(), va.labels.numpy()]
    meta = {
        "key": key, "partition_id": inst.partition_id, "num_classes": inst.num_classes,
        "in_channels": inst.in_channels, "n_train": inst.n_train, "n_val": inst.n_val,
        "train_histogram": inst.train_histogram, "val_histogram": inst.val_histogram,
        "class_names": list(inst.class_names), "augment_from": tr.augment_from,
        "batch_augment": asdict(tr.batch_augment) if tr.batch_augment is not None else None,
        "train_transforms": train_transforms, "checksum": _checksum(arrays),
    }
    path = Path(path)
    if not private_dir(path.parent):
        raise OSError(f"{path.parent} is not a private directory of this user; not storing there")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, train_images=arrays[0], train_labels=arrays[1], val_images=arrays[2],
                     val_labels=arrays[3], meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_institution_file(path: str | Path, key: str) -> InstitutionData:
    """Read a file written by :func:`save_institution`; ``ValueError`` if it is not that file
    for ``key`` intact (unreadable, another key, checksum mismatch)."""
    if not private_dir(Path(path).parent):
        raise ValueError(f"{path}: its directory is not a private directory of this user")
    try:
        with open(path, "rb") as fh:  # checked and read through one descriptor
            if hasattr(os, "getuid") and os.fstat(fh.fileno()).st_uid != _uid():
                raise ValueError("not written by this user")
            with np.load(fh, allow_pickle=False) as data:
                arrays = [data["train_images"], data["train_labels"], data["val_images"],
                          data["val_labels"]]
                meta = json.loads(str(data["meta"]))
    except Exception as err:  # I/O, zip/CRC, missing member, JSON: not usable
        raise ValueError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    if meta.get("key") != key:
        raise ValueError(f"{path}: written for another run configuration or partition")
    if meta.get("checksum") != _checksum(arrays):
        raise ValueError(f"{path}: checksum mismatch")
    try:
        return _institution_from(arrays, meta)
    except Exception as err:  # a well-formed file of another shape: rebuild, never crash
        raise ValueError(f"{path}: inconsistent contents ({type(err).__name__}: {err})") from err


def _institution_from(arrays: list[np.ndarray], meta: dict[str, Any]) -> InstitutionData:
    augment = meta["batch_augment"]
    first = meta["augment_from"]
    train = ImageTensorDataset(
        torch.from_numpy(arrays[0]), torch.from_numpy(arrays[1]),
        transform=DeferredTransforms(**meta["train_transforms"]) if first is not None else None,
        augment_from=first, batch_augment=BatchAugment(**augment) if augment else None)
    val = ImageTensorDataset(torch.from_numpy(arrays[2]), torch.from_numpy(arrays[3]))
    return InstitutionData(
        partition_id=int(meta["partition_id"]), train=train, val=val,
        num_classes=int(meta["num_classes"]), in_channels=int(meta["in_channels"]),
        n_train=int(meta["n_train"]), n_val=int(meta["n_val"]),
        train_histogram=list(meta["train_histogram"]), val_histogram=list(meta["val_histogram"]),
        class_names=tuple(meta["class_names"]))


__all__ = ["FILE_SOURCES", "STORE_ENV", "STORE_FORMAT", "DeferredTransforms", "InstitutionData",
           "data_identity", "load_institution_file", "private_dir", "save_institution", "store_dir",
           "store_key", "store_path"]
