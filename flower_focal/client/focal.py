"""What an institution does under FOCAL: embed once, answer each step, evaluate the head.

This module owns the institution side of :mod:`flower_focal.strategy.focal`, as plain
handlers ``(Message, Context) -> Message`` (registered in ``clients/client_app.py`` for
``train.embed``, ``train.focal`` and ``evaluate.focal``):

* :func:`embed` - embeddings of the institution's own training images with the configured
  frozen backbone (deterministic transforms; cached on disk under ``embedding-cache-dir``
  and in this process's :data:`~flower_focal.cache.CACHE`); first (``focal-stats-only``) only their encrypted per-feature sums
  and sums of squares, then, given the server's encrypted totals, the embeddings standardised
  with the global mean / std it decrypts, encrypted; the institution asked for it also makes
  the initial encrypted head; with balanced class weights, its encrypted class counts; when
  asked (``focal-validation``), its validation embeddings too, standardised and packed alike;
* :func:`step` - decrypt its own logits, softmax against its own labels, encrypt the error
  (with Nesterov momentum: its velocity lives in ``context.state``); or only report the loss
  (``focal-check-only``, the server's final guard check);
* :func:`evaluate` - decrypt its own validation logits (the server's forward pass on the
  encrypted validation embeddings it uploaded with :func:`embed`, standardised like the
  training ones), score them against its own labels. The head itself is never sent.

Labels, embeddings and logits never leave the institution; every Array
it sends is a ciphertext envelope. The secret key comes from
:func:`flower_focal.client.he_mod.secret_context` (node config ``he-secret-key`` or run
config ``he-key-dir``).
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import threading
import uuid
from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore import log

from flower_focal import wire
from flower_focal.cache import CACHE, nbytes
from flower_focal.client.he_mod import secret_context
from flower_focal.crypto import CkksKeyHolder
from flower_focal.focal import (
    FocalLayout,
    balanced_class_weights,
    decrypt_logits,
    encrypt_embeddings,
    encrypt_feature_moments,
    feature_standardization,
    init_head,
    institution_error,
    institution_loss,
    softmax,
)
from flower_focal.focal.errors import LogitOverflow
from flower_focal.metrics import accuracy, macro_auroc
from flower_focal.wire import he_array, he_bytes

if TYPE_CHECKING:  # torch, MONAI: imported only where a message needs them (see module doc)
    from flower_focal.client.handlers import Site
    from flower_focal.models.backbones import Backbone

def default_cache_dir() -> Path:
    """Where embeddings are cached when ``embedding-cache-dir`` is empty."""
    return Path(tempfile.gettempdir()) / "flower-focal-embeddings"


def site_backbone(site: Site) -> Backbone:
    """The run's frozen backbone (built once per process: the ``backbones`` region of
    :data:`~flower_focal.cache.CACHE`)."""
    from flower_focal.models.backbones import build_backbone
    from flower_focal.training import resolve_device

    cfg = site.cfg
    device = str(resolve_device(cfg.device))
    key = (cfg.backbone, cfg.backbone_weights, cfg.backbone_input_size, device, cfg.precision)
    return CACHE.get_or_build("backbones", key, lambda: build_backbone(
        cfg.backbone, weights_path=cfg.backbone_weights or None, device=device,
        input_size=cfg.backbone_input_size or None, precision=cfg.precision,
    ), nbytes=lambda backbone: nbytes([*backbone.module.parameters(), *backbone.module.buffers()]))


def site_embeddings(site: Site, split: str, *, where: dict[str, str] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(X (n, d), y (n,))`` of this institution's ``"train"`` or ``"val"`` split.

    Computed once with the frozen backbone on deterministic transforms, cached on disk per
    (backbone, data, partition, split) and in this process (the ``embeddings`` region of
    :data:`~flower_focal.cache.CACHE`, bounded by ``FLOWER_FOCAL_EMBEDDING_CACHE_MB``; an
    entry dropped from it is read again from disk). ``where``, if given, receives
    the cache file's path and key (``{"path": ..., "key": ...}``; empty for an empty split).
    """
    from flower_focal.data.institution import load_institution_train_eval
    from flower_focal.models.embeddings import (
        cache_key,
        cache_path,
        cached_embeddings,
        data_key_parts,
    )

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    cfg = site.cfg
    backbone = site_backbone(site)
    parts = data_key_parts(cfg, split=split, partition_id=site.partition_id,
                           num_partitions=site.num_partitions)
    cache_dir = Path(cfg.embedding_cache_dir) if cfg.embedding_cache_dir else default_cache_dir()
    memo = (str(cache_dir), repr(sorted(backbone.identity.items())), repr(sorted(parts.items())))

    def build() -> tuple[np.ndarray, np.ndarray]:
        dataset = (load_institution_train_eval(cfg, site.partition_id, site.num_partitions)
                   if split == "train" else site.data.val)
        if len(dataset) == 0:  # type: ignore[arg-type]
            x, y = np.zeros((0, backbone.embed_dim), np.float32), np.zeros((0,), np.int64)
        else:
            x, y = cached_embeddings(backbone, dataset, cache_dir, parts, batch_size=None,
                                     device=backbone.device,
                                     num_workers=None if cfg.num_workers < 0 else cfg.num_workers)
        log(INFO, "institution %d: %s embeddings %s with %s", site.partition_id, split,
            x.shape, backbone.name)
        return x, y

    x, y = CACHE.get_or_build("embeddings", memo, build, nbytes=nbytes)
    if where is not None and len(y):
        full = {**parts, "n_items": len(y)}
        where.update(path=str(cache_path(backbone, cache_dir, full)), key=cache_key(backbone, full))
    return x, y


