"""Safe intake (crypto.intake) and the parallel server sum (Accumulator(workers=k)).

Real TenSEAL/SEAL ciphertexts throughout. The fuzz cases wrap mutated SEAL bytes in a *valid*
envelope (the CRCs are recomputed), i.e. what a key holder could send, and check that the
server rejects or accepts each one without crashing, hanging or growing its memory, and that
its sum is byte for byte the sum of the uploads it accepted.
"""

from __future__ import annotations

import resource
import struct
import time

import numpy as np
import pytest
import zstandard

from flower_focal.crypto import (
    Accumulator,
    CiphertextError,
    PublicContext,
    SecretContext,
)
from flower_focal.crypto.envelope import EncryptedVector
from flower_focal.crypto.intake import CT_MEMBERS, SEAL_HEADER, local_seal_version

PRESET_NAMES = ("compact", "ckks", "bfv")


class Setup:
    def __init__(self, name: str) -> None:
        self.secret = SecretContext.generate(name)
        self.public = self.secret.public_context()
        self.backend = self.public._backend
        self.spec = self.backend.intake
        k = self.secret.preset.values_per_chunk
        self.length = 2 * k + k // 3  # three chunks, the last one short
        rng = np.random.default_rng(len(name))
        self.xs = [rng.uniform(-1, 1, self.length) * 0.25 for _ in range(3)]
        self.vecs = [self.secret.encrypt(x) for x in self.xs]
        self.blobs = [v.to_bytes() for v in self.vecs]
        self.n_last = self.length - 2 * k

    def with_chunk(self, vec_index: int, chunk_index: int, data: bytes) -> bytes:
        """Envelope of upload ``vec_index`` with one chunk replaced (CRCs recomputed)."""
        v = self.vecs[vec_index]
        chunks = [bytes(c) for c in v.chunks]
        chunks[chunk_index] = data
        return EncryptedVector(v.fingerprint, v.wire_id, v.length, tuple(chunks), 1).to_bytes()

    def n_values(self, chunk_index: int) -> int:
        return self.n_last if chunk_index == 2 else self.secret.preset.values_per_chunk


@pytest.fixture(scope="module", params=PRESET_NAMES)
def setup(request: pytest.FixtureRequest) -> Setup:
    return Setup(request.param)


@pytest.fixture(scope="module")
def compact() -> Setup:
    return Setup("compact")


# ------------------------------------------------------------------ layout helpers
def split_seal(data: bytes, spec) -> tuple[bytes, bytes, bytes]:
    """(prefix, SEAL ciphertext, suffix) of a chunk: the protobuf around it for TenSEAL."""
    if spec.wrapper == "seal":
        return b"", data, b""
    n, pos = _varint(data, 1)  # key 0x0a, packed sizes
    pos += n
    assert data[pos] == 0x12  # key of the ciphertext field
    start = pos
    n, pos = _varint(data, pos + 1)
    return data[:start], data[pos : pos + n], data[pos + n :]


def join_seal(prefix: bytes, inner: bytes, suffix: bytes, spec) -> bytes:
    if spec.wrapper == "seal":
        return inner
    return prefix + b"\x12" + _enc_varint(len(inner)) + inner + suffix


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def inflated_body(s: Setup, chunk_index: int = 0) -> tuple[bytes, bytes, bytes]:
    """(prefix, uncompressed ciphertext members, suffix) of upload 0's chunk."""
    sanitized = s.spec.sanitize(s.vecs[0].chunks[chunk_index], s.n_values(chunk_index))
    prefix, inner, suffix = split_seal(sanitized, s.spec)
    return prefix, inner[SEAL_HEADER.size :], suffix


def seal_bytes(body: bytes, compr: int = 2, version: tuple[int, int] | None = None) -> bytes:
    """A SEAL serialization of ``body``: zstd-compressed (2) or not (0)."""
    payload = zstandard.ZstdCompressor().compress(body) if compr == 2 else body
    major, minor = version or local_seal_version()
    return SEAL_HEADER.pack(0xA15E, 16, major, minor, compr, 0, 16 + len(payload)) + payload


def rebuilt(s: Setup, body: bytes, compr: int = 2, chunk_index: int = 0) -> bytes:
    prefix, _, suffix = inflated_body(s, chunk_index)
    return join_seal(prefix, seal_bytes(body, compr), suffix, s.spec)


