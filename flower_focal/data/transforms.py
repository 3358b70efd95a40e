"""MONAI dictionary transforms: datalist item -> ``{"image": float32 (C,H,W), "label": long}``.

This module owns image decoding (MONAI ``LoadImaged`` with ``PILReader`` for
png/jpg/jpeg/tif/tiff), synthetic rendering (:class:`GenerateSyntheticd`), intensity
scaling, resizing and augmentation. :func:`build_transforms` puts every deterministic
transform first so a ``CacheDataset`` caches that prefix, and random augmentation last
(train only). Images are assumed to be 8-bit (0..255).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import PILReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImage,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    RandFlipd,
    RandRotate90d,
    Resized,
    ScaleIntensityRanged,
    SelectItemsd,
)

from flower_focal.data import synthetic
from flower_focal.data.fields import IMAGE, LABEL
from flower_focal.data.loader import BatchAugment

# PIL modes normalised before MONAI sees the pixels: alpha and palettes are dropped so every
# image is 1 (grayscale) or 3 (RGB) channels.
_PIL_MODE_MAP = {"RGBA": "RGB", "P": "RGB", "PA": "RGB", "CMYK": "RGB", "YCbCr": "RGB",
                 "LA": "L", "1": "L", "La": "L", "RGBa": "RGB"}


class ImageDataError(ValueError):
    """Raised by the data transforms; carries the file or item it is about in its message."""


def _normalise_mode(img: Any) -> Any:
    """PILReader converter: drop alpha / palette so images are ``L`` or ``RGB``."""
    mode = _PIL_MODE_MAP.get(img.mode)
    return img.convert(mode) if mode else img


def make_reader() -> PILReader:
    """The reader for every image file: PIL, rows first (``H x W``, like numpy)."""
    return PILReader(reverse_indexing=False, converter=_normalise_mode)


def load_image(path: str) -> torch.Tensor:
    """Decode one image file with MONAI into a channel-first tensor; errors name the file."""
    try:
        return LoadImage(reader=make_reader(), image_only=True, ensure_channel_first=True)(path)
    except Exception as err:  # noqa: BLE001 (MONAI raises RuntimeError/OSError/PIL errors)
        raise ImageDataError(f"Cannot read image file {path}: {_root_message(err)}") from err


def _root_message(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def find_data_error(err: BaseException) -> ImageDataError | None:
    """Return the :class:`ImageDataError` in ``err``'s cause chain (MONAI wraps errors)."""
    cur: BaseException | None = err
    while cur is not None:
        if isinstance(cur, ImageDataError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


class GenerateSyntheticd(MapTransform):
    """Render a synthetic recipe item (see :func:`synthetic.synthetic_datalist`) into
    ``IMAGE`` (``HxWx3`` uint8) and drop the recipe keys."""

    def __init__(self, keys: KeysCollection = IMAGE) -> None:
        super().__init__(keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = synthetic.generate_image(
            d.pop(synthetic.GENERATOR), d[LABEL], d.pop(synthetic.INDEX),
            d.pop(synthetic.SPLIT), d.pop(synthetic.SEED), d.pop(synthetic.SIZE),
        )
        for key in self.keys:
            d[key] = img
        return d


class CheckChannelsd(MapTransform):
    """Raise :class:`ImageDataError` naming the file if a channel-first image does not have
    ``channels`` channels (a dataset must not mix grayscale and RGB)."""

    def __init__(self, keys: KeysCollection, channels: int) -> None:
        super().__init__(keys)
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            got = int(d[key].shape[0])
            if got != self.channels:
                meta = getattr(d[key], "meta", {}) or {}
                name = meta.get("filename_or_obj") or "an in-memory image"
                raise ImageDataError(
                    f"Inconsistent channel counts: {name} has {got} channel(s), expected "
                    f"{self.channels} like the first training image."
                )
        return d


def _to_long(label: Any) -> torch.Tensor:
    return torch.as_tensor(label, dtype=torch.long)


BATCH_AUGMENT = BatchAugment(flip_prob=0.5, rotate_prob=0.5, max_k=3)
"""The training augmentation: per item in :func:`build_transforms`' chain, per batch in
:func:`flower_focal.training.train_local` (same distribution)."""


def _pixel_transforms(image_size: int) -> list[Any]:
    """Decoded ``(C, H, W)`` pixels 0..255 -> float32 ``(C, S, S)`` in about [-1, 1]. Every
    step acts on each channel alone, so :func:`pixel_chain` may run it on many images at once."""
    return [
        EnsureTyped(IMAGE, dtype=torch.float32, track_meta=False),
        Resized(IMAGE, (image_size, image_size), mode="bilinear", anti_aliasing=True),
        ScaleIntensityRanged(IMAGE, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
        NormalizeIntensityd(IMAGE, subtrahend=0.5, divisor=0.5),
        EnsureTyped(IMAGE, dtype=torch.float32, track_meta=False),
    ]


def pixel_chain(image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The pixel steps of :func:`build_transforms` for a ``(K, H, W)`` stack of channels
    (e.g. ``N`` images of ``C`` channels as ``K = N * C``): same arithmetic, one call."""
    compose = Compose(_pixel_transforms(image_size))
    return lambda channels: compose({IMAGE: channels})[IMAGE]


def first_random(compose: Compose) -> int | None:
    """Index of the first random (or non-``Transform``) step of a chain, where MONAI's
    ``CacheDataset`` stops caching; ``None`` when every step is deterministic. Run the parts
    with ``compose(item, end=i)`` and ``compose(item, start=i)``."""
    from monai.transforms import RandomizableTrait, Transform

    return compose.get_index_of_first(
        lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))


def build_transforms(
    image_size: int,
    train: bool,
    from_files: bool,
    *,
    synthetic_items: bool = False,
    in_channels: int | None = None,
    seed: int | None = None,
) -> Compose:
    """Return the transform chain for one split.

    Args:
        image_size: side of the square output image.
        train: append random flips / 90-degree rotations after the cached prefix.
        from_files: ``IMAGE`` holds file paths (decoded by ``LoadImaged``/``PILReader``);
            otherwise an ``HxWxC`` uint8 array.
        synthetic_items: items are synthetic recipes, rendered by :class:`GenerateSyntheticd`.
        in_channels: when given, images with another channel count raise ``ValueError``.
        seed: seeds the random augmentation (``Compose.set_random_state``).

    Output items are ``{"image": float32 tensor (C, image_size, image_size) normalised to
    about [-1, 1], "label": torch.long scalar}``.
    """
    if image_size < 1:
        raise ValueError(f"image-size must be >= 1, got {image_size}.")
    first: list[Any]
    if from_files:
        first = [LoadImaged(IMAGE, reader=make_reader(), image_only=True),
                 EnsureChannelFirstd(IMAGE)]
    else:
        first = [GenerateSyntheticd(IMAGE)] if synthetic_items else []
        first.append(EnsureChannelFirstd(IMAGE, channel_dim=-1))
    if in_channels is not None:
        first.append(CheckChannelsd(IMAGE, in_channels))
    chain: list[Any] = [
        *first,
        SelectItemsd((IMAGE, LABEL)),
        *_pixel_transforms(image_size),
        Lambdad(LABEL, _to_long),
    ]
    if train:
        aug = BATCH_AUGMENT
        chain += [
            RandFlipd(IMAGE, prob=aug.flip_prob, spatial_axis=0),
            RandFlipd(IMAGE, prob=aug.flip_prob, spatial_axis=1),
            RandRotate90d(IMAGE, prob=aug.rotate_prob, max_k=aug.max_k),
        ]
    chain.append(EnsureTyped((IMAGE, LABEL), track_meta=False))  # plain tensors out
    compose = Compose(chain)
    if seed is not None:
        compose.set_random_state(seed=int(seed) % 2**32)
    return compose


__all__ = [
    "BATCH_AUGMENT",
    "CheckChannelsd",
    "GenerateSyntheticd",
    "ImageDataError",
    "build_transforms",
    "find_data_error",
    "load_image",
    "make_reader",
    "pixel_chain",
    "first_random",
]
