"""Server-side worker processes that add uploads chunk range by chunk range.

SEAL/TenSEAL calls hold the GIL (measured: two threads loading and adding chunks took 1.08x
the serial time on 2 cores), so the server's sum is split over processes. Worker ``w`` owns
a contiguous range of chunk indices and keeps the running sum of exactly those chunks; for
every upload it reads its chunks from one shared scratch file, checks their CRC-32, runs
them through :mod:`~flower_focal.crypto.intake` and SEAL, and adds them. Modular addition is
exact, so the sum of chunk ``j`` is the same ciphertext whichever process adds it, and
:meth:`SumPool.dump` returns the serial :class:`~flower_focal.crypto.aggregate.Accumulator`'s
bytes exactly.

Memory: the sum is held once (split over the workers); the upload is held by the caller and
once more in the RAM-backed scratch file (``/dev/shm`` when present, mode 0600 in a 0700
directory, zeroed and removed on :meth:`SumPool.close`); each worker reads one chunk at a time.

Spawn-safe: workers get the public key file bytes (no secret key exists on the server) and
build their own context.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from flower_focal.crypto._scratch import scratch_base
from flower_focal.crypto.envelope import check_chunk_crc
from flower_focal.crypto.errors import CiphertextError

#: (offset in the upload file, byte size, CRC-32, number of values) of one chunk
Task = tuple[int, int, int, int]


class PoolBroken(RuntimeError):
    """A worker process died or stopped answering; the pool's sums are lost."""


def _read(fd: int, off: int, n: int) -> bytes:
    parts, done = [], 0
    while done < n:
        more = os.pread(fd, n - done, off + done)
        if not more:
            raise CiphertextError("upload file is shorter than its chunk table")
        parts.append(more)
        done += len(more)
    return b"".join(parts)


def _worker_main(conn: Connection, public_bytes: bytes, upload_path: str) -> None:
    """One worker: a loop over commands from :class:`SumPool` (see its methods)."""
    from flower_focal.crypto.keys import PublicContext

    backend = PublicContext.from_bytes(public_bytes, source="sum pool")._backend
    fd = os.open(upload_path, os.O_RDONLY)
    total: list[Any] = []
    last: tuple[bool, int, Sequence[Task]] | None = None  # what a rollback undoes
    try:
        with backend.io() as io:

            def load(first_index: int, j: int, task: Task) -> Any:
                off, n, crc, values = task
                data = _read(fd, off, n)
                check_chunk_crc(first_index + j, data, crc)
                return backend.load(data, values, io)

            while True:
                try:
                    cmd, *args = conn.recv()
                except EOFError:
                    return
                if cmd == "add":
                    first, start, tasks = args
                    done = 0
                    try:
                        if first:
                            total = [load(start, j, t) for j, t in enumerate(tasks)]
                        else:
                            for j, t in enumerate(tasks):
                                backend.add_inplace(total[j], load(start, j, t))
                                done += 1
                    except Exception as exc:
                        if first:
                            total = []
                        else:  # modular add/sub are exact inverses: the sum is restored
                            for j in range(done):
                                backend.sub_inplace(total[j], load(start, j, tasks[j]))
                        last = None
                        i = start + done
                        if isinstance(exc, CiphertextError):
                            msg = str(exc) if "checksum mismatch" in str(exc) else f"chunk {i}: {exc}"
                        else:
                            msg = f"chunk {i} could not be added: {exc}"
                        conn.send(("err", i, msg))
                        continue
                    last = (first, start, tasks)
                    conn.send(("ok",))
                elif cmd == "rollback":
                    if last is not None:
                        first, start, tasks = last
                        if first:
                            total = []
                        else:
                            for j, t in enumerate(tasks):
                                backend.sub_inplace(total[j], load(start, j, t))
                    last = None
                    conn.send(("ok",))
                elif cmd == "dump":
                    conn.send(("ok", [backend.dump(ct, io) for ct in total]))
                elif cmd == "reset":
                    total, last = [], None
                    conn.send(("ok",))
                elif cmd == "close":
                    return
    finally:
        os.close(fd)
        conn.close()


