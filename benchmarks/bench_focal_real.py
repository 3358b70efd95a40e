"""FOCAL on real MedMNIST: accuracy of four ways to train a linear head on a frozen backbone,
and the wall-time price of encryption.

    python benchmarks/bench_focal_real.py                                   # PathMNIST + RetinaMNIST
    python benchmarks/bench_focal_real.py --datasets retinamnist --per-institution 150 --steps 30

Setting (per dataset): a seeded random subset of ``--institutions x --per-institution`` images
of the ``train`` split, split IID over the institutions (``flower_focal.data.partition``);
evaluation on the pooled ``val`` split (all of it unless ``--val-max``). Every image goes
through the data layer (28 px MedMNIST, deterministic transforms) and the frozen backbone
(default ``efficientnet-lite0``, packaged ImageNet weights, default input size); the
institutions' training embeddings are computed fresh and timed, the val embeddings are cached
(``flower_focal.models.embeddings.cached_embeddings``). Features are used raw (no
normalisation: an institution cannot know global statistics), the same for every method.

Methods, all from the same embeddings, the same initial head ``N(0, 0.01^2)`` (seed
``--seed``) where they have one, evaluated on the same val embeddings:

(a) ``focal``: :func:`flower_focal.testing.train_encrypted`, CKKS preset ``focal`` (a fresh key
    set), ``--steps`` full-batch gradient steps at ``--lr``; all roles in this process, every
    message passed as real ciphertext bytes (the Flower strategy runs the same step functions).
(b) ``plaintext_split``: :func:`flower_focal.testing.train_plaintext`, the plaintext twin: same
    algorithm, slot layout, initial head and steps, on numpy. Also timed: the same full-batch
    gradient descent written directly as ``X^T (softmax(XW) - Y)`` (``plaintext_direct``).
(c) ``he_fedavg``: HE-FedAvg of the head ``nn.Linear(d, K)`` over the cached embeddings, with
    the library's own pieces in the order the Flower strategy runs them: every round each
    institution trains locally (``flower_focal.training.train_local``: SGD, ``--fedavg-*``),
    weights by ``n_i / C`` and encrypts (``flower_focal.client.he_mod.encrypt_record``, preset
    ``--he-preset``), the server adds ciphertexts (``flower_focal.crypto.Accumulator``), the
    institutions decrypt and rescale by ``C / W`` (``decrypt_record``). In this process, without
    Flower messaging. ``--fedavg-rounds`` rounds (default: ``--steps``). The same run without
    encryption (plain FedAvg) is reported as ``fedavg_plain`` to show HE costs no accuracy.
(d) ``logreg_pooled``: scikit-learn ``StandardScaler`` + ``LogisticRegression(C=--C)`` on the
    pooled training embeddings of all institutions (not federated; a reference).

Wall-time ratio: ``training`` = (key generation + encrypt + all steps + decrypt of FOCAL) /
(plaintext twin); ``end_to_end`` adds the embedding of the training images (same backbone,
same for both) to numerator and denominator. ``os.getloadavg()`` is recorded next to every
timing (the machine is shared). Needs ../shared/data; prints one JSON object.
The README's table of (a)-(d) is rendered from ``benchmarks/results/focal_real.json`` by
``python benchmarks/readme_tables.py --write``.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import emit, loadavg, machine, shared_npz

from flower_focal.config import RunConfig
from flower_focal.data import source_info
from flower_focal.data.institution import make_dataset
from flower_focal.data.partition import histogram, partition_indices
from flower_focal.data.transforms import build_transforms
from flower_focal.focal import (
    FocalLayout,
    predict_logits,
    softmax,
)
from flower_focal.testing import InstitutionEmbeddings as Institution, train_encrypted, train_plaintext
from flower_focal.metrics import accuracy, macro_auroc
from flower_focal.models.backbones import build_backbone
from flower_focal.models.embeddings import cached_embeddings, extract_embeddings

INIT_STD = 0.01  # flower_focal.focal.protocol.init_head's default
# the algorithm this benchmark's published figures were measured with (raw features, fixed lr);
# FOCAL's defaults (standardisation, derived step, momentum, guard): bench_focal_quality.py
RAW = {"standardize": False, "momentum": 0.0, "guard": False}


class Clock:
    """Wall time and this process's CPU time (all threads) of a ``with`` block."""

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self.load_before = loadavg()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu
        self.load_after = loadavg()


def _scores(probs: np.ndarray, y: np.ndarray, k: int) -> dict[str, float]:
    return {"val_auroc_macro": round(macro_auroc(probs, y, k), 4),
            "val_accuracy": round(accuracy(probs, y), 4)}


def _head_scores(head: np.ndarray, x: np.ndarray, y: np.ndarray, k: int) -> dict[str, float]:
    lay = FocalLayout(x.shape[1], k)
    return _scores(softmax(predict_logits(head, lay, x)), y, k)


