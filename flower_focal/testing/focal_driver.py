"""In-process FOCAL training over a list of institutions (encrypted, or the plaintext twin).

The epoch loop that :class:`flower_focal.strategy.focal.Focal` runs message by message, in one
process: it calls the step functions of :mod:`flower_focal.focal.protocol` in order, passes each message
as the real wire bytes, and records time and bytes per role. Full batch, so one epoch is one
step. Callers must give every institution the same embedding dimension and a label range
``0..n_classes-1``.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from flower_focal.focal.errors import LogitOverflow
from flower_focal.focal.packing import DEFAULT_BLOCK, FocalLayout
from flower_focal.testing.plaintext import PlainEvaluator, PlainKeyHolder
from flower_focal.focal.protocol import (
    MOMENTUM,
    STEP_SCALE,
    LossGuard,
    decrypt_head,
    derived_step,
    encrypt_embeddings,
    encrypt_feature_moments,
    feature_standardization,
    fold_standardization,
    init_head,
    institution_error,
    institution_loss,
    moment_count,
    server_add_embeddings,
    server_backward_update,
    server_export_head,
    server_forward,
    server_restore,
    server_setup,
    server_snapshot,
    server_sum,
)


@dataclass(frozen=True)
class InstitutionEmbeddings:
    """One institution's embeddings ``x`` (n x d) and labels ``y`` (n,)."""

    name: str
    x: np.ndarray
    y: np.ndarray


@dataclass
class TrainResult:
    """Outcome of :func:`train_encrypted` / :func:`train_plaintext`.

    Attributes
    ----------
    head
        The final head W, ``(d + 1) x K`` (bias row last), decrypted, for *raw* embeddings
        (a standardised run's head with the standardisation folded in:
        :func:`~flower_focal.focal.protocol.fold_standardization`).
    history
        One dict per epoch: ``loss`` (mean class-weighted cross-entropy over the present
        institutions' samples, before the update), ``accuracy``, ``present``, ``lr`` (the step
        folded into that epoch's errors), ``applied`` (1.0, or 0.0 where the loss guard rolled
        the head back instead).
    final_loss
        The training loss of the head returned (the guard's last check; ``nan`` without it).
    feature_scale, feature_shift
        The global standardisation (``None`` for an unstandardised run).
    guard_log
        What the loss guard did (one line per backoff).
    seconds
        Wall time per role: ``setup``, ``encrypt_x``, ``server_add``, ``server_forward``,
        ``institution``, ``server_backward``.
    nbytes
        ``x_upload`` (all institutions, once), ``head`` (one head message),
        ``forward_per_epoch`` / ``error_per_epoch`` (all institutions, last epoch).
    """

    head: np.ndarray
    history: list[dict[str, float]] = field(default_factory=list)
    final_loss: float = float("nan")
    feature_scale: np.ndarray | None = None
    feature_shift: np.ndarray | None = None
    guard_log: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)


def _make_he_evaluator(public_bytes: bytes) -> Any:
    from flower_focal.crypto.ckks import CkksEvaluator
    from flower_focal.crypto.keys import PublicContext

    return CkksEvaluator(PublicContext.from_bytes(public_bytes))


def he_evaluator_factory(public: Any) -> partial[Any]:
    """A picklable factory that rebuilds a ``CkksEvaluator`` from ``public`` in a worker."""
    return partial(_make_he_evaluator, public.to_bytes())


def _size(message: Any) -> int:
    if isinstance(message, (bytes, bytearray)):
        return len(message)
    return int(sum(np.asarray(v).nbytes for v in message))


def _check_institutions(institutions: Sequence[InstitutionEmbeddings]) -> None:
    if not institutions:
        raise ValueError("need at least one institution")
    names = [i.name for i in institutions]
    if len(set(names)) != len(names):
        raise ValueError(f"institution names must be unique, got {names}")


