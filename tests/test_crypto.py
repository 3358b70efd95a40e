"""HE-FedAvg crypto: key files, server-side key-lessness, and the encrypt/aggregate/decrypt loop."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import numpy as np
import pytest

from flower_focal.crypto import (
    PRESETS,
    Accumulator,
    CiphertextError,
    EncryptedVector,
    HEPreset,
    PublicContext,
    SecretContext,
    fingerprint,
    keygen,
    read_manifest,
)
from flower_focal.crypto import _scratch
from flower_focal.crypto._scratch import scratch_base
from flower_focal.crypto.keys import _KIND_PUBLIC, _KeyFile

N_INSTITUTIONS = 10


@pytest.fixture(scope="module", params=sorted(PRESETS))
def keydir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return keygen(tmp_path_factory.mktemp(f"keys-{request.param}"), request.param)


@pytest.fixture(scope="module")
def ctxs(keydir: Path) -> tuple[SecretContext, PublicContext]:
    return SecretContext.load(keydir), PublicContext.load(keydir)


def _weighted_updates(length: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Client i's ``w_i * x_i`` with ``x_i = base + noise_i`` (|x| <= 1), and the float64 sum.

    ``base[0] = 0.9`` gives every model (even a 1-value one) a weight of typical magnitude, so
    the relative error ``max|dec - true| / max|true|`` is not dominated by a near-zero sum.
    """
    rng = np.random.default_rng(seed)
    n = rng.uniform(100, 5000, N_INSTITUTIONS)
    w = n / n.sum()
    base = rng.uniform(-0.9, 0.9, length)
    base[0] = 0.9
    updates = [wi * (base + rng.uniform(-0.1, 0.1, length)) for wi in w]
    return updates, np.sum(updates, axis=0)


def _rel_err(dec: np.ndarray, true: np.ndarray) -> float:
    return float(np.abs(dec - true).max() / np.abs(true).max())


# ---------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("delta", [None, -1, 0, 1, 100_003])
def test_round_trip_weighted_sum(
    ctxs: tuple[SecretContext, PublicContext], delta: int | None
) -> None:
    secret, public = ctxs
    k = secret.preset.values_per_chunk
    length = 1 if delta is None else (delta if delta > 1000 else k + delta)
    updates, true = _weighted_updates(length, seed=length)

    acc = Accumulator(public)
    for u in updates:
        acc.add(secret.encrypt(u).to_bytes())
    assert acc.count == N_INSTITUTIONS and acc.summands == N_INSTITUTIONS and acc.length == length

    blob = acc.to_bytes()
    dec = secret.decrypt(blob)
    assert dec.dtype == np.float64 and dec.shape == (length,)
    assert _rel_err(dec, true) <= 1e-6
    assert EncryptedVector.from_bytes(blob, secret.fingerprint).summands == N_INSTITUTIONS
    if secret.preset.scheme == "bfv":  # exact: the sum of the quantised inputs, bit for bit
        f = secret.preset.scale
        assert np.array_equal(dec * f, np.sum([np.rint(u * f) for u in updates], axis=0))


def test_bytes_per_parameter(ctxs: tuple[SecretContext, PublicContext], record_property) -> None:
    secret, public = ctxs
    length = 100_003
    updates, _ = _weighted_updates(length, seed=1)
    up = secret.encrypt(updates[0]).to_bytes()
    acc = Accumulator(public)
    acc.add(up)
    acc.add(secret.encrypt(updates[1]).to_bytes())
    down = acc.to_bytes()
    up_bpp, down_bpp = len(up) / length, len(down) / length
    record_property("upload_bytes_per_param", round(up_bpp, 3))
    record_property("download_bytes_per_param", round(down_bpp, 3))
    print(f"{secret.preset.name}: upload {up_bpp:.2f} B/param, download {down_bpp:.2f} B/param")
    limits = {  # (upload, download) upper bounds in bytes per parameter
        "compact": (8.0, 15.5),
        "ckks": (30.0, 30.0),
        "bfv": (15.0, 15.0),
        "nvflare": (60.0, 60.0),
    }
    up_max, down_max = limits[secret.preset.name]
    assert up_bpp <= up_max and down_bpp <= down_max


