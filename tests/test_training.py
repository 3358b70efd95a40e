"""Tests for flower_focal.training: local training, evaluation, reproducibility, NaN guard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from flower_focal.models import build_model
from flower_focal.training import (
    evaluate_model,
    predict_proba,
    resolve_device,
    round_lr,
    seed_everything,
    train_local,
)

K, C, SIZE = 3, 1, 16


class DictDataset(Dataset):
    """MONAI-style dataset: class-dependent mean images plus noise."""

    def __init__(self, n: int, seed: int = 0, poison: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % K
        self.images = torch.randn(n, C, SIZE, SIZE, generator=g) * 0.5
        self.images += (self.labels.float() - 1.0).view(-1, 1, 1, 1)
        if poison:
            self.images[0, 0, 0, 0] = float("nan")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("small-cnn", C, K, SIZE)


def _train(model: torch.nn.Module, dataset: Dataset, seed: int = 1, **kw: object) -> dict:
    args: dict = {
        "epochs": 2,
        "lr": 0.05,
        "batch_size": 16,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "optimizer": "sgd",
        "device": "cpu",
        "seed": seed,
    }
    args.update(kw)
    return train_local(model, dataset, **args)


def test_train_local_reduces_loss_and_reports_examples() -> None:
    data = DictDataset(90)
    model = _model()
    before = evaluate_model(model, data, batch_size=32, device="cpu", num_classes=K)
    result = _train(model, data, epochs=3)
    after = evaluate_model(model, data, batch_size=32, device="cpu", num_classes=K)
    assert set(result) == {"train-loss", "num-examples"}
    assert result["num-examples"] == 90
    assert math.isfinite(result["train-loss"])
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.9 and after["auroc"] > 0.95


def test_batchnorm_step_counters_are_not_part_of_the_update() -> None:
    """num_batches_tracked would count local batches and dominate a clipped update's norm."""
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, DictDataset(90), epochs=2)
    after = model.state_dict()
    counters = [k for k in after if k.endswith("num_batches_tracked")]
    assert counters and all(torch.equal(after[k], before[k]) for k in counters)
    stats = [k for k in after if k.endswith("running_mean")]
    assert stats and all(not torch.equal(after[k], before[k]) for k in stats)  # BN still learns statistics
    momentum_free = torch.nn.BatchNorm1d(4, momentum=None)  # cumulative average: the counter matters
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(C * SIZE * SIZE, 4), momentum_free,
                              torch.nn.Linear(4, K))
    _train(net, DictDataset(90), epochs=1)
    assert int(momentum_free.num_batches_tracked) > 0


def test_adam_class_weights_and_tuple_batches() -> None:
    data = DictDataset(40)
    tuples = TensorDataset(data.images, data.labels)
    result = _train(
        _model(), tuples, optimizer="adam", lr=1e-3, class_weights=torch.tensor([1.0, 2.0, 0.5])
    )
    assert result["num-examples"] == 40 and math.isfinite(result["train-loss"])


def test_monai_dataset_with_metatensors() -> None:
    from monai.data import Dataset as MonaiDataset
    from monai.transforms import EnsureTyped

    base = DictDataset(12)
    items = [{"image": base.images[i].numpy(), "label": int(base.labels[i])} for i in range(12)]
    data = MonaiDataset(items, transform=EnsureTyped(keys=["image", "label"]))
    assert _train(_model(), data, epochs=1, batch_size=5)["num-examples"] == 12
    out = evaluate_model(_model(), data, batch_size=5, device="cpu", num_classes=K)
    assert out["num-examples"] == 12 and type(out["loss"]) is float


def test_same_seed_same_weights_different_seed_different() -> None:
    data = DictDataset(50)  # 50 % 16 = 2: exercises the short final batch
    a, b, c = _model(), _model(), _model()
    _train(a, data, seed=7)
    _train(b, data, seed=7)
    _train(c, data, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_train_local_leaves_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    _train(_model(), DictDataset(20), epochs=1)
    assert torch.equal(state, torch.get_rng_state())


def test_nan_loss_raises() -> None:
    with pytest.raises(FloatingPointError, match="lr="):
        _train(_model(), DictDataset(20, poison=True), batch_size=20)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        _train(_model(), DictDataset(0))
    with pytest.raises(ValueError, match="optimizer"):
        _train(_model(), DictDataset(8), optimizer="rmsprop")
    with pytest.raises(ValueError, match="epochs"):
        _train(_model(), DictDataset(8), epochs=0)


def test_evaluate_empty_dataset() -> None:
    out = evaluate_model(_model(), DictDataset(0), batch_size=8, device="cpu", num_classes=K)
    assert out["num-examples"] == 0
    assert all(math.isnan(out[k]) for k in ("loss", "accuracy", "auroc"))


def test_predict_proba_shapes_order_and_mode() -> None:
    data = DictDataset(25)
    model = _model().train()
    probs, labels = predict_proba(model, data, 8, "cpu")
    assert probs.shape == (25, K) and labels.shape == (25,)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels, data.labels.numpy())
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="num_classes"):
        evaluate_model(model, data, batch_size=8, device="cpu", num_classes=K + 1)


def test_resolve_device_and_seed_everything() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    seed_everything(3, deterministic=False)
    first = (torch.rand(1).item(), np.random.rand())
    seed_everything(3, deterministic=False)
    assert (torch.rand(1).item(), np.random.rand()) == first


