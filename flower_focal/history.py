"""Per-round, per-institution record of a federated run (the content of ``metrics.json``).

Strategies append to a :class:`RunHistory` from their aggregation hooks; the run driver
writes it to disk. Values are plain floats/ints so the JSON is easy to load anywhere.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord


def _clean(value: Any) -> Any:
    """JSON-safe scalar: NaN/Inf become ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def metric_dict(record: MetricRecord | None) -> dict[str, Any]:
    """A MetricRecord as a JSON-safe dict (lists kept as lists)."""
    if record is None:
        return {}
    return {k: _clean(v) if not isinstance(v, list) else [_clean(x) for x in v] for k, v in record.items()}


def array_bytes(record: ArrayRecord) -> int:
    """Bytes of array payload in a record (what crosses the wire, before framing)."""
    return sum(len(arr.data) for arr in record.values())


def reply_bytes(reply: Message) -> int:
    """Array payload bytes in one reply."""
    if reply.has_error():
        return 0
    return sum(array_bytes(rec) for rec in reply.content.array_records.values())


@dataclass
class RoundRecord:
    """Everything measured in one server round."""

    round: int
    started: float = field(default_factory=time.time)
    wall_time_s: float | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    bytes_down_evaluate: int = 0  # the part of bytes_down sent for evaluation
    train: dict[str, Any] = field(default_factory=dict)
    train_institutions: dict[int, dict[str, Any]] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    evaluate_institutions: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # server-side phases, seconds

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        """Inverse of :meth:`to_json` (used when a run resumes from a checkpoint)."""
        return cls(
            round=int(data["round"]),
            wall_time_s=data.get("wall_time_s"),
            bytes_down=int(data.get("bytes_down", 0)),
            bytes_up=int(data.get("bytes_up", 0)),
            bytes_down_evaluate=int(data.get("bytes_down_evaluate", 0)),
            train=dict(data.get("train", {})),
            train_institutions={int(k): v for k, v in data.get("train_institutions", {}).items()},
            evaluate=dict(data.get("evaluate", {})),
            evaluate_institutions={int(k): v for k, v in data.get("evaluate_institutions", {}).items()},
            failures=list(data.get("failures", [])),
            timings=dict(data.get("timings", {})),
        )

    def to_json(self) -> dict[str, Any]:
        """JSON form (institution keys become strings)."""
        return {
            "round": self.round,
            "wall_time_s": self.wall_time_s,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "bytes_down_evaluate": self.bytes_down_evaluate,
            "train": self.train,
            "evaluate": self.evaluate,
            "train_institutions": {str(k): v for k, v in sorted(self.train_institutions.items())},
            "evaluate_institutions": {
                str(k): v for k, v in sorted(self.evaluate_institutions.items())
            },
            "failures": self.failures,
            "timings": self.timings,
        }


@dataclass
class RunHistory:
    """Rounds of one run plus run-level facts (strategy, config, status)."""

    strategy: str
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    rounds: list[RoundRecord] = field(default_factory=list)
    status: str = "running"
    path: Path | None = None  # when set, metrics.json is rewritten after every round

    def restore(self, data: dict[str, Any]) -> None:
        """Take over rounds and info of a saved ``metrics.json`` document (resume)."""
        self.rounds = [RoundRecord.from_json(r) for r in data.get("rounds", [])]
        self.info.update(data.get("info", {}))
        self.info["resumed_after_round"] = self.rounds[-1].round if self.rounds else 0

    def round(self, server_round: int) -> RoundRecord:
        """The record of ``server_round``, created on first use."""
        if not self.rounds or self.rounds[-1].round != server_round:
            self.rounds.append(RoundRecord(round=server_round))
        return self.rounds[-1]

    def close_round(self, server_round: int) -> None:
        """Stamp the wall time of ``server_round``."""
        rec = self.round(server_round)
        rec.wall_time_s = time.time() - rec.started
        if self.path is not None:
            self.save(self.path)

    def series(self, phase: str, key: str) -> tuple[list[int], list[float]]:
        """Federation-level metric ``key`` of ``phase`` ('train'/'evaluate') per round."""
        xs, ys = [], []
        for rec in self.rounds:
            value = getattr(rec, phase).get(key)
            if value is not None:
                xs.append(rec.round)
                ys.append(float(value))
        return xs, ys

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` document."""
        return {
            "strategy": self.strategy,
            "status": self.status,
            "config": self.config,
            "info": self.info,
            "rounds": [r.to_json() for r in self.rounds],
        }

    def save(self, path: Path) -> None:
        """Write ``metrics.json`` atomically."""
        write_json_atomic(path, self.to_json())


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
