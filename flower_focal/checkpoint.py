"""Server checkpoints: the global state after every round, written atomically, and resume.

A checkpoint (``checkpoint.npz`` in the run directory) holds the global model as the server
holds it (plaintext arrays for fedavg, the ciphertext Array plus ``[C, W]`` for he-fedavg),
the round number, the run history so far and the run config. Randomness needs no saved
state: node sampling is a function of ``(seed, round)`` and local training of
``(seed, institution, round)``, so a resumed run reaches the same result as an uninterrupted
one. :class:`RoundOffset` lets Flower's own ``Strategy.start`` loop run the remaining rounds.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flower_focal.config import RunConfig

CHECKPOINT_FILE = "checkpoint.npz"
# Run-config keys that may change between the killed run and its resumption.
RESUMABLE_CHANGES = frozenset(n.replace("_", "-") for n in RunConfig.settings("resumable"))


@dataclass(frozen=True)
class Checkpoint:
    """The server's state at the end of ``server_round``."""

    server_round: int
    arrays: ArrayRecord
    history: dict[str, Any]
    config: dict[str, Any]
    state: ArrayRecord = field(default_factory=ArrayRecord)
    """The strategy's server-optimiser state (fedavg: the FedAvgM momentum; he-fedavg: the
    global model before the last aggregated round, ciphertext or the plaintext initial model);
    empty without a server optimiser."""


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint.npz`` atomically (temporary file + ``os.replace``)."""
    names = list(checkpoint.arrays.keys())
    meta = {
        "round": checkpoint.server_round,
        "arrays": _describe(checkpoint.arrays),
        "history": checkpoint.history,
        "config": checkpoint.config,
        "rng": "stateless: sampling = f(seed, round); local training = f(seed, institution, round)",
    }
    if checkpoint.state:  # (only with a server optimiser: other checkpoints are as before)
        meta["state"] = _describe(checkpoint.state)
    payload = {f"a{i}": np.frombuffer(checkpoint.arrays[n].data, dtype=np.uint8) for i, n in enumerate(names)}
    payload.update({f"s{i}": np.frombuffer(a.data, dtype=np.uint8)
                    for i, a in enumerate(checkpoint.state.values())})
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **payload)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{CHECKPOINT_FILE}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, run_dir / CHECKPOINT_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return run_dir / CHECKPOINT_FILE


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The run directory's checkpoint, or ``None`` if there is none.

    Raises
    ------
    ValueError
        If the file exists but cannot be read (it is never half-written, see
        :func:`save_checkpoint`, so this means it was damaged).
    """
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            meta = json.loads(data["meta"].tobytes())
            arrays = _restore(meta["arrays"], data, "a")
            state = _restore(meta.get("state", []), data, "s")  # older checkpoints have none
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} is damaged: {exc}") from exc
    return Checkpoint(meta["round"], arrays, meta["history"], meta["config"], state)


def _describe(record: ArrayRecord) -> list[dict[str, Any]]:
    return [{"name": n, "dtype": a.dtype, "shape": list(a.shape), "stype": a.stype} for n, a in record.items()]


def _restore(described: list[dict[str, Any]], data, prefix: str) -> ArrayRecord:
    return ArrayRecord({
        m["name"]: Array(dtype=m["dtype"], shape=tuple(m["shape"]), stype=m["stype"],
                         data=data[f"{prefix}{i}"].tobytes())
        for i, m in enumerate(described)
    })


def check_compatible(checkpoint: Checkpoint, config: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint made with different settings (other than the resumable ones).

    A setting missing on one side (a checkpoint written before the setting existed) counts as
    its default, so adding a setting does not strand the runs in flight.
    """
    defaults = RunConfig().to_flower()
    old = {**defaults, **checkpoint.config}
    new = {**defaults, **config}
    changed = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if changed:
        raise ValueError(
            "cannot resume: the run config differs from the checkpoint's in "
            + ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed)
        )


class RoundOffset(Strategy):
    """Present rounds ``1..n`` of Flower's loop to ``inner`` as ``offset+1..offset+n``."""

    def __init__(self, inner: Strategy, offset: int) -> None:
        self.inner = inner
        self.offset = offset

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.inner.summary()
