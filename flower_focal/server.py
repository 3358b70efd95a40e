"""The server side of one run: discover the federation, run the strategy, write the run directory.

:func:`run_server` is what ``strategies/server_app.py`` calls; a consortium's own ServerApp can
call it too. It never touches institution data: the model's shape comes from the institutions'
answers to the describe query.

Run directory contents: ``metrics.json`` (updated every round), ``curves.png``, ``summary.md``,
``model.pt`` + ``model.json`` (final global model, for strategies whose server holds it in
plaintext), ``config.json`` (the run config).
"""

from __future__ import annotations

import traceback
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from flower_focal import wire
from flower_focal.checkpoint import CHECKPOINT_FILE, RoundOffset, check_compatible, load_checkpoint
from flower_focal.artifacts import ModelSpec, save_encrypted_model, save_model
from flower_focal.config import RunConfig
from flower_focal.grid import PromptGrid
from flower_focal.history import RunHistory, write_json_atomic
from flower_focal.models import build_model, count_parameters
from flower_focal.reporting import plot_curves, write_summary
from flower_focal.strategy.base import RecordingStrategy
from flower_focal.strategy.registry import build_strategy, core_strategy


def resolve_run_dir(cfg: RunConfig, run_id: int | str) -> Path:
    """``cfg.run_dir`` as an absolute path, or ``./runs/<run_id>`` when empty."""
    base = Path(cfg.run_dir) if cfg.run_dir else Path.cwd() / "runs" / str(run_id)
    return base.expanduser().resolve()


def run_server(grid: Grid, cfg: RunConfig, run_id: int | str = "local") -> Result:
    """Run ``cfg.strategy`` for ``cfg.num_server_rounds`` rounds and write the run directory.

    Raises whatever the strategy raises, after writing ``metrics.json`` and ``summary.md``
    with status ``failed`` so that a failed run never looks like a finished one.
    """
    run_dir = resolve_run_dir(cfg, run_id)
    history = _open_run_dir(cfg, run_dir)
    try:
        checkpoint = _checkpoint_to_resume(cfg, run_dir, history)
        driver = build_strategy(cfg)  # what Flower's loop runs (may wrap the core strategy)
        strategy = core_strategy(driver)
        strategy.recorder.attach(history, run_dir)
        # replies collected as they arrive (not on Flower's 3 s poll tick), each handed to the strategy
        grid = PromptGrid(grid, on_reply=strategy.on_reply)
        shape = _discover(strategy, grid, history)
        initial = _initial_model(cfg, strategy, shape, history)
        if checkpoint is not None:  # the server optimiser's state (empty without one)
            strategy.restore_server_state(checkpoint.state)
        result = _run_rounds(cfg, driver, strategy, grid, shape, initial, checkpoint)
        history.status = "completed"
    except BaseException as exc:
        history.status = "failed"
        history.info["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        raise
    finally:
        history.save(run_dir / "metrics.json")
        write_summary(history, run_dir / "summary.md")
        if history.rounds:
            plot_curves(history, run_dir / "curves.png")
    _write_final_model(cfg, strategy, shape, result, run_dir)
    log(INFO, "flower-focal: run directory %s", run_dir)
    return result


def _open_run_dir(cfg: RunConfig, run_dir: Path) -> RunHistory:
    """Create the run directory, write ``config.json``; the history that becomes ``metrics.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log(INFO, "flower-focal: strategy=%s, writing the run directory %s", cfg.strategy, run_dir)
    write_json_atomic(run_dir / "config.json", cfg.to_flower())
    return RunHistory(strategy=cfg.strategy, config=cfg.to_flower(), path=run_dir / "metrics.json")


def _checkpoint_to_resume(cfg: RunConfig, run_dir: Path, history: RunHistory):
    """``resume=true``: the run directory's checkpoint (checked against this config), else None."""
    checkpoint = load_checkpoint(run_dir) if cfg.resume else None
    if checkpoint is not None:
        check_compatible(checkpoint, history.config)
        history.restore(checkpoint.history)
    return checkpoint


def _discover(strategy: RecordingStrategy, grid: Grid, history: RunHistory):
    """Ask the institutions for the data shape (the model's in-channels and classes)."""
    shape = strategy.roster.data_shape(grid)
    history.info.update(
        num_classes=shape.num_classes,
        in_channels=shape.in_channels,
        institutions=len(strategy.roster.ordered_node_ids(grid.get_node_ids())),
    )
    return shape


def _initial_model(cfg: RunConfig, strategy: RecordingStrategy, shape, history: RunHistory) -> ArrayRecord:
    """The seeded public initial model (FOCAL: empty, an institution makes the encrypted head)."""
    initial = ArrayRecord()
    if strategy.uses_initial_model:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, shape.in_channels, shape.num_classes, cfg.image_size)
        history.info["model_parameters"] = count_parameters(model)
        initial = ArrayRecord(model.state_dict())
    strategy.bind_initial_model(initial)
    return initial


def _run_rounds(cfg: RunConfig, driver: Strategy, strategy: RecordingStrategy, grid: Grid, shape,
                initial: ArrayRecord,
                checkpoint) -> Result:
    """Flower's round loop for the rounds left (after a resumed checkpoint's); raises
    :class:`~flower_focal.strategy.NothingAggregated` when no round trained anything."""
    shared = ConfigRecord({wire.NUM_CLASSES: shape.num_classes, wire.IN_CHANNELS: shape.in_channels})
    done = checkpoint.server_round if checkpoint is not None else 0
    if done:
        log(INFO, "flower-focal: resuming after round %d from %s", done, CHECKPOINT_FILE)
        driver = RoundOffset(driver, done)
    try:
        result = driver.start(
            grid,
            checkpoint.arrays if checkpoint is not None else initial,
            num_rounds=max(cfg.num_server_rounds - done, 0),
            timeout=cfg.round_timeout,
            train_config=shared,
            evaluate_config=ConfigRecord(dict(shared)),
        )
    finally:  # also when RoundOffset's loop ran instead of the strategy's own start()
        strategy.close()
    strategy.require_progress(max(cfg.num_server_rounds - done, 0))
    if checkpoint is not None and not result.arrays:  # nothing was left to run
        result.arrays = checkpoint.arrays
    return result


def _write_final_model(cfg: RunConfig, strategy: RecordingStrategy, shape, result: Result,
                       run_dir: Path) -> None:
    """``model.pt`` + ``model.json`` (plaintext strategies) or ``model.he`` (encrypted ones)."""
    spec = ModelSpec(
        model=cfg.model,
        in_channels=shape.in_channels,
        num_classes=shape.num_classes,
        image_size=cfg.image_size,
        dataset=cfg.dataset,
        strategy=cfg.strategy,
        seed=cfg.seed,
        rounds=cfg.num_server_rounds,
        fedbn=cfg.fedbn,
    )
    spec = strategy.final_spec(spec).with_local_layers()
    if spec.untrained_norm:
        log(WARNING, "flower-focal: %s (flower-focal evaluate refuses model.pt unless given "
            "--initial-norm-layers)", spec.norm_warning)
    final = strategy.final_model(result)
    encrypted = strategy.final_ciphertext(result)
    if final is not None:
        path = save_model(run_dir, final, spec)
        log(INFO, "flower-focal: final global model written to %s", path)
    elif encrypted is not None:
        path = save_encrypted_model(run_dir, *encrypted, spec)
        log(INFO, "flower-focal: encrypted final global model written to %s (decrypt it where "
            "the secret key lives: flower-focal decrypt-model --run-dir DIR --key DIR)", path)
