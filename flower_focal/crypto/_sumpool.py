"""Server-side worker processes that add uploads chunk range by chunk range.

SEAL/TenSEAL calls hold the GIL (measured: two threads loading and adding chunks took 1.08x
the serial time on 2 cores), so the server's sum is split over processes. Worker ``w`` owns
a contiguous range of chunk indices and keeps the running sum of exactly those chunks; for
every upload it takes its chunks from one shared mapping of a scratch file (the calling
process copies each upload's other ranges in; it sums the first range itself, straight from
the caller's buffer), checks their CRC-32, runs them through
:mod:`~flower_focal.crypto.intake` and SEAL, and adds them. Modular addition is
exact, so the sum of chunk ``j`` is the same ciphertext whichever process adds it, and
:meth:`SumPool.dump` returns the serial :class:`~flower_focal.crypto.aggregate.Accumulator`'s
bytes exactly.

Memory: the sum is held once (split over the processes); the upload is held by the caller and
once more in the RAM-backed scratch file (``/dev/shm`` when present, mode 0600 in a 0700
directory, as large as the largest upload, zeroed and removed on :meth:`SumPool.close`); each
worker copies out one chunk at a time.

Spawn-safe: workers get the public key file bytes (no secret key exists on the server) and
build their own context.
"""

from __future__ import annotations

import itertools
import mmap
import multiprocessing
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from flower_focal.crypto._scratch import scratch_base
from flower_focal.crypto.envelope import check_chunk_crc
from flower_focal.crypto.errors import ChunkChecksumError, CiphertextError

#: (offset in the upload file, byte size, CRC-32, number of values) of one chunk
Task = tuple[int, int, int, int]


class PoolBroken(RuntimeError):
    """A worker process died or stopped answering; the pool's sums are lost."""


class _Mapping:
    """A shared mapping of the upload file, re-made only when the file grows.

    The caller copies each upload into it with one memcpy and workers slice their chunks out
    of it: no read/write system call per chunk or per upload (they are slow under sandboxed
    kernels such as gVisor), and the pages stay mapped from one upload to the next.
    """

    def __init__(self, fd: int, writable: bool) -> None:
        self._fd, self._writable = fd, writable
        self._mm: mmap.mmap | None = None
        self.size = 0

    def ensure(self, size: int) -> None:
        if size <= self.size:
            return
        if self._writable and os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        self.close()
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self._writable else 0)
        self._mm = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED, prot=prot)
        self.size = size

    def read(self, off: int, n: int) -> bytes:
        if self._mm is None or off + n > self.size:
            raise CiphertextError("chunk lies outside the shared upload buffer")
        return self._mm[off : off + n]  # a copy of one chunk

    def write(self, off: int, data: memoryview) -> None:
        assert self._mm is not None
        self._mm[off : off + len(data)] = data

    def zero(self) -> None:
        if self._mm is not None and self._writable:
            step = 1 << 24
            for off in range(0, self.size, step):
                n = min(step, self.size - off)
                self._mm[off : off + n] = bytes(n)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm, self.size = None, 0


def _add_range(
    backend: Any,
    io: Any,
    total: list[Any],
    first: bool,
    start: int,
    tasks: Sequence[Task],
    read: Callable[[int, int], bytes | memoryview],
) -> tuple[list[Any], tuple[int, str] | None]:
    """Add chunks ``start, start+1, ...`` into ``total``; on failure undo them all.

    Returns the new ``total`` and ``None``, or the unchanged ``total`` and ``(index, message)``
    of the first chunk that failed (messages as the serial Accumulator words them).
    """

    def load(j: int, task: Task) -> Any:
        off, n, crc, values = task
        data = read(off, n)
        check_chunk_crc(start + j, data, crc)
        return backend.load(data, values, io)

    done = 0
    try:
        if first:
            return [load(j, t) for j, t in enumerate(tasks)], None
        for j, t in enumerate(tasks):
            backend.add_inplace(total[j], load(j, t))
            done += 1
        return total, None
    except Exception as exc:  # noqa: BLE001 - SEAL raises several types; the message is kept
        if not first:  # modular add/sub are exact inverses: the sum is restored bit for bit
            for j in range(done):
                backend.sub_inplace(total[j], load(j, tasks[j]))
        i = start + done
        if isinstance(exc, ChunkChecksumError):  # names its chunk already
            msg = str(exc)
        elif isinstance(exc, CiphertextError):
            msg = f"chunk {i}: {exc}"
        else:
            msg = f"chunk {i} could not be added: {exc}"
        return ([] if first else total), (i, msg)


