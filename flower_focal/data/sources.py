"""Data sources: turn ``cfg.dataset`` + ``cfg.data_path`` into train/val datalists.

This module owns *where images come from* and nothing else: it reads MedMNIST ``.npz``
files, scans image folders, parses CSV manifests and lists synthetic images, and returns
MONAI datalists (lists of dicts keyed by :mod:`flower_focal.data.fields`). It never decodes an
image file (MONAI's ``LoadImaged`` does that in :mod:`flower_focal.data.transforms`); the
only image it opens is the first one of a file source, through MONAI, to learn the number of
channels.

Callers use :func:`load_source`; the per-format loaders are public for tests and notebooks.
Every malformed input raises ``ValueError`` / ``FileNotFoundError`` naming the file or value.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flower_focal.cache import CACHE
from flower_focal.config import RunConfig
from flower_focal.data import synthetic
from flower_focal.data.fields import IMAGE, LABEL, SITE

logger = logging.getLogger("flower_focal.data")

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
"""File extensions the folder and CSV loaders accept (decoded by MONAI's ``PILReader``)."""

VAL_FRACTION = 0.2
"""Fraction of each class carved off as validation when a source has no val split."""

SPLIT_COLUMN = "split"
"""Optional CSV column holding the split of each row (``cfg.train_split`` / ``cfg.val_split``)."""

CSV_IMAGE_DIRS: tuple[str, ...] = (".", "images", "train_images")
"""Folders next to a CSV searched for an image id given without extension (APTOS style)."""

# Number of classes and class names of the 2D single-label MedMNIST sets, by file-name prefix.
MEDMNIST_CLASSES: dict[str, tuple[str, ...]] = {
    "pathmnist": (
        "adipose", "background", "debris", "lymphocytes", "mucus",
        "smooth muscle", "normal colon mucosa", "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ),
    "dermamnist": (
        "actinic keratoses", "basal cell carcinoma", "benign keratosis", "dermatofibroma",
        "melanoma", "melanocytic nevi", "vascular lesions",
    ),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("0", "1", "2", "3", "4"),
    "breastmnist": ("malignant", "normal, benign"),
    "bloodmnist": (
        "basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
        "monocyte", "neutrophil", "platelet",
    ),
    "tissuemnist": tuple(str(i) for i in range(8)),
    "organamnist": tuple(str(i) for i in range(11)),
    "organcmnist": tuple(str(i) for i in range(11)),
    "organsmnist": tuple(str(i) for i in range(11)),
}


@dataclass(frozen=True)
class SourceData:
    """The whole dataset of a run, before partitioning.

    Attributes
    ----------
    train, val
        Datalists (tuples of dicts, shared by the per-process cache: do not mutate items).
        Items hold ``IMAGE`` (a path if ``from_files``, an ``HxWxC`` uint8 array otherwise,
        absent for synthetic items that carry a generation recipe), ``LABEL`` (``int``) and
        optionally ``SITE`` (``str``).
    num_classes, class_names
        Label space; ``len(class_names) == num_classes``.
    in_channels
        Channels of every image (1 for grayscale, 3 for RGB).
    from_files
        True when ``IMAGE`` holds file paths to be decoded by ``LoadImaged``.
    synthetic
        True when items are recipes for :class:`~flower_focal.data.transforms.GenerateSyntheticd`.
    """

    train: tuple[dict[str, Any], ...]
    val: tuple[dict[str, Any], ...]
    num_classes: int
    class_names: tuple[str, ...]
    in_channels: int
    from_files: bool
    synthetic: bool = False

    def labels(self, split: str) -> np.ndarray:
        """Return the labels of ``split`` (``"train"`` or ``"val"``) as an int64 array."""
        items = self.train if split == "train" else self.val
        return np.fromiter((int(d[LABEL]) for d in items), dtype=np.int64, count=len(items))

    def sites(self, split: str) -> np.ndarray | None:
        """Return the site of each item of ``split``, or ``None`` if the source has no sites."""
        items = self.train if split == "train" else self.val
        if not items or SITE not in items[0]:
            return None
        return np.array([str(d[SITE]) for d in items], dtype=object)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _require_file(path: str | os.PathLike[str], what: str) -> Path:
    """Return ``path`` as an absolute Path or raise ``FileNotFoundError`` naming it."""
    if not str(path):
        raise ValueError(f"{what}: data-path is empty; set data-path to the file to load.")
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise FileNotFoundError(f"{what}: file not found: {p}")
    return p


def validate_labels(
    labels: np.ndarray, where: str, num_classes: int | None = None
) -> np.ndarray:
    """Check single-label class indices and return them as a 1-D int64 array.

    Raises ``ValueError`` naming ``where`` and the offending value for non-integer,
    negative or out-of-range (``>= num_classes``) labels.
    """
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(
            f"{where}: labels must have shape (N,) or (N, 1), got {arr.shape} "
            "(multi-label sets are not supported)."
        )
    if arr.size and arr.dtype.kind not in "iub":
        if arr.dtype.kind != "f":
            raise ValueError(f"{where}: labels must be integers, got dtype {arr.dtype}.")
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            raise ValueError(
                f"{where}: labels must be integers, got {arr[bad][0]!r} "
                f"at index {int(np.flatnonzero(bad)[0])}."
            )
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        i = int(np.argmin(arr))
        raise ValueError(f"{where}: negative label {arr[i]} at index {i}.")
    if num_classes is not None and arr.size and arr.max() >= num_classes:
        i = int(np.argmax(arr))
        raise ValueError(
            f"{where}: label {arr[i]} at index {i} is out of range for {num_classes} classes "
            f"(valid: 0..{num_classes - 1})."
        )
    return arr


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Return a boolean mask selecting ``fraction`` of each class (at least one if the class
    has two or more items), deterministically for ``seed``."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**32, 0x5EED]))
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = int(np.floor(len(idx) * fraction + 0.5))
        if n_val == 0 and len(idx) >= 2:
            n_val = 1
        mask[rng.permutation(idx)[:n_val]] = True
    return mask


def _probe_channels(paths: Sequence[str]) -> int:
    """Channel count of the first image, decoded by MONAI (see ``transforms.load_image``)."""
    from flower_focal.data.transforms import load_image  # noqa: PLC0415 (avoid import cycle)

    return int(load_image(paths[0]).shape[0])


def _split_and_carve(
    items: list[dict[str, Any]], seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split one list of items into train/val with a stratified deterministic holdout."""
    labels = np.array([d[LABEL] for d in items], dtype=np.int64)
    mask = stratified_holdout(labels, VAL_FRACTION, seed)
    return [d for d, m in zip(items, mask) if not m], [d for d, m in zip(items, mask) if m]


# ------------------------------------------------------------------------------------------
# MedMNIST .npz
# ------------------------------------------------------------------------------------------


def _read_npz(path: str, mtime_ns: int) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` into memory; cached per (absolute path, mtime) in the
    ``npz`` region of :data:`flower_focal.cache.CACHE` (a rewritten file is read again)."""
    return CACHE.get_or_build("npz", (path, mtime_ns), lambda: _load_npz(path),
                              nbytes=lambda arrays: sum(a.nbytes for a in arrays.values()))


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"Could not read {path} as a .npz archive: {err}") from err


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Return the arrays of ``path`` from the per-process cache (keyed by path and mtime)."""
    p = _require_file(path, "medmnist")
    return _read_npz(str(p), p.stat().st_mtime_ns)


def medmnist_name(path: str | os.PathLike[str]) -> str | None:
    """Return the MedMNIST set named by a file name (``retinamnist_64.npz`` -> retinamnist)."""
    stem = Path(path).name.lower()
    for name in sorted(MEDMNIST_CLASSES, key=len, reverse=True):
        if re.match(rf"{name}(?![a-z])", stem):
            return name
    return None


def _npz_split(
    arrays: dict[str, np.ndarray], path: Path, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images NxHxWxC uint8, raw labels)`` of one split, validating the keys."""
    ik, lk = f"{split}_images", f"{split}_labels"
    missing = [k for k in (ik, lk) if k not in arrays]
    if missing:
        raise ValueError(
            f"{path}: missing key(s) {missing}; keys found: {sorted(arrays)}. "
            "A MedMNIST .npz needs '<split>_images' and '<split>_labels' "
            "(set train-split / val-split to the split names in the file)."
        )
    images, labels = arrays[ik], arrays[lk]
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{path}: '{ik}' must have shape (N, H, W) or (N, H, W, 3), got {arrays[ik].shape}."
        )
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: '{ik}' must be uint8, got {images.dtype}.")
    if len(images) != len(labels):
        raise ValueError(
            f"{path}: {len(images)} images in '{ik}' but {len(labels)} labels in '{lk}'."
        )
    return images, labels


def load_medmnist(
    path: str | os.PathLike[str], train_split: str = "train", val_split: str = "val"
) -> SourceData:
    """Load a 2D MedMNIST-format ``.npz`` (``{split}_images``, ``{split}_labels``).

    Items are ``{"image": HxWxC uint8 view into the cached array, "label": int}``.
    ``num_classes`` comes from the MedMNIST name in the file name when known, else from the
    largest label + 1.
    """
    p = _require_file(path, "medmnist")
    arrays = read_npz(p)
    tr_img, tr_lab = _npz_split(arrays, p, train_split)
    va_img, va_lab = _npz_split(arrays, p, val_split)
    if tr_img.shape[-1] != va_img.shape[-1]:
        raise ValueError(
            f"{p}: inconsistent channel counts: '{train_split}_images' has "
            f"{tr_img.shape[-1]}, '{val_split}_images' has {va_img.shape[-1]}."
        )
    known = medmnist_name(p)
    n_known = len(MEDMNIST_CLASSES[known]) if known else None
    tr = validate_labels(tr_lab, f"{p} '{train_split}_labels'", n_known)
    va = validate_labels(va_lab, f"{p} '{val_split}_labels'", n_known)
    if len(tr) == 0:
        raise ValueError(f"{p}: '{train_split}_images' is empty.")
    num_classes = n_known or int(max(tr.max(), va.max() if len(va) else 0)) + 1
    names = MEDMNIST_CLASSES[known] if known else tuple(str(i) for i in range(num_classes))
    return SourceData(
        train=tuple({IMAGE: tr_img[i], LABEL: int(tr[i])} for i in range(len(tr))),
        val=tuple({IMAGE: va_img[i], LABEL: int(va[i])} for i in range(len(va))),
        num_classes=num_classes,
        class_names=tuple(names),
        in_channels=int(tr_img.shape[-1]),
        from_files=False,
    )


# ------------------------------------------------------------------------------------------
# image folder
# ------------------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    """All image files under ``folder`` (recursive, sorted, hidden files skipped)."""
    return sorted(
        f
        for f in folder.rglob("*")
        if f.is_file()
        and f.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in f.relative_to(folder).parts)
    )


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _scan_classes(
    folder: Path, class_names: Sequence[str], require_all: bool
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for label, name in enumerate(class_names):
        files = _image_files(folder / name) if (folder / name).is_dir() else []
        if not files and require_all:
            raise ValueError(
                f"Class folder {folder / name} contains no images "
                f"(accepted extensions: {', '.join(IMAGE_EXTENSIONS)})."
            )
        items.extend({IMAGE: str(f), LABEL: label} for f in files)
    return items


def load_folder(
    path: str | os.PathLike[str],
    train_split: str = "train",
    val_split: str = "val",
    seed: int = 0,
) -> SourceData:
    """Load an image folder with one sub-folder per class (sorted names = class names).

    If ``path`` holds ``{train_split}/`` and ``{val_split}/`` they are the splits (val may
    lack some classes); otherwise the whole folder is train and a stratified 20 % val is
    carved off deterministically for ``seed``.
    """
    if not str(path):
        raise ValueError("folder: data-path is empty; set data-path to the image folder.")
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"folder: directory not found: {root}")
    has_splits = (root / train_split).is_dir() and (root / val_split).is_dir()
    train_root = root / train_split if has_splits else root
    classes = [d.name for d in _class_dirs(train_root)]
    if not classes:
        raise ValueError(
            f"folder: no class sub-folders in {train_root}; expected one folder per class "
            "(e.g. 0/, 1/ or normal/, disease/) holding image files."
        )
    train = _scan_classes(train_root, classes, require_all=True)
    if has_splits:
        extra = sorted({d.name for d in _class_dirs(root / val_split)} - set(classes))
        if extra:
            raise ValueError(
                f"folder: {root / val_split} has class folder(s) {extra} that are not in "
                f"{train_root} (classes: {classes})."
            )
        val = _scan_classes(root / val_split, classes, require_all=False)
    else:
        train, val = _split_and_carve(train, seed)
    return SourceData(
        train=tuple(train),
        val=tuple(val),
        num_classes=len(classes),
        class_names=tuple(classes),
        in_channels=_probe_channels([d[IMAGE] for d in train]),
        from_files=True,
    )


