"""FOCAL split training: HE/plaintext parity, sanity vs scikit-learn, key custody, failures."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from flower_focal.crypto import CiphertextError, PublicContext, SecretContext, get_preset
from flower_focal.crypto.ckks import CkksEvaluator, CkksKeyHolder
from flower_focal.focal import (
    MOMENTUM,
    STEP_SCALE,
    FocalDiverged,
    FocalLayout,
    LossGuard,
    balanced_class_weights,
    encrypt_feature_moments,
    feature_standardization,
    fold_standardization,
    moment_count,
    server_sum,
    decrypt_head,
    encrypt_embeddings,
    init_head,
    institution_error,
    predict_logits,
    server_add_embeddings,
    server_backward_update,
    server_export_head,
    server_forward,
    server_restore,
    server_setup,
    server_snapshot,
    softmax,
)
from flower_focal.testing import InstitutionEmbeddings, train_encrypted, train_plaintext
from flower_focal.focal.errors import LogitOverflow
from flower_focal.focal.packing import with_bias

D, K = 48, 5


def _data(seed: int, sizes: tuple[int, ...], d: int = D, k: int = K, sep: float = 0.35):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, sep, (k, d))

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, k, n)
        return means[y] + rng.normal(0, 1, (n, d)), y

    insts = [InstitutionEmbeddings(f"h{i}", *make(n)) for i, n in enumerate(sizes)]
    return insts, make(1500)


def _auroc_acc(head: np.ndarray, lay: FocalLayout, test: tuple[np.ndarray, np.ndarray]):
    x, y = test
    p = softmax(predict_logits(head, lay, x))
    return roc_auc_score(y, p, multi_class="ovr", average="macro"), int((p.argmax(1) == y).sum())


@pytest.fixture(scope="module")
def secret() -> SecretContext:
    return SecretContext.generate("focal")


@pytest.fixture(scope="module")
def data():
    return _data(0, (70, 130, 45))


def test_he_matches_plaintext_twin(secret: SecretContext, data) -> None:
    insts, test = data
    he = train_encrypted(insts, K, secret=secret, epochs=15, lr=1.0, init_seed=3)
    pl = train_plaintext(insts, K, epochs=15, lr=1.0, init_seed=3)
    lay = FocalLayout(D, K)
    (auc_he, acc_he), (auc_pl, acc_pl) = _auroc_acc(he.head, lay, test), _auroc_acc(pl.head, lay, test)
    dw = float(np.abs(he.head - pl.head).max())
    print(f"parity: max|dW|={dw:.2e} auroc {auc_he:.5f}/{auc_pl:.5f} acc {acc_he}/{acc_pl}")
    assert dw < 2e-4
    assert abs(auc_he - auc_pl) < 0.002 and abs(acc_he - acc_pl) <= 1
    assert [round(h["loss"], 3) for h in he.history] == [round(h["loss"], 3) for h in pl.history]


def test_twin_is_plain_gradient_descent_and_approaches_sklearn() -> None:
    insts, test = _data(5, (300, 450, 250))
    x = np.vstack([i.x for i in insts])
    y = np.concatenate([i.y for i in insts])
    cw = balanced_class_weights(np.bincount(y, minlength=K))
    pl = train_plaintext(insts, K, epochs=10, lr=0.7, class_weights=cw, block=32,
                         standardize=False, momentum=0.0, guard=False)
    # the same algorithm written as matrix maths
    x1, w = np.hstack([x, np.ones((len(y), 1))]), np.zeros((D + 1, K))
    for _ in range(10):
        w -= 0.7 * x1.T @ (cw[y][:, None] * (softmax(x1 @ w) - np.eye(K)[y])) / len(y)
    np.testing.assert_allclose(pl.head, w, atol=1e-12)
    long = train_plaintext(insts, K, epochs=400, lr=1.0, standardize=False, momentum=0.0, guard=False)
    ref = LogisticRegression(C=1e4, max_iter=5000).fit(x, y)
    p_ref = ref.predict_proba(test[0])
    auc_ref = roc_auc_score(test[1], p_ref, multi_class="ovr", average="macro")
    auc, _ = _auroc_acc(long.head, FocalLayout(D, K), test)
    print(f"twin auroc {auc:.4f} vs sklearn {auc_ref:.4f}")
    assert abs(auc - auc_ref) < 0.01


def test_constant_depth_over_many_steps(secret: SecretContext) -> None:
    insts, _ = _data(1, (40, 25), d=12, k=3)
    he = train_encrypted(insts, 3, secret=secret, epochs=30, lr=0.5)
    pl = train_plaintext(insts, 3, epochs=30, lr=0.5)
    dw = float(np.abs(he.head - pl.head).max())
    print(f"30 steps: max|dW|={dw:.2e}")
    assert dw < 5e-4 and np.all(np.isfinite(he.head))


def test_dropout_leaves_institution_out_of_that_step(secret: SecretContext, data) -> None:
    insts, _ = data
    absent = {1: {"h1"}, 2: {"h0", "h2"}}
    he = train_encrypted(insts, K, secret=secret, epochs=4, lr=1.0, absent=absent)
    pl = train_plaintext(insts, K, epochs=4, lr=1.0, absent=absent)
    full = train_plaintext(insts, K, epochs=4, lr=1.0)
    assert [h["present"] for h in he.history] == [3.0, 2.0, 1.0, 3.0]
    assert np.abs(he.head - pl.head).max() < 1e-4
    assert np.abs(pl.head - full.head).max() > 1e-3


def test_server_holds_no_secret_key(secret: SecretContext) -> None:
    public = PublicContext.from_bytes(secret.public_bytes())
    assert not public.holds_secret_key and set(public.eval_keys) == {"galois", "relin"}
    ev = CkksEvaluator(public)
    assert not ev.holds_secret_key
    assert not hasattr(ev, "decrypt") and not hasattr(ev, "encrypt")
    assert "decryptor" not in ev._objs and "encryptor" not in ev._objs
    with pytest.raises(ValueError, match="secret key"):
        SecretContext.from_bytes(secret.public_bytes())
    with pytest.raises(ValueError):
        CkksEvaluator(secret)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CkksKeyHolder(public)  # type: ignore[arg-type]
    # only the Galois keys of the listed steps: a layout needing others is refused
    lay = FocalLayout(8, 2, block=512)
    holder = CkksKeyHolder(secret)
    with pytest.raises(ValueError, match="rotations"):
        server_setup(ev, lay, init_head(holder, lay))


def _setup(secret: SecretContext, insts: list[InstitutionEmbeddings], lay: FocalLayout):
    holder, ev = CkksKeyHolder(secret), CkksEvaluator(secret.public_context())
    server = server_setup(ev, lay, init_head(holder, lay))
    for inst in insts:
        server_add_embeddings(server, inst.name, encrypt_embeddings(holder, lay, inst.x))
    return holder, server


def test_bad_inputs_and_malformed_ciphertexts(secret: SecretContext) -> None:
    insts, _ = _data(2, (20, 30), d=6, k=3)
    lay = FocalLayout(6, 3)
    holder, server = _setup(secret, insts, lay)
    with pytest.raises(ValueError, match="dimension"):
        encrypt_embeddings(holder, lay, np.zeros((4, 7)))
    with pytest.raises(ValueError, match="NaN"):
        encrypt_embeddings(holder, lay, np.full((4, 6), np.nan))
    logits = server_forward(server, "h0")
    for bad in (np.array([0, 1, 3] + [0] * 17), np.array([-1] + [0] * 19), np.full(20, 0.5)):
        with pytest.raises(ValueError, match="labels"):
            institution_error(holder, lay, logits, bad, lr=0.1, n_total=50)
    with pytest.raises(ValueError, match="one label per sample"):
        institution_error(holder, lay, logits, insts[0].y[:, None], lr=0.1, n_total=50)
    with pytest.raises(CiphertextError, match="expected 4"):  # 70 labels: 2 chunks, not 1
        institution_error(holder, lay, logits, np.zeros(70, int), lr=0.1, n_total=100)
    # truncated / foreign / wrong role uploads
    up = encrypt_embeddings(holder, lay, insts[0].x)
    with pytest.raises(CiphertextError, match="truncated"):
        server_add_embeddings(server, "h9", up[:-100])
    other = CkksKeyHolder(SecretContext.generate("focal"))
    with pytest.raises(CiphertextError, match="different key"):
        server_add_embeddings(server, "h9", encrypt_embeddings(other, lay, insts[0].x))
    with pytest.raises(CiphertextError, match="role"):  # the head's level, not an upload's
        server_add_embeddings(server, "h9", init_head(holder, lay))
    with pytest.raises(CiphertextError, match="different key"):
        institution_error(holder, lay, encrypt_embeddings(other, lay, insts[0].x), insts[0].y,
                          lr=0.1, n_total=50)
    assert "h9" not in server.chunks
    # a bad error upload changes nothing; retrying without it works
    before = decrypt_head(holder, lay, server_export_head(server))
    good = institution_error(holder, lay, logits, insts[0].y, lr=0.5, n_total=50).message
    bad = bytearray(good)
    bad[-10] ^= 0xFF
    with pytest.raises(CiphertextError, match="'h1'"):
        server_backward_update(server, {"h0": good, "h1": bytes(bad)})
    with pytest.raises(CiphertextError, match="'h1'.*role"):  # valid envelope, wrong level
        server_backward_update(server, {"h0": good, "h1": init_head(holder, lay)})
    with pytest.raises(ValueError, match="unknown institution"):
        server_backward_update(server, {"zz": good})
    np.testing.assert_array_equal(decrypt_head(holder, lay, server_export_head(server)), before)
    server_backward_update(server, {"h0": good})
    assert np.abs(decrypt_head(holder, lay, server_export_head(server)) - before).max() > 1e-3


def test_out_of_range_logits_are_refused(secret: SecretContext) -> None:
    insts, _ = _data(3, (10,), d=4, k=2)
    lay = FocalLayout(4, 2)
    holder, server = _setup(secret, [InstitutionEmbeddings("a", insts[0].x * 500, insts[0].y)], lay)
    with pytest.raises(ValueError, match="safe range"):
        for _ in range(5):
            up = institution_error(holder, lay, server_forward(server, "a"), insts[0].y,
                                   lr=50.0, n_total=10)
            server_backward_update(server, {"a": up.message})


def test_workers_2_matches_workers_1(secret: SecretContext) -> None:
    insts, _ = _data(4, (30, 50), d=10, k=4)
    two = train_encrypted(insts, 4, secret=secret, epochs=3, lr=1.0, workers=2)
    pl = train_plaintext(insts, 4, epochs=3, lr=1.0)
    assert np.abs(two.head - pl.head).max() < 1e-4


def test_focal_preset_is_128_bit_and_needs_two_data_primes() -> None:
    p = get_preset("focal")
    assert p.total_coeff_bits == 160 <= 218 and p.data_primes == 2
    assert p.galois_steps == tuple(2**i for i in range(4, 12))
    with pytest.raises(ValueError, match="galois_steps"):
        dataclasses.replace(p, name="x", wire_id=250, eval_keys=("relin",)).validate()
    with pytest.raises(ValueError, match="two data primes"):
        CkksKeyHolder(SecretContext.generate("compact"))


def test_twin_defaults_are_standardised_nesterov_with_the_derived_step() -> None:
    """The defaults, written as matrix maths: global standardisation, step 4K/(d+1), Nesterov
    0.5 with the velocity held per institution, guard (never triggered here), folded head."""
    insts, _ = _data(7, (60, 90, 40))
    x = np.vstack([i.x for i in insts])
    y = np.concatenate([i.y for i in insts])
    pl = train_plaintext(insts, K, epochs=12, init_seed=1)
    mu, sd = x.mean(0), x.std(0)
    z1 = np.hstack([(x - mu) / sd, np.ones((len(y), 1))])
    lr = STEP_SCALE * K / (D + 1)
    w = np.random.default_rng(1).normal(0.0, 0.01, size=(D + 1, K))
    m = np.zeros((len(y), K))
    losses = []
    for _ in range(12):
        p = softmax(z1 @ w)
        losses.append(float(-np.log(p[np.arange(len(y)), y]).mean()))
        e = -lr * (p - np.eye(K)[y]) / len(y)
        m = MOMENTUM * m + e
        w = w + z1.T @ (MOMENTUM * m + e)
    np.testing.assert_allclose([h["loss"] for h in pl.history], losses, rtol=1e-9)
    np.testing.assert_allclose(pl.feature_shift, mu, atol=1e-9)
    np.testing.assert_allclose(pl.feature_scale, 1 / sd, rtol=1e-9)
    np.testing.assert_allclose(pl.head, fold_standardization(w, 1 / sd, mu), atol=1e-9)
    np.testing.assert_allclose(with_bias(x) @ pl.head, z1 @ w, atol=1e-8)  # folded = standardised
    assert all(h["applied"] == 1.0 for h in pl.history) and pl.final_loss < losses[-1] < losses[0]


def test_he_defaults_match_twin_and_stats_stay_encrypted(secret: SecretContext, data) -> None:
    insts, _ = data
    he = train_encrypted(insts, K, secret=secret, epochs=8, init_seed=3)
    pl = train_plaintext(insts, K, epochs=8, init_seed=3)
    assert np.abs(he.feature_shift - pl.feature_shift).max() < 1e-4
    assert np.abs(he.feature_scale / pl.feature_scale - 1).max() < 1e-4
    assert np.abs(he.head - pl.head).max() < 1e-3
    assert [round(h["loss"], 3) for h in he.history] == [round(h["loss"], 3) for h in pl.history]
    assert he.nbytes["moments_upload"] > 0 and abs(he.final_loss - pl.final_loss) < 1e-3


def test_moments_are_summed_by_the_server_and_decrypted_by_institutions(secret: SecretContext) -> None:
    holder, ev = CkksKeyHolder(secret), CkksEvaluator(PublicContext.from_bytes(secret.public_bytes()))
    rng = np.random.default_rng(0)
    xs = [rng.normal(3.0, 2.0, (n, 2500)) for n in (30, 50)]  # 2d > slots: two ciphertexts
    lay = FocalLayout(2500, 3, ev.slots)
    assert moment_count(lay) == 2
    totals = server_sum(ev, [encrypt_feature_moments(holder, lay, x) for x in xs], 2)
    scale, shift = feature_standardization(holder, lay, totals, 80)
    x = np.vstack(xs)
    assert np.abs(shift - x.mean(0)).max() < 1e-4 and np.abs(scale * x.std(0) - 1).max() < 1e-4
    with pytest.raises(CiphertextError):
        server_sum(ev, [totals], 3)  # wrong count
    # totals that cannot be moments of real data (E[x^2] < mean^2: a sum that left the CKKS
    # range, or a corrupted one) are refused, not clipped into a made-up standardisation
    wrapped = np.vstack(xs).copy()
    forged = encrypt_feature_moments(holder, lay, wrapped)
    with pytest.raises(ValueError, match="moments are inconsistent"):
        feature_standardization(holder, lay, forged, 8)  # N far too small for these sums


def test_guard_rolls_back_halves_and_then_stops_with_a_clear_message() -> None:
    insts, _ = _data(2, (150, 200), d=4)  # not separable: a too large step overshoots
    huge = train_plaintext(insts, K, epochs=12, step_scale=40.0, init_seed=0)
    applied = [h["applied"] for h in huge.history]
    assert 0.0 in applied and huge.guard_log  # backed off ...
    assert huge.history[-1]["lr"] < huge.history[0]["lr"]
    kept = [h["loss"] for h in huge.history if h["applied"]]
    assert max(kept) <= kept[0] and huge.final_loss <= kept[0]  # ... and never above the start
    try:  # without the guard the same run rises, or its logits leave CKKS's safe range
        unguarded = train_plaintext(insts, K, epochs=12, step_scale=40.0, init_seed=0, guard=False)
        assert max(h["loss"] for h in unguarded.history) > unguarded.history[0]["loss"]
    except LogitOverflow as exc:
        assert "beyond the safe range" in str(exc)
    # a head whose logits overflow is a rise for the guard: rolled back, never raised
    wild = train_plaintext(insts, K, epochs=6, step_scale=4000.0, init_seed=0, momentum=0.0)
    assert any("out of range" in line for line in wild.guard_log)
    assert wild.final_loss <= wild.history[0]["loss"]
    with pytest.raises(FocalDiverged, match="step_scale"):
        train_plaintext(insts, K, epochs=30, step_scale=1e6, init_seed=0, momentum=0.0)


def test_loss_guard_rule() -> None:
    g = LossGuard(lr=1.0, max_backoffs=1)
    assert g.accept(2.0, ["a", "b"]) and g.accept(1.5, ["a", "b"])
    assert not g.accept(1.6, ["a", "b"]) and g.lr == 0.5 and g.restarts == 1
    assert g.accept(1.5, ["b", "a"])
    assert g.accept(9.0, ["a"])  # another set present: a new comparison, not a rise
    assert not g.final_ok(9.5, ["a"]) and g.final_ok(8.0, ["a"])
    with pytest.raises(FocalDiverged, match="focal-step-scale"):
        g.accept(float("nan"), ["a"])


def test_loss_guard_compares_only_like_for_like_when_the_set_changes_and_returns() -> None:
    """Mean losses over different institution sets are not comparable: a change of the set
    present (one drops out, or comes back) starts a new comparison. Against the old reference a
    returning institution with a high loss would make the same head a "rise" at every step
    (restored, halved, rejected again) until the halving limit ended the run."""
    g = LossGuard(lr=1.0, max_backoffs=1)
    abc, ab = ["a", "b", "c"], ["a", "b"]
    assert g.accept(2.0, abc) and g.accept(1.0, abc)
    assert g.accept(0.5, ab) and g.accept(0.45, ab)  # c left: its own comparison
    assert g.accept(1.8, abc) and g.accept(1.8, abc)  # c is back (above abc's old 1.0): no rise ...
    assert g.accept(1.8, abc) and (g.lr, g.backoffs, g.restarts) == (1.0, 0, 0)  # ... step after step
    assert (g.prev, g.first, g.members) == (1.8, 1.8, ("a", "b", "c"))
    assert not g.accept(1.9, abc) and g.lr == 0.5  # a real rise over the same set is still one
    assert g.final_ok(0.9, ab) and not g.final_ok(1.9, abc)  # the final check: same rule


def test_loss_guard_limits_halvings_without_progress_not_isolated_rises() -> None:
    g = LossGuard(lr=1.0, max_backoffs=1)
    assert g.accept(2.0, ["a"]) and not g.accept(2.5, ["a"])  # a rise: halved once
    assert g.accept(2.0, ["a"])  # the restored head's own loss: no progress, the count stays
    assert g.accept(1.0, ["a"]) and g.backoffs == 0  # real progress resets the count
    assert not g.accept(1.2, ["a"])  # an isolated later rise is one more halving, not the end
    with pytest.raises(FocalDiverged, match="without progress"):
        g.accept(1.2, ["a"])  # two halvings in a row without progress


def test_loss_guard_after_resume_compares_from_the_checkpointed_head() -> None:
    """A resumed run's rollback point is its checkpointed head: a rise there keeps that head,
    halves the step and restarts the comparison from its loss (else the same head is rejected
    again and again until the halving limit ends the run)."""
    def saved() -> LossGuard:
        g = LossGuard(lr=1.0, max_backoffs=1)
        assert g.accept(2.0, ["a", "b"]) and g.accept(1.0, ["a", "b"])  # first 2.0, prev 1.0
        return g

    g = saved()
    g.resume()
    assert not g.accept(3.0, ["a", "b"])  # the checkpointed head's loss: above prev and first
    assert g.lr == 0.5 and g.restarts == 1 and "resumed checkpoint's head" in g.log_line()
    assert g.accept(3.0, ["b", "a"])  # the same (kept) head again: the new reference
    assert (g.prev, g.first) == (3.0, 3.0)
    assert g.accept(2.5, ["a", "b"]) and not g.accept(2.6, ["a", "b"])  # then the usual rule
    assert "head restored" in g.log_line()

    g = saved()  # without resume(): the kept head is a rise every time, the run would end
    assert not g.accept(3.0, ["a", "b"])
    with pytest.raises(FocalDiverged):
        g.accept(3.0, ["a", "b"])

    g = saved()  # a checkpointed head that did not raise the loss: nothing changes
    g.resume()
    assert g.accept(0.9, ["a", "b"]) and (g.prev, g.first, g.lr) == (0.9, 2.0, 1.0)


def test_server_restore_goes_back_to_the_setup_head_before_any_snapshot(secret: SecretContext) -> None:
    """The head a server is set up with (initial or a resumed checkpoint's) is its first rollback
    point: a restore before any snapshot undoes the updates since setup (real CKKS)."""
    insts, _ = _data(5, (12,), d=4, k=2)
    lay = FocalLayout(4, 2)
    holder, server = _setup(secret, insts, lay)
    with server:
        start = decrypt_head(holder, lay, server_export_head(server))

        def update() -> None:
            up = institution_error(holder, lay, server_forward(server, "h0"), insts[0].y, lr=1.0,
                                   n_total=12)
            server_backward_update(server, {"h0": up.message})

        update()
        moved = decrypt_head(holder, lay, server_export_head(server))
        assert np.abs(moved - start).max() > 1e-3
        server_restore(server)
        assert np.abs(decrypt_head(holder, lay, server_export_head(server)) - start).max() < 1e-5
        update()
        server_snapshot(server)
        update()
        server_restore(server)  # back to the snapshot, not to the setup head
        assert np.abs(decrypt_head(holder, lay, server_export_head(server)) - moved).max() < 1e-4


def test_validation_logits_match_the_twin_and_are_far_smaller_than_the_head(secret: SecretContext) -> None:
    """Evaluation: the server's forward pass on an institution's encrypted validation embeddings
    (standardised like its training ones) gives the twin's logits and metrics up to CKKS noise;
    at the README's sizes (EfficientNet-Lite0 d = 1280, K = 5, block 64, 16 validation images)
    that message is 3 ciphertexts against the 63 (+ the moments) of the head it replaces. The
    validation embeddings never enter a backward pass."""
    from flower_focal.client.focal import validation_metrics
    from flower_focal.focal import (
        decrypt_logits,
        server_add_validation,
        server_forward_validation,
    )
    from flower_focal.testing import PlainEvaluator, PlainKeyHolder

    d, k, n_val = 1280, 5, 16
    rng = np.random.default_rng(11)
    lay = FocalLayout(d, k)
    x_tr, y_tr = rng.normal(0, 1, (20, d)), rng.integers(0, k, 20)
    x_val, y_val = rng.normal(0.3, 2, (n_val, d)), np.arange(n_val) % k
    scale, shift = rng.uniform(0.5, 1.5, d), rng.normal(0, 0.3, d)  # a global standardisation
    out = {}
    for name, holder, ev in (("he", CkksKeyHolder(secret), CkksEvaluator(secret.public_context())),
                             ("twin", PlainKeyHolder(), PlainEvaluator())):
        server = server_setup(ev, lay, init_head(holder, lay, seed=5, std=0.05))
        server_add_embeddings(server, "a", encrypt_embeddings(holder, lay, x_tr, feature_scale=scale,
                                                              feature_shift=shift))
        up = institution_error(holder, lay, server_forward(server, "a"), y_tr, lr=0.5, n_total=20)
        server_backward_update(server, {"a": up.message})  # evaluate a trained head, not the initial one
        server_add_validation(server, "a", encrypt_embeddings(holder, lay, x_val, feature_scale=scale,
                                                              feature_shift=shift))
        message = server_forward_validation(server, "a")
        logits = decrypt_logits(holder, lay, message, n_val)
        head = server_export_head(server)
        w = decrypt_head(holder, lay, head)
        out[name] = logits, message, head, w, validation_metrics(logits, y_val, k)
        if name == "twin":  # the validation embeddings never touch the head
            again = server_setup(ev, lay, init_head(holder, lay, seed=5, std=0.05))
            server_add_embeddings(again, "a", encrypt_embeddings(holder, lay, x_tr, feature_scale=scale,
                                                                 feature_shift=shift))
            # validation embeddings present during the update this time: the head must not change
            server_add_validation(again, "a", encrypt_embeddings(holder, lay, x_val, feature_scale=scale,
                                                                 feature_shift=shift))
            server_backward_update(again, {"a": institution_error(
                holder, lay, server_forward(again, "a"), y_tr, lr=0.5, n_total=20).message})
            assert np.array_equal(decrypt_head(holder, lay, server_export_head(again)), w)
            # ... and the logits are the head applied to the standardised validation embeddings
            ref = predict_logits(fold_standardization(w, scale, shift), lay, x_val)
            np.testing.assert_allclose(logits, ref, atol=1e-9)
    (l_he, msg, head, _, m_he), (l_pl, _, _, _, m_pl) = out["he"], out["twin"]
    assert np.abs(l_pl).max() > 0.5  # a head that separates: the comparison means something
    # CKKS noise of a d = 1280 forward pass: up to about 1e-3 measured on logits of size ~27
    assert np.abs(l_he - l_pl).max() < 3e-3
    assert m_he["accuracy"] == m_pl["accuracy"] and m_he["num-examples"] == n_val
    # cross-entropy moves by at most twice the largest logit error (< 3e-3 above)
    assert m_he["loss"] == pytest.approx(m_pl["loss"], abs=6e-3)
    # rank-based: CKKS noise may swap two near-equal probabilities, 1/39 of one class of five
    assert m_he["auroc"] == pytest.approx(m_pl["auroc"], abs=0.006)
    ev = CkksEvaluator(secret.public_context())
    assert len(ev.open_envelope(msg)) == lay.n_chunks(n_val) * lay.n_pairs == 3
    assert len(ev.open_envelope(head)) == lay.n_groups * lay.n_pairs == 63
    print(f"evaluation message {len(msg)} B vs head {len(head)} B ({len(head) / len(msg):.1f}x); "
          f"logit error {np.abs(l_he - l_pl).max():.2e}")
    assert 10 * len(msg) <= len(head)
    with pytest.raises(ValueError, match="no validation embeddings"):
        server_forward_validation(server_setup(ev, lay, init_head(CkksKeyHolder(secret), lay)), "a")