def _holder(context: Context, config: ConfigRecord) -> CkksKeyHolder:
    """This institution's key holder, checked against the server's key fingerprint."""
    secret = secret_context(context)
    fp = secret.fingerprint.hex()
    if fp != config[wire.HE_FINGERPRINT]:
        raise ValueError(
            f"this institution's HE key set differs from the server's (fingerprint {fp} != "
            f"{config[wire.HE_FINGERPRINT]}); use the same `flower-focal keygen --preset focal` output"
        )
    return CACHE.get_or_build("key-holders", fp, lambda: CkksKeyHolder(secret))


def _checked_labels(y: np.ndarray, num_classes: int, split: str) -> np.ndarray:
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{split} labels range {int(y.min())}..{int(y.max())} is outside 0..{num_classes - 1} "
            "of the federation (num-classes)"
        )
    return y


def _layout(config: ConfigRecord, x: np.ndarray) -> FocalLayout:
    """The run's layout from the server's config; the embeddings must match it."""
    layout = FocalLayout(int(config[wire.FOCAL_N_FEATURES]), int(config[wire.NUM_CLASSES]),
                         int(config[wire.FOCAL_SLOTS]), int(config[wire.FOCAL_BLOCK]))
    if x.shape[1] != layout.n_features:
        raise ValueError(
            f"this institution's embeddings have dimension {x.shape[1]} but the run's layout "
            f"expects {layout.n_features}: every institution must use the same backbone"
        )
    return layout


def _class_weights(holder: CkksKeyHolder, arrays: ArrayRecord, num_classes: int) -> np.ndarray | None:
    if wire.FOCAL_CLASS_COUNTS not in arrays:
        return None
    plan = holder.plan
    (z,) = holder.decrypt(he_bytes(arrays, wire.FOCAL_CLASS_COUNTS), plan.w_level, plan.w_scale, 1)
    counts = np.rint(z.real[:num_classes]).astype(np.int64)
    if np.any(counts <= 0):
        raise ValueError(f"balanced class weights need every class in the federation; counts {counts}")
    return balanced_class_weights(counts)


def _standardization(holder: CkksKeyHolder, arrays: ArrayRecord | None, config: ConfigRecord,
                     layout: FocalLayout) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(scale, shift)`` from the server's encrypted moment totals, or ``(None, None)``."""
    if arrays is None or wire.FOCAL_MOMENTS not in arrays:
        return None, None
    return feature_standardization(holder, layout, he_bytes(arrays, wire.FOCAL_MOMENTS),
                                   int(config[wire.FOCAL_STATS_N]))


_VELOCITY = "flower-focal.focal-velocity"  # context.state: this institution's momentum state


def _velocity(context: Context, restart: int, step: int, shape: tuple[int, int]) -> np.ndarray | None:
    """This institution's velocity from the previous step, or None (start from zero): after a
    momentum restart (the loss guard backed off), or when it missed the previous step."""
    record = context.state.array_records.get(_VELOCITY)
    meta = context.state.config_records.get(_VELOCITY + "-at")
    if record is None or "v" not in record or meta is None:
        return None
    if int(meta.get("restart", -1)) != restart or int(meta.get("step", -1)) != step - 1:
        return None
    v = record["v"].numpy()
    return v if v.shape == shape else None


