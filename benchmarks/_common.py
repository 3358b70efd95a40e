"""Shared benchmark helpers: process-tree peak memory, JSON output, paths to shared data."""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_npz(name: str) -> Path | None:
    """Path to ../shared/data/<name>/<name>.npz, or None when absent."""
    path = SHARED_DATA / name / f"{name}.npz"
    return path if path.is_file() else None


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return tree


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemorySampler:
    """Samples the summed RSS of this process, its descendants and marked processes.

    "Marked" processes are those whose command line contains ``marker`` (the private
    FLWR_HOME of a simulation), because Flower's local SuperLink is started detached.
    RSS double-counts shared pages, so the figure is an upper bound.
    """

    def __init__(self, marker: str | None = None, interval_s: float = 0.5) -> None:
        self.marker = marker.encode() if marker else None
        self.interval_s = interval_s
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _roots(self) -> list[int]:
        roots = [os.getpid()]
        if self.marker:
            for cmd in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    if self.marker in cmd.read_bytes():
                        roots.append(int(cmd.parent.name))
                except OSError:
                    continue
        return roots

    def sample(self) -> int:
        tree, seen, stack = _children(), set(), self._roots()
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            stack.extend(tree.get(pid, []))
        total = sum(_rss_kib(p) for p in seen)
        self.peak_kib = max(self.peak_kib, total)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval_s)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def loadavg() -> list[float]:
    """The 1/5/15-minute load averages, rounded (recorded next to every timing)."""
    return [round(v, 2) for v in os.getloadavg()]


def machine_cpu_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``; None elsewhere).

    The difference across a run is the run's CPU work when nothing else runs: unlike wall
    time it does not move with how the scheduler happened to interleave the run's processes.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    """Where the benchmark ran."""
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def emit(result: dict[str, Any]) -> None:
    """Print the one JSON object a benchmark produces."""
    print(json.dumps(result, indent=2, sort_keys=False))
