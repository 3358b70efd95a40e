"""The one interface :func:`flower_focal.server.run_server` talks to every strategy through.

:class:`RecordingStrategy` is a mixin put in front of a Flower strategy class
(``class FedAvg(RecordingStrategy, flwr.serverapp.strategy.FedAvg)``, ``class
Focal(RecordingStrategy, flwr.serverapp.strategy.Strategy)``). It declares what the server asks
of a flower-focal strategy, with the plaintext defaults, and gives it a
:class:`~flower_focal.strategy.recorder.RunRecorder`. Flower's own ``Strategy.start`` drives the
rounds; :meth:`RecordingStrategy.start` only refuses what the strategy cannot do, releases what it
holds and refuses to report success for a run that trained nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from flower_focal.artifacts import ModelSpec
from flower_focal.grid import PromptGrid
from flower_focal.history import RunHistory
from flower_focal.strategy.recorder import RunRecorder
from flower_focal.strategy.roster import InstitutionRoster


class RecordingStrategy:
    """What every flower-focal strategy offers the server (see module doc).

    Subclasses set :attr:`recorder` in ``__init__`` (:meth:`_init_recorder`).
    """

    name: ClassVar[str] = "strategy"
    uses_initial_model: ClassVar[bool] = True
    """The server sends a (public, seeded) initial model; FOCAL's head comes from an institution."""
    recorder: RunRecorder

    def _init_recorder(self, *, roster: InstitutionRoster | None = None, history: RunHistory | None = None,
                       checkpoint_dir: Path | None = None) -> None:
        self.recorder = RunRecorder(self.name, roster=roster, history=history, checkpoint_dir=checkpoint_dir,
                                    state=self.server_state)

    # the recorder's parts, by their old names
    @property
    def roster(self) -> InstitutionRoster:
        """The recorder's :class:`~flower_focal.strategy.roster.InstitutionRoster`."""
        return self.recorder.roster

    @property
    def history(self) -> RunHistory:
        """The recorder's :class:`~flower_focal.history.RunHistory`."""
        return self.recorder.history

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn: Any = None) -> Result:
        """Flower's round loop on a :class:`~flower_focal.grid.PromptGrid` that hands each reply
        to :meth:`on_reply` as it arrives; then :meth:`close`, and :meth:`require_progress`.

        Raises
        ------
        NothingAggregated
            When ``num_rounds > 0`` and no round aggregated a single training reply (every
            institution failed, or every reply was rejected); the message carries the first
            institution errors, so the cause is in the run's error rather than deep in a log.
        """
        self.check_evaluate_fn(evaluate_fn)
        if not (isinstance(grid, PromptGrid) and grid.on_reply == self.on_reply):  # another's: re-wrap
            grid = PromptGrid(grid, on_reply=self.on_reply)
        try:
            result = super().start(  # type: ignore[misc]
                grid, initial_arrays, num_rounds=num_rounds, timeout=timeout, train_config=train_config,
                evaluate_config=evaluate_config, evaluate_fn=evaluate_fn)
        finally:
            self.close()
        self.require_progress(num_rounds)
        return result

    def on_reply(self, reply: Message) -> Message:
        """Each reply the moment it arrives (:class:`~flower_focal.grid.PromptGrid` calls it);
        what it returns is what the round's aggregation gets. Here: the reply unchanged."""
        return reply

    def close(self) -> None:
        """Release what the strategy holds between rounds (processes, shards); idempotent."""

    def check_evaluate_fn(self, evaluate_fn: Any) -> None:
        """Strategies whose server holds no plaintext model refuse server-side evaluation."""

    def require_progress(self, num_rounds: int) -> None:
        """Raise :class:`~flower_focal.strategy.recorder.NothingAggregated` if ``num_rounds``
        rounds ran and none aggregated."""
        self.recorder.require_progress(num_rounds)

    def server_state(self) -> ArrayRecord:
        """What a checkpoint must hold besides the global state for the server optimiser to
        continue after a resume (empty without one)."""
        return ArrayRecord()

    def restore_server_state(self, state: ArrayRecord) -> None:
        """Continue from a checkpoint's :meth:`server_state` (nothing to restore here)."""

    def bind_initial_model(self, arrays: ArrayRecord) -> None:
        """Called with the (public) initial model before the first round, also on resume."""
        self.recorder.hold(arrays)

    def final_model(self, result: Result) -> ArrayRecord | None:
        """The plaintext global model the server may write to disk (None: it holds none)."""
        return None

    def final_ciphertext(self, result: Result) -> tuple[ArrayRecord, Any] | None:
        """The encrypted final model and its layout, for strategies that only hold ciphertext."""
        return None

    def final_spec(self, spec: ModelSpec) -> ModelSpec:
        """The spec written with the final model (strategies with another model change it)."""
        return spec
