"""Synthetic medical-looking images: ``synthetic-retina`` and ``synthetic-pathology``.

This module owns the two procedural generators (numpy only) and their label sampling.
Everything is deterministic in ``(seed, generator, split, index)``:

* the labels of a whole split are drawn first (:func:`synthetic_labels`, class frequencies
  mildly imbalanced like RetinaMNIST / PathMNIST);
* image ``i`` of a split is rendered alone from its own seeded RNG
  (:func:`generate_image`), so an institution renders only its own images and image ``i``
  does not depend on how many others were generated.

``synthetic-retina`` draws fundus-like RGB images whose diabetic-retinopathy grade (0-4)
sets the number and extent of microaneurysms, haemorrhages, hard exudates, cotton-wool spots
and (grade 4) neovascular squiggles and pre-retinal haemorrhages. ``synthetic-pathology``
draws H&E-like tiles (Beer-Lambert mix of haematoxylin and eosin densities) whose texture
follows the 9 PathMNIST tissue classes; 60 % of the tiles blend in a patch of another class.
Both add random positions, stain/brightness jitter and pixel noise so that a small CNN learns
them well but not perfectly (measured at 32 px, 1200 training images, 3-layer CNN, 20
epochs, central: retina ~0.75 accuracy / 0.94 macro AUROC, pathology ~0.86 / 0.99).

Datalists hold *recipes* (:func:`synthetic_datalist`); the MONAI transform
:class:`~flower_focal.data.transforms.GenerateSyntheticd` renders them.
:func:`write_synthetic` writes a split to PNG files plus a CSV manifest readable by the
``csv`` source.
"""

from __future__ import annotations

import csv
import functools
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flower_focal.data.fields import LABEL

if TYPE_CHECKING:
    from flower_focal.config import RunConfig

# Keys of a synthetic recipe item (besides LABEL); consumed by GenerateSyntheticd.
INDEX = "index"
SPLIT = "split"
GENERATOR = "generator"
SEED = "seed"
SIZE = "size"

MAX_RENDER_SIZE = 64
"""Images larger than this are rendered at this size and upsampled (bilinear): drawing cost
grows with the pixel count and the textures carry no finer detail."""

Renderer = Callable[[np.random.Generator, int, int], np.ndarray]


@dataclass(frozen=True)
class SyntheticSpec:
    """A generator: class names, class frequencies and the renderer ``(rng, label, size)``."""

    class_names: tuple[str, ...]
    class_probs: tuple[float, ...]
    render: Renderer

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ------------------------------------------------------------------------------------------
# drawing primitives
# ------------------------------------------------------------------------------------------


def _stamp(
    canvas: np.ndarray,
    cy: float,
    cx: float,
    s_perp: float,
    s_along: float | None = None,
    theta: float = 0.0,
    amp: float = 1.0,
    use_max: bool = False,
) -> None:
    """Add (or max) an anisotropic gaussian to ``canvas`` in place, in a local window.

    ``s_along`` is the sigma along direction ``theta`` (radians), ``s_perp`` across it.
    """
    s_along = s_perp if s_along is None else s_along
    h, w = canvas.shape
    rad = 3.0 * max(s_perp, s_along)
    y0, y1 = max(int(cy - rad), 0), min(int(cy + rad) + 2, h)
    x0, x1 = max(int(cx - rad), 0), min(int(cx + rad) + 2, w)
    if y0 >= y1 or x0 >= x1:
        return
    yy = np.arange(y0, y1, dtype=np.float64)[:, None] - cy
    xx = np.arange(x0, x1, dtype=np.float64)[None, :] - cx
    c, s = np.cos(theta), np.sin(theta)
    u, v = xx * c + yy * s, -xx * s + yy * c
    g = amp * np.exp(-0.5 * ((u / s_along) ** 2 + (v / s_perp) ** 2))
    region = canvas[y0:y1, x0:x1]
    if use_max:
        np.maximum(region, g, out=region)
    else:
        region += g


