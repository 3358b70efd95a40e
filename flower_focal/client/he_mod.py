"""Client mod that puts HE-FedAvg's encryption at the institution's edge.

Placed around the ordinary train/evaluate handlers (``@app.train(mods=[he_fedavg_mod])``),
it makes them run unchanged under HE-FedAvg:

* incoming: a ciphertext global model (Array with stype :data:`~flower_focal.wire.HE_STYPE`)
  is decrypted with the shared secret key and rescaled by ``C / W`` (the weights that travel
  with the aggregate); arrays the layout keeps out of the ciphertext (its ``local`` ones:
  FedBN's normalisation layers) travel in plaintext next to it and are merged in, so the
  handler gets the complete model in its original order; a plaintext model (round 1) passes
  through;
* outgoing (train only): the trained model is checked for NaN/Inf, optionally clipped
  (``he-clip-norm`` bounds ``||w_local - w_global||``), weighted by ``n_i / C`` *here*, so the
  server only adds, and encrypted; before weighting it is checked against the preset's value
  range, which bounds the aggregate (a refusal names the arrays that do not fit); the reply
  carries one ciphertext Array and the metrics. Only the layout's vector is encrypted: local
  arrays never leave the institution, not even as ciphertext (clipping, noise and the server
  step work over the vector only);
* every reply's metrics gain the seconds this institution spent decrypting and encrypting
  (:data:`~flower_focal.wire.HE_DECRYPT_S` and the others next to it).

Messages without the HE config key pass through untouched, so the same ClientApp serves
every strategy. The mod reads only its own keys: the secret key comes from the node config
``he-secret-key`` or the run config ``he-key-dir`` (and ``he-workers``); every other key of the
app's run config is the app's business. It never leaves this process.

When the server does not know the institutions' training-set sizes (their ClientApp does not
answer flower-focal's describe query), a round takes two exchanges: the train message carries
``he-weight-norm = 0``, the mod trains, prepares the update (checks, clip, noise) and keeps it
in the node's ``context.state`` (it never leaves the institution), replying with its metrics
only; the server then announces ``C`` = the sum of the reported sizes in a *seal* message,
and the mod encrypts the held update weighted by ``n_i / C``. Range guarantees are the same.

With a server optimiser (FedAvgM: the train config carries ``he-server-momentum`` /
``he-server-lr``) the mod encrypts ``x_i = w - lr * (beta * m + w - w_i)`` instead of the
trained ``w_i`` (after clipping and noise; the range check applies to ``x_i``; normalisation
statistics stay ``w_i``, averaged as on the fedavg server), with ``w`` the
global it received and ``m = (previous - w) / lr`` from the previous global that travels in
the message (:data:`~flower_focal.wire.HE_PREVIOUS`; none: ``m = 0``). The previous global is
removed from the message before the train handler sees it. See
:mod:`flower_focal.strategy.he_fedavg`.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from flower_focal import wire
from flower_focal.cache import CACHE, ExactBytes
from flower_focal.crypto import PRESETS, SECRET_FILE, SecretContext
from flower_focal.server_opt import ServerOpt, stepped_mask
from flower_focal.timing import Stopwatch
from flower_focal.flatten import ArrayLayout


def _load_secret(path: str, mtime: float) -> SecretContext:
    """The secret context in ``path``, loaded once per (path, mtime) in this process (the
    ``secret-keys`` region of :data:`~flower_focal.cache.CACHE`)."""
    return CACHE.get_or_build("secret-keys", (path, mtime), lambda: SecretContext.load(path))


def secret_context(context: Context) -> SecretContext:
    """This institution's secret context (node config first, then the run config).

    Raises
    ------
    FileNotFoundError
        When no key is configured or the file is missing (the message says how to make one).
    """
    node_path = context.node_config.get(wire.NODE_HE_SECRET_KEY)
    if node_path:
        path, source = Path(str(node_path)), f"node config {wire.NODE_HE_SECRET_KEY}"
    else:
        key_dir = context.run_config.get(wire.RUN_HE_KEY_DIR, "")
        if not key_dir:
            raise FileNotFoundError(
                "this institution has no HE secret key: run `flower-focal keygen --out DIR` once, "
                f"copy DIR/secret.ctx to every institution and set node config "
                f"{wire.NODE_HE_SECRET_KEY}=/path/secret.ctx (or run config {wire.RUN_HE_KEY_DIR}=DIR)"
            )
        path, source = Path(str(key_dir)), f"run config {wire.RUN_HE_KEY_DIR}"
    if path.is_dir():
        path = path / SECRET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"HE secret key {path} ({source}) not found on this institution")
    return _load_secret(str(path.resolve()), path.stat().st_mtime)


def he_workers(context: Context) -> int:
    """Encryption processes of this institution (run config ``he-workers``, default 1)."""
    value = context.run_config.get(wire.RUN_HE_WORKERS, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"run config {wire.RUN_HE_WORKERS} must be an integer >= 1, got {value!r}")
    return value


def is_encrypted(record: ArrayRecord) -> bool:
    """Whether an ArrayRecord holds an HE ciphertext rather than plaintext arrays."""
    arr = record.get(wire.HE_CIPHERTEXT)
    return arr is not None and arr.stype == wire.HE_STYPE


_KEEP_DECRYPTED = 1
"""How many decrypted globals :func:`_decrypted` keeps at least (2 once server momentum is seen)."""


def _decrypted(record: ArrayRecord, he_secret: SecretContext) -> np.ndarray:
    """The rescaled plaintext of an encrypted aggregate, decrypted at most once per process.

    Within a round every institution receives the same encrypted aggregate twice (evaluate
    of round ``r``, then train of round ``r + 1``), and in a simulation one worker process
    serves many institutions that hold the same key: decrypting once per process and round
    is enough. The ``decrypted`` region of :data:`~flower_focal.cache.CACHE` keeps it (by
    default the latest aggregate only). A hit needs the same key fingerprint, the same
    ``[C, W]`` and byte-for-byte the same ciphertext (:class:`~flower_focal.cache.ExactBytes`:
    compared exactly, at memory speed; no hash whose collisions could serve a stale model, and
    cheaper than hashing 150 MB per message at 11 M parameters), so a different aggregate or
    key never hits; the cached vector is read-only and every caller gets freshly built arrays.
    An entry holds the plaintext global model (which this process decrypts anyway) and a
    reference to the ciphertext bytes it came from; both are counted against the budget. With
    server momentum under HE a train message carries the current and the previous global, and
    both are asked for every time: from the first such message on (:data:`_KEEP_DECRYPTED`) the
    two are kept whatever the budget, so that the
    institutions of one process do not evict each other's.
    """
    blob = bytes(record[wire.HE_CIPHERTEXT].data)  # Array.data is bytes: no copy
    weights = record[wire.HE_WEIGHTS].numpy()
    key = (he_secret.fingerprint, np.ascontiguousarray(weights, dtype=np.float64).tobytes(),
           ExactBytes(blob))

    def build() -> np.ndarray:
        norm, total = (float(x) for x in weights)
        if not (np.isfinite(total) and total > 0 and np.isfinite(norm) and norm > 0):
            raise ValueError(f"encrypted aggregate carries invalid weights [C, W] = [{norm}, {total}]")
        flat = he_secret.decrypt(blob)
        flat *= norm / total  # in place: decrypt returned a fresh array
        flat.setflags(write=False)
        return flat

    return CACHE.get_or_build("decrypted", key, build, nbytes=lambda flat: flat.nbytes + len(blob),
                              keep=_KEEP_DECRYPTED)


def decrypt_record(record: ArrayRecord, he_secret: SecretContext, layout: ArrayLayout) -> ArrayRecord:
    """Plaintext global model from an encrypted aggregate (``C/W`` rescaling applied), with the
    layout's local arrays taken from the plaintext ones next to the ciphertext in ``record``
    (every array of the model, in its original order).

    Decrypts at most once per distinct aggregate in this process (see :func:`_decrypted`).
    """
    return layout.merge(layout.unflatten(_decrypted(record, he_secret)), record)


def encrypt_record(
    record: ArrayRecord,
    he_secret: SecretContext,
    layout: ArrayLayout,
    weight: float,
    *,
    reference: ArrayRecord | None = None,
    clip_norm: float = 0.0,
    noise_std: float = 0.0,
    workers: int = 1,
) -> ArrayRecord:
    """The encrypted, weighted reply: ``Enc(weight * w)`` as one ciphertext Array.

    With ``clip_norm > 0`` the update ``w - reference`` is scaled down to that L2 norm first;
    with ``noise_std > 0`` Gaussian noise of that std is added to the clipped update, so only a
    noised update is ever encrypted (distributed DP). The noise comes from the operating
    system's entropy (never from the run's seed or other public values: whoever could
    regenerate it could subtract it), so runs with noise are not bit-reproducible.

    Raises
    ------
    ValueError
        If the model holds NaN/Inf (refused before anything is encrypted).
    """
    flat = prepare_update(record, he_secret, layout, reference=reference, clip_norm=clip_norm,
                          noise_std=noise_std)
    return encrypt_flat(flat, he_secret, weight, workers=workers)


def prepare_update(
    record: ArrayRecord,
    he_secret: SecretContext,
    layout: ArrayLayout,
    *,
    reference: ArrayRecord | None = None,
    clip_norm: float = 0.0,
    noise_std: float = 0.0,
    server_step: tuple[ServerOpt, np.ndarray, np.ndarray | None] | None = None,
) -> np.ndarray:
    """The flat, unweighted vector an institution will encrypt: checked, clipped, noised.

    ``server_step = (opt, w, m)``: then FedAvgM's target ``w - lr * (beta * m + w - w_i)`` of
    the clipped, noised model ``w_i`` (``w`` the flat global it trained from, ``m`` the server
    momentum or ``None`` for zero); normalisation statistics stay ``w_i`` (averaged, as on the
    fedavg server: :func:`flower_focal.server_opt.is_statistic`).

    Raises ``ValueError`` for NaN/Inf or values beyond the preset's range.
    """
    flat = layout.flatten(record)
    if not np.all(np.isfinite(flat)):
        bad = [n for n in layout.names if not np.all(np.isfinite(record[n].numpy()))]
        raise ValueError(f"refusing to encrypt a model with NaN/Inf values (arrays: {bad[:5]})")
    if clip_norm > 0 and reference is not None:
        base = layout.flatten(reference)
        delta = flat - base
        norm = float(np.linalg.norm(delta))
        if norm > clip_norm:
            delta = delta * (clip_norm / norm)
        if noise_std > 0:
            delta = delta + np.random.default_rng(secrets.randbits(128)).normal(0.0, noise_std, delta.shape)
        flat = base + delta
    if server_step is not None:
        opt, w, m = server_step
        flat = opt.target(w, m, flat, stepped_mask(layout.names, layout.shapes))
    _check_range(flat, he_secret, layout)
    return flat


def encrypt_flat(flat: np.ndarray, he_secret: SecretContext, weight: float, *, workers: int = 1
                 ) -> ArrayRecord:
    """``Enc(weight * flat)`` as one ciphertext Array (``flat`` is scaled in place)."""
    if not 0 < weight <= 1 + 1e-9:
        raise ValueError(f"HE weight n_i / C = {weight:g} is outside (0, 1]: the reported "
                         "example count exceeds the total the server announced")
    flat *= weight
    blob = he_secret.encrypt(flat, workers=workers).to_bytes()
    return ArrayRecord(
        {wire.HE_CIPHERTEXT: wire.he_array(blob)}
    )


def _check_range(flat: np.ndarray, he_secret: SecretContext, layout: ArrayLayout) -> None:
    """Refuse a model with values beyond the preset's range, naming the arrays that exceed it.

    The bound applies to the *unweighted* model: the decrypted sum is ``sum_i w_i x_i`` with
    ``sum_i w_i <= 1``, which can be as large as ``max_i |x_i|`` (every institution holding the
    same value), so ``|x_i| <= max_abs_value`` is what keeps the sum from wrapping around. The
    crypto layer only checks each weighted upload on its own, which cannot see the sum.
    """
    bound = he_secret.preset.max_abs_value
    if max(float(flat.max()), -float(flat.min())) <= bound:
        return
    over, offset = [], 0
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        part = flat[offset : offset + int(np.prod(shape))]
        offset += part.size
        peak = float(np.abs(part).max()) if part.size else 0.0
        if peak > bound:
            over.append((peak, name))
    over.sort(reverse=True)
    named = ", ".join(f"{n} (max |value| {v:.4g})" for v, n in over[:3])
    roomier = [f"{p.name} (+-{p.max_abs_value:g})" for p in PRESETS.values() if p.max_abs_value >= over[0][0]]
    raise ValueError(
        f"model values exceed +-{bound:g}, the range of HE preset {he_secret.preset.name!r} (the "
        f"aggregate can be as large as any one institution's value), in {len(over)} array(s): "
        f"{named}; encrypting them would wrap around. Presets that hold them: "
        f"{', '.join(roomier) or 'none'} (new keys: flower-focal keygen --preset NAME)"
    )


def _single(records: dict, what: str, message_kind: str) -> tuple[str, object]:
    """The one record of a kind in a message, with its name (Flower's FedAvg sends one)."""
    if len(records) != 1:
        raise ValueError(f"he_fedavg_mod expects exactly one {what} in the {message_kind}, "
                         f"got {sorted(records)}")
    return next(iter(records.items()))


def he_fedavg_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decrypt the incoming global model; encrypt the weighted outgoing one (see module doc)."""
    config = next((c for c in message.content.config_records.values() if wire.HE_FINGERPRINT in c), None)
    if config is None:
        return call_next(message, context)

    he_secret = secret_context(context)
    if he_secret.fingerprint.hex() != config[wire.HE_FINGERPRINT]:
        raise ValueError(
            "this institution's HE key set differs from the server's (fingerprint "
            f"{he_secret.fingerprint.hex()} != {config[wire.HE_FINGERPRINT]}); use the same keygen output"
        )
    if bool(config.get(wire.HE_SEAL, False)):
        return _seal(message, context, config, he_secret)
    layout = ArrayLayout.from_config(config)
    content = RecordDict({k: v for k, v in message.content.items() if k != wire.HE_PREVIOUS})
    previous = message.content.array_records.get(wire.HE_PREVIOUS)
    arrays_name, incoming = _single(content.array_records, "ArrayRecord", "server's message")
    decrypting = Stopwatch()  # accumulates: the global, and the previous one under server momentum
    if is_encrypted(incoming):
        with decrypting:
            global_model = decrypt_record(incoming, he_secret, layout)
    else:
        global_model = incoming
    server_step = None
    if message.metadata.message_type == MessageType.TRAIN and (previous is not None or _has_server_opt(config)):
        with decrypting:
            server_step = _server_step(config, incoming, previous, he_secret, layout)
    content[arrays_name] = global_model
    message.content = content

    reply = call_next(message, context)
    if reply.has_error():
        return reply
    metrics_name, metrics = next(iter(reply.content.metric_records.items()), (None, None))
    if metrics is not None:
        metrics[wire.HE_DECRYPT_S] = decrypting.wall_s
        metrics[wire.HE_DECRYPT_CPU_S] = decrypting.cpu_s
    if message.metadata.message_type != MessageType.TRAIN:
        return reply
    if metrics is None:  # never send the trained model back unencrypted
        raise ValueError("the train handler's reply has no MetricRecord (with the example count "
                         "FedAvg weights by); nothing is sent")
    weighted_by = str(config.get(wire.HE_WEIGHTED_BY, wire.NUM_EXAMPLES))
    if weighted_by not in metrics:
        raise ValueError(f"the train handler's reply metrics have no {weighted_by!r} (the example "
                         "count FedAvg weights by); nothing is sent")
    n_examples = float(metrics[weighted_by])
    _, trained = _single(reply.content.array_records, "ArrayRecord", "train handler's reply")
    _check_local_unchanged(trained, global_model, layout)
    flat = prepare_update(
        trained, he_secret, layout, reference=global_model,
        clip_norm=float(config.get(wire.HE_CLIP_NORM, 0.0)),
        noise_std=float(config.get(wire.HE_NOISE_STD, 0.0)),
        server_step=server_step,
    )
    norm = float(config[wire.HE_WEIGHT_NORM])
    if norm <= 0:  # the server does not know C yet: hold the update here until it says
        hold_update(context, flat, n_examples, config)
        metrics[wire.HE_PENDING] = 1
        reply.content = RecordDict({metrics_name: metrics})
        return reply
    encrypting = Stopwatch()
    with encrypting:
        encrypted = encrypt_flat(flat, he_secret, n_examples / norm, workers=he_workers(context))
    metrics[wire.HE_ENCRYPT_S] = encrypting.wall_s
    metrics[wire.HE_ENCRYPT_CPU_S] = encrypting.cpu_s
    reply.content = RecordDict({wire.ARRAYS: encrypted, metrics_name: metrics})
    return reply


def _check_local_unchanged(trained: ArrayRecord, received: ArrayRecord, layout: ArrayLayout) -> None:
    """Refuse a reply whose arrays that the server keeps local (its ``local_keys``, FedBN's
    normalisation layers) differ from the values this institution received.

    Those arrays are not in the encrypted vector, so trained values would be dropped without a
    word while plain fedavg would average them: the server and the ClientApp disagree about
    FedBN. The handler must reply the received values (flower-focal's handlers do under
    ``fedbn``) or leave the arrays out of its reply.
    """
    changed = [name for name in layout.local if name in trained and name in received
               and not np.array_equal(trained[name].numpy(), received[name].numpy())]
    if changed:
        raise ValueError(
            f"the train handler changed {len(changed)} array(s) that the server keeps at the institutions "
            f"(HEFedAvg local_keys, e.g. with fedbn): {changed[:5]}; they are not encrypted, so their trained "
            "values would be dropped. Reply the values received for them (FedBN: keep the trained ones in "
            "the node state) or leave them out of the reply, or run the server without local_keys / fedbn")


def _global_flat(record: ArrayRecord, he_secret: SecretContext, layout: ArrayLayout) -> np.ndarray:
    """A global model as the flat float64 vector (decrypted and ``C/W``-rescaled if encrypted)."""
    return _decrypted(record, he_secret) if is_encrypted(record) else layout.flatten(record)


def _has_server_opt(config) -> bool:
    return wire.HE_SERVER_MOMENTUM in config or wire.HE_SERVER_LR in config


def _server_step(config, incoming: ArrayRecord, previous: ArrayRecord | None, he_secret: SecretContext,
                 layout: ArrayLayout) -> tuple[ServerOpt, np.ndarray, np.ndarray | None] | None:
    """FedAvgM's ``(opt, w, m)`` for this round's upload, or ``None`` without a server optimiser."""
    opt = ServerOpt(float(config.get(wire.HE_SERVER_MOMENTUM, 0.0)), float(config.get(wire.HE_SERVER_LR, 1.0)))
    if previous is not None and opt.momentum <= 0:
        raise ValueError(
            f"the train message carries {wire.HE_PREVIOUS!r} (the previous global) but its config has "
            f"{wire.HE_SERVER_MOMENTUM}={config.get(wire.HE_SERVER_MOMENTUM)!r}, "
            f"{wire.HE_SERVER_LR}={config.get(wire.HE_SERVER_LR)!r}: only server momentum > 0 sends it")
    if not opt.active:
        return None
    w_prev = None
    if previous is not None:
        global _KEEP_DECRYPTED
        _KEEP_DECRYPTED = 2  # current and previous global: both are asked for every round from now on
        # the previous global first, the current one last: the current one is then the most recently
        # used entry, and next round's new global evicts the previous one, not this round's
        w_prev = _global_flat(previous, he_secret, layout)
    w = _global_flat(incoming, he_secret, layout)  # read-only; the step makes new arrays
    m = None if w_prev is None else opt.momentum_from(w_prev, w)
    return opt, w, m


_HELD = "flower-focal.he-held-update"
_HELD_META = "flower-focal.he-held-meta"


def hold_update(context: Context, flat: np.ndarray, n_examples: float, config) -> None:
    """Keep a prepared update in the node's ``context.state`` until the server announces C."""
    context.state[_HELD] = ArrayRecord({_HELD: Array(flat)})
    context.state[_HELD_META] = ConfigRecord({
        wire.SERVER_ROUND: int(config.get(wire.SERVER_ROUND, 0)), "n": float(n_examples),
        wire.HE_FINGERPRINT: str(config[wire.HE_FINGERPRINT])})


def seal_held_update(context: Context, config, he_secret: SecretContext) -> tuple[ArrayRecord, float, Stopwatch]:
    """Encrypt the update held for this round by ``n_i / C`` (``C`` from the seal config).

    Returns the ciphertext record, ``n_i`` and the encryption's stopwatch. The held update is
    dropped either way; a missing one (its train reply failed, state lost) raises.
    """
    held = context.state.array_records.get(_HELD)
    meta = context.state.config_records.get(_HELD_META)
    server_round = int(config.get(wire.SERVER_ROUND, 0))
    if held is None or meta is None or int(meta[wire.SERVER_ROUND]) != server_round \
            or meta[wire.HE_FINGERPRINT] != config[wire.HE_FINGERPRINT]:
        raise ValueError(f"asked to seal the round-{server_round} update, but this institution holds "
                         "none for that round (its train reply failed or its state was lost)")
    flat = np.array(held[_HELD].numpy(), dtype=np.float64)
    n_examples = float(meta["n"])
    del context.state[_HELD]
    del context.state[_HELD_META]
    encrypting = Stopwatch()
    with encrypting:
        encrypted = encrypt_flat(flat, he_secret, n_examples / float(config[wire.HE_WEIGHT_NORM]),
                                 workers=he_workers(context))
    return encrypted, n_examples, encrypting


def _seal(message: Message, context: Context, config, he_secret: SecretContext) -> Message:
    """Second exchange of a round whose sizes were unknown: encrypt the held update by n_i / C."""
    encrypted, n_examples, encrypting = seal_held_update(context, config, he_secret)
    weighted_by = str(config.get(wire.HE_WEIGHTED_BY, wire.NUM_EXAMPLES))
    metrics = MetricRecord({weighted_by: n_examples, wire.HE_ENCRYPT_S: encrypting.wall_s,
                            wire.HE_ENCRYPT_CPU_S: encrypting.cpu_s})
    return Message(RecordDict({wire.ARRAYS: encrypted, wire.METRICS: metrics}), reply_to=message)
