"""Structural validation of one ciphertext chunk before SEAL parses it ("safe intake").

This module owns the byte-level rules for the SEAL ciphertexts flower-focal accepts from
another party. The envelope's CRCs and fingerprint catch corruption and foreign keys, not a
payload crafted by a key holder, and SEAL's own parser (and its zstd inflater, which has no
output bound) runs in the one process that sees every institution's traffic. So before any
byte reaches SEAL, :meth:`IntakeSpec.sanitize` checks a chunk in pure Python/numpy and hands
SEAL an *uncompressed* re-encoding of exactly what it checked: SEAL then never decompresses
attacker bytes and only ever parses a structure whose every field is known to be in range.

What TenSEAL 0.3.18's bundled SEAL 4.x writes, and what is checked (all little-endian):

``SEALHeader`` (16 bytes): magic ``0xA15E``, header size 16, version equal to the local SEAL's
(learned at import by serializing a parameter object), compression mode (0 none, 2 zstd; zlib
is refused, nothing here writes it), reserved 0, and ``size`` equal to the chunk's length.

zstd body: one frame whose header declares its content size, which must be exactly the size
the context implies (so inflation is bounded by a number fixed in advance: no zip bomb),
a window no larger than that, no trailing bytes after the frame.

Ciphertext members: parms_id (4 x u64) equal to the context's first data level, is_ntt_form
(CKKS 1, BFV 0), size (number of polynomials) 2, poly modulus degree N, coefficient-modulus
count of that level, scale (CKKS: the preset's ``2**scale_bits``; BFV 1.0), correction factor
1; then a nested ``DynArray`` (its own SEAL header, uncompressed, size and element count
exact) of ``size * count * N`` coefficients, each below its prime, or, for a *seeded*
ciphertext (``seal-ckks`` presets with ``seeded=True``), the ``c0`` half only followed by a
nested ``UniformRandomGeneratorInfo`` (SEAL header, PRNG type blake2xb or shake256, 64-byte
seed). The total length must match exactly.

TenSEAL vectors (``tenseal-*`` backends) wrap the SEAL ciphertext in a protobuf
(``CKKSVectorProto`` / ``BFVVectorProto``); the wrapper is parsed strictly as TenSEAL writes
it: field 1 packed ``sizes`` holding the chunk's value count, field 2 exactly one ciphertext,
field 3 (CKKS) the scale as a double equal to the preset's; no other fields, no duplicates.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from flower_focal.crypto.errors import CiphertextError

try:
    import zstandard
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "flower_focal.crypto needs the 'zstandard' package to validate SEAL's zstd-compressed "
        "ciphertexts before SEAL parses them (pip install zstandard)"
    ) from exc

SEAL_MAGIC = 0xA15E
SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr, reserved, size
COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD = 0, 1, 2
_COMPR_NAMES = {COMPR_NONE: "none", COMPR_ZLIB: "zlib", COMPR_ZSTD: "zstd"}
#: parms_id (32), is_ntt_form (u8), size, N, coeff-modulus count (3 x u64), scale (f64),
#: correction factor (u64)
CT_MEMBERS = struct.Struct("<32sBQQQdQ")
PRNG_TYPES = {1: "blake2xb", 2: "shake256"}
SEED_BYTES = 64
_RNG_INFO_SIZE = SEAL_HEADER.size + 1 + SEED_BYTES
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _u64_parms_id(parms_id: Any) -> bytes:
    words = [int(w) for w in parms_id]
    if len(words) != 4:
        raise ValueError(f"a SEAL parms_id has 4 words, got {len(words)}")
    return struct.pack("<4Q", *words)


_LOCAL_VERSION: tuple[int, int] | None = None
_DCTX = threading.local()  # one zstd decompression context per thread (building one: ~27 us)


def _decompressor(max_window: int) -> zstandard.ZstdDecompressor:
    cache = getattr(_DCTX, "by_window", None)
    if cache is None:
        cache = _DCTX.by_window = {}
    d = cache.get(max_window)
    if d is None:
        d = cache[max_window] = zstandard.ZstdDecompressor(max_window_size=max_window)
    return d


def local_seal_version() -> tuple[int, int]:
    """(major, minor) that the bundled SEAL writes into every header it serializes."""
    global _LOCAL_VERSION
    if _LOCAL_VERSION is None:
        import tenseal.sealapi as seal

        from flower_focal.crypto._scratch import scratch

        with scratch() as io:
            data = io.dump(seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS))
        magic, _, major, minor, _, _, _ = SEAL_HEADER.unpack_from(data)
        if magic != SEAL_MAGIC:  # pragma: no cover - a SEAL without 4.x headers
            raise RuntimeError("the bundled SEAL does not write SEAL 4.x headers")
        _LOCAL_VERSION = (major, minor)
    return _LOCAL_VERSION


@dataclass(frozen=True)
class IntakeSpec:
    """What a valid chunk of one context looks like (picklable: workers get a copy).

    Build it with :meth:`for_seal` / :meth:`for_tenseal` from a loaded context.
    """

    wrapper: str  # "seal" or "tenseal"
    scheme: str  # "ckks" or "bfv"
    version: tuple[int, int]
    parms_id: bytes
    poly_modulus_degree: int
    moduli: tuple[int, ...]
    scale: float
    allow_seeded: bool
    values_per_chunk: int

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def for_seal(cls, context: Any, scheme: str, scale: float, seeded: bool, k: int) -> IntakeSpec:
        """Spec for raw SEAL ciphertexts at ``context``'s first data level."""
        data = context.first_context_data()
        return cls(
            wrapper="seal",
            scheme=scheme,
            version=local_seal_version(),
            parms_id=_u64_parms_id(context.first_parms_id()),
            poly_modulus_degree=int(data.parms().poly_modulus_degree()),
            moduli=tuple(int(m.value()) for m in data.parms().coeff_modulus()),
            scale=float(scale) if scheme == "ckks" else 1.0,
            allow_seeded=seeded,
            values_per_chunk=k,
        )

    @classmethod
    def for_tenseal(cls, ctx: Any, scheme: str, scale: float, k: int) -> IntakeSpec:
        """Spec for one-ciphertext TenSEAL vectors made under ``ctx`` (never seeded)."""
        context = ctx.seal_context().data
        spec = cls.for_seal(context, scheme, scale, False, k)
        return cls(**{**spec.__dict__, "wrapper": "tenseal"})

    # -- sizes ----------------------------------------------------------------------------
    def _coeffs(self, polys: int) -> int:
        return polys * len(self.moduli) * self.poly_modulus_degree

    def body_sizes(self) -> dict[int, bool]:
        """Exact uncompressed member sizes allowed -> whether that size is the seeded layout."""
        dyn = lambda polys: SEAL_HEADER.size + 8 + 8 * self._coeffs(polys)
        sizes = {CT_MEMBERS.size + dyn(2): False}
        if self.allow_seeded:
            sizes[CT_MEMBERS.size + dyn(1) + _RNG_INFO_SIZE] = True
        return sizes

    # -- the check ------------------------------------------------------------------------
    def sanitize(self, data: bytes | memoryview, n_values: int) -> bytes:
        """Validate one chunk; return the bytes to give SEAL/TenSEAL (uncompressed).

        Raises
        ------
        CiphertextError
            Naming the first field that is wrong.
        """
        view = memoryview(data).cast("B")
        if self.wrapper == "seal":
            return self._seal_ciphertext(view)
        return self._tenseal_vector(view, n_values)

    def _seal_ciphertext(self, view: memoryview) -> bytes:
        size = len(view)
        if size < SEAL_HEADER.size:
            raise CiphertextError(f"SEAL header: {size} bytes is shorter than a header (16)")
        magic, hsize, major, minor, compr, reserved, total = SEAL_HEADER.unpack_from(view)
        if magic != SEAL_MAGIC:
            raise CiphertextError(f"SEAL header: bad magic {magic:#06x} (want {SEAL_MAGIC:#06x})")
        if hsize != SEAL_HEADER.size:
            raise CiphertextError(f"SEAL header: header size {hsize} (want 16)")
        if (major, minor) != self.version:
            raise CiphertextError(
                f"SEAL header: version {major}.{minor}, this server's SEAL writes and accepts "
                f"{self.version[0]}.{self.version[1]} only"
            )
        if reserved != 0:
            raise CiphertextError(f"SEAL header: reserved field is {reserved:#x}, not 0")
        if total != size:
            raise CiphertextError(f"SEAL header: size field says {total} bytes, chunk has {size}")
        allowed = self.body_sizes()
        raw = view[SEAL_HEADER.size :]
        if compr == COMPR_ZSTD:
            body = self._inflate(raw, allowed)
        elif compr == COMPR_NONE:
            body = raw
        else:
            name = _COMPR_NAMES.get(compr, "unknown")
            raise CiphertextError(
                f"SEAL header: compression mode {compr} ({name}) is not accepted (zstd or none)"
            )
        if len(body) not in allowed:
            raise CiphertextError(
                f"ciphertext body is {len(body)} bytes; this context allows "
                f"{sorted(allowed)} (2 polynomials{', or seeded' if self.allow_seeded else ''})"
            )
        self._check_members(body, seeded=allowed[len(body)])
        header = SEAL_HEADER.pack(
            SEAL_MAGIC, SEAL_HEADER.size, *self.version, COMPR_NONE, 0, SEAL_HEADER.size + len(body)
        )
        return header + body if isinstance(body, bytes) else header + body.tobytes()

    def _inflate(self, raw: memoryview, allowed: dict[int, bool]) -> bytes:
        bound = max(allowed)
        if bytes(raw[:4]) != _ZSTD_MAGIC:
            raise CiphertextError("zstd body: not a zstd frame (bad frame magic)")
        try:
            params = zstandard.get_frame_parameters(raw)
        except zstandard.ZstdError as exc:
            raise CiphertextError(f"zstd body: unreadable frame header ({exc})") from None
        content = params.content_size
        if content == zstandard.CONTENTSIZE_UNKNOWN or content not in allowed:
            shown = "unknown" if content == zstandard.CONTENTSIZE_UNKNOWN else content
            raise CiphertextError(
                f"zstd body: frame declares {shown} bytes of content; this context allows "
                f"{sorted(allowed)}"
            )
        if params.window_size > bound:
            raise CiphertextError(
                f"zstd body: frame window {params.window_size} bytes exceeds the {bound} allowed"
            )
        try:
            out = _decompressor(max(bound, 1 << 10)).decompress(
                raw, max_output_size=bound, allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            raise CiphertextError(f"zstd body: corrupt compressed data ({exc})") from None
        if len(out) != content:  # pragma: no cover - zstd enforces the declared size
            raise CiphertextError(
                f"zstd body: inflated to {len(out)} bytes, frame declared {content}"
            )
        return out

    def _check_members(self, body: bytes | memoryview, seeded: bool) -> None:
        pid, ntt, polys, n, count, scale, correction = CT_MEMBERS.unpack_from(body)
        if pid != self.parms_id:
            raise CiphertextError(
                "ciphertext parms_id is not this context's first data level (another parameter "
                "set or another level)"
            )
        want_ntt = 1 if self.scheme == "ckks" else 0
        if ntt != want_ntt:
            raise CiphertextError(f"ciphertext is_ntt_form byte is {ntt}, want {want_ntt}")
        if polys != 2:
            raise CiphertextError(f"ciphertext size (number of polynomials) is {polys}, want 2")
        if n != self.poly_modulus_degree:
            raise CiphertextError(
                f"ciphertext poly modulus degree {n}, context has {self.poly_modulus_degree}"
            )
        if count != len(self.moduli):
            raise CiphertextError(
                f"ciphertext has {count} coefficient moduli, this level has {len(self.moduli)}"
            )
        if not scale == self.scale:  # also refuses NaN
            raise CiphertextError(f"ciphertext scale {scale!r} is not the preset's {self.scale!r}")
        if correction != 1:
            raise CiphertextError(f"ciphertext correction factor {correction}, want 1")
        off = CT_MEMBERS.size
        n_coeffs = self._coeffs(1 if seeded else 2)
        off = self._nested_header(body, off, SEAL_HEADER.size + 8 + 8 * n_coeffs, "coefficients")
        (declared,) = struct.unpack_from("<Q", body, off)
        if declared != n_coeffs:
            raise CiphertextError(
                f"coefficient array announces {declared} coefficients, want {n_coeffs}"
            )
        off += 8
        coeffs = np.frombuffer(body, dtype="<u8", count=n_coeffs, offset=off)
        k, n = len(self.moduli), self.poly_modulus_degree
        if k == 1:
            bad = bool(coeffs.max() >= self.moduli[0])
        else:
            q = np.array(self.moduli, dtype=np.uint64)[None, :, None]
            bad = bool((coeffs.reshape(-1, k, n) >= q).any())
        if bad:
            grid = coeffs.reshape(-1, k, n)
            q = np.array(self.moduli, dtype=np.uint64)[None, :, None]
            poly, prime, idx = (int(i[0]) for i in np.nonzero(grid >= q))
            raise CiphertextError(
                f"coefficient {idx} of polynomial {poly} is {int(grid[poly, prime, idx])}, not "
                f"below its modulus q{prime} = {self.moduli[prime]}"
            )
        off += 8 * n_coeffs
        if seeded:
            off = self._nested_header(body, off, _RNG_INFO_SIZE, "PRNG seed")
            prng = body[off]
            if prng not in PRNG_TYPES:
                raise CiphertextError(
                    f"seeded ciphertext: PRNG type {prng} (want {sorted(PRNG_TYPES)}: "
                    f"{', '.join(PRNG_TYPES.values())})"
                )
            off += 1 + SEED_BYTES
        if off != len(body):  # pragma: no cover - body_sizes() makes the sizes add up
            raise CiphertextError(f"{len(body) - off} unexpected bytes after the ciphertext")

    def _nested_header(self, body: bytes | memoryview, off: int, want: int, what: str) -> int:
        magic, hsize, major, minor, compr, reserved, total = SEAL_HEADER.unpack_from(body, off)
        if (magic, hsize, (major, minor), compr, reserved, total) != (
            SEAL_MAGIC,
            SEAL_HEADER.size,
            self.version,
            COMPR_NONE,
            0,
            want,
        ):
            raise CiphertextError(
                f"{what}: nested SEAL header (magic {magic:#06x}, header size {hsize}, version "
                f"{major}.{minor}, compression {compr}, reserved {reserved}, size {total}) is not "
                f"an uncompressed {self.version[0]}.{self.version[1]} header of {want} bytes"
            )
        return off + SEAL_HEADER.size

    # -- TenSEAL's protobuf wrapper -------------------------------------------------------
    def _tenseal_vector(self, view: memoryview, n_values: int) -> bytes:
        pos, end = 0, len(view)
        # field 1, wire type 2: packed uint32 sizes, exactly [n_values]
        pos = _expect_key(view, pos, 0x0A, "sizes (field 1)")
        length, pos = _varint(view, pos, end)
        if pos + length > end:
            raise CiphertextError("TenSEAL vector: sizes field runs past the end")
        got, p = _varint(view, pos, pos + length)
        if p != pos + length:
            raise CiphertextError("TenSEAL vector: more than one chunk size (want one ciphertext)")
        if got != n_values:
            raise CiphertextError(f"TenSEAL vector: holds {got} values, want {n_values}")
        sizes_field = view[0 : pos + length]
        pos += length
        # field 2, wire type 2: one ciphertext
        pos = _expect_key(view, pos, 0x12, "ciphertexts (field 2)")
        length, pos = _varint(view, pos, end)
        if pos + length > end:
            raise CiphertextError(
                f"TenSEAL vector: ciphertext field announces {length} bytes, "
                f"{end - pos} remain"
            )
        inner = self._seal_ciphertext(view[pos : pos + length])
        pos += length
        tail = view[pos:end]
        if self.scheme == "ckks":
            if len(tail) != 9 or tail[0] != 0x19:
                raise CiphertextError(
                    "TenSEAL vector: after the ciphertext want only the scale (field 3, a double)"
                )
            (scale,) = struct.unpack_from("<d", tail, 1)
            if not scale == self.scale:
                raise CiphertextError(
                    f"TenSEAL vector: scale {scale!r} is not the preset's {self.scale!r}"
                )
        elif len(tail):
            raise CiphertextError(
                f"TenSEAL vector: {len(tail)} unexpected bytes after the ciphertext"
            )
        return b"".join([sizes_field, b"\x12", _encode_varint(len(inner)), inner, tail])


def _expect_key(view: memoryview, pos: int, key: int, what: str) -> int:
    if pos >= len(view):
        raise CiphertextError(f"TenSEAL vector: truncated before {what}")
    if view[pos] != key:
        raise CiphertextError(
            f"TenSEAL vector: protobuf key {view[pos]:#04x} where {what} (key {key:#04x}) belongs"
        )
    return pos + 1


def _varint(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end:
            raise CiphertextError("TenSEAL vector: truncated varint")
        b = view[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift >= 35:  # no length or size here needs more than 5 bytes (< 2^35)
            raise CiphertextError("TenSEAL vector: varint longer than 5 bytes")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
