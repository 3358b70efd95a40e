"""Scratch files for ``tenseal.sealapi`` objects, which save and load only through file paths.

This module owns the one place where key material or ciphertexts touch a filesystem: a
private (0700) directory in ``/dev/shm`` (RAM-backed) when it exists, else the system temp
directory. Every object is written, read back and unlinked in the same call, and the
directory is removed when the ``with`` block ends, also on error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count
from pathlib import Path
from typing import Any

_SHM = Path("/dev/shm")


def scratch_base() -> str | None:
    """``/dev/shm`` when it is a writable directory, else ``None`` (system temp dir)."""
    if _SHM.is_dir() and os.access(_SHM, os.W_OK | os.X_OK):
        return str(_SHM)
    return None


class ScratchIO:
    """Byte round-trips for SEAL objects through uniquely named files in one private dir."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._names = count()

    def _path(self) -> str:
        return str(self._dir / f"o{next(self._names)}")

    def dump(self, obj: Any) -> bytes:
        """Bytes of ``obj.save(path)`` (any SEAL object or ``Serializable``)."""
        path = self._path()
        try:
            obj.save(path)
            with open(path, "rb") as fh:
                return fh.read()
        finally:
            _unlink(path)

    def load(self, obj: Any, data: bytes, context: Any | None = None) -> Any:
        """``obj.load([context,] path)`` from ``data``; returns ``obj``. SEAL errors propagate."""
        path = self._path()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            if context is None:
                obj.load(path)
            else:
                obj.load(context, path)
            return obj
        finally:
            _unlink(path)


@contextmanager
def scratch() -> Iterator[ScratchIO]:
    """A :class:`ScratchIO` over a fresh private directory that is removed on exit."""
    directory = Path(tempfile.mkdtemp(prefix="ffhe-", dir=scratch_base()))  # mode 0700
    try:
        yield ScratchIO(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
