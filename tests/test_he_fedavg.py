"""HE-FedAvg: equivalence with FedAvg, a key-less server, and bad replies that lose nothing."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from clients.client_app import app as client_app
from flower_focal import wire
from flower_focal.artifacts import decrypt_model
from flower_focal.cache import CACHE
from flower_focal.client.he_mod import decrypt_record, encrypt_record
from flower_focal.config import RunConfig
from flower_focal.crypto import Accumulator, CiphertextError, PublicContext, SecretContext, keygen
from flower_focal.flatten import ArrayLayout
from flower_focal.server import run_server
from flower_focal.strategy import build_strategy
from flower_focal.strategy.he_fedavg import HEFedAvg
from flower_focal.strategy.roster import Institution, InstitutionRoster
from flower_focal.testing import LoopbackGrid
from tests.conftest import make_reply


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("keys"), "compact")


def _run(tmp_path, strategy, key_dir, grid_hook=None, **overrides):
    cfg = RunConfig(
        strategy=strategy, num_server_rounds=3, num_samples=150, min_available_nodes=3,
        run_dir=str(tmp_path / strategy), he_key_dir=str(key_dir), model="lenet-sigmoid", lr=0.01,
        **overrides,
    )
    grid = LoopbackGrid(client_app, 3, cfg.to_flower())
    if grid_hook:
        grid_hook(grid)
    run_server(grid, cfg)
    return grid, tmp_path / strategy


def _state(run_dir):
    return torch.load(run_dir / "model.pt")


def test_he_fedavg_equals_fedavg_over_three_rounds(tmp_path, key_dir):
    _, plain = _run(tmp_path, "fedavg", key_dir)
    _, enc = _run(tmp_path, "he-fedavg", key_dir)
    assert not (enc / "model.pt").exists()  # the server never had a plaintext model
    decrypt_model(enc, key_dir)
    a, b = _state(plain), _state(enc)
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) <= 1e-5
    ma = json.loads((plain / "metrics.json").read_text())["rounds"]
    mb = json.loads((enc / "metrics.json").read_text())["rounds"]
    assert len(ma) == len(mb) == 3
    for ra, rb in zip(ma, mb):
        for key in ("loss", "accuracy", "auroc"):
            assert rb["evaluate"][key] == pytest.approx(ra["evaluate"][key], abs=1e-5)
        assert rb["train"]["train-loss"] == pytest.approx(ra["train"]["train-loss"], abs=1e-5)
        assert rb["bytes_up"] < 2 * ra["bytes_up"]  # compact preset: < 8 B/param vs 4 for float32


def test_fedprox_reaches_training_and_he_fedavg_equals_fedavg_with_it(tmp_path, key_dir):
    """FedProx is a client-side term: under HE the same update is encrypted, so the twins agree."""
    # 3 local steps (50 images, batch 32): the term's gradient is 0 at the first step only
    _, plain = _run(tmp_path / "mu0", "fedavg", key_dir, local_epochs=3)
    _, prox = _run(tmp_path / "mu", "fedavg", key_dir, local_epochs=3, fedprox_mu=5.0)
    _, enc = _run(tmp_path / "mu", "he-fedavg", key_dir, local_epochs=3, fedprox_mu=5.0)
    decrypt_model(enc, key_dir)
    a, b, c = _state(prox), _state(enc), _state(plain)
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) <= 1e-5
    assert max(float((a[k].double() - c[k].double()).abs().max()) for k in a) > 1e-3  # the term acts


def test_institutions_and_server_report_the_seconds_they_spend_on_he(tmp_path, key_dir):
    CACHE.clear("decrypted")
    _, enc = _run(tmp_path, "he-fedavg", key_dir)
    rounds = json.loads((enc / "metrics.json").read_text())["rounds"]
    assert len(rounds) == 3
    for r in rounds:
        t = r["timings"]
        assert t[wire.HE_SUM_S] >= t[wire.HE_SUM_CPU_S] * 0.5 > 0  # three uploads checked and added
        assert t[wire.HE_SERIALIZE_S] > 0 and t[wire.HE_SERIALIZE_CPU_S] > 0
        assert r["train"][wire.HE_ENCRYPT_S] > 0  # the weighted mean over institutions
        for m in r["train_institutions"].values():
            assert m[wire.HE_ENCRYPT_S] > 0 and m[wire.HE_ENCRYPT_CPU_S] > 0
    # Round 1 starts from the plaintext initial model: nothing to decrypt.
    assert all(m[wire.HE_DECRYPT_S] == 0.0 for m in rounds[0]["train_institutions"].values())
    # One process plays every institution here: the first evaluation of an aggregate decrypts
    # it, and every later use of it (the other evaluations, next round's training) reuses that
    # and costs less (what is left is rebuilding the arrays).
    for prev, r in zip(rounds, rounds[1:] + [None]):
        evaluated = sorted(m[wire.HE_DECRYPT_CPU_S] for m in prev["evaluate_institutions"].values())
        assert len(evaluated) == 3 and evaluated[-1] > evaluated[-2]
        if r is not None:
            assert all(m[wire.HE_DECRYPT_CPU_S] < evaluated[-1] for m in r["train_institutions"].values())


def test_server_sees_only_ciphertext_and_never_the_secret_key(tmp_path, key_dir):
    grid, run_dir = _run(tmp_path, "he-fedavg", key_dir)
    secret = (key_dir / "secret.ctx").read_bytes()
    probe = secret[len(secret) // 2 : len(secret) // 2 + 64]  # a slice of the key material
    assert probe not in (key_dir / "public.ctx").read_bytes()
    train_replies = [m for m in grid.received if m.metadata.message_type == "train" and not m.has_error()]
    assert len(train_replies) == 9
    for reply in grid.received:
        if reply.has_error():
            continue
        for record in reply.content.array_records.values():
            for name, arr in record.items():
                assert probe not in arr.data
                if reply.metadata.message_type == "train":
                    assert (name, arr.stype) == (wire.HE_CIPHERTEXT, wire.HE_STYPE)
    # later rounds send the model encrypted too; round 1 sends the public initial weights
    later = [m for m in grid.sent if m.metadata.message_type == "train"
             and m.content["config"]["server-round"] > 1]
    assert later and all(wire.HE_CIPHERTEXT in m.content["arrays"] for m in later)
    for path in run_dir.iterdir():
        assert probe not in path.read_bytes(), path


def test_server_context_is_public_and_cannot_decrypt(key_dir):
    public = PublicContext.load(key_dir / "public.ctx")
    assert not public.holds_secret_key
    assert not hasattr(public, "decrypt")
    with pytest.raises(ValueError, match="public context"):
        PublicContext.load(key_dir / "secret.ctx")
    with pytest.raises(ValueError, match="public context"):
        HEFedAvg(he_public=SecretContext.load(key_dir))  # a private context is refused
    strategy = build_strategy(RunConfig(strategy="he-fedavg", he_key_dir=str(key_dir)))
    assert isinstance(strategy, HEFedAvg) and not strategy.he_public.holds_secret_key


def test_he_fedavg_without_keys_says_how_to_make_them():
    with pytest.raises(ValueError, match="flower-focal keygen"):
        build_strategy(RunConfig(strategy="he-fedavg"))


# ---------------------------------------------------------------------------- bad replies
LAYOUT = ArrayLayout(names=("w", "b"), shapes=((3, 4), (4,)), dtypes=("float32", "float32"))


def _plain(rng):
    return ArrayRecord({"w": Array(rng.normal(size=(3, 4)).astype(np.float32)),
                        "b": Array(rng.normal(size=4).astype(np.float32))})


def test_layout_flattens_mixed_dtypes_like_concatenate_and_restores_them():
    rng = np.random.default_rng(3)
    record = ArrayRecord({"conv": Array(rng.normal(size=(2, 3, 3)).astype(np.float32)),
                          "bn.num_batches_tracked": Array(np.array(7, dtype=np.int64)),
                          "bias": Array(rng.normal(size=5))})
    layout = ArrayLayout.of(record)
    flat = layout.flatten(record)
    want = np.concatenate([a.numpy().astype(np.float64).ravel() for a in record.values()])
    assert flat.dtype == np.float64 and np.array_equal(flat, want)
    back = layout.unflatten(flat)
    for name, arr in record.items():
        assert back[name].numpy().dtype == arr.numpy().dtype
        assert np.array_equal(back[name].numpy(), arr.numpy())
    with pytest.raises(ValueError, match="shape"):
        layout.flatten(ArrayRecord({**dict(record.items()), "bias": Array(np.zeros(4))}))


LOCAL = ("bn.weight", "bn.num_batches_tracked")  # what FedBN keeps at the institutions


def _model_with_norm(rng) -> ArrayRecord:
    return ArrayRecord({"conv": Array(rng.normal(size=(2, 3)).astype(np.float32)),
                        "bn.weight": Array(rng.normal(size=2).astype(np.float32)),
                        "bn.num_batches_tracked": Array(np.array([3], dtype=np.int64)),
                        "fc": Array(rng.normal(size=4).astype(np.float32))})


def test_a_layout_leaves_its_local_arrays_out_of_the_vector_and_merges_them_back_in_order():
    record = _model_with_norm(np.random.default_rng(7))
    layout = ArrayLayout.of(record, local=reversed(LOCAL))  # kept in the model's order
    assert layout.names == ("conv", "fc") and layout.local == LOCAL and layout.local_index == (1, 2)
    assert layout.size == 6 + 4 and layout.full_names == tuple(record.keys())
    flat = layout.flatten(record)  # the local arrays are ignored ...
    want = np.concatenate([record["conv"].numpy().ravel(), record["fc"].numpy()]).astype(np.float64)
    assert np.array_equal(flat, want)
    assert np.array_equal(layout.flatten(ArrayRecord({k: record[k] for k in ("conv", "fc")})), flat)  # ... or absent
    merged = layout.merge(layout.unflatten(flat), record)
    assert list(merged.keys()) == list(record.keys())  # the model's original order
    for name, arr in record.items():
        assert merged[name].numpy().dtype == arr.numpy().dtype and np.array_equal(merged[name].numpy(), arr.numpy())
    # travels in the message config; a layout without local arrays writes the config as before
    config = ConfigRecord()
    layout.to_config(config)
    assert ArrayLayout.from_config(config) == layout
    old = ConfigRecord()
    ArrayLayout.of(record).to_config(old)
    assert sorted(old.keys()) == ["layout-dtypes", "layout-names", "layout-shapes"]
    assert ArrayLayout.from_config(old) == ArrayLayout.of(record) and ArrayLayout.from_config(old).local == ()
    assert ArrayLayout.from_json(layout.to_json()) == layout
    assert ArrayLayout.from_json({k: v for k, v in layout.to_json().items() if "local" not in k}).local == ()
    # anything else is refused, named
    with pytest.raises(ValueError, match=r"not in the layout: \['extra'\]"):
        layout.flatten(ArrayRecord({**dict(record.items()), "extra": Array(np.zeros(1))}))
    with pytest.raises(ValueError, match=r"missing: \['fc'\]"):
        layout.flatten(ArrayRecord({k: record[k] for k in ("conv", "bn.weight")}))
    with pytest.raises(ValueError, match=r"\['bn.bias'\]"):
        ArrayLayout.of(record, local=("bn.bias", "bn.weight"))
    with pytest.raises(ValueError, match="bn.weight"):
        layout.merge(layout.unflatten(flat), ArrayRecord({"bn.num_batches_tracked": record["bn.num_batches_tracked"]}))


def test_local_keys_stay_out_of_the_uploads_and_travel_in_plaintext_next_to_the_ciphertext(key_dir, tmp_path):
    """HEFedAvg(local_keys=...) on a drop-in FedBN app (its train replies the received values
    of the local arrays): uploads are ciphertexts of the other arrays only, every later message
    carries the local arrays' initial values in plaintext, and the final model decrypts to a
    complete one. An app that trains the local arrays is refused by the mod, naming them (their
    trained values would otherwise be dropped without a word)."""
    from flower_focal.crypto.envelope import EnvelopeLayout
    from flower_focal.encrypted_model import EncryptedModel, local_path
    from flower_focal.models import build_model, norm_keys
    from tests.test_dropin import RUN_CONFIG, quickstart_app

    # the project's wiring: fedbn=true makes the model's normalisation layers local (names only:
    # the same for any data shape; the global random state is left alone)
    rng_state = torch.get_rng_state()
    fedbn = build_strategy(RunConfig(strategy="he-fedavg", he_key_dir=str(key_dir), fedbn=True, model="small-cnn"))
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert fedbn.local_keys == tuple(norm_keys(build_model("small-cnn", 1, 9, 28))) and len(fedbn.local_keys) == 20
    assert build_strategy(RunConfig(strategy="he-fedavg", he_key_dir=str(key_dir), model="small-cnn")).local_keys == ()
    init = _model_with_norm(np.random.default_rng(8))
    with pytest.raises(ValueError, match=r"local_keys .*\['bn.bias'\]"):
        HEFedAvg.from_key_dir(key_dir, local_keys=["bn.bias", "bn.weight"]).bind_initial_model(init)
    with pytest.raises(ValueError, match="every array"):
        HEFedAvg.from_key_dir(key_dir, local_keys=list(init.keys())).bind_initial_model(init)
    trains_them = LoopbackGrid(quickstart_app(he=True), 3, {**RUN_CONFIG, "he-key-dir": str(key_dir)})
    strategy = HEFedAvg.from_key_dir(key_dir, fraction_train=1.0, min_available_nodes=3, local_keys=LOCAL)
    from flower_focal.strategy.recorder import NothingAggregated

    with pytest.raises(NothingAggregated):  # the reason is in every train reply
        strategy.start(trains_them, init, num_rounds=1)
    failed = [r for r in trains_them.received if r.metadata.message_type == "train"]
    assert len(failed) == 3 and all(r.has_error() for r in failed)
    assert all("local_keys" in r.error.reason and "bn.weight" in r.error.reason for r in failed)
    grid = LoopbackGrid(quickstart_app(he=True, fedbn=True), 3, {**RUN_CONFIG, "he-key-dir": str(key_dir)})
    strategy = HEFedAvg.from_key_dir(key_dir, fraction_train=1.0, min_available_nodes=3, local_keys=LOCAL)
    result = strategy.start(grid, init, num_rounds=2)
    fingerprint = PublicContext.load(key_dir).fingerprint
    uploads = [r.content["arrays"] for r in grid.received if r.has_content() and "arrays" in r.content.array_records]
    assert len(uploads) == 2 * 3
    for upload in uploads:  # one ciphertext of conv + fc: the local arrays never leave, not even encrypted
        assert list(upload.keys()) == [wire.HE_CIPHERTEXT]
        assert EnvelopeLayout.parse(upload[wire.HE_CIPHERTEXT].data, fingerprint).length == 6 + 4
    encrypted = [m for m in grid.sent if wire.HE_CIPHERTEXT in m.content.array_records.get("arrays", {})]
    assert {m.metadata.message_type for m in encrypted} == {"train", "evaluate"}
    for message in encrypted:
        assert ArrayLayout.from_config(message.content["config"]).local == LOCAL
        for name in LOCAL:
            arr = message.content["arrays"][name]
            assert arr.stype != wire.HE_STYPE and np.array_equal(arr.numpy(), init[name].numpy())
    final = strategy.encrypted_model(result)
    model = final.decrypt(key_dir)
    assert list(model.keys()) == list(init.keys())
    for name in LOCAL:  # the initial values, exactly (the institutions trained theirs: not aggregated)
        assert np.array_equal(model[name].numpy(), init[name].numpy())
    assert np.abs(model["fc"].numpy() - init["fc"].numpy()).max() > 0.1  # the rest trained
    # saved with the local arrays beside the ciphertext; without that file it says so
    path = final.save(tmp_path / "final.he")
    again = EncryptedModel.load(path).decrypt(key_dir)
    assert all(np.array_equal(again[k].numpy(), model[k].numpy()) for k in LOCAL)
    np.testing.assert_allclose(again["conv"].numpy(), model["conv"].numpy(), rtol=0, atol=1e-6)
    local_path(path).unlink()
    with pytest.raises(FileNotFoundError, match="final.he.local.npz"):
        EncryptedModel.load(path)
    # a file written before layouts had local arrays (everything encrypted) still loads
    full = ArrayLayout.of(init)
    old = EncryptedModel(encrypt_record(init, SecretContext.load(key_dir), full, 1.0)[wire.HE_CIPHERTEXT].data,
                         (1.0, 1.0), full).save(tmp_path / "old.he")
    assert "local" not in json.loads((tmp_path / "old.he.json").read_text())["layout"]
    assert not local_path(old).exists()
    back = EncryptedModel.load(old).decrypt(key_dir)
    np.testing.assert_allclose(back["fc"].numpy(), init["fc"].numpy(), rtol=0, atol=1e-6)
    assert back["bn.num_batches_tracked"].numpy().tolist() == [3]


def _enc_reply(node, record, n, he_secret, norm):
    arrays = encrypt_record(record, he_secret, LAYOUT, weight=n / norm)
    return make_reply(node, RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})}))


def test_malformed_foreign_and_plaintext_replies_are_excluded_and_the_rest_aggregate_exactly(key_dir, tmp_path):
    he_secret = SecretContext.load(key_dir)
    other = SecretContext.load(keygen(tmp_path / "other", "compact"))
    rng = np.random.default_rng(0)
    roster = InstitutionRoster()
    for pid in range(7):
        roster.register(Institution(node_id=100 + pid, partition_id=pid, num_classes=2, in_channels=1, num_train=50))
    strategy = HEFedAvg(he_public=PublicContext.load(key_dir), roster=roster)
    config = ConfigRecord()
    strategy._he_config(_plain(rng), config)  # layout of the round-1 model
    strategy._layout = LAYOUT
    strategy._weight_norm = norm = 350.0
    good = [(_plain(rng), n) for n in (20, 50, 80)]
    replies = [_enc_reply(100 + i, rec, n, he_secret, norm) for i, (rec, n) in enumerate(good)]
    truncated = _enc_reply(103, _plain(rng), 40, he_secret, norm)
    blob = truncated.content["arrays"][wire.HE_CIPHERTEXT]
    truncated.content["arrays"] = ArrayRecord({wire.HE_CIPHERTEXT: Array(
        dtype="float64", shape=blob.shape, stype=wire.HE_STYPE, data=blob.data[: len(blob.data) // 2])})
    foreign = _enc_reply(104, _plain(rng), 40, other, norm)
    plaintext = make_reply(105, RecordDict({"arrays": _plain(rng), "metrics": MetricRecord({"num-examples": 40})}))
    arrays, metrics = strategy.aggregate_train(1, replies + [truncated, foreign, plaintext])
    decrypted = decrypt_record(arrays, he_secret, LAYOUT)
    total = sum(n for _, n in good)
    for name in LAYOUT.names:
        expected = sum(n * rec[name].numpy().astype(np.float64) for rec, n in good) / total
        np.testing.assert_allclose(decrypted[name].numpy(), expected, atol=1e-6)
    assert metrics["num-examples"] == total
    failures = strategy.history.rounds[0].failures
    assert len(failures) == 3 and all("rejected" in f for f in failures)
    assert sorted(strategy.history.rounds[0].train_institutions) == [0, 1, 2]


def test_replies_whose_examples_exceed_the_weight_normaliser_are_left_out(key_dir):
    """Weights n_i / C must sum to <= 1 for the preset's range to bound the encrypted sum."""
    he_secret = SecretContext.load(key_dir)
    rng = np.random.default_rng(4)
    roster = InstitutionRoster()
    for pid in range(4):
        roster.register(Institution(node_id=100 + pid, partition_id=pid, num_classes=2, in_channels=1, num_train=50))
    strategy = HEFedAvg(he_public=PublicContext.load(key_dir), roster=roster)
    strategy._layout = LAYOUT
    strategy._weight_norm = norm = 150.0
    good = [(_plain(rng), n) for n in (20, 50, 80)]  # exactly C
    replies = [_enc_reply(100 + i, rec, n, he_secret, norm) for i, (rec, n) in enumerate(good)]
    extra = _enc_reply(103, _plain(rng), 40, he_secret, norm)  # reports more than C allows
    arrays, metrics = strategy.aggregate_train(1, replies + [extra])
    decrypted = decrypt_record(arrays, he_secret, LAYOUT)
    for name in LAYOUT.names:
        expected = sum(n * rec[name].numpy().astype(np.float64) for rec, n in good) / 150.0
        np.testing.assert_allclose(decrypted[name].numpy(), expected, atol=1e-6)
    assert metrics["num-examples"] == 150
    (failure,) = strategy.history.rounds[0].failures
    assert "institution 3" in failure and "more than C = 150" in failure