# ------------------------------------------------------------------ the unchanged bytes
def test_sanitize_accepts_real_chunks_and_hands_seal_uncompressed_bytes(setup: Setup) -> None:
    for i, chunk in enumerate(setup.vecs[0].chunks):
        out = setup.spec.sanitize(chunk, setup.n_values(i))
        _, inner, _ = split_seal(out, setup.spec)
        magic, _, major, minor, compr, _, size = SEAL_HEADER.unpack_from(inner)
        assert (magic, compr, size) == (0xA15E, 0, len(inner))
        assert (major, minor) == local_seal_version()
        # the uncompressed form is itself accepted and re-emitted unchanged
        assert setup.spec.sanitize(out, setup.n_values(i)) == out
    acc = Accumulator(setup.public)
    for b in setup.blobs:
        acc.add(b)
    np.testing.assert_allclose(
        setup.secret.decrypt(acc.to_bytes()), sum(setup.xs), atol=1e-5
    )


def test_uncompressed_upload_decrypts_like_the_compressed_one(setup: Setup) -> None:
    v = setup.vecs[0]
    chunks = tuple(
        setup.spec.sanitize(c, setup.n_values(i)) for i, c in enumerate(v.chunks)
    )
    plain = EncryptedVector(v.fingerprint, v.wire_id, v.length, chunks, 1)
    np.testing.assert_array_equal(setup.secret.decrypt(plain), setup.secret.decrypt(v))


# ------------------------------------------------------------------ named rejections
def _member_edit(field: str, value):
    names = ["parms_id", "ntt", "polys", "n", "count", "scale", "correction"]

    def edit(body: bytes) -> bytes:
        fields = list(CT_MEMBERS.unpack_from(body))
        fields[names.index(field)] = value(fields[names.index(field)])
        return CT_MEMBERS.pack(*fields) + body[CT_MEMBERS.size :]

    return edit


MEMBER_CASES = [
    ("parms_id", lambda v: bytes(32), "parms_id"),
    ("parms_id", lambda v: v[:-1] + bytes([v[-1] ^ 1]), "parms_id"),
    ("ntt", lambda v: 1 - v, "is_ntt_form"),
    ("ntt", lambda v: 7, "is_ntt_form"),
    ("polys", lambda v: 3, "number of polynomials"),
    ("polys", lambda v: 1, "number of polynomials"),
    ("polys", lambda v: 2**63, "number of polynomials"),
    ("n", lambda v: v * 2, "poly modulus degree"),
    ("n", lambda v: 0, "poly modulus degree"),
    ("count", lambda v: v + 1, "coefficient moduli"),
    ("count", lambda v: 0, "coefficient moduli"),
    ("scale", lambda v: float("nan"), "scale"),
    ("scale", lambda v: v * 2 if v != 1.0 else 2.0, "scale"),
    ("scale", lambda v: float("inf"), "scale"),
    ("correction", lambda v: 0, "correction factor"),
]


@pytest.mark.parametrize(("field", "value", "match"), MEMBER_CASES)
@pytest.mark.parametrize("compr", [2, 0])
def test_member_edits_are_named(setup: Setup, field, value, match, compr) -> None:
    _, body, _ = inflated_body(setup)
    bad = rebuilt(setup, _member_edit(field, value)(body), compr)
    with pytest.raises(CiphertextError, match=match):
        setup.spec.sanitize(bad, setup.n_values(0))