def _train(
    holder: Any,
    ev: Any,
    factory: Any | None,
    institutions: Sequence[InstitutionEmbeddings],
    layout: FocalLayout,
    *,
    epochs: int,
    lr: float | None,
    step_scale: float,
    momentum: float,
    standardize: bool,
    guard: bool,
    class_weights: np.ndarray | None,
    init_seed: int | None,
    feature_scale: np.ndarray | None,
    feature_shift: np.ndarray | None,
    workers: int,
    absent: Mapping[int, Collection[str]] | None,
) -> TrainResult:
    _check_institutions(institutions)
    if standardize and (feature_scale is not None or feature_shift is not None):
        raise ValueError("give feature_scale/feature_shift only with standardize=False")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    n_total = sum(int(np.shape(i.y)[0]) for i in institutions)
    secs = dict.fromkeys(
        ("setup", "encrypt_x", "server_add", "server_forward", "institution", "server_backward"),
        0.0,
    )
    nbytes = {"x_upload": 0, "head": 0, "forward_per_epoch": 0, "error_per_epoch": 0,
              "moments_upload": 0}
    secs["moments"] = 0.0
    result = TrainResult(head=np.zeros((layout.d1, layout.n_classes)), seconds=secs, nbytes=nbytes)

    t = time.perf_counter()
    server = server_setup(
        ev, layout, init_head(holder, layout, seed=init_seed), workers=workers,
        evaluator_factory=factory,
    )
    secs["setup"] += time.perf_counter() - t
    with server:
        if standardize:  # global mean / std: encrypted moments, added by the server
            t = time.perf_counter()
            ups = [encrypt_feature_moments(holder, layout, inst.x) for inst in institutions]
            nbytes["moments_upload"] = sum(_size(u) for u in ups)
            totals = server_sum(ev, ups, moment_count(layout))
            feature_scale, feature_shift = feature_standardization(holder, layout, totals, n_total)
            result.feature_scale, result.feature_shift = feature_scale, feature_shift
            secs["moments"] += time.perf_counter() - t
        base = derived_step(layout, step_scale) if lr is None else float(lr)
        rule = LossGuard(lr=base, setting="step_scale" if lr is None else "lr",
                         log=result.guard_log)
        velocity: dict[str, np.ndarray] = {}
        for inst in institutions:
            t = time.perf_counter()
            up = encrypt_embeddings(
                holder, layout, inst.x, feature_scale=feature_scale, feature_shift=feature_shift
            )
            secs["encrypt_x"] += time.perf_counter() - t
            nbytes["x_upload"] += _size(up)
            t = time.perf_counter()
            server_add_embeddings(server, inst.name, up)
            secs["server_add"] += time.perf_counter() - t

        for epoch in range(epochs):
            gone = set(absent.get(epoch, ())) if absent else set()
            errors: dict[str, Any] = {}
            loss = correct = seen = 0.0
            fwd_b = err_b = 0
            staged_velocity: dict[str, np.ndarray] = {}
            overflow: list[str] = []
            step_lr = rule.lr
            for inst in institutions:
                if inst.name in gone:
                    continue
                t = time.perf_counter()
                logits = server_forward(server, inst.name)
                secs["server_forward"] += time.perf_counter() - t
                t = time.perf_counter()
                try:
                    up = institution_error(
                        holder, layout, logits, inst.y, lr=rule.lr, n_total=n_total,
                        class_weights=class_weights, momentum=momentum,
                        velocity=velocity.get(inst.name),
                    )
                except LogitOverflow:
                    if not guard:
                        raise
                    overflow.append(inst.name)  # the head grew out of range: a rise
                    continue
                finally:
                    secs["institution"] += time.perf_counter() - t
                if up.velocity is not None:
                    staged_velocity[inst.name] = up.velocity
                errors[inst.name] = up.message
                fwd_b += _size(logits)
                err_b += _size(up.message)
                loss += up.loss
                correct += up.n_correct
                seen += len(inst.y)
            mean_loss = loss / seen if seen and not overflow else float("nan")
            if overflow:
                mean_loss = float("inf")
                apply = rule.accept(mean_loss, [*errors, *overflow])
            else:
                apply = not guard or not errors or rule.accept(mean_loss, list(errors))
            t = time.perf_counter()
            if apply:
                if guard:
                    server_snapshot(server)
                server_backward_update(server, errors)
                for name in [n for n in velocity if n not in staged_velocity]:
                    del velocity[name]  # absent this step: its momentum starts again from zero
                velocity.update(staged_velocity)
            else:  # the loss rose: back to the head before the last update, restart momentum
                server_restore(server)
                velocity.clear()
            secs["server_backward"] += time.perf_counter() - t
            nbytes["forward_per_epoch"], nbytes["error_per_epoch"] = fwd_b, err_b
            result.history.append({
                "loss": mean_loss,
                "accuracy": correct / seen if seen else float("nan"),
                "present": float(len(errors) + len(overflow)),
                "lr": step_lr,
                "applied": float(apply),
            })
        if guard and epochs > 0:  # the last update is checked too: one forward, no upload
            gone = set(absent.get(epochs, ())) if absent else set()
            names, loss, seen = [], 0.0, 0
            for inst in institutions:
                if inst.name in gone:
                    continue
                try:
                    part, _ = institution_loss(holder, layout, server_forward(server, inst.name),
                                               inst.y, class_weights=class_weights)
                except LogitOverflow:
                    part = float("inf")
                names.append(inst.name)
                loss, seen = loss + part, seen + len(inst.y)
            result.final_loss = loss / seen if seen else float("nan")
            if names and not rule.final_ok(result.final_loss, names):
                server_restore(server)
                result.guard_log.append(f"final loss {result.final_loss:.4g} rose: the head before "
                                        "the last update is kept")
                result.final_loss = rule.prev if rule.prev is not None else result.final_loss
        head_msg = server_export_head(server)
    nbytes["head"] = _size(head_msg)
    result.head = fold_standardization(decrypt_head(holder, layout, head_msg),
                                       feature_scale, feature_shift)
    return result


