"""What a flower-focal strategy records about a run, held by every strategy (composition).

:class:`RunRecorder` owns the bookkeeping that FedAvg, HE-FedAvg and FOCAL share and that has
nothing to do with how they aggregate:

* the :class:`~flower_focal.strategy.roster.InstitutionRoster` (which node is which institution,
  deterministic order),
* the :class:`~flower_focal.history.RunHistory` (per-round, per-institution metrics, failures,
  server timings; ``metrics.json``),
* bytes sent and received per round,
* the state the server holds after a round and ``checkpoint.npz`` written from it,
* how many rounds produced a new global state (a run with none fails with
  :class:`NothingAggregated`).

Strategies call it from their Flower hooks; :func:`flower_focal.server.run_server` attaches the
run directory's history and checkpoint directory to it (:meth:`RunRecorder.attach`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.supercore import log

from flower_focal.checkpoint import Checkpoint, save_checkpoint
from flower_focal.history import RoundRecord, RunHistory, array_bytes, metric_dict, reply_bytes
from flower_focal.strategy.roster import InstitutionRoster, short_reason


class NothingAggregated(RuntimeError):
    """A run whose rounds all ended without a single aggregated training reply."""


class RunRecorder:
    """Roster, history, byte counts, timings and checkpoints of one strategy's run.

    Parameters
    ----------
    strategy : str
        The strategy's name (recorded in a new history and in error messages).
    roster : InstitutionRoster, optional
        Node-to-institution map; a new one is made if not given.
    history : RunHistory, optional
        Where round records go; a new one is made if not given.
    checkpoint_dir : Path, optional
        Where ``checkpoint.npz`` is written atomically at the end of every round.
    state : callable, optional
        Returns the strategy's server-optimiser state for the checkpoint (``Checkpoint.state``).
    """

    def __init__(self, strategy: str, *, roster: InstitutionRoster | None = None,
                 history: RunHistory | None = None, checkpoint_dir: Path | None = None,
                 state: Callable[[], ArrayRecord] | None = None) -> None:
        self.state = state if state is not None else ArrayRecord
        self.strategy = strategy
        self.roster = roster if roster is not None else InstitutionRoster()
        self.history = history if history is not None else RunHistory(strategy=strategy)
        self.checkpoint_dir = checkpoint_dir
        self.held: ArrayRecord | None = None  # what the server holds after the last round
        self.rounds_aggregated = 0  # rounds whose training produced a new global state

    def attach(self, history: RunHistory, checkpoint_dir: Path | None) -> None:
        """Record into ``history`` and write checkpoints to ``checkpoint_dir`` from now on."""
        self.history, self.checkpoint_dir = history, checkpoint_dir

    # ------------------------------------------------------------------ per round
    def round(self, server_round: int) -> RoundRecord:
        """The history's record of ``server_round`` (created on first use)."""
        return self.history.round(server_round)

    @property
    def info(self) -> dict[str, Any]:
        """Run-level facts in ``metrics.json`` (``info``)."""
        return self.history.info

    def hold(self, arrays: ArrayRecord) -> None:
        """The global state as the server now holds it (what the next checkpoint stores)."""
        self.held = arrays

    def count_sent(self, server_round: int, messages: list[Message], phase: str = "train") -> list[Message]:
        """Add the array bytes of ``messages`` to the round's ``bytes_down``; returns them."""
        record = self.round(server_round)
        for message in messages:
            sent = sum(array_bytes(a) for a in message.content.array_records.values())
            record.bytes_down += sent
            if phase == "evaluate":
                record.bytes_down_evaluate += sent
        return messages

    def count_received(self, server_round: int, replies: Iterable[Message]) -> None:
        """Add the array bytes of ``replies`` to the round's ``bytes_up``."""
        record = self.round(server_round)
        for reply in replies:
            record.bytes_up += reply_bytes(reply)

    def record_replies(self, server_round: int, replies: list[Message], phase: str) -> None:
        """Bytes received, each institution's metrics and each error reply (``phase``:
        ``train`` or ``evaluate``)."""
        self.count_received(server_round, replies)
        record = self.round(server_round)
        per_institution = record.train_institutions if phase == "train" else record.evaluate_institutions
        for reply in replies:
            pid = self.roster.label_of(reply.metadata.src_node_id)
            if reply.has_error():
                record.failures.append(f"{phase} institution {pid}: {short_reason(reply.error.reason)}")
                continue
            for metrics in reply.content.metric_records.values():
                per_institution[pid] = metric_dict(metrics)

    def reject(self, server_round: int, label: int, reason: str, phase: str = "train") -> None:
        """An institution's reply left out: say why, and drop its metrics from the round."""
        record = self.round(server_round)
        record.failures.append(f"{phase} institution {label}: {reason}")
        if phase == "train":
            record.train_institutions.pop(label, None)

    def failure(self, server_round: int, message: str) -> None:
        """Something that went wrong in ``server_round`` (``failures`` in ``metrics.json``)."""
        self.round(server_round).failures.append(message)

    def timings(self, server_round: int, seconds: dict[str, float]) -> None:
        """Server-side phase timings of ``server_round``."""
        self.round(server_round).timings.update(seconds)

    def enough_replies(self, server_round: int, received: int, minimum: int) -> bool:
        """Whether ``received`` valid training replies may be aggregated (else: recorded why)."""
        if received >= minimum and received > 0:
            return True
        msg = (f"round {server_round}: {received} valid training replies (min-train-replies "
               f"{minimum}); the global model is left unchanged")
        log(WARNING, msg)
        self.failure(server_round, msg)
        return False

    def aggregated(self, server_round: int, arrays: ArrayRecord | None,
                   metrics: MetricRecord | None = None) -> ArrayRecord | None:
        """A round's training outcome: ``arrays`` is the new global state (held for the
        checkpoint) or ``None`` (the round failed, the state stays; recorded)."""
        if metrics is not None:
            self.round(server_round).train = metric_dict(metrics)
        if arrays is None:
            self.failure(server_round, f"round {server_round}: nothing aggregated; the global model is unchanged")
            return None
        self.held = arrays
        self.rounds_aggregated += 1
        return arrays

    def evaluated(self, server_round: int, metrics: MetricRecord | None) -> None:
        """The federation's evaluation metrics; closes the round and writes the checkpoint."""
        self.round(server_round).evaluate = metric_dict(metrics)
        self.close_round(server_round)

    def close_round(self, server_round: int) -> None:
        """Stamp the round's wall time, rewrite ``metrics.json``, write ``checkpoint.npz``."""
        self.history.close_round(server_round)
        if self.checkpoint_dir is not None and self.held is not None:
            save_checkpoint(self.checkpoint_dir, Checkpoint(
                server_round, self.held, self.history.to_json(), self.history.config, self.state()))

    # ------------------------------------------------------------------ run
    def require_progress(self, num_rounds: int) -> None:
        """Raise :class:`NothingAggregated` if ``num_rounds`` rounds ran and none aggregated;
        the message carries the first institution errors."""
        if num_rounds <= 0 or self.rounds_aggregated > 0:
            return
        reasons: list[str] = []
        for record in self.history.rounds:
            for failure in record.failures:
                if failure not in reasons:
                    reasons.append(failure)
        shown = "; ".join(reasons[:3]) or "no institution replied to any training message"
        raise NothingAggregated(
            f"{self.strategy}: none of the {num_rounds} round(s) aggregated a training reply, so "
            f"nothing was trained. First errors: {shown}"
        )
