"""HE backends: the only code in flower-focal that touches TenSEAL / SEAL objects.

A backend owns one loaded context (parameters, and the secret key when it has one) and turns
flat float64 arrays into per-chunk ciphertext bytes and back. Everything above it
(:mod:`~flower_focal.crypto.keys`, :mod:`~flower_focal.crypto.envelope`,
:mod:`~flower_focal.crypto.aggregate`) handles only ``bytes`` and numpy arrays.

One chunk is exactly one ciphertext holding :attr:`HEPreset.values_per_chunk` values (the last
one zero-padded), so no serialized object gets anywhere near protobuf's 2 GB limit and
TenSEAL never prints its "does not fit in a single ciphertext" warning.

Callers must validate values (finite, within :attr:`HEPreset.max_abs_value`, 1-D float64)
before :meth:`Backend.encrypt`; :class:`~flower_focal.crypto.keys.SecretContext` does.
Backends are picked through :data:`BACKENDS` by ``HEPreset.backend``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np

try:
    import tenseal as ts
    import tenseal.sealapi as seal
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "flower_focal.crypto needs TenSEAL (pip install 'tenseal>=0.3.14')"
    ) from exc

from flower_focal.crypto._scratch import ScratchIO, scratch
from flower_focal.crypto.errors import CiphertextError
from flower_focal.crypto.intake import IntakeSpec
from flower_focal.crypto.params import HEPreset

#: Section names inside a key file (see :mod:`flower_focal.crypto.keys`).
SECRET_SECTION_NAMES = frozenset({"secret_key", "tenseal_context_secret"})


class Backend(ABC):
    """One loaded HE context for a preset; see the module docstring for the contract."""

    scheme_backend: ClassVar[str]

    def __init__(self, preset: HEPreset) -> None:
        self.preset = preset

    # -- keys ----------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def generate(cls, preset: HEPreset) -> Backend:
        """Fresh keys for ``preset`` (a backend holding the secret key)."""

    @classmethod
    @abstractmethod
    def from_sections(cls, preset: HEPreset, sections: Mapping[str, bytes]) -> Backend:
        """Rebuild from :meth:`secret_sections` or :meth:`public_sections` output.

        Raises ``ValueError`` when the sections do not match ``preset``.
        """

    @property
    @abstractmethod
    def has_secret_key(self) -> bool:
        """Whether the underlying SEAL/TenSEAL object holds a secret key."""

    @abstractmethod
    def secret_sections(self) -> dict[str, bytes]:
        """Everything an institution needs (includes the secret key)."""

    @abstractmethod
    def public_sections(self) -> dict[str, bytes]:
        """What the server needs: parameters plus ``preset.eval_keys``; never a secret key."""

    @abstractmethod
    def eval_key_kinds(self) -> tuple[str, ...]:
        """Evaluation keys actually present in this context."""

    # -- chunks --------------------------------------------------------------------------
    @contextmanager
    def io(self) -> Iterator[ScratchIO | None]:
        """Scratch I/O needed by :meth:`load` / :meth:`dump` (``None`` when not needed)."""
        yield None

    @abstractmethod
    def encrypt(self, values: np.ndarray) -> list[bytes]:
        """Encrypt validated 1-D float64 ``values``; one ``bytes`` per chunk."""

    #: Byte-level rules a chunk must meet before SEAL parses it (set by each backend).
    intake: IntakeSpec

    @abstractmethod
    def load(self, data: bytes, n_values: int, io: ScratchIO | None) -> Any:
        """Check one chunk with :attr:`intake`, then deserialize it; raises :class:`CiphertextError`."""

    @abstractmethod
    def dump(self, ct: Any, io: ScratchIO | None) -> bytes:
        """Serialize one loaded chunk (the server's sum is not seeded)."""

    @abstractmethod
    def add_inplace(self, acc: Any, ct: Any) -> None:
        """``acc += ct`` (exact modular addition)."""

    @abstractmethod
    def sub_inplace(self, acc: Any, ct: Any) -> None:
        """``acc -= ct``; undoes :meth:`add_inplace` exactly (used for rollback)."""

    @abstractmethod
    def decrypt_chunk(self, ct: Any, n_values: int) -> np.ndarray:
        """Decrypt a loaded chunk to ``n_values`` float64 values (needs the secret key)."""

    def decrypt(self, chunks: Sequence[bytes], length: int) -> np.ndarray:
        """Decrypt serialized chunks into a flat float64 array of ``length`` values."""
        k = self.preset.values_per_chunk
        out = np.empty(length, dtype=np.float64)
        with self.io() as io:
            for i, data in enumerate(chunks):
                n = min(k, length - i * k)
                out[i * k : i * k + n] = self.decrypt_chunk(self.load(data, n, io), n)
        return out


def _chunk_sizes(length: int, k: int) -> Iterator[tuple[int, int]]:
    for start in range(0, length, k):
        yield start, min(k, length - start)


# ======================================================================================
# Raw SEAL (tenseal.sealapi): single prime, seeded symmetric encryption, complex packing
# ======================================================================================
class SealCkksBackend(Backend):
    """CKKS through ``tenseal.sealapi`` (what TenSEAL cannot do: one prime, seeded uploads)."""

    scheme_backend = "seal-ckks"

    def __init__(
        self,
        preset: HEPreset,
        parms: Any,
        secret_key: Any | None,
        eval_key_bytes: Mapping[str, bytes],
    ) -> None:
        super().__init__(preset)
        got = [m.bit_count() for m in parms.coeff_modulus()]
        if (
            parms.scheme() != seal.SCHEME_TYPE.CKKS
            or parms.poly_modulus_degree() != preset.poly_modulus_degree
            or got != list(preset.coeff_mod_bit_sizes)
        ):
            raise ValueError(
                f"SEAL parameters (N={parms.poly_modulus_degree()}, primes {got} bits) do not "
                f"match preset {preset.name!r}"
            )
        self._parms = parms
        self.context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not self.context.parameters_set():
            raise ValueError(
                f"SEAL rejects preset {preset.name!r}: {self.context.parameters_error_message()}"
            )
        self._encoder = seal.CKKSEncoder(self.context)
        self._evaluator = seal.Evaluator(self.context)
        self._first_parms_id = self.context.first_parms_id()
        self.intake = IntakeSpec.for_seal(
            self.context, "ckks", preset.scale, preset.seeded, preset.values_per_chunk
        )
        self._secret_key = secret_key
        self._eval_key_bytes = dict(eval_key_bytes)
        if secret_key is not None:
            self._encryptor = seal.Encryptor(self.context, secret_key)
            self._decryptor = seal.Decryptor(self.context, secret_key)

    @staticmethod
    def _parms_for(preset: HEPreset) -> Any:
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(preset.poly_modulus_degree)
        parms.set_coeff_modulus(
            seal.CoeffModulus.Create(preset.poly_modulus_degree, list(preset.coeff_mod_bit_sizes))
        )
        return parms

    @classmethod
    def generate(cls, preset: HEPreset) -> SealCkksBackend:
        parms = cls._parms_for(preset)
        context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        keygen = seal.KeyGenerator(context)
        eval_keys: dict[str, bytes] = {}
        with scratch() as io:
            if "relin" in preset.eval_keys:
                eval_keys["relin_keys"] = io.dump(keygen.create_relin_keys())
            if "galois" in preset.eval_keys:
                if preset.galois_steps:
                    elts = cls._galois_elts(context, preset)
                    eval_keys["galois_keys"] = io.dump(keygen.create_galois_keys(elts))
                else:
                    eval_keys["galois_keys"] = io.dump(keygen.create_galois_keys())
        return cls(preset, parms, keygen.secret_key(), eval_keys)

    @classmethod
    def from_sections(cls, preset: HEPreset, sections: Mapping[str, bytes]) -> SealCkksBackend:
        allowed = {"parms", "secret_key", "relin_keys", "galois_keys"}
        if "parms" not in sections or set(sections) - allowed:
            raise ValueError(
                f"a {cls.scheme_backend} key file needs a 'parms' section and only "
                f"{sorted(allowed)}; got {sorted(sections)}"
            )
        with scratch() as io:
            try:
                parms = io.load(seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS), sections["parms"])
            except Exception as exc:  # SEAL raises RuntimeError/ValueError on bad streams
                raise ValueError(f"unreadable SEAL parameters: {exc}") from exc
            backend = cls(
                preset,
                parms,
                None,
                {k: v for k, v in sections.items() if k in ("relin_keys", "galois_keys")},
            )
            try:
                if "secret_key" in sections:
                    sk = io.load(seal.SecretKey(), sections["secret_key"], backend.context)
                    backend = cls(preset, parms, sk, backend._eval_key_bytes)
                # Evaluation keys are only validated here and kept as bytes; the server-side
                # FOCAL ops that need them will load them next to their Evaluator.
                if "relin_keys" in sections:
                    io.load(seal.RelinKeys(), sections["relin_keys"], backend.context)
                if "galois_keys" in sections:
                    gk = io.load(seal.GaloisKeys(), sections["galois_keys"], backend.context)
                    missing = [
                        e for e in cls._galois_elts(backend.context, preset) if not gk.has_key(e)
                    ]
                    if missing:
                        raise ValueError(f"Galois keys lack elements {missing} the preset lists")
            except Exception as exc:
                raise ValueError(f"unreadable SEAL key material: {exc}") from exc
        return backend

    @staticmethod
    def _galois_elts(context: Any, preset: HEPreset) -> list[int]:
        tool = context.key_context_data().galois_tool()
        return [int(e) for e in tool.get_elts_from_steps(list(preset.galois_steps))]

    # -- raw SEAL access for flower_focal.crypto.ckks (same package; nothing else uses it) --
    def seal_objects(self) -> dict[str, Any]:
        """SEAL context, encoder and evaluator (and encryptor/decryptor with a secret key)."""
        out: dict[str, Any] = {
            "context": self.context,
            "encoder": self._encoder,
            "evaluator": self._evaluator,
        }
        if self._secret_key is not None:
            out |= {"encryptor": self._encryptor, "decryptor": self._decryptor}
        return out

    def load_eval_keys(self) -> dict[str, Any]:
        """The evaluation keys this context carries, as loaded SEAL objects."""
        out: dict[str, Any] = {}
        with scratch() as io:
            if "relin_keys" in self._eval_key_bytes:
                out["relin"] = io.load(seal.RelinKeys(), self._eval_key_bytes["relin_keys"], self.context)
            if "galois_keys" in self._eval_key_bytes:
                out["galois"] = io.load(
                    seal.GaloisKeys(), self._eval_key_bytes["galois_keys"], self.context
                )
        return out

    @property
    def has_secret_key(self) -> bool:
        return self._secret_key is not None

    def _require_secret(self) -> None:
        if self._secret_key is None:
            raise ValueError("this context holds no secret key (server/public context)")

    def secret_sections(self) -> dict[str, bytes]:
        self._require_secret()
        with scratch() as io:
            sections = {"parms": io.dump(self._parms), "secret_key": io.dump(self._secret_key)}
        return sections | self._eval_key_bytes

    def public_sections(self) -> dict[str, bytes]:
        with scratch() as io:
            sections = {"parms": io.dump(self._parms)}
        return sections | self._eval_key_bytes

    def eval_key_kinds(self) -> tuple[str, ...]:
        return tuple(k.removesuffix("_keys") for k in sorted(self._eval_key_bytes))

    @contextmanager
    def io(self) -> Iterator[ScratchIO | None]:
        with scratch() as io:
            yield io

    def encrypt(self, values: np.ndarray) -> list[bytes]:
        self._require_secret()
        p = self.preset
        k, scale = p.values_per_chunk, p.scale
        out: list[bytes] = []
        values = np.ascontiguousarray(values, dtype=np.float64)
        tail = np.zeros(k, dtype=np.float64)  # only the last chunk is zero-padded (a copy)
        pt = seal.Plaintext()
        with scratch() as io:
            for start, n in _chunk_sizes(len(values), k):
                chunk = values[start : start + n]
                if n < k:
                    tail[:n] = chunk
                    chunk = tail
                # Complex packing: value pairs (x[2j], x[2j+1]) are one slot x[2j] + i x[2j+1],
                # which is exactly the memory layout of complex128; a view, no arithmetic.
                slots = chunk.view(np.complex128) if p.complex_packing else chunk
                payload: list[Any] = slots.tolist()
                self._encoder.encode(payload, scale, pt)
                if p.seeded:
                    out.append(io.dump(self._encryptor.encrypt_symmetric(pt)))
                else:
                    ct = seal.Ciphertext()
                    self._encryptor.encrypt_symmetric(pt, ct)
                    out.append(io.dump(ct))
        return out

    def load(self, data: bytes, n_values: int, io: ScratchIO | None) -> Any:
        if io is None:
            raise ValueError("SealCkksBackend.load needs the ScratchIO from backend.io()")
        data = self.intake.sanitize(data, n_values)  # SEAL sees only checked, inflated bytes
        try:
            ct = io.load(seal.Ciphertext(), data, self.context)
        except Exception as exc:  # SEAL: std::logic_error / runtime_error / invalid_argument
            raise CiphertextError(f"SEAL could not load the ciphertext: {exc}") from exc
        if (
            ct.size() != 2
            or ct.parms_id() != self._first_parms_id
            or not ct.is_ntt_form()
            or ct.scale != self.preset.scale
        ):
            raise CiphertextError(
                "ciphertext does not match the preset (size, level, NTT form or scale differ)"
            )
        return ct

    def dump(self, ct: Any, io: ScratchIO | None) -> bytes:
        if io is None:
            raise ValueError("SealCkksBackend.dump needs the ScratchIO from backend.io()")
        return io.dump(ct)

    def add_inplace(self, acc: Any, ct: Any) -> None:
        self._evaluator.add_inplace(acc, ct)

    def sub_inplace(self, acc: Any, ct: Any) -> None:
        self._evaluator.sub_inplace(acc, ct)

    def decrypt_chunk(self, ct: Any, n_values: int) -> np.ndarray:
        self._require_secret()
        pt = seal.Plaintext()
        self._decryptor.decrypt(ct, pt)
        # dtype given: numpy then skips per-element type discovery (half the conversion time)
        z = np.array(self._encoder.decode_complex(pt), dtype=np.complex128)
        if self.preset.complex_packing:
            # slot j = x[2j] + i x[2j+1]: complex128 memory is exactly the interleaved pairs
            return z.view(np.float64)[:n_values]
        return z.real[:n_values].copy()


