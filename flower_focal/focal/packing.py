"""Slot layout of FOCAL: which slot of which ciphertext holds which (sample, feature, class).

This module owns the layout maths and nothing else (numpy only; no HE library). Both the
encrypted protocol and its plaintext twin pack and unpack through these functions, so they
compute on identical slot vectors.

Layout (``S`` slots per ciphertext, block ``b`` a power of two, ``m = S // b`` lanes)
---------------------------------------------------------------------------------------
Samples are cut into *chunks* of ``b`` and features (``d`` embedding features plus a bias
feature of ones, ``d1 = d + 1``) into *groups* of ``m``. Slot ``t * m + j`` of

* embedding ciphertext ``(chunk c, group g)`` holds ``X[c*b + t, g*m + j]`` (real);
* head ciphertext ``(group g, pair p)`` holds ``W[g*m + j, 2p] + 1j * W[g*m + j, 2p + 1]``
  for every ``t`` (each weight replicated over the ``b`` sample positions);
* error ciphertext ``(chunk c, pair p)`` holds ``E[c*b + t, 2p] + 1j * E[c*b + t, 2p + 1]``
  for every ``j`` (each error replicated over the ``m`` feature lanes).

Two classes share a ciphertext as the real and imaginary part: X is real, so
``X * (Wa + i Wb) = X Wa + i X Wb`` and one product serves two classes (halves all server
work). Padding (samples beyond ``n``, features beyond ``d1``, the missing class of an odd
``K``) is zero.

Reductions. Forward: ``sum_g X[c,g] * W[g,p]`` leaves, in slot ``t*m + j``, the part of the
logits of sample ``t`` from features ``= j (mod m)``; the *institution* adds the ``m`` lanes
after decrypting (free for it, zero rotations on the server). Backward: the product
``X[c,g] * E[c,p]``, summed over institutions and chunks, must be summed over the ``b``
sample positions of each lane. Because ``b * m = S``, rotating left by multiples of ``m``
cycles each lane onto itself, so ``log2(b)`` rotate-and-adds by ``m, 2m, ..., S/2`` leave the
full lane sum in every slot of the lane -- exactly W's replicated layout, with no mask and no
extra level (:func:`lane_sum_steps`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_BLOCK = 64


@dataclass(frozen=True)
class FocalLayout:
    """Public layout parameters both sides must agree on before any upload.

    Parameters
    ----------
    n_features
        Embedding dimension ``d`` (without the bias feature).
    n_classes
        Number of classes ``K >= 2``.
    slots
        Slots per ciphertext (``N / 2``; 4096 for the ``focal`` preset).
    block
        Sample positions per ciphertext, a power of two dividing ``slots``. Larger blocks mean
        fewer ciphertexts per sample to send each step but more server rotations
        (``log2(block)`` per head ciphertext) and more padding for small institutions.
    """

    n_features: int
    n_classes: int
    slots: int = 4096
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        for name in ("n_features", "n_classes", "slots", "block"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        if self.slots & (self.slots - 1):
            raise ValueError(f"slots must be a power of two, got {self.slots}")
        if self.block & (self.block - 1) or self.block > self.slots:
            raise ValueError(f"block must be a power of two <= slots, got {self.block}")

    @property
    def d1(self) -> int:
        """Features including the bias."""
        return self.n_features + 1

    @property
    def lanes(self) -> int:
        """``m = slots / block`` feature lanes per ciphertext."""
        return self.slots // self.block

    @property
    def n_groups(self) -> int:
        """Feature groups (ciphertexts per sample chunk / per class pair of the head)."""
        return math.ceil(self.d1 / self.lanes)

    @property
    def n_pairs(self) -> int:
        """Class pairs (``ceil(K / 2)``)."""
        return math.ceil(self.n_classes / 2)

    def n_chunks(self, n_samples: int) -> int:
        """Sample chunks of an institution with ``n_samples`` samples."""
        if n_samples < 1:
            raise ValueError(f"an institution needs at least one sample, got {n_samples}")
        return math.ceil(n_samples / self.block)

    def lane_sum_steps(self) -> tuple[int, ...]:
        """Left-rotation steps of the backward lane sum: ``m, 2m, ..., slots/2``."""
        return tuple(self.lanes * 2**i for i in range(int(math.log2(self.block))))

    def params(self) -> dict[str, int]:
        """JSON-friendly description (what a strategy would send in its config)."""
        return {
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "slots": self.slots,
            "block": self.block,
        }


def with_bias(x: np.ndarray) -> np.ndarray:
    """``[x, 1]``: append the bias feature."""
    return np.hstack([x, np.ones((x.shape[0], 1), dtype=x.dtype)])


def pack_features(layout: FocalLayout, x1: np.ndarray) -> np.ndarray:
    """``(chunks, groups, slots)`` real array from ``x1`` (n x d1, bias included)."""
    n, d1 = x1.shape
    if d1 != layout.d1:
        raise ValueError(f"x1 has {d1} columns, layout expects {layout.d1} (d + bias)")
    b, m, g = layout.block, layout.lanes, layout.n_groups
    c = layout.n_chunks(n)
    buf = np.zeros((c * b, g * m), dtype=np.float64)
    buf[:n, :d1] = x1
    # [c, t, g, j] -> [c, g, t, j] -> slot t*m + j
    return buf.reshape(c, b, g, m).transpose(0, 2, 1, 3).reshape(c, g, b * m)


def pack_errors(layout: FocalLayout, e: np.ndarray) -> np.ndarray:
    """``(chunks, pairs, slots)`` complex array from ``e`` (n x K), replicated over lanes."""
    n, k = e.shape
    if k != layout.n_classes:
        raise ValueError(f"errors have {k} columns, layout expects {layout.n_classes}")
    b, m, p = layout.block, layout.lanes, layout.n_pairs
    c = layout.n_chunks(n)
    buf = np.zeros((c * b, 2 * p), dtype=np.float64)
    buf[:n, :k] = e
    z = (buf[:, 0::2] + 1j * buf[:, 1::2]).reshape(c, b, p).transpose(0, 2, 1)  # [c, p, t]
    return np.repeat(z[..., None], m, axis=-1).reshape(c, p, b * m)


def pack_head(layout: FocalLayout, w: np.ndarray) -> np.ndarray:
    """``(groups, pairs, slots)`` complex array from ``w`` (d1 x K), replicated over samples."""
    if w.shape != (layout.d1, layout.n_classes):
        raise ValueError(f"head must be {(layout.d1, layout.n_classes)}, got {w.shape}")
    b, m, g, p = layout.block, layout.lanes, layout.n_groups, layout.n_pairs
    buf = np.zeros((g * m, 2 * p), dtype=np.float64)
    buf[: layout.d1, : layout.n_classes] = w
    z = (buf[:, 0::2] + 1j * buf[:, 1::2]).reshape(g, m, p).transpose(0, 2, 1)  # [g, p, j]
    return np.tile(z, (1, 1, b))


def unpack_head(layout: FocalLayout, z: np.ndarray) -> np.ndarray:
    """``W`` (d1 x K) from ``(groups, pairs, slots)``; reads sample position ``t = 0``."""
    g, p, m = layout.n_groups, layout.n_pairs, layout.lanes
    if z.shape != (g, p, layout.slots):
        raise ValueError(f"head slots must be {(g, p, layout.slots)}, got {z.shape}")
    lane = z[:, :, :m].transpose(0, 2, 1).reshape(g * m, p)  # [g*m, p]
    w = np.empty((g * m, 2 * p), dtype=np.float64)
    w[:, 0::2], w[:, 1::2] = lane.real, lane.imag
    return w[: layout.d1, : layout.n_classes]


def unpack_logits(layout: FocalLayout, z: np.ndarray, n_samples: int) -> np.ndarray:
    """Logits (n x K) from forward results ``(chunks, pairs, slots)``: adds the m lanes."""
    c, p, b, m = layout.n_chunks(n_samples), layout.n_pairs, layout.block, layout.lanes
    if z.shape != (c, p, layout.slots):
        raise ValueError(f"forward result must be {(c, p, layout.slots)}, got {z.shape}")
    s = z.reshape(c, p, b, m).sum(axis=-1).transpose(0, 2, 1).reshape(c * b, p)  # [n_pad, p]
    out = np.empty((c * b, 2 * p), dtype=np.float64)
    out[:, 0::2], out[:, 1::2] = s.real, s.imag
    return out[:n_samples, : layout.n_classes]