def test_sum_of_sums_and_decrypting_an_upload(ctxs: tuple[SecretContext, PublicContext]) -> None:
    secret, public = ctxs
    updates, true = _weighted_updates(3000, seed=7)
    halves = []
    for part in (updates[:5], updates[5:]):
        acc = Accumulator(public)
        for u in part:
            acc.add(secret.encrypt(u).to_bytes())
        halves.append(acc.to_bytes())
    total = Accumulator(public)
    for h in halves:
        total.add(h)
    assert total.count == 2 and total.summands == N_INSTITUTIONS
    assert _rel_err(secret.decrypt(total.result()), true) <= 1e-6
    # an institution can decrypt a single upload (e.g. its own) from the object or the bytes
    vec = secret.encrypt(updates[0])
    assert _rel_err(secret.decrypt(vec), updates[0]) <= 1e-6


# ---------------------------------------------------------------------------- key files
def test_keygen_files(keydir: Path) -> None:
    secret_file, public_file = keydir / "secret.ctx", keydir / "public.ctx"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    manifest = read_manifest(keydir)
    preset = PRESETS[manifest["preset"]]
    assert manifest["params"] == preset.params()
    assert manifest["files"] == {"secret": "secret.ctx", "public": "public.ctx"}
    assert len(bytes.fromhex(manifest["key_id"])) == 16
    assert manifest["fingerprint"] == fingerprint(preset, bytes.fromhex(manifest["key_id"])).hex()
    assert manifest["eval_keys"] == [] and manifest["created"].endswith("+00:00")
    assert set(manifest) == {
        "format", "version", "preset", "params", "key_id", "fingerprint", "created", "files",
        "eval_keys",
    }
    assert not list(keydir.glob(".*.tmp"))  # atomic writes leave nothing behind
    with pytest.raises(FileExistsError):
        keygen(keydir, manifest["preset"])
    assert public_file.stat().st_size < 1024  # parameters only


def _secret_key_bytes(secret: SecretContext, tmp_path: Path) -> bytes:
    backend = secret._backend
    if secret.preset.backend == "seal-ckks":
        return backend.secret_sections()["secret_key"]
    path = tmp_path / "sk.bin"
    backend.ctx.secret_key().data.save(str(path))  # SEAL's own serialization of the key
    return path.read_bytes()