# ======================================================================================
# TenSEAL (CKKS and BFV vectors), one ciphertext per vector
# ======================================================================================
class _TensealBackend(Backend):
    """Shared TenSEAL plumbing; subclasses define encoding and the vector type."""

    def __init__(self, preset: HEPreset, ctx: Any) -> None:
        super().__init__(preset)
        self._check_context(preset, ctx)
        ctx.auto_mod_switch = False  # a lower-level upload must fail, not drag the sum down
        self.ctx = ctx
        self.intake = IntakeSpec.for_tenseal(
            ctx, preset.scheme, preset.scale, preset.values_per_chunk
        )

    @classmethod
    def _check_context(cls, preset: HEPreset, ctx: Any) -> None:
        parms = ctx.seal_context().data.key_context_data().parms()
        got = [m.bit_count() for m in parms.coeff_modulus()]
        scheme = {"ckks": "CKKS", "bfv": "BFV"}[preset.scheme]
        if (
            parms.scheme().name != scheme
            or parms.poly_modulus_degree() != preset.poly_modulus_degree
            or got != list(preset.coeff_mod_bit_sizes)
        ):
            raise ValueError(
                f"TenSEAL context ({parms.scheme().name}, N={parms.poly_modulus_degree()}, primes "
                f"{got} bits) does not match preset {preset.name!r}"
            )
        t_bits = parms.plain_modulus().bit_count()
        if preset.scheme == "bfv" and t_bits != preset.plain_modulus_bits:
            raise ValueError(f"TenSEAL plain modulus does not match preset {preset.name!r}")
        if preset.scheme == "ckks" and ctx.global_scale != preset.scale:
            raise ValueError(f"TenSEAL global scale does not match preset {preset.name!r}")

    @classmethod
    @abstractmethod
    def _new_context(cls, preset: HEPreset) -> Any: ...

    @classmethod
    def generate(cls, preset: HEPreset) -> _TensealBackend:
        ctx = cls._new_context(preset)
        if "relin" in preset.eval_keys and not ctx.has_relin_keys():
            ctx.generate_relin_keys()
        if "galois" in preset.eval_keys:
            ctx.generate_galois_keys()
        return cls(preset, ctx)

    @classmethod
    def from_sections(cls, preset: HEPreset, sections: Mapping[str, bytes]) -> _TensealBackend:
        names = set(sections)
        if names not in ({"tenseal_context_secret"}, {"tenseal_context"}):
            raise ValueError(
                f"a {cls.scheme_backend} key file needs exactly one 'tenseal_context' or "
                f"'tenseal_context_secret' section; got {sorted(names)}"
            )
        (data,) = sections.values()
        try:
            ctx = ts.context_from(data)
        except Exception as exc:
            raise ValueError(f"unreadable TenSEAL context: {exc}") from exc
        if ctx.is_private() != ("tenseal_context_secret" in names):
            raise ValueError("TenSEAL context's secret key does not match its section name")
        return cls(preset, ctx)

    @property
    def has_secret_key(self) -> bool:
        return bool(self.ctx.is_private() or self.ctx.has_secret_key())

    def secret_sections(self) -> dict[str, bytes]:
        if not self.has_secret_key:
            raise ValueError("this context holds no secret key (server/public context)")
        # Evaluation keys are not stored for institutions; they never evaluate.
        data = self.ctx.serialize(
            save_public_key=False,
            save_secret_key=True,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        return {"tenseal_context_secret": data}

    def public_sections(self) -> dict[str, bytes]:
        kinds = self.preset.eval_keys
        data = self.ctx.serialize(
            save_public_key=False,
            save_secret_key=False,
            save_galois_keys="galois" in kinds,
            save_relin_keys="relin" in kinds,
        )
        return {"tenseal_context": data}

    def eval_key_kinds(self) -> tuple[str, ...]:
        present = {"relin": self.ctx.has_relin_keys(), "galois": self.ctx.has_galois_keys()}
        return tuple(k for k, v in sorted(present.items()) if v)

    @abstractmethod
    def _vector(self, values: np.ndarray) -> Any: ...

    @abstractmethod
    def _vector_from(self, data: bytes) -> Any: ...

    def encrypt(self, values: np.ndarray) -> list[bytes]:
        if not self.has_secret_key:
            raise ValueError("this context holds no secret key (server/public context)")
        k = self.preset.values_per_chunk
        return [
            self._vector(values[start : start + n]).serialize()
            for start, n in _chunk_sizes(len(values), k)
        ]

    def load(self, data: bytes, n_values: int, io: ScratchIO | None) -> Any:
        data = self.intake.sanitize(data, n_values)  # TenSEAL/SEAL see only checked bytes
        try:
            vec = self._vector_from(data)
            cts = vec.ciphertext()
        except Exception as exc:  # TenSEAL: ValueError("failed to parse ... stream"), SEAL errors
            raise CiphertextError(f"TenSEAL could not load the ciphertext: {exc}") from exc
        if vec.size() != n_values or len(cts) != 1:
            raise CiphertextError(
                f"ciphertext holds {vec.size()} values in {len(cts)} ciphertexts; "
                f"expected {n_values} in 1"
            )
        ct = cts[0]
        if ct.size() != 2 or ct.coeff_modulus_size() != self.preset.data_primes:
            raise CiphertextError("ciphertext does not match the preset (size or level differ)")
        if self.preset.scheme == "ckks" and ct.scale != self.preset.scale:
            raise CiphertextError("ciphertext scale does not match the preset")
        return vec

    def dump(self, ct: Any, io: ScratchIO | None) -> bytes:
        return bytes(ct.serialize())

    def add_inplace(self, acc: Any, ct: Any) -> None:
        acc.add_(ct)

    def sub_inplace(self, acc: Any, ct: Any) -> None:
        acc.sub_(ct)


class TensealCkksBackend(_TensealBackend):
    """TenSEAL ``CKKSVector``, symmetric encryption, ``global_scale = 2**scale_bits``."""

    scheme_backend = "tenseal-ckks"

    @classmethod
    def _new_context(cls, preset: HEPreset) -> Any:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            preset.poly_modulus_degree,
            coeff_mod_bit_sizes=list(preset.coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        )
        ctx.global_scale = preset.scale
        return ctx

    def _vector(self, values: np.ndarray) -> Any:
        return ts.ckks_vector(self.ctx, values.tolist())

    def _vector_from(self, data: bytes) -> Any:
        return ts.ckks_vector_from(self.ctx, data)

    def decrypt_chunk(self, ct: Any, n_values: int) -> np.ndarray:
        return np.asarray(ct.decrypt(), dtype=np.float64)[:n_values]


class TensealBfvBackend(_TensealBackend):
    """TenSEAL ``BFVVector`` over fixed-point integers ``round(x * 2**fixed_point_bits)``."""

    scheme_backend = "tenseal-bfv"

    @classmethod
    def _new_context(cls, preset: HEPreset) -> Any:
        t = seal.PlainModulus.Batching(preset.poly_modulus_degree, preset.plain_modulus_bits)
        return ts.context(
            ts.SCHEME_TYPE.BFV,
            preset.poly_modulus_degree,
            plain_modulus=t.value(),
            coeff_mod_bit_sizes=list(preset.coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        )

    def _vector(self, values: np.ndarray) -> Any:
        q = np.rint(values * self.preset.scale).astype(np.int64)
        return ts.bfv_vector(self.ctx, q.tolist())

    def _vector_from(self, data: bytes) -> Any:
        return ts.bfv_vector_from(self.ctx, data)

    def decrypt_chunk(self, ct: Any, n_values: int) -> np.ndarray:
        q = np.asarray(ct.decrypt(), dtype=np.int64)[:n_values]
        return q.astype(np.float64) / self.preset.scale


#: ``HEPreset.backend`` -> implementation (kept in step with ``params.BACKEND_SCHEMES``).
BACKENDS: dict[str, type[Backend]] = {
    b.scheme_backend: b for b in (SealCkksBackend, TensealCkksBackend, TensealBfvBackend)
}


def backend_for(preset: HEPreset) -> type[Backend]:
    """The backend class implementing ``preset.backend``."""
    try:
        return BACKENDS[preset.backend]
    except KeyError:
        raise ValueError(f"no backend implements {preset.backend!r}") from None