def _keep_velocity(context: Context, restart: int, step: int, v: np.ndarray | None) -> None:
    if v is None:
        return
    context.state[_VELOCITY] = ArrayRecord({"v": Array(np.ascontiguousarray(v))})
    context.state[_VELOCITY + "-at"] = ConfigRecord({"restart": restart, "step": step})


EmbeddingSource = Callable[[Context, str], tuple[np.ndarray, np.ndarray]]
"""``(context, "train" | "val") -> (X (n, d), y (n,))``: an institution's embeddings and labels,
in the same order every time it is called within a run."""


_STATE = "flower-focal.focal-embeddings"  # context.state: where this node's embedding files are


def _site_source(context: Context, split: str) -> tuple[np.ndarray, np.ndarray]:
    """flower-focal's own data and backbone, from the run config (``clients/client_app.py``).

    The first message that needs a split embeds it (torch, MONAI, the backbone) and notes the
    verified cache file in the node's ``context.state``; later messages of the run read that
    file with numpy alone. A deployed SuperNode starts a fresh process per message, so a FOCAL
    step then costs no torch/MONAI import and no backbone.
    """
    noted = context.state.config_records.get(_STATE)
    if noted is not None and f"{split}-path" in noted:
        try:
            return _read_noted(str(noted[f"{split}-path"]), str(noted[f"{split}-key"]))
        except (OSError, KeyError, ValueError):
            pass  # moved or rewritten: embed again below
    from flower_focal.client.handlers import site_from_context

    where: dict[str, str] = {}
    x, y = site_embeddings(site_from_context(context), split, where=where)
    if where:
        record = context.state.config_records.get(_STATE) or ConfigRecord()
        record[f"{split}-path"], record[f"{split}-key"] = where["path"], where["key"]
        context.state[_STATE] = record
    return x, y


def _site_fingerprint(context: Context) -> str | None:
    """flower-focal's own backbone: its identity, without what legitimately differs by site
    (the weights file's name and mtime, the precision the site's device runs at)."""
    from flower_focal.client.handlers import site_from_context

    ident = dict(site_backbone(site_from_context(context)).identity)
    ident.pop("precision", None)
    weights = re.sub(r":mtime_ns=\d+", "", str(ident.get("weights", "")))
    ident["weights"] = re.sub(r"[^:]*:size=", "size=", weights)
    return hashlib.blake2b(repr(sorted(ident.items())).encode(), digest_size=8).hexdigest()


_site_source.fingerprint = _site_fingerprint  # type: ignore[attr-defined]


def _read_noted(path: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        if str(data["key"]) != key:
            raise ValueError("embedding file was rewritten for another key")
        return data["X"], data["y"]


def embed(message: Message, context: Context, source: EmbeddingSource = _site_source) -> Message:
    """``train.embed``: upload encrypted embeddings (and the initial head, class counts)."""
    config = message.content[wire.CONFIG]
    holder = _holder(context, config)
    num_classes = int(config[wire.NUM_CLASSES])
    x, y = source(context, "train")
    if x.shape[0] < 1:
        raise ValueError("this institution has no training images to embed")
    _checked_labels(y, num_classes, "training")
    layout = FocalLayout(int(x.shape[1]), num_classes, int(config[wire.FOCAL_SLOTS]),
                         int(config[wire.FOCAL_BLOCK]))
    if bool(config.get(wire.FOCAL_STATS_ONLY, False)):  # global statistics first
        moments = ArrayRecord({wire.FOCAL_MOMENTS: he_array(encrypt_feature_moments(holder, layout, x))})
        metrics = MetricRecord({wire.NUM_EXAMPLES: int(x.shape[0]), wire.EMBED_DIM: int(x.shape[1])})
        return Message(RecordDict({wire.ARRAYS: moments, wire.METRICS: metrics}), reply_to=message)
    scale, shift = _standardization(holder, message.content.array_records.get(wire.ARRAYS), config,
                                    layout)
    arrays = ArrayRecord({wire.FOCAL_EMBEDDINGS: he_array(
        encrypt_embeddings(holder, layout, x, feature_scale=scale, feature_shift=shift))})
    if bool(config.get(wire.FOCAL_VALIDATION, False)):  # evaluate.focal: the server's forward on them
        xv, yv = source(context, "val")
        _checked_labels(yv, num_classes, "validation")
        if yv.size:  # none: this institution is not evaluated
            arrays[wire.FOCAL_VAL_EMBEDDINGS] = he_array(
                encrypt_embeddings(holder, layout, xv, feature_scale=scale, feature_shift=shift))
    if bool(config.get(wire.FOCAL_INIT_HEAD, False)):
        seed = int(config.get(wire.FOCAL_INIT_SEED, -1))
        arrays[wire.FOCAL_HEAD] = he_array(init_head(holder, layout, seed=None if seed < 0 else seed))
    if config.get(wire.FOCAL_CLASS_WEIGHTS, "none") == "balanced":
        vec = np.zeros(holder.slots)
        vec[:num_classes] = np.bincount(y, minlength=num_classes)
        plan = holder.plan
        arrays[wire.FOCAL_CLASS_COUNTS] = he_array(holder.encrypt([vec], plan.w_level, plan.w_scale))
    metrics = MetricRecord({wire.NUM_EXAMPLES: int(x.shape[0]), wire.EMBED_DIM: int(x.shape[1])})
    content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: metrics})
    fingerprint = getattr(source, "fingerprint", None)
    fp = fingerprint(context) if fingerprint is not None else None
    if fp:  # the server checks that every institution embeds with the same backbone
        content[wire.CONFIG] = ConfigRecord({wire.BACKBONE_FINGERPRINT: fp})
    return Message(content, reply_to=message)


