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
  checkpointed so that a resumed run continues it;

history, byte counts and checkpoints kept by its :class:`~flower_focal.strategy.recorder.RunRecorder`, which
HE-FedAvg and FOCAL hold too, so every strategy reports the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from flower_focal.history import RunHistory
from flower_focal.metrics import nan_weighted_average
from flower_focal.server_opt import ServerOpt
from flower_focal.strategy.base import RecordingStrategy
from flower_focal.strategy.recorder import NothingAggregated
from flower_focal.strategy.roster import InstitutionRoster, OrderedGrid, seeded_random

__all__ = ["FedAvg", "NothingAggregated"]


class FedAvg(RecordingStrategy, FlowerFedAvg):
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
        are plain FedAvg (the step is skipped). The momentum belongs to the instance: a second
        ``start`` on the same object continues it (as with Flower's ``FedAvgM``); use a new
        strategy per run.
    **fedavg_kwargs
        Forwarded unchanged to :class:`flwr.serverapp.strategy.FedAvg`
        (``fraction_train``, ``min_available_nodes``, ...). Metric aggregation defaults to
        :func:`flower_focal.metrics.nan_weighted_average`.

    Roster, history, byte counts and checkpoints are the :attr:`recorder`'s
    (:class:`~flower_focal.strategy.recorder.RunRecorder`).
    """

    name = "fedavg"

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
        self._init_recorder(roster=roster, history=history, checkpoint_dir=checkpoint_dir)
        self.min_train_replies = max(1, min_train_replies)
        self.server_opt = ServerOpt(server_momentum, server_lr)
        self._round_start: ArrayRecord | None = None  # the global the current round trains from
        self._velocity: dict[str, np.ndarray] | None = None  # FedAvgM momentum (None: not started)

    def summary(self) -> None:
        """Log Flower's FedAvg summary plus the sampling seed."""
        super().summary()
        log(INFO, "\t└──> Sampling seed: %d (partition-ordered, reproducible)", self.seed)
        if self.server_opt.active:
            log(INFO, "\t└──> Server optimiser FedAvgM: momentum %g, server lr %g",
                self.server_opt.momentum, self.server_opt.lr)

    def server_state(self) -> ArrayRecord:
        """fedavg: the FedAvgM momentum (empty without a server optimiser)."""
        if self._velocity is None:
            return ArrayRecord()
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in self._velocity.items()})

    def restore_server_state(self, state: ArrayRecord) -> None:
        """Continue from a checkpoint's :meth:`server_state`."""
        self._velocity = {k: a.numpy() for k, a in state.items()} if len(state) else None

    def final_model(self, result: Result) -> ArrayRecord | None:
        """The plaintext global model the server may write to disk (HE strategies: None)."""
        return result.arrays

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's FedAvg sampling, made deterministic; counts bytes sent."""
        self.roster.refresh(grid)
        self.recorder.hold(arrays)
        self._round_start = arrays
        with seeded_random(self.seed, server_round, "train"):
            messages = list(
                super().configure_train(server_round, arrays, config, OrderedGrid(grid, self.roster))
            )
        return self.recorder.count_sent(server_round, self._train_messages(messages))

    def _train_messages(self, messages: list[Message]) -> list[Message]:
        """The round's training messages before they are counted and sent (subclasses add to them)."""
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record each institution, then aggregate in partition order (:meth:`_aggregate_arrays`)."""
        replies = self.roster.sort_replies(replies)
        self.recorder.record_replies(server_round, replies, phase="train")
        arrays, metrics = self._aggregate_arrays(server_round, replies)
        if arrays is None and metrics is None:  # too few replies (recorded why)
            return None, None
        return self._aggregated(server_round, arrays, metrics), metrics

    def _aggregated(self, server_round: int, arrays: ArrayRecord | None,
                    metrics: MetricRecord | None) -> ArrayRecord | None:
        """The round's outcome, recorded (``None``: the round failed, the model stays)."""
        return self.recorder.aggregated(server_round, arrays, metrics)

    def _aggregate_arrays(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The seam subclasses override: the round's new global arrays and training metrics
        from ``replies`` (recorded, in partition order), or ``(None, None)`` after
        ``recorder.enough_replies`` said no. Here: Flower's FedAvg weighted average, then the
        FedAvgM step when a server optimiser is set."""
        if not self.recorder.enough_replies(server_round, sum(not r.has_error() for r in replies),
                                            self.min_train_replies):
            return None, None
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.server_opt.active:
            arrays = self._server_step(arrays)
        return arrays, metrics

    def _server_step(self, average: ArrayRecord) -> ArrayRecord:
        """FedAvgM from the global this round trained from to the new one (:meth:`ServerOpt.step`)."""
        if self._round_start is None:
            raise RuntimeError("server optimiser: aggregate_train ran before configure_train")
        old = {k: a.numpy() for k, a in self._round_start.items()}
        new, self._velocity = self.server_opt.step(old, {k: a.numpy() for k, a in average.items()},
                                                   self._velocity)
        return ArrayRecord({k: Array(new[k]) for k in average.keys()})

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's FedAvg evaluation sampling, made deterministic; counts bytes sent."""
        self.recorder.hold(arrays)  # the global model as it now is (after any wrapper's noise)
        with seeded_random(self.seed, server_round, "evaluate"):
            messages = list(
                super().configure_evaluate(
                    server_round, arrays, config, OrderedGrid(grid, self.roster)
                )
            )
        return self.recorder.count_sent(server_round, messages, phase="evaluate")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each institution's metrics and the federation's weighted mean; checkpoint."""
        replies = self.roster.sort_replies(replies)
        self.recorder.record_replies(server_round, replies, phase="evaluate")
        metrics = super().aggregate_evaluate(server_round, replies)
        self.recorder.evaluated(server_round, metrics)
        return metrics