@functools.lru_cache(maxsize=32)
def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """Row-normalised 1-D gaussian blur as a matrix (reflect-free, renormalised at edges)."""
    x = np.arange(size, dtype=np.float64)
    m = np.exp(-0.5 * ((x[:, None] - x[None, :]) / max(sigma, 1e-3)) ** 2)
    return m / m.sum(axis=1, keepdims=True)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur of a 2-D array (``G @ img @ G.T``), cheap for tiles <= 256."""
    g = _blur_matrix(img.shape[0], float(sigma))
    return g @ img @ g.T


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std low-frequency noise."""
    n = _blur(rng.standard_normal((size, size)), sigma)
    return (n - n.mean()) / (n.std() + 1e-8)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return yy, xx


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _walk(
    rng: np.random.Generator,
    y: float,
    x: float,
    angle: float,
    n: int,
    step: float,
    turn: float,
) -> list[tuple[float, float]]:
    """Random-walk polyline: ``n`` points, heading changes with std ``turn`` per step."""
    pts = []
    for _ in range(n):
        pts.append((y, x))
        angle += rng.normal(0.0, turn)
        y, x = y + step * np.sin(angle), x + step * np.cos(angle)
    return pts


# ------------------------------------------------------------------------------------------
# synthetic-retina
# ------------------------------------------------------------------------------------------

# Expected lesion counts per DR grade 0..4 (Poisson means).
_MA = (0.3, 4.0, 6.0, 8.0, 8.0)  # microaneurysms: dark red dots
_HAEM = (0.0, 0.4, 2.5, 5.0, 5.0)  # haemorrhages: dark red blobs
_EXUD = (0.0, 0.3, 2.0, 4.0, 4.0)  # hard exudates: clusters of yellow spots
_CWS = (0.0, 0.0, 0.3, 1.5, 1.5)  # cotton-wool spots: pale fluffy patches
_NEO = (0.0, 0.0, 0.0, 0.1, 2.5)  # neovascular squiggles (mostly grade 4)
_PRERETINAL = (0.0, 0.0, 0.0, 0.0, 0.7)  # large boat-shaped pre-retinal haemorrhage