def _shutdown(procs: list[Any], conns: list[Connection], directory: str, fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
    for c in conns:
        try:
            c.send(("close",))
        except (OSError, ValueError):
            pass
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    for c in conns:
        c.close()
    path = os.path.join(directory, "upload")
    try:  # do not leave the last upload in RAM
        fd = os.open(path, os.O_WRONLY)
        try:
            size, done = os.fstat(fd).st_size, 0
            while done < size:
                done += os.pwrite(fd, bytes(min(size - done, 1 << 24)), done)
        finally:
            os.close(fd)
    except OSError:
        pass
    shutil.rmtree(directory, ignore_errors=True)


class SumPool:
    """``workers`` processes that each own a contiguous range of chunks of the running sum.

    One :class:`~flower_focal.crypto.aggregate.Accumulator` uses it at a time (the last one
    to :meth:`claim` it); get one with ``PublicContext.sum_pool(workers)``, which keeps it for
    the context's lifetime so rounds do not respawn processes.
    """

    def __init__(self, public_bytes: bytes, workers: int) -> None:
        if workers < 2:
            raise ValueError(f"a sum pool needs at least 2 workers, got {workers}")
        self.workers = workers
        self._dir = tempfile.mkdtemp(prefix="ffhe-sum-", dir=scratch_base())  # 0700
        self._path = os.path.join(self._dir, "upload")
        self._fd: int | None = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_worker_main, args=(child, public_bytes, self._path), daemon=True
            )
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)
        self._owner: Any = None
        self._active = 0  # workers holding chunks in the current sum
        self._broken = False
        self._finalizer = weakref.finalize(
            self, _shutdown, self._procs, self._conns, self._dir, self._fd
        )

    # -- ownership --------------------------------------------------------------------------
    def claim(self, owner: object) -> None:
        """Make ``owner`` the pool's user; drops whatever sum the previous user left."""
        self._check()
        if not self.owned_by(owner):
            self.reset()
        self._owner = weakref.ref(owner)

    def owned_by(self, owner: object) -> bool:
        """Whether ``owner`` is the pool's current user."""
        return self._owner is not None and self._owner() is owner

    # -- commands ---------------------------------------------------------------------------
    def _check(self) -> None:
        if self._broken or not self._finalizer.alive:
            raise PoolBroken("the server sum pool is closed or a worker died; start a new one")

    def _ask(self, ws: Sequence[int], messages: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        try:
            for w, m in zip(ws, messages):
                self._conns[w].send(m)
            return [self._conns[w].recv() for w in ws]
        except (EOFError, OSError) as exc:
            self._broken = True
            raise PoolBroken(f"a server sum worker died: {exc!r}") from exc

    def add(
        self,
        blob: bytes | bytearray | memoryview,
        entries: Sequence[tuple[int, int, int]],
        lengths: Sequence[int],
        first: bool,
    ) -> None:
        """Add one upload whose envelope header was already checked.

        Raises
        ------
        CiphertextError
            For the lowest-numbered chunk that failed; every worker's sum is as before.
        """
        self._check()
        if self._fd is None:
            raise PoolBroken("the server sum pool is closed")
        view = memoryview(blob).cast("B")
        os.ftruncate(self._fd, len(view))
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], done)
        n = len(entries)
        if first:
            self._active = min(self.workers, n)
        elif n and self._active == 0:  # pragma: no cover - guarded by the Accumulator
            raise RuntimeError("add(first=False) on an empty pool")
        ws = list(range(self._active))
        bounds = [n * w // self._active for w in range(self._active + 1)]
        messages = []
        for w in ws:
            lo, hi = bounds[w], bounds[w + 1]
            tasks = [(*entries[i], lengths[i]) for i in range(lo, hi)]
            messages.append(("add", first, lo, tasks))
        replies = self._ask(ws, messages)
        errors = [(r[1], r[2]) for r in replies if r[0] == "err"]
        if errors:
            ok = [w for w, r in zip(ws, replies) if r[0] == "ok"]
            self._ask(ok, [("rollback",)] * len(ok))
            raise CiphertextError(min(errors)[1])

    def dump(self) -> list[bytes]:
        """Every chunk of the sum, serialized, in order."""
        self._check()
        ws = list(range(self._active))
        out: list[bytes] = []
        for r in self._ask(ws, [("dump",)] * len(ws)):
            out.extend(r[1])
        return out

    def reset(self) -> None:
        """Drop the sum in every worker."""
        self._check()
        self._ask(range(self.workers), [("reset",)] * self.workers)
        self._active = 0

    def close(self) -> None:
        """Stop the workers, zero and remove the scratch file (idempotent)."""
        self._fd = None
        self._finalizer()

    @property
    def alive(self) -> bool:
        """False once closed or after a worker died."""
        return self._finalizer.alive and not self._broken
