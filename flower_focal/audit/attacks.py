"""Gradient-inversion attacks on what an observer of a model update holds.

This module owns the attacker's computations, independent of Flower:

* :func:`estimate_gradient` - the attacker's gradient estimate from an update,
  ``(w_global - w_returned) / (lr * local_steps)`` (exact for one plain SGD step);
* :func:`recover_labels` - iDLG's analytic label recovery from the sign of the last linear
  layer's gradient (Zhao et al. 2020), extended to small batches by the bias gradient;
* :func:`invert` - reconstruct the batch behind each observed gradient by gradient matching:
  ``"idlg"`` minimises ``||g(x') - g||^2`` (DLG/iDLG, Zhu et al. 2019), and
  ``"inverting-gradients"`` minimises ``1 - cos(g(x'), g) + tv_weight * TV(x')`` (Geiping et
  al. 2020). Both are optimised with L-BFGS (strong-Wolfe-like line search), one independent
  problem per observed update, all problems batched with ``torch.func.vmap``.

Images live in the model's input space (``[-1, 1]`` after the project's transforms).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flower_focal.audit.config import ATTACKS


def estimate_gradient(
    global_state: Mapping[str, torch.Tensor],
    returned_state: Mapping[str, torch.Tensor],
    param_names: list[str],
    *,
    lr: float,
    local_steps: int,
) -> dict[str, torch.Tensor]:
    """``(w_global - w_returned) / (lr * local_steps)`` for every trainable parameter.

    Buffers (BatchNorm statistics) are not parameters and are ignored.

    Raises
    ------
    ValueError
        If a parameter is missing, shapes differ or the estimate is not finite.
    """
    if lr <= 0 or local_steps < 1:
        raise ValueError(f"need lr > 0 and local_steps >= 1, got {lr} and {local_steps}")
    out: dict[str, torch.Tensor] = {}
    for name in param_names:
        if name not in global_state or name not in returned_state:
            raise ValueError(f"parameter {name!r} missing from the observed update")
        a = torch.as_tensor(global_state[name]).detach().double()
        b = torch.as_tensor(returned_state[name]).detach().double()
        if a.shape != b.shape:
            raise ValueError(f"parameter {name!r}: shapes {tuple(a.shape)} != {tuple(b.shape)}")
        g = ((a - b) / (lr * local_steps)).float()
        if not torch.isfinite(g).all():
            raise ValueError(f"gradient estimate of {name!r} is not finite")
        out[name] = g
    return out


def last_linear(model: nn.Module) -> tuple[str, str]:
    """Names of the weight and bias of the model's last ``nn.Linear`` (the classifier).

    Raises
    ------
    ValueError
        If the model has no linear layer with a bias.
    """
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            found = name
    if found is None:
        raise ValueError("label recovery needs a final nn.Linear layer with a bias")
    prefix = f"{found}." if found else ""
    return prefix + "weight", prefix + "bias"


def recover_labels(gradient: Mapping[str, torch.Tensor], weight: str, bias: str,
                   batch_size: int) -> torch.Tensor:
    """Labels of the batch behind ``gradient``, from the classifier's gradient alone.

    For cross-entropy, ``dL/dW_k = (p_k - y_k) h`` with non-negative features ``h``
    (sigmoid, or ReLU + pooling), so only the true class has a negative row: iDLG takes
    ``argmin_k sum_j dW_kj``. For a batch of ``B``, ``dL/db_k = mean_b (p_bk - y_bk)`` is
    negative for the classes present; they get one label each (most negative first), and any
    remaining labels go to the classes with the largest ``-db_k`` share (largest remainder).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size == 1:
        return torch.argmin(gradient[weight].sum(dim=1)).reshape(1)
    db = gradient[bias].double()
    order = torch.argsort(db)
    present = [int(k) for k in order if db[k] < 0][:batch_size] or [int(order[0])]
    counts = dict.fromkeys(present, 1)
    share = torch.clamp(-db, min=0)
    share = share / share.sum() * batch_size if share.sum() > 0 else share
    while sum(counts.values()) < batch_size:
        best = max(present, key=lambda k: float(share[k]) - counts[k])
        counts[best] += 1
    return torch.tensor([k for k, c in sorted(counts.items()) for _ in range(c)], dtype=torch.long)


