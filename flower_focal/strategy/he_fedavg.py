"""HE-FedAvg: FedAvg whose server only ever adds ciphertexts.

Institutions encrypt ``(n_i / C) * w_i`` under a shared CKKS/BFV key (client mod
:func:`flower_focal.client.he_mod.he_fedavg_mod`); this strategy sums the ciphertexts as they
are checked, sends the encrypted sum back together with the plaintext pair ``[C, W]``
(``W = sum n_i`` of the replies that made it into the sum), and institutions decrypt and
multiply by ``C / W``. So the weighting stays exact when institutions fail or are rejected,
and the server holds no secret key, no plaintext update and no plaintext model.

Replies are added the moment they arrive (:meth:`HEFedAvg.on_reply`, called by the
:class:`~flower_focal.grid.PromptGrid` that ``run_server`` and ``start`` put around any grid, a
foreign ServerApp's included): each ciphertext is checked, added into the running sum and dropped, so the sum is ready when the last reply
lands and the server holds about one model, not one per institution. Ciphertext addition is
exact modular arithmetic, so the sum is bit-identical in any arrival order. The seconds spent
summing and serialising the sum go into the round's ``timings`` in ``metrics.json``
(:data:`~flower_focal.wire.HE_SUM_S` and the others next to it); institutions report their own
in their reply metrics.

When some sampled institution never described its training-set size (its ClientApp does not
answer flower-focal's describe query: any Flower app whose ClientApp only adds the mod), ``C``
is not known when the round starts. The train message then carries ``C = 0``: institutions
train and hold their prepared update, replying with their example counts only; the server
sums those into ``C`` and sends a small *seal* message, and institutions encrypt the held
update weighted by ``n_i / C`` (see :mod:`flower_focal.client.he_mod`). One extra exchange,
the same ciphertexts and range guarantees.

With a server optimiser (``server_momentum`` / ``server_lr``: FedAvgM) the server still only
adds. Each institution, holding the global ``w`` it trains from and the server momentum ``m``,
encrypts ``(n_i / C) * (w - lr * (beta * m + w - w_i))`` instead of ``(n_i / C) * w_i``
(:meth:`flower_focal.server_opt.ServerOpt.target`); that is linear in ``w_i`` and the weights
``n_i / W`` sum to 1, so the decrypted, ``C / W``-corrected sum is FedAvgM's new global ``w'``
exactly, with the same [C, W] bookkeeping under failures and partial participation. The
momentum after the step is ``m' = (w - w') / lr``: with ``beta > 0`` every train message also
carries the global before the last aggregated round (a ciphertext the server already held, or
the public initial model after round 1; :data:`~flower_focal.wire.HE_PREVIOUS`), so any
institution, sampled before or not, derives ``m`` from the two globals it decrypts (none before
the first aggregated round: ``m = 0``). Upload stays one ciphertext; train messages carry two.
That previous global is also the server's checkpointed optimiser state, so resume continues.
Institutions learn nothing new: they decrypt every global anyway.

With ``local_keys`` (FedBN: the normalisation layers stay at each institution) those arrays are
left out of the encrypted vector (:attr:`~flower_focal.flatten.ArrayLayout.local`): institutions
never upload them, not even as ciphertext. Their global values are the public initial model's
(never aggregated); the server keeps them and sends them in plaintext next to the ciphertext in
every train and evaluate message and with the final model, so an institution still decrypts a
complete model. Uploads shrink by the normalisation layers' share of the parameters.

Everything else (sampling, rounds, per-institution history, metrics) is :class:`FedAvg`'s.
Server-side evaluation of the model does not exist in this mode: evaluation is federated, and
:meth:`HEFedAvg.start` refuses an ``evaluate_fn``. The final model is ciphertext:
:meth:`HEFedAvg.encrypted_model` (or :meth:`HEFedAvg.save_final_model`) gives it with its
layout, for an institution to decrypt (:class:`flower_focal.encrypted_model.EncryptedModel`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from flower_focal import wire
from flower_focal.crypto import Accumulator, CiphertextError, PublicContext
from flower_focal.crypto.envelope import EnvelopeLayout
from flower_focal.encrypted_model import EncryptedModel
from flower_focal.history import reply_bytes
from flower_focal.timing import Stopwatch
from flower_focal.flatten import ArrayLayout
from flower_focal.strategy.fedavg import FedAvg


class RejectedReply(ValueError):
    """A training reply the server leaves out of the sum (wrong shape, weight or ciphertext)."""


_REJECTED = (CiphertextError, RejectedReply)


def reply_key(reply: Message) -> tuple[int, str]:
    """Which reply this is: its sender and the instruction it answers (not the Python object,
    which a grid may copy between the arrival hook and ``aggregate_train``)."""
    return reply.metadata.src_node_id, reply.metadata.reply_to_message_id


@dataclass
class _RoundSum:
    """One round's running encrypted sum and what happened to each reply added so far."""

    acc: Accumulator
    # reply_key(reply) -> (reply, rejection reason or None, ciphertext bytes)
    seen: dict[tuple[int, str], tuple[Message, str | None, int]] = field(default_factory=dict)
    weight: float = 0.0  # examples of the replies in ``acc`` (the W that travels with the sum)
    summing: Stopwatch = field(default_factory=Stopwatch)  # time spent checking and adding