def _undo_range(
    backend: Any,
    io: Any,
    total: list[Any],
    first: bool,
    tasks: Sequence[Task],
    read: Callable[[int, int], bytes | memoryview],
) -> list[Any]:
    """Take back a successful :func:`_add_range` (the same bytes load again)."""
    if first:
        return []
    for j, (off, n, _, values) in enumerate(tasks):
        backend.sub_inplace(total[j], backend.load(read(off, n), values, io))
    return total


def _worker_main(conn: Connection, public_bytes: bytes, upload_path: str) -> None:
    """One worker process: a loop over commands from :class:`SumPool`."""
    from flower_focal.crypto.keys import PublicContext

    backend = PublicContext.from_bytes(public_bytes, source="sum pool")._backend
    fd = os.open(upload_path, os.O_RDONLY)
    view = _Mapping(fd, writable=False)
    read = view.read
    total: list[Any] = []
    last: tuple[bool, Sequence[Task]] | None = None  # what a rollback undoes
    try:
        with backend.io() as io:
            while True:
                try:
                    cmd, *args = conn.recv()
                except EOFError:
                    return
                if cmd == "add":
                    first, start, tasks, capacity = args
                    view.ensure(capacity)
                    total, err = _add_range(backend, io, total, first, start, tasks, read)
                    last = None if err else (first, tasks)
                    conn.send(("err", *err) if err else ("ok",))
                elif cmd == "rollback":
                    if last is not None:
                        total = _undo_range(backend, io, total, last[0], last[1], read)
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
        view.close()
        os.close(fd)
        conn.close()


def _shutdown(
    procs: list[Any], conns: list[Connection], directory: str, fd: int, mapping: _Mapping
) -> None:
    try:
        mapping.zero()  # do not leave the last upload in RAM
        mapping.close()
    except (OSError, ValueError, BufferError):
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
    try:
        os.close(fd)
    except OSError:
        pass
    shutil.rmtree(directory, ignore_errors=True)