# ------------------------------------------------------------------------------------------
# CSV manifest
# ------------------------------------------------------------------------------------------


def _resolve_image(value: str, base: Path, csv_path: Path, row: int) -> str:
    """Resolve a CSV image value: a path (relative to the CSV) or an id without extension."""
    if not value:
        raise ValueError(f"{csv_path}: empty image value in row {row}.")
    if Path(value).suffix.lower() in IMAGE_EXTENSIONS:
        p = Path(value) if Path(value).is_absolute() else base / value
        if not p.is_file():
            raise FileNotFoundError(f"{csv_path}: image {value!r} of row {row} not found: {p}")
        return str(p.resolve())
    for sub in CSV_IMAGE_DIRS:
        for ext in IMAGE_EXTENSIONS:
            p = base / sub / f"{value}{ext}"
            if p.is_file():
                return str(p.resolve())
    raise FileNotFoundError(
        f"{csv_path}: no image file for id {value!r} (row {row}); looked for "
        f"{value}{{{','.join(IMAGE_EXTENSIONS)}}} in "
        + ", ".join(str((base / s).resolve()) for s in CSV_IMAGE_DIRS)
    )


def _parse_label(value: str, csv_path: Path, column: str, row: int) -> int:
    try:
        f = float(value)
    except ValueError:
        raise ValueError(
            f"{csv_path}: label {value!r} in column {column!r}, row {row} is not an integer."
        ) from None
    if not np.isfinite(f) or f != int(f):
        raise ValueError(
            f"{csv_path}: label {value!r} in column {column!r}, row {row} is not an integer."
        )
    if f < 0:
        raise ValueError(f"{csv_path}: negative label {value!r} in column {column!r}, row {row}.")
    return int(f)