def _render_retina(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Fundus-like RGB image (float, 0..1) for DR grade ``label``."""
    s = float(size)
    yy, xx = _grid(size)
    cy, cx = s / 2 + rng.normal(0, 0.03 * s, 2)
    radius = s * rng.uniform(0.42, 0.49)
    r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / radius
    inside = np.clip((1.0 - r) * radius, 0.0, 1.0)  # ~1 px soft edge

    bright = rng.uniform(0.65, 1.15)
    base = np.array([0.80, 0.36, 0.13]) * rng.uniform(0.88, 1.12, 3) * bright
    texture = 1.0 + 0.05 * _smooth_noise(rng, size, s / 12)
    img = base * ((1.0 - 0.55 * r**2) * texture)[..., None]

    # optic disc: bright yellowish spot on a random side
    side = rng.choice((-1.0, 1.0))
    oy = cy + rng.normal(0, 0.05 * s)
    ox = cx + side * radius * rng.uniform(0.45, 0.62)
    disc = np.zeros((size, size))
    _stamp(disc, oy, ox, radius * rng.uniform(0.09, 0.12))
    img += disc[..., None] * np.array([0.45, 0.40, 0.22]) * bright

    # vessels (arcades leaving the disc) and, for high grades, neovascular squiggles
    vessels = np.zeros((size, size))
    width = max(0.45, 0.011 * s)
    toward = 0.0 if side < 0 else np.pi  # vessels head across the retina
    for k in range(4):
        ang = toward + (0.55 if k % 2 else -0.55) * (1.0 if k < 2 else 2.2)
        ang += rng.normal(0, 0.15)
        pts = _walk(rng, oy, ox, ang, n=int(1.6 * radius / max(0.5, 0.02 * s)),
                    step=max(0.5, 0.02 * s), turn=0.08)
        for j, (py, px) in enumerate(pts):
            _stamp(vessels, py, px, width * (1.3 - 0.6 * j / len(pts)), use_max=True)
    for _ in range(rng.poisson(_NEO[label])):
        py, px = oy + rng.normal(0, 0.12 * s), ox - side * rng.uniform(0.0, 0.35) * s
        for qy, qx in _walk(rng, py, px, rng.uniform(0, 2 * np.pi), n=int(0.5 * s),
                            step=max(0.4, 0.012 * s), turn=0.9):
            _stamp(vessels, qy, qx, max(0.5, 0.008 * s), amp=0.95, use_max=True)
    img *= 1.0 - vessels[..., None] * np.array([0.35, 0.75, 0.75])

    def lesion_site() -> tuple[float, float]:
        rr, aa = 0.82 * radius * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        return cy + rr * np.sin(aa), cx + rr * np.cos(aa)

    red = np.zeros((size, size))
    for _ in range(rng.poisson(_MA[label])):
        _stamp(red, *lesion_site(), max(0.7, 0.013 * s * rng.uniform(0.8, 1.3)),
               amp=rng.uniform(0.8, 1.0), use_max=True)
    for _ in range(rng.poisson(_HAEM[label])):
        sig = s * rng.uniform(0.022, 0.045)
        _stamp(red, *lesion_site(), sig, sig * rng.uniform(1.0, 1.8),
               theta=rng.uniform(0, np.pi), amp=rng.uniform(0.6, 0.9), use_max=True)
    for _ in range(rng.poisson(_PRERETINAL[label])):
        sig = s * rng.uniform(0.05, 0.08)
        _stamp(red, oy + rng.normal(0, 0.1 * s), ox - side * rng.uniform(0.05, 0.25) * s,
               sig, sig * 1.8, theta=rng.uniform(0, np.pi), amp=0.9, use_max=True)
    img *= 1.0 - np.clip(red, 0, 1)[..., None] * np.array([0.45, 0.85, 0.85])

    yellow = np.zeros((size, size))
    for _ in range(rng.poisson(_EXUD[label])):
        ey, ex = lesion_site()
        for _ in range(rng.integers(1, 5)):
            _stamp(yellow, ey + rng.normal(0, 0.03 * s), ex + rng.normal(0, 0.03 * s),
                   max(0.5, 0.013 * s * rng.uniform(0.8, 1.4)), amp=rng.uniform(0.6, 0.9),
                   use_max=True)
    white = np.zeros((size, size))
    for _ in range(rng.poisson(_CWS[label])):
        sig = s * rng.uniform(0.03, 0.05)
        _stamp(white, *lesion_site(), sig, sig * 1.4, theta=rng.uniform(0, np.pi),
               amp=rng.uniform(0.35, 0.6), use_max=True)
    for mask, colour in ((yellow, (1.0, 0.88, 0.35)), (white, (0.95, 0.9, 0.8))):
        m = np.clip(mask, 0, 1)[..., None]
        img = img * (1.0 - m) + m * np.array(colour) * bright

    img = img * inside[..., None] + rng.normal(0, rng.uniform(0.015, 0.035), img.shape)
    return img


# ------------------------------------------------------------------------------------------
# synthetic-pathology
# ------------------------------------------------------------------------------------------

_HEM_OD = np.array([0.65, 0.70, 0.29]) * 1.6  # haematoxylin optical density per unit
_EOS_OD = np.array([0.10, 0.80, 0.25])  # eosin optical density per unit


def _nuclei(
    rng: np.random.Generator,
    canvas: np.ndarray,
    n: int,
    radius: tuple[float, float],
    elong: tuple[float, float] = (1.0, 1.0),
    theta: float | None = None,
    amp: tuple[float, float] = (1.0, 1.6),
    centres: np.ndarray | None = None,
) -> None:
    """Stamp ``n`` nuclei (gaussians) on the haematoxylin map ``canvas``."""
    size = canvas.shape[0]
    pts = centres if centres is not None else rng.uniform(-2, size + 2, (n, 2))
    for cy, cx in pts:
        r = rng.uniform(*radius)
        ang = rng.uniform(0, np.pi) if theta is None else theta + rng.normal(0, 0.15)
        _stamp(canvas, cy, cx, r, r * rng.uniform(*elong), ang, rng.uniform(*amp), use_max=True)


def _stripes(rng: np.random.Generator, size: int, theta: float, period: float,
             wobble: float) -> np.ndarray:
    """Oriented 0..1 stripes with a smoothly wobbling phase (fibres)."""
    yy, xx = _grid(size)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    phase = wobble * _smooth_noise(rng, size, size / 6)
    return 0.5 + 0.5 * np.sin(2 * np.pi * u / period + phase)


_CONFOUND_PROB = 0.6  # share of tiles that contain a patch of another tissue class


def _render_pathology(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """H&E-like RGB tile (float, 0..1) for PathMNIST-style tissue class ``label``.

    Some tiles (``_CONFOUND_PROB``) blend in a smooth patch of another class (about 40 %
    of the tile on average), and all get zoom, stain, focus and noise jitter: like real tiles,
    the class is the dominant tissue, not the only one.
    """
    img = _render_tissue(rng, label, size)
    if rng.uniform() < _CONFOUND_PROB:
        other = int(rng.integers(0, 8))
        other += other >= label
        mask = np.clip(_smooth_noise(rng, size, size / 5) + 0.2, 0, 1)[..., None]
        img = img * (1.0 - mask) + _render_tissue(rng, other, size) * mask
    sigma = rng.uniform(0.0, 0.9) * size / 32.0
    if sigma > 0.3:  # defocus
        img = np.stack([_blur(img[..., c], sigma) for c in range(3)], axis=-1)
    return img + rng.normal(0, rng.uniform(0.02, 0.05), img.shape)


def _render_tissue(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Noise-free H&E tile of one tissue class."""
    s = float(size)
    zoom = rng.uniform(0.75, 1.3)
    u = s / 32.0 * zoom  # feature scale; sizes are tuned at 32 px
    area = (s / 32.0 / zoom) ** 2  # feature counts scale with the visible area
    hem = np.zeros((size, size))
    eos = np.full((size, size), 0.45) + 0.08 * _smooth_noise(rng, size, 3 * u)
    clear = np.zeros((size, size))  # 1 = empty (white) space
    yy, xx = _grid(size)

    def count(mean: float) -> int:
        return int(rng.poisson(mean * area))

    if label == 0:  # adipose: large white vacuoles separated by thin membranes (Voronoi)
        k = max(3, count(7))
        pts = rng.uniform(-0.1 * s, 1.1 * s, (k, 2))
        d = np.sort(np.sqrt((yy[None] - pts[:, 0, None, None]) ** 2
                            + (xx[None] - pts[:, 1, None, None]) ** 2), axis=0)
        membrane = np.exp(-0.5 * ((d[1] - d[0]) / (0.6 * u)) ** 2)
        clear = 1.0 - membrane
        eos = 0.5 * membrane
        _nuclei(rng, hem, count(2), (0.5 * u, 0.7 * u), (1.5, 2.5), amp=(0.6, 1.0))
    elif label == 1:  # background: nearly empty glass, faint smudges
        clear = np.clip(0.85 + 0.1 * _smooth_noise(rng, size, 6 * u), 0, 1)
        eos = 0.15 + 0.1 * rng.uniform()
        hem += 0.05 * np.clip(_smooth_noise(rng, size, 4 * u), 0, None)
    elif label == 2:  # debris / necrosis: patchy eosin, scattered nuclear fragments
        eos = np.clip(0.35 + 0.3 * _smooth_noise(rng, size, 2 * u), 0.05, None)
        clear = np.clip(0.3 * _smooth_noise(rng, size, 3 * u), 0, 0.7)
        _nuclei(rng, hem, count(45), (0.35 * u, 0.6 * u), (1.0, 1.6), amp=(0.4, 1.3))
        hem += 0.2 * np.clip(_smooth_noise(rng, size, 1.5 * u), 0, None)
    elif label == 3:  # lymphocytes: dense small round dark nuclei, little cytoplasm
        eos *= 0.4
        _nuclei(rng, hem, count(95), (0.75 * u, 0.95 * u), amp=(1.3, 1.9))
    elif label == 4:  # mucus: pale bluish wisps, almost no nuclei
        eos = 0.12 + 0.08 * np.clip(_smooth_noise(rng, size, 3 * u), -1, None)
        hem += 0.22 + 0.15 * _stripes(rng, size, rng.uniform(0, np.pi), 9 * u, 3.0)
        clear = np.clip(0.25 * _smooth_noise(rng, size, 4 * u), 0, 0.6)
        _nuclei(rng, hem, count(1), (0.6 * u, 0.9 * u), amp=(0.6, 1.0))
    elif label == 5:  # smooth muscle: strong eosin streaks, aligned cigar-shaped nuclei
        th = rng.uniform(0, np.pi)
        eos = 0.55 + 0.3 * _stripes(rng, size, th + np.pi / 2, 3.5 * u, 1.0)
        _nuclei(rng, hem, count(14), (0.45 * u, 0.6 * u), (3.0, 4.5), theta=th, amp=(1.0, 1.5))
    elif label == 6:  # normal mucosa: glands = rings of nuclei around a white lumen
        eos = eos * 0.9
        for _ in range(max(1, count(2.2))):
            gy, gx = rng.uniform(0.1 * s, 0.9 * s, 2)
            rad = rng.uniform(4.0, 6.5) * u
            lumen = np.zeros((size, size))
            _stamp(lumen, gy, gx, 0.55 * rad, amp=1.0)
            clear = np.maximum(clear, np.clip(lumen * 1.2, 0, 1))
            n_ring = int(2 * np.pi * rad / (1.6 * u))
            ang = np.linspace(0, 2 * np.pi, n_ring, endpoint=False) + rng.uniform(0, 1)
            rr = rad * rng.uniform(0.9, 1.1, n_ring)
            ring = np.stack([gy + rr * np.sin(ang), gx + rr * np.cos(ang)], axis=1)
            for (py, px), a in zip(ring, ang):
                _stamp(hem, py, px, 0.5 * u, 1.0 * u, a, rng.uniform(1.0, 1.5), use_max=True)
        _nuclei(rng, hem, count(4), (0.5 * u, 0.8 * u), amp=(0.8, 1.2))
    elif label == 7:  # stroma: looser wavy pink fibres, sparse spindle nuclei
        eos = 0.32 + 0.22 * _stripes(rng, size, rng.uniform(0, np.pi), 6 * u, 4.0)
        clear = np.clip(0.2 * _smooth_noise(rng, size, 2 * u), 0, 0.4)
        _nuclei(rng, hem, count(6), (0.4 * u, 0.55 * u), (2.5, 4.0), amp=(0.8, 1.3))
    else:  # tumour epithelium: crowded large irregular hyperchromatic nuclei
        n = count(26)
        pts = rng.uniform(-2, s + 2, (n, 2))
        _nuclei(rng, hem, n, (1.2 * u, 1.9 * u), (1.0, 1.8), amp=(0.9, 1.7), centres=pts)
        _nuclei(rng, hem, n, (0.7 * u, 1.2 * u), (1.0, 1.5), amp=(0.7, 1.3),
                centres=pts + rng.normal(0, 1.0 * u, pts.shape))

    # stain and brightness jitter, Beer-Lambert mixing, noise
    h_od = _HEM_OD * rng.uniform(0.7, 1.3) * rng.uniform(0.88, 1.12, 3)
    e_od = _EOS_OD * rng.uniform(0.7, 1.3) * rng.uniform(0.88, 1.12, 3)
    tissue = 1.0 - np.clip(clear, 0, 1)
    od = (np.clip(hem, 0, None)[..., None] * h_od + np.clip(eos, 0, None)[..., None] * e_od)
    return np.exp(-od * tissue[..., None]) * rng.uniform(0.85, 1.0)


# ------------------------------------------------------------------------------------------
# registry and public API
# ------------------------------------------------------------------------------------------

GENERATORS: dict[str, SyntheticSpec] = {
    "synthetic-retina": SyntheticSpec(
        class_names=("no DR", "mild", "moderate", "severe", "proliferative"),
        class_probs=(0.36, 0.14, 0.22, 0.18, 0.10),
        render=_render_retina,
    ),
    "synthetic-pathology": SyntheticSpec(
        class_names=(
            "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
            "normal mucosa", "stroma", "tumour epithelium",
        ),
        class_probs=(0.10, 0.10, 0.11, 0.12, 0.09, 0.14, 0.09, 0.10, 0.15),
        render=_render_pathology,
    ),
}
"""Generator name (``cfg.dataset``) -> spec."""


def spec(name: str) -> SyntheticSpec:
    """Return the spec of generator ``name`` or raise ``ValueError`` listing valid names."""
    try:
        return GENERATORS[name]
    except KeyError:
        raise ValueError(
            f"Unknown synthetic generator {name!r}; valid: {', '.join(sorted(GENERATORS))}."
        ) from None


def split_sizes(name: str, num_samples: int) -> tuple[int, int]:
    """``(n_train, n_val)``: ``num_samples`` and ``max(num_samples // 5, 4 * num_classes)``."""
    if num_samples < 1:
        raise ValueError(f"num-samples must be >= 1 for synthetic data, got {num_samples}.")
    return num_samples, max(num_samples // 5, 4 * spec(name).num_classes)


def _seed_words(seed: int, name: str, split: str) -> list[int]:
    return [seed % 2**32, zlib.crc32(name.encode()), zlib.crc32(split.encode())]


def synthetic_labels(name: str, split: str, n: int, seed: int) -> np.ndarray:
    """Labels of a whole split: class counts proportional to the spec's frequencies (every
    class at least once when ``n >= num_classes``), shuffled by a seeded RNG."""
    sp = spec(name)
    probs = np.asarray(sp.class_probs) / np.sum(sp.class_probs)
    counts = np.floor(probs * n).astype(int)
    if n >= sp.num_classes:
        counts = np.maximum(counts, 1)
    while counts.sum() > n:
        counts[np.argmax(counts)] -= 1
    remainder = probs * n - np.floor(probs * n)
    for c in np.argsort(-remainder, kind="stable")[: n - counts.sum()]:
        counts[c] += 1
    rng = np.random.default_rng(np.random.SeedSequence([*_seed_words(seed, name, split), 0]))
    return rng.permutation(np.repeat(np.arange(sp.num_classes), counts))


def generate_image(name: str, label: int, index: int, split: str, seed: int,
                   size: int) -> np.ndarray:
    """Render image ``index`` of ``split`` as an ``size x size x 3`` uint8 array.

    Depends only on its arguments, never on other images of the split.
    """
    sp = spec(name)
    if not 0 <= label < sp.num_classes:
        raise ValueError(f"{name}: label {label} out of range 0..{sp.num_classes - 1}.")
    if size < 8:
        raise ValueError(f"{name}: image-size must be >= 8, got {size}.")
    words = [*_seed_words(seed, name, split), 1, int(index)]
    rng = np.random.default_rng(np.random.SeedSequence(words))
    img = _to_uint8(sp.render(rng, int(label), min(int(size), MAX_RENDER_SIZE)))
    if size > MAX_RENDER_SIZE:
        from PIL import Image  # noqa: PLC0415 (resampling only)

        img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
    return img


def synthetic_datalist(name: str, split: str, n: int, seed: int,
                       size: int) -> list[dict[str, Any]]:
    """Recipe items ``{"index", "split", "label", "generator", "seed", "size"}`` of a split."""
    labels = synthetic_labels(name, split, n, seed)
    return [
        {INDEX: i, SPLIT: split, LABEL: int(y), GENERATOR: name, SEED: seed, SIZE: size}
        for i, y in enumerate(labels)
    ]


def write_synthetic(cfg: RunConfig, out_dir: str | os.PathLike[str]) -> Path:
    """Write the train and val splits of ``cfg.dataset`` as PNGs plus ``manifest.csv``.

    The manifest has columns ``image`` (path relative to the CSV), ``label`` and ``split``
    (``cfg.train_split`` / ``cfg.val_split``); load it with ``dataset="csv"``,
    ``data_path=<returned path>``, ``image_column="image"``, ``label_column="label"``.
    Returns the manifest path.
    """
    from PIL import Image  # noqa: PLC0415 (encoding only; decoding is MONAI's job)

    n_train, n_val = split_sizes(cfg.dataset, cfg.num_samples)
    out = Path(out_dir).expanduser().resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "split"])
        for split, n in ((cfg.train_split, n_train), (cfg.val_split, n_val)):
            for item in synthetic_datalist(cfg.dataset, split, n, cfg.seed, cfg.image_size):
                rel = f"images/{split}_{item[INDEX]:06d}.png"
                arr = generate_image(cfg.dataset, item[LABEL], item[INDEX], split, cfg.seed,
                                     cfg.image_size)
                Image.fromarray(arr).save(out / rel)
                writer.writerow([rel, item[LABEL], split])
    return manifest


__all__ = [
    "GENERATORS",
    "SyntheticSpec",
    "generate_image",
    "spec",
    "split_sizes",
    "synthetic_datalist",
    "synthetic_labels",
    "write_synthetic",
]
