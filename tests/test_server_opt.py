"""Server optimiser (FedAvgM): Flower's math on the fedavg server, the same step applied by the
institutions under he-fedavg (the server still only adds), and resume of both."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvgM

from clients.client_app import app as client_app
from flower_focal import wire
from flower_focal.artifacts import decrypt_model
from flower_focal.checkpoint import load_checkpoint
from flower_focal.config import RunConfig
from flower_focal.crypto import keygen
from flower_focal.models import build_model
from flower_focal.server import run_server
from flower_focal.server_opt import ServerOpt
from flower_focal.strategy import build_strategy
from flower_focal.strategy.fedavg import FedAvg
from flower_focal.strategy.he_fedavg import HEFedAvg
from flower_focal.testing import LoopbackGrid
from tests.conftest import make_reply

BETA, SERVER_LR = 0.9, 0.8


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("keys"), "compact")


def _arrays(rng, scale=1.0) -> ArrayRecord:
    return ArrayRecord({"w": Array(rng.normal(0, scale, (4, 3)).astype(np.float32)),
                        "b": Array(rng.normal(0, scale, (3,)).astype(np.float32)),
                        "n": Array(np.array(7, dtype=np.int64))})


def _reply(node: int, arrays: ArrayRecord, n: int):
    return make_reply(node, RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})}))


@pytest.mark.parametrize(("beta", "lr"), [(BETA, SERVER_LR), (0.0, 0.5), (0.9, 1.0)])
def test_the_server_step_is_flowers_fedavgm_bit_for_bit(beta, lr):
    """Our FedAvg's aggregate, round after round, equals Flower's FedAvgM on the same replies
    (pseudo-gradient old - avg, momentum from the first aggregated round, no Nesterov)."""
    rng = np.random.default_rng(0)
    ours = FedAvg(server_momentum=beta, server_lr=lr)
    flower = FedAvgM(server_momentum=beta, server_learning_rate=lr)
    global_ours = global_flower = _arrays(rng)
    flower.current_arrays = global_flower  # what its configure_train does in round 1
    for server_round in (1, 2, 3, 4):
        replies = [_reply(node, _arrays(rng), n) for node, n in ((1, 30), (2, 50), (3, 20))]
        if server_round == 3:  # a failed round: no reply; nothing aggregated, the momentum stays
            velocity = None if ours._velocity is None else {k: v.copy() for k, v in ours._velocity.items()}
            assert ours.aggregate_train(3, []) == (None, None) == flower.aggregate_train(3, [])
            if velocity is None:  # momentum 0: no velocity is kept
                assert ours._velocity is None
            else:
                assert all(np.array_equal(ours._velocity[k], v) for k, v in velocity.items())
            continue
        ours._round_start = global_ours  # what our configure_train records
        got, _ = ours.aggregate_train(server_round, replies)
        want, _ = flower.aggregate_train(server_round, replies)
        assert list(got.keys()) == list(want.keys())
        for k in want.keys():
            assert got[k].dtype == want[k].dtype
            np.testing.assert_array_equal(got[k].numpy(), want[k].numpy())
        global_ours, global_flower = got, want
    assert not FedAvg().server_opt.active  # the defaults skip the step: plain FedAvg


def test_the_institutions_targets_sum_to_the_fedavgm_step_and_give_back_the_momentum():
    """sum_i (n_i/W) x_i with x_i = w - lr (beta m + w - w_i) is FedAvgM's w', and
    (w - w') / lr its momentum: what he-fedavg's institutions rely on."""
    rng = np.random.default_rng(1)
    opt = ServerOpt(BETA, SERVER_LR)
    w, m = rng.normal(size=50), rng.normal(size=50)
    models, n = [rng.normal(size=50) for _ in range(3)], np.array([30.0, 50.0, 20.0])
    avg = sum(ni * wi for ni, wi in zip(n, models)) / n.sum()
    step, velocity = opt.step({"x": w}, {"x": avg}, {"x": m})
    summed = sum(ni / n.sum() * opt.target(w, m, wi) for ni, wi in zip(n, models))
    np.testing.assert_allclose(summed, step["x"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(opt.momentum_from(w, summed), velocity["x"], rtol=0, atol=1e-12)
    # first round: no momentum yet (m = None is zero), as Flower's first FedAvgM step
    first, _ = opt.step({"x": w}, {"x": avg}, None)
    np.testing.assert_allclose(sum(ni / n.sum() * opt.target(w, None, wi) for ni, wi in zip(n, models)),
                               first["x"], rtol=0, atol=1e-12)


def test_normalisation_statistics_are_averaged_not_stepped_on_the_server_and_under_he():
    """BatchNorm's running statistics keep the plain average (the step would extrapolate a
    running variance below zero); the parameters next to them take the FedAvgM step."""
    from flower_focal.server_opt import is_statistic, stepped_mask

    assert [is_statistic(n) for n in ("bn.running_var", "bn.running_mean", "bn.num_batches_tracked",
                                      "bn.weight", "running_var_head.weight")] == [True, True, True, False, False]
    rng = np.random.default_rng(2)
    opt = ServerOpt(BETA, SERVER_LR)
    names, shapes = ("conv.weight", "bn.running_var", "bn.num_batches_tracked"), ((3, 2), (2,), ())
    old = {"conv.weight": rng.normal(size=(3, 2)), "bn.running_var": np.array([1.0, 1.0]),
           "bn.num_batches_tracked": np.array(4.0)}
    avg = {"conv.weight": rng.normal(size=(3, 2)), "bn.running_var": np.array([0.05, 0.3]),
           "bn.num_batches_tracked": np.array(8.0)}
    new, velocity = opt.step(old, avg, {"conv.weight": rng.normal(size=(3, 2))})
    assert set(velocity) == {"conv.weight"}
    np.testing.assert_array_equal(new["bn.running_var"], avg["bn.running_var"])
    assert not np.allclose(new["conv.weight"], avg["conv.weight"])
    # under HE: sum_i (n_i/W) target_i with the mask is the same step
    flat = lambda d: np.concatenate([np.ravel(d[k]) for k in names])  # noqa: E731
    mask = stepped_mask(names, shapes)
    assert mask.tolist() == [True] * 6 + [False] * 3
    models = [{k: v + rng.normal(size=np.shape(v)) for k, v in avg.items()} for _ in range(2)]
    models.append({k: 3 * avg[k] - models[0][k] - models[1][k] for k in avg})  # mean = avg
    m = rng.normal(size=9)
    stepped, _ = opt.step(old, avg, {"conv.weight": m[:6].reshape(3, 2)})
    summed = sum(opt.target(flat(old), m, flat(w_i), mask) for w_i in models) / 3
    np.testing.assert_allclose(summed, flat(stepped), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("momentum", "lr", "message"), [
    (-0.1, 1.0, "server-momentum"), (float("nan"), 1.0, "server-momentum"), (0.9, 0.0, "server-lr")])
def test_invalid_server_settings_are_named(momentum, lr, message):
    with pytest.raises(ValueError, match=message):
        ServerOpt(momentum, lr)
    with pytest.raises(ValueError, match=message):
        build_strategy(RunConfig(server_momentum=momentum, server_lr=lr))


def test_fedavg_refuses_a_server_optimiser_under_flowers_dp_wrapper():
    with pytest.raises(ValueError, match="after the server step"):
        build_strategy(RunConfig(server_momentum=0.9, dp_noise_multiplier=0.1))
    build_strategy(RunConfig(dp_noise_multiplier=0.1))  # defaults: as before


def test_focal_ignores_the_server_optimiser(key_dir, tmp_path):
    focal_keys = keygen(tmp_path / "focal-keys", "focal")
    strategy = build_strategy(RunConfig(strategy="focal", he_key_dir=str(focal_keys), server_momentum=0.9))
    assert type(strategy).__name__ == "Focal"
    assert not hasattr(strategy, "server_opt")  # Focal stands on Strategy: no FedAvg step to inherit
    from flower_focal.strategy.specs import STRATEGY_SPECS
    assert "server-momentum" not in STRATEGY_SPECS["focal"].settings
    assert "server-momentum" in STRATEGY_SPECS["fedavg"].settings


def _cfg(run_dir, strategy, key_dir, **overrides):
    settings = dict(num_server_rounds=3, num_samples=150, min_available_nodes=3, model="lenet-sigmoid",
                    lr=0.01, server_momentum=BETA, server_lr=SERVER_LR)
    return RunConfig(strategy=strategy, run_dir=str(run_dir), he_key_dir=str(key_dir),
                     **{**settings, **overrides})


def _run(run_dir, strategy, key_dir, crash=None, **overrides):
    cfg = _cfg(run_dir, strategy, key_dir, **overrides)
    grid = LoopbackGrid(client_app, 3, cfg.to_flower())
    if crash:
        grid.crash_from_round[grid.node_ids[crash[0]]] = crash[1]
    run_server(grid, cfg)
    return grid, run_dir


def _state(run_dir):
    return torch.load(run_dir / "model.pt")


def _max_diff(a, b) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
def test_fedavg_with_server_momentum_is_flowers_fedavgm_on_the_same_run(tmp_path, key_dir):
    """Flower's own FedAvgM driving the same institutions reaches our fedavg's final model."""
    _, ours = _run(tmp_path / "ours", "fedavg", key_dir)
    cfg = _cfg(tmp_path / "flower", "fedavg", key_dir)
    grid = LoopbackGrid(client_app, 3, cfg.to_flower())
    torch.manual_seed(cfg.seed)  # the server's public initial model, as run_server makes it
    shape = json.loads((ours / "metrics.json").read_text())["info"]
    initial = ArrayRecord(build_model(cfg.model, shape["in_channels"], shape["num_classes"],
                                      cfg.image_size).state_dict())
    shared = {wire.NUM_CLASSES: shape["num_classes"], wire.IN_CHANNELS: shape["in_channels"]}
    result = FedAvgM(server_momentum=BETA, server_learning_rate=SERVER_LR, min_available_nodes=3).start(
        grid, initial, num_rounds=3, train_config=ConfigRecord(dict(shared)),
        evaluate_config=ConfigRecord(dict(shared)))
    a, b = _state(ours), result.arrays.to_torch_state_dict()
    assert _max_diff(a, b) <= 1e-6
    assert _max_diff(a, initial.to_torch_state_dict()) > 1e-3  # it trained


@pytest.mark.slow
def test_he_fedavg_with_server_momentum_equals_fedavg_with_it(tmp_path, key_dir):
    """Gold: the institutions' FedAvgM under HE equals the server's, over 3 rounds in which only
    2 of 3 institutions are sampled (one that sat a round out rebuilds the momentum from the two
    globals it is sent) and institution 2 fails from round 2 (left out with exact weights)."""
    kw = dict(fraction_train=0.5, crash=(2, 2))
    _, plain = _run(tmp_path / "fedavg", "fedavg", key_dir, **kw)
    _, without = _run(tmp_path / "plain", "fedavg", key_dir, **kw, server_momentum=0.0, server_lr=1.0)
    grid, enc = _run(tmp_path / "he", "he-fedavg", key_dir, **kw)
    rounds = json.loads((enc / "metrics.json").read_text())["rounds"]
    trained = [sorted(r["train_institutions"]) for r in rounds]
    assert all(len(t) <= 2 for t in trained), trained
    assert any(set(trained[r + 1]) - set(trained[r]) for r in range(2)), trained  # sat a round out
    assert any(len(t) == 1 and r["failures"] for t, r in zip(trained, rounds))  # a sampled one failed
    # rounds 2 and 3 carry the previous global: plaintext initial model, then a ciphertext
    previous = [m.content.array_records.get(wire.HE_PREVIOUS) for m in grid.sent
                if m.metadata.message_type == "train"]
    assert previous[0] is None and all(p is not None for p in previous[-2:])
    assert wire.HE_CIPHERTEXT in previous[-1] and wire.HE_CIPHERTEXT not in previous[-3]
    decrypt_model(enc, key_dir)
    a, b = _state(plain), _state(enc)
    assert _max_diff(a, b) <= 1e-5
    assert _max_diff(a, _state(without)) > 1e-3  # the momentum acts
    for ra, rb in zip(json.loads((plain / "metrics.json").read_text())["rounds"], rounds):
        for key in ("loss", "accuracy", "auroc"):
            assert rb["evaluate"][key] == pytest.approx(ra["evaluate"][key], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "he-fedavg"])
def test_resume_continues_the_server_momentum(tmp_path, key_dir, strategy):
    from tests.test_checkpoint import DyingGrid, ServerKilled

    whole = _cfg(tmp_path / "whole", strategy, key_dir)
    run_server(DyingGrid(client_app, 3, whole.to_flower()), whole)
    killed = _cfg(tmp_path / "killed", strategy, key_dir)
    grid = DyingGrid(client_app, 3, killed.to_flower())
    grid.die_at = 3
    with pytest.raises(ServerKilled):
        run_server(grid, killed)
    state = load_checkpoint(tmp_path / "killed").state
    assert len(state) > 0  # fedavg: the momentum; he-fedavg: the round-1 global (ciphertext)
    if strategy == "he-fedavg":
        assert state[wire.HE_CIPHERTEXT].stype == wire.HE_STYPE
    resumed = killed.replace(resume=True)
    run_server(DyingGrid(client_app, 3, resumed.to_flower()), resumed)
    if strategy == "he-fedavg":
        decrypt_model(tmp_path / "whole", key_dir)
        decrypt_model(tmp_path / "killed", key_dir)
    a, b = _state(tmp_path / "whole"), _state(tmp_path / "killed")
    if strategy == "fedavg":
        assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    else:
        assert _max_diff(a, b) <= 1e-5


def test_sealed_rounds_apply_the_server_momentum_like_fedavg_and_flowers_fedavgm(key_dir):
    """An app without the describe query (every he-fedavg round sealed in a second exchange:
    the institutions hold x_i, not w_i, until C is known): he-fedavg = fedavg = Flower's FedAvgM,
    except on a normalisation statistic, which fedavg and he-fedavg both average."""
    from tests.test_dropin import RUN_CONFIG, quickstart_app
    from tests.test_dropin import initial as dropin_initial

    def initial():
        return ArrayRecord({**dropin_initial(), "bn.running_var": Array(np.ones(3, np.float32))})

    config = {**RUN_CONFIG, "he-key-dir": str(key_dir)}
    kwargs = dict(fraction_train=1.0, min_available_nodes=3)
    opt = dict(server_momentum=BETA, server_lr=SERVER_LR)
    flower = FedAvgM(server_momentum=BETA, server_learning_rate=SERVER_LR, **kwargs).start(
        LoopbackGrid(quickstart_app(he=False), 3, config), initial(), num_rounds=3)
    plain = FedAvg(**kwargs, **opt).start(LoopbackGrid(quickstart_app(he=False), 3, config), initial(), num_rounds=3)
    momentum_free = FedAvg(**kwargs).start(LoopbackGrid(quickstart_app(he=False), 3, config), initial(),
                                           num_rounds=3)
    he_grid = LoopbackGrid(quickstart_app(he=True), 3, config)
    strategy = HEFedAvg.from_key_dir(key_dir, **kwargs, **opt)
    decrypted = strategy.encrypted_model(strategy.start(he_grid, initial(), num_rounds=3)).decrypt(key_dir)
    for name in ("w", "b", "bn.running_var"):
        np.testing.assert_allclose(decrypted[name].numpy(), plain.arrays[name].numpy(), rtol=0, atol=1e-5)
    for name in ("w", "b"):
        np.testing.assert_allclose(plain.arrays[name].numpy(), flower.arrays[name].numpy(), rtol=0, atol=1e-6)
    assert np.abs(plain.arrays["w"].numpy() - momentum_free.arrays["w"].numpy()).max() > 1e-2
    # the statistic is the plain average every round: as without a server optimiser
    np.testing.assert_allclose(plain.arrays["bn.running_var"].numpy(),
                               momentum_free.arrays["bn.running_var"].numpy(), rtol=0, atol=1e-6)
    assert np.abs(flower.arrays["bn.running_var"].numpy() - momentum_free.arrays["bn.running_var"].numpy()).max() > 1e-2
    seals = [m for m in he_grid.sent if next(iter(m.content.config_records.values()), {}).get(wire.HE_SEAL)]
    assert len(seals) == 3 * 3


def test_fedbn_local_layers_under_he_with_server_momentum_equal_fedavg(key_dir):
    """FedBN + FedAvgM, sealed rounds: he-fedavg with the normalisation arrays as ``local_keys``
    (never encrypted, the institutions apply the step to the rest) ends where fedavg does, and
    both keep the initial normalisation values; the previous global a train message carries
    holds no plaintext local arrays (the step does not use them)."""
    from tests.test_dropin import RUN_CONFIG, quickstart_app
    from tests.test_dropin import initial as dropin_initial

    local = ("bn.weight", "bn.running_var")

    def initial():
        return ArrayRecord({**dropin_initial(), "bn.weight": Array(np.full(3, 0.5, np.float32)),
                            "bn.running_var": Array(np.ones(3, np.float32))})

    config = {**RUN_CONFIG, "he-key-dir": str(key_dir)}
    kwargs = dict(fraction_train=1.0, min_available_nodes=3)
    opt = dict(server_momentum=BETA, server_lr=SERVER_LR)
    plain = FedAvg(**kwargs, **opt).start(LoopbackGrid(quickstart_app(he=False, fedbn=True), 3, config),
                                          initial(), num_rounds=3)
    momentum_free = FedAvg(**kwargs).start(LoopbackGrid(quickstart_app(he=False, fedbn=True), 3, config),
                                           initial(), num_rounds=3)
    he_grid = LoopbackGrid(quickstart_app(he=True, fedbn=True), 3, config)
    strategy = HEFedAvg.from_key_dir(key_dir, **kwargs, **opt, local_keys=local)
    decrypted = strategy.encrypted_model(strategy.start(he_grid, initial(), num_rounds=3)).decrypt(key_dir)
    assert list(decrypted.keys()) == list(initial().keys())
    for name in ("w", "b"):
        np.testing.assert_allclose(decrypted[name].numpy(), plain.arrays[name].numpy(), rtol=0, atol=1e-5)
    assert np.abs(plain.arrays["w"].numpy() - momentum_free.arrays["w"].numpy()).max() > 1e-2  # it acts
    for name in local:  # never aggregated, never stepped: the initial values in both
        assert np.array_equal(decrypted[name].numpy(), initial()[name].numpy())
        assert np.array_equal(plain.arrays[name].numpy(), initial()[name].numpy())
    previous = [m.content.array_records.get(wire.HE_PREVIOUS) for m in he_grid.sent
                if m.metadata.message_type == "train" and "arrays" in m.content.array_records]
    carried = [p for p in previous if p is not None]
    assert previous[:3] == [None] * 3 and len(carried) == 2 * 3 and wire.HE_CIPHERTEXT in carried[-1]
    assert all(name not in p for p in carried for name in local)