def step(message: Message, context: Context, source: EmbeddingSource = _site_source) -> Message:
    """``train.focal``: decrypt own logits, encrypt ``-lr * c_y * (softmax - onehot) / N``."""
    config = message.content[wire.CONFIG]
    arrays = message.content[wire.ARRAYS]
    holder = _holder(context, config)
    x, y = source(context, "train")
    layout = _layout(config, x)
    _checked_labels(y, layout.n_classes, "training")
    n = int(y.shape[0])
    weights = _class_weights(holder, arrays, layout.n_classes)
    overflow = MetricRecord({wire.FOCAL_OVERFLOW: 1, wire.NUM_EXAMPLES: n})
    if bool(config.get(wire.FOCAL_CHECK_ONLY, False)):  # the guard's final check: loss only
        try:
            loss, correct = institution_loss(holder, layout, he_bytes(arrays, wire.FOCAL_LOGITS), y,
                                             class_weights=weights)
        except LogitOverflow:
            return Message(RecordDict({wire.METRICS: overflow}), reply_to=message)
        metrics = MetricRecord({wire.TRAIN_LOSS: loss / n, wire.ACCURACY: correct / n,
                                wire.NUM_EXAMPLES: n})
        return Message(RecordDict({wire.METRICS: metrics}), reply_to=message)
    momentum = float(config.get(wire.FOCAL_MOMENTUM, 0.0))
    restart, at = int(config.get(wire.FOCAL_RESTART, 0)), int(config.get(wire.FOCAL_STEP, 0))
    try:
        up = institution_error(
            holder, layout, he_bytes(arrays, wire.FOCAL_LOGITS), y,
            lr=float(config[wire.FOCAL_LR]), n_total=int(config[wire.FOCAL_N_TOTAL]),
            class_weights=weights, momentum=momentum,
            velocity=_velocity(context, restart, at, (n, layout.n_classes)) if momentum > 0 else None,
        )
    except LogitOverflow:
        if not bool(config.get(wire.FOCAL_GUARD, False)):
            raise  # no guard to act on it: the step fails for this institution, as before
        return Message(RecordDict({wire.METRICS: overflow}), reply_to=message)
    _keep_velocity(context, restart, at, up.velocity)
    metrics = MetricRecord({wire.TRAIN_LOSS: up.loss / n, wire.ACCURACY: up.n_correct / n,
                            wire.NUM_EXAMPLES: n})
    content = RecordDict({wire.ARRAYS: ArrayRecord({wire.FOCAL_ERROR: he_array(up.message)}),
                          wire.METRICS: metrics})
    return Message(content, reply_to=message)


def validation_metrics(logits: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, float | int]:
    """Loss (mean cross-entropy), accuracy, macro AUROC and count of validation logits (n x K)."""
    if y.size == 0:
        nan = float("nan")
        return {wire.LOSS: nan, wire.ACCURACY: nan, wire.AUROC: nan, wire.NUM_EXAMPLES: 0}
    probs = softmax(np.asarray(logits, dtype=np.float64))
    loss = float(-np.log(np.clip(probs[np.arange(y.size), y], 1e-12, None)).mean())
    return {wire.LOSS: loss, wire.ACCURACY: accuracy(probs, y),
            wire.AUROC: macro_auroc(probs, y, num_classes), wire.NUM_EXAMPLES: int(y.size)}


