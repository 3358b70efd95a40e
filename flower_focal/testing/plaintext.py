"""The plaintext twin of FOCAL: the same protocol, slot layout and loop order, on numpy.

This module owns :class:`PlainEvaluator` and :class:`PlainKeyHolder`, drop-in replacements
for :class:`~flower_focal.crypto.ckks.CkksEvaluator` / :class:`~flower_focal.crypto.ckks.CkksKeyHolder`
in which a "ciphertext" is a complex numpy slot vector, encryption is a copy, rotation is
``np.roll``, and relinearisation, rescaling and mod-switching do nothing. Running
:mod:`flower_focal.focal.protocol` with them gives plaintext split training with exactly the
packing, sums and rotations of the encrypted run, so parity tests compare step by step and
see only CKKS noise. It is also the "plaintext split training" baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flower_focal.crypto.errors import CiphertextError


@dataclass(frozen=True)
class PlainPlan:
    """The twin's level plan: one level, unit scales, and the encrypted plan's safe range of the
    forward partial sums (``2**crypto.ckks.LOGIT_BITS``), so both refuse the same heads."""

    x_level: int = 0
    x_scale: float = 1.0
    w_level: int = 0
    w_scale: float = 1.0
    e_level: int = 0
    e_scale: float = 1.0
    logit_level: int = 0
    logit_scale: float = 1.0
    logit_bound: float = 64.0


class _PlainBase:
    def __init__(self, slots: int = 4096) -> None:
        if slots < 2 or slots & (slots - 1):
            raise ValueError(f"slots must be a power of two >= 2, got {slots}")
        self.slots = slots
        self.plan = PlainPlan()
        self.rotation_steps: tuple[int, ...] = tuple(2**i for i in range(slots.bit_length() - 1))

    def seal_envelope(self, raw: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        return tuple(np.array(r, dtype=np.complex128) for r in raw)

    def open_envelope(
        self, message: tuple[np.ndarray, ...], count: int | None = None
    ) -> list[np.ndarray]:
        if not isinstance(message, tuple):
            raise CiphertextError("a plaintext-twin message is a tuple of slot vectors")
        if count is not None and len(message) != count:
            raise CiphertextError(f"message holds {len(message)} vectors, expected {count}")
        return list(message)

    def load_many(self, raw: Sequence[np.ndarray], level: int, scale: float) -> list[np.ndarray]:
        out = []
        for r in raw:
            arr = np.array(r, dtype=np.complex128)
            if arr.shape != (self.slots,):
                raise CiphertextError(f"slot vector must have {self.slots} entries")
            out.append(arr)
        return out

    def dump_raw(self, cts: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [np.array(c) for c in cts]


class PlainEvaluator(_PlainBase):
    """Numpy stand-in for :class:`~flower_focal.crypto.ckks.CkksEvaluator`."""

    holds_secret_key = False

    def multiply(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a * b

    def add_inplace(self, acc: np.ndarray, b: np.ndarray) -> np.ndarray:
        acc += b
        return acc

    def relinearize_inplace(self, ct: np.ndarray) -> np.ndarray:
        return ct

    def rescale_inplace(self, ct: np.ndarray, scale: float) -> np.ndarray:
        return ct

    def mod_switch(self, ct: np.ndarray) -> np.ndarray:
        return ct.copy()

    def rotate(self, ct: np.ndarray, step: int) -> np.ndarray:
        return np.roll(ct, -step)


class PlainKeyHolder(_PlainBase):
    """Numpy stand-in for :class:`~flower_focal.crypto.ckks.CkksKeyHolder`."""

    def encrypt(
        self, slots: Sequence[np.ndarray], level: int, scale: float
    ) -> tuple[np.ndarray, ...]:
        for v in slots:
            if np.shape(v) != (self.slots,) or not np.all(np.isfinite(v)):
                raise ValueError(f"each slot vector must be {self.slots} finite values")
        return self.seal_envelope(slots)

    def decrypt(
        self, message: tuple[np.ndarray, ...], level: int, scale: float, count: int | None = None
    ) -> list[np.ndarray]:
        return self.load_many(self.open_envelope(message, count), level, scale)
