"""FedAvg hooks with fabricated replies: exact weighted mean, NaN-aware metrics, determinism."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict

from flower_focal.strategy import FedAvg, build_strategy
from flower_focal.strategy.roster import Institution, InstitutionRoster, OrderedGrid, seeded_random
from flower_focal.config import RunConfig
from tests.conftest import make_reply


def _reply(node_id, weights, n, **metrics):
    arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
    return make_reply(
        node_id,
        RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n, **metrics})}),
    )


def _roster(node_ids):
    roster = InstitutionRoster()
    for pid, nid in enumerate(node_ids):
        roster.register(Institution(node_id=nid, partition_id=pid, num_classes=3, in_channels=3))
    return roster


def test_aggregate_is_the_example_weighted_mean_computed_by_hand():
    rng = np.random.default_rng(0)
    nodes, ns = [11, 22, 33], [10, 30, 60]
    ws = [{"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)} for _ in nodes]
    strategy = FedAvg(roster=_roster(nodes))
    replies = [_reply(nid, w, n, **{"train-loss": float(i)}) for i, (nid, w, n) in enumerate(zip(nodes, ws, ns))]
    arrays, metrics = strategy.aggregate_train(1, reversed(replies))
    for key in ("w", "b"):
        expected = sum(n * w[key].astype(np.float64) for n, w in zip(ns, ws)) / sum(ns)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=0, atol=1e-6)
    assert metrics["train-loss"] == pytest.approx((0 * 10 + 1 * 30 + 2 * 60) / 100)
    assert metrics["num-examples"] == 100
    rec = strategy.history.rounds[0]
    assert sorted(rec.train_institutions) == [0, 1, 2]
    assert rec.train_institutions[2]["num-examples"] == 60
    assert rec.bytes_up == sum(len(Array(w[k]).data) for w in ws for k in ("w", "b"))


def test_failed_reply_is_left_out_and_recorded():
    nodes = [11, 22, 33]
    strategy = FedAvg(roster=_roster(nodes))
    good = [_reply(11, {"w": np.ones(2, np.float32)}, 10), _reply(33, {"w": 3 * np.ones(2, np.float32)}, 30)]
    bad = make_reply(22, RecordDict())
    bad.__dict__["_error"] = Error(code=1, reason="boom")  # an error reply as the engine makes it
    bad.__dict__["_content"] = None
    arrays, _ = strategy.aggregate_train(1, good + [bad])
    np.testing.assert_allclose(arrays["w"].numpy(), [2.5, 2.5])
    assert strategy.history.rounds[0].failures == ["train institution 1: boom"]


def test_evaluate_metrics_skip_undefined_auroc():
    nodes = [11, 22]
    strategy = FedAvg(roster=_roster(nodes))
    replies = [
        make_reply(11, RecordDict({"metrics": MetricRecord({"num-examples": 10, "accuracy": 0.5, "auroc": float("nan")})}), "evaluate"),
        make_reply(22, RecordDict({"metrics": MetricRecord({"num-examples": 30, "accuracy": 0.9, "auroc": 0.8})}), "evaluate"),
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["accuracy"] == pytest.approx((0.5 * 10 + 0.9 * 30) / 40)
    assert metrics["auroc"] == pytest.approx(0.8)
    assert strategy.history.rounds[0].evaluate_institutions[0]["auroc"] is None


class _FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return list(self.node_ids)


def test_sampling_depends_on_partitions_and_seed_not_on_node_ids():
    def sampled_partitions(node_ids, seed, rnd):
        strategy = FedAvg(seed=seed, roster=_roster(node_ids), fraction_train=0.3, min_available_nodes=2)
        msgs = strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), _FakeGrid(list(reversed(node_ids))))
        return sorted(strategy.roster.partition_of(m.metadata.dst_node_id) for m in msgs)

    ids_a = list(range(100, 120))
    ids_b = [9_000_000 + 13 * i for i in range(20)][::-1]  # different IDs, different order
    assert sampled_partitions(ids_a, 7, 1) == sampled_partitions(ids_b, 7, 1)
    assert len(sampled_partitions(ids_a, 7, 1)) == 6
    draws = {tuple(sampled_partitions(ids_a, s, r)) for s in (1, 2, 3) for r in (1, 2)}
    assert len(draws) > 1  # the seed and round do change the sample


def test_seeded_random_restores_global_state():
    import random

    random.seed(5)
    expected = random.random()
    random.seed(5)
    with seeded_random(1, 2, "train"):
        random.random()
    assert random.random() == expected


def test_ordered_grid_lists_known_nodes_in_partition_order():
    roster = _roster([50, 40, 30])
    assert OrderedGrid(_FakeGrid([30, 99, 40, 50]), roster).get_node_ids() == [50, 40, 30]


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(ValueError, match="fedavg"):
        build_strategy(RunConfig(strategy="fedprox"))