def evaluate(message: Message, context: Context, source: EmbeddingSource = _site_source) -> Message:
    """``evaluate.focal``: decrypt own validation logits (the server's forward pass on the
    validation embeddings uploaded with :func:`embed`), score them against own labels."""
    config = message.content[wire.CONFIG]
    holder = _holder(context, config)
    x, y = source(context, "val")
    layout = _layout(config, x)
    _checked_labels(y, layout.n_classes, "validation")
    logits = np.zeros((0, layout.n_classes))
    if y.size:
        logits = decrypt_logits(holder, layout, he_bytes(message.content[wire.ARRAYS], wire.FOCAL_LOGITS),
                                int(y.size))
    metrics = validation_metrics(logits, y, layout.n_classes)
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=message)


# ---------------------------------------------------------------------- any app's FOCAL
def _batches(loader: Any) -> Any:
    """The loader's batches in a fixed order (a shuffling train loader would misalign labels).

    Accepts a ``DataLoader`` (re-made without shuffling, same dataset, batch size and
    collate function) or any ``Dataset``.
    """
    from torch.utils.data import DataLoader

    if isinstance(loader, DataLoader):
        return DataLoader(loader.dataset, batch_size=loader.batch_size or 1, shuffle=False,
                          collate_fn=loader.collate_fn, num_workers=loader.num_workers)
    return DataLoader(loader, batch_size=64, shuffle=False)