def test_round_lr_cosine_decays_from_lr_and_constant_is_flat() -> None:
    lrs = [round_lr(0.1, "cosine", r, 10) for r in range(1, 11)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.05)  # halfway
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:]))  # strictly decreasing, never 0
    assert round_lr(0.1, "cosine", 12, 10) == lrs[-1]  # rounds past the end (resume) keep the last value
    assert round_lr(0.1, "cosine", 1, 1) == 0.1
    assert {round_lr(0.1, "constant", r, 10) for r in range(1, 11)} == {0.1}
    with pytest.raises(ValueError, match="cosine"):
        round_lr(0.1, "step", 1, 10)


def test_fedprox_term_pulls_towards_the_initial_weights() -> None:
    data = DictDataset(64)
    start = {k: v.clone() for k, v in _model().state_dict().items()}

    def drift(mu: float) -> float:
        model = _model()
        _train(model, data, epochs=2, prox_mu=mu)
        return sum(float(((p.detach() - start[n]) ** 2).sum()) for n, p in model.named_parameters())

    plain, prox = drift(0.0), drift(10.0)
    assert prox < 0.5 * plain
    with pytest.raises(ValueError, match="prox_mu"):
        _train(_model(), data, prox_mu=-1.0)


@pytest.mark.parametrize(("name", "momentum", "weight_decay"),
                         [("sgd", 0.9, 1e-4), ("sgd", 0.0, 0.0), ("adam", 0.0, 1e-4)])
def test_the_update_is_torch_optims_own(name: str, momentum: float, weight_decay: float) -> None:
    """train_local's update equals torch.optim.SGD / Adam bit for bit (it calls their
    functional form without the Optimizer object, whose first use imports torch._dynamo)."""
    from flower_focal.training import _make_optimizer

    torch.manual_seed(0)
    ours = build_model("small-cnn", 3, 4, 16)
    ref = build_model("small-cnn", 3, 4, 16)
    ref.load_state_dict(ours.state_dict())
    initial = {k: v.clone() for k, v in ours.state_dict().items()}
    update = _make_optimizer(ours, name, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    optim = (torch.optim.SGD(ref.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
             if name == "sgd" else torch.optim.Adam(ref.parameters(), lr=0.05, weight_decay=weight_decay))
    for step in range(6):
        x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(step))
        y = torch.arange(8) % 4
        for model, opt in ((ours, update), (ref, optim)):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(not torch.equal(v, initial[k]) for k, v in ours.named_parameters())  # it trained


def test_local_training_does_not_import_torch_dynamo() -> None:
    """0.9 s of every train message on a deployed SuperNode (a process per message)."""
    import subprocess
    import sys

    probe = ("import sys, torch; from torch.utils.data import TensorDataset; "
             "from flower_focal.models import build_model; from flower_focal.training import train_local; "
             "ds = TensorDataset(torch.randn(16, 3, 16, 16), torch.arange(16) % 4); "
             "[train_local(build_model('small-cnn', 3, 4, 16), ds, epochs=1, lr=0.1, batch_size=8, "
             "momentum=m, weight_decay=0.0, optimizer=o, device='cpu', seed=0, num_workers=0) "
             "for o, m in (('sgd', 0.9), ('adam', 0.0))]; "
             "print('torch._dynamo' in sys.modules, 'monai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_prox_reference_pulls_towards_the_reference_not_the_entry_weights() -> None:
    """Ditto: the personal model starts elsewhere and is pulled towards the received global."""
    data = DictDataset(64)
    target = _model(0)
    reference = {n: p.detach().clone() for n, p in target.named_parameters()}

    def distance(model: torch.nn.Module) -> float:
        return sum(float(((p.detach() - reference[n]) ** 2).sum()) for n, p in model.named_parameters())

    start = distance(_model(1))
    free, pulled = _model(1), _model(1)
    _train(free, data, epochs=2, momentum=0.0)
    _train(pulled, data, epochs=2, momentum=0.0, prox_mu=10.0, prox_reference=reference)
    assert distance(pulled) < 0.1 * start  # lambda 10 draws v to the reference
    assert distance(free) > 0.8 * start  # without it, v stays as far away
    # the reference was copied: training did not move it
    assert all(torch.equal(p, reference[n]) for n, p in target.named_parameters())


def test_prox_reference_equal_to_the_entry_weights_is_fedprox_bit_for_bit() -> None:
    data = DictDataset(64)
    fedprox, ditto = _model(), _model()
    reference = {n: p.detach().clone() for n, p in _model().named_parameters()}
    a = _train(fedprox, data, epochs=2, prox_mu=5.0)
    b = _train(ditto, data, epochs=2, prox_mu=5.0, prox_reference=reference)
    assert a == b
    sa, sb = fedprox.state_dict(), ditto.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    plain = _model()
    _train(plain, data, epochs=2)
    assert not torch.equal(plain.state_dict()["classifier.weight"], sa["classifier.weight"])


def test_prox_reference_is_refused_without_mu_or_when_it_does_not_fit() -> None:
    data = DictDataset(32)
    reference = {n: p.detach().clone() for n, p in _model().named_parameters()}
    with pytest.raises(ValueError, match="prox_reference needs prox_mu > 0"):
        _train(_model(), data, prox_reference=reference)
    missing = dict(reference)
    missing.pop("classifier.bias")
    with pytest.raises(ValueError, match=r"prox_reference lacks .*classifier\.bias"):
        _train(_model(), data, prox_mu=1.0, prox_reference=missing)
    wrong = {**reference, "classifier.bias": torch.zeros(K + 1)}
    with pytest.raises(ValueError, match=r"prox_reference 'classifier\.bias' has shape"):
        _train(_model(), data, prox_mu=1.0, prox_reference=wrong)
