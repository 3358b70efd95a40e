"""Server-side optimiser of the FedAvg family: FedAvgM (server momentum and server learning rate).

One pure-numpy description of the step, used by the fedavg server and by he-fedavg's
institutions (whose server cannot compute it: it holds only ciphertext). The math is
Flower 1.42's :class:`flwr.serverapp.strategy.FedAvgM` (Hsu et al., 2019), with PyTorch's SGD
convention and no Nesterov term::

    g  = w - avg                  # pseudo-gradient: the global the round started from minus the average
    m' = beta * m + g             # (beta > 0 only; m = 0 before the first aggregated round)
    w' = w - lr * m'              # (beta = 0: w' = w - lr * g)

With the defaults ``beta = 0, lr = 1`` the step is the identity (``w' = avg``) and is skipped,
so runs without a server optimiser are unchanged.

One departure from Flower: normalisation *statistics* (arrays named ``*.running_mean``,
``*.running_var``, ``*.num_batches_tracked``, PyTorch's BatchNorm buffers) are averaged, not
stepped (:func:`is_statistic`). They are not trained parameters, and the step extrapolates
them: ``w - lr * (beta * m + w - avg)`` takes a running variance below zero as soon as the
momentum points down past it (measured on PathMNIST: evaluations of constant predictions in
several rounds with Flower's rule). For models without such buffers the step is Flower's
``FedAvgM``, operation for operation.

Under HE the step is linear in the institutions' models: if institution ``i`` encrypts
``x_i = w - lr * (beta * m + w - w_i)`` (:meth:`ServerOpt.target`) instead of ``w_i``, the
example-weighted sum of the ``x_i`` (weights summing to 1 after the ``C / W`` correction) is
exactly ``w'``, and ``m' = (w - w') / lr`` (:meth:`ServerOpt.momentum`) follows from two
consecutive globals, which every institution can decrypt. See
:mod:`flower_focal.strategy.he_fedavg`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def is_statistic(name: str) -> bool:
    """Whether array ``name`` is a normalisation statistic (averaged, never stepped)."""
    return name.rsplit(".", 1)[-1] in STATISTICS


def stepped_mask(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> np.ndarray:
    """Per entry of the flat vector of these arrays: whether the step applies (not a statistic)."""
    return np.concatenate([np.full(int(np.prod(shape)), not is_statistic(name), dtype=bool)
                           for name, shape in zip(names, shapes, strict=True)] or [np.zeros(0, bool)])


@dataclass(frozen=True)
class ServerOpt:
    """FedAvgM's server momentum ``beta`` (>= 0) and server learning rate ``lr`` (> 0)."""

    momentum: float = 0.0
    lr: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.momentum, int | float) and math.isfinite(self.momentum) and self.momentum >= 0):
            raise ValueError(f"server-momentum must be a finite number >= 0, got {self.momentum!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"server-lr must be a finite number > 0, got {self.lr!r}")

    @property
    def active(self) -> bool:
        """Whether the step changes anything (Flower's ``server_opt``)."""
        return self.momentum != 0.0 or self.lr != 1.0

    def step(self, old: dict[str, np.ndarray], avg: dict[str, np.ndarray],
             velocity: dict[str, np.ndarray] | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """FedAvgM on named arrays: ``(new global, new momentum)`` (momentum ``None`` when ``beta = 0``).

        The same operations, in the same order and dtypes, as Flower's ``FedAvgM.aggregate_train``;
        normalisation statistics (:func:`is_statistic`) keep the average and have no momentum.
        """
        if set(old) != set(avg):
            raise ValueError(f"server step: the average's arrays {sorted(avg)} differ from the "
                             f"global model's {sorted(old)}")
        stepped = [k for k in avg if not is_statistic(k)]
        grad = {k: old[k] - avg[k] for k in stepped}
        if self.momentum > 0.0:
            velocity = grad if velocity is None else {
                k: self.momentum * velocity[k] + grad[k] for k in stepped}
            grad = velocity
        return {k: np.asarray(old[k] - self.lr * grad[k]) if k in grad else avg[k] for k in avg}, velocity

    def target(self, w: np.ndarray, m: np.ndarray | None, w_i: np.ndarray,
               stepped: np.ndarray | None = None) -> np.ndarray:
        """What an institution encrypts under HE: ``w - lr * (beta * m + w - w_i)`` (flat, float64).

        Weighted by ``n_i / W`` and summed over the round's institutions this is the FedAvgM
        global ``w'`` (the weights sum to 1); ``m = None`` is the zero momentum of the first round.
        Entries where ``stepped`` (:func:`stepped_mask`) is false stay ``w_i`` (their sum is the
        average, as :meth:`step` keeps it).
        """
        grad = w - w_i
        if self.momentum > 0.0 and m is not None:
            grad = self.momentum * m + grad
        target = w - self.lr * grad
        return target if stepped is None else np.where(stepped, target, w_i)

    def momentum_from(self, previous: np.ndarray, current: np.ndarray) -> np.ndarray:
        """The momentum after the step that took ``previous`` to ``current``: ``(previous - current) / lr``."""
        return (previous - current) / self.lr