def _images_labels(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError("FOCAL data batches must be (images, labels) or {'image': ..., 'label': ...}, "
                     f"got {type(batch).__name__}")


def embed_loader(backbone: Callable[[Any], Any], loader: Any, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """``(X (n, d) float64, y (n,) int64)``: ``backbone`` applied to every image of ``loader``.

    ``backbone`` is any ``torch.nn.Module``, :class:`FrozenBackbone` or callable images ->
    embeddings (any channel count and image size the callable accepts); outputs are flattened
    per image. Modules (and the module of a bound method such as ``net.features``) are put in
    eval mode and run without gradients.
    """
    import torch

    if isinstance(backbone, FrozenBackbone):
        backbone = backbone.net
    module = backbone if isinstance(backbone, torch.nn.Module) else getattr(backbone, "__self__", None)
    if isinstance(module, torch.nn.Module):  # a network, or a bound method such as net.features
        module.eval().to(device)
    xs, ys = [], []
    with torch.no_grad():
        for batch in _batches(loader):
            images, labels = _images_labels(batch)
            out = backbone(torch.as_tensor(images).to(device))
            xs.append(torch.as_tensor(out).detach().float().flatten(1).cpu().numpy())
            ys.append(np.asarray(torch.as_tensor(labels).reshape(-1).cpu().numpy(), dtype=np.int64))
    if not xs:
        return np.zeros((0, 0)), np.zeros((0,), np.int64)
    x = np.concatenate(xs).astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("the backbone produced NaN/Inf embeddings")
    return x, np.concatenate(ys)


_BUILD_LOCK = threading.Lock()


class FrozenBackbone:
    """An app's network as FOCAL's frozen backbone, built where it embeds, from a fixed seed.

    ``build()`` returns an ``nn.Module`` or a callable images -> embeddings (e.g.
    ``lambda: Net().features``). It runs once per process, on the first batch to embed, under
    ``torch.manual_seed(seed)`` in a forked RNG, so every institution gets the same random
    initialisation. Build a randomly initialised network this way rather than at import time:
    in a simulation the ServerApp runs in a thread of the process that loads the ClientApp,
    and its draws from torch's global RNG interleave with an import-time ``Net()``, so
    institutions would embed with different networks. A pretrained network (weights loaded
    from a file) can be passed to :func:`register_focal` directly. Pickles without the built
    network (Ray ships the ClientApp to its actors).
    """

    def __init__(self, build: Callable[[], Any], seed: int = 0) -> None:
        self.build = build
        self.seed = int(seed)
        self._net: Any = None

    @property
    def net(self) -> Any:
        """The built network (built on first access in this process)."""
        if self._net is None:
            import torch

            with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
                if self._net is None:
                    torch.manual_seed(self.seed)
                    self._net = self.build()
        return self._net

    def __call__(self, images: Any) -> Any:
        return self.net(images)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_net": None}


def backbone_fingerprint(backbone: Any) -> str | None:
    """A short hash of a backbone's weights: a ``torch.nn.Module``, a bound method of one
    (e.g. ``net.features``; the method's name counts) or a :class:`FrozenBackbone`. ``None``
    for other callables, which cannot be checked."""
    import torch

    if isinstance(backbone, FrozenBackbone):
        backbone = backbone.net
    method = ""
    if not isinstance(backbone, torch.nn.Module) and isinstance(getattr(backbone, "__self__", None),
                                                                 torch.nn.Module):
        method = getattr(backbone, "__name__", "")
        backbone = backbone.__self__
    if not isinstance(backbone, torch.nn.Module):
        return None
    digest = hashlib.blake2b(f"{type(backbone).__qualname__}.{method}".encode(), digest_size=8)
    for name, tensor in backbone.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class LoaderSource:
    """An :data:`EmbeddingSource` over an app's own backbone and data loaders.

    ``data(context) -> (train_loader, val_loader)`` is the app's own loading (its node config,
    its run-config keys). Embeddings are computed once per (run, node, split) in this process
    (the ``embeddings`` region of :data:`~flower_focal.cache.CACHE`, keyed also by this source)
    and, with ``cache_dir``, kept on the institution's disk for later messages (a deployed
    SuperNode starts a fresh process per message, and an entry the cache drops is read again
    from there; without ``cache_dir`` it is computed again).
    """

    def __init__(self, backbone: Callable[[Any], Any], data: Callable[[Context], tuple[Any, Any]],
                 *, device: str = "cpu", cache_dir: str | Path | None = None) -> None:
        self.backbone = backbone
        self.data = data
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._token = uuid.uuid4().hex  # this source's part of its cache keys (kept by pickling)
        self._fingerprint: str | None = None

    def fingerprint(self, context: Context) -> str | None:
        """:func:`backbone_fingerprint` of the backbone (computed once per process)."""
        if self._fingerprint is None:
            self._fingerprint = backbone_fingerprint(self.backbone) or ""
        return self._fingerprint or None

    def __call__(self, context: Context, split: str) -> tuple[np.ndarray, np.ndarray]:
        key = (int(context.run_id), int(context.node_id), split)
        return CACHE.get_or_build("embeddings", ("loader-source", self._token, *key),
                                  lambda: self._embed(context, key),
                                  nbytes=nbytes)

    def _embed(self, context: Context, key: tuple[int, int, str]) -> tuple[np.ndarray, np.ndarray]:
        split = key[2]
        path = (self.cache_dir / f"run{key[0]}-node{key[1]}-{split}.npz") if self.cache_dir else None
        if path is not None and path.is_file():
            with np.load(path) as f:
                x, y = f["x"], f["y"]
        else:
            train, val = self.data(context)
            loader = train if split == "train" else val
            if loader is None:  # no such split (an app without validation data)
                x, y = np.zeros((0, 0)), np.zeros((0,), np.int64)
            else:
                x, y = embed_loader(self.backbone, loader, self.device)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp.npz")
                np.savez(tmp, x=x, y=y)
                tmp.replace(path)
        log(INFO, "FOCAL: %s embeddings %s of node %d", split, x.shape, key[1])
        return x, y


def register_focal(app: Any, backbone: Callable[[Any], Any], data: Callable[[Context], tuple[Any, Any]],
                   *, device: str = "cpu", cache_dir: str | Path | None = None) -> LoaderSource:
    """Register FOCAL's institution side on an existing ``ClientApp`` (any app, any network).

    ``backbone``: the frozen feature extractor, any ``torch.nn.Module`` or callable
    images -> embeddings; every institution must use the same one. A pretrained network can be
    passed as is; a randomly initialised one as ``FrozenBackbone(lambda: Net().features,
    seed=0)`` (see :class:`FrozenBackbone`). The embed reply carries
    :func:`backbone_fingerprint` and the server refuses a run whose institutions differ.
    ``data(context)``
    returns the app's own ``(train_loader, val_loader)`` (``DataLoader`` or ``Dataset``
    yielding ``(image, label)`` or MONAI-style dicts; labels ``0..K-1``). Registers
    ``train.embed``, ``train.focal`` and ``evaluate.focal``; the app's other handlers are
    untouched. The secret key comes from node config ``he-secret-key`` or run config
    ``he-key-dir`` (a ``--preset focal`` key set).
    """
    source = LoaderSource(backbone, data, device=device, cache_dir=cache_dir)
    app.train("embed")(lambda message, context: embed(message, context, source))
    app.train("focal")(lambda message, context: step(message, context, source))
    app.evaluate("focal")(lambda message, context: evaluate(message, context, source))
    return source