def train_encrypted(
    institutions: Sequence[InstitutionEmbeddings],
    n_classes: int,
    *,
    secret: Any,
    public: Any | None = None,
    epochs: int,
    lr: float | None = None,
    step_scale: float = STEP_SCALE,
    momentum: float = MOMENTUM,
    standardize: bool = True,
    guard: bool = True,
    class_weights: np.ndarray | None = None,
    init_seed: int | None = None,
    feature_scale: np.ndarray | None = None,
    feature_shift: np.ndarray | None = None,
    block: int = DEFAULT_BLOCK,
    workers: int = 1,
    absent: Mapping[int, Collection[str]] | None = None,
) -> TrainResult:
    """FOCAL on CKKS ciphertexts, all roles in this process (messages are real bytes).

    Parameters
    ----------
    institutions
        Each with ``x`` (n_i x d) and ``y`` in ``0..n_classes-1``.
    secret, public
        The institutions' :class:`~flower_focal.crypto.keys.SecretContext` (``focal`` preset)
        and the server's :class:`~flower_focal.crypto.keys.PublicContext` (default: derived
        from ``secret``, i.e. exactly what ``public.ctx`` holds).
    epochs
        Full-batch gradient steps.
    lr, step_scale
        The step: ``None`` (default) derives it,
        :func:`~flower_focal.focal.protocol.derived_step` ``(layout, step_scale)``; a number
        sets it.
    momentum
        Nesterov momentum held by the institutions (0: plain gradient descent).
    standardize
        Standardise features with their global mean / std, computed under HE
        (:func:`~flower_focal.focal.protocol.encrypt_feature_moments`); the returned head has it
        folded in, so it applies to raw embeddings.
    guard
        The loss guard (:class:`~flower_focal.focal.protocol.LossGuard`): roll back and halve
        the step when the loss rises, check the last update, raise
        :class:`~flower_focal.focal.errors.FocalDiverged` when halving does not help.
    class_weights, init_seed, feature_scale, feature_shift
        See :func:`~flower_focal.focal.protocol.institution_error`,
        :func:`~flower_focal.focal.protocol.init_head` and
        :func:`~flower_focal.focal.protocol.encrypt_embeddings`.
    block
        Sample positions per ciphertext (see :class:`~flower_focal.focal.packing.FocalLayout`).
    workers
        Server processes (see :func:`~flower_focal.focal.protocol.server_setup`).
    absent
        ``{epoch: names}`` of institutions missing in that epoch (dropout simulation).
    """
    from flower_focal.crypto.ckks import CkksEvaluator, CkksKeyHolder

    _check_institutions(institutions)
    holder = CkksKeyHolder(secret)
    pub = public if public is not None else secret.public_context()
    ev = CkksEvaluator(pub)
    layout = FocalLayout(int(np.shape(institutions[0].x)[1]), n_classes, ev.slots, block)
    factory = he_evaluator_factory(pub) if workers > 1 else None
    return _train(
        holder, ev, factory, institutions, layout, epochs=epochs, lr=lr, step_scale=step_scale,
        momentum=momentum, standardize=standardize, guard=guard, class_weights=class_weights, init_seed=init_seed, feature_scale=feature_scale,
        feature_shift=feature_shift, workers=workers, absent=absent,
    )


def train_plaintext(
    institutions: Sequence[InstitutionEmbeddings],
    n_classes: int,
    *,
    epochs: int,
    lr: float | None = None,
    step_scale: float = STEP_SCALE,
    momentum: float = MOMENTUM,
    standardize: bool = True,
    guard: bool = True,
    class_weights: np.ndarray | None = None,
    init_seed: int | None = None,
    feature_scale: np.ndarray | None = None,
    feature_shift: np.ndarray | None = None,
    block: int = DEFAULT_BLOCK,
    slots: int = 4096,
    absent: Mapping[int, Collection[str]] | None = None,
) -> TrainResult:
    """The plaintext twin of :func:`train_encrypted` (same packing, order and arithmetic).

    ``slots`` must match the encrypted run's (4096 for the ``focal`` preset) for a
    step-by-step comparison. Runs in this process (``workers`` is an HE-only option).
    """
    _check_institutions(institutions)
    layout = FocalLayout(int(np.shape(institutions[0].x)[1]), n_classes, slots, block)
    return _train(
        PlainKeyHolder(slots), PlainEvaluator(slots), None, institutions, layout, epochs=epochs,
        lr=lr, step_scale=step_scale, momentum=momentum, standardize=standardize, guard=guard,
        class_weights=class_weights, init_seed=init_seed, feature_scale=feature_scale,
        feature_shift=feature_shift, workers=1, absent=absent,
    )
