"""FOCAL slot layout: packing round-trips and the lane sum are exact for any n, d, K, block."""

from __future__ import annotations

import numpy as np
import pytest

from flower_focal.focal.packing import (
    FocalLayout,
    pack_errors,
    pack_features,
    pack_head,
    unpack_head,
    unpack_logits,
    with_bias,
)
from flower_focal.testing import PlainEvaluator


@pytest.mark.parametrize(
    ("n", "d", "k", "slots", "block"),
    [(5, 3, 2, 64, 8), (37, 10, 3, 64, 8), (130, 7, 5, 256, 16), (9, 40, 4, 64, 64), (3, 2, 2, 8, 1)],
)
def test_forward_and_backward_layout_match_matrix_products(
    n: int, d: int, k: int, slots: int, block: int
) -> None:
    rng = np.random.default_rng(n + d + k)
    lay = FocalLayout(d, k, slots, block)
    x1 = with_bias(rng.normal(size=(n, d)))
    w = rng.normal(size=(d + 1, k))
    e = rng.normal(size=(n, k))
    xs, ws, es = pack_features(lay, x1), pack_head(lay, w), pack_errors(lay, e)
    assert xs.shape == (lay.n_chunks(n), lay.n_groups, slots)
    assert np.array_equal(unpack_head(lay, ws), w)
    # forward: sum over groups of X * W, lanes added by the institution
    fwd = np.einsum("cgs,gps->cps", xs, ws)
    np.testing.assert_allclose(unpack_logits(lay, fwd, n), x1 @ w, atol=1e-12)
    # backward: sum over chunks of X * E, then the rotate-and-add lane sum
    ev = PlainEvaluator(slots)
    grads = np.empty((lay.n_groups, lay.n_pairs, slots), dtype=complex)
    for g in range(lay.n_groups):
        for p in range(lay.n_pairs):
            acc = sum(xs[c, g] * es[c, p] for c in range(xs.shape[0]))
            for step in lay.lane_sum_steps():
                acc = acc + ev.rotate(acc, step)
            grads[g, p] = acc
    # the lane sum leaves W's replicated layout: every sample position holds the total
    np.testing.assert_allclose(grads, pack_head(lay, x1.T @ e), atol=1e-12)


def test_layout_validation_and_counts() -> None:
    lay = FocalLayout(1280, 9)
    assert (lay.lanes, lay.n_groups, lay.n_pairs) == (64, 21, 5)
    assert lay.lane_sum_steps() == (64, 128, 256, 512, 1024, 2048)
    assert lay.n_chunks(150) == 3 and lay.n_chunks(64) == 1
    for bad in ({"block": 48}, {"block": 8192}, {"n_classes": 1}, {"slots": 1000}, {"n_features": 0}):
        with pytest.raises(ValueError):
            FocalLayout(**({"n_features": 4, "n_classes": 2} | bad))
    with pytest.raises(ValueError, match="columns"):
        pack_features(lay, np.zeros((3, 10)))