@dataclass(frozen=True)
class InversionResult:
    """Reconstructions ``(N, B, C, H, W)`` in model-input space and the final objective."""

    images: torch.Tensor
    objective: torch.Tensor
    evaluations: int


def attack_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in training mode whose BatchNorm layers use batch statistics only.

    The institution trains in training mode, so BatchNorm normalises with the batch's own
    statistics; the copy does the same without tracking running statistics (which ``vmap``
    cannot update in place).
    """
    from torch.func import replace_all_batch_norm_modules_

    attack = copy.deepcopy(model).float()
    replace_all_batch_norm_modules_(attack)
    return attack.train()


def invert(
    model: nn.Module,
    gradients: list[Mapping[str, torch.Tensor]],
    labels: torch.Tensor,
    image_shape: tuple[int, int, int],
    *,
    attack: str = "inverting-gradients",
    iterations: int = 400,
    tv_weight: float = 1e-3,
    scale_free: bool = False,
    init: torch.Tensor | None = None,
    seed: int = 0,
    init_noise: float = 0.3,
) -> InversionResult:
    """Reconstruct the input batch behind each observed gradient.

    Parameters
    ----------
    model
        The global model the institutions started from (weights loaded).
    gradients
        One gradient estimate per observed update (parameter name -> tensor).
    labels
        ``(N, B)`` labels per update (recovered with :func:`recover_labels`).
    image_shape
        ``(C, H, W)`` of one input image.
    attack
        ``"idlg"`` (L2 gradient matching) or ``"inverting-gradients"`` (cosine + TV).
    iterations
        L-BFGS budget in objective-and-gradient evaluations.
    tv_weight
        Total-variation weight of ``"inverting-gradients"``.
    scale_free
        ``"idlg"`` only: match the gradient up to its scale (the optimal scale in closed
        form), for updates that were clipped.
    init
        Start point ``(N, B, C, H, W)``; default: mid-grey plus uniform noise of amplitude
        ``init_noise`` drawn with ``seed`` (the noise breaks the symmetry between the images
        of a batch).
    """
    if attack not in ATTACKS:
        raise ValueError(f"Unknown attack {attack!r}; expected one of {', '.join(ATTACKS)}")
    if not gradients:
        raise ValueError("invert needs at least one observed gradient")
    from torch.func import functional_call, grad, vmap

    net = attack_model(model)
    names = list(gradients[0])
    params = {n: p.detach() for n, p in net.named_parameters()}
    missing = [n for n in params if n not in names]
    if missing:
        raise ValueError(f"gradient estimate lacks parameters {missing[:5]}")
    target = {n: torch.stack([g[n].float() for g in gradients]) for n in params}
    n_inst, batch = labels.shape
    t_norm2 = sum((t * t).flatten(1).sum(1) for t in target.values()).clamp(min=1e-30)

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, p, (x,)), y)

    per_instance = vmap(grad(loss), in_dims=(None, 0, 0))

    def objective(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        g = per_instance(params, x, labels)
        dot = sum((g[n] * target[n]).flatten(1).sum(1) for n in params)
        d_norm2 = sum((g[n] * g[n]).flatten(1).sum(1) for n in params).clamp(min=1e-30)
        if attack == "idlg":
            if scale_free:
                f = 1.0 - dot * dot / (d_norm2 * t_norm2)
            else:
                f = (d_norm2 - 2 * dot + t_norm2) / t_norm2
        else:
            f = 1.0 - dot / torch.sqrt(d_norm2 * t_norm2) + tv_weight * _tv(x)
        (gx,) = torch.autograd.grad(f.sum(), x)
        return f.detach(), gx

    if init is None:
        gen = torch.Generator().manual_seed(seed)
        x0 = (torch.rand(n_inst, batch, *image_shape, generator=gen) * 2 - 1) * init_noise
    else:
        x0 = init.clone()
    x, f, evals = batched_lbfgs(objective, x0, max_evals=iterations)
    return InversionResult(images=x.detach(), objective=f, evaluations=evals)


def _tv(x: torch.Tensor) -> torch.Tensor:
    """Smooth anisotropic total variation per instance (mean over the batch's pixels)."""
    dx = x[..., 1:, :] - x[..., :-1, :]
    dy = x[..., :, 1:] - x[..., :, :-1]
    return (torch.sqrt(dx * dx + 1e-6).flatten(1).mean(1)
            + torch.sqrt(dy * dy + 1e-6).flatten(1).mean(1))


def batched_lbfgs(
    fg: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x0: torch.Tensor,
    *,
    max_evals: int,
    history: int = 50,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_line_search: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """L-BFGS on ``N`` independent problems at once.

    ``fg(x)`` maps ``x`` of shape ``(N, ...)`` to per-problem objectives ``(N,)`` and their
    gradients (shape of ``x``). Each problem keeps its own curvature history and step size;
    the line search brackets a step satisfying the weak Wolfe conditions (doubling the step
    while the curvature condition fails), so the problems never couple. Returns the final
    points, objectives and the number of (batched) evaluations used.
    """
    shape, n = x0.shape, x0.shape[0]
    x = x0.reshape(n, -1).clone().float()

    def ev(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, g = fg(z.reshape(shape))
        return f.detach().float(), g.detach().reshape(n, -1).float()

    f, g = ev(x)
    evals = 1
    dim = x.shape[1]
    s_hist = torch.zeros(history, n, dim)
    y_hist = torch.zeros(history, n, dim)
    rho = torch.zeros(history, n)
    gamma = torch.ones(n)
    first = torch.ones(n, dtype=torch.bool)
    k = 0
    while evals < max_evals:
        q = g.clone()
        order = [(k - 1 - j) % history for j in range(history)]  # newest first
        alphas = []
        for j in order:
            a = rho[j] * (s_hist[j] * q).sum(1)
            alphas.append(a)
            q -= a[:, None] * y_hist[j]
        r = gamma[:, None] * q
        for j, a in zip(reversed(order), reversed(alphas), strict=True):
            b = rho[j] * (y_hist[j] * r).sum(1)
            r += s_hist[j] * (a - b)[:, None]
        p = -r
        slope = (p * g).sum(1)
        bad = ~(slope < 0)  # not a descent direction: steepest descent, forget the history
        if bad.any():
            p[bad] = -g[bad]
            slope = (p * g).sum(1)
            rho[:, bad] = 0
        t = torch.where(first | bad, torch.clamp(1.0 / g.abs().sum(1).clamp(min=1e-30), max=1.0),
                        torch.ones(n))
        lo, hi = torch.zeros(n), torch.full((n,), float("inf"))
        done = torch.zeros(n, dtype=torch.bool)
        have = torch.zeros(n, dtype=torch.bool)
        f_new, g_new, t_new = f.clone(), g.clone(), torch.zeros(n)
        for _ in range(max_line_search):
            f_t, g_t = ev(x + t[:, None] * p)
            evals += 1
            armijo = torch.isfinite(f_t) & (f_t <= f + c1 * t * slope)
            curvature = (g_t * p).sum(1) >= c2 * slope
            active = ~done
            better = active & armijo & (~have | (f_t < f_new))
            f_new[better], g_new[better], t_new[better] = f_t[better], g_t[better], t[better]
            have |= better
            done |= active & armijo & curvature
            if bool(done.all()) or evals >= max_evals:
                break
            shrink, grow = active & ~armijo, active & armijo & ~curvature
            hi = torch.where(shrink, t, hi)
            lo = torch.where(grow, t, lo)
            t = torch.where(active & ~done, torch.where(torch.isinf(hi), 2 * t, (lo + hi) / 2), t)
        s = t_new[:, None] * p
        yv = g_new - g
        sy = (s * yv).sum(1)
        keep = have & (sy > 1e-10)
        j = k % history
        s_hist[j] = torch.where(keep[:, None], s, torch.zeros_like(s))
        y_hist[j] = torch.where(keep[:, None], yv, torch.zeros_like(yv))
        rho[j] = torch.where(keep, 1.0 / sy.clamp(min=1e-30), torch.zeros(n))
        gamma = torch.where(keep, sy / (yv * yv).sum(1).clamp(min=1e-30), gamma)
        k += 1
        x = x + s
        f, g = f_new, g_new
        first &= ~have
    return x.reshape(shape), f, evals
