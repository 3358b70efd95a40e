"""FedAvg on Flower's Message API, made reproducible and observable.

Flower's :class:`flwr.serverapp.strategy.FedAvg` does the work (sampling, weighted averaging,
the round loop in ``Strategy.start``). This subclass only adds what a medical-imaging study
needs around it:

* deterministic sampling and aggregation order (:mod:`flower_focal.strategy.roster`),
* per-institution and federation metrics for every round in a :class:`RunHistory`,
* NaN-aware weighted metric averaging (an institution whose validation split lacks a class
  reports an undefined AUROC, which must not poison the federation mean),
* bytes sent and received per round,
* an optional server optimiser, FedAvgM (``server_momentum``, ``server_lr``): the math of
  Flower's :class:`flwr.serverapp.strategy.FedAvgM` except that normalisation statistics are
  averaged, not stepped (:class:`flower_focal.server_opt.ServerOpt`), with the momentum
  checkpointed so that a resumed run continues it.

HE-FedAvg and FOCAL build on it, so every strategy reports the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from flower_focal.artifacts import ModelSpec
from flower_focal.checkpoint import Checkpoint, save_checkpoint
from flower_focal.history import RunHistory, array_bytes, metric_dict, reply_bytes
from flower_focal.metrics import nan_weighted_average
from flower_focal.flatten import ArrayLayout
from flower_focal.server_opt import ServerOpt
from flower_focal.strategy.roster import InstitutionRoster, OrderedGrid, seeded_random, short_reason


class NothingAggregated(RuntimeError):
    """A run whose rounds all ended without a single aggregated training reply."""


class FedAvg(FlowerFedAvg):
    """Flower FedAvg with reproducible sampling and per-institution history.

    Parameters
    ----------
    seed : int
        Seeds node sampling (together with the round number).
    roster : InstitutionRoster, optional
        Node-to-institution map; a new one is made if not given. Call
        ``roster.data_shape(grid)`` before ``start`` to discover the federation.
    history : RunHistory, optional
        Where round records go; a new one is made if not given.
    min_train_replies : int
        A round with fewer valid training replies keeps the previous global model (and says
        so in the history) instead of averaging too few institutions.
    checkpoint_dir : Path, optional
        Where ``checkpoint.npz`` is written atomically at the end of every round.
    server_momentum, server_lr : float
        FedAvgM: ``w' = w - server_lr * m'`` with ``m' = server_momentum * m + (w - avg)``
        (Flower's ``FedAvgM``; normalisation statistics keep the average); the defaults 0 and 1
        are plain FedAvg (the step is skipped).
    **fedavg_kwargs
        Forwarded unchanged to :class:`flwr.serverapp.strategy.FedAvg`
        (``fraction_train``, ``min_available_nodes``, ...). Metric aggregation defaults to
        :func:`flower_focal.metrics.nan_weighted_average`.
    """

    name = "fedavg"
    uses_initial_model = True  # the server sends a (public) initial model; FOCAL's head comes from an institution

    def __init__(
        self,
        *,
        seed: int = 0,
        roster: InstitutionRoster | None = None,
        history: RunHistory | None = None,
        min_train_replies: int = 1,
        checkpoint_dir: Path | None = None,
        server_momentum: float = 0.0,
        server_lr: float = 1.0,
        **fedavg_kwargs,
    ) -> None:
        fedavg_kwargs.setdefault("train_metrics_aggr_fn", nan_weighted_average)
        fedavg_kwargs.setdefault("evaluate_metrics_aggr_fn", nan_weighted_average)
        super().__init__(**fedavg_kwargs)
        self.seed = seed
        self.roster = roster if roster is not None else InstitutionRoster()
        self.history = history if history is not None else RunHistory(strategy=self.name)
        self.min_train_replies = max(1, min_train_replies)
        self.checkpoint_dir = checkpoint_dir
        self.server_opt = ServerOpt(server_momentum, server_lr)
        self._global: ArrayRecord | None = None  # what the server holds after the last round
        self._round_start: ArrayRecord | None = None  # the global the current round trains from
        self._velocity: dict[str, np.ndarray] | None = None  # FedAvgM momentum (None: not started)
        self.rounds_aggregated = 0  # rounds whose training produced a new global model

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:
        """Flower's round loop, refusing to report success for a run that trained nothing.

        Raises
        ------
        NothingAggregated
            When ``num_rounds > 0`` and no round aggregated a single training reply (every
            institution failed, or every reply was rejected); the message carries the first
            institution errors, so the cause is in the run's error rather than deep in a log.
        """
        self.check_evaluate_fn(evaluate_fn)
        result = super().start(grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                               train_config=train_config, evaluate_config=evaluate_config,
                               evaluate_fn=evaluate_fn)
        self.require_progress(num_rounds)
        return result

    def close(self) -> None:
        """Release what the strategy holds between rounds (processes, shards); idempotent."""

    def check_evaluate_fn(self, evaluate_fn) -> None:
        """Strategies whose server holds no plaintext model refuse server-side evaluation."""

    def require_progress(self, num_rounds: int) -> None:
        """Raise :class:`NothingAggregated` if ``num_rounds`` rounds ran and none aggregated."""
        if num_rounds <= 0 or self.rounds_aggregated > 0:
            return
        reasons: list[str] = []
        for record in self.history.rounds:
            for failure in record.failures:
                if failure not in reasons:
                    reasons.append(failure)
        shown = "; ".join(reasons[:3]) or "no institution replied to any training message"
        raise NothingAggregated(
            f"{self.name}: none of the {num_rounds} round(s) aggregated a training reply, so "
            f"nothing was trained. First errors: {shown}"
        )

    def summary(self) -> None:
        """Log Flower's FedAvg summary plus the sampling seed."""
        super().summary()
        log(INFO, "\t└──> Sampling seed: %d (partition-ordered, reproducible)", self.seed)
        if self.server_opt.active:
            log(INFO, "\t└──> Server optimiser FedAvgM: momentum %g, server lr %g",
                self.server_opt.momentum, self.server_opt.lr)

    def bind_initial_model(self, arrays: ArrayRecord) -> None:
        """Called with the (public) initial model before the first round, also on resume."""
        self._global = arrays

    def server_state(self) -> ArrayRecord:
        """What a checkpoint must hold besides the global model for the server optimiser to
        continue after a resume (fedavg: the FedAvgM momentum; empty without one)."""
        if self._velocity is None:
            return ArrayRecord()
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in self._velocity.items()})

    def restore_server_state(self, state: ArrayRecord) -> None:
        """Continue from a checkpoint's :meth:`server_state`."""
        self._velocity = {k: a.numpy() for k, a in state.items()} if len(state) else None

    def final_model(self, result: Result) -> ArrayRecord | None:
        """The plaintext global model the server may write to disk (HE strategies: None)."""
        return result.arrays

    def final_ciphertext(self, result: Result) -> tuple[ArrayRecord, ArrayLayout] | None:
        """The encrypted final model and its layout, for strategies that only hold ciphertext."""
        return None

    def final_spec(self, spec: ModelSpec) -> ModelSpec:
        """The spec written with the final model (strategies with another model change it)."""
        return spec

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's FedAvg sampling, made deterministic; counts bytes sent."""
        self.roster.refresh(grid)
        self._global = self._round_start = arrays
        with seeded_random(self.seed, server_round, "train"):
            messages = list(
                super().configure_train(server_round, arrays, config, OrderedGrid(grid, self.roster))
            )
        return self._count_sent(server_round, self._train_messages(messages))

    def _train_messages(self, messages: list[Message]) -> list[Message]:
        """The round's training messages before they are counted and sent (subclasses add to them)."""
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record each institution, then let Flower's FedAvg average in partition order."""
        replies = self.roster.sort_replies(replies)
        self._record_replies(server_round, replies, phase="train")
        if not self._enough_replies(server_round, sum(not r.has_error() for r in replies)):
            return None, None
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.history.round(server_round).train = metric_dict(metrics)
        if arrays is not None and self.server_opt.active:
            arrays = self._server_step(arrays)
        return self._aggregated(server_round, arrays), metrics

    def _server_step(self, average: ArrayRecord) -> ArrayRecord:
        """FedAvgM from the global this round trained from to the new one (:meth:`ServerOpt.step`)."""
        if self._round_start is None:
            raise RuntimeError("server optimiser: aggregate_train ran before configure_train")
        old = {k: a.numpy() for k, a in self._round_start.items()}
        new, self._velocity = self.server_opt.step(old, {k: a.numpy() for k, a in average.items()},
                                                   self._velocity)
        return ArrayRecord({k: Array(new[k]) for k in average.keys()})

    def _aggregated(self, server_round: int, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """Bookkeeping of a round's aggregate (``None``: the round failed, the model stays)."""
        if arrays is None:
            record = self.history.round(server_round)
            record.failures.append(f"round {server_round}: nothing aggregated; the global model is unchanged")
            return None
        self._global = arrays
        self.rounds_aggregated += 1
        return arrays

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's FedAvg evaluation sampling, made deterministic; counts bytes sent."""
        self._global = arrays  # the global model as it now is (after any wrapper's noise)
        with seeded_random(self.seed, server_round, "evaluate"):
            messages = list(
                super().configure_evaluate(
                    server_round, arrays, config, OrderedGrid(grid, self.roster)
                )
            )
        return self._count_sent(server_round, messages, phase="evaluate")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each institution's metrics and the federation's weighted mean."""
        replies = self.roster.sort_replies(replies)
        self._record_replies(server_round, replies, phase="evaluate")
        metrics = super().aggregate_evaluate(server_round, replies)
        self.history.round(server_round).evaluate = metric_dict(metrics)
        self.history.close_round(server_round)
        if self.checkpoint_dir is not None and self._global is not None:
            save_checkpoint(self.checkpoint_dir, Checkpoint(
                server_round, self._global, self.history.to_json(), self.history.config,
                self.server_state()))
        return metrics

    # ------------------------------------------------------------------ helpers
    def _enough_replies(self, server_round: int, received: int) -> bool:
        if received >= self.min_train_replies and received > 0:
            return True
        msg = (f"round {server_round}: {received} valid training replies (min-train-replies "
               f"{self.min_train_replies}); the global model is left unchanged")
        log(WARNING, msg)
        self.history.round(server_round).failures.append(msg)
        return False

    def _count_sent(self, server_round: int, messages: list[Message], phase: str = "train") -> list[Message]:
        record = self.history.round(server_round)
        for message in messages:
            sent = sum(array_bytes(a) for a in message.content.array_records.values())
            record.bytes_down += sent
            if phase == "evaluate":
                record.bytes_down_evaluate += sent
        return messages

    def _record_replies(self, server_round: int, replies: list[Message], phase: str) -> None:
        record = self.history.round(server_round)
        per_institution = record.train_institutions if phase == "train" else record.evaluate_institutions
        for reply in replies:
            pid = self.roster.label_of(reply.metadata.src_node_id)
            record.bytes_up += reply_bytes(reply)
            if reply.has_error():
                record.failures.append(f"{phase} institution {pid}: {short_reason(reply.error.reason)}")
                continue
            for metrics in reply.content.metric_records.values():
                per_institution[pid] = metric_dict(metrics)