def test_coefficients_at_or_above_their_modulus_are_refused(setup: Setup) -> None:
    _, body, _ = inflated_body(setup)
    q = setup.spec.moduli[0]
    start = CT_MEMBERS.size + SEAL_HEADER.size + 8
    seeded_tail = 16 + 1 + 64 if setup.spec.allow_seeded else 0
    n_coeffs = (len(body) - start - seeded_tail) // 8
    for index in (0, 1, n_coeffs // 2, n_coeffs - 1):
        for value in (q, q + 1, 2**64 - 1):
            b = bytearray(body)
            struct.pack_into("<Q", b, start + 8 * index, value)
            for compr in (2, 0):
                with pytest.raises(CiphertextError, match="not below its modulus"):
                    setup.spec.sanitize(rebuilt(setup, bytes(b), compr), setup.n_values(0))
    b = bytearray(body)
    struct.pack_into("<Q", b, start, q - 1)  # the largest legal value passes
    setup.spec.sanitize(rebuilt(setup, bytes(b)), setup.n_values(0))


HEADER_CASES = [
    (0, "<H", 0xA15F, "bad magic"),
    (2, "<B", 17, "header size"),
    (3, "<B", 3, "version"),
    (4, "<B", 0, "version"),
    (5, "<B", 1, "zlib"),
    (5, "<B", 3, "compression mode 3"),
    (6, "<H", 1, "reserved"),
]


@pytest.mark.parametrize(("offset", "fmt", "value", "match"), HEADER_CASES)
def test_outer_header_edits_are_named(setup: Setup, offset, fmt, value, match) -> None:
    prefix, inner, suffix = split_seal(bytes(setup.vecs[0].chunks[0]), setup.spec)
    b = bytearray(inner)
    if (fmt, value) == ("<B", 3) and offset == 3:
        value = local_seal_version()[0] - 1
    if offset == 4:
        value = (local_seal_version()[1] + 1) % 256
    struct.pack_into(fmt, b, offset, value)
    with pytest.raises(CiphertextError, match=match):
        setup.spec.sanitize(join_seal(prefix, bytes(b), suffix, setup.spec), setup.n_values(0))


def test_size_field_and_length_must_agree(setup: Setup) -> None:
    prefix, inner, suffix = split_seal(bytes(setup.vecs[0].chunks[0]), setup.spec)
    for delta in (-1, 1, 2**40):
        b = bytearray(inner)
        struct.pack_into("<Q", b, 8, len(inner) + delta)
        with pytest.raises(CiphertextError, match="size field"):
            setup.spec.sanitize(join_seal(prefix, bytes(b), suffix, setup.spec), setup.n_values(0))


def test_nested_headers_and_seed(setup: Setup) -> None:
    _, body, _ = inflated_body(setup)
    dyn = CT_MEMBERS.size
    for off, fmt, value in ((0, "<H", 0), (5, "<B", 2), (8, "<Q", 5)):
        b = bytearray(body)
        struct.pack_into(fmt, b, dyn + off, value)
        with pytest.raises(CiphertextError, match="nested SEAL header"):
            setup.spec.sanitize(rebuilt(setup, bytes(b)), setup.n_values(0))
    b = bytearray(body)
    struct.pack_into("<Q", b, dyn + 16, 7)  # coefficient count
    with pytest.raises(CiphertextError, match="announces 7 coefficients"):
        setup.spec.sanitize(rebuilt(setup, bytes(b)), setup.n_values(0))
    if setup.spec.allow_seeded:
        seed_hdr = len(body) - 81
        for prng in (0, 3, 255):
            b = bytearray(body)
            b[seed_hdr + 16] = prng
            with pytest.raises(CiphertextError, match="PRNG type"):
                setup.spec.sanitize(rebuilt(setup, bytes(b)), setup.n_values(0))
        b = bytearray(body)
        struct.pack_into("<Q", b, seed_hdr + 8, 80)
        with pytest.raises(CiphertextError, match="PRNG seed"):
            setup.spec.sanitize(rebuilt(setup, bytes(b)), setup.n_values(0))
    # a body one byte longer or shorter is no allowed layout
    for bad in (body + b"\0", body[:-1]):
        with pytest.raises(CiphertextError, match="body is|frame declares"):
            setup.spec.sanitize(rebuilt(setup, bad), setup.n_values(0))


def _rle_bomb(total: int, declare: int | None, window_log: int = 16) -> bytes:
    """A zstd frame of ``total`` zero bytes in 4-byte RLE blocks of one window each."""
    out = bytearray(b"\x28\xb5\x2f\xfd")
    window = (window_log - 10) << 3
    if declare is None:
        out += bytes([0x00, window])  # no content size
    else:
        out += bytes([0x80, window]) + struct.pack("<I", declare)  # 4-byte content size
    block = min(1 << 17, 1 << window_log)
    while total > 0:
        n = min(block, total)
        total -= n
        header = (1 if total == 0 else 0) | (1 << 1) | (n << 3)  # last, RLE, size
        out += struct.pack("<I", header)[:3] + b"\x00"
    return bytes(out)


def test_zip_bombs_are_refused_without_inflating(setup: Setup) -> None:
    prefix, _, suffix = split_seal(bytes(setup.vecs[0].chunks[0]), setup.spec)
    allowed = max(setup.spec.body_sizes())
    for total, declare, window_log, match in (
        (2**30, None, 17, "unknown"),  # 1 GiB of zeros, size not declared
        (2**30, 2**30, 17, "frame declares"),  # declared honestly
        (2**30, allowed, 17, "window"),  # declares an allowed size, window too large
        (2**30, allowed, 16, "corrupt"),  # declares an allowed size, holds more
    ):
        frame = _rle_bomb(total, declare, window_log)
        assert len(frame) < 70_000
        bad = SEAL_HEADER.pack(0xA15E, 16, *local_seal_version(), 2, 0, 16 + len(frame)) + frame
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        with pytest.raises(CiphertextError, match=match):
            setup.spec.sanitize(join_seal(prefix, bad, suffix, setup.spec), setup.n_values(0))
        assert time.perf_counter() - t < 1.0
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB


def test_zero_body_with_an_allowed_size_is_refused(setup: Setup) -> None:
    size = min(setup.spec.body_sizes())
    with pytest.raises(CiphertextError, match="parms_id"):
        setup.spec.sanitize(rebuilt(setup, bytes(size)), setup.n_values(0))


def test_tenseal_wrapper_is_parsed_strictly() -> None:
    for name in ("ckks", "bfv"):
        s = Setup(name)
        chunk = bytes(s.vecs[0].chunks[0])
        k = s.n_values(0)
        prefix, inner, _ = split_seal(chunk, s.spec)
        cases = [
            (b"\x08" + chunk[1:], "protobuf key"),
            (chunk + b"\x18\x01", "after the ciphertext" if name == "ckks" else "unexpected bytes"),
            (chunk[: len(prefix) + 3], "runs past|truncated"),
            (b"\x0a\x01\x01" + chunk[len(prefix) :], "holds 1 values"),
            (b"\x0a\x04\x80\x10\x80\x10" + chunk[len(prefix) :], "more than one chunk size"),
            (b"\x0a\x06\xff\xff\xff\xff\xff\x7f" + chunk[len(prefix) :], "varint"),
        ]
        if name == "ckks":
            cases.append((prefix + b"\x12" + _enc_varint(len(inner)) + inner + b"\x19" + struct.pack("<d", 2.0**33), "scale"))
        for bad, match in cases:
            with pytest.raises(CiphertextError, match=match):
                s.spec.sanitize(bad, k)


# ------------------------------------------------------------------ fuzzing
def _mutants(s: Setup, rng: np.random.Generator, count: int):
    """(kind, chunk index, bytes) mutants of upload 1's chunks, all with valid envelopes."""
    kinds = ["flip", "truncate", "extend", "header", "member", "coeff", "inflated_flip", "proto"]
    for case in range(count):
        kind = kinds[case % len(kinds)]
        ci = int(rng.integers(0, 3))
        chunk = bytes(s.vecs[1].chunks[ci])
        prefix, inner, suffix = split_seal(chunk, s.spec)
        if kind == "flip":
            b = bytearray(chunk)
            for _ in range(int(rng.integers(1, 9))):
                pos = int(rng.integers(0, len(b)))
                b[pos] ^= 1 << int(rng.integers(0, 8))
            out = bytes(b)
        elif kind == "truncate":
            out = chunk[: int(rng.integers(0, len(chunk)))]
        elif kind == "extend":
            out = chunk + rng.bytes(int(rng.integers(1, 200)))
        elif kind == "header":
            b = bytearray(inner)
            pos = int(rng.integers(0, 16))
            b[pos] = (b[pos] + int(rng.integers(1, 256))) % 256
            out = join_seal(prefix, bytes(b), suffix, s.spec)
        elif kind == "proto" and s.spec.wrapper == "tenseal":
            b = bytearray(chunk)
            for _ in range(int(rng.integers(1, 4))):
                pos = int(rng.integers(0, len(prefix) + 4)) if rng.random() < 0.7 else len(b) - 1 - int(rng.integers(0, 9))
                b[pos] = int(rng.integers(0, 256))
            out = bytes(b)
        else:
            sanitized = s.spec.sanitize(chunk, s.n_values(ci))
            _, full, _ = split_seal(sanitized, s.spec)
            body = bytearray(full[16:])
            if kind == "member":
                pos = int(rng.integers(0, CT_MEMBERS.size + 24))
                body[pos] ^= 1 << int(rng.integers(0, 8))
            elif kind == "coeff":
                start = CT_MEMBERS.size + 24
                idx = int(rng.integers(0, s.spec._coeffs(1)))
                q = s.spec.moduli[0]
                struct.pack_into("<Q", body, start + 8 * idx, q + int(rng.integers(0, 2**63 - q)))
            else:  # flips anywhere in the inflated members (coefficients, seed, headers)
                for _ in range(int(rng.integers(1, 4))):
                    pos = int(rng.integers(0, len(body)))
                    body[pos] ^= 1 << int(rng.integers(0, 8))
            compr = 2 if rng.random() < 0.5 else 0
            out = join_seal(prefix, seal_bytes(bytes(body), compr), suffix, s.spec)
        if out == chunk:
            continue
        yield kind, ci, out


#: Mutants no valid ciphertext can be: a changed length, header byte, member or nested-header
#: bit, or a coefficient >= q. (Bit flips elsewhere may give a valid ciphertext: zstd frames
#: carry no checksum and any coefficient below q is legal; those are accepted and counted.)
MUST_REJECT = {"truncate", "extend", "header", "member", "coeff"}


def _fuzz(s: Setup, cases: int, seed: int, workers: int = 1) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    acc = Accumulator(s.public, workers=workers)
    reference = Accumulator(s.public)
    acc.add(s.blobs[0])
    reference.add(s.blobs[0])
    seen = {"rejected": 0, "accepted": 0}
    by_kind: dict[str, list[int]] = {}
    worst = 0.0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for kind, ci, data in _mutants(s, rng, cases):
        blob = s.with_chunk(1, ci, data)
        t = time.perf_counter()
        try:
            acc.add(blob)
        except CiphertextError as exc:
            assert str(exc)  # a message that names something
            seen["rejected"] += 1
            by_kind.setdefault(kind, [0, 0])[0] += 1
        else:
            assert kind not in MUST_REJECT, f"{kind} mutant of chunk {ci} was accepted"
            reference.add(blob)  # structurally valid (a key holder could make it): counted
            seen["accepted"] += 1
            by_kind.setdefault(kind, [0, 0])[1] += 1
        worst = max(worst, time.perf_counter() - t)
    acc.add(s.blobs[2])
    reference.add(s.blobs[2])
    assert acc.to_bytes() == reference.to_bytes()  # rejected uploads left no trace
    assert acc.count == reference.count == 2 + seen["accepted"]
    assert worst < 2.0  # no case hangs
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 256 * 1024  # KiB
    if workers > 1:
        s.public.close()
    assert set(by_kind) >= MUST_REJECT
    return seen


def test_fuzz_inner_payload(setup: Setup) -> None:
    """~1200 mutants per preset (3600 in all) in a few seconds."""
    seen = _fuzz(setup, 1200, seed=19)
    assert seen["rejected"] > 0.7 * 1200


def test_fuzz_with_worker_processes(compact: Setup) -> None:
    seen = _fuzz(compact, 300, seed=7, workers=2)
    assert seen["rejected"] > 0.7 * 300


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_inner_payload_long(setup: Setup, seed: int) -> None:
    seen = _fuzz(setup, 10_000, seed=seed)
    assert seen["rejected"] > 0.7 * 10_000


def test_rejected_upload_leaves_the_decrypted_sum_exact(setup: Setup) -> None:
    """An HE round with one crafted upload: the others aggregate exactly."""
    _, body, _ = inflated_body(setup, 1)
    b = bytearray(body)
    struct.pack_into("<Q", b, CT_MEMBERS.size + 24, setup.spec.moduli[0])
    bad = setup.with_chunk(1, 1, rebuilt(setup, bytes(b), chunk_index=1))
    acc, ref = Accumulator(setup.public), Accumulator(setup.public)
    acc.add(setup.blobs[0])
    with pytest.raises(CiphertextError, match="chunk 1: .*not below its modulus"):
        acc.add(bad)
    acc.add(setup.blobs[2])
    ref.add(setup.blobs[0])
    ref.add(setup.blobs[2])
    assert acc.to_bytes() == ref.to_bytes()
    np.testing.assert_allclose(
        setup.secret.decrypt(acc.to_bytes()), setup.xs[0] + setup.xs[2], atol=1e-5
    )


# ------------------------------------------------------------------ parallel server sum
def test_parallel_sum_is_byte_identical_and_rolls_back(setup: Setup) -> None:
    serial = Accumulator(setup.public)
    par = Accumulator(setup.public, workers=3)  # one chunk per worker
    _, body, _ = inflated_body(setup, 2)
    b = bytearray(body)
    b[0] ^= 1  # parms_id: chunk 2 (the last worker's) fails after chunks 0 and 1 were added
    late_bad = setup.with_chunk(1, 2, rebuilt(setup, bytes(b), chunk_index=2))
    v = setup.vecs[1]
    chunks = [bytes(c) for c in v.chunks]
    crc_bad = bytearray(EncryptedVector(v.fingerprint, v.wire_id, v.length, tuple(chunks), 1).to_bytes())
    crc_bad[-5] ^= 0xFF  # last chunk's CRC no longer matches
    try:
        for blob in setup.blobs:
            serial.add(blob)
        par.add(setup.blobs[0])
        with pytest.raises(CiphertextError, match="chunk 2: .*parms_id"):
            par.add(late_bad)
        with pytest.raises(CiphertextError, match="^chunk 2 checksum mismatch"):  # as the serial path words it
            par.add(bytes(crc_bad))
        par.add(setup.blobs[1])
        par.add(setup.blobs[2])
        assert par.count == serial.count == 3
        assert par.to_bytes() == serial.to_bytes()
        # the next round's accumulator reuses the processes and claims the pool
        pool = setup.public.sum_pool(3)
        nxt = Accumulator(setup.public, workers=3)
        nxt.add(setup.blobs[2])
        assert setup.public.sum_pool(3) is pool
        with pytest.raises(RuntimeError, match="newer"):
            par.add(setup.blobs[0])
        one = Accumulator(setup.public)
        one.add(setup.blobs[2])
        assert nxt.to_bytes() == one.to_bytes()
        nxt.reset()
        nxt.add(setup.blobs[0])
        one.reset()
        one.add(setup.blobs[0])
        assert nxt.to_bytes() == one.to_bytes()
    finally:
        setup.public.close()
    assert setup.public._sum_pool is None


def test_parallel_first_upload_rejected_then_accepted(compact: Setup) -> None:
    _, body, _ = inflated_body(compact, 1)
    b = bytearray(body)
    struct.pack_into("<Q", b, CT_MEMBERS.size + 24, 2**64 - 1)
    bad = compact.with_chunk(1, 1, rebuilt(compact, bytes(b), chunk_index=1))
    par = Accumulator(compact.public, workers=2)
    try:
        with pytest.raises(CiphertextError, match="not below its modulus"):
            par.add(bad)
        assert par.count == 0 and par.length is None
        par.add(compact.blobs[0])
        ref = Accumulator(compact.public)
        ref.add(compact.blobs[0])
        assert par.to_bytes() == ref.to_bytes()
    finally:
        compact.public.close()


def test_serial_default_starts_no_processes(compact: Setup) -> None:
    acc = Accumulator(compact.public)
    for blob in compact.blobs:
        acc.add(blob)
    assert compact.public._sum_pool is None
    with pytest.raises(ValueError, match="workers"):
        Accumulator(compact.public, workers=0)
    with pytest.raises(ValueError, match="workers"):
        Accumulator(compact.public, workers=True)


def test_pool_scratch_file_is_private_and_removed(compact: Setup) -> None:
    import os
    import stat as st

    pool = compact.public.sum_pool(2)
    acc = Accumulator(compact.public, workers=2)
    acc.add(compact.blobs[0])
    path = pool._path
    assert st.S_IMODE(os.stat(path).st_mode) == 0o600
    assert st.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    compact.public.close()
    assert not os.path.exists(os.path.dirname(path))
    assert not pool.alive
    with pytest.raises(RuntimeError):
        acc.to_bytes()


def test_public_context_round_trip_keeps_working(compact: Setup) -> None:
    """A public context rebuilt from bytes (what a server loads) feeds a pool too."""
    public = PublicContext.from_bytes(compact.public.to_bytes())
    acc = Accumulator(public, workers=2)
    try:
        for blob in compact.blobs:
            acc.add(blob)
        np.testing.assert_allclose(compact.secret.decrypt(acc.to_bytes()), sum(compact.xs), atol=1e-5)
    finally:
        public.close()