def _init_head(seed: int, d1: int, k: int) -> np.ndarray:
    """The plaintext of ``init_head(holder, layout, seed=seed)``."""
    return np.random.default_rng(seed).normal(0.0, INIT_STD, size=(d1, k))


# ------------------------------------------------------------------------------- data
def embed_dataset(dataset: str, args: argparse.Namespace, backbone: Any) -> dict[str, Any]:
    """Subset, partition and embed one dataset; training embeddings timed, val cached."""
    path = shared_npz(dataset)
    if path is None:
        return {"skipped": "data not found"}
    cfg = RunConfig(dataset="medmnist", data_path=str(path), image_size=28)
    src = source_info(cfg)
    k = src.num_classes
    per_institution = min(args.per_institution, len(src.train) // args.institutions)
    if per_institution < 1:
        raise ValueError(f"{dataset}: {len(src.train)} training images cannot feed {args.institutions} institutions")
    n_sub = args.institutions * per_institution
    rng = np.random.default_rng(args.seed)
    subset = np.sort(rng.choice(len(src.train), n_sub, replace=False))
    labels = src.labels("train")[subset]
    parts = partition_indices(labels, args.institutions, "iid", args.seed)
    transform = build_transforms(28, False, False, synthetic_items=False, in_channels=src.in_channels)

    institutions, embed_s, embed_cpu, load0 = [], [], [], loadavg()
    for i, part in enumerate(parts):
        ds = make_dataset([src.train[j] for j in subset[part]], transform, False)
        with Clock() as clock:
            x, y = extract_embeddings(backbone, ds, batch_size=args.batch_size, device="cpu")
        embed_s.append(clock.wall)
        embed_cpu.append(clock.cpu)
        institutions.append(Institution(str(i), x.astype(np.float64), y))

    val_idx = np.arange(len(src.val))
    if args.val_max and args.val_max < len(val_idx):
        val_idx = np.sort(rng.choice(len(src.val), args.val_max, replace=False))
    val_ds = make_dataset([src.val[j] for j in val_idx], transform, False)
    key = {"benchmark": "bench_focal_real", "dataset": dataset, "split": "val",
           "data_size": path.stat().st_size,
           "indices_sha256": hashlib.sha256(val_idx.tobytes()).hexdigest()}
    xv, yv = cached_embeddings(backbone, val_ds, args.cache_dir, key, batch_size=args.batch_size,
                               device="cpu")
    return {
        "k": k,
        "institutions": institutions,
        "val": (xv.astype(np.float64), yv),
        "info": {
            "train_split_size": len(src.train),
            "train_subset": n_sub,
            "subset": f"seeded random {n_sub} of {len(src.train)} train images (seed {args.seed}), "
                      f"IID over {args.institutions} institutions",
            "per_institution": [len(i.y) for i in institutions],
            "train_histogram": histogram(labels, k),
            "val_n": int(len(yv)),
            "val_split_size": len(src.val),
            "num_classes": k,
            "embed_dim": int(backbone.embed_dim),
            "embed_train_s": round(sum(embed_s), 2),
            "embed_train_cpu_s": round(sum(embed_cpu), 2),
            "embed_train_ms_per_image": round(1000 * sum(embed_s) / n_sub, 2),
            "embed_loadavg": [load0, loadavg()],
        },
    }


# ------------------------------------------------------------------------------- methods
def run_focal(data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from flower_focal.crypto import SecretContext

    insts, k = data["institutions"], data["k"]
    xv, yv = data["val"]
    with Clock() as keygen:
        secret = SecretContext.generate("focal")
    with Clock() as train:
        res = train_encrypted(insts, k, secret=secret, epochs=args.steps, lr=args.lr,
                              init_seed=args.seed, block=args.block, **RAW)
    return {
        **_head_scores(res.head, xv, yv, k),
        "keygen_s": round(keygen.wall, 2),
        "keygen_cpu_s": round(keygen.cpu, 2),
        "train_s": round(train.wall, 2),
        "train_cpu_s": round(train.cpu, 2),
        "seconds": {key: round(v, 2) for key, v in res.seconds.items()},
        "server_s_per_step": round((res.seconds["server_forward"] + res.seconds["server_backward"])
                                   / max(args.steps, 1), 3),
        "bytes": res.nbytes,
        "final_train_loss": round(res.history[-1]["loss"], 5) if res.history else None,
        "loadavg": [keygen.load_before, train.load_after],
        "_head": res.head,
    }


def run_plaintext(data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    insts, k = data["institutions"], data["k"]
    xv, yv = data["val"]
    with Clock() as train:
        res = train_plaintext(insts, k, epochs=args.steps, lr=args.lr, init_seed=args.seed,
                              block=args.block, **RAW)
    # the same full-batch gradient descent, written directly (no slot layout)
    x1 = np.vstack([np.hstack([i.x, np.ones((len(i.y), 1))]) for i in insts])
    onehot = np.eye(k)[np.concatenate([i.y for i in insts])]
    with Clock() as direct:
        w = _init_head(args.seed, x1.shape[1], k)
        for _ in range(args.steps):
            w = w - args.lr * x1.T @ (softmax(x1 @ w) - onehot) / len(x1)
    return {
        **_head_scores(res.head, xv, yv, k),
        "train_s": round(train.wall, 4),
        "train_cpu_s": round(train.cpu, 4),
        "final_train_loss": round(res.history[-1]["loss"], 5) if res.history else None,
        "plaintext_direct": {"train_s": round(direct.wall, 4), "train_cpu_s": round(direct.cpu, 4),
                             "max_abs_dW_vs_twin": float(f"{np.abs(w - res.head).max():.3g}")},
        "loadavg": [train.load_before, train.load_after],
        "_head": res.head,
    }


def run_fedavg_head(data: dict[str, Any], args: argparse.Namespace, encrypted: bool) -> dict[str, Any]:
    """(H)E-FedAvg of a linear head over the institutions' embeddings (see the module doc)."""
    from flwr.app import Array, ArrayRecord
    from torch import nn
    from torch.utils.data import TensorDataset

    from flower_focal import wire
    from flower_focal.client.handlers import local_seed
    from flower_focal.client.he_mod import decrypt_record, encrypt_record
    from flower_focal.crypto import Accumulator, SecretContext
    from flower_focal.flatten import ArrayLayout
    from flower_focal.training import train_local

    insts, k = data["institutions"], data["k"]
    xv, yv = data["val"]
    d = insts[0].x.shape[1]
    rounds = args.fedavg_rounds or args.steps
    init = _init_head(args.seed, d + 1, k)
    model = nn.Linear(d, k)
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(init[:d].T))
        model.bias.copy_(torch.as_tensor(init[d]))
    global_model = ArrayRecord(model.state_dict())  # round 1: the public initial model
    layout = ArrayLayout.of(global_model)
    datasets = [TensorDataset(torch.as_tensor(i.x, dtype=torch.float32), torch.as_tensor(i.y))
                for i in insts]
    c_total = float(sum(len(i.y) for i in insts))
    with Clock() as keygen:
        secret = SecretContext.generate(args.he_preset) if encrypted else None
        public = secret.public_context() if secret is not None else None
    upload_bytes = 0
    with Clock() as clock:
        for rnd in range(1, rounds + 1):
            acc = Accumulator(public) if public is not None else None
            plain_sum, weight_sum = None, 0.0
            for pid, ds in enumerate(datasets):
                local = nn.Linear(d, k)
                local.load_state_dict(global_model.to_torch_state_dict())
                metrics = train_local(local, ds, epochs=args.fedavg_local_epochs, lr=args.fedavg_lr,
                                      batch_size=args.fedavg_batch_size, momentum=args.fedavg_momentum,
                                      weight_decay=0.0, optimizer="sgd", device="cpu",
                                      seed=local_seed(args.seed, pid, rnd))
                trained = ArrayRecord(local.state_dict())
                n_i = float(metrics[wire.NUM_EXAMPLES])
                if acc is not None:
                    blob = encrypt_record(trained, secret, layout, weight=n_i / c_total)[wire.HE_CIPHERTEXT].data
                    upload_bytes += len(blob)
                    acc.add(blob)
                else:
                    flat = layout.flatten(trained) * (n_i / c_total)
                    plain_sum = flat if plain_sum is None else plain_sum + flat
                weight_sum += n_i
            if acc is not None:
                agg = ArrayRecord({
                    wire.HE_CIPHERTEXT: Array(dtype="float64", shape=(acc.length,), stype=wire.HE_STYPE,
                                              data=acc.to_bytes()),
                    wire.HE_WEIGHTS: Array(np.array([c_total, weight_sum], dtype=np.float64)),
                })
                global_model = decrypt_record(agg, secret, layout)  # what every institution does
            else:
                global_model = layout.unflatten(plain_sum * (c_total / weight_sum))
    state = global_model.to_torch_state_dict()
    head = np.vstack([state["weight"].double().numpy().T, state["bias"].double().numpy()[None, :]])
    out: dict[str, Any] = {**_head_scores(head, xv, yv, k), "rounds": rounds,
                           "local_epochs": args.fedavg_local_epochs, "lr": args.fedavg_lr,
                           "train_s": round(clock.wall, 2), "train_cpu_s": round(clock.cpu, 2),
                           "loadavg": [clock.load_before, clock.load_after], "_head": head}
    if encrypted:
        out.update(preset=args.he_preset, keygen_s=round(keygen.wall, 2),
                   upload_bytes_per_institution_round=upload_bytes // (rounds * len(insts)))
    return out


def run_logreg(data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.vstack([i.x for i in data["institutions"]])
    y = np.concatenate([i.y for i in data["institutions"]])
    xv, yv = data["val"]
    t = time.perf_counter()
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=args.C, max_iter=5000).fit(scaler.transform(x), y)
    probs = np.zeros((len(yv), data["k"]))
    probs[:, clf.classes_] = clf.predict_proba(scaler.transform(xv))
    return {**_scores(probs, yv, data["k"]), "C": args.C, "train_s": round(time.perf_counter() - t, 2)}


def run_dataset(dataset: str, args: argparse.Namespace, backbone: Any) -> dict[str, Any]:
    data = embed_dataset(dataset, args, backbone)
    if "skipped" in data:
        return {"dataset": dataset, **data}
    row: dict[str, Any] = {"dataset": dataset, **data["info"]}
    focal = run_focal(data, args)
    plain = run_plaintext(data, args)
    he_fedavg = run_fedavg_head(data, args, encrypted=True)
    fedavg = run_fedavg_head(data, args, encrypted=False)
    row["methods"] = {"focal": focal, "plaintext_split": plain, "he_fedavg": he_fedavg,
                      "logreg_pooled": run_logreg(data, args), "fedavg_plain": fedavg}
    row["focal_vs_twin_max_abs_dW"] = float(f"{np.abs(focal['_head'] - plain['_head']).max():.3g}")
    row["he_fedavg_vs_plain_max_abs_dW"] = float(
        f"{np.abs(he_fedavg['_head'] - fedavg['_head']).max():.3g}")
    for m in row["methods"].values():
        m.pop("_head", None)
    ratios: dict[str, Any] = {}
    for unit, suffix in (("wall", "s"), ("cpu", "cpu_s")):
        embed = data["info"][f"embed_train_{suffix}"]
        he_total = focal[f"keygen_{suffix}"] + focal[f"train_{suffix}"]
        twin = plain[f"train_{suffix}"]
        ratios[unit] = {
            "training": round(he_total / twin, 1),
            "end_to_end_with_embedding": round((embed + he_total) / (embed + twin), 2),
            "training_vs_plaintext_direct": round(
                he_total / plain["plaintext_direct"][f"train_{suffix}"], 1),
            "focal_s": round(he_total, 2),
            "plaintext_split_s": twin,
            "embed_train_s": embed,
        }
    row["time_ratio_focal_over_plaintext_split"] = ratios
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["pathmnist", "retinamnist"])
    p.add_argument("--institutions", type=int, default=5)
    p.add_argument("--per-institution", type=int, default=200,
                   help="training images each (at most train split size / institutions)")
    p.add_argument("--val-max", type=int, default=0, help="evaluate on at most this many val images (0: all)")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--input-size", type=int, default=0, help="backbone input size (0: its default)")
    p.add_argument("--batch-size", type=int, default=64, help="embedding batch size")
    p.add_argument("--steps", type=int, default=50, help="FOCAL / plaintext full-batch steps")
    p.add_argument("--lr", type=float, default=0.01, help="FOCAL / plaintext learning rate")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--fedavg-rounds", type=int, default=0, help="0: --steps")
    p.add_argument("--fedavg-local-epochs", type=int, default=1)
    p.add_argument("--fedavg-lr", type=float, default=0.001)
    p.add_argument("--fedavg-momentum", type=float, default=0.9)
    p.add_argument("--fedavg-batch-size", type=int, default=32)
    p.add_argument("--he-preset", default="compact")
    p.add_argument("--C", type=float, default=0.1, help="inverse L2 strength of the pooled probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "flower-focal-embeddings"
                                              / "bench-focal-real"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    backbone = build_backbone(args.backbone, device="cpu", input_size=args.input_size or None)
    start = loadavg()
    rows = [run_dataset(name, args, backbone) for name in args.datasets]
    emit({
        "benchmark": "focal_real_medmnist",
        "backbone": {"name": backbone.name, "input_size": backbone.input_size,
                     "embed_dim": backbone.embed_dim, "frozen": True},
        "settings": {key: v for key, v in vars(args).items() if key not in ("datasets", "cache_dir")},
        "features": "raw backbone embeddings (no normalisation) for (a)-(c); (d) standardises",
        "evaluation": "pooled val split of each dataset (val_n images), macro one-vs-rest AUROC "
                      "and accuracy",
        "timing": "single process; FOCAL server and all institutions share it (workers=1); "
                  "training ratio = (keygen + train_encrypted) / train_plaintext, in wall time "
                  "and in this process's CPU time (less sensitive to the shared machine's load)",
        "machine": machine(),
        "loadavg_start": start,
        "loadavg_end": loadavg(),
        "results": rows,
    })


if __name__ == "__main__":
    main()