class HEFedAvg(FedAvg):
    """Homomorphically encrypted FedAvg (server adds ciphertexts only).

    Parameters
    ----------
    he_public : PublicContext
        The server's key-less context (``public.ctx`` from ``flower-focal keygen``). A
        context holding a secret key is refused.
    clip_norm : float
        Sent to institutions: clip ``||w_local - w_global||_2`` to this before encrypting
        (0 disables).
    server_workers : int
        Processes that check and add the uploads, each owning a range of ciphertext chunks
        (byte-identical to the serial sum; 1 = in the ServerApp's process).
    noise_multiplier : float
        Distributed Gaussian noise: each of the ``m`` sampled institutions adds noise of std
        ``noise_multiplier * clip_norm / sqrt(m)`` to its clipped update before encrypting, so
        the (uniformly weighted) sum carries the noise of central DP with this multiplier
        while no institution's update is ever encrypted un-noised. Needs ``clip_norm > 0``.
    local_keys : iterable of str
        Arrays of the model that stay at the institutions and are left out of the encrypted
        vector (FedBN). Their plaintext initial values travel next to the ciphertext; the
        institutions' ClientApp keeps its own (flower-focal's ``fedbn=true`` does). The names
        must be arrays of the initial model (else ``ValueError`` naming them). For a foreign
        ServerApp with FedBN clients: ``local_keys=flower_focal.models.norm_keys(model)``.
    **kwargs
        Forwarded to :class:`FedAvg` (``seed``, ``fraction_train``, ...).

    Callers must run institutions with :func:`~flower_focal.client.he_mod.he_fedavg_mod`
    around their train and evaluate handlers and the matching ``secret.ctx``.
    """

    name = "he-fedavg"

    def __init__(
        self, *, he_public: PublicContext, clip_norm: float = 0.0, noise_multiplier: float = 0.0,
        exchange_timeout: float = 3600.0, server_workers: int = 1, local_keys: Iterable[str] = (),
        **kwargs
    ) -> None:
        if not isinstance(he_public, PublicContext) or he_public.holds_secret_key:
            raise ValueError(
                "HEFedAvg must be given a public context (no secret key): load public.ctx "
                "with flower_focal.crypto.PublicContext.load"
            )
        if noise_multiplier > 0 and clip_norm <= 0:
            raise ValueError("he-noise-multiplier needs he-clip-norm > 0 (noise is calibrated to the clip)")
        super().__init__(**kwargs)
        self.he_public = he_public
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.exchange_timeout = exchange_timeout
        if isinstance(server_workers, bool) or not isinstance(server_workers, int) or server_workers < 1:
            raise ValueError(f"server_workers must be an int >= 1, got {server_workers!r}")
        self.server_workers = server_workers
        if isinstance(local_keys, str):
            raise TypeError(f"local_keys must be an iterable of array names, got the string {local_keys!r}")
        self.local_keys: tuple[str, ...] = tuple(dict.fromkeys(local_keys))
        self._layout: ArrayLayout | None = None
        self._local = ArrayRecord()  # plaintext initial values of the local arrays (public)
        self._weight_norm = 1.0
        self._sum: _RoundSum | None = None
        self._grid: Grid | None = None
        self._previous: ArrayRecord | None = None  # global before the last aggregated round (FedAvgM)

    @classmethod
    def from_key_dir(cls, key_dir: str | Path, **kwargs) -> HEFedAvg:
        """An HE-FedAvg strategy with the server's ``public.ctx`` from ``key_dir`` (keygen output).

        Raises ``FileNotFoundError`` naming the file (and how to make it) when it is missing.
        """
        return cls(he_public=PublicContext.from_key_dir(key_dir), **kwargs)

    def close(self) -> None:
        """Stop the summing pool of ``server_workers`` (idempotent; a later round restarts it)."""
        close = getattr(self.he_public, "close", None)
        if callable(close):
            close()

    def check_evaluate_fn(self, evaluate_fn) -> None:
        """Refuse server-side evaluation: the server never holds the plaintext model."""
        if evaluate_fn is not None:
            raise ValueError(
                f"{type(self).__name__} cannot run an evaluate_fn: the server only ever holds the "
                "encrypted model. Use federated evaluation (your ClientApp's @app.evaluate with "
                "he_fedavg_mod reports metrics on each institution's data), or decrypt the final "
                "model at an institution (flower-focal decrypt-model) and evaluate it there."
            )

    def encrypted_model(self, result: Result) -> EncryptedModel:
        """The run's final model as ciphertext plus its public layout and ``[C, W]`` weights.

        Raises
        ------
        RuntimeError
            If no round produced an encrypted aggregate.
        """
        final = self.final_ciphertext(result)
        if final is None:
            raise RuntimeError("he-fedavg: the run has no encrypted aggregate (no round aggregated)")
        return EncryptedModel.from_record(*final)

    def save_final_model(self, result: Result, path: str | Path) -> Path:
        """Write the encrypted final model (``path``, e.g. ``final_model.he``, plus ``path.json``)."""
        return self.encrypted_model(result).save(path)

    def summary(self) -> None:
        """FedAvg summary plus HE parameters (never keys)."""
        super().summary()
        p = self.he_public.preset
        log(INFO, "\t└──> HE: preset %s (%s), fingerprint %s, server holds no secret key",
            p.name, p.params(), self.he_public.fingerprint.hex())

    def bind_initial_model(self, arrays: ArrayRecord) -> None:
        """Fix the array layout from the plaintext initial model (also when resuming).

        Raises
        ------
        ValueError
            If ``local_keys`` names arrays the model does not have, or every array.
        """
        super().bind_initial_model(arrays)
        self._bind_layout(arrays)

    def _bind_layout(self, arrays: ArrayRecord) -> None:
        """The layout of the plaintext initial model, without the local arrays, whose plaintext
        initial values are kept to travel next to the ciphertext."""
        try:
            layout = ArrayLayout.of(arrays, local=self.local_keys)  # refuses names the model lacks
        except ValueError as exc:
            raise ValueError(f"he-fedavg local_keys refused: {exc}; pass the model's own names, e.g. "
                             "flower_focal.models.norm_keys(model)") from None
        if not layout.names:
            raise ValueError("he-fedavg local_keys name every array of the model: nothing would be aggregated")
        self._layout = layout
        self._local = ArrayRecord({k: arrays[k] for k in self._layout.local})

    def server_state(self) -> ArrayRecord:
        """The global before the last aggregated round (FedAvgM with ``beta > 0``; without the
        plaintext local arrays, which the step does not use), else empty."""
        return self._previous if self._previous is not None else ArrayRecord()

    def restore_server_state(self, state: ArrayRecord) -> None:
        """Continue from a checkpoint's :meth:`server_state`."""
        self._previous = state if len(state) else None

    def final_model(self, result: Result) -> ArrayRecord | None:
        """None: the server never holds the plaintext model (see :meth:`final_ciphertext`)."""
        return None

    def final_ciphertext(self, result: Result) -> tuple[ArrayRecord, ArrayLayout] | None:
        """The encrypted final global model (ciphertext Array + ``[C, W]``) and its layout."""
        if self._layout is None or wire.HE_CIPHERTEXT not in result.arrays:
            return None
        return result.arrays, self._layout

    # ------------------------------------------------------------------ configure
    def _he_config(self, arrays: ArrayRecord, config: ConfigRecord) -> None:
        if self._layout is None:
            if wire.HE_CIPHERTEXT in arrays:
                raise ValueError("HEFedAvg must start from a plaintext model (the public initial weights)")
            self._bind_layout(arrays)
        assert self._layout is not None
        self._check_global(arrays, "the global model")
        self._layout.to_config(config)
        config[wire.HE_FINGERPRINT] = self.he_public.fingerprint.hex()
        config[wire.HE_CLIP_NORM] = float(self.clip_norm)

    def _check_global(self, arrays: ArrayRecord, what: str, *, with_local: bool = True) -> None:
        """Refuse an encrypted global made with another layout (e.g. a checkpoint written before
        FedBN's local arrays were left out of the ciphertext): its length (public, in the
        envelope header) must be the layout's and the local arrays must travel next to it."""
        if self._layout is None or wire.HE_CIPHERTEXT not in arrays:
            return
        length = EnvelopeLayout.parse(arrays[wire.HE_CIPHERTEXT].data, self.he_public.fingerprint).length
        missing = [k for k in self._layout.local if k not in arrays] if with_local else []
        if length == self._layout.size and not missing:
            return
        local = len(self._layout.local)
        raise ValueError(
            f"he-fedavg: {what} is a ciphertext of {length} values, but this run's layout encrypts "
            f"{self._layout.size} ({local} array(s) kept local{' (FedBN)' if local else ''})"
            + (f" and its plaintext {missing[:3]}{'...' if len(missing) > 3 else ''} are not next to it"
               if missing else "")
            + ": it was made with another layout, e.g. a checkpoint written by a flower-focal that still "
            "encrypted FedBN's normalisation layers. It cannot be continued: start the run again "
            "(resume=false, or another run-dir)")

    def _without_local(self, arrays: ArrayRecord) -> ArrayRecord:
        """``arrays`` without the plaintext local arrays (what HE_PREVIOUS needs)."""
        if not self._local:
            return arrays
        return ArrayRecord({k: a for k, a in arrays.items() if k not in self._local})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling; adds the layout, key fingerprint and weight normaliser C.

        ``C = 0`` when a sampled institution's size is unknown: the round is sealed in a
        second exchange (see module doc).
        """
        self.roster.refresh(grid)
        self._grid = grid
        self._he_config(arrays, config)
        config[wire.HE_WEIGHTED_BY] = self.weighted_by_key
        config[wire.HE_NOISE_STD] = 0.0
        config[wire.HE_WEIGHT_NORM] = 0.0
        if self.server_opt.active:  # institutions apply FedAvgM before encrypting (module doc)
            config[wire.HE_SERVER_MOMENTUM] = float(self.server_opt.momentum)
            config[wire.HE_SERVER_LR] = float(self.server_opt.lr)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if messages and self.roster.sizes_known(m.metadata.dst_node_id for m in messages):
            self._weight_norm = float(max(self.roster.total_train_examples(), 1))
        else:
            self._weight_norm = 0.0  # learnt from the replies, then sealed
        for message in messages:  # Flower's FedAvg shares one config among the messages
            message_config = message.content[self.configrecord_key]
            message_config[wire.HE_WEIGHT_NORM] = self._weight_norm
            if self.noise_multiplier > 0:
                # m = sampled institutions
                message_config[wire.HE_NOISE_STD] = self.noise_multiplier * self.clip_norm / len(messages) ** 0.5
        self._sum = _RoundSum(Accumulator(self.he_public, workers=self.server_workers)) if self._weight_norm > 0 else None
        return messages

    def _train_messages(self, messages: list[Message]) -> list[Message]:
        """With server momentum: every train message also carries the previous global."""
        if self.server_opt.momentum > 0 and self._previous is not None:
            self._check_global(self._previous, "the previous global (server momentum)", with_local=False)
            for message in messages:
                message.content[wire.HE_PREVIOUS] = self._previous
        return messages

    def _aggregated(self, server_round: int, arrays: ArrayRecord | None,
                    metrics: MetricRecord | None) -> ArrayRecord | None:
        """FedAvg's bookkeeping; a new global makes the one this round trained from the previous."""
        start = self._round_start
        arrays = super()._aggregated(server_round, arrays, metrics)
        if arrays is not None and self.server_opt.momentum > 0 and start is not None:
            self._previous = self._without_local(start)
        return arrays

    def _seal(self, server_round: int, replies: list[Message]) -> tuple[list[Message], dict[int, RecordDict]]:
        """Second exchange of a round with unknown sizes: announce C, collect the ciphertexts.

        Returns the seal replies and, per node, the train reply's content (the app's metrics).
        """
        held: dict[int, RecordDict] = {}
        for reply in replies:
            if reply.has_error():
                continue
            label = self.roster.label_of(reply.metadata.src_node_id)
            metrics = next(iter(reply.content.metric_records.values()), None)
            weight = metrics.get(self.weighted_by_key) if metrics is not None else None
            problem = None
            if metrics is None or not metrics.get(wire.HE_PENDING):
                problem = "the reply holds no pending update (is he_fedavg_mod on the ClientApp's train?)"
            elif not isinstance(weight, int | float) or not np.isfinite(weight) or weight <= 0:
                problem = f"invalid {self.weighted_by_key} {weight!r}"
            if problem is not None:
                self.recorder.reject(server_round, label, f"rejected ({problem})")
                continue
            held[reply.metadata.src_node_id] = reply.content
        if not held or self._grid is None:
            return [], held
        total = sum(float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in held.values())
        self._weight_norm = total
        config = ConfigRecord({wire.SERVER_ROUND: server_round, wire.HE_SEAL: True,
                               wire.HE_WEIGHT_NORM: total, wire.HE_WEIGHTED_BY: self.weighted_by_key})
        self._he_config(ArrayRecord(), config)
        messages = [Message(RecordDict({self.configrecord_key: config}), dst_node_id=node,
                            message_type=MessageType.TRAIN) for node in held]
        self._sum = _RoundSum(Accumulator(self.he_public, workers=self.server_workers))
        sealed = list(self._grid.send_and_receive(messages, timeout=self.exchange_timeout))
        for reply in sealed:
            if reply.has_error():
                label = self.roster.label_of(reply.metadata.src_node_id)
                self.recorder.reject(server_round, label, f"seal failed ({reply.error.reason})")
        return sealed, held

    def on_reply(self, reply: Message) -> Message:
        """Check and add a training reply into the round's sum the moment it arrives, then drop
        its ciphertext (other replies, and any while no sum is open, pass unchanged)."""
        stream = self._sum
        if stream is None or reply.has_error() or reply.metadata.message_type != MessageType.TRAIN:
            return reply
        size = reply_bytes(reply)
        try:
            self._add(stream, reply)
        except _REJECTED as exc:
            stream.seen[reply_key(reply)] = (reply, str(exc), size)
            return reply
        metrics = next(iter(reply.content.metric_records.values()))
        reply.content = RecordDict({wire.METRICS: metrics})  # the sum holds the ciphertext now
        stream.seen[reply_key(reply)] = (reply, None, size)
        return reply

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluation sampling; institutions decrypt the model themselves."""
        self._he_config(arrays, config)
        return super().configure_evaluate(server_round, arrays, config, grid)

    # ------------------------------------------------------------------ aggregate
    def _aggregate_arrays(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's seam: finish the round's encrypted sum; rejected replies are logged and left
        out (FedAvg's ``aggregate_train`` has recorded the replies and records the outcome).

        Replies that :meth:`on_reply` already added on arrival are only accounted for here;
        any other reply (one that reached the strategy without passing :meth:`on_reply`) is
        checked and added now.
        """
        held: dict[int, RecordDict] | None = None
        if self._weight_norm <= 0:  # sizes were unknown: announce C and collect the ciphertexts
            sealed, held = self._seal(server_round, replies)
            replies = self.roster.sort_replies(sealed)
            self.recorder.count_received(server_round, replies)
        stream, self._sum = self._sum or _RoundSum(Accumulator(self.he_public, workers=self.server_workers)), None
        record = self.recorder.round(server_round)
        accepted = []
        for reply in replies:
            if reply.has_error():
                continue
            pid = self.roster.label_of(reply.metadata.src_node_id)
            seen = stream.seen.get(reply_key(reply))
            if seen is not None:  # added on arrival (its ciphertext is in the sum already)
                _, error, size = seen
                record.bytes_up += size - reply_bytes(reply)  # its ciphertext was dropped
            else:
                error = None
                try:
                    self._add(stream, reply)
                except _REJECTED as exc:
                    error = str(exc)
            if error is not None:
                log(WARNING, "he-fedavg round %d: rejected reply of institution %d: %s",
                    server_round, pid, error)
                self.recorder.reject(server_round, pid, f"rejected ({error})")
                continue
            accepted.append(reply.content if held is None else held[reply.metadata.src_node_id])
        acc, total_weight = stream.acc, stream.weight
        log(INFO, "he-fedavg round %d: summed %d ciphertexts (total weight %.0f)",
            server_round, len(accepted), total_weight)
        if not self.recorder.enough_replies(server_round, len(accepted), self.min_train_replies):
            return None, None
        norm = self._weight_norm
        serializing = Stopwatch()
        with serializing:
            blob = acc.to_bytes()
        self.recorder.timings(server_round, {
            wire.HE_SUM_S: stream.summing.wall_s, wire.HE_SUM_CPU_S: stream.summing.cpu_s,
            wire.HE_SERIALIZE_S: serializing.wall_s, wire.HE_SERIALIZE_CPU_S: serializing.cpu_s,
        })
        arrays = ArrayRecord({
            wire.HE_CIPHERTEXT: wire.he_array(blob),
            wire.HE_WEIGHTS: Array(np.array([norm, total_weight], dtype=np.float64)),
            **{k: self._local[k] for k in self._local},  # plaintext, public: the initial values
        })
        return arrays, self.train_metrics_aggr_fn(accepted, self.weighted_by_key)

    def _add(self, stream: _RoundSum, reply: Message) -> None:
        """Check a reply and add its ciphertext and its weight to the round's sum.

        The summed examples may not exceed ``C``: institutions weighted by ``n_i / C``, and the
        preset's range bounds the sum only while those weights add up to at most 1.
        """
        with stream.summing:
            blob, weight = self._checked_reply(reply)
            if stream.weight + weight > self._weight_norm * (1 + 1e-9):
                raise RejectedReply(
                    f"{self.weighted_by_key} {weight:g} would bring this round's summed examples to "
                    f"{stream.weight + weight:g}, more than C = {self._weight_norm:g} (the institutions' "
                    "described total that every upload was weighted by); the encrypted sum could "
                    "exceed the preset's range, so the reply is left out"
                )
            stream.acc.add(blob)
            stream.weight += weight

    def _checked_reply(self, reply: Message) -> tuple[bytes, float]:
        content = reply.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise RejectedReply("expected exactly one ArrayRecord and one MetricRecord")
        arrays = next(iter(content.array_records.values()))
        arr = arrays.get(wire.HE_CIPHERTEXT)
        if arr is None or len(arrays) != 1:
            raise RejectedReply(f"expected one {wire.HE_CIPHERTEXT!r} array, got {list(arrays.keys())}")
        if arr.stype != wire.HE_STYPE:
            raise RejectedReply(f"wrong array stype {arr.stype!r} (expected {wire.HE_STYPE!r}): a plaintext reply?")
        metrics = next(iter(content.metric_records.values()))
        if self.weighted_by_key not in metrics:
            raise RejectedReply(f"reply metrics have no {self.weighted_by_key!r}")
        try:
            weight = float(metrics[self.weighted_by_key])
        except (TypeError, ValueError):
            weight = float("nan")
        if not np.isfinite(weight) or weight <= 0:
            raise RejectedReply(f"invalid {self.weighted_by_key} {metrics[self.weighted_by_key]!r}")
        return arr.data, weight
