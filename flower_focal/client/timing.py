"""Where a message's time goes at an institution: a Flower mod that logs it.

A deployed SuperNode starts a fresh ``flwr-clientapp`` process for every message, so each message
pays interpreter start, Flower's imports and flower-focal's imports before any work.
:func:`message_timing_mod` (on flower-focal's own ClientApp, :mod:`flower_focal.client.app`)
logs one line per message::

    flower-focal message train: process 0.41 s before flower-focal's import, imports 1.07 s, work 3.20 s

``process`` runs from the process's start to the first import of :mod:`flower_focal` (the
interpreter, Flower's runtime, loading the app); ``imports`` from there to the message (the app
module's imports); ``work`` is the handler with its mods (lazy imports such as torch included).
A process that already served a message (a simulation worker) logs ``work`` only.
``benchmarks/bench_deployment.py`` reads these lines from the SuperNode logs.
"""

from __future__ import annotations

import os
import time
from logging import INFO
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore import log

import flower_focal

PREFIX = "flower-focal message"
_served = 0  # messages this process has served


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere)."""
    try:
        started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def message_timing_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Log this message's process / imports / work split (see the module doc)."""
    global _served
    start = time.time()
    age = process_age_s() if _served == 0 else None
    try:
        return call_next(message, context)
    finally:
        work = time.time() - start
        kind = message.metadata.message_type
        if age is not None:
            born = start - age
            log(INFO, "%s %s: process %.2f s before flower-focal's import, imports %.2f s, work %.2f s",
                PREFIX, kind, max(0.0, flower_focal.IMPORT_STARTED - born),
                start - flower_focal.IMPORT_STARTED, work)
        else:
            log(INFO, "%s %s: work %.2f s", PREFIX, kind, work)
        _served += 1
