"""Ciphertext envelope and server accumulator: bad blobs are refused and change nothing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from flower_focal.crypto import (
    PRESETS,
    Accumulator,
    CiphertextError,
    EncryptedVector,
    PublicContext,
    SecretContext,
    keygen,
)


class Setup:
    def __init__(self, keydir: Path) -> None:
        self.secret = SecretContext.load(keydir)
        self.public = PublicContext.load(keydir)
        self.length = 2 * self.secret.preset.values_per_chunk + 5  # 3 chunks, last one partial
        rng = np.random.default_rng(0)
        self.x = rng.uniform(-0.1, 0.1, self.length)
        self.good = self.secret.encrypt(self.x).to_bytes()

    def accumulator(self) -> Accumulator:
        acc = Accumulator(self.public)
        acc.add(self.good)
        acc.add(self.secret.encrypt(self.x).to_bytes())
        return acc


@pytest.fixture(scope="module", params=sorted(PRESETS))
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(keygen(tmp_path_factory.mktemp(f"env-{request.param}"), request.param))


def _assert_refused(acc: Accumulator, blob: object, match: str | None = None) -> None:
    """``add`` raises CiphertextError and the running sum is bit-for-bit unchanged."""
    before, count, summands = acc.to_bytes(), acc.count, acc.summands
    with pytest.raises(CiphertextError, match=match):
        acc.add(blob)  # type: ignore[arg-type]
    assert acc.to_bytes() == before
    assert (acc.count, acc.summands) == (count, summands)


def _header_size(blob: bytes) -> int:
    n_chunks = int.from_bytes(blob[36:40], "little")
    return 44 + 8 * n_chunks


def test_envelope_round_trip(setup: Setup) -> None:
    vec = EncryptedVector.from_bytes(setup.good, setup.secret.fingerprint, setup.secret.preset)
    assert vec.length == setup.length and len(vec.chunks) == 3 and vec.summands == 1
    assert vec.to_bytes() == setup.good and vec.nbytes == len(setup.good)
    assert "chunks" not in repr(vec)  # no megabytes of ciphertext in logs


def test_chunks_of_bytes_are_views_and_of_a_mutable_buffer_are_copies(setup: Setup) -> None:
    fp, preset = setup.secret.fingerprint, setup.secret.preset
    viewed = EncryptedVector.from_bytes(setup.good, fp, preset)
    assert all(isinstance(c, memoryview) and c.obj is setup.good for c in viewed.chunks)
    buf = bytearray(setup.good)
    copied = EncryptedVector.from_bytes(buf, fp, preset)
    buf[-1] ^= 0xFF  # a later write to the caller's buffer must not reach checked chunks
    assert all(isinstance(c, bytes) for c in copied.chunks)
    assert copied.to_bytes() == viewed.to_bytes() == setup.good
    np.testing.assert_allclose(setup.secret.decrypt(viewed), setup.x, atol=1e-6)
    acc = Accumulator(setup.public)
    acc.add(setup.good)  # the server's add loads memoryview chunks
    acc.add(setup.good)
    np.testing.assert_allclose(setup.secret.decrypt(acc.to_bytes()), 2 * setup.x, atol=1e-6)


def test_malformed_blobs_refused_and_sum_unchanged(setup: Setup) -> None:
    acc, good = setup.accumulator(), setup.good
    _assert_refused(acc, b"", "empty")
    _assert_refused(acc, good[:10], "truncated")
    _assert_refused(acc, good[: _header_size(good) - 1], "truncated")
    _assert_refused(acc, good[:-1], "truncated")
    _assert_refused(acc, good[: len(good) // 2], "truncated")
    _assert_refused(acc, good + b"\x00", "trailing")
    _assert_refused(acc, os.urandom(5000), "magic")
    _assert_refused(acc, b"FFHE" + os.urandom(5000))
    _assert_refused(acc, "not bytes", "expected bytes")


def test_every_flipped_header_byte_is_caught(setup: Setup) -> None:
    acc, good = setup.accumulator(), setup.good
    for i in range(_header_size(good)):
        bad = bytearray(good)
        bad[i] ^= 0x01
        _assert_refused(acc, bytes(bad))


def test_flipped_payload_bytes_are_caught(setup: Setup) -> None:
    acc, good = setup.accumulator(), setup.good
    start = _header_size(good)
    for i in (start, start + 100, (start + len(good)) // 2, len(good) - 1):
        bad = bytearray(good)
        bad[i] ^= 0x80
        _assert_refused(acc, bytes(bad), "checksum")


def test_wrong_preset_and_wrong_key_refused(setup: Setup, tmp_path: Path) -> None:
    acc = setup.accumulator()
    other_name = "ckks" if setup.secret.preset.name != "ckks" else "compact"
    other = SecretContext.load(keygen(tmp_path / "p", other_name))
    _assert_refused(acc, other.encrypt(setup.x).to_bytes(), f"made with HE preset '{other_name}'")
    vec = EncryptedVector.from_bytes(setup.good, setup.secret.fingerprint)
    other_id = PRESETS[other_name].wire_id
    relabelled = EncryptedVector(vec.fingerprint, other_id, vec.length, vec.chunks)
    _assert_refused(acc, relabelled.to_bytes(), "HE preset")
    same_preset = SecretContext.load(keygen(tmp_path / "k", setup.secret.preset.name))
    _assert_refused(acc, same_preset.encrypt(setup.x).to_bytes(), "different key set")


def test_length_mismatch_refused(setup: Setup) -> None:
    acc = setup.accumulator()
    shorter = setup.secret.encrypt(setup.x[:-1]).to_bytes()
    _assert_refused(acc, shorter, "values but the running sum")
    _assert_refused(acc, setup.secret.encrypt(np.ones(1)).to_bytes(), "running sum")
    vec = EncryptedVector.from_bytes(setup.good, setup.secret.fingerprint)
    lying = EncryptedVector(vec.fingerprint, vec.wire_id, 1, vec.chunks)  # 1 value, 3 chunks
    _assert_refused(acc, lying.to_bytes(), "need 1 chunks")


@pytest.mark.parametrize("bad_chunk", [0, 1, 2])
def test_seal_rejects_chunk_mid_add_rolls_back(setup: Setup, bad_chunk: int) -> None:
    """Envelope checks pass (checksums recomputed) but SEAL refuses chunk k: sum restored."""
    acc = setup.accumulator()
    vec = EncryptedVector.from_bytes(setup.good, setup.secret.fingerprint)
    chunks = list(vec.chunks)
    chunks[bad_chunk] = os.urandom(len(chunks[bad_chunk]))
    forged = EncryptedVector(vec.fingerprint, vec.wire_id, vec.length, tuple(chunks))
    _assert_refused(acc, forged.to_bytes(), f"chunk {bad_chunk}")
    # a full chunk where the 5-value tail belongs (TenSEAL: size check; SEAL: loads fine)
    full_tail = (vec.chunks[0], vec.chunks[1], vec.chunks[0])
    swapped = EncryptedVector(vec.fingerprint, vec.wire_id, vec.length, full_tail)
    if setup.secret.preset.backend.startswith("tenseal-"):
        _assert_refused(acc, swapped.to_bytes(), "chunk 2")
    # and the accumulator still works afterwards
    acc.add(setup.good)
    assert np.allclose(setup.secret.decrypt(acc.to_bytes()), 3 * setup.x, atol=1e-6)


def test_bad_first_blob_leaves_accumulator_empty(setup: Setup) -> None:
    acc = Accumulator(setup.public)
    vec = EncryptedVector.from_bytes(setup.good, setup.secret.fingerprint)
    bad_tail = (*vec.chunks[:2], b"\x00" * 64)
    forged = EncryptedVector(vec.fingerprint, vec.wire_id, vec.length, bad_tail)
    with pytest.raises(CiphertextError):
        acc.add(forged.to_bytes())
    assert acc.count == 0 and acc.length is None
    with pytest.raises(ValueError, match="empty"):
        acc.to_bytes()


def test_header_errors_never_reach_seal(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    acc = setup.accumulator()

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a malformed blob reached the SEAL/TenSEAL loader")

    monkeypatch.setattr(acc._backend, "load", boom)
    bad_header = bytearray(setup.good)
    bad_header[30] ^= 0xFF
    bad_payload = bytearray(setup.good)
    bad_payload[-3] ^= 0xFF
    for blob in (b"", setup.good[:-7], bytes(bad_header), bytes(bad_payload), os.urandom(999)):
        with pytest.raises(CiphertextError):
            acc.add(blob)


def test_decrypt_refuses_bad_blobs(setup: Setup) -> None:
    for blob in (b"", setup.good[:-1], os.urandom(100)):
        with pytest.raises(CiphertextError):
            setup.secret.decrypt(blob)
