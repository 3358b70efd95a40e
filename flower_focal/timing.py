"""Wall and CPU time of code blocks, for the server's round timings and the institutions' metrics."""

from __future__ import annotations

import time


class Stopwatch:
    """Accumulated wall seconds and CPU seconds of the calling thread over ``with`` blocks.

    ``time.thread_time`` counts only this thread: work handed to other processes (a
    ``he-workers`` pool) or other threads is not in :attr:`cpu_s`.
    """

    def __init__(self) -> None:
        self.wall_s = 0.0
        self.cpu_s = 0.0

    def __enter__(self) -> Stopwatch:
        self._wall0, self._cpu0 = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s += time.perf_counter() - self._wall0
        self.cpu_s += time.thread_time() - self._cpu0
