"""Raw CKKS operations for FOCAL split training (server evaluator, institution key holder).

This module owns the few SEAL (``tenseal.sealapi``) calls FOCAL needs and the *level plan*
that keeps its depth constant. :mod:`flower_focal.focal` never imports TenSEAL; it calls the
two classes here and treats ciphertexts as opaque objects.

* :class:`CkksEvaluator` is the server side. It is built from a
  :class:`~flower_focal.crypto.keys.PublicContext` (parameters plus relinearisation and Galois
  keys), holds no secret key and has no ``encrypt`` or ``decrypt``.
* :class:`CkksKeyHolder` is the institution side (built from a
  :class:`~flower_focal.crypto.keys.SecretContext`): encode + symmetric (seeded) encryption at
  a chosen level and scale, decryption and decoding to complex slots.

Level plan (preset ``focal``: primes ``q0`` = 60 bits, ``q1`` = 40 bits, special prime)
-------------------------------------------------------------------------------------
Level 1 holds both data primes, level 0 only ``q0``. With ``w = scale_bits`` and
``x = q0_bits - 2 - LOGIT_BITS - w`` (23 for ``focal``):

========================  =======  =======================================================
operand                   level    scale
========================  =======  =======================================================
embeddings X (upload)     1        ``2**x``; the server keeps a mod-switched copy at level 0
head W                    0        ``2**w``, forever: it is only ever *added to*
error E (upload)          1        ``2**w * q1 / 2**x``, so ``rescale(X*E)`` has W's scale
forward logits X0*W       0        ``2**(x+w)``; every decrypted slot must stay below
                                   :attr:`LevelPlan.logit_bound` (``2**LOGIT_BITS``)
========================  =======  =======================================================

Forward: ``X0 * W`` at level 0, summed, relinearised once (no rescale). Backward:
``X * E`` at level 1, summed over institutions and sample chunks, relinearised once,
lane-summed by rotations *at level 1*, rescaled once to level 0 (exactly W's scale) and added
to W. Every step meets the same levels, so no refresh or bootstrapping is ever needed.

Two measured noise rules fix the order (N=8192, these scales, absolute error per step):

* relinearise *before* rescaling: rescaling a size-3 ciphertext multiplies its rounding
  error by ``s**2`` (5.5e-2 vs 2e-5);
* rotate *before* rescaling: at level 0 the key-switch noise (``q0`` is as large as the
  special prime, both 60 bits) is ~2**18 absolute, i.e. 7e-4 at W's scale; at level 1 the
  final rescale divides it by ``q1``. A level-1 rotation costs ~1.4x a level-0 one
  (1.45 vs 1.04 ms measured), the price of W errors of ~1e-5 per step instead of ~1e-3.

Wire format: a message is an :class:`~flower_focal.crypto.envelope.EncryptedVector` whose
chunks are SEAL ciphertexts (``length = count * slots``), so the envelope's size, checksum,
preset and key-fingerprint checks run before SEAL sees a byte; loading additionally checks
each ciphertext's size, level, NTT form and scale against what the caller expects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from flower_focal.crypto._scratch import ScratchIO, scratch
from flower_focal.crypto.backends import SealCkksBackend
from flower_focal.crypto.envelope import EncryptedVector, make_vector
from flower_focal.crypto.errors import CiphertextError
from flower_focal.crypto.keys import PublicContext, SecretContext
from flower_focal.crypto.params import HEPreset

#: ``log2`` of the largest |slot| a forward product may reach at level 0 (wrap-around limit).
LOGIT_BITS = 6
_SCALE_RTOL = 1e-9

Ciphertext = Any  # a seal.Ciphertext; opaque to callers


@dataclass(frozen=True)
class LevelPlan:
    """Levels and scales of FOCAL's operands (see the module docstring).

    Attributes
    ----------
    x_level, x_scale
        Embedding uploads.
    w_level, w_scale
        The encrypted head (and the rescaled gradient).
    e_level, e_scale
        Error uploads; ``e_scale = w_scale * q1 / x_scale`` exactly.
    logit_level, logit_scale, logit_bound
        Forward results; institutions must refuse decrypted slots with ``|z| >= bound/2``.
    """

    x_level: int
    x_scale: float
    w_level: int
    w_scale: float
    e_level: int
    e_scale: float
    logit_level: int
    logit_scale: float
    logit_bound: float

    @classmethod
    def for_preset(cls, preset: HEPreset, q1: int) -> LevelPlan:
        """The plan for a two-data-prime ``seal-ckks`` preset whose dropped prime is ``q1``."""
        if preset.backend != "seal-ckks" or preset.data_primes != 2 or preset.scale_bits is None:
            raise ValueError(
                f"FOCAL needs a 'seal-ckks' preset with exactly two data primes (e.g. 'focal'); "
                f"{preset.name!r} has backend {preset.backend!r} and primes "
                f"{list(preset.coeff_mod_bit_sizes)}"
            )
        if set(preset.eval_keys) != {"relin", "galois"}:
            raise ValueError(f"FOCAL needs relin and galois keys; {preset.name!r} lists "
                             f"{list(preset.eval_keys)}")
        w_bits = preset.scale_bits
        x_bits = preset.coeff_mod_bit_sizes[0] - 2 - LOGIT_BITS - w_bits
        if x_bits < 16:
            raise ValueError(
                f"preset {preset.name!r}: q0 leaves only {x_bits} bits for the embedding scale"
            )
        x_scale, w_scale = float(2**x_bits), float(2**w_bits)
        return cls(
            x_level=1,
            x_scale=x_scale,
            w_level=0,
            w_scale=w_scale,
            e_level=1,
            e_scale=w_scale * q1 / x_scale,
            logit_level=0,
            logit_scale=x_scale * w_scale,
            logit_bound=float(2**LOGIT_BITS),
        )


class _SealBase:
    """Shared SEAL plumbing: levels, envelope (de)serialization with checks."""

    def __init__(self, ctx: SecretContext | PublicContext) -> None:
        backend = ctx._backend  # same package: the loaded SEAL backend
        if not isinstance(backend, SealCkksBackend):
            raise ValueError(f"FOCAL needs a 'seal-ckks' preset, got {ctx.preset.backend!r}")
        self.preset = ctx.preset
        self.fingerprint = ctx.fingerprint
        objs = backend.seal_objects()
        self._context = objs["context"]
        self._encoder = objs["encoder"]
        self._evaluator = objs["evaluator"]
        self._objs = objs
        first = self._context.first_context_data()
        self._parms_ids = [self._context.last_parms_id(), first.parms_id()]
        self.q1 = int(first.parms().coeff_modulus()[-1].value())
        self.plan = LevelPlan.for_preset(self.preset, self.q1)
        self.slots = self.preset.poly_modulus_degree // 2

    def parms_id(self, level: int) -> Any:
        """SEAL parms id of ``level`` (0 = only q0, 1 = fresh)."""
        if level not in (0, 1):
            raise ValueError(f"level must be 0 or 1, got {level}")
        return self._parms_ids[level]

    # -- wire format ---------------------------------------------------------------------
    def seal_envelope(self, raw: Sequence[bytes]) -> bytes:
        """Wrap serialized ciphertexts (from :meth:`dump_raw`) in a checksummed envelope."""
        if not raw:
            raise ValueError("a message holds at least one ciphertext")
        vec = make_vector(self.fingerprint, self.preset, len(raw) * self.slots, list(raw))
        return vec.to_bytes()

    def open_envelope(self, blob: bytes, count: int | None = None) -> list[bytes]:
        """Check an envelope (size, CRCs, preset, key) and return its serialized ciphertexts.

        Raises
        ------
        CiphertextError
            Any envelope check fails, or it does not hold ``count`` ciphertexts.
        """
        vec = EncryptedVector.from_bytes(blob, self.fingerprint, self.preset)
        if count is not None and len(vec.chunks) != count:
            raise CiphertextError(f"message holds {len(vec.chunks)} ciphertexts, expected {count}")
        return [bytes(c) for c in vec.chunks]  # bytes: FOCAL ships them to shard processes

    def load_raw(self, data: bytes, level: int, scale: float, io: ScratchIO) -> Ciphertext:
        """Load one serialized ciphertext and check size, level, NTT form and scale."""
        try:
            ct = io.load(seal.Ciphertext(), data, self._context)
        except Exception as exc:  # SEAL: logic_error / runtime_error / invalid_argument
            raise CiphertextError(f"SEAL could not load the ciphertext: {exc}") from exc
        if (
            ct.size() != 2
            or ct.parms_id() != self.parms_id(level)
            or not ct.is_ntt_form()
            or not math.isclose(ct.scale, scale, rel_tol=_SCALE_RTOL)
        ):
            raise CiphertextError(
                f"ciphertext does not match its role (want size 2, level {level}, scale "
                f"{scale:.6g}; got size {ct.size()}, scale {ct.scale:.6g})"
            )
        ct.scale = scale
        return ct

    def load_many(self, raw: Sequence[bytes], level: int, scale: float) -> list[Ciphertext]:
        """:meth:`load_raw` for several serialized ciphertexts."""
        with scratch() as io:
            return [self.load_raw(r, level, scale, io) for r in raw]

    def load(
        self, blob: bytes, level: int, scale: float, count: int | None = None
    ) -> list[Ciphertext]:
        """:meth:`open_envelope` then :meth:`load_raw` every ciphertext."""
        return self.load_many(self.open_envelope(blob, count), level, scale)

    @staticmethod
    def dump_raw(cts: Sequence[Ciphertext]) -> list[bytes]:
        """Serialize ciphertexts (SEAL format, zstd) for :meth:`seal_envelope`."""
        with scratch() as io:
            return [io.dump(ct) for ct in cts]

    def dump(self, cts: Sequence[Ciphertext]) -> bytes:
        """Serialize ciphertexts into one envelope."""
        return self.seal_envelope(self.dump_raw(cts))

    @staticmethod
    def level_of(ct: Ciphertext) -> int:
        """Number of data primes minus one (1 = fresh, 0 = bottom)."""
        return int(ct.coeff_modulus_size()) - 1


class CkksEvaluator(_SealBase):
    """Server-side CKKS arithmetic; holds evaluation keys only.

    Parameters
    ----------
    public
        The server's context (``public.ctx`` of a FOCAL keygen).

    Notes
    -----
    Every method returns its result; ``*_inplace`` methods also return their first argument
    so the plaintext twin can implement the same interface with immutable numpy arrays.
    """

    def __init__(self, public: PublicContext) -> None:
        if not isinstance(public, PublicContext) or public.holds_secret_key:
            raise ValueError("CkksEvaluator needs a PublicContext (no secret key)")
        super().__init__(public)
        keys = public._backend.load_eval_keys()
        if set(keys) != {"relin", "galois"}:
            raise ValueError("the public context lacks the relin/galois keys FOCAL needs")
        self._relin = keys["relin"]
        self._galois = keys["galois"]
        self.rotation_steps: tuple[int, ...] = tuple(self.preset.galois_steps)

    @property
    def holds_secret_key(self) -> bool:
        """Always ``False``: there is no secret key here."""
        return False

    def multiply(self, a: Ciphertext, b: Ciphertext) -> Ciphertext:
        """``a * b`` (size-3 result; relinearise later)."""
        out = seal.Ciphertext()
        self._evaluator.multiply(a, b, out)
        return out

    def add_inplace(self, acc: Ciphertext, b: Ciphertext) -> Ciphertext:
        """``acc += b``."""
        self._evaluator.add_inplace(acc, b)
        return acc

    def relinearize_inplace(self, ct: Ciphertext) -> Ciphertext:
        """Size 3 -> 2."""
        self._evaluator.relinearize_inplace(ct, self._relin)
        return ct

    def rescale_inplace(self, ct: Ciphertext, scale: float) -> Ciphertext:
        """Drop one prime and pin the (float-rounded) result scale to ``scale``.

        Raises
        ------
        ValueError
            The exact scale after rescaling differs from ``scale`` (a level-plan bug).
        """
        self._evaluator.rescale_to_next_inplace(ct)
        if not math.isclose(ct.scale, scale, rel_tol=_SCALE_RTOL):
            raise ValueError(f"rescaled scale {ct.scale:.9g} != planned {scale:.9g}")
        ct.scale = scale
        return ct

    def mod_switch(self, ct: Ciphertext) -> Ciphertext:
        """A copy one level down (exact; the scale is unchanged)."""
        out = seal.Ciphertext()
        self._evaluator.mod_switch_to_next(ct, out)
        return out

    def rotate(self, ct: Ciphertext, step: int) -> Ciphertext:
        """Slots rotated left by ``step`` (must be one of :attr:`rotation_steps`)."""
        if step not in self.rotation_steps:
            raise ValueError(f"no Galois key for rotation step {step}; have {self.rotation_steps}")
        out = seal.Ciphertext()
        self._evaluator.rotate_vector(ct, step, self._galois, out)
        return out


class CkksKeyHolder(_SealBase):
    """Institution-side encode/encrypt/decrypt under the shared secret key.

    Parameters
    ----------
    secret
        The institution's :class:`~flower_focal.crypto.keys.SecretContext` (FOCAL preset).
    """

    def __init__(self, secret: SecretContext) -> None:
        if not isinstance(secret, SecretContext):
            raise ValueError("CkksKeyHolder needs a SecretContext")
        super().__init__(secret)
        self._encryptor = self._objs["encryptor"]
        self._decryptor = self._objs["decryptor"]

    def encrypt(self, slots: Sequence[np.ndarray], level: int, scale: float) -> bytes:
        """Encrypt one complex (or real) slot vector per ciphertext into one envelope.

        Parameters
        ----------
        slots
            Each of length :attr:`slots`, finite.
        level, scale
            Where the ciphertexts start (see :class:`LevelPlan`).
        """
        pid = self.parms_id(level)
        raw: list[bytes] = []
        with scratch() as io:
            for v in slots:
                arr = np.asarray(v)
                if arr.shape != (self.slots,) or not np.all(np.isfinite(arr)):
                    raise ValueError(f"each slot vector must be {self.slots} finite values")
                pt = seal.Plaintext()
                self._encoder.encode(arr.astype(np.complex128).tolist(), pid, scale, pt)
                if self.preset.seeded:
                    raw.append(io.dump(self._encryptor.encrypt_symmetric(pt)))
                else:
                    ct = seal.Ciphertext()
                    self._encryptor.encrypt_symmetric(pt, ct)
                    raw.append(io.dump(ct))
        return self.seal_envelope(raw)

    def decrypt(
        self, blob: bytes, level: int, scale: float, count: int | None = None
    ) -> list[np.ndarray]:
        """Check, load and decrypt a message into complex slot vectors.

        Raises
        ------
        CiphertextError
            Envelope or ciphertext checks fail.
        """
        out: list[np.ndarray] = []
        for ct in self.load(blob, level, scale, count):
            pt = seal.Plaintext()
            self._decryptor.decrypt(ct, pt)
            out.append(np.asarray(self._encoder.decode_complex(pt), dtype=np.complex128))
        return out
