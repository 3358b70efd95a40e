"""FedAvg on Flower's Message API, made reproducible and observable.

Flower's :class:`flwr.serverapp.strategy.FedAvg` does the work (sampling, weighted averaging,
the round loop in ``Strategy.start``). This subclass only adds what a medical-imaging study
needs around it:

* deterministic sampling and aggregation order (:mod:`flower_focal.strategy.roster`),
* per-institution and federation metrics for every round in a :class:`RunHistory`,
* NaN-aware weighted metric averaging (an institution whose validation split lacks a class
  reports an undefined AUROC, which must not poison the federation mean),
* bytes sent and received per round.

HE-FedAvg and FOCAL build on it, so every strategy reports the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from flower_focal.artifacts import ModelSpec
from flower_focal.checkpoint import Checkpoint, save_checkpoint
from flower_focal.history import RunHistory, array_bytes, metric_dict, reply_bytes
from flower_focal.metrics import nan_weighted_average
from flower_focal.packing import ArrayLayout
from flower_focal.strategy.roster import InstitutionRoster, OrderedGrid, seeded_random


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
    **fedavg_kwargs
        Forwarded unchanged to :class:`flwr.serverapp.strategy.FedAvg`
        (``fraction_train``, ``min_available_nodes``, ...). Metric aggregation defaults to
        :func:`flower_focal.metrics.nan_weighted_average`.
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
        self._global: ArrayRecord | None = None  # what the server holds after the last round

    def summary(self) -> None:
        """Log Flower's FedAvg summary plus the sampling seed."""
        super().summary()
        log(INFO, "\t└──> Sampling seed: %d (partition-ordered, reproducible)", self.seed)

    def bind_initial_model(self, arrays: ArrayRecord) -> None:
        """Called with the (public) initial model before the first round, also on resume."""
        self._global = arrays

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
        self._global = arrays
        with seeded_random(self.seed, server_round, "train"):
            messages = list(
                super().configure_train(server_round, arrays, config, OrderedGrid(grid, self.roster))
            )
        return self._count_sent(server_round, messages)

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
        if arrays is not None:
            self._global = arrays
        return arrays, metrics

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
        return self._count_sent(server_round, messages)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each institution's metrics and the federation's weighted mean."""
        replies = self.roster.sort_replies(replies)
        self._record_replies(server_round, replies, phase="evaluate")
        metrics = super().aggregate_evaluate(server_round, replies)
        self.history.round(server_round).evaluate = metric_dict(metrics)
        self.history.close_round(server_round)
        if self.checkpoint_dir is not None and self._global is not None:
            save_checkpoint(self.checkpoint_dir, Checkpoint(
                server_round, self._global, self.history.to_json(), self.history.config))
        return metrics

    # ------------------------------------------------------------------ helpers
    def _enough_replies(self, server_round: int, received: int) -> bool:
        if received >= self.min_train_replies:
            return True
        msg = (f"round {server_round}: {received} training replies < min-train-replies "
               f"{self.min_train_replies}; the global model is left unchanged")
        log(WARNING, msg)
        self.history.round(server_round).failures.append(msg)
        return False

    def _count_sent(self, server_round: int, messages: list[Message]) -> list[Message]:
        record = self.history.round(server_round)
        for message in messages:
            record.bytes_down += sum(array_bytes(a) for a in message.content.array_records.values())
        return messages

    def _record_replies(self, server_round: int, replies: list[Message], phase: str) -> None:
        record = self.history.round(server_round)
        per_institution = record.train_institutions if phase == "train" else record.evaluate_institutions
        for reply in replies:
            pid = self.roster.partition_of(reply.metadata.src_node_id)
            record.bytes_up += reply_bytes(reply)
            if reply.has_error():
                record.failures.append(f"{phase} institution {pid}: {reply.error.reason}")
                continue
            for metrics in reply.content.metric_records.values():
                per_institution[pid] = metric_dict(metrics)
