"""Client mod that puts HE-FedAvg's encryption at the institution's edge.

Placed around the ordinary train/evaluate handlers (``@app.train(mods=[he_fedavg_mod])``),
it makes them run unchanged under HE-FedAvg:

* incoming: a ciphertext global model (Array with stype :data:`~flower_focal.keys.HE_STYPE`)
  is decrypted with the shared secret key and rescaled by ``C / W`` (the weights that travel
  with the aggregate); a plaintext model (round 1) passes through;
* outgoing (train only): the trained model is checked for NaN/Inf, optionally clipped
  (``he-clip-norm`` bounds ``||w_local - w_global||``), weighted by ``n_i / C`` *here*, so the
  server only adds, and encrypted; before weighting it is checked against the preset's value
  range, which bounds the aggregate (a refusal names the arrays that do not fit); the reply
  carries one ciphertext Array and the metrics;
* every reply's metrics gain the seconds this institution spent decrypting and encrypting
  (:data:`~flower_focal.keys.HE_DECRYPT_S` and the others next to it).

Messages without the HE config key pass through untouched, so the same ClientApp serves
every strategy. The secret key is read from the node config ``he-secret-key`` or the run
config ``he-key-dir``; it never leaves this process.
"""

from __future__ import annotations

import functools
import secrets
import threading
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from flower_focal import keys
from flower_focal.config import RunConfig
from flower_focal.crypto import PRESETS, SECRET_FILE, SecretContext
from flower_focal.history import Stopwatch
from flower_focal.packing import ArrayLayout


@functools.lru_cache(maxsize=4)
def _load_secret(path: str, mtime: float) -> SecretContext:
    return SecretContext.load(path)


def secret_context(context: Context) -> SecretContext:
    """This institution's secret context (node config first, then the run config).

    Raises
    ------
    FileNotFoundError
        When no key is configured or the file is missing (the message says how to make one).
    """
    node_path = context.node_config.get(keys.NODE_HE_SECRET_KEY)
    if node_path:
        path = Path(str(node_path))
    else:
        key_dir = RunConfig.from_mapping(context.run_config).he_key_dir
        if not key_dir:
            raise FileNotFoundError(
                "he-fedavg needs the institutions' secret key: run `flower-focal keygen --out DIR` "
                "and set run config he-key-dir=DIR or node config he-secret-key=DIR/secret.ctx"
            )
        path = Path(key_dir)
    if path.is_dir():
        path = path / SECRET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"HE secret key {path} not found")
    return _load_secret(str(path.resolve()), path.stat().st_mtime)


def is_encrypted(record: ArrayRecord) -> bool:
    """Whether an ArrayRecord holds an HE ciphertext rather than plaintext arrays."""
    arr = record.get(keys.HE_CIPHERTEXT)
    return arr is not None and arr.stype == keys.HE_STYPE


