"""FOCAL on Flower: the server trains a linear head on encrypted embeddings, message by message.

This module owns the mapping of the step functions of :mod:`flower_focal.focal.protocol` onto
Flower rounds; the protocol itself and all HE live there and in :mod:`flower_focal.crypto`.

* **Setup (inside round 1's** ``configure_train`` **).** With ``standardize`` (default) a
  first :data:`~flower_focal.wire.ACTION_EMBED` exchange collects every institution's
  encrypted per-feature sums and sums of squares; the server adds them and sends the encrypted
  totals back, institutions decrypt them (global mean / std; the server learns nothing).
  Then the embed exchange: every institution uploads ``Enc([(x - mean) / std, 1])`` of its
  frozen-backbone embeddings; the lowest partition id also uploads the initial encrypted head
  (keys are symmetric, the server cannot encrypt); with ``class_weights="balanced"`` each
  also uploads ``Enc(class counts)``, which the server only adds.
* **Every round = one step** (or ``steps_per_round``, the extra ones exchanged inside
  ``aggregate_train``): server forward, one :data:`~flower_focal.wire.ACTION_FOCAL` message per
  institution carrying only *its* encrypted logits, institutions answer with their encrypted
  error, the server sums over institutions and updates ``W`` (additions and one
  multiply/rotate pass on ciphertexts). A failed or missing institution is left out of that
  step; the others need no change (the error is divided by the public ``N``). The step is
  :func:`~flower_focal.focal.derived_step` unless ``lr`` is given; institutions apply Nesterov
  ``momentum`` to their own errors. The loss guard (:class:`~flower_focal.focal.LossGuard`)
  reads the institutions' reported training loss: when it rises the server restores the head
  before the last update, halves the step and restarts momentum; the last round ends with a
  loss-only check of the final update; it stops the run with
  :class:`~flower_focal.focal.FocalDiverged` when halving does not help, and a run in which no
  update stands (every one rolled back) ends with that error too instead of reporting the
  initial head as trained. A resumed run's rollback point is the checkpointed head: a rise at
  its first step keeps that head, halves the step and compares from its loss on.
* **Evaluation is federated** (:data:`~flower_focal.wire.ACTION_FOCAL_EVALUATE`): with the
  embeddings, institutions upload their validation embeddings encrypted the same way; each
  evaluation the server runs the forward pass on them and sends each sampled institution only
  its own encrypted validation logits; it decrypts them and reports loss / accuracy / macro
  AUROC. ``W``'s ciphertexts are sent to no institution during training (each can still solve
  for ``W`` from its own logits and features: bandwidth, not secrecy).

:class:`Focal` stands on Flower's :class:`~flwr.serverapp.strategy.Strategy` (whose ``start``
drives the rounds) and on :class:`~flower_focal.strategy.base.RecordingStrategy`, the interface
the server uses; every strategy-level record (roster, deterministic order, per-institution
history, bytes, checkpoints) is its :class:`~flower_focal.strategy.recorder.RunRecorder`'s. The server never holds a
secret key, nor plaintext images, embeddings, labels, logits, errors or weights.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency
from flwr.supercore import log

from flower_focal import wire
from flower_focal.artifacts import ModelSpec
from flower_focal.checkpoint import CHECKPOINT_FILE
from flower_focal.crypto import (
    FOCAL_PRESETS,
    CiphertextError,
    CkksEvaluator,
    PublicContext,
)
from flower_focal.focal import (
    MOMENTUM,
    STEP_SCALE,
    FocalLayout,
    FocalServer,
    LossGuard,
    derived_step,
    moment_count,
    server_add_embeddings,
    server_add_validation,
    server_backward_update,
    server_export_head,
    server_forward,
    server_forward_validation,
    server_restore,
    server_setup,
    server_snapshot,
    server_sum,
)
from flower_focal.focal.errors import FocalDiverged, InstitutionUploadError
from flower_focal.history import RunHistory
from flower_focal.metrics import nan_weighted_average
from flower_focal.strategy.base import RecordingStrategy
from flower_focal.strategy.roster import InstitutionRoster, OrderedGrid, seeded_random
from flower_focal.timing import Stopwatch
from flower_focal.wire import he_array, he_bytes

CLASS_WEIGHTS = ("none", "balanced")
MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


class MixedBackbones(RuntimeError):
    """Institutions embedded with different frozen backbones: one head cannot fit them all."""


def check_same_backbone(contents: dict[int, RecordDict]) -> None:
    """Refuse embed replies whose backbone fingerprints differ (replies without one, e.g. from
    an arbitrary callable backbone, cannot be checked and are let through)."""
    groups: dict[str, list[int]] = {}
    for pid, content in contents.items():
        config = content.config_records.get(wire.CONFIG)
        fp = config.get(wire.BACKBONE_FINGERPRINT) if config is not None else None
        if fp:
            groups.setdefault(str(fp), []).append(pid)
    if len(groups) > 1:
        said = "; ".join(f"{fp}: institutions {sorted(p)}" for fp, p in sorted(groups.items()))
        raise MixedBackbones(
            f"focal: the institutions embedded with different frozen backbones ({said}); every "
            "institution must use the same network and weights (a randomly initialised app network: "
            "register_focal(app, backbone=FrozenBackbone(lambda: Net().features, seed=0), ...))")


class Focal(RecordingStrategy, Strategy):
    """FOCAL split training of a linear head on encrypted embeddings (see module doc).

    Parameters
    ----------
    he_public : PublicContext
        The server's key-less context of a FOCAL preset (``public.ctx`` of
        ``flower-focal keygen --preset focal``): relin + Galois keys, no secret key. A context
        holding a secret key, or of another preset, is refused.
    lr : float or None
        Step size on the (standardised) features; ``None`` (default): derived,
        ``step_scale * K / (d + 1)`` (:func:`~flower_focal.focal.derived_step`).
    step_scale, momentum, standardize, guard
        See :func:`~flower_focal.testing.train_encrypted` (the same algorithm).
    block : int
        Sample positions per ciphertext (:class:`~flower_focal.focal.FocalLayout`).
    class_weights : str
        ``"none"`` or ``"balanced"`` (global class counts summed under HE; only institutions
        decrypt them).
    steps_per_round : int
        Gradient steps per Flower round (the extra ones are exchanged in ``aggregate_train``).
    exchange_timeout : float
        Seconds to wait for the extra exchanges (embeddings, extra steps).
    backbone, backbone_weights, backbone_input_size
        Recorded in the model spec of the final model (institutions embed with the same).
    num_rounds : int
        The run's last round (the loss guard checks the final update after it); 0: taken from
        ``start(num_rounds=...)``.
    num_classes : int
        Classes of the head. 0: asked from the institutions (flower-focal's describe query);
        an app whose ClientApp does not answer it must give it here.
    seed : int
        Seeds the initial head and the sampling of institutions for evaluation.
    fraction_evaluate, min_evaluate_nodes : float, int
        As Flower's FedAvg: evaluate this fraction of the institutions with validation
        embeddings, at least ``min_evaluate_nodes`` (0: no evaluation).
    min_train_replies : int
        A step with fewer valid error uploads leaves the head unchanged (and says so).
    roster, history, checkpoint_dir
        As :class:`~flower_focal.strategy.fedavg.FedAvg` (the :attr:`recorder`'s).
    fraction_train, min_train_nodes, min_available_nodes
        Accepted for the shared run config and ignored: every institution known takes part
        in every step.
    weighted_by_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As Flower's FedAvg (defaults: ``num-examples`` and
        :func:`~flower_focal.metrics.nan_weighted_average`).

    It stands on Flower's :class:`~flwr.serverapp.strategy.Strategy`, whose ``start`` drives
    the rounds; roster, history, byte counts and checkpoints are the :attr:`recorder`'s.

    Callers must register :mod:`flower_focal.client.focal`'s handlers for ``train.embed``,
    ``train.focal`` and ``evaluate.focal`` and give institutions the matching ``secret.ctx``.
    """

    name = "focal"
    uses_initial_model = False  # the head is made (encrypted) by an institution, not the server

    def __init__(
        self,
        *,
        he_public: PublicContext,
        lr: float | None = None,
        step_scale: float = STEP_SCALE,
        momentum: float = MOMENTUM,
        standardize: bool = True,
        guard: bool = True,
        block: int = 64,
        class_weights: str = "none",
        steps_per_round: int = 1,
        exchange_timeout: float = 3600.0,
        backbone: str = "",
        backbone_weights: str = "",
        backbone_input_size: int = 0,
        num_classes: int = 0,
        num_rounds: int = 0,
        seed: int = 0,
        fraction_evaluate: float = 1.0,
        min_evaluate_nodes: int = 2,
        min_train_replies: int = 1,
        roster: InstitutionRoster | None = None,
        history: RunHistory | None = None,
        checkpoint_dir: Path | None = None,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = wire.NUM_EXAMPLES,
        train_metrics_aggr_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
    ) -> None:
        if not isinstance(he_public, PublicContext) or he_public.holds_secret_key:
            raise ValueError(
                "Focal must be given a public context (no secret key): load public.ctx with "
                "flower_focal.crypto.PublicContext.load"
            )
        if he_public.preset.name not in FOCAL_PRESETS:
            raise ValueError(
                f"Focal needs keys of a FOCAL preset ({', '.join(FOCAL_PRESETS)}), got "
                f"{he_public.preset.name!r}: run `flower-focal keygen --preset focal`"
            )
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be positive (or None: derived), got {lr!r}")
        if not step_scale > 0:
            raise ValueError(f"step_scale must be positive, got {step_scale!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"class_weights must be one of {CLASS_WEIGHTS}, got {class_weights!r}")
        if isinstance(steps_per_round, bool) or not isinstance(steps_per_round, int) or steps_per_round < 1:
            raise ValueError(f"steps_per_round must be an int >= 1, got {steps_per_round!r}")
        self.seed = seed
        self.fraction_evaluate = fraction_evaluate
        self.min_evaluate_nodes = min_evaluate_nodes if fraction_evaluate > 0 else 0
        self.min_train_replies = max(1, min_train_replies)
        self.weighted_by_key = weighted_by_key
        self.train_metrics_aggr_fn = train_metrics_aggr_fn or nan_weighted_average
        self.evaluate_metrics_aggr_fn = evaluate_metrics_aggr_fn or nan_weighted_average
        del fraction_train, min_train_nodes, min_available_nodes  # every institution, every step
        self._init_recorder(roster=roster, history=history, checkpoint_dir=checkpoint_dir)
        self.he_public = he_public
        self.evaluator = CkksEvaluator(he_public)
        self.lr = None if lr is None else float(lr)
        self.step_scale = float(step_scale)
        self.momentum = float(momentum)
        self.standardize = bool(standardize)
        self.guard_on = bool(guard)
        self.guard: LossGuard | None = None
        self._moments: bytes | None = None
        self._stats_n = 0
        self._num_rounds = int(num_rounds)
        self.block = int(block)
        self.class_weights = class_weights
        self.steps_per_round = steps_per_round
        self.exchange_timeout = exchange_timeout
        self.backbone = (backbone, backbone_weights, backbone_input_size)
        self.num_classes = int(num_classes)
        self.layout: FocalLayout | None = None
        self._server: FocalServer | None = None
        self._members: dict[int, str] = {}  # node id -> institution name, partition order
        self._n_total = 0
        self._class_counts: bytes | None = None
        self._grid: Grid | None = None
        self._step = 0
        self._rolled_back = False
        self._standing = 0  # head updates in the current head (applied and not rolled back)
        self._applied = 0  # head updates applied by this process (rolled back or not)
        self._pending = False  # the last update is not yet checked (the rollback point is before it)
        self._rollback_to = "initial"  # the rollback point: "initial" / "checkpoint" (setup) or "snapshot"
        self._resumed_after = 0  # the checkpoint's round, when resumed

    # ------------------------------------------------------------------ hooks
    def summary(self) -> None:
        """Sampling and FOCAL parameters (never keys)."""
        log(INFO, "\t├──> Every institution takes part in every step (min-train-replies %d); evaluate "
            "%.2f of those with validation embeddings (at least %d); seed %d", self.min_train_replies,
            self.fraction_evaluate, self.min_evaluate_nodes, self.seed)
        p = self.he_public.preset
        log(INFO, "\t└──> FOCAL: preset %s, fingerprint %s, block %d, step %s, momentum %g, "
            "standardise %s, loss guard %s, %d step(s)/round, class weights %s; server holds no "
            "secret key", p.name, self.he_public.fingerprint.hex(), self.block,
            f"lr {self.lr:g}" if self.lr is not None else f"derived (scale {self.step_scale:g})",
            self.momentum, self.standardize, self.guard_on, self.steps_per_round, self.class_weights)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn: Any = None) -> Result:
        """Flower's round loop (:meth:`RecordingStrategy.start`: the FOCAL server state, its
        worker shards, is released afterwards); ``num_rounds`` is the run's last round unless
        the constructor was given one."""
        if not self._num_rounds:
            self._num_rounds = int(num_rounds)
        return super().start(grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                             train_config=train_config, evaluate_config=evaluate_config,
                             evaluate_fn=evaluate_fn)

    @classmethod
    def from_key_dir(cls, key_dir: str | Path, **kwargs: Any) -> Focal:
        """A FOCAL strategy with the server's ``public.ctx`` from ``key_dir``
        (``flower-focal keygen --preset focal`` output; the server reads nothing else)."""
        return cls(he_public=PublicContext.from_key_dir(key_dir, " --preset focal"), **kwargs)

    def check_evaluate_fn(self, evaluate_fn: Any) -> None:
        """Refuse server-side evaluation: the server never holds the plaintext head."""
        if evaluate_fn is not None:
            raise ValueError(
                "Focal cannot run an evaluate_fn: the server only ever holds the encrypted head. "
                "Evaluation is federated (evaluate.focal on each institution's validation data); "
                "or decrypt the final head at an institution (flower-focal decrypt-model).")

    def save_final_model(self, result: Result, path: str | Path) -> Path:
        """Write the encrypted final head (``path``, e.g. ``final_head.he``, plus ``path.json``).

        ``flower-focal decrypt-model --model PATH --key KEYS`` turns it into the state dict of an
        ``nn.Linear(d, K)`` to put on top of the backbone.
        """
        final = self.final_ciphertext(result)
        if final is None:
            raise RuntimeError("focal: the run has no encrypted head (no round aggregated)")
        from flower_focal.encrypted_model import save_focal_head

        return save_focal_head(final[0][wire.FOCAL_HEAD].data, final[1], path,
                               moments=self._moments, stats_n=self._stats_n)  # type: ignore[arg-type]

    def close(self) -> None:
        """Release the server state (idempotent)."""
        if self._server is not None:
            self._server.close()

    def final_ciphertext(self, result: Result) -> tuple[ArrayRecord, Any] | None:
        """The encrypted head and its :class:`~flower_focal.focal.FocalLayout`."""
        if self.layout is None or wire.FOCAL_HEAD not in result.arrays:
            return None
        if self._moments is None:
            return result.arrays, self.layout
        # a standardised run: the encrypted totals go with the head (decrypting folds them in)
        import numpy as np
        from flwr.app import Array

        return ArrayRecord({wire.FOCAL_HEAD: result.arrays[wire.FOCAL_HEAD],
                            wire.FOCAL_MOMENTS: he_array(self._moments),
                            wire.FOCAL_STATS_N: Array(np.array([self._stats_n], np.int64))}), self.layout

    def final_spec(self, spec: ModelSpec) -> ModelSpec:
        """The final model is the frozen backbone plus the linear head."""
        name, weights, size = self.backbone
        return spec.replace(model="focal-linear", backbone=name, backbone_weights=weights,
                            backbone_input_size=size, fedbn=False)  # a frozen backbone: no FedBN

    # ------------------------------------------------------------------ setup
    def _base_config(self, server_round: int) -> ConfigRecord:
        cfg = ConfigRecord({
            wire.SERVER_ROUND: server_round,
            wire.HE_FINGERPRINT: self.he_public.fingerprint.hex(),
            wire.FOCAL_SLOTS: self.evaluator.slots,
            wire.FOCAL_BLOCK: self.block,
            wire.FOCAL_CLASS_WEIGHTS: self.class_weights,
        })
        if self.layout is not None:
            cfg[wire.FOCAL_N_FEATURES] = self.layout.n_features
            cfg[wire.NUM_CLASSES] = self.layout.n_classes
        if self._moments is not None:
            cfg[wire.FOCAL_STATS_N] = self._stats_n
        return cfg

    def _setup(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> None:
        """The embed exchange: encrypted embeddings of all, initial head of the first."""
        if self.num_classes > 0:
            self.roster.refresh(grid)
            num_classes = self.num_classes
        else:
            try:
                num_classes = self.roster.data_shape(grid).num_classes
            except RuntimeError as exc:
                raise RuntimeError(f"focal: the number of classes is unknown: give Focal(num_classes=K) "
                                   f"or answer flower-focal's describe query ({exc})") from None
        nodes = self.roster.ordered_node_ids(grid.get_node_ids())
        if not nodes:
            raise RuntimeError("focal: no institution is known; nothing to train on")
        resumed = wire.FOCAL_HEAD in arrays and arrays[wire.FOCAL_HEAD].stype == wire.HE_STYPE
        if self.standardize:
            self._collect_moments(server_round, nodes, num_classes, grid)
        messages = []
        for i, node in enumerate(nodes):
            config = self._base_config(server_round)
            config[wire.NUM_CLASSES] = num_classes
            config[wire.FOCAL_INIT_HEAD] = i == 0 and not resumed
            config[wire.FOCAL_INIT_SEED] = self.seed
            config[wire.FOCAL_VALIDATION] = self.fraction_evaluate > 0  # evaluation needs them
            content = RecordDict({wire.CONFIG: config})
            if self._moments is not None:
                content[wire.ARRAYS] = ArrayRecord({wire.FOCAL_MOMENTS: he_array(self._moments)})
            messages.append(Message(content, dst_node_id=node, message_type=wire.ACTION_EMBED))
        replies = self.roster.sort_replies(
            grid.send_and_receive(self.recorder.count_sent(server_round, messages), timeout=self.exchange_timeout))
        ok: list[tuple[int, int, RecordDict]] = []
        for reply in replies:
            pid = self.roster.label_of(reply.metadata.src_node_id)
            self.recorder.count_received(server_round, [reply])
            if reply.has_error():
                self.recorder.failure(server_round, f"embed institution {pid}: {reply.error.reason}")
                log(WARNING, "focal: institution %d failed to upload embeddings: %s", pid, reply.error.reason)
                continue
            ok.append((reply.metadata.src_node_id, pid, reply.content))
        head = arrays[wire.FOCAL_HEAD].data if resumed else None
        if head is None:
            first = [c for n, _, c in ok if n == nodes[0]]
            if not first:
                raise RuntimeError(
                    f"focal: institution {self.roster.label_of(nodes[0])} (lowest partition id) "
                    "did not upload the initial head; see its ClientApp log")
            head = he_bytes(first[0][wire.ARRAYS], wire.FOCAL_HEAD)
            dim = int(first[0][wire.METRICS][wire.EMBED_DIM])
        else:
            dim = int(ok[0][2][wire.METRICS][wire.EMBED_DIM]) if ok else 0
        self.layout = FocalLayout(dim, num_classes, self.evaluator.slots, self.block)
        self._server = server_setup(self.evaluator, self.layout, bytes(head))
        check_same_backbone({pid: content for _, pid, content in ok})
        counts = []
        for node, pid, content in ok:
            name = str(pid)
            try:
                got = int(content[wire.METRICS][wire.EMBED_DIM])
                if got != dim:
                    raise ValueError(f"embedding dimension {got} != {dim} of the others (another backbone?)")
                server_add_embeddings(self._server, name, he_bytes(content[wire.ARRAYS], wire.FOCAL_EMBEDDINGS))
                if self.class_weights == "balanced":
                    counts.append(he_bytes(content[wire.ARRAYS], wire.FOCAL_CLASS_COUNTS))
            except (CiphertextError, ValueError, KeyError) as exc:
                self.recorder.failure(server_round, f"embed institution {pid}: rejected ({exc})")
                log(WARNING, "focal: rejected the embeddings of institution %d: %s", pid, exc)
                continue
            self._members[node] = name
            self._n_total += int(content[wire.METRICS][wire.NUM_EXAMPLES])
            self._add_validation(server_round, pid, name, content)
        if not self._members:
            raise RuntimeError("focal: no institution uploaded usable embeddings")
        if counts:
            self._class_counts = self._sum_counts(counts)
        self._step = (server_round - 1) * self.steps_per_round  # continues after a resume
        self._rollback_to = "checkpoint" if resumed else "initial"
        self._resumed_after = server_round - 1 if resumed else 0
        base = derived_step(self.layout, self.step_scale) if self.lr is None else self.lr
        self.guard = LossGuard(lr=base, setting="focal-step-scale" if self.lr is None else "lr")
        saved = self.recorder.info.get("focal_guard_state") if resumed else None
        if saved:  # a resumed run continues with the step, reference losses of the killed one;
            for name in ("lr", "first", "prev", "backoffs", "restarts"):
                setattr(self.guard, name, saved[name])
            for name in ("members", "first_members"):
                setattr(self.guard, name, tuple(saved[name]) if saved[name] is not None else None)
            self.guard.restarts += 1  # ... but momentum restarts (institution state is not kept)
            self.guard.resume()  # the checkpointed head is the rollback point (server_setup's snapshot)
        # updates already in the checkpointed head (a checkpoint without the count: assume some)
        self._standing = int(saved.get("standing", 1)) if saved else int(resumed)
        self.recorder.info["model_parameters"] = self.layout.d1 * num_classes  # the head W
        log(INFO, "focal: %d institutions, N=%d samples, layout d=%d K=%d block %d%s",
            len(self._members), self._n_total, dim, num_classes, self.block,
            ", head restored from the checkpoint" if resumed else "")

    def _collect_moments(self, server_round: int, nodes: list[int], num_classes: int, grid: Grid) -> None:
        """The statistics exchange: add every institution's encrypted feature moments."""
        messages = []
        for node in nodes:
            config = self._base_config(server_round)
            config[wire.NUM_CLASSES] = num_classes
            config[wire.FOCAL_STATS_ONLY] = True
            messages.append(Message(RecordDict({wire.CONFIG: config}), dst_node_id=node,
                                    message_type=wire.ACTION_EMBED))
        replies = self.roster.sort_replies(
            grid.send_and_receive(self.recorder.count_sent(server_round, messages), timeout=self.exchange_timeout))
        blobs, n, dims = [], 0, set()
        for reply in replies:
            pid = self.roster.label_of(reply.metadata.src_node_id)
            self.recorder.count_received(server_round, [reply])
            if reply.has_error():
                self.recorder.failure(server_round, f"statistics institution {pid}: {reply.error.reason}")
                continue
            try:
                blobs.append(he_bytes(reply.content[wire.ARRAYS], wire.FOCAL_MOMENTS))
                n += int(reply.content[wire.METRICS][wire.NUM_EXAMPLES])
                dims.add(int(reply.content[wire.METRICS][wire.EMBED_DIM]))
            except (KeyError, ValueError) as exc:
                self.recorder.failure(server_round, f"statistics institution {pid}: rejected ({exc})")
        if not blobs or len(dims) != 1:
            raise RuntimeError(f"focal: no usable feature statistics from the institutions (dimensions "
                               f"{sorted(dims)}; see their ClientApp logs)")
        if len(blobs) < 2 and len(nodes) > 1:  # the "global" totals would be one institution's own
            raise RuntimeError(
                f"focal: only {len(blobs)} of {len(nodes)} institutions sent feature statistics; their "
                "total would reveal that institution's per-feature mean and variance to the others "
                "(see the ClientApp logs, or run with focal-standardize=false)")
        layout = FocalLayout(dims.pop(), num_classes, self.evaluator.slots, self.block)
        try:
            self._moments = bytes(server_sum(self.evaluator, blobs, moment_count(layout)))
        except CiphertextError as exc:
            raise RuntimeError(f"focal: an institution's feature statistics are unusable: {exc}") from exc
        self._stats_n = n
        log(INFO, "focal: global feature statistics of %d samples summed under HE", n)

    def _sum_counts(self, blobs: list[bytes]) -> bytes:
        """Add the institutions' encrypted class-count vectors (the server never decrypts)."""
        ev, plan = self.evaluator, self.evaluator.plan
        total = None
        for blob in blobs:
            (ct,) = ev.load(blob, plan.w_level, plan.w_scale, 1)
            total = ct if total is None else ev.add_inplace(total, ct)
        return ev.dump([total])

    # ------------------------------------------------------------------ train
    def _step_messages(self, server_round: int, grid: Grid, check_only: bool = False) -> list[Message]:
        """One step's forward pass: per-institution messages with only its own logits
        (``check_only``: the guard's final check, institutions report the loss only)."""
        if self._server is None or self.guard is None:
            raise RuntimeError("focal: the server state is not set up")
        if not check_only:
            self._step += 1
        online = set(grid.get_node_ids())
        messages = []
        for node, name in self._members.items():
            if node not in online:
                continue
            config = self._base_config(server_round)
            config[wire.FOCAL_STEP] = self._step
            config[wire.FOCAL_N_TOTAL] = self._n_total
            config[wire.FOCAL_LR] = self.guard.lr
            config[wire.FOCAL_MOMENTUM] = self.momentum
            config[wire.FOCAL_RESTART] = self.guard.restarts
            config[wire.FOCAL_CHECK_ONLY] = check_only
            config[wire.FOCAL_GUARD] = self.guard_on
            arrays = ArrayRecord({wire.FOCAL_LOGITS: he_array(server_forward(self._server, name))})
            if self._class_counts is not None:
                arrays[wire.FOCAL_CLASS_COUNTS] = he_array(self._class_counts)
            messages.append(Message(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config}),
                                    dst_node_id=node, message_type=wire.ACTION_FOCAL))
        return self.recorder.count_sent(server_round, messages)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Round 1: the embed exchange first. Then one forward message per institution."""
        self.roster.refresh(grid)
        self._grid = grid
        if wire.FOCAL_HEAD in arrays:
            self.recorder.hold(arrays)  # the encrypted head as the server holds it (checkpoints)
        if self._server is None:
            self._setup(server_round, arrays, grid)
        return self._step_messages(server_round, grid)

    def _update(self, server_round: int, replies: list[Message]) -> list[RecordDict]:
        """Backward/update with the valid error uploads; returns the accepted contents."""
        server = self._server
        if server is None:
            raise RuntimeError("focal: the server state is not set up")
        errors: dict[str, bytes] = {}
        contents: dict[str, RecordDict] = {}
        pids: dict[str, int] = {}
        overflow = [self._members[r.metadata.src_node_id] for r in replies
                    if not r.has_error() and r.metadata.src_node_id in self._members
                    and wire.FOCAL_OVERFLOW in r.content.metric_records.get(wire.METRICS, {})]
        if overflow and self.guard is not None:  # the head's logits left the safe range: a rise
            if not self._pending:  # ... of the rollback point itself: halving cannot change that head
                raise FocalDiverged(self._overflow_at_rollback_point(overflow))
            self.guard.accept(float("inf"), [self._members[r.metadata.src_node_id] for r in replies
                                             if not r.has_error() and r.metadata.src_node_id in self._members])
            self._restore()
            message = self.guard.log_line()
            self.recorder.info.setdefault("focal_guard", []).append(f"step {self._step}: {message}")
            log(WARNING, "focal round %d step %d: %s", server_round, self._step, message)
            self._save_guard_state()
            self._rolled_back = True
            return []
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            pid = self.roster.label_of(node)
            name = self._members.get(node)
            try:
                if name is None:
                    raise ValueError("not a member of this FOCAL run (no embeddings)")
                errors[name] = he_bytes(reply.content[wire.ARRAYS], wire.FOCAL_ERROR)
                contents[name], pids[name] = reply.content, pid
            except (ValueError, KeyError) as exc:
                self.recorder.reject(server_round, pid, f"rejected ({exc})")
        if errors and self.guard_on and self.guard is not None:
            if not self.guard.accept(self._mean_loss(contents), list(errors)):
                self._restore()  # the loss rose: no update; halved step, momentum restarts
                message = self.guard.log_line()
                self.recorder.info.setdefault("focal_guard", []).append(f"step {self._step}: {message}")
                log(WARNING, "focal round %d step %d: %s", server_round, self._step, message)
                self._save_guard_state()
                self._rolled_back = True
                return list(contents.values())
            server_snapshot(server)
            self._rollback_to = "snapshot"
            self._pending = False  # the last update stands: its loss was accepted
        while errors:
            if len(errors) < self.min_train_replies:
                self.recorder.enough_replies(server_round, len(errors), self.min_train_replies)  # records why
                return []
            try:
                server_backward_update(server, errors)
                self._standing += 1
                self._applied += 1
                self._pending = True
                break
            except InstitutionUploadError as exc:
                bad = [exc.institution] if exc.institution in errors else []
                if not bad:
                    raise
                for name in bad:
                    errors.pop(name)
                    contents.pop(name)
                    self.recorder.reject(server_round, pids[name], f"rejected ({exc})")
        self._save_guard_state()
        log(INFO, "focal round %d step %d: updated the head with %d of %d institutions",
            server_round, self._step, len(errors), len(self._members))
        return list(contents.values())

    def _overflow_at_rollback_point(self, names: list[str]) -> str:
        """Why a head whose logits overflow at its rollback point ends the run at once."""
        who = f"institution(s) {', '.join(names)}"
        setting = self.guard.setting if self.guard is not None else "focal-step-scale"
        if self._rollback_to == "checkpoint":
            where = (self.recorder.checkpoint_dir / CHECKPOINT_FILE if self.recorder.checkpoint_dir
                     is not None else CHECKPOINT_FILE)
            return (f"focal: the head restored from the checkpoint {where} (after round "
                    f"{self._resumed_after}) gives logits beyond CKKS's safe range at {who}; it is the "
                    "only head to roll back to (no earlier one is kept), so halving the step cannot help. "
                    f"Start the run again, without resume, with a lower `{setting}`")
        if self._rollback_to == "initial":
            return (f"focal: the initial head gives logits beyond CKKS's safe range at {who}, so halving "
                    "the step cannot help; check the embeddings (NaN/huge features, a wrong backbone)")
        return (f"focal: the head the loss guard rolls back to gives logits beyond CKKS's safe range at "
                f"{who} (not present when its loss was accepted), so halving the step cannot help; "
                f"lower `{setting}` and check that institution's embeddings")

    def _save_guard_state(self) -> None:
        """The guard's state in ``metrics.json`` (a resumed run restores it)."""
        g = self.guard
        if g is not None:
            self.recorder.info["focal_guard_state"] = {
                "lr": g.lr, "first": g.first, "prev": g.prev, "backoffs": g.backoffs,
                "restarts": g.restarts, "members": list(g.members) if g.members else None,
                "first_members": list(g.first_members) if g.first_members else None,
                "standing": self._standing}

    def _restore(self) -> None:
        """The loss guard's rollback: the head before the last update (if one was applied since
        the last snapshot, that update no longer stands)."""
        if self._server is None:
            raise RuntimeError("focal: the server state is not set up")
        server_restore(self._server)
        if self._pending:
            self._standing -= 1
            self._pending = False

    def require_progress(self, num_rounds: int) -> None:
        """The recorder's check, then: refuse a run in which no head update stands.

        Raises
        ------
        NothingAggregated
            No round aggregated a training reply.
        FocalDiverged
            Rounds ran, but the loss guard rolled back every update they applied: the head is
            still the one the run started from (the initial head, or a checkpoint's that had
            no standing update either), so nothing was trained.
        """
        super().require_progress(num_rounds)
        if num_rounds <= 0:  # a resumed run with nothing left: its checkpoint must hold a trained head
            saved = (self.recorder.info.get("focal_guard_state") or {}).get("standing")
            if saved == 0:
                raise FocalDiverged(
                    "focal: the resumed checkpoint holds no head update that stands (that run "
                    "rolled back every update and failed), and no round is left to run: nothing "
                    "was trained. Start a new run with a lower step (`focal-step-scale`)")
            return
        if self.layout is None or self._standing > 0:
            return
        guard = self.guard
        lines = self.recorder.info.get("focal_guard", [])
        raise FocalDiverged(
            f"focal: every head update of this run was rolled back ({self._applied} applied, none "
            "stands): the institutions' decrypted training loss rose after each, so the head is "
            "still the initial one and nothing was trained"
            + (f" (step now {guard.lr:.3g}; lower `{guard.setting}` or run more rounds, and check "
               "the embeddings)" if guard is not None else "")
            + (f". Loss guard: {'; '.join(lines[:2])}" if lines else ""))

    @staticmethod
    def _mean_loss(contents: dict[str, RecordDict]) -> float:
        """The institutions' training loss over all their samples (what the guard reads)."""
        total = n = 0.0
        for content in contents.values():
            m = content[wire.METRICS]
            total += float(m[wire.TRAIN_LOSS]) * float(m[wire.NUM_EXAMPLES])
            n += float(m[wire.NUM_EXAMPLES])
        return total / n if n else float("nan")

    def _final_check(self, server_round: int) -> None:
        """After the last update of the run: the loss at the final head (no upload); restore
        the head before that update if it rose."""
        if self._grid is None or self.guard is None or self._server is None:
            return
        replies = self.roster.sort_replies(self._grid.send_and_receive(
            self._step_messages(server_round, self._grid, check_only=True), timeout=self.exchange_timeout))
        contents = {self._members[r.metadata.src_node_id]: r.content for r in replies
                    if not r.has_error() and r.metadata.src_node_id in self._members}
        if not contents:
            return
        over = any(wire.FOCAL_OVERFLOW in c[wire.METRICS] for c in contents.values())
        loss = float("inf") if over else self._mean_loss(contents)
        self.recorder.info["final_train_loss"] = loss
        if not self.guard.final_ok(loss, list(contents)):
            self._restore()
            self.recorder.info["final_train_loss"] = self.guard.prev
            message = (f"the last update raised the training loss to {loss:.4g}: the head before it "
                       "is kept")
            self.recorder.info.setdefault("focal_guard", []).append(message)
            log(WARNING, "focal: %s", message)
        else:
            self._pending = False  # the last update stands
        self._save_guard_state()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the encrypted errors and update W; run the round's extra steps, if any."""
        replies = self.roster.sort_replies(replies)
        self.recorder.record_replies(server_round, replies, phase="train")
        self._rolled_back = False
        accepted = self._update(server_round, replies)
        for _ in range(1, self.steps_per_round):
            if self._grid is None:
                break
            more = self._grid.send_and_receive(self._step_messages(server_round, self._grid),
                                               timeout=self.exchange_timeout)
            more = self.roster.sort_replies(more)
            self.recorder.record_replies(server_round, more, phase="train")
            accepted = self._update(server_round, more) or accepted
        if self.guard_on and server_round >= self._num_rounds > 0 and (accepted or self._rolled_back):
            self._final_check(server_round)
        if not accepted and not self._rolled_back:  # no step updated the head (failures recorded)
            return None, None
        server = self._server
        if server is None:
            return None, None
        arrays = ArrayRecord({wire.FOCAL_HEAD: he_array(server_export_head(server))})
        metrics = (self.train_metrics_aggr_fn(accepted, self.weighted_by_key) if accepted
                   else MetricRecord({}))  # a rolled-back round: the restored head stands
        return self.recorder.aggregated(server_round, arrays, metrics), metrics

    # ------------------------------------------------------------------ evaluate
    def _add_validation(self, server_round: int, pid: int, name: str, content: RecordDict) -> None:
        """Keep a member's encrypted validation embeddings from its embed reply, if it sent
        any (an institution without a validation split sends none and is not evaluated)."""
        arrays = content.array_records.get(wire.ARRAYS)
        if self._server is None or arrays is None or wire.FOCAL_VAL_EMBEDDINGS not in arrays:
            return
        try:
            server_add_validation(self._server, name, he_bytes(arrays, wire.FOCAL_VAL_EMBEDDINGS))
        except (CiphertextError, ValueError) as exc:  # it still trains; it is not evaluated
            self.recorder.failure(server_round, f"validation institution {pid}: rejected ({exc})")
            log(WARNING, "focal: rejected the validation embeddings of institution %d: %s", pid, exc)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each sampled institution gets only its own encrypted validation logits.

        The server runs a training step's forward pass (current head) on the encrypted
        validation embeddings the institution uploaded with its training ones; the institution
        decrypts and scores them (``ceil(n_val / block) * n_pairs`` ciphertexts instead of the
        head's ``n_groups * n_pairs``; the head's ciphertexts are not sent during training).
        Sampling is FedAvg's (``fraction_evaluate`` of the institutions with validation
        embeddings, at least ``min_evaluate_nodes``; seeded by round, so the same seed
        evaluates the same ones). Institutions without a validation split get no message.
        """
        server = self._server
        if server is None or self.layout is None or self.fraction_evaluate <= 0:
            return []
        known = OrderedGrid(grid, self.roster).get_node_ids()
        eligible = [node for node in known if self._members.get(node) in server.val_chunks]
        size = min(max(int(len(eligible) * self.fraction_evaluate), self.min_evaluate_nodes),
                   len(eligible))
        with seeded_random(self.seed, server_round, "evaluate"):
            sampled = random.sample(eligible, size)  # Flower's sample_nodes, without its wait
        log(INFO, "focal: evaluating on %d of %d institutions (%d with validation embeddings)",
            len(sampled), len(known), len(eligible))
        if len(eligible) < len(known) and not self.recorder.info.get("focal_unevaluated"):
            missing = [self._members.get(n, f"node {n}") for n in known if n not in eligible]
            self.recorder.info["focal_unevaluated"] = [str(m) for m in missing]
            log(WARNING, "focal: %d of %d institutions uploaded no validation embeddings (no "
                "validation split, a rejected upload or joined after round 1) and are never "
                "evaluated: %s", len(missing), len(known), ", ".join(map(str, missing[:10])))
        messages, forward = [], Stopwatch()
        for node in self.roster.ordered_node_ids(sampled):
            with forward:
                logits = server_forward_validation(server, self._members[node])
            down = ArrayRecord({wire.FOCAL_LOGITS: he_array(logits)})
            messages.append(Message(RecordDict({wire.ARRAYS: down, wire.CONFIG: self._base_config(server_round)}),
                                    dst_node_id=node, message_type=wire.ACTION_FOCAL_EVALUATE))
        self.recorder.timings(server_round, {wire.FOCAL_EVALUATE_FORWARD_S: forward.wall_s,
                                             wire.FOCAL_EVALUATE_FORWARD_CPU_S: forward.cpu_s})
        return self.recorder.count_sent(server_round, messages, phase="evaluate")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Each institution's scores and their weighted mean (Flower's reply checks); closes the
        round and writes the checkpoint."""
        replies = self.roster.sort_replies(replies)
        self.recorder.record_replies(server_round, replies, phase="evaluate")
        valid = [reply.content for reply in replies if not reply.has_error()]
        if replies:
            log(INFO, "aggregate_evaluate: Received %s results and %s failures", len(valid),
                len(replies) - len(valid))
        metrics = None
        if valid:
            validate_message_reply_consistency(valid, self.weighted_by_key, check_arrayrecord=False)
            metrics = self.evaluate_metrics_aggr_fn(valid, self.weighted_by_key)
        self.recorder.evaluated(server_round, metrics)
        return metrics