def test_an_aggregate_is_decrypted_once_per_process_and_callers_get_independent_arrays(key_dir, tmp_path, monkeypatch):
    he_secret, other = SecretContext.load(key_dir), SecretContext.load(keygen(tmp_path / "other", "compact"))
    rng = np.random.default_rng(3)
    rec = _plain(rng)

    def aggregate(record, weights):
        enc = encrypt_record(record, he_secret, LAYOUT, weight=1.0)
        return ArrayRecord({**dict(enc.items()), wire.HE_WEIGHTS: Array(np.array(weights, dtype=np.float64))})

    calls = []
    real = SecretContext.decrypt
    monkeypatch.setattr(SecretContext, "decrypt", lambda self, v: calls.append(1) or real(self, v))
    CACHE.clear("decrypted")
    agg = aggregate(rec, [2.0, 1.0])
    first = decrypt_record(agg, he_secret, LAYOUT)
    first["w"].numpy()[...] = 0.0  # a handler that trains in place must not change the next caller's copy
    again = decrypt_record(agg, he_secret, LAYOUT)
    stats = CACHE.stats("decrypted")
    assert len(calls) == 1 and (stats["hits"], stats["misses"], stats["entries"]) == (1, 1, 1)
    np.testing.assert_allclose(again["w"].numpy(), 2.0 * rec["w"].numpy(), atol=1e-6)
    # The same key, [C, W], length and ends, one byte changed inside: decrypted (and refused),
    # never served the cached model
    tampered = bytearray(agg[wire.HE_CIPHERTEXT].data)
    tampered[len(tampered) // 2] ^= 1
    with pytest.raises(CiphertextError, match="checksum mismatch"):
        decrypt_record(ArrayRecord({wire.HE_CIPHERTEXT: wire.he_array(bytes(tampered)),
                                    wire.HE_WEIGHTS: agg[wire.HE_WEIGHTS]}), he_secret, LAYOUT)
    assert len(calls) == 2 and CACHE.stats("decrypted")["hits"] == 1
    # Other weights, another ciphertext or another key: decrypted afresh, never served stale.
    np.testing.assert_allclose(decrypt_record(aggregate(rec, [1.0, 1.0]), he_secret, LAYOUT)["b"].numpy(),
                               rec["b"].numpy(), atol=1e-6)
    other_rec = _plain(rng)
    np.testing.assert_allclose(decrypt_record(aggregate(other_rec, [1.0, 1.0]), he_secret, LAYOUT)["w"].numpy(),
                               other_rec["w"].numpy(), atol=1e-6)
    assert len(calls) == 4
    with pytest.raises(Exception, match="(?i)key|fingerprint"):
        decrypt_record(agg, other, LAYOUT)
    with pytest.raises(ValueError, match="invalid weights"):
        decrypt_record(aggregate(rec, [1.0, 0.0]), he_secret, LAYOUT)


def test_with_server_momentum_every_global_is_decrypted_once_per_process(key_dir, monkeypatch):
    """Under he-fedavg with server momentum a train message asks for the current global and the
    previous one, an evaluate message for the next: each ciphertext is decrypted once per process,
    round after round (the two that are asked for stay in the cache whatever its budget)."""
    from flower_focal.client import he_mod

    he_secret = SecretContext.load(key_dir)
    rng = np.random.default_rng(4)

    def aggregate():
        enc = encrypt_record(_plain(rng), he_secret, LAYOUT, weight=1.0)
        return ArrayRecord({**dict(enc.items()), wire.HE_WEIGHTS: Array(np.array([1.0, 1.0]))})

    calls = []
    real = SecretContext.decrypt
    monkeypatch.setattr(SecretContext, "decrypt", lambda self, v: calls.append(1) or real(self, v))
    monkeypatch.setattr(he_mod, "_KEEP_DECRYPTED", 1)  # a fresh process
    monkeypatch.setenv("FLOWER_FOCAL_DECRYPT_CACHE_MB", "0")
    CACHE.clear("decrypted")
    config = ConfigRecord({wire.HE_SERVER_MOMENTUM: 0.9, wire.HE_SERVER_LR: 1.0})
    globals_ = [aggregate() for _ in range(5)]
    for r in range(1, 5):  # round r: evaluate the new global, then two institutions train from it
        current, previous = globals_[r], globals_[r - 1]
        decrypt_record(current, he_secret, LAYOUT)  # evaluate (no server-momentum config)
        for _ in range(2):
            decrypt_record(current, he_secret, LAYOUT)  # what he_fedavg_mod does for train ...
            he_mod._server_step(config, current, previous, he_secret, LAYOUT)  # ... then the step
    assert len(calls) == 5  # g0 .. g4, once each (before the fix: g1, g2, g3 twice)
    CACHE.clear("decrypted")


def test_replies_added_on_arrival_give_the_same_sum_bytes_and_failures_as_adding_at_the_end(key_dir, tmp_path):
    """The streaming path (PromptGrid's reply hook) in any arrival order == the batch path."""
    he_secret = SecretContext.load(key_dir)
    other = SecretContext.load(keygen(tmp_path / "other", "compact"))
    rng = np.random.default_rng(5)
    good = [(_plain(rng), n) for n in (20, 50, 80, 10)]

    sent = [_enc_reply(100 + i, rec, n, he_secret, 350.0) for i, (rec, n) in enumerate(good)]
    sent.append(_enc_reply(104, good[0][0], 40, other, 350.0))  # foreign key: rejected

    def replies():  # the same ciphertexts for both paths
        return copy.deepcopy(sent)

    def strategy():
        roster = InstitutionRoster()
        for pid in range(5):
            roster.register(Institution(node_id=100 + pid, partition_id=pid, num_classes=2, in_channels=1,
                                        num_train=50))
        s = HEFedAvg(he_public=PublicContext.load(key_dir), roster=roster)
        s._layout, s._weight_norm = LAYOUT, 350.0
        return s

    batch = strategy()
    arrays_b, metrics_b = batch.aggregate_train(1, replies())

    stream = strategy()
    from flower_focal.crypto import Accumulator
    from flower_focal.strategy.he_fedavg import _RoundSum
    stream._sum = _RoundSum(Accumulator(stream.he_public))
    arrived = [stream.on_reply(r) for r in reversed(replies())]  # what PromptGrid does, other order
    assert sum(wire.HE_CIPHERTEXT not in r.content.array_records.get("arrays", {}) for r in arrived) == 4
    arrays_s, metrics_s = stream.aggregate_train(1, arrived)

    assert arrays_s[wire.HE_CIPHERTEXT].data == arrays_b[wire.HE_CIPHERTEXT].data  # exact modular sums
    np.testing.assert_array_equal(arrays_s[wire.HE_WEIGHTS].numpy(), [350.0, 160.0])
    assert dict(metrics_s) == dict(metrics_b)
    rb, rs = batch.history.rounds[0], stream.history.rounds[0]
    assert rs.bytes_up == rb.bytes_up > 0 and rs.failures == rb.failures and len(rs.failures) == 1
    assert sorted(rs.train_institutions) == sorted(rb.train_institutions) == [0, 1, 2, 3]
    out = LAYOUT.flatten(decrypt_record(arrays_s, he_secret, LAYOUT))
    expected = sum(n * LAYOUT.flatten(rec) for rec, n in good) / 160.0
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_nan_update_is_refused_before_encryption(key_dir):
    he_secret = SecretContext.load(key_dir)
    bad = ArrayRecord({"w": Array(np.full((3, 4), np.nan, np.float32)), "b": Array(np.zeros(4, np.float32))})
    with pytest.raises(ValueError, match="NaN/Inf"):
        encrypt_record(bad, he_secret, LAYOUT, weight=0.5)


def test_a_model_beyond_the_range_is_refused_even_when_its_weighted_values_fit(key_dir):
    """The aggregate of same-valued models is that value, so the unweighted model must fit."""
    he_secret = SecretContext.load(key_dir)
    bound = he_secret.preset.max_abs_value
    var = np.ones(4, np.float32)
    var[2] = 1.5 * bound  # like a BatchNorm running_var after some epochs
    rec = ArrayRecord({"w": Array(np.zeros((3, 4), np.float32)), "b": Array(var)})
    with pytest.raises(ValueError) as err:  # weighted: 0.15 x bound, which one upload holds
        encrypt_record(rec, he_secret, LAYOUT, weight=0.1)
    msg = str(err.value)
    assert f"+-{bound:g}" in msg and "'compact'" in msg
    assert f"1 array(s): b (max |value| {1.5 * bound:.4g})" in msg
    assert "nvflare" in msg and "compact (" not in msg  # only presets that hold 1.5 x bound
    # (ten such institutions would have summed to 1.5 x bound: garbage). At the bound itself,
    # ten institutions whose weights sum to 1 aggregate to the value, decrypted correctly.
    var[2] = bound
    rec = ArrayRecord({"w": Array(np.zeros((3, 4), np.float32)), "b": Array(var)})
    acc = Accumulator(PublicContext.load(key_dir))
    for _ in range(10):
        acc.add(encrypt_record(rec, he_secret, LAYOUT, weight=0.1)[wire.HE_CIPHERTEXT].data)
    total = he_secret.decrypt(acc.to_bytes())
    np.testing.assert_allclose(total[12:], var, rtol=1e-6)


def test_a_pretrained_model_fits_the_default_range_and_round_trips(key_dir):
    """ImageNet BatchNorm running variances (EfficientNet-Lite0: up to ~566) fit ``compact``."""
    from flower_focal.models.backbones import packaged_efficientnet_lite0_weights

    state = torch.load(packaged_efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    rec = ArrayRecord({k: Array(v.numpy()) for k, v in state.items() if v.is_floating_point()})
    layout = ArrayLayout.of(rec)
    flat = layout.flatten(rec)
    assert 128 < np.abs(flat).max() <= 8192  # beyond the former 46-bit compact's +-128
    he_secret = SecretContext.load(key_dir)
    enc = encrypt_record(rec, he_secret, layout, weight=1.0)
    out = he_secret.decrypt(enc[wire.HE_CIPHERTEXT].data)
    assert np.abs(out - flat).max() <= 1e-6 * np.abs(flat).max()


def test_clip_before_encrypt_bounds_the_update(key_dir):
    he_secret = SecretContext.load(key_dir)
    rng = np.random.default_rng(1)
    ref, local = _plain(rng), _plain(rng)
    enc = encrypt_record(local, he_secret, LAYOUT, weight=1.0, reference=ref, clip_norm=0.1)
    enc = ArrayRecord({**{k: v for k, v in enc.items()}, wire.HE_WEIGHTS: Array(np.array([1.0, 1.0]))})
    out = LAYOUT.flatten(decrypt_record(enc, he_secret, LAYOUT))
    assert np.linalg.norm(out - LAYOUT.flatten(ref)) == pytest.approx(0.1, rel=1e-4)


def test_an_institution_that_crashes_mid_run_is_left_out_with_exact_weights(tmp_path, key_dir):
    def crash_third_node_from_round_2(grid):
        grid.crash_from_round[grid.node_ids[2]] = 2

    _, run_dir = _run(tmp_path, "he-fedavg", key_dir, grid_hook=crash_third_node_from_round_2)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [len(r["train_institutions"]) for r in rounds] == [3, 2, 2]
    assert all(r["failures"] for r in rounds[1:])
    assert rounds[-1]["evaluate"]["num-examples"] > 0
    decrypt_model(run_dir, key_dir)  # the [C, W] weights travelled with the aggregate
    assert (run_dir / "model.pt").is_file()