def load_csv(
    path: str | os.PathLike[str],
    image_column: str = "image",
    label_column: str = "label",
    site_column: str = "site",
    train_split: str = "train",
    val_split: str = "val",
    seed: int = 0,
) -> SourceData:
    """Load a CSV manifest (one row per image).

    ``image_column`` holds a path (absolute or relative to the CSV) or, APTOS style, an id
    without extension looked up as ``<id>.png|.jpg|.jpeg|.tif|.tiff`` next to the CSV or in
    ``images/`` / ``train_images/`` beside it. ``label_column`` holds integer class indices.
    A ``site_column`` is optional and copied into items as ``"site"``. An optional ``split``
    column assigns rows to ``train_split`` / ``val_split`` (other values, e.g. ``test``, are
    skipped); without it a stratified 20 % val is carved off deterministically for ``seed``.
    """
    p = _require_file(path, "csv")
    base = p.parent
    with p.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        missing = [c for c in (image_column, label_column) if c not in header]
        if missing:
            raise ValueError(
                f"{p}: missing column(s) {missing}; columns found: {header}. "
                "Set image-column / label-column to the manifest's column names."
            )
        has_site, has_split = site_column in header, SPLIT_COLUMN in header
        rows: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "all": []}
        for row_no, row in enumerate(reader, start=2):  # row 1 is the header
            split = "all"
            if has_split:
                value = (row[SPLIT_COLUMN] or "").strip()
                if value == train_split:
                    split = "train"
                elif value == val_split:
                    split = "val"
                else:
                    continue
            item: dict[str, Any] = {
                IMAGE: _resolve_image((row[image_column] or "").strip(), base, p, row_no),
                LABEL: _parse_label((row[label_column] or "").strip(), p, label_column, row_no),
            }
            if has_site:
                item[SITE] = (row[site_column] or "").strip()
            rows[split].append(item)
    if has_split:
        train, val = rows["train"], rows["val"]
    else:
        train, val = _split_and_carve(rows["all"], seed)
    if not train:
        raise ValueError(
            f"{p}: no training rows"
            + (f" (no row has {SPLIT_COLUMN}={train_split!r})." if has_split else ".")
        )
    num_classes = max(d[LABEL] for d in train + val) + 1
    return SourceData(
        train=tuple(train),
        val=tuple(val),
        num_classes=num_classes,
        class_names=tuple(str(i) for i in range(num_classes)),
        in_channels=_probe_channels([d[IMAGE] for d in train]),
        from_files=True,
    )