class SumPool:
    """``workers`` summing processes: this one and ``workers - 1`` spawned ones.

    Each owns a contiguous range of chunks of the running sum; this process takes the first
    range straight from the caller's buffer, so only the other ranges are copied into the
    scratch file the spawned workers read. One
    :class:`~flower_focal.crypto.aggregate.Accumulator` uses the pool at a time (the last one
    to :meth:`claim` it); get one with ``PublicContext.sum_pool(workers)``, which keeps it for
    the context's lifetime so rounds do not respawn processes.
    """

    def __init__(self, public_bytes: bytes, workers: int, backend: Any) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 2:
            raise ValueError(f"a sum pool needs an int >= 2 workers, got {workers!r}")
        self.workers = workers
        self._backend = backend
        self._dir = tempfile.mkdtemp(prefix="ffhe-sum-", dir=scratch_base())  # mode 0700
        self._path = os.path.join(self._dir, "upload")
        self._fd: int | None = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._map = _Mapping(self._fd, writable=True)
        #: seconds of the last :meth:`add`: copying ranges out, own range, waiting for workers
        self.last_timings: dict[str, float] = {}
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        try:
            for _ in range(workers - 1):
                parent, child = ctx.Pipe()
                p = ctx.Process(
                    target=_worker_main, args=(child, public_bytes, self._path), daemon=True
                )
                p.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(p)
        finally:
            self._finalizer = weakref.finalize(
                self, _shutdown, self._procs, self._conns, self._dir, self._fd, self._map
            )
        self._owner: Any = None
        self._local: list[Any] = []  # this process's range of the sum
        self._local_last: tuple[bool, Sequence[Task]] | None = None
        self._active = 0  # participants (this process included) holding chunks
        self._broken = False

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

    @property
    def alive(self) -> bool:
        """False once closed or after a worker died."""
        return self._finalizer.alive and not self._broken

    # -- commands ---------------------------------------------------------------------------
    def _check(self) -> None:
        if not self.alive or self._fd is None:
            raise PoolBroken("the server sum pool is closed or a worker died; start a new one")

    def _send(self, ws: Sequence[int], messages: Sequence[tuple[Any, ...]]) -> None:
        try:
            for w, m in zip(ws, messages):
                self._conns[w].send(m)
        except (OSError, ValueError) as exc:
            self._broken = True
            raise PoolBroken(f"a server sum worker died: {exc!r}") from exc

    def _recv(self, ws: Sequence[int]) -> list[tuple[Any, ...]]:
        try:
            return [self._conns[w].recv() for w in ws]
        except (EOFError, OSError) as exc:
            self._broken = True
            raise PoolBroken(f"a server sum worker died: {exc!r}") from exc

    def _ask(self, ws: Sequence[int], messages: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        self._send(ws, messages)
        return self._recv(ws)

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
            For the lowest-numbered chunk that failed; every range of the sum is as before.
        """
        self._check()
        assert self._fd is not None
        view = memoryview(blob).cast("B")
        n = len(entries)
        if first:
            self._active = min(self.workers, n)
        bounds = [n * w // self._active for w in range(self._active + 1)]
        tasks = [[(*entries[i], lengths[i]) for i in range(lo, hi)] for lo, hi in itertools.pairwise(bounds)]
        # Spawned workers (participants 1..) read their ranges from the scratch file, written
        # range by range so the first ones start while later ones are still being copied.
        t0 = time.perf_counter()
        children = list(range(self._active - 1))
        if children:
            self._map.ensure(len(view))
        for w in children:
            lo, hi = tasks[w + 1][0][0], tasks[w + 1][-1][0] + tasks[w + 1][-1][1]
            self._map.write(lo, view[lo:hi])
            self._send([w], [("add", first, bounds[w + 1], tasks[w + 1], self._map.size)])
        t1 = time.perf_counter()
        # This process: the first range, straight from the caller's buffer.
        with self._backend.io() as io:
            read = lambda off, n: view[off : off + n]
            self._local, err = _add_range(
                self._backend, io, self._local, first, 0, tasks[0], read
            )
            t2 = time.perf_counter()
            replies = self._recv(children)
            t3 = time.perf_counter()
            self.last_timings = {"copy_s": t1 - t0, "own_range_s": t2 - t1, "wait_s": t3 - t2}
            errors = [(r[1], r[2]) for r in replies if r[0] == "err"]
            if err is not None:
                errors.append(err)
            if errors:
                ok = [w for w, r in zip(children, replies) if r[0] == "ok"]
                self._send(ok, [("rollback",)] * len(ok))
                if err is None:
                    self._local = _undo_range(self._backend, io, self._local, first, tasks[0], read)
                self._recv(ok)
                if first:
                    self._active = 0
                raise CiphertextError(min(errors)[1])

    def dump(self) -> list[bytes]:
        """Every chunk of the sum, serialized, in order."""
        self._check()
        children = list(range(self._active - 1))
        self._send(children, [("dump",)] * len(children))
        with self._backend.io() as io:
            out = [self._backend.dump(ct, io) for ct in self._local]
        for r in self._recv(children):
            out.extend(r[1])
        return out

    def reset(self) -> None:
        """Drop the sum in every participant."""
        self._check()
        self._ask(range(self.workers - 1), [("reset",)] * (self.workers - 1))
        self._local, self._active = [], 0

    def close(self) -> None:
        """Stop the workers, zero and remove the scratch file (idempotent)."""
        self._fd = None  # _shutdown zeroes the mapping and closes the file
        self._local = []
        self._finalizer()
