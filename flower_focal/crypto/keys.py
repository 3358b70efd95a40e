"""Key generation and the two context types: institutions' secret one, the server's public one.

This module owns the key files and who may hold what:

* :func:`keygen` writes ``secret.ctx`` (all institutions; holds the shared secret key, mode
  0600), ``public.ctx`` (the server; parameters plus only the evaluation keys the preset
  lists — none for the additive presets) and ``manifest.json`` (preset, key id, fingerprint,
  timestamp, file names; no key material). Every file is written atomically.
* :class:`SecretContext` encrypts and decrypts. Institutions must distribute ``secret.ctx``
  out of band (never through the Flower run config or the server).
* :class:`PublicContext` is what the server loads. It refuses a context that holds a secret
  key and has no decrypt method.

Both sides compute the same :func:`fingerprint` (first 16 bytes of
``sha256(canonical preset parameters || key id)``); every ciphertext carries it, so blobs made
under another keygen are rejected before they reach SEAL.

Key file layout (little-endian)::

    b"FFHK" | u8 version=1 | u8 kind (1 secret, 2 public) | u32 n | n bytes JSON
    {"preset": {...}, "key_id": hex} | u16 sections | per section: u8 len, name, u64 len,
    bytes | u32 CRC-32 of everything before it
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import secrets
import stat
import struct
import warnings
import weakref
import zlib
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from flower_focal.crypto import _parallel
from flower_focal.crypto._sumpool import SumPool
from flower_focal.crypto.backends import SECRET_SECTION_NAMES, Backend, backend_for
from flower_focal.crypto.envelope import EncryptedVector, make_vector
from flower_focal.crypto.params import DEFAULT_PRESET, HEPreset, get_preset

SECRET_FILE = "secret.ctx"
PUBLIC_FILE = "public.ctx"
MANIFEST_FILE = "manifest.json"
KEY_ID_BYTES = 16

_MAGIC = b"FFHK"
_VERSION = 1
_KIND_SECRET, _KIND_PUBLIC = 1, 2
_HEAD = struct.Struct("<4sBBI")


def fingerprint(preset: HEPreset, key_id: bytes) -> bytes:
    """First 16 bytes of ``sha256(preset.canonical_bytes() || key_id)``."""
    return hashlib.sha256(preset.canonical_bytes() + key_id).digest()[:16]


# ----------------------------------------------------------------------------- key files
@dataclass(frozen=True)
class _KeyFile:
    kind: int
    preset: HEPreset
    key_id: bytes
    sections: dict[str, bytes]

    def to_bytes(self) -> bytes:
        meta = json.dumps(
            {"preset": self.preset.params(), "key_id": self.key_id.hex()}, sort_keys=True
        ).encode()
        out = bytearray(_HEAD.pack(_MAGIC, _VERSION, self.kind, len(meta)))
        out += meta
        out += struct.pack("<H", len(self.sections))
        for name, data in sorted(self.sections.items()):
            raw = name.encode()
            out += struct.pack("<B", len(raw)) + raw + struct.pack("<Q", len(data)) + data
        out += struct.pack("<I", zlib.crc32(out))
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> _KeyFile:
        def bad(why: str) -> ValueError:
            return ValueError(f"{source} is not a valid flower-focal key file: {why}")

        if len(data) < _HEAD.size + 6:
            raise bad("too short")
        magic, version, kind, meta_len = _HEAD.unpack_from(data)
        if magic != _MAGIC:
            raise bad("bad magic bytes")
        if version != _VERSION or kind not in (_KIND_SECRET, _KIND_PUBLIC):
            raise bad(f"unsupported version {version} / kind {kind}")
        if zlib.crc32(data[:-4]) != struct.unpack_from("<I", data, len(data) - 4)[0]:
            raise bad("checksum mismatch (truncated or corrupted)")
        try:
            pos = _HEAD.size
            meta = json.loads(data[pos : pos + meta_len])
            pos += meta_len
            (n_sections,) = struct.unpack_from("<H", data, pos)
            pos += 2
            sections: dict[str, bytes] = {}
            for _ in range(n_sections):
                (name_len,) = struct.unpack_from("<B", data, pos)
                name = data[pos + 1 : pos + 1 + name_len].decode()
                pos += 1 + name_len
                (size,) = struct.unpack_from("<Q", data, pos)
                pos += 8
                sections[name] = data[pos : pos + size]
                pos += size
            if pos != len(data) - 4:
                raise bad("section table does not cover the file")
            key_id = bytes.fromhex(meta["key_id"])
            preset = HEPreset.from_params(meta["preset"])
        except (struct.error, ValueError, KeyError, TypeError) as exc:
            raise bad(str(exc)) from exc
        if len(key_id) != KEY_ID_BYTES:
            raise bad("key id must be 128 bits")
        return cls(kind, preset, key_id, sections)


def _resolve(path: str | os.PathLike[str], default_name: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    if not p.is_file():
        raise FileNotFoundError(f"no key file at {p}")
    return p


def _check_manifest(key_file: Path, fp: bytes) -> None:
    manifest = key_file.parent / MANIFEST_FILE
    if not manifest.is_file():
        return
    try:
        recorded = json.loads(manifest.read_text())["fingerprint"]
    except (ValueError, KeyError, TypeError):
        return  # an unreadable manifest is informational only; the key file is authoritative
    if recorded != fp.hex():
        raise ValueError(
            f"{key_file} (fingerprint {fp.hex()}) does not belong to the keys described by "
            f"{manifest} (fingerprint {recorded}); keys from two keygens are mixed up"
        )


# ----------------------------------------------------------------------------- contexts
class SecretContext:
    """An institution's context: holds the shared secret key, encrypts and decrypts.

    Build it with :meth:`load` (``secret.ctx`` or its directory) or :meth:`from_bytes`.
    Callers must weight their update *before* :meth:`encrypt` (the server only adds), keep
    every value within ``preset.max_abs_value`` and flatten parameters into one 1-D array.
    ``encrypt(..., workers=k>1)`` keeps a process pool alive; call :meth:`close` (or use the
    context as a ``with`` block) to stop it.
    """

    def __init__(self, preset: HEPreset, key_id: bytes, backend: Backend) -> None:
        if not backend.has_secret_key:
            raise ValueError("SecretContext needs a backend that holds the secret key")
        self.preset = preset
        self.key_id = key_id
        self.fingerprint = fingerprint(preset, key_id)
        self._backend = backend
        self._pool: ProcessPoolExecutor | None = None
        self._pool_workers = 0
        self._finalizer: weakref.finalize | None = None

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def generate(cls, preset: str | HEPreset = DEFAULT_PRESET) -> SecretContext:
        """Fresh keys in memory (prefer :func:`keygen`, which also writes the files)."""
        p = get_preset(preset)
        return cls(p, secrets.token_bytes(KEY_ID_BYTES), backend_for(p).generate(p))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SecretContext:
        """Load ``secret.ctx`` (or the keygen directory holding it).

        Raises
        ------
        ValueError
            Not a key file, corrupted, a public context, or inconsistent with the manifest.
        FileNotFoundError
            No key file there.
        """
        file = _resolve(path, SECRET_FILE)
        ctx = cls.from_bytes(file.read_bytes(), source=str(file))
        mode = file.stat().st_mode
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.warn(
                f"{file} is accessible by group/others (mode {stat.filemode(mode)}); it holds the "
                "shared secret key, chmod 600 it",
                stacklevel=2,
            )
        _check_manifest(file, ctx.fingerprint)
        return ctx

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "secret context bytes") -> SecretContext:
        """Rebuild from :meth:`to_bytes` output (same format as ``secret.ctx``)."""
        kf = _KeyFile.from_bytes(data, source)
        if kf.kind != _KIND_SECRET or not SECRET_SECTION_NAMES & set(kf.sections):
            raise ValueError(
                f"{source} holds no secret key (it is a public/server context); institutions "
                f"need {SECRET_FILE}"
            )
        backend = backend_for(kf.preset).from_sections(kf.preset, kf.sections)
        return cls(kf.preset, kf.key_id, backend)

    def to_bytes(self) -> bytes:
        """The secret key file bytes. Treat like the key itself."""
        sections = self._backend.secret_sections()
        return _KeyFile(_KIND_SECRET, self.preset, self.key_id, sections).to_bytes()

    def public_bytes(self) -> bytes:
        """The server's context (``public.ctx``): parameters + ``preset.eval_keys`` only."""
        sections = self._backend.public_sections()
        if SECRET_SECTION_NAMES & set(sections):  # defensive: a backend bug must not leak keys
            raise RuntimeError("backend put secret material into the public context")
        return _KeyFile(_KIND_PUBLIC, self.preset, self.key_id, sections).to_bytes()

    def public_context(self) -> PublicContext:
        """The matching :class:`PublicContext` (what the server would load)."""
        return PublicContext.from_bytes(self.public_bytes())

    # -- encryption ----------------------------------------------------------------------
    def _validated(self, values: np.ndarray) -> np.ndarray:
        arr = np.asarray(values)
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"values must be a real numeric array, got dtype {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(
                f"values must be 1-D (got shape {arr.shape}); flatten the model first, e.g. "
                "np.concatenate([p.ravel() for p in params])"
            )
        if arr.size == 0:
            raise ValueError("cannot encrypt an empty vector")
        arr = arr.astype(np.float64, copy=False)
        finite = np.isfinite(arr)
        if not finite.all():
            i = int(np.argmin(finite))
            raise ValueError(
                f"values contain NaN/Inf (first at index {i}: {arr[i]}); refusing to encrypt"
            )
        peak = max(float(arr.max()), -float(arr.min()))  # = max|x| (finite); no |x| temporary
        if peak > self.preset.max_abs_value:
            raise ValueError(
                f"max |value| = {peak:.6g} exceeds {self.preset.max_abs_value:g}, the largest "
                f"value preset {self.preset.name!r} can hold without wrapping around; scale the "
                "update down or use a preset with more headroom"
            )
        return arr

    def encrypt(self, values: np.ndarray, workers: int = 1) -> EncryptedVector:
        """Encrypt a flat, already weighted update.

        Parameters
        ----------
        values
            1-D real array, finite, ``|values| <= preset.max_abs_value``.
        workers
            ``1`` encrypts in this process; ``k > 1`` uses a (kept-alive) spawn process pool
            of ``k`` workers, each loading this context once (the first call pays the worker
            start-up, ~0.4 s measured). Scripts must then guard their entry point with
            ``if __name__ == "__main__":``.

        Raises
        ------
        ValueError
            Wrong shape/dtype, empty, NaN/Inf, out of range, or ``workers < 1``.
        """
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        arr = self._validated(values)
        k = self.preset.values_per_chunk
        n_chunks = math.ceil(arr.size / k)
        if workers == 1 or n_chunks < 2:
            chunks = self._backend.encrypt(arr)
        else:
            pool = self._get_pool(workers)
            n_tasks = min(n_chunks, 2 * workers)
            bounds = [k * math.ceil(i * n_chunks / n_tasks) for i in range(n_tasks + 1)]
            slices = [arr[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if a < b]
            try:
                chunks = [c for part in pool.map(_parallel.encrypt_slice, slices) for c in part]
            except BrokenProcessPool as exc:
                self.close()
                raise RuntimeError(
                    "an encryption worker process died; the pool uses 'spawn', so a script that "
                    "calls encrypt(workers>1) must guard its entry point with "
                    "`if __name__ == '__main__':`"
                ) from exc
        return make_vector(self.fingerprint, self.preset, arr.size, chunks)

    def decrypt(self, vector: EncryptedVector | bytes) -> np.ndarray:
        """Decrypt an upload or the server's sum into a flat float64 array.

        Raises
        ------
        CiphertextError
            Another key set or preset, malformed blob, or SEAL rejects a chunk.
        """
        if isinstance(vector, (bytes, bytearray, memoryview)):
            vector = EncryptedVector.from_bytes(vector, self.fingerprint, self.preset)
        else:
            vector.check(self.fingerprint, self.preset)
        return self._backend.decrypt(vector.chunks, vector.length)

    # -- process pool ---------------------------------------------------------------------
    def _get_pool(self, workers: int) -> ProcessPoolExecutor:
        if self._pool is not None and self._pool_workers == workers:
            return self._pool
        self.close()
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_parallel.init_worker,
            initargs=(self.preset.params(), self._backend.secret_sections()),
        )
        self._pool, self._pool_workers = pool, workers
        self._finalizer = weakref.finalize(self, pool.shutdown, wait=False, cancel_futures=True)
        return pool

    def close(self) -> None:
        """Stop the encryption process pool, if any (the context stays usable)."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._pool_workers = None, 0

    def __enter__(self) -> SecretContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SecretContext(preset={self.preset.name!r}, fingerprint={self.fingerprint.hex()})"


class PublicContext:
    """The server's context: parameters (and future evaluation keys), never a secret key.

    Build it with :meth:`load` (``public.ctx`` or its directory) or :meth:`from_bytes`; both
    raise ``ValueError`` for a context that holds a secret key. It deliberately has no
    ``decrypt`` and no ``encrypt``; its only use is
    :class:`~flower_focal.crypto.aggregate.Accumulator`.
    """

    def __init__(self, preset: HEPreset, key_id: bytes, backend: Backend) -> None:
        if backend.has_secret_key:
            raise ValueError(
                "this context holds a secret key; the server must be given the public context "
                f"({PUBLIC_FILE}), never {SECRET_FILE}"
            )
        self.preset = preset
        self.key_id = key_id
        self.fingerprint = fingerprint(preset, key_id)
        self._backend = backend
        self._sum_pool: SumPool | None = None

    def sum_pool(self, workers: int) -> SumPool:
        """The server's pool of ``workers`` summing processes (started on first use, kept).

        :class:`~flower_focal.crypto.aggregate.Accumulator` asks for it when built with
        ``workers > 1``; keeping it here lets every round's accumulator reuse the processes.
        One accumulator uses it at a time: the newest one to add claims it. Stop it with
        :meth:`close` (it is also stopped when this context is garbage-collected or at exit).
        """
        pool = self._sum_pool
        if pool is None or pool.workers != workers or not pool.alive:
            if pool is not None:
                pool.close()
            self._sum_pool = pool = SumPool(self.to_bytes(), workers, self._backend)
        return pool

    def close(self) -> None:
        """Stop the summing processes, if any (the context stays usable)."""
        if self._sum_pool is not None:
            self._sum_pool.close()
            self._sum_pool = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PublicContext:
        """Load ``public.ctx`` (or the keygen directory holding it).

        Raises
        ------
        ValueError
            The file holds a secret key, is not a key file, is corrupted, carries keys the
            preset does not need, or disagrees with the manifest next to it.
        """
        file = _resolve(path, PUBLIC_FILE)
        ctx = cls.from_bytes(file.read_bytes(), source=str(file))
        _check_manifest(file, ctx.fingerprint)
        return ctx

    @classmethod
    def from_key_dir(cls, key_dir: str | os.PathLike[str], keygen_hint: str = "") -> PublicContext:
        """:meth:`load` for a server: a missing file is named with the command that makes it.

        Raises
        ------
        FileNotFoundError
            If ``key_dir`` (or ``key_dir/public.ctx``) does not exist.
        """
        path = Path(key_dir).expanduser()
        if path.is_dir():
            path = path / PUBLIC_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"HE public context {path} not found: run `flower-focal keygen --out DIR{keygen_hint}` "
                "and give the server DIR (it reads only DIR/public.ctx; secret.ctx goes to the institutions)")
        return cls.load(path)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "public context bytes") -> PublicContext:
        """Rebuild from :meth:`SecretContext.public_bytes` output (e.g. sent over the wire)."""
        kf = _KeyFile.from_bytes(data, source)
        if kf.kind != _KIND_PUBLIC or SECRET_SECTION_NAMES & set(kf.sections):
            raise ValueError(
                f"{source} holds a secret key; the server must be given the public context "
                f"({PUBLIC_FILE}), never {SECRET_FILE}"
            )
        backend = backend_for(kf.preset).from_sections(kf.preset, kf.sections)
        if backend.has_secret_key:
            raise ValueError(
                f"{source} holds a secret key; the server must be given the public context "
                f"({PUBLIC_FILE}), never {SECRET_FILE}"
            )
        have, need = set(backend.eval_key_kinds()), set(kf.preset.eval_keys)
        if have != need:
            raise ValueError(
                f"{source} carries evaluation keys {sorted(have)} but preset "
                f"{kf.preset.name!r} needs exactly {sorted(need)}"
            )
        return cls(kf.preset, kf.key_id, backend)

    def to_bytes(self) -> bytes:
        """The public key file bytes (safe to send to the server)."""
        sections = self._backend.public_sections()
        return _KeyFile(_KIND_PUBLIC, self.preset, self.key_id, sections).to_bytes()

    @property
    def eval_keys(self) -> tuple[str, ...]:
        """Evaluation keys this context carries (``()`` for additive presets)."""
        return self._backend.eval_key_kinds()

    @property
    def holds_secret_key(self) -> bool:
        """Asks the underlying SEAL/TenSEAL object; always ``False`` for a constructed one."""
        return self._backend.has_secret_key

    def __repr__(self) -> str:
        return f"PublicContext(preset={self.preset.name!r}, fingerprint={self.fingerprint.hex()})"


# ----------------------------------------------------------------------------- keygen
def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # exact mode, whatever the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def keygen(
    out_dir: str | os.PathLike[str],
    preset: str | HEPreset = DEFAULT_PRESET,
    *,
    overwrite: bool = False,
) -> Path:
    """Create a key set and write ``secret.ctx``, ``public.ctx`` and ``manifest.json``.

    Parameters
    ----------
    out_dir
        Directory to write into (created if missing).
    preset
        Registered preset name (see :data:`~flower_focal.crypto.params.PRESETS`) or an
        :class:`HEPreset`.
    overwrite
        Replace an existing key set in ``out_dir`` (default: refuse).

    Returns
    -------
    Path
        ``out_dir``; pass it to :meth:`SecretContext.load` / :meth:`PublicContext.load`.

    Raises
    ------
    FileExistsError
        ``out_dir`` already holds key files and ``overwrite`` is false.
    ValueError
        Unknown or invalid preset.
    """
    p = get_preset(preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / SECRET_FILE, out / PUBLIC_FILE, out / MANIFEST_FILE]
    if not overwrite and any(t.exists() for t in targets):
        raise FileExistsError(f"{out} already holds a key set; pass overwrite=True to replace it")
    secret = SecretContext.generate(p)
    public_bytes = secret.public_bytes()
    public = PublicContext.from_bytes(public_bytes)  # proves the server copy is key-less
    manifest: dict[str, Any] = {
        "format": "flower-focal-he-keys",
        "version": _VERSION,
        "preset": p.name,
        "params": p.params(),
        "key_id": secret.key_id.hex(),
        "fingerprint": public.fingerprint.hex(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {"secret": SECRET_FILE, "public": PUBLIC_FILE},
        "eval_keys": list(public.eval_keys),
    }
    _atomic_write(targets[0], secret.to_bytes(), 0o600)
    _atomic_write(targets[1], public_bytes, 0o644)
    _atomic_write(targets[2], (json.dumps(manifest, indent=2) + "\n").encode(), 0o644)
    return out


def server_share(key_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Copy what the server host gets of a keygen directory into ``dest``: ``public.ctx`` and
    ``manifest.json``, never ``secret.ctx``. Returns ``dest``."""
    src, out = Path(key_dir), Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    for name in (PUBLIC_FILE, MANIFEST_FILE):
        shutil.copy(src / name, out / name)
    return out


def read_manifest(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """The manifest of a keygen directory (or the manifest file itself)."""
    return json.loads(_resolve(path, MANIFEST_FILE).read_text())
