"""The RDP accountant against independent references: the closed-form optimum of the same
bound, the exact privacy profile of the Gaussian mechanism, and values from Google's
dp-accounting (the backend of Flower's own RdpAccountant)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from flower_focal.privacy import (
    ORDERS,
    client_level_epsilon,
    effective_noise_multiplier,
    gaussian_rdp,
    rdp_to_epsilon,
)

DELTA = 1e-5

# dp-accounting 0.6.0, GaussianDpEvent(z) composed T times, get_epsilon(1e-5):
# (z, T): (RdpAccountant with its default orders and improved RDP->DP conversion, PLDAccountant)
DP_ACCOUNTING = {
    (0.3, 10): (104.44964175838936, 99.67291862617411),
    (1.0, 10): (19.05359753163139, 17.85658683146691),
    (3.0, 10): (5.023949750348651, 4.6529845341598675),
    (1.0, 1): (4.728507067217623, 4.37717810002493),
    (5.0, 100): (10.725509696418232, 9.99725615024243),
}


def exact_gaussian_delta(eps: float, mu: float) -> float:
    """Tight delta(eps) of the Gaussian mechanism with sensitivity/std = mu (Balle & Wang 2018,
    Thm 8). T rounds with multiplier z compose to one Gaussian with mu = sqrt(T)/z."""
    return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2)))


def exact_gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    mu = math.sqrt(rounds) / z
    return brentq(lambda e: exact_gaussian_delta(e, mu) - delta, 0.0, 1e5)


@pytest.mark.parametrize("z,rounds", [(0.1, 10), (0.3, 10), (1.0, 10), (3.0, 10), (10.0, 10), (1.0, 1), (50.0, 3)])
def test_grid_search_matches_the_closed_form_optimum(z, rounds):
    # RDP(a) = c*a with c = T/(2 z^2): min_a c*a + L/(a-1) is at a = 1 + sqrt(L/c),
    # value c + 2 sqrt(c L) (the zCDP conversion of Bun & Steinke).
    c, big_l = rounds / (2 * z * z), math.log(1 / DELTA)
    closed = c + 2 * math.sqrt(c * big_l)
    got = client_level_epsilon(z, rounds, DELTA)
    assert closed - 1e-9 <= got.epsilon <= closed * (1 + 1e-4)
    assert got.order == pytest.approx(1 + math.sqrt(big_l / c), rel=0.01)
    assert got.delta == DELTA and got.rounds == rounds and got.noise_multiplier == z


@pytest.mark.parametrize("z,rounds", sorted(DP_ACCOUNTING))
def test_bound_is_valid_and_not_loose_against_exact_gaussian_and_dp_accounting(z, rounds):
    eps = client_level_epsilon(z, rounds, DELTA).epsilon
    exact = exact_gaussian_epsilon(z, rounds, DELTA)
    rdp_ref, pld_ref = DP_ACCOUNTING[(z, rounds)]
    assert exact == pytest.approx(pld_ref, rel=1e-3)  # two independent exact computations agree
    assert exact_gaussian_delta(eps, math.sqrt(rounds) / z) <= DELTA  # our epsilon is a valid bound
    assert exact <= rdp_ref <= eps  # classic conversion: never tighter than the improved one ...
    assert eps <= 1.15 * rdp_ref  # ... and not much looser


def test_monotone_in_rounds_noise_and_delta():
    e = lambda z, t, d=DELTA: client_level_epsilon(z, t, d).epsilon  # noqa: E731
    assert e(1.0, 5) < e(1.0, 10) < e(1.0, 20)
    assert e(3.0, 10) < e(1.0, 10) < e(0.3, 10)
    assert e(1.0, 10, 1e-3) < e(1.0, 10, 1e-5) < e(1.0, 10, 1e-8)
    # composition: T rounds with z equal one round with z / sqrt(T) (RDP adds up)
    assert e(2.0, 4) == pytest.approx(e(1.0, 1), rel=1e-12)


def test_edge_cases_and_bad_input():
    assert client_level_epsilon(0.0, 10).epsilon == math.inf
    assert client_level_epsilon(1.0, 0).epsilon == 0.0
    for bad in (dict(noise_multiplier=-1.0, rounds=1), dict(noise_multiplier=float("nan"), rounds=1),
                dict(noise_multiplier=1.0, rounds=-1), dict(noise_multiplier=1.0, rounds=1.5)):
        with pytest.raises(ValueError):
            client_level_epsilon(**bad)
    for delta in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError, match="delta"):
            client_level_epsilon(1.0, 1, delta)
    with pytest.raises(ValueError, match="orders"):
        gaussian_rdp(1.0, 1, np.array([0.5, 2.0]))
    # the conversion itself: a flat RDP curve picks the largest order
    eps, order = rdp_to_epsilon(np.zeros(3), np.array([2.0, 11.0, 101.0]), DELTA)
    assert order == 101.0 and eps == pytest.approx(math.log(1 / DELTA) / 100)
    assert ORDERS.min() > 1.0


def _simulated_multiplier(weights, z, mechanism, num_sampled, trials=4000, dim=64, seed=0):
    """Noise std on the aggregate / institution i's largest possible shift, measured by sampling
    the aggregation exactly as the strategies do it (clip S = 1)."""
    rng = np.random.default_rng(seed)
    w = np.asarray(weights, float) / np.sum(weights)
    if mechanism == "central":  # Flower's wrapper: weighted average, then N(0, (z S / m)^2)
        noise = rng.normal(0, z / num_sampled, (trials, dim))
    else:  # he-fedavg: institution j adds N(0, (z S / sqrt(m))^2) to its update, weighted w_j
        noise = np.einsum("j,tjd->td", w, rng.normal(0, z / math.sqrt(num_sampled), (trials, w.size, dim)))
    return float(noise.std() / w.max())


@pytest.mark.parametrize("mechanism", ["central", "distributed"])
@pytest.mark.parametrize("weights,num_sampled", [([140] * 5, 5), ([1, 1, 1, 1, 4], 5), ([300, 100, 50], 3),
                                                  ([100] * 3, 5)])
def test_effective_multiplier_matches_a_simulated_aggregation(mechanism, weights, num_sampled):
    z = 0.7
    got = effective_noise_multiplier(z, weights, mechanism=mechanism, num_sampled=num_sampled)
    assert got == pytest.approx(_simulated_multiplier(weights, z, mechanism, num_sampled), rel=0.02)
    if len(set(weights)) == 1 and len(weights) == num_sampled:
        assert got == pytest.approx(z, rel=1e-12)  # the calibration's assumption: equal weights
    else:
        assert got < z  # unequal weights or missing replies: the guarantee is weaker


def test_effective_multiplier_rejects_bad_input():
    for bad in ([], [1, 0], [1, float("nan")], [[1, 2]]):
        with pytest.raises(ValueError, match="weights"):
            effective_noise_multiplier(1.0, bad, mechanism="central")
    with pytest.raises(ValueError, match="mechanism"):
        effective_noise_multiplier(1.0, [1, 1], mechanism="local")
    with pytest.raises(ValueError, match="num_sampled"):
        effective_noise_multiplier(1.0, [1, 1], mechanism="central", num_sampled=0)