# ------------------------------------------------------------------------------------------
# synthetic
# ------------------------------------------------------------------------------------------


def load_synthetic(name: str, num_samples: int, image_size: int, seed: int,
                   train_split: str = "train", val_split: str = "val") -> SourceData:
    """List the synthetic images of generator ``name`` (images are generated lazily)."""
    spec = synthetic.spec(name)
    n_train, n_val = synthetic.split_sizes(name, num_samples)
    return SourceData(
        train=tuple(synthetic.synthetic_datalist(name, train_split, n_train, seed, image_size)),
        val=tuple(synthetic.synthetic_datalist(name, val_split, n_val, seed, image_size)),
        num_classes=spec.num_classes,
        class_names=spec.class_names,
        in_channels=3,
        from_files=False,
        synthetic=True,
    )


# ------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------

SOURCES: dict[str, Callable[[RunConfig], SourceData]] = {
    "synthetic-retina": lambda c: load_synthetic(
        "synthetic-retina", c.num_samples, c.image_size, c.seed, c.train_split, c.val_split
    ),
    "synthetic-pathology": lambda c: load_synthetic(
        "synthetic-pathology", c.num_samples, c.image_size, c.seed, c.train_split, c.val_split
    ),
    "medmnist": lambda c: load_medmnist(c.data_path, c.train_split, c.val_split),
    "folder": lambda c: load_folder(c.data_path, c.train_split, c.val_split, c.seed),
    "csv": lambda c: load_csv(
        c.data_path, c.image_column, c.label_column, c.site_column,
        c.train_split, c.val_split, c.seed,
    ),
}
"""``cfg.dataset`` -> loader. Add a source by adding an entry."""


