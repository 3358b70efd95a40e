"""Scratch files for ``tenseal.sealapi`` objects, which save and load only through file paths.

This module owns the one place where key material or ciphertexts touch a filesystem: a
private (0700) directory in ``/dev/shm`` (RAM-backed) when it exists, else the system temp
directory. A :class:`ScratchIO` round-trips every object of one ``with scratch()`` block
through a single 0600 file in that directory, rewritten in place for each object (a fresh
file per object cost an open, a close and an unlink each time: about 15 % of the server's
time to absorb an upload). The file is zeroed, then the directory is removed when the
``with`` block ends, also on error, so bytes last no longer than the block.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_SHM = Path("/dev/shm")


def scratch_base() -> str | None:
    """``/dev/shm`` when it is a writable directory, else ``None`` (system temp dir)."""
    if _SHM.is_dir() and os.access(_SHM, os.W_OK | os.X_OK):
        return str(_SHM)
    return None


class ScratchIO:
    """Byte round-trips for SEAL objects through one file in a private directory.

    SEAL opens the path itself for every ``save``/``load``; this side keeps a descriptor on
    the same file and reads or rewrites it in place. A lock makes one instance safe to share
    between threads (each call holds the file for its whole round-trip).
    """

    def __init__(self, directory: Path) -> None:
        self._path = str(directory / "obj")
        self._fd: int | None = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._size = 0  # the file's length (this object and SEAL are its only writers)
        self._lock = threading.Lock()

    def _require_open(self) -> int:
        if self._fd is None:
            raise ValueError("this ScratchIO is closed (use it inside its `with scratch()` block)")
        return self._fd

    def dump(self, obj: Any) -> bytes:
        """Bytes of ``obj.save(path)`` (any SEAL object or ``Serializable``)."""
        with self._lock:
            fd = self._require_open()
            obj.save(self._path)  # SEAL truncates and rewrites the same file (same inode)
            data = _read_all(fd)
            self._size = len(data)
            return data

    def load(self, obj: Any, data: bytes, context: Any | None = None) -> Any:
        """``obj.load([context,] path)`` from ``data``; returns ``obj``. SEAL errors propagate."""
        with self._lock:
            fd = self._require_open()
            # Overwrite in place and cut only the tail: truncating to 0 first would free
            # every page of the file and fault fresh zeroed ones in for each object.
            view = memoryview(data)
            self._size = max(self._size, len(view))  # stays an upper bound if a write fails
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], done)
            if self._size > len(view):
                os.ftruncate(fd, len(view))
            self._size = len(view)
            if context is None:
                obj.load(self._path)
            else:
                obj.load(context, self._path)
            return obj

    def close(self) -> None:
        """Zero and close the file (the directory itself is removed by :func:`scratch`)."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                size = os.fstat(fd).st_size
                if size:
                    os.pwrite(fd, bytes(size), 0)  # do not leave the last object in RAM
            finally:
                os.close(fd)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    parts, done = [], 0
    while done < size:  # pread may return less than asked
        more = os.pread(fd, size - done, done)
        if not more:
            break
        parts.append(more)
        done += len(more)
    return b"".join(parts)  # one part (the usual case) is returned as is, not copied


@contextmanager
def scratch() -> Iterator[ScratchIO]:
    """A :class:`ScratchIO` over a fresh private directory that is removed on exit."""
    directory = Path(tempfile.mkdtemp(prefix="ffhe-", dir=scratch_base()))  # mode 0700
    try:
        io = ScratchIO(directory)
        try:
            yield io
        finally:
            io.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