class _DecryptCache:
    """The last decrypted aggregate of this process, keyed by a digest of what was decrypted.

    Within a round every institution receives the same encrypted aggregate twice (evaluate
    of round ``r``, then train of round ``r + 1``), and in a simulation one worker process
    serves many institutions that hold the same key: decrypting once per process and round
    is enough. A hit needs the same key fingerprint, the same ``[C, W]`` and byte-for-byte the
    same ciphertext (compared exactly, at memory speed: no hash whose collisions could serve a
    stale model, and cheaper than hashing 150 MB per message at 11 M parameters), so a
    different aggregate or key never hits; the cached vector is read-only and every caller
    gets freshly built arrays. One entry is kept: the plaintext global model (which this
    process decrypts anyway) and a reference to the ciphertext bytes it came from.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[bytes, bytes, bytes] | None = None  # fingerprint, [C, W], ciphertext
        self._flat: np.ndarray | None = None
        self.hits = 0
        self.misses = 0

    def get(self, record: ArrayRecord, he_secret: SecretContext) -> np.ndarray:
        blob = bytes(record[keys.HE_CIPHERTEXT].data)  # Array.data is bytes: no copy
        weights = record[keys.HE_WEIGHTS].numpy()
        key = (he_secret.fingerprint, np.ascontiguousarray(weights, dtype=np.float64).tobytes(), blob)
        with self._lock:
            if key == self._key and self._flat is not None:  # tuple ==: exact byte comparison
                self.hits += 1
                return self._flat
        norm, total = (float(x) for x in weights)
        if not (np.isfinite(total) and total > 0 and np.isfinite(norm) and norm > 0):
            raise ValueError(f"encrypted aggregate carries invalid weights [C, W] = [{norm}, {total}]")
        flat = he_secret.decrypt(blob)
        flat *= norm / total  # in place: decrypt returned a fresh array
        flat.setflags(write=False)
        with self._lock:
            self._key, self._flat = key, flat
            self.misses += 1
        return flat

    def clear(self) -> None:
        with self._lock:
            self._key, self._flat = None, None
            self.hits = self.misses = 0


DECRYPTED = _DecryptCache()


def decrypt_record(record: ArrayRecord, he_secret: SecretContext, layout: ArrayLayout) -> ArrayRecord:
    """Plaintext global model from an encrypted aggregate (``C/W`` rescaling applied).

    Decrypts at most once per distinct aggregate in this process (see :class:`_DecryptCache`).
    """
    return layout.unflatten(DECRYPTED.get(record, he_secret))


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
    _check_range(flat, he_secret, layout)
    flat *= weight  # flat is this call's own buffer (flatten or the clip above made it)
    blob = he_secret.encrypt(flat, workers=workers).to_bytes()
    return ArrayRecord(
        {keys.HE_CIPHERTEXT: Array(dtype="float64", shape=(layout.size,), stype=keys.HE_STYPE, data=blob)}
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


def he_fedavg_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decrypt the incoming global model; encrypt the weighted outgoing one (see module doc)."""
    config = message.content.config_records.get(keys.CONFIG)
    if config is None or keys.HE_FINGERPRINT not in config:
        return call_next(message, context)

    he_secret = secret_context(context)
    if he_secret.fingerprint.hex() != config[keys.HE_FINGERPRINT]:
        raise ValueError(
            "this institution's HE key set differs from the server's (fingerprint "
            f"{he_secret.fingerprint.hex()} != {config[keys.HE_FINGERPRINT]}); use the same keygen output"
        )
    layout = ArrayLayout.from_config(config)
    incoming = message.content[keys.ARRAYS]
    decrypting = Stopwatch()
    if is_encrypted(incoming):
        with decrypting:
            global_model = decrypt_record(incoming, he_secret, layout)
    else:
        global_model = incoming
    message.content = RecordDict({keys.ARRAYS: global_model, keys.CONFIG: config})

    reply = call_next(message, context)
    if reply.has_error():
        return reply
    metrics = reply.content.metric_records.get(keys.METRICS)
    if metrics is not None:
        metrics[keys.HE_DECRYPT_S] = decrypting.wall_s
        metrics[keys.HE_DECRYPT_CPU_S] = decrypting.cpu_s
    if message.metadata.message_type != MessageType.TRAIN:
        return reply
    if metrics is None:  # never send the trained model back unencrypted
        raise ValueError(f"the train handler's reply has no {keys.METRICS!r} MetricRecord; nothing is sent")
    cfg = RunConfig.from_mapping(context.run_config)
    encrypting = Stopwatch()
    with encrypting:
        encrypted = encrypt_record(
            reply.content[keys.ARRAYS],
            he_secret,
            layout,
            weight=float(metrics[keys.NUM_EXAMPLES]) / float(config[keys.HE_WEIGHT_NORM]),
            reference=global_model,
            clip_norm=float(config.get(keys.HE_CLIP_NORM, 0.0)),
            noise_std=float(config.get(keys.HE_NOISE_STD, 0.0)),
            workers=cfg.he_workers,
        )
    metrics[keys.HE_ENCRYPT_S] = encrypting.wall_s
    metrics[keys.HE_ENCRYPT_CPU_S] = encrypting.cpu_s
    reply.content = RecordDict({keys.ARRAYS: encrypted, keys.METRICS: metrics})
    return reply
