"""Local training, evaluation and prediction on one institution's data.

This module owns the inner loop that every strategy's client runs: :func:`train_local`
(cross-entropy, SGD or Adam), :func:`evaluate_model` and :func:`predict_proba`, plus the
helpers :func:`resolve_device` and :func:`seed_everything`. It knows nothing about Flower.

Datasets yield MONAI-style dicts ``{"image": (C, H, W) float tensor, "label": scalar long
tensor}``; ``(image, label)`` tuples are accepted too. Callers own thread policy; these
functions move the model to ``device`` in place and leave it there.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Mapping, Sized
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from flower_focal import wire
from flower_focal.data.loader import batch_loader, device_batches, to_device_async
from flower_focal.metrics import accuracy, macro_auroc

__all__ = [
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "PRECISIONS",
    "autocast",
    "evaluate_model",
    "predict_proba",
    "resolve_device",
    "resolve_precision",
    "round_lr",
    "seed_everything",
    "train_local",
]

OPTIMIZERS = ("sgd", "adam")
"""Values accepted for ``train_local(optimizer=...)`` (and ``RunConfig.optimizer``)."""

LR_SCHEDULES = ("constant", "cosine")
"""Values accepted for :func:`round_lr` (and ``RunConfig.lr_schedule``)."""


def round_lr(lr: float, schedule: str, server_round: int, num_rounds: int) -> float:
    """The local learning rate of round ``server_round`` (1-based) of ``num_rounds``.

    ``"constant"``: ``lr`` every round. ``"cosine"``: ``lr * (1 + cos(pi * (r - 1) / R)) / 2``,
    from ``lr`` in round 1 down towards 0 in round ``R`` (never 0 itself). Every institution
    computes the same value from the round number in the train message, so it needs no
    exchange and composes with HE. Rounds past ``R`` (a resumed run) keep the last value.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"Unknown lr schedule {schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
    if schedule == "constant" or num_rounds <= 1:
        return lr
    r = min(max(server_round, 1), num_rounds)
    return lr * 0.5 * (1.0 + math.cos(math.pi * (r - 1) / num_rounds))

