"""Model backbones and their exchange with Flower.

This module owns the closed registry of classifiers (:data:`MODELS`, :func:`build_model`)
and the conversion between a model's ``state_dict`` and Flower's ``ArrayRecord``
(:func:`model_to_arrays`, :func:`arrays_into_model`). Every builder takes the same keyword
arguments ``(in_channels, num_classes, image_size)`` and returns a module mapping a float
batch ``(B, C, H, W)`` to logits ``(B, K)``. Initialisation uses only torch's global RNG,
so ``torch.manual_seed(s)`` before :func:`build_model` gives identical weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

__all__ = [
    "MODELS",
    "SmallCNN",
    "LeNetSigmoid",
    "arrays_into_model",
    "build_model",
    "count_parameters",
    "model_to_arrays",
    "norm_keys",
    "norm_layers",
]


class SmallCNN(nn.Module):
    """Compact CNN: four conv-norm-ReLU blocks (16-32-64-128 channels), GAP, linear head.

    About 100k parameters; max-pools after the first three blocks, so any
    ``image_size >= 16`` leaves at least a 2x2 map before global average pooling.
    ``norm="batch"`` uses BatchNorm; ``norm="group"`` GroupNorm with
    :func:`group_count` groups, whose statistics are per image, so nothing depends on an
    institution's batch composition and the model has no running statistics to average.
    """

    def __init__(
        self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (16, 32, 64, 128),
        norm: str = "batch",
    ):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(widths):
            layers += [
                nn.Conv2d(prev, width, kernel_size=3, padding=1, bias=False),
                _norm_layer(norm, width),
                nn.ReLU(inplace=True),
            ]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            prev = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def group_count(channels: int) -> int:
    """GroupNorm groups of a ``channels``-wide layer: 8 channels per group, at most 32 groups."""
    return max(1, min(32, channels // 8))


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels), channels)
    raise ValueError(f"Unknown norm {norm!r}; expected 'batch' or 'group'")


class LeNetSigmoid(nn.Module):
    """The sigmoid LeNet of DLG / iDLG gradient-inversion attacks (Zhu et al. 2019).

    Three 5x5 convolutions with 12 channels and strides 2, 2, 1 (padding 2), each followed
    by a sigmoid, then one linear layer (768 inputs at 32 px). Weights and biases are drawn
    from U(-0.5, 0.5) as in the DLG reference code, which the attacks rely on. It has no
    BatchNorm, so a single-example gradient is exactly what an attacker would observe.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        side = _conv_out(_conv_out(image_size, 5, 2, 2), 5, 2, 2)
        self.fc = nn.Linear(12 * side * side, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.uniform_(module.weight, -0.5, 0.5)
                if module.bias is not None:
                    nn.init.uniform_(module.bias, -0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.body(x), 1))


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _small_cnn(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    if image_size < 16:
        raise ValueError(f"small-cnn needs image_size >= 16, got {image_size}")
    return SmallCNN(in_channels, num_classes)


def _medium_cnn(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """SmallCNN at 2-4x the width, five blocks (about 1M parameters)."""
    if image_size < 16:
        raise ValueError(f"medium-cnn needs image_size >= 16, got {image_size}")
    return SmallCNN(in_channels, num_classes, widths=(32, 64, 128, 256, 256))


def _small_cnn_gn(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """small-cnn with GroupNorm instead of BatchNorm (no running statistics)."""
    if image_size < 16:
        raise ValueError(f"small-cnn-gn needs image_size >= 16, got {image_size}")
    return SmallCNN(in_channels, num_classes, norm="group")


def _medium_cnn_gn(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """medium-cnn with GroupNorm instead of BatchNorm."""
    if image_size < 16:
        raise ValueError(f"medium-cnn-gn needs image_size >= 16, got {image_size}")
    return SmallCNN(in_channels, num_classes, widths=(32, 64, 128, 256, 256), norm="group")


def _resnet18(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """MONAI ResNet-18 (2-D) with a 3x3 stride-1 stem for small medical images.

    With the max-pool kept the total downsampling is 16, so 28 px leaves a 2x2 map in
    ``layer4`` (BatchNorm there still works with a final batch of one example).
    """
    from monai.networks.nets import resnet18

    if image_size < 28:
        raise ValueError(f"resnet18 needs image_size >= 28, got {image_size}")
    return resnet18(
        spatial_dims=2,
        n_input_channels=in_channels,
        num_classes=num_classes,
        conv1_t_size=3,
        conv1_t_stride=1,
    )


def _densenet121(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """MONAI DenseNet-121 (2-D) whose stem downsamples less on small images.

    The stock stem (7x7 stride-2 conv + stride-2 max-pool, total downsampling 32) fails
    below 32 px. The stem keeps its factor 4 from 64 px, drops the max-pool (factor 2) from
    32 px and also uses a stride-1 conv (factor 1) below that, so the last dense block
    always sees at least 2x2 pixels. Only strides change: ``state_dict`` keys and shapes
    are the same for every ``image_size``.
    """
    from monai.networks.nets import DenseNet121

    if image_size < 16:
        raise ValueError(f"densenet121 needs image_size >= 16, got {image_size}")
    model = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)
    if image_size < 64:
        model.features.pool0 = nn.Identity()
    if image_size < 32:
        model.features.conv0.stride = (1, 1)
    return model


def _lenet_sigmoid(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    if image_size < 8:
        raise ValueError(f"lenet-sigmoid needs image_size >= 8, got {image_size}")
    return LeNetSigmoid(in_channels, num_classes, image_size)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small-cnn": _small_cnn,
    "medium-cnn": _medium_cnn,
    "small-cnn-gn": _small_cnn_gn,
    "medium-cnn-gn": _medium_cnn_gn,
    "resnet18": _resnet18,
    "densenet121": _densenet121,
    "lenet-sigmoid": _lenet_sigmoid,
}
"""Registry of builders, each called as ``builder(in_channels=, num_classes=, image_size=)``."""


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build the registered model ``name`` for ``(in_channels, image_size, image_size)`` inputs."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Valid models: {', '.join(sorted(MODELS))}")
    if in_channels < 1 or num_classes < 2:
        raise ValueError(
            f"need in_channels >= 1 and num_classes >= 2, got {in_channels} and {num_classes}"
        )
    return MODELS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_keys(model: nn.Module) -> list[str]:
    """``state_dict`` keys of ``model``'s normalisation layers (BatchNorm, GroupNorm, LayerNorm):
    affine parameters, running statistics and step counters (what FedBN keeps local)."""
    out: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, _NORM_LAYERS):
            prefix = f"{name}." if name else ""
            out += [prefix + key for key in module.state_dict()]
    return out


def norm_layers(model: nn.Module) -> list[str]:
    """Module names of ``model``'s normalisation layers (those :func:`norm_keys` covers)."""
    return [name for name, module in model.named_modules() if isinstance(module, _NORM_LAYERS)]


def model_to_arrays(model: nn.Module) -> ArrayRecord:
    """Copy ``model.state_dict()`` (parameters and buffers) into a Flower ``ArrayRecord``."""
    from flwr.app import ArrayRecord

    return ArrayRecord(model.state_dict())


def arrays_into_model(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    """Load ``arrays`` into ``model`` in place (strict keys and shapes) and return it.

    Each tensor is cast to the dtype and device of the model's own entry. Integer buffers
    that an aggregator turned into floats (FedAvg averages BatchNorm's int64
    ``num_batches_tracked``) are rounded first.
    """
    incoming = arrays.to_torch_state_dict()
    current = model.state_dict()
    missing = sorted(set(current) - set(incoming))
    unexpected = sorted(set(incoming) - set(current))
    if missing or unexpected:
        raise ValueError(
            f"ArrayRecord does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (was it built for a different model name?)"
        )
    converted: dict[str, torch.Tensor] = {}
    for key, target in current.items():
        value = incoming[key]
        if value.shape != target.shape:
            raise ValueError(
                f"Shape mismatch for {key!r}: record {tuple(value.shape)}, "
                f"model {tuple(target.shape)}"
            )
        if value.is_floating_point() and not target.is_floating_point():
            value = value.round()
        converted[key] = value.to(dtype=target.dtype, device=target.device)
    model.load_state_dict(converted, strict=True)
    return model
