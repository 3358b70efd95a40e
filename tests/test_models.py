"""Tests for flower_focal.models: registry, shapes, determinism, ArrayRecord exchange."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from flower_focal.models import (
    MODELS,
    arrays_into_model,
    build_model,
    count_parameters,
    model_to_arrays,
)

NUM_CLASSES = 5


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("image_size", [28, 32, 64])
def test_forward_shape(name: str, in_channels: int, image_size: int) -> None:
    model = build_model(name, in_channels, NUM_CLASSES, image_size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["small-cnn", "resnet18", "densenet121"])
def test_batchnorm_models_train_on_a_batch_of_one_at_28px(name: str) -> None:
    # drop_last=False can leave a final batch of one example; BN must still see > 1 value.
    model = build_model(name, 1, NUM_CLASSES, 28).train()
    model(torch.randn(1, 1, 28, 28)).sum().backward()


def test_small_cnn_size_and_minimum_image() -> None:
    model = build_model("small-cnn", 3, NUM_CLASSES, 16)
    assert 50_000 <= count_parameters(model) <= 150_000
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, NUM_CLASSES)
    with pytest.raises(ValueError, match="image_size"):
        build_model("small-cnn", 3, NUM_CLASSES, 8)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_init_is_deterministic_given_manual_seed(name: str) -> None:
    torch.manual_seed(0)
    a = build_model(name, 3, NUM_CLASSES, 32).state_dict()
    torch.manual_seed(0)
    b = build_model(name, 3, NUM_CLASSES, 32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="small-cnn") as info:
        build_model("vgg99", 3, NUM_CLASSES, 32)
    assert all(name in str(info.value) for name in MODELS)


def test_lenet_sigmoid_matches_dlg_architecture() -> None:
    model = build_model("lenet-sigmoid", 3, 100, 32)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)]
    assert all(c.out_channels == 12 and c.kernel_size == (5, 5) for c in convs)
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in model.modules()) == 3
    assert model.fc.in_features == 768


def _trained_small_cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("small-cnn", 3, NUM_CLASSES, 16).train()
    model(torch.randn(4, 3, 16, 16))  # moves BN running stats and num_batches_tracked
    return model


def test_arrayrecord_round_trip_is_exact() -> None:
    source = _trained_small_cnn(0)
    target = build_model("small-cnn", 3, NUM_CLASSES, 16)
    record = model_to_arrays(source)
    assert isinstance(record, ArrayRecord)
    arrays_into_model(target, record)
    src, dst = source.state_dict(), target.state_dict()
    assert list(src) == list(dst)
    assert any(k.endswith("num_batches_tracked") for k in src)
    for key in src:
        assert dst[key].dtype == src[key].dtype, key
        assert torch.equal(dst[key], src[key]), key


def test_fedavg_averaged_record_loads() -> None:
    # Mimic flwr's aggregate_arrayrecords: value.numpy() * weight turns int64 into float64.
    a, b = model_to_arrays(_trained_small_cnn(0)), model_to_arrays(_trained_small_cnn(1))
    b_sd = b.to_torch_state_dict()
    b_sd = {k: v + 2 if k.endswith("num_batches_tracked") else v for k, v in b_sd.items()}
    b = ArrayRecord(b_sd)
    averaged = ArrayRecord(
        {k: Array(np.asarray(a[k].numpy() * 0.2 + b[k].numpy() * 0.8)) for k in a}
    )
    assert averaged["features.1.num_batches_tracked"].dtype != "int64"
    model = build_model("small-cnn", 3, NUM_CLASSES, 16)
    arrays_into_model(model, averaged)
    nbt = model.state_dict()["features.1.num_batches_tracked"]
    assert nbt.dtype == torch.int64 and int(nbt) == 3  # 0.2 * 1 + 0.8 * 3 = 2.6, rounded
    weight = model.state_dict()["classifier.weight"]
    expected = torch.from_numpy(averaged["classifier.weight"].numpy())
    assert torch.equal(weight, expected)


def test_arrays_for_another_model_raise() -> None:
    record = model_to_arrays(build_model("lenet-sigmoid", 3, NUM_CLASSES, 32))
    with pytest.raises(ValueError, match="does not match"):
        arrays_into_model(build_model("small-cnn", 3, NUM_CLASSES, 32), record)
    other = model_to_arrays(build_model("small-cnn", 3, NUM_CLASSES + 1, 32))
    with pytest.raises(ValueError, match="Shape mismatch"):
        arrays_into_model(build_model("small-cnn", 3, NUM_CLASSES, 32), other)


@pytest.mark.parametrize("name", ["small-cnn-gn", "medium-cnn-gn"])
def test_groupnorm_variants_have_no_batch_statistics(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 3, NUM_CLASSES, 28)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) >= 4
    assert not any("running" in k for k in model.state_dict())
    x = torch.randn(2, 3, 28, 28)
    model.train()
    # per-image statistics: an image's output does not depend on the rest of its batch
    assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)