def resolve_device(name: str) -> torch.device:
    """Map ``"auto"`` (CUDA if available, else CPU), ``"cpu"`` or ``"cuda[:i]"`` to a device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu" or name.startswith("cuda"):
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; use 'auto'")
        return device
    raise ValueError(f"Unknown device {name!r}; expected 'auto', 'cpu' or 'cuda[:index]'")


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python's ``random``, NumPy and torch (all devices).

    With ``deterministic`` (default) cuDNN autotuning is switched off and torch is asked
    for deterministic algorithms, warning rather than failing for ops that have none.
    This changes process-wide state; call it once at the start of a run.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def _seed_augmentation(dataset: Any, seed: int) -> None:
    """Re-seed a MONAI dataset's random transforms, so augmentation depends on ``seed`` only.

    MONAI transforms keep their own RNG; a cached dataset reused across rounds (or by
    another institution in the same simulation worker) would otherwise continue from
    wherever the previous call left it, and runs would not be reproducible.
    """
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed % (2**32))


PRECISIONS = ("auto", "fp32", "bf16")
"""Values accepted for ``precision`` (and ``RunConfig.precision``)."""


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``, ``None`` for plain float32.

    ``"auto"``: bfloat16 on CUDA, float32 elsewhere (CPU results stay bit-identical to
    float32 code). ``"bf16"`` needs CUDA; ``"fp32"`` is float32 everywhere.
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(
            f"Unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type != "cuda":
        raise ValueError(
            f"precision 'bf16' needs a CUDA device, got {device}; use 'auto' or 'fp32'")
    if precision == "fp32" or device.type != "cuda":
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_local(
    model: nn.Module,
    dataset: Dataset[Any],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float,
    weight_decay: float,
    optimizer: str,
    device: torch.device | str,
    seed: int,
    class_weights: torch.Tensor | None = None,
    num_workers: int | None = None,
    precision: str = "auto",
    prox_mu: float = 0.0,
    prox_reference: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place for ``epochs`` passes over ``dataset``; return its metrics.

    Shuffling uses a ``torch.Generator`` seeded with ``seed``, and torch's global RNG is
    seeded with ``seed`` inside a forked RNG scope (so stochastic layers are reproducible
    and the caller's RNG state is left untouched). ``momentum`` applies to SGD only;
    ``class_weights`` (length K) weights the cross-entropy. ``prox_mu > 0`` adds FedProx's
    proximal term ``mu / 2 * ||w - w_0||^2`` over the trainable parameters, ``w_0`` being
    the weights ``model`` holds on entry (the global model), or, given ``prox_reference``
    (parameter name -> tensor, e.g. ``dict(other.named_parameters())``; copied on entry), those
    tensors: Ditto trains an institution's personal model towards the received global this way.

    An :class:`~flower_focal.data.loader.ImageTensorDataset` (what
    :func:`flower_focal.data.load_institution` returns) is sliced batch by batch, on the
    device when it fits in a quarter of its free memory, and its ``batch_augment`` is applied
    to each batch there, drawn from a generator seeded with ``seed``: results do not depend
    on ``num_workers``. Other datasets go through a DataLoader with ``num_workers`` worker
    processes (``None``/negative: :func:`~flower_focal.data.loader.resolve_num_workers`).
    ``precision`` (:func:`resolve_precision`): ``"auto"`` trains under bfloat16 autocast
    with channels-last weights on CUDA and in float32 on CPU.

    BatchNorm step counters (``num_batches_tracked``) are left as received when the layer has
    a momentum (then they affect nothing): as part of an update they would only count local
    batches, and that count would dominate the update's norm under DP clipping.

    Returns ``{"train-loss": mean per-example loss of the last epoch, "num-examples":
    len(dataset)}``. Raises ``ValueError`` for an empty dataset or bad arguments and
    ``FloatingPointError`` when the loss is NaN or infinite: at that step on CPU, at the end
    of that epoch on CUDA (checking every step would stall the GPU).
    """
    num_examples = _length(dataset)
    if num_examples == 0:
        raise ValueError("train_local got an empty dataset; this client has nothing to train on")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    device = torch.device(device)
    amp = resolve_precision(precision, device)
    channels_last = amp is not None
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = _make_optimizer(model, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if prox_mu < 0:
        raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")
    if prox_reference is not None and not prox_mu > 0:
        raise ValueError(f"prox_reference needs prox_mu > 0, got {prox_mu}")
    if prox_reference is None:
        anchors = ([(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
                   if prox_mu > 0 else [])
    else:
        anchors = _reference_anchors(model, prox_reference)
    weight = None if class_weights is None else class_weights.to(device, torch.float32)

    _seed_augmentation(dataset, seed)
    generator = torch.Generator().manual_seed(seed)
    augment_rng = torch.Generator().manual_seed(seed)
    # A trailing batch of a few samples gives BatchNorm a near-zero variance and a noisy,
    # ill-conditioned step; drop it whenever there is at least one full batch.
    drop_last = num_examples > batch_size
    loader, augment = batch_loader(dataset, batch_size, device, num_workers, shuffle=True,
                                   drop_last=drop_last, generator=generator)
    per_epoch = num_examples // batch_size * batch_size if drop_last else num_examples
    rng_devices = [_cuda_index(device)] if device.type == "cuda" else []
    check_each_step = device.type == "cpu"  # a host sync per step is free on CPU only
    epoch_loss = math.nan
    counters = _step_counters(model)
    model.train()
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        for epoch in range(epochs):
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            if augment is not None:  # the epoch's flips and turns, drawn and copied at once
                codes = to_device_async(augment.draw(per_epoch, augment_rng), device)
            for step, (images, labels) in enumerate(device_batches(loader, device)):
                if augment is not None:
                    images = augment.apply(images, codes[seen:seen + labels.shape[0]])
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                opt.zero_grad(set_to_none=True)
                with autocast(device, amp):
                    logits = model(images)
                loss = F.cross_entropy(logits.float(), labels, weight=weight)
                if check_each_step:
                    _check_finite(float(loss.detach()), epoch, step, lr)
                if anchors:  # reported loss stays the cross-entropy
                    prox = sum(((p - p0) ** 2).sum() for p, p0 in anchors)
                    (loss + 0.5 * prox_mu * prox).backward()
                else:
                    loss.backward()
                opt.step()
                loss_sum += loss.detach() * labels.shape[0]
                seen += labels.shape[0]
            epoch_loss = float(loss_sum) / seen
            _check_finite(epoch_loss, epoch, None, lr)
    with torch.no_grad():
        for buffer, received in counters:
            buffer.copy_(received)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    return {wire.TRAIN_LOSS: epoch_loss, wire.NUM_EXAMPLES: num_examples}


def _reference_anchors(model: nn.Module, reference: Mapping[str, torch.Tensor]
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, copy of its reference)`` for every trainable parameter of ``model``.

    Each copy has the parameter's device, dtype and memory format (as the entry copy of the
    FedProx anchor has), so the proximal term is computed the same way either way.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(reference))
    if missing:
        raise ValueError(f"prox_reference lacks trainable parameters of the model: {missing[:5]}")
    anchors = []
    for name, p in params.items():
        ref = reference[name]
        if tuple(ref.shape) != tuple(p.shape):
            raise ValueError(f"prox_reference {name!r} has shape {tuple(ref.shape)}, "
                             f"the model's parameter {tuple(p.shape)}")
        anchors.append((p, torch.empty_like(p.detach()).copy_(ref.detach())))
    return anchors


def _check_finite(value: float, epoch: int, step: int | None, lr: float) -> None:
    if not math.isfinite(value):
        where = f"epoch {epoch + 1}" + (f", batch {step + 1}" if step is not None else "")
        raise FloatingPointError(
            f"training loss became {value} at {where}; "
            f"lower the learning rate (lr={lr}) or check the inputs for NaN/Inf"
        )


def _step_counters(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(buffer, copy)`` of the ``num_batches_tracked`` of every BatchNorm with a momentum."""
    return [
        (m.num_batches_tracked, m.num_batches_tracked.detach().clone())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.momentum is not None
        and m.num_batches_tracked is not None
    ]


def evaluate_model(
    model: nn.Module,
    dataset: Dataset[Any],
    *,
    batch_size: int,
    device: torch.device | str,
    num_classes: int,
) -> dict[str, float]:
    """Return ``{"loss", "accuracy", "auroc", "num-examples"}`` of ``model`` on ``dataset``.

    ``loss`` is the mean cross-entropy, ``auroc`` the macro one-vs-rest AUROC of
    :func:`flower_focal.metrics.macro_auroc` (classes absent from ``dataset`` are skipped).
    An empty dataset gives ``num-examples`` 0 and NaN metrics.
    """
    if _length(dataset) == 0:
        nan = math.nan
        return {wire.LOSS: nan, wire.ACCURACY: nan, wire.AUROC: nan, wire.NUM_EXAMPLES: 0}
    logits, labels = _logits(model, dataset, batch_size, device)
    if logits.shape[1] != num_classes:
        raise ValueError(f"model outputs {logits.shape[1]} classes but num_classes={num_classes}")
    probs = torch.softmax(logits, dim=1).numpy()
    y = labels.numpy()
    return {
        wire.LOSS: float(F.cross_entropy(logits, labels)),
        wire.ACCURACY: accuracy(probs, y),
        wire.AUROC: macro_auroc(probs, y, num_classes),
        wire.NUM_EXAMPLES: len(y),
    }


def predict_proba(
    model: nn.Module, dataset: Dataset[Any], batch_size: int, device: torch.device | str
) -> tuple[np.ndarray, np.ndarray]:
    """Return softmax probabilities ``(n, K)`` (float32) and labels ``(n,)`` (int64)."""
    logits, labels = _logits(model, dataset, batch_size, device)
    return torch.softmax(logits, dim=1).numpy(), labels.numpy()


def _logits(
    model: nn.Module, dataset: Dataset[Any], batch_size: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over ``dataset`` in order; return CPU logits and labels."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    out_logits: list[torch.Tensor] = []
    out_labels: list[torch.Tensor] = []
    loader, _ = batch_loader(dataset, batch_size, device, None, shuffle=False)
    try:
        with torch.no_grad():
            for images, labels in device_batches(loader, device):
                out_logits.append(model(images).float())
                out_labels.append(labels)
    finally:
        model.train(was_training)
    if not out_logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(out_logits).cpu(), torch.cat(out_labels).cpu()


class _Update:
    """``torch.optim.SGD`` / ``torch.optim.Adam`` without the ``Optimizer`` object.

    The update is torch's own, called through its functional form (``torch.optim.sgd.sgd``,
    ``torch.optim.adam.adam``) with the same defaults and per-parameter state, so the weights
    are those ``torch.optim.SGD`` / ``Adam`` would give (tests compare them exactly). The
    ``Optimizer`` class imports ``torch._dynamo`` on first use (about 0.9 s on 2 cores), which
    a deployed SuperNode pays on every train message because it starts a process per message.
    """

    def __init__(self, model: nn.Module, name: str, *, lr: float, momentum: float,
                 weight_decay: float) -> None:
        if name not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
        self.name, self.lr, self.momentum, self.weight_decay = name, lr, momentum, weight_decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.state: dict[int, dict[str, Any]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        states = [self.state.setdefault(id(p), {}) for p in params]
        if self.name == "sgd":
            from torch.optim.sgd import sgd

            buffers = [st.get("momentum_buffer") for st in states]
            sgd(params, grads, buffers, weight_decay=self.weight_decay, momentum=self.momentum,
                lr=self.lr, dampening=0.0, nesterov=False, maximize=False)
            for st, buf in zip(states, buffers):
                st["momentum_buffer"] = buf
            return
        from torch.optim.adam import adam

        for p, st in zip(params, states):
            if not st:  # what Adam._init_group creates (its CPU step counter included)
                st["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype())
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        adam(params, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
             [], [st["step"] for st in states], has_complex=any(torch.is_complex(p) for p in params),
             amsgrad=False, beta1=0.9, beta2=0.999, lr=self.lr, weight_decay=self.weight_decay,
             eps=1e-8, maximize=False)


def _make_optimizer(
    model: nn.Module, name: str, *, lr: float, momentum: float, weight_decay: float
) -> _Update:
    return _Update(model, name, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _length(dataset: Dataset[Any]) -> int:
    if not isinstance(dataset, Sized):
        raise ValueError("dataset must define __len__ (map-style dataset)")
    return len(dataset)
