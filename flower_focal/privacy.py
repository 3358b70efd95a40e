"""Privacy accounting for flower-focal's DP options: (epsilon, delta) of the Gaussian mechanism
composed over rounds, by Rényi differential privacy (RDP).

What is protected (read this before quoting a number)
----------------------------------------------------
The guarantee is **client-level (user-level) DP where the "user" is one institution**: two
federations are neighbours when one institution's *whole dataset* is added or removed (Flower's
own accountant uses the same relation, ``add-or-remove-one``). Every training round releases the
clipped, noised aggregate, i.e. a Gaussian mechanism applied to the sum of the institutions'
clipped updates (L2 norm <= clip norm ``S``) with noise std ``z * S`` (``z`` = noise multiplier).
That holds for

* ``strategy=fedavg`` with ``dp-noise-multiplier`` / ``dp-clipping-norm`` (Flower's
  ``DifferentialPrivacyClientSideFixedClipping``: noise ``z*S/m`` on the average of ``m``); and
* ``strategy=he-fedavg`` with ``he-noise-multiplier`` / ``he-clip-norm`` (each of the ``m``
  institutions adds ``z*S/sqrt(m)`` before encrypting, so the average carries ``z*S/m``),

**only when the aggregation weights are equal** (``1/m``) and all ``m`` sampled institutions
reply. Both strategies weight by training-set size ``n_i``; with unequal sizes the largest
institution's effective multiplier is smaller than ``z`` — :func:`effective_noise_multiplier`
computes it from the actual weights, and that is the value to account with.

Accounting: one round is the Gaussian mechanism with RDP(alpha) = alpha / (2 z^2); ``T``
rounds compose additively, RDP(alpha) = T alpha / (2 z^2) (Mironov 2017); the conversion is
epsilon = min_alpha RDP(alpha) + log(1/delta) / (alpha - 1), taken over a dense grid of orders.
This conversion is a valid but slightly loose bound (3-31 % above the exact Gaussian profile
for z = 0.1-10; see tests/test_privacy.py).

**No amplification by subsampling** is claimed: when ``fraction-train < 1`` institutions are
sampled by a seeded, public RNG, so the sampling is not secret and every round is counted as if
the institution took part (``T`` = number of rounds). That is conservative for an institution
that sat rounds out. Also not covered: evaluation metrics and the training metrics the server
aggregates (loss, accuracy, AUROC, ``num-examples`` are released without noise), the public
facts every strategy reveals (``n_i``), and in he-fedavg the ciphertexts themselves are only as
private as the key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_DELTA = 1e-5

#: Rényi orders searched: alpha - 1 on a geometric grid from 1e-4 to 1e6 (about 0.5 % apart),
#: dense enough that the grid optimum is within 0.01 % of the continuous one (see tests).
ORDERS: np.ndarray = 1.0 + np.geomspace(1e-4, 1e6, 4001)

ACCOUNTING = "rdp/gaussian, no subsampling amplification, add-or-remove-one-institution"


@dataclass(frozen=True)
class PrivacyGuarantee:
    """``(epsilon, delta)`` client-level DP of ``rounds`` Gaussian releases with multiplier ``z``."""

    epsilon: float
    delta: float
    noise_multiplier: float
    rounds: int
    order: float  # the Rényi order that gave epsilon
    unit: str = "institution (client-level DP: one institution's whole dataset)"
    accounting: str = ACCOUNTING

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields (``epsilon`` is ``inf`` without noise)."""
        return asdict(self)


def _check(noise_multiplier: float, rounds: int, delta: float) -> None:
    if not (isinstance(noise_multiplier, int | float) and math.isfinite(noise_multiplier)) or noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def gaussian_rdp(noise_multiplier: float, rounds: int, orders: np.ndarray | float = ORDERS) -> np.ndarray:
    """RDP of ``rounds`` compositions of the Gaussian mechanism: ``rounds * alpha / (2 z^2)``."""
    _check(noise_multiplier, rounds, 0.5)
    alpha = np.asarray(orders, dtype=np.float64)
    if np.any(alpha <= 1.0):
        raise ValueError("Rényi orders must be > 1")
    if noise_multiplier == 0:
        return np.full(alpha.shape, math.inf if rounds else 0.0)
    return rounds * alpha / (2.0 * noise_multiplier**2)