def load_source(cfg: RunConfig) -> SourceData:
    """Return the whole dataset described by ``cfg`` (``dataset``, ``data_path``, ...)."""
    try:
        loader = SOURCES[cfg.dataset]
    except KeyError:
        raise ValueError(
            f"Unknown dataset {cfg.dataset!r}; valid: {', '.join(sorted(SOURCES))}."
        ) from None
    source = loader(cfg)
    logger.debug(
        "source %s: %d train / %d val, %d classes, %d channels",
        cfg.dataset, len(source.train), len(source.val), source.num_classes, source.in_channels,
    )
    return source


# ------------------------------------------------------------------------------------------
# one split for evaluation (an external test set)
# ------------------------------------------------------------------------------------------


def _eval_items(items: list[dict[str, Any]], num_classes: int,
                class_names: Sequence[str], in_channels: int, from_files: bool,
                synthetic_items: bool = False) -> SourceData:
    return SourceData(train=(), val=tuple(items), num_classes=num_classes,
                      class_names=tuple(class_names), in_channels=in_channels,
                      from_files=from_files, synthetic=synthetic_items)


def load_eval_split(cfg: RunConfig, split: str) -> SourceData:
    """The whole of one split, for evaluating a trained model, in ``.val`` (``.train`` is empty).

    A source holding only that split works: an ``.npz`` with just ``{split}_images`` /
    ``{split}_labels``; a folder with a ``{split}/`` sub-folder, or (for a split other than
    the run's train / val) a folder of class sub-folders that *is* the split; a CSV whose
    ``split`` column names it, or (other splits) a CSV without a ``split`` column, every row.
    The run's own ``train`` / ``val`` of a folder or CSV without explicit splits is the same
    deterministic carve as in training. Class folders map to labels in sorted order, as in
    training: keep a folder (empty is fine) for every training class.
    """
    run_split = split in ("train", "val", cfg.train_split, cfg.val_split)
    if cfg.dataset == "medmnist":
        p = _require_file(cfg.data_path, "medmnist")
        images, raw = _npz_split(read_npz(p), p, split)
        known = medmnist_name(p)
        labels = validate_labels(raw, f"{p} '{split}_labels'",
                                 len(MEDMNIST_CLASSES[known]) if known else None)
        n = len(MEDMNIST_CLASSES[known]) if known else int(labels.max(initial=-1)) + 1
        names = MEDMNIST_CLASSES[known] if known else tuple(str(i) for i in range(n))
        return _eval_items([{IMAGE: images[i], LABEL: int(labels[i])} for i in range(len(labels))],
                           n, names, int(images.shape[-1]), from_files=False)
    if cfg.dataset == "folder":
        root = Path(cfg.data_path).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"folder: directory not found: {root}")
        folder = root / split if (root / split).is_dir() else root
        if folder == root and run_split:
            src = load_source(cfg)
            return _eval_items(list(src.train if split in ("train", cfg.train_split) else src.val),
                               src.num_classes, src.class_names, src.in_channels, True)
        classes = [d.name for d in _class_dirs(folder)]
        items = _scan_classes(folder, classes, require_all=False)
        if not items:
            raise ValueError(f"folder: no images in class sub-folders of {folder} "
                             f"(accepted extensions: {', '.join(IMAGE_EXTENSIONS)}).")
        return _eval_items(items, len(classes), classes,
                           _probe_channels([d[IMAGE] for d in items]), True)
    if cfg.dataset == "csv":
        p = _require_file(cfg.data_path, "csv")
        with p.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            if SPLIT_COLUMN not in header and run_split:
                src = load_source(cfg)
                return _eval_items(list(src.train if split in ("train", cfg.train_split) else src.val),
                                   src.num_classes, src.class_names, src.in_channels, True)
            missing = [c for c in (cfg.image_column, cfg.label_column) if c not in header]
            if missing:
                raise ValueError(f"{p}: missing column(s) {missing}; columns found: {header}. "
                                 "Set image-column / label-column to the manifest's column names.")
            items = [
                {IMAGE: _resolve_image((row[cfg.image_column] or "").strip(), p.parent, p, row_no),
                 LABEL: _parse_label((row[cfg.label_column] or "").strip(), p, cfg.label_column, row_no)}
                for row_no, row in enumerate(reader, start=2)
                if SPLIT_COLUMN not in header or (row[SPLIT_COLUMN] or "").strip() == split
            ]
        if not items:
            raise ValueError(f"{p}: no row has {SPLIT_COLUMN}={split!r}.")
        n = max(d[LABEL] for d in items) + 1
        return _eval_items(items, n, [str(i) for i in range(n)],
                           _probe_channels([d[IMAGE] for d in items]), True)
    src = load_source(cfg if run_split else cfg.replace(val_split=split))  # synthetic
    items = list(src.train if split in ("train", cfg.train_split) else src.val)
    return _eval_items(items, src.num_classes, src.class_names, src.in_channels,
                       src.from_files, src.synthetic)


__all__ = [
    "CSV_IMAGE_DIRS",
    "IMAGE_EXTENSIONS",
    "MEDMNIST_CLASSES",
    "SOURCES",
    "SourceData",
    "load_csv",
    "load_eval_split",
    "load_folder",
    "load_medmnist",
    "load_source",
    "load_synthetic",
    "medmnist_name",
    "read_npz",
    "stratified_holdout",
    "validate_labels",
]
