"""The wire vocabulary: names of the records and fields the ServerApp and ClientApps exchange.

One place for every string that crosses the wire, so the server and client sides cannot drift,
and the one way a ciphertext becomes a Flower ``Array`` and back (:func:`he_array`,
:func:`he_bytes`). Key *material* is :mod:`flower_focal.crypto.keys`; datalist field names are
:mod:`flower_focal.data.fields`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.app import Array, ArrayRecord

# RecordDict keys (Flower's FedAvg defaults, kept so Flower's own mods and wrappers work).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# MetricRecord / ConfigRecord fields.
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key
SERVER_ROUND = "server-round"  # injected by Flower's FedAvg into every config
TRAIN_LOSS = "train-loss"
LOSS = "loss"
ACCURACY = "accuracy"
AUROC = "auroc"
PERSONAL_PREFIX = "personal-"  # evaluate metrics of the personal model (personal-epochs fine-tuning or Ditto)

# QUERY "query.describe": what an institution tells the server when it joins (no label
# statistics). Optional: strategies fall back to Flower's defaults for nodes that don't answer.
ACTION_DESCRIBE = "describe"
PARTITION_ID = "partition-id"
NUM_CLASSES = "num-classes"
IN_CHANNELS = "in-channels"
NUM_TRAIN = "num-train"

# Node config keys (simulation sets partition-id/num-partitions; deployments set data-path).
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DATA_PATH = "data-path"
NODE_DEVICE = "device"

# HE-FedAvg (see flower_focal/strategy/he_fedavg.py and flower_focal/client/he_mod.py).
HE_STYPE = "he/flower-focal"  # Array.stype of a ciphertext blob (EncryptedVector bytes)
HE_CIPHERTEXT = "ciphertext"  # name of the ciphertext Array in an encrypted ArrayRecord
HE_WEIGHTS = "he-weights"  # plaintext Array [C, W]: decrypt, then multiply by C / W
HE_FINGERPRINT = "he-fingerprint"  # config: hex fingerprint of the key set in use
HE_WEIGHT_NORM = "he-weight-norm"  # config: public constant C; institutions encrypt (n_i / C) * w_i
HE_CLIP_NORM = "he-clip-norm"  # config: L2 bound on the update before encryption (0 = off)
HE_NOISE_STD = "he-noise-std"  # config: std of the Gaussian noise each institution adds (0 = off)
NODE_HE_SECRET_KEY = "he-secret-key"  # node config: path of this institution's secret.ctx
RUN_HE_KEY_DIR = "he-key-dir"  # run config: keygen directory (institutions read secret.ctx there)
RUN_HE_WORKERS = "he-workers"  # run config: encryption processes per institution
HE_WEIGHTED_BY = "he-weighted-by"  # config: the reply metric the strategy weights by (num-examples)
HE_SEAL = "he-seal"  # config bool: encrypt the update held since this round's train message
HE_PENDING = "he-pending"  # reply metric: the update is held, waiting for the server's C
# Server optimiser (FedAvgM) under HE, applied by the institutions (flower_focal.server_opt):
# train configs carry beta and the server lr (only when the optimiser is on), and train messages
# carry, next to the current global, the global before the last aggregated round (ciphertext +
# [C, W], or the plaintext initial model), from which m = (previous - current) / lr.
HE_SERVER_MOMENTUM = "he-server-momentum"  # config: beta (absent: 0)
HE_SERVER_LR = "he-server-lr"  # config: server learning rate (absent: 1)
HE_PREVIOUS = "he-previous"  # RecordDict key of the previous global's ArrayRecord (absent: m = 0)
# Reply metrics an institution adds under HE-FedAvg: seconds (wall) and CPU seconds (this
# thread: a he-workers pool's processes are not counted) it spent decrypting the global model
# (about 0 when this process had already decrypted that aggregate; with server momentum also the
# previous global and the momentum arithmetic) and encrypting its update.
HE_DECRYPT_S = "he-decrypt-s"
HE_DECRYPT_CPU_S = "he-decrypt-cpu-s"
HE_ENCRYPT_S = "he-encrypt-s"
HE_ENCRYPT_CPU_S = "he-encrypt-cpu-s"
# RoundRecord.timings of the HE-FedAvg server (same units; the ServerApp's thread).
HE_SUM_S = "he-sum-s"  # checking and adding the round's ciphertexts
HE_SUM_CPU_S = "he-sum-cpu-s"
HE_SERIALIZE_S = "he-serialize-s"  # serialising the encrypted sum for the institutions
HE_SERIALIZE_CPU_S = "he-serialize-cpu-s"
# RoundRecord.timings of the FOCAL server: the forward passes on the validation embeddings.
FOCAL_EVALUATE_FORWARD_S = "focal-evaluate-forward-s"
FOCAL_EVALUATE_FORWARD_CPU_S = "focal-evaluate-forward-cpu-s"

# FOCAL split training (see flower_focal/strategy/focal.py and flower_focal/client/focal.py).
# Every Array below is a ciphertext envelope with stype HE_STYPE; the server holds no plaintext.
ACTION_EMBED = "train.embed"  # round 1: encrypted embeddings (+ the initial head from one institution)
ACTION_FOCAL = "train.focal"  # every step: encrypted logits down, encrypted error up
ACTION_FOCAL_EVALUATE = "evaluate.focal"  # its encrypted validation logits down, plaintext metrics up
FOCAL_EMBEDDINGS = "focal-embeddings"  # Array: Enc([x, 1]) packed by FocalLayout
FOCAL_HEAD = "focal-head"  # Array: Enc(W), the linear head
FOCAL_VAL_EMBEDDINGS = "focal-val-embeddings"  # Array: Enc([x, 1]) of the validation split, packed like X
FOCAL_VALIDATION = "focal-validation"  # config bool: train.embed also uploads the validation embeddings
FOCAL_LOGITS = "focal-logits"  # Array: Enc(lane partial sums of [x, 1] W), one institution's
FOCAL_ERROR = "focal-error"  # Array: Enc(-lr * c_y * (softmax - onehot) / N)
FOCAL_CLASS_COUNTS = "focal-class-counts"  # Array: Enc(per-class counts), summed by the server
FOCAL_INIT_HEAD = "focal-init-head"  # config bool: this institution makes the initial head
FOCAL_INIT_SEED = "focal-init-seed"  # config int: seed of the initial head (-1: zeros)
FOCAL_N_FEATURES = "focal-n-features"  # config: embedding dimension d of the layout
FOCAL_SLOTS = "focal-slots"  # config: slots per ciphertext of the layout
FOCAL_BLOCK = "focal-block"  # config: sample positions per ciphertext of the layout
FOCAL_N_TOTAL = "focal-n-total"  # config: public global training sample count N
FOCAL_LR = "focal-lr"  # config: learning rate (folded into the error by institutions)
FOCAL_STEP = "focal-step"  # config: global step number (1-based)
FOCAL_CLASS_WEIGHTS = "focal-class-weights"  # config: "none" | "balanced"
FOCAL_MOMENTS = "focal-moments"  # Array: Enc(per-feature sums, sums of squares); summed by the server
FOCAL_STATS_ONLY = "focal-stats-only"  # config bool: this train.embed asks for the moments only
FOCAL_STATS_N = "focal-stats-n"  # config: public sample count behind the summed moments
FOCAL_MOMENTUM = "focal-momentum"  # config: Nesterov momentum the institutions apply to their error
FOCAL_RESTART = "focal-restart"  # config: momentum restarts so far (institutions zero their velocity)
FOCAL_GUARD = "focal-guard"  # config bool: the server runs the loss guard (institutions report overflow)
FOCAL_OVERFLOW = "focal-overflow"  # metric 1: this institution's logits left the safe range (a rise)
FOCAL_CHECK_ONLY = "focal-check-only"  # config bool: report the loss at this head, upload no error
EMBED_DIM = "embed-dim"  # metric of the embed reply: the backbone's embedding dimension
BACKBONE_FINGERPRINT = "backbone-fingerprint"  # config of the embed reply: hash of the frozen backbone



def he_array(blob: bytes) -> "Array":
    """A ciphertext envelope as a Flower Array (stype :data:`HE_STYPE`)."""
    from flwr.app import Array

    return Array(dtype="uint8", shape=(len(blob),), stype=HE_STYPE, data=blob)


def he_bytes(record: "ArrayRecord", name: str) -> bytes:
    """The ciphertext bytes of ``record[name]``; refuses a plaintext (non-HE) Array."""
    arr = record.get(name)
    if arr is None:
        raise ValueError(f"expected an encrypted array {name!r}, got {list(record.keys())}")
    if arr.stype != HE_STYPE:
        raise ValueError(f"array {name!r} has stype {arr.stype!r}, not {HE_STYPE!r}: plaintext?")
    return bytes(arr.data)