def rdp_to_epsilon(rdp: np.ndarray, orders: np.ndarray, delta: float) -> tuple[float, float]:
    """``min_alpha rdp(alpha) + log(1/delta) / (alpha - 1)`` and the minimising order."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    rdp, orders = np.asarray(rdp, dtype=np.float64), np.asarray(orders, dtype=np.float64)
    if rdp.shape != orders.shape:
        raise ValueError("rdp and orders must have the same shape")
    eps = rdp + math.log(1.0 / delta) / (orders - 1.0)
    i = int(np.argmin(eps))
    return float(eps[i]), float(orders[i])


def client_level_epsilon(noise_multiplier: float, rounds: int, delta: float = DEFAULT_DELTA) -> PrivacyGuarantee:
    """Client-level ``(epsilon, delta)`` after ``rounds`` noised aggregates (see module doc).

    ``noise_multiplier`` must be the multiplier the institution actually gets: with unequal
    aggregation weights pass :func:`effective_noise_multiplier`, not the configured ``z``.
    ``rounds == 0`` gives epsilon 0; ``noise_multiplier == 0`` gives ``inf``.
    """
    _check(noise_multiplier, rounds, delta)
    if rounds == 0:
        return PrivacyGuarantee(0.0, delta, float(noise_multiplier), 0, math.nan)
    if noise_multiplier == 0:
        return PrivacyGuarantee(math.inf, delta, 0.0, rounds, math.nan)
    eps, order = rdp_to_epsilon(gaussian_rdp(noise_multiplier, rounds), ORDERS, delta)
    return PrivacyGuarantee(eps, delta, float(noise_multiplier), rounds, order)


def effective_noise_multiplier(
    noise_multiplier: float,
    weights: Sequence[float],
    *,
    mechanism: str,
    num_sampled: int | None = None,
) -> float:
    """The multiplier of the worst-off institution given the actual aggregation weights.

    ``weights`` are the institutions' aggregation weights in one round (``n_i``; normalised
    here). Institution ``i`` moves the aggregate by at most ``w_i * S``, so its multiplier is
    (noise std on the aggregate) / ``(w_i * S)``; the smallest over institutions is returned.

    mechanism
        ``"central"`` (fedavg + Flower's DP wrapper): noise ``z*S/num_sampled`` on the weighted
        average, so ``z_i = z / (num_sampled * w_i)``. ``num_sampled`` defaults to
        ``len(weights)`` (the wrapper's ``num_sampled_clients`` must equal the replies).
        ``"distributed"`` (he-fedavg): each of the ``m = num_sampled`` sampled institutions adds
        ``z*S/sqrt(m)`` and its reply is weighted by ``w_i``: ``z_i = z * ||w||_2 / (sqrt(m) * w_i)``.
        ``num_sampled`` defaults to ``len(weights)``; pass the sampled count when fewer replied
        (``m'`` equal-weight replies out of ``m`` give ``z * sqrt(m'/m)``).

    Equal weights with every sampled institution replying give ``z`` for both. Example:
    weights (1, 1, 1, 1, 4) and z = 1 give 0.4 (central) and 0.5 (distributed) for the large
    institution.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(~np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be a non-empty list of positive numbers, got {weights!r}")
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    w = w / w.sum()
    m = w.size
    sampled = m if num_sampled is None else num_sampled
    if isinstance(sampled, bool) or not isinstance(sampled, int) or sampled < 1:
        raise ValueError(f"num_sampled must be an integer >= 1, got {num_sampled!r}")
    if mechanism == "central":
        return float(noise_multiplier / (sampled * w.max()))
    if mechanism == "distributed":
        return float(noise_multiplier * np.linalg.norm(w) / (math.sqrt(sampled) * w.max()))
    raise ValueError(f"mechanism must be 'central' or 'distributed', got {mechanism!r}")
