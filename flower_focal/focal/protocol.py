"""FOCAL split training of a linear head on encrypted embeddings: the step functions.

This module owns the protocol, as pure step functions that read top to bottom (no Flower
imports, no TenSEAL import). One training step over full batch::

    # once
    head = init_head(holder, layout, seed=0)                      # an institution
    server = server_setup(evaluator, layout, head, workers=1)     # the server
    for inst: server_add_embeddings(server, inst, encrypt_embeddings(holder_i, layout, X_i))
    # every step
    for inst: logits = server_forward(server, inst)                          # to inst only
              err[inst] = institution_error(holder_i, layout, logits, y_i,
                                             lr=lr, n_total=N).message       # upload
    server_backward_update(server, err)       # W += lane_sum(sum X*E), additions only
    # to evaluate (once: server_add_validation(server, inst, encrypt_embeddings(holder_i, layout, V_i)))
    for inst: logits = decrypt_logits(holder_i, layout, server_forward_validation(server, inst), n_val_i)
    # at the end
    W = decrypt_head(holder, layout, server_export_head(server))

Who holds what: institutions share the CKKS secret key (``holder`` is a
:class:`~flower_focal.crypto.ckks.CkksKeyHolder`, or the twin's
:class:`~flower_focal.testing.plaintext.PlainKeyHolder`); the server holds a
:class:`~flower_focal.crypto.ckks.CkksEvaluator` built from the *public* context (relin +
Galois keys, no secret key). Messages are bytes (envelopes) on the encrypted path.

Choices (and what callers must do):

* **Initial head.** Keys are symmetric (no public encryption key exists), so the server
  cannot encrypt; one institution runs :func:`init_head` (zeros, or small seeded Gaussian
  weights) and uploads it once.
* **Learning rate folded into the error.** ``E = -lr * c_y * (softmax - onehot(y)) / N``
  (``N`` = the public global sample count, ``c`` optional class weights), so the server only
  adds to W and its level never changes (see :mod:`flower_focal.crypto.ckks`).
* **Normalisation** is the caller's: an institution cannot know global statistics, so pass
  a public per-feature ``feature_scale``/``feature_shift`` (same for every institution), or
  none.
* **Dropout.** An institution absent in a step is simply left out of that step's sum; its
  error would have been divided by the same public ``N``, so the others need no change.
* **Leakage.** An institution decrypts lane partial sums of its own logits (training and
  validation): its own features times W, lane by lane, from which it can solve for W (it knows
  its features). So every institution can know the current head, as under any shared key; W's
  ciphertexts themselves are sent to no institution during training (bandwidth, not secrecy).
  The server never decrypts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flower_focal.crypto.errors import CiphertextError
from flower_focal.focal._server import LocalShard, ProcessShard, Shard
from flower_focal.focal.errors import InstitutionUploadError
from flower_focal.focal.packing import (
    FocalLayout,
    pack_errors,
    pack_features,
    pack_head,
    unpack_head,
    unpack_logits,
    with_bias,
)

Envelope = Any  # bytes on the encrypted path; a tuple of numpy slot vectors for the twin


# ----------------------------------------------------------------------------- helpers
def _check_features(layout: FocalLayout, x: np.ndarray) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise ValueError(f"embeddings must be a non-empty 2-D array (n, d), got {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"embeddings must be real numbers, got dtype {arr.dtype}")
    if arr.shape[1] != layout.n_features:
        raise ValueError(
            f"embedding dimension is {arr.shape[1]} but the layout expects "
            f"{layout.n_features}; every institution must use the same backbone"
        )
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("embeddings contain NaN/Inf")
    return arr


def _check_labels(layout: FocalLayout, y: np.ndarray, n: int | None = None) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        raise ValueError(f"labels must be 1-D with one label per sample, got shape {arr.shape}")
    if arr.dtype.kind not in "iu" and not (
        arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
    ):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= layout.n_classes):
        raise ValueError(
            f"labels must be in 0..{layout.n_classes - 1}, got range "
            f"{arr.min()}..{arr.max()}"
        )
    return arr


def prepare_features(
    layout: FocalLayout,
    x: np.ndarray,
    feature_scale: np.ndarray | None = None,
    feature_shift: np.ndarray | None = None,
) -> np.ndarray:
    """``[(x - shift) * scale, 1]`` after validation (what gets encrypted, and evaluated on)."""
    arr = _check_features(layout, x)
    d = layout.n_features
    if feature_shift is not None:
        shift = np.asarray(feature_shift, dtype=np.float64)
        if shift.shape != (d,) or not np.all(np.isfinite(shift)):
            raise ValueError(f"feature_shift must be {d} finite values")
        arr = arr - shift
    if feature_scale is not None:
        scale = np.asarray(feature_scale, dtype=np.float64)
        if scale.shape != (d,) or not np.all(np.isfinite(scale)):
            raise ValueError(f"feature_scale must be {d} finite values")
        arr = arr * scale
    return with_bias(arr)


def predict_logits(
    head: np.ndarray,
    layout: FocalLayout,
    x: np.ndarray,
    feature_scale: np.ndarray | None = None,
    feature_shift: np.ndarray | None = None,
) -> np.ndarray:
    """Plaintext logits ``[x, 1] @ W`` (institutions evaluating a decrypted head)."""
    return prepare_features(layout, x, feature_scale, feature_shift) @ head


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax (numerically stable)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def balanced_class_weights(class_counts: Sequence[int]) -> np.ndarray:
    """``N / (K * n_k)`` (scikit-learn's "balanced"), from global per-class counts."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2 or np.any(counts <= 0):
        raise ValueError("class_counts must list a positive count for each of >= 2 classes")
    return counts.sum() / (counts.size * counts)


# ----------------------------------------------------------------------------- statistics
STEP_SCALE = 4.0
"""Default ``step_scale`` of :func:`derived_step` (see there)."""
CONSTANT_STD = 1e-2
"""Features with a global std below this times the RMS std are not scaled (:func:`feature_standardization`)."""
MOMENTUM = 0.5
"""Default Nesterov momentum (institution-held, see :func:`institution_error`)."""


def derived_step(layout: FocalLayout, step_scale: float = STEP_SCALE) -> float:
    """The step size on globally standardised features: ``step_scale * K / (d + 1)``.

    Standardised features ``[z, 1]`` have ``trace(Z^T Z / N) = d + 1``, so the largest
    eigenvalue of the feature second moment is at most ``d + 1``; at the uniform softmax of the
    initial head the cross-entropy's curvature is that eigenvalue divided by ``K``, so
    ``K / (d + 1)`` (``step_scale = 1``) is a step that cannot overshoot there. Real embeddings
    are far from that worst case (PathMNIST / RetinaMNIST EfficientNet-Lite0 features: largest
    eigenvalue 83 and 104 of 1281), hence the default ``step_scale`` 4, with the loss guard
    (:class:`LossGuard`) halving it should the loss ever rise.
    """
    if not step_scale > 0:
        raise ValueError(f"step_scale must be positive, got {step_scale!r}")
    return float(step_scale) * layout.n_classes / layout.d1


def moment_count(layout: FocalLayout) -> int:
    """Ciphertexts of one :func:`encrypt_feature_moments` upload."""
    return -(-2 * layout.n_features // layout.slots)


def encrypt_feature_moments(holder: Any, layout: FocalLayout, x: np.ndarray) -> Envelope:
    """Per-feature sums and sums of squares of this institution's embeddings, encrypted.

    Slots ``[sum_i x_ij for j < d] + [sum_i x_ij^2 for j < d]`` over :func:`moment_count`
    ciphertexts at the head's level. The server only adds these (:func:`server_sum`); only
    institutions decrypt the totals (:func:`feature_standardization`).
    """
    arr = _check_features(layout, x)
    vec = np.concatenate([arr.sum(axis=0), (arr * arr).sum(axis=0)])
    padded = np.zeros(moment_count(layout) * layout.slots)
    padded[: vec.size] = vec
    slots = list(padded.reshape(-1, layout.slots))
    return holder.encrypt(slots, holder.plan.w_level, holder.plan.w_scale)


def server_sum(ev: Any, messages: Sequence[Envelope], count: int) -> Envelope:
    """The server adds institutions' encrypted vectors slot-wise (head level; additions only).

    Raises
    ------
    CiphertextError
        A malformed or foreign message, or one with another ciphertext count.
    """
    if not messages:
        raise ValueError("nothing to add")
    plan, total = ev.plan, None
    for message in messages:
        cts = ev.load_many(ev.open_envelope(message, count), plan.w_level, plan.w_scale)
        total = cts if total is None else [ev.add_inplace(a, b) for a, b in zip(total, cts)]
    return ev.seal_envelope(ev.dump_raw(total))


def feature_standardization(
    holder: Any, layout: FocalLayout, totals_message: Envelope, n_total: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(feature_scale, feature_shift)`` = ``(1 / std, mean)`` of all institutions' embeddings.

    An institution decrypts the summed moments (:func:`server_sum` of every institution's
    :func:`encrypt_feature_moments`) and divides by the public ``N``. Features whose global
    standard deviation is below ``CONSTANT_STD`` (1e-2) times the root-mean-square one are
    taken as constant: they keep scale 1 and are centred only. CKKS noise on the summed squares
    is absolute (about 1e-9 of a mean square here), so the variance of a feature 100x below the
    typical one is still known to about 1e-5 relative, while an all-zero feature would
    otherwise get a huge, noise-made scale (measured on EfficientNet-Lite0 embeddings of
    PathMNIST: with a 1e-3 cut the worst scale differed from the exact one by 6.5e-4). Every institution gets the same values (the same ciphertexts decrypted).
    """
    if isinstance(n_total, bool) or not isinstance(n_total, int) or n_total < 1:
        raise ValueError(f"n_total must be a positive int, got {n_total!r}")
    d = layout.n_features
    z = holder.decrypt(totals_message, holder.plan.w_level, holder.plan.w_scale, moment_count(layout))
    vec = np.concatenate([np.asarray(v).real for v in z])
    mean = vec[:d] / n_total
    raw_var = vec[d : 2 * d] / n_total - mean * mean
    second = vec[d : 2 * d] / n_total
    if not np.all(np.isfinite(vec)) or np.any(raw_var < -1e-3 * np.maximum(second, 1.0)):  # CKKS noise: tiny
        bad = int(np.argmin(raw_var))
        raise ValueError(
            f"the summed feature moments are inconsistent (feature {bad}: E[x^2] {second[bad]:.4g} < "
            f"mean^2 {mean[bad] ** 2:.4g}): the sums left the CKKS range (about 1e9 at the head's "
            "level; N x E[x^2] too large: embeddings too large or too many samples) or were corrupted")
    var = np.maximum(raw_var, 0.0)
    std = np.sqrt(var)
    const = std < CONSTANT_STD * max(float(np.sqrt(var.mean())), 1e-12)
    scale = np.where(const, 1.0, 1.0 / np.where(const, 1.0, std))
    return scale, mean


def _fmt(loss: float | None) -> str:
    if loss is None:
        return "(none yet)"
    return f"{loss:.4g}" if np.isfinite(loss) else "out of range (the head's logits overflowed)"


def fold_standardization(
    head: np.ndarray, feature_scale: np.ndarray | None, feature_shift: np.ndarray | None
) -> np.ndarray:
    """The head for raw embeddings from a head trained on ``(x - shift) * scale``.

    ``[(x - m) * s, 1] @ [V; b] = [x, 1] @ [s * V; b - (m * s) @ V]``; no-op without stats.
    """
    w = np.array(head, dtype=np.float64)
    d = w.shape[0] - 1
    scale = np.ones(d) if feature_scale is None else np.asarray(feature_scale, np.float64)
    shift = np.zeros(d) if feature_shift is None else np.asarray(feature_shift, np.float64)
    v = w[:d] * scale[:, None]
    return np.vstack([v, w[d:] - shift @ v])


@dataclass
class LossGuard:
    """The server's rule on the institutions' decrypted training loss (the same in the twin).

    Each step the institutions report their summed loss at the current head, before the
    update. :meth:`accept` says whether to apply that step's errors: a loss above the previous
    accepted one by more than ``tol`` (relative), or above the first one, is a rise: the
    server restores the head before the last update, halves the step and restarts momentum
    (the institutions zero their velocity when ``restarts`` changes); after ``max_backoffs``
    halvings with no real progress in between (an accepted loss ``tol`` below the previous
    one resets the count, so a long run's isolated rises do not add up) it raises
    :class:`~flower_focal.focal.errors.FocalDiverged`. Losses are only
    compared over the same institutions (a step with another set present starts a new
    comparison). So every accepted loss is at most the first one.

    A resumed run calls :meth:`resume`: its head comes from a checkpoint, whose last update was
    never checked, and no earlier head is kept (the server's rollback point is that head).
    """

    lr: float
    tol: float = 1e-3
    max_backoffs: int = 10
    setting: str = "focal-step-scale"
    first: float | None = None
    prev: float | None = None
    members: tuple[str, ...] | None = None
    backoffs: int = 0
    restarts: int = 0
    log: list[str] | None = None
    first_members: tuple[str, ...] | None = None
    resumed: bool = False

    def resume(self) -> None:
        """The next loss is measured at a checkpointed head that is also the only rollback point.

        It is still compared with the saved reference: a rise halves the step and restarts
        momentum as usual, but "restoring" gives back that same head, so the comparison then
        restarts from its loss (``first`` raised to it if needed) instead of rejecting the same
        head step after step until the halving limit stops the run.
        """
        self.resumed = True

    def accept(self, loss: float, members: Sequence[str]) -> bool:
        """``True``: apply this step; ``False``: roll back (``lr`` halved, ``restarts`` + 1)."""
        from flower_focal.focal.errors import FocalDiverged

        present = tuple(sorted(members))
        resumed, self.resumed = self.resumed, False
        if not np.isfinite(loss):
            rose = True
        elif self.prev is None or present != self.members:
            self.members, self.prev = present, loss
            if self.first is None or present != self.first_members:
                self.first, self.first_members = loss, present
            elif resumed:  # the resumed head is the reference now, even above the first loss
                self.first = max(self.first, loss)
            return True
        else:
            rose = loss > self.prev * (1 + self.tol) or loss > self.first
        if not rose:
            if loss < self.prev * (1 - self.tol):  # real progress (not just the restored head's loss):
                self.backoffs = 0  # the limit counts halvings without progress in between
            self.prev = loss
            return True
        self.backoffs += 1
        if self.backoffs > self.max_backoffs:
            raise FocalDiverged(
                f"focal: the institutions' decrypted training loss rose ({_fmt(self.prev)} -> "
                f"{_fmt(loss)}) although the step was halved {self.max_backoffs} times without progress (now "
                f"{self.lr:.3g}); lower `{self.setting}` or check the embeddings (NaN/huge "
                "features, a wrong backbone)")
        self.lr /= 2
        self.restarts += 1
        self._last = (f"training loss rose {_fmt(self.prev)} -> {_fmt(loss)}: head restored, step "
                      f"halved to {self.lr:.3g}, momentum restarted (lower `{self.setting}` if "
                      "this repeats)")
        if resumed and np.isfinite(loss):  # no head before the checkpointed one: compare from it on
            self._last = (f"training loss at the resumed checkpoint's head rose {_fmt(self.prev)} -> "
                          f"{_fmt(loss)}: that head is kept (there is no earlier one), step halved to "
                          f"{self.lr:.3g}, momentum restarted; its loss is the new reference")
            self.prev, self.members = None, None
            self.resumed = True  # the next (same-head) loss starts the comparison, first raised to it
        if self.log is not None:
            self.log.append(self._last)
        return False

    def log_line(self) -> str:
        """What the last rollback did (for logs)."""
        return getattr(self, "_last", "")

    def final_ok(self, loss: float, members: Sequence[str]) -> bool:
        """Whether the head after the last update may stand (same rule, no backoff): ``False``
        means restore the snapshot taken before that update."""
        if tuple(sorted(members)) != self.members or self.prev is None:
            return bool(np.isfinite(loss))
        return bool(np.isfinite(loss)) and not (
            loss > self.prev * (1 + self.tol) or (self.first is not None and loss > self.first))


# ----------------------------------------------------------------------------- institution
def encrypt_embeddings(
    holder: Any,
    layout: FocalLayout,
    x: np.ndarray,
    *,
    feature_scale: np.ndarray | None = None,
    feature_shift: np.ndarray | None = None,
) -> Envelope:
    """Step 1 (once per institution): pack ``[x, 1]`` feature-lane by sample-block, encrypt.

    Returns the upload: ``n_chunks * n_groups`` ciphertexts in ``[chunk][group]`` order.

    Raises
    ------
    ValueError
        Wrong dimension, empty, NaN/Inf, or a bad scale/shift.
    """
    x1 = prepare_features(layout, x, feature_scale, feature_shift)
    packed = pack_features(layout, x1)
    slots = [packed[c, g] for c in range(packed.shape[0]) for g in range(packed.shape[1])]
    return holder.encrypt(slots, holder.plan.x_level, holder.plan.x_scale)


def init_head(
    holder: Any, layout: FocalLayout, *, seed: int | None = None, std: float = 0.01
) -> Envelope:
    """The initial encrypted head (one institution makes it; symmetric keys).

    ``seed=None`` gives zeros; otherwise ``N(0, std^2)`` weights from that seed.
    """
    if seed is None:
        w = np.zeros((layout.d1, layout.n_classes))
    else:
        w = np.random.default_rng(seed).normal(0.0, std, size=(layout.d1, layout.n_classes))
    packed = pack_head(layout, w)
    slots = [packed[g, p] for g in range(layout.n_groups) for p in range(layout.n_pairs)]
    return holder.encrypt(slots, holder.plan.w_level, holder.plan.w_scale)


@dataclass(frozen=True)
class ErrorUpload:
    """What :func:`institution_error` returns.

    Attributes
    ----------
    message
        The encrypted error (upload it to the server).
    loss
        This institution's summed (class-weighted) cross-entropy at the current head.
    n_correct
        Training samples whose arg-max logit is the label.
    logits
        The decrypted logits (n x K); stays at the institution.
    velocity
        The institution's momentum state after this step (``None`` without momentum); it keeps
        it for its next step.
    """

    message: Envelope
    loss: float
    n_correct: int
    logits: np.ndarray
    velocity: np.ndarray | None = None


def institution_error(
    holder: Any,
    layout: FocalLayout,
    logits_message: Envelope,
    labels: np.ndarray,
    *,
    lr: float,
    n_total: int,
    class_weights: np.ndarray | None = None,
    momentum: float = 0.0,
    velocity: np.ndarray | None = None,
) -> ErrorUpload:
    """Step 3: decrypt logits, exact softmax, encrypt ``-lr * c_y * (p - onehot) / N``.

    With ``momentum`` ``b > 0`` (Nesterov, at no server cost): the gradient is linear in the
    error for fixed embeddings, so the institution keeps its own velocity ``M`` (n x K, starts
    at zero), updates ``M = b * M + E`` and uploads ``b * M + E`` instead of ``E``; the server's
    ``W += X^T U`` is then exactly Nesterov's update of the look-ahead head, with the same
    additions and the same CKKS depth as plain gradient descent.

    Parameters
    ----------
    labels
        This institution's labels, in the order of its embeddings (``0..K-1``).
    lr, n_total
        Learning rate and the public global sample count ``N`` (the same for everyone).
    class_weights
        Optional per-class weights ``c`` (e.g. :func:`balanced_class_weights`).
    momentum, velocity
        Nesterov momentum ``b`` in ``[0, 1)`` and this institution's velocity from its previous
        step (``None`` or zeros after a restart).

    Raises
    ------
    ValueError
        Bad labels/weights/lr, or decrypted values beyond the level plan's bound (the
        forward product wrapped around: lower ``lr`` or scale the features down).
    CiphertextError
        The server's message is malformed or was made under other keys.
    """
    y = _check_labels(layout, labels)
    n = y.shape[0]
    if n < 1:
        raise ValueError("an institution needs at least one labelled sample")
    if not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if isinstance(n_total, bool) or not isinstance(n_total, int) or n_total < n:
        raise ValueError(f"n_total must be an int >= this institution's {n} samples")
    if class_weights is None:
        cw = np.ones(layout.n_classes)
    else:
        cw = np.asarray(class_weights, dtype=np.float64)
        if cw.shape != (layout.n_classes,) or not np.all(np.isfinite(cw)) or np.any(cw <= 0):
            raise ValueError(f"class_weights must be {layout.n_classes} positive finite values")
    if not (0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    logits = _decrypt_logits(holder, layout, logits_message, n)
    prob = softmax(logits)
    onehot = np.eye(layout.n_classes)[y]
    w_y = cw[y]
    err = -lr * w_y[:, None] * (prob - onehot) / n_total
    new_velocity = None
    if momentum > 0:
        old = np.zeros_like(err) if velocity is None else np.asarray(velocity, dtype=np.float64)
        if old.shape != err.shape:
            raise ValueError(f"velocity must have shape {err.shape}, got {old.shape}")
        new_velocity = momentum * old + err
        err = momentum * new_velocity + err
    plan, chunks = holder.plan, layout.n_chunks(n)
    packed = pack_errors(layout, err)
    slots = [packed[c, p] for c in range(chunks) for p in range(layout.n_pairs)]
    message = holder.encrypt(slots, plan.e_level, plan.e_scale)
    loss = float(-(w_y * np.log(np.clip(prob[np.arange(n), y], 1e-300, None))).sum())
    return ErrorUpload(message, loss, int((logits.argmax(axis=1) == y).sum()), logits,
                       new_velocity)


def institution_loss(
    holder: Any,
    layout: FocalLayout,
    logits_message: Envelope,
    labels: np.ndarray,
    *,
    class_weights: np.ndarray | None = None,
) -> tuple[float, int]:
    """Decrypt logits and return ``(summed class-weighted cross-entropy, n_correct)``, no upload
    (the final check of the loss guard)."""
    y = _check_labels(layout, labels)
    cw = np.ones(layout.n_classes) if class_weights is None else np.asarray(class_weights, float)
    logits = _decrypt_logits(holder, layout, logits_message, y.shape[0])
    prob = softmax(logits)
    loss = float(-(cw[y] * np.log(np.clip(prob[np.arange(y.size), y], 1e-300, None))).sum())
    return loss, int((logits.argmax(axis=1) == y).sum())


def decrypt_logits(holder: Any, layout: FocalLayout, logits_message: Envelope, n: int) -> np.ndarray:
    """The logits (n x K) of ``n`` samples from a forward message (:func:`server_forward` or
    :func:`server_forward_validation`): decrypt, add the lanes.

    Raises
    ------
    CiphertextError
        Malformed/foreign message, or not ``ceil(n / block) * n_pairs`` ciphertexts.
    LogitOverflow
        Partial sums beyond the level plan's safe range (the values may have wrapped).
    """
    return _decrypt_logits(holder, layout, logits_message, n)


def _decrypt_logits(holder: Any, layout: FocalLayout, logits_message: Envelope, n: int) -> np.ndarray:
    plan, chunks = holder.plan, layout.n_chunks(n)
    z = np.stack(
        holder.decrypt(logits_message, plan.logit_level, plan.logit_scale, chunks * layout.n_pairs)
    ).reshape(chunks, layout.n_pairs, layout.slots)
    peak = float(max(np.abs(z.real).max(), np.abs(z.imag).max()))
    if peak >= plan.logit_bound / 2:
        from flower_focal.focal.errors import LogitOverflow

        raise LogitOverflow(
            f"forward partial sums reach {peak:.3g}, beyond the safe range "
            f"{plan.logit_bound / 2:g} of the level plan (values may have wrapped); lower the "
            "learning rate or scale the features down"
        )
    return unpack_logits(layout, z, n)


def decrypt_head(holder: Any, layout: FocalLayout, head_message: Envelope) -> np.ndarray:
    """Step 5: the head ``W`` (d+1 x K, bias row last) from the server's head message."""
    count = layout.n_groups * layout.n_pairs
    z = holder.decrypt(head_message, holder.plan.w_level, holder.plan.w_scale, count)
    return unpack_head(layout, np.stack(z).reshape(layout.n_groups, layout.n_pairs, -1))


# ----------------------------------------------------------------------------- server
class FocalServer:
    """The server's state between steps: embeddings and head, held by shards.

    Build it with :func:`server_setup`; drive it with the ``server_*`` step functions; call
    :meth:`close` (or use ``with``) to stop worker processes.
    """

    def __init__(self, ev: Any, layout: FocalLayout, shards: list[Any], pairs: list[list[int]]):
        self.ev, self.layout = ev, layout
        self._shards, self._pairs = shards, pairs
        self.chunks: dict[str, int] = {}
        self.val_chunks: dict[str, int] = {}  # institutions with validation embeddings

    def close(self) -> None:
        """Stop worker processes (idempotent)."""
        for s in self._shards:
            s.close()

    def __enter__(self) -> FocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _broadcast(self, cmd: str, per_shard: Sequence[tuple[Any, ...]]) -> list[Any]:
        for shard, args in zip(self._shards, per_shard):
            shard.send(cmd, *args)
        results, error = [], None
        for shard in self._shards:
            try:
                results.append(shard.recv())
            except Exception as exc:  # collect every reply before raising
                error = error or exc
        if error is not None:
            raise error
        return results

    def _split(self, raw: Sequence[Any], rows: int) -> list[list[Any]]:
        """Route ``[row][pair]`` ciphertexts to shards as ``[row][local pair]`` lists."""
        n_p = self.layout.n_pairs
        return [[raw[r * n_p + p] for r in range(rows) for p in pairs] for pairs in self._pairs]

    def _merge(self, parts: Sequence[Sequence[Any]], rows: int) -> list[Any]:
        """Inverse of :meth:`_split`."""
        out: list[Any] = [None] * (rows * self.layout.n_pairs)
        for pairs, part in zip(self._pairs, parts):
            for i, item in enumerate(part):
                r, lp = divmod(i, len(pairs))
                out[r * self.layout.n_pairs + pairs[lp]] = item
        return out


def server_setup(
    ev: Any,
    layout: FocalLayout,
    head_message: Envelope,
    *,
    workers: int = 1,
    evaluator_factory: Any | None = None,
) -> FocalServer:
    """Create the server state from the initial encrypted head.

    Parameters
    ----------
    ev
        The server's evaluator (``CkksEvaluator(public)``, or the twin's ``PlainEvaluator``).
    workers
        ``1``: everything in this process. ``k > 1``: ``min(k, n_pairs)`` spawned worker
        processes, each owning the class pairs ``p = w (mod k)`` (needs
        ``evaluator_factory``, a picklable zero-argument callable building ``ev`` in the
        worker, e.g. :func:`flower_focal.testing.he_evaluator_factory`). Scripts must
        guard their entry point with ``if __name__ == "__main__":``.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if ev.slots != layout.slots:
        raise ValueError(f"layout has {layout.slots} slots but the keys give {ev.slots}")
    count = layout.n_groups * layout.n_pairs
    raw = ev.open_envelope(head_message, count)
    k = min(workers, layout.n_pairs)
    pairs = [list(range(w, layout.n_pairs, k)) for w in range(k)]
    tmp = FocalServer(ev, layout, [], pairs)
    parts = tmp._split(raw, layout.n_groups)
    if k == 1:
        shards: list[Any] = [LocalShard(Shard(ev, layout, pairs[0], parts[0]))]
    else:
        if evaluator_factory is None:
            raise ValueError("workers > 1 needs an evaluator_factory")
        shards = []
        try:
            for p, part in zip(pairs, parts):
                shards.append(ProcessShard(evaluator_factory, layout, p, part))
        except BaseException:
            for s in shards:
                s.close()
            raise
    return FocalServer(ev, layout, shards, pairs)


def server_add_embeddings(server: FocalServer, institution: str, x_message: Envelope) -> None:
    """Step 1, server side: check and keep an institution's encrypted embeddings.

    Raises
    ------
    CiphertextError
        Malformed/foreign upload, or a ciphertext count that is not a whole number of
        sample chunks; the server state is unchanged.
    """
    raw, chunks = _sample_chunks(server, institution, x_message, "embedding")
    server._broadcast("add_x", [(institution, raw)] * len(server._shards))
    server.chunks[institution] = chunks


def _sample_chunks(server: FocalServer, institution: str, x_message: Envelope, what: str
                   ) -> tuple[list[Any], int]:
    """Open an embeddings upload: its ciphertexts and how many sample chunks they make
    (``CiphertextError`` unless a positive whole number of chunks of the layout's groups)."""
    raw = server.ev.open_envelope(x_message)
    g = server.layout.n_groups
    if not raw or len(raw) % g:
        raise CiphertextError(
            f"institution {institution!r} sent {len(raw)} {what} ciphertexts, not a positive "
            f"multiple of the layout's {g} feature groups (wrong embedding dimension or layout?)"
        )
    return raw, len(raw) // g


def server_forward(server: FocalServer, institution: str) -> Envelope:
    """Step 2: encrypted logit partial sums for one institution (send to it only)."""
    if institution not in server.chunks:
        raise ValueError(f"unknown institution {institution!r}; add its embeddings first")
    parts = server._broadcast("forward", [(institution,)] * len(server._shards))
    rows = server.chunks[institution]
    return server.ev.seal_envelope(server._merge(parts, rows))


def server_add_validation(server: FocalServer, institution: str, x_message: Envelope) -> None:
    """Evaluation, once: keep an institution's encrypted *validation* embeddings
    (:func:`encrypt_embeddings` of its validation split, standardised like its training one).

    They only ever enter :func:`server_forward_validation`, never a backward pass.

    Raises
    ------
    CiphertextError
        Malformed/foreign upload or not a whole number of sample chunks; nothing is kept.
    """
    raw, chunks = _sample_chunks(server, institution, x_message, "validation embedding")
    server._broadcast("add_val", [(institution, raw)] * len(server._shards))
    server.val_chunks[institution] = chunks


def server_forward_validation(server: FocalServer, institution: str) -> Envelope:
    """Evaluation, each round: the encrypted logit partial sums of the current head on one
    institution's validation embeddings (the forward pass of a training step; send to it only:
    ``ceil(n_val / block) * n_pairs`` ciphertexts instead of the head's ``n_groups * n_pairs``).
    The institution reads them with :func:`decrypt_logits`."""
    if institution not in server.val_chunks:
        raise ValueError(f"institution {institution!r} has no validation embeddings on the server")
    parts = server._broadcast("forward", [(institution, True)] * len(server._shards))
    return server.ev.seal_envelope(server._merge(parts, server.val_chunks[institution]))


def server_backward_update(server: FocalServer, errors: Mapping[str, Envelope]) -> None:
    """Step 4: ``W += lane_sum(sum_{inst, chunk} X * E)`` over the institutions present.

    Institutions missing from ``errors`` are left out of this step's sum. Every upload is
    checked before anything changes: on any error the head is unchanged and the exception
    names the institution (drop it and call again with the others).

    Raises
    ------
    InstitutionUploadError
        A malformed, foreign or wrongly sized error upload, or an institution whose embeddings
        the server does not hold (``exc.institution`` names it).
    """
    per_shard: list[dict[str, list[Any]]] = [{} for _ in server._shards]
    for inst, message in errors.items():
        if inst not in server.chunks:
            raise InstitutionUploadError(inst, "unknown institution; add its embeddings first")
        rows = server.chunks[inst]
        try:
            raw = server.ev.open_envelope(message, rows * server.layout.n_pairs)
        except CiphertextError as exc:
            raise InstitutionUploadError(inst, str(exc)) from exc
        for i, part in enumerate(server._split(raw, rows)):
            per_shard[i][inst] = part
    try:
        server._broadcast("stage", [(d,) for d in per_shard])
    except BaseException:
        server._broadcast("discard", [()] * len(server._shards))
        raise
    server._broadcast("commit", [()] * len(server._shards))


def server_snapshot(server: FocalServer) -> None:
    """Keep a copy of the encrypted head (the loss guard's rollback point)."""
    server._broadcast("snapshot", [()] * len(server._shards))


def server_restore(server: FocalServer) -> None:
    """Put back the head of the last :func:`server_snapshot` (ciphertexts only); before any,
    the head the server was set up with (initial, or a resumed run's checkpointed head)."""
    server._broadcast("restore", [()] * len(server._shards))


def server_export_head(server: FocalServer) -> Envelope:
    """The encrypted head (for institutions to decrypt at the end or for evaluation)."""
    parts = server._broadcast("head", [()] * len(server._shards))
    return server.ev.seal_envelope(server._merge(parts, server.layout.n_groups))