def test_secret_key_never_leaves_secret_ctx(
    keydir: Path, ctxs: tuple[SecretContext, PublicContext], tmp_path: Path
) -> None:
    secret, _ = ctxs
    sk = _secret_key_bytes(secret, tmp_path)
    assert len(sk) > 1000
    probes = [sk[i : i + 32] for i in range(64, len(sk) - 32, max(1, len(sk) // 16))]
    secret_file = (keydir / "secret.ctx").read_bytes()
    assert all(p in secret_file for p in probes)  # the search does find the key where it is
    for name in ("public.ctx", "manifest.json"):
        data = (keydir / name).read_bytes()
        assert not any(p in data for p in probes), f"secret key material found in {name}"
    assert not any(p in secret.public_bytes() for p in probes)


def test_server_context_is_keyless(keydir: Path, ctxs: tuple[SecretContext, PublicContext]) -> None:
    secret, public = ctxs
    assert public.fingerprint == secret.fingerprint
    assert not public.holds_secret_key and public.eval_keys == ()
    assert not hasattr(public, "decrypt") and not hasattr(public, "encrypt")
    backend = public._backend
    if public.preset.backend.startswith("tenseal-"):
        assert not backend.ctx.is_private() and not backend.ctx.has_secret_key()
    else:
        assert backend._secret_key is None and not hasattr(backend, "_decryptor")
    # the underlying object cannot decrypt an aggregate either
    acc = Accumulator(public)
    acc.add(secret.encrypt(np.ones(5)).to_bytes())
    chunk = acc.result().chunks[0]
    with backend.io() as io, pytest.raises(ValueError, match="secret"):
        backend.decrypt_chunk(backend.load(chunk, 5, io), 5)
    with pytest.raises(ValueError, match="secret key"):
        backend.encrypt(np.ones(5))


def test_loading_a_secret_context_as_public_raises(
    keydir: Path, ctxs: tuple[SecretContext, PublicContext]
) -> None:
    secret, _ = ctxs
    with pytest.raises(ValueError, match="holds a secret key.*must be given the public context"):
        PublicContext.load(keydir / "secret.ctx")
    with pytest.raises(ValueError, match="holds a secret key"):
        PublicContext.from_bytes(secret.to_bytes())
    # relabelled as "public" but still carrying the secret sections
    forged = _KeyFile(_KIND_PUBLIC, secret.preset, secret.key_id, secret._backend.secret_sections())
    with pytest.raises(ValueError, match="holds a secret key"):
        PublicContext.from_bytes(forged.to_bytes())
    with pytest.raises(ValueError, match="holds no secret key"):
        SecretContext.load(keydir / "public.ctx")
    with pytest.raises(ValueError, match="PublicContext"):
        Accumulator(secret)  # type: ignore[arg-type]


def test_corrupt_key_files_refused(keydir: Path) -> None:
    data = bytearray((keydir / "public.ctx").read_bytes())
    with pytest.raises(ValueError, match="checksum"):
        PublicContext.from_bytes(bytes(data[:-10]))
    data[20] ^= 0xFF
    with pytest.raises(ValueError, match="not a valid flower-focal key file"):
        PublicContext.from_bytes(bytes(data))
    with pytest.raises(ValueError, match="magic"):
        PublicContext.from_bytes(b"X" * 100)


def test_fingerprints_and_manifest_mismatch(tmp_path: Path) -> None:
    a, b = keygen(tmp_path / "a"), keygen(tmp_path / "b")
    sa, pa, sb = SecretContext.load(a), PublicContext.load(a), SecretContext.load(b)
    assert sa.fingerprint == pa.fingerprint != sb.fingerprint
    assert sa.preset.name == "compact"
    (tmp_path / "a" / "public.ctx").write_bytes((b / "public.ctx").read_bytes())
    with pytest.raises(ValueError, match="two keygens"):
        PublicContext.load(a)
    keygen(a, "compact", overwrite=True)
    assert SecretContext.load(a).fingerprint != sa.fingerprint


def test_wrong_key_rejected(ctxs: tuple[SecretContext, PublicContext], tmp_path: Path) -> None:
    secret, public = ctxs
    other = SecretContext.load(keygen(tmp_path, secret.preset.name))
    blob = other.encrypt(np.ones(10)).to_bytes()
    with pytest.raises(CiphertextError, match="different key set"):
        Accumulator(public).add(blob)
    with pytest.raises(CiphertextError, match="different key set"):
        secret.decrypt(blob)


def test_encrypt_input_validation(ctxs: tuple[SecretContext, PublicContext]) -> None:
    secret, _ = ctxs
    for bad in (np.array([1.0, np.nan]), np.array([np.inf]), np.array([0.0, -np.inf])):
        with pytest.raises(ValueError, match="NaN/Inf"):
            secret.encrypt(bad)
    with pytest.raises(ValueError, match="1-D"):
        secret.encrypt(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="empty"):
        secret.encrypt(np.zeros(0))
    with pytest.raises(ValueError, match="dtype"):
        secret.encrypt(np.array([1 + 1j]))
    with pytest.raises(ValueError, match="exceeds"):
        secret.encrypt(np.array([secret.preset.max_abs_value * 1.01]))
    for workers in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers"):
            secret.encrypt(np.ones(3), workers=workers)  # type: ignore[arg-type]


def test_values_at_the_documented_bound_survive(ctxs: tuple[SecretContext, PublicContext]) -> None:
    secret, public = ctxs
    bound = secret.preset.max_abs_value
    x = np.array([bound, -bound, 0.5 * bound, 1.0, -1e-3] * 7)
    acc = Accumulator(public)
    acc.add(secret.encrypt(0.5 * x).to_bytes())
    acc.add(secret.encrypt(0.5 * x).to_bytes())
    assert _rel_err(secret.decrypt(acc.to_bytes()), x) <= 1e-6


def test_bfv_sums_of_1000_uploads_at_its_range_are_exact() -> None:
    """BFV's noise margin (MIN_BFV_NOISE_BITS over the plain modulus) holds for 1000 summands.

    Past the margin, BFV decrypts to wrong integers without any error (measured: 9 bits of
    margin already fail at 1000 uploads).
    """
    secret = SecretContext.generate("bfv")
    public = secret.public_context()
    bound, f, k = secret.preset.max_abs_value, secret.preset.scale, secret.preset.values_per_chunk
    rng = np.random.default_rng(5)
    pattern = rng.uniform(-1.0, 1.0, k)
    acc, expected = Accumulator(public), np.zeros(k)
    for i in range(1000):
        u = (bound / 1000) * np.roll(pattern, i % 3)  # different uploads ...
        u[:2] = (bound / 1000, -bound / 1000)  # ... whose sum reaches +-bound
        expected += np.rint(u * f)
        acc.add(secret.encrypt(u).to_bytes())
    dec = secret.decrypt(acc.to_bytes())
    assert np.abs(dec).max() >= 0.99 * bound
    assert np.array_equal(dec * f, expected)


def test_scratch_files_are_cleaned_up(
    ctxs: tuple[SecretContext, PublicContext], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert scratch_base() in ("/dev/shm", None)  # RAM-backed when available
    calls: list[int] = []
    monkeypatch.setattr(_scratch, "scratch_base", lambda: calls.append(1) or str(tmp_path))
    secret, public = ctxs
    acc = Accumulator(public)
    acc.add(secret.encrypt(np.ones(5000)).to_bytes())
    secret.decrypt(acc.to_bytes())
    secret.public_bytes()
    secret.to_bytes()
    with pytest.raises(CiphertextError):
        acc.add(b"garbage")
    vec = EncryptedVector.from_bytes(acc.to_bytes(), secret.fingerprint)
    bad_first = (b"\x01" * 99, vec.chunks[1])
    forged = EncryptedVector(vec.fingerprint, vec.wire_id, vec.length, bad_first)
    with pytest.raises(CiphertextError):
        acc.add(forged.to_bytes())  # fails inside SEAL/TenSEAL
    assert list(tmp_path.iterdir()) == []
    assert calls or not secret.preset.backend.startswith("seal")  # SEAL path did use it


def test_one_scratch_file_serves_objects_of_any_size_in_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reused scratch file never hands SEAL or the caller bytes of an earlier object."""
    monkeypatch.setattr(_scratch, "scratch_base", lambda: str(tmp_path))
    secret = SecretContext.generate("compact")
    backend = secret._backend
    small = secret.encrypt(np.full(10, 0.25))  # seeded upload: about half a sum chunk
    acc = Accumulator(secret.public_context())
    acc.add(small.to_bytes())
    acc.add(small.to_bytes())
    big = acc.result()  # an unseeded sum: the larger object
    assert len(big.chunks[0]) > len(small.chunks[0])
    with _scratch.scratch() as io:
        loaded_big = backend.load(big.chunks[0], 10, io)
        loaded_small = backend.load(small.chunks[0], 10, io)  # shorter bytes after longer ones
        (block,) = tmp_path.iterdir()
        # SEAL is handed the checked, inflated bytes (crypto.intake), not the wire bytes
        fed_small = backend.intake.sanitize(small.chunks[0], 10)
        assert len(fed_small) < len(backend.intake.sanitize(big.chunks[0], 10))
        assert (block / "obj").stat().st_size == len(fed_small)  # the longer one's tail is cut
        np.testing.assert_allclose(backend.decrypt_chunk(loaded_small, 10), 0.25, atol=1e-6)
        np.testing.assert_allclose(backend.decrypt_chunk(loaded_big, 10), 0.5, atol=1e-6)
        assert backend.dump(loaded_big, io) == big.chunks[0]  # dump after dump: exact bytes
        with _scratch.scratch() as fresh:
            parms_bytes = fresh.dump(backend._parms)
        assert io.dump(backend._parms) == parms_bytes  # a small object after a big one
        (_block_dir,) = tmp_path.iterdir()  # one private directory while the block runs
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="closed"):
        io.dump(loaded_small)


# ---------------------------------------------------------------------------- parallel
def test_parallel_encryption_matches_serial(tmp_path: Path) -> None:
    with SecretContext.load(keygen(tmp_path, "compact")) as secret:
        x = np.random.default_rng(3).uniform(-1, 1, 5 * secret.preset.values_per_chunk + 17)
        vec = secret.encrypt(x, workers=2)
        assert len(vec.chunks) == 6 and vec.length == x.size
        assert _rel_err(secret.decrypt(vec), x) <= 1e-6
        assert secret._pool is not None
    assert secret._pool is None  # closed by the with block


# ---------------------------------------------------------------------------- extension
def test_preset_with_eval_keys_ships_only_those_keys(tmp_path: Path) -> None:
    """A FOCAL-style preset: the server gets relin keys, still no secret key."""
    focal_like = HEPreset(
        name="test-relin",
        backend="tenseal-ckks",
        wire_id=250,
        poly_modulus_degree=4096,
        coeff_mod_bit_sizes=(40, 20, 40),
        scale_bits=20,
        eval_keys=("relin",),
    )
    d = keygen(tmp_path, focal_like)
    public = PublicContext.load(d)
    assert public.eval_keys == ("relin",) and not public.holds_secret_key
    assert public._backend.ctx.has_relin_keys() and not public._backend.ctx.has_galois_keys()
    assert read_manifest(d)["eval_keys"] == ["relin"]
    # the additive presets' public context must not carry keys it does not need
    no_keys = dataclasses.replace(focal_like, eval_keys=())
    with pytest.raises(ValueError, match="needs exactly"):
        sections = public._backend.public_sections()
        relabelled = _KeyFile(_KIND_PUBLIC, no_keys, public.key_id, sections)
        PublicContext.from_bytes(relabelled.to_bytes())
