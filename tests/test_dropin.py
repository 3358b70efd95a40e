"""The strategies in an app that knows nothing of flower-focal, in-process (fast tier).

The ClientApp below is what a Flower quickstart has: default train/evaluate handlers, its own
``learning-rate``-style keys, no describe query. Driven by the loopback grid (real ClientApp,
real TenSEAL ciphertexts, no Ray); the slow tests in ``test_foreign_app.py`` do the same through
``flwr run`` with the README's diffs.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_focal.client.he_mod import he_fedavg_mod
from flower_focal.crypto import PublicContext, keygen
from flower_focal.strategy import FedAvg, HEFedAvg, NothingAggregated
from flower_focal.testing import LoopbackGrid

RUN_CONFIG = {"learning-rate": 0.5, "he-key-dir": ""}  # the app's own key next to the mod's


def quickstart_app(*, he: bool, broken: bool = False, fedbn: bool = False) -> ClientApp:
    """``fedbn``: arrays named ``bn.*`` are not trained and the reply carries the received values
    for them (what flower-focal's FedBN handler does with the normalisation layers)."""
    app = ClientApp(mods=[he_fedavg_mod] if he else [])

    @app.train()
    def train(msg: Message, context):
        pid = int(context.node_config["partition-id"])
        if broken:
            raise RuntimeError(f"institution {pid} cannot train: out of memory")
        arrays = msg.content["arrays"]
        lr = float(context.run_config["learning-rate"])
        target = np.float32(pid + 1)
        trained = {k: arrays[k] if fedbn and k.startswith("bn.") else
                   Array(arrays[k].numpy() - lr * (arrays[k].numpy() - target)) for k in arrays}
        metrics = MetricRecord({"train_loss": float(pid), "num-examples": 10 * (pid + 1)})
        return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context):
        arrays = msg.content["arrays"]
        loss = float(sum(np.abs(arrays[k].numpy()).sum() for k in arrays))
        return Message(RecordDict({"metrics": MetricRecord({"eval_loss": loss, "num-examples": 5})}),
                       reply_to=msg)

    return app


def initial() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({"w": Array(rng.normal(size=(4, 3)).astype(np.float32)),
                        "b": Array(np.zeros(3, np.float32))})


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("keys"), "compact")


def test_fedavg_and_he_fedavg_run_without_the_describe_query_and_agree(keys_dir):
    config = {**RUN_CONFIG, "he-key-dir": str(keys_dir)}
    plain_grid = LoopbackGrid(quickstart_app(he=False), 3, config)
    plain = FedAvg(fraction_train=1.0, min_available_nodes=3).start(
        plain_grid, initial(), num_rounds=3, train_config=ConfigRecord({"lr": 0.5}))
    he_grid = LoopbackGrid(quickstart_app(he=True), 3, config)
    strategy = HEFedAvg.from_key_dir(keys_dir, fraction_train=1.0, min_available_nodes=3)
    encrypted = strategy.start(he_grid, initial(), num_rounds=3, train_config=ConfigRecord({"lr": 0.5}))
    decrypted = strategy.encrypted_model(encrypted).decrypt(keys_dir)
    for name in ("w", "b"):
        np.testing.assert_allclose(decrypted[name].numpy(), plain.arrays[name].numpy(), atol=1e-5)
    # sizes were unknown: every round sealed in a second exchange, and the server held no plaintext
    seals = [m for m in he_grid.sent if m.content.config_records and
             next(iter(m.content.config_records.values())).get("he-seal")]
    assert len(seals) == 3 * 3
    assert all(r.content.array_records[k]["ciphertext"].stype == "he/flower-focal"
               for r in he_grid.received if not r.has_error() for k in r.content.array_records)
    assert PublicContext.load(keys_dir / "public.ctx").holds_secret_key is False


def test_a_run_that_trained_nothing_raises_with_the_institutions_error(keys_dir):
    grid = LoopbackGrid(quickstart_app(he=False, broken=True), 2, RUN_CONFIG)
    with pytest.raises(NothingAggregated, match="out of memory"):
        FedAvg(min_available_nodes=2).start(grid, initial(), num_rounds=2)


def test_an_institution_without_a_key_says_so_and_the_run_fails(keys_dir, tmp_path):
    public_only = tmp_path / "public-only"
    public_only.mkdir()
    (public_only / "public.ctx").write_bytes((keys_dir / "public.ctx").read_bytes())
    grid = LoopbackGrid(quickstart_app(he=True), 2, {**RUN_CONFIG, "he-key-dir": str(public_only)})
    strategy = HEFedAvg.from_key_dir(public_only, min_available_nodes=2)
    with pytest.raises(NothingAggregated, match="secret key .* not found on this institution"):
        strategy.start(grid, initial(), num_rounds=1)


def test_encrypted_strategies_refuse_evaluate_fn_before_sending_anything(keys_dir):
    grid = LoopbackGrid(quickstart_app(he=True), 2, {**RUN_CONFIG, "he-key-dir": str(keys_dir)})
    with pytest.raises(ValueError, match="federated evaluation"):
        HEFedAvg.from_key_dir(keys_dir).start(grid, initial(), num_rounds=1, evaluate_fn=lambda r, a: None)
    assert grid.sent == []


def test_legacy_he_strategy_raises_when_its_first_rounds_train_nothing(keys_dir):
    """The legacy loop has no end hook: a failed round with nothing trained so far raises."""
    from flwr.common import ndarrays_to_parameters

    from flower_focal.legacy import HEFedAvgLegacy

    strategy = HEFedAvgLegacy.from_key_dir(
        keys_dir, initial_parameters=ndarrays_to_parameters([np.zeros(3, np.float32)]))
    with pytest.raises(NothingAggregated, match="out of memory"):
        strategy.aggregate_fit(1, [], [RuntimeError("institution 0 cannot train: out of memory")])
