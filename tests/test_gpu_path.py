"""Tests for the accelerator data path: tensor splits, build workers, DataLoader workers,
batch augmentation, precision settings. Results must not depend on how data is fetched."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import CacheDataset
from PIL import Image
from torch.utils.data import Dataset

from flower_focal.config import RunConfig
from flower_focal.data import IMAGE, LABEL, build_transforms, clear_caches, load_institution
from flower_focal.data.institution import make_dataset
from flower_focal.data.loader import (
    BatchAugment,
    ImageTensorDataset,
    collate_pairs,
    resolve_num_workers,
)
from flower_focal.data.sources import load_medmnist
from flower_focal.data.transforms import ImageDataError
from flower_focal.models import build_model
from flower_focal.models.backbones import build_backbone
from flower_focal.models.embeddings import extract_embeddings
from flower_focal.training import resolve_precision, train_local

SHARED_NPZ = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pathmnist"
              / "pathmnist.npz")
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    clear_caches()


class Items(Dataset):
    """A plain map-style view of another dataset's items (forces the DataLoader path)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.base[i]


def _array_items(n: int = 40, size: int = 28, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return [{IMAGE: imgs[i], LABEL: int(i % 4)} for i in range(n)]


def _kw(**over: object) -> dict:
    kw: dict = {"epochs": 2, "lr": 0.05, "batch_size": 8, "momentum": 0.9, "weight_decay": 0.0,
                "optimizer": "sgd", "device": "cpu", "seed": 5}
    kw.update(over)
    return kw


def _net(channels: int = 3, size: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("small-cnn", channels, 4, size)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("size", [28, 16, 40])  # native, downsampled (anti-aliased), upsampled
def test_array_split_matches_monai_cache_dataset(size: int) -> None:
    items = _array_items()
    transform = build_transforms(size, False, False, in_channels=3)
    ref = CacheDataset(items, transform, cache_rate=1.0, num_workers=0, progress=False)
    ds = make_dataset(items, transform, False, image_size=size, in_channels=3)
    assert isinstance(ds, ImageTensorDataset) and ds.images.shape == (40, 3, size, size)
    expected = torch.stack([ref[i][IMAGE] for i in range(40)])
    if size == 28:
        assert torch.equal(ds.images, expected)
    else:
        torch.testing.assert_close(ds.images, expected, atol=1e-6, rtol=0)
    assert torch.equal(ds.labels, torch.tensor([i % 4 for i in range(40)]))
    assert all(torch.equal(ds[i][IMAGE], ds.images[i]) for i in (0, 39))


def test_train_split_augments_per_item_and_exposes_batch_augment() -> None:
    items = _array_items(8)
    ds = make_dataset(items, build_transforms(28, True, False, seed=1), False, image_size=28)
    assert isinstance(ds.batch_augment, BatchAugment) and not ds.deterministic
    draws = [ds[0][IMAGE] for _ in range(12)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(ds.images[0], make_dataset(items, build_transforms(28, False, False),
                                                  False, image_size=28).images[0])


def test_build_workers_give_the_same_split(tmp_path: Path) -> None:
    synth = RunConfig(dataset="synthetic-pathology", num_samples=40, image_size=16, seed=3,
                      partitioner="iid")
    a = load_institution(synth.replace(num_workers=0), 0, 1)
    clear_caches()
    b = load_institution(synth.replace(num_workers=2), 0, 1)
    assert a is not b and torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.val.labels, b.val.labels)

    for c in range(2):
        for i in range(6):
            p = tmp_path / "f" / str(c) / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((20, 20, 3), 40 * i + c, np.uint8)).save(p)
    folder = RunConfig(dataset="folder", data_path=str(tmp_path / "f"), image_size=12)
    x0 = load_institution(folder.replace(num_workers=0), 0, 1).train.images
    clear_caches()
    x2 = load_institution(folder.replace(num_workers=2), 0, 1).train.images
    assert x0.shape[1:] == (3, 12, 12) and torch.equal(x0, x2)

    (tmp_path / "f" / "1" / "3.png").write_bytes(b"not an image")
    clear_caches()
    with pytest.raises(ImageDataError, match="3.png"):
        load_institution(folder.replace(num_workers=2), 0, 1)


def test_train_local_same_result_with_workers_and_tensor_rows() -> None:
    items = _array_items(36, size=16)
    plain = make_dataset(items, build_transforms(16, False, False), False, image_size=16)
    # tensor rows, item by item through a DataLoader, and both with 2 worker processes
    runs = {}
    for name, data, workers in [("rows", plain, 0), ("rows-w2", plain, 2),
                                ("items", Items(plain), 0), ("items-w2", Items(plain), 2)]:
        net = _net()
        runs[name] = (net, train_local(net, data, num_workers=workers, **_kw()))
    ref_net, ref = runs["rows"]
    for name, (net, metrics) in runs.items():
        assert _same_weights(ref_net, net), name
        assert metrics["train-loss"] == pytest.approx(ref["train-loss"], rel=1e-6), name


def test_train_local_batch_augmentation_depends_on_seed_not_workers() -> None:
    items = _array_items(36, size=16)
    aug = make_dataset(items, build_transforms(16, True, False, seed=0), False, image_size=16)
    plain = make_dataset(items, build_transforms(16, False, False), False, image_size=16)
    nets = [_net() for _ in range(4)]
    train_local(nets[0], aug, num_workers=0, **_kw())
    train_local(nets[1], aug, num_workers=2, **_kw())
    train_local(nets[2], aug, num_workers=0, **_kw(seed=6))
    train_local(nets[3], plain, num_workers=0, **_kw())
    assert _same_weights(nets[0], nets[1])
    assert not _same_weights(nets[0], nets[2])
    assert not _same_weights(nets[0], nets[3])  # the augmentation was applied


def test_batch_augment_draws_dihedral_transforms_from_the_seed() -> None:
    x = torch.arange(64 * 2 * 5 * 5, dtype=torch.float32).reshape(64, 2, 5, 5)
    aug = BatchAugment()
    out = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, aug(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, aug(x, torch.Generator().manual_seed(1)))
    group = [lambda t, k=k, f=f: t.flip(*f).rot90(k, (1, 2)) if f else t.rot90(k, (1, 2))
             for k, f in itertools.product(range(4), [(), (1,)])]
    used = set()
    for i in range(64):
        hits = [j for j, g in enumerate(group) if torch.equal(g(x[i]), out[i])]
        assert hits, f"sample {i} is not a flip/rotation of its input"
        used.add(hits[0])
    assert len(used) >= 6  # most of the 8 symmetries occur in 64 draws
    codes = torch.tensor([8, 4, 1, 8 + 4 + 2])  # flip rows, flip columns, turn, all three
    expected = [x[0].flip(1), x[1].flip(2), x[2].rot90(1, (1, 2)), x[3].flip(1, 2).rot90(2, (1, 2))]
    assert all(torch.equal(a, b) for a, b in zip(aug.apply(x[:4], codes), expected, strict=True))
    with pytest.raises(ValueError, match="square"):
        aug(torch.zeros(2, 1, 4, 5), torch.Generator())


def test_extract_embeddings_same_for_tensor_rows_items_and_workers() -> None:
    items = _array_items(20, size=16)
    ds = make_dataset(items, build_transforms(16, False, False), False, image_size=16)
    bb = build_backbone("monai-resnet18", input_size=32, device="cpu")
    x_rows, y_rows = extract_embeddings(bb, ds, batch_size=6, device="cpu")
    x_items, y_items = extract_embeddings(bb, Items(ds), batch_size=7, device="cpu", num_workers=0)
    x_w2, y_w2 = extract_embeddings(bb, Items(ds), batch_size=6, device="cpu", num_workers=2)
    assert x_rows.shape == (20, bb.embed_dim)
    np.testing.assert_allclose(x_rows, x_items, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(x_rows, x_w2)
    assert (y_rows == y_items).all() and (y_rows == y_w2).all()
    assert (y_rows == np.arange(20) % 4).all()


def test_collate_pairs_plain_tensors_from_dicts_and_tuples() -> None:
    from monai.data import MetaTensor

    images, labels = collate_pairs([{IMAGE: MetaTensor(torch.ones(1, 2, 2)), LABEL: np.int64(3)},
                                    (torch.zeros(1, 2, 2), torch.tensor([1]))])
    assert type(images) is torch.Tensor and images.dtype == torch.float32
    assert labels.tolist() == [3, 1] and labels.dtype == torch.long
    with pytest.raises(ValueError, match="label"):
        collate_pairs([{IMAGE: torch.ones(1)}])


def test_worker_and_precision_settings() -> None:
    assert resolve_num_workers(3, "cpu") == 3 and resolve_num_workers(0, "cuda") == 0
    assert resolve_num_workers(None, "cpu") == 0 and resolve_num_workers(-1, "cpu") == 0
    assert resolve_precision("auto", "cpu") is None and resolve_precision("fp32", "cpu") is None
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("bf16", "cpu")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision"):
        build_backbone("monai-resnet18", input_size=32, device="cpu", precision="half")
    bb = build_backbone("monai-resnet18", input_size=32, device="cpu")
    assert "precision" not in bb.identity  # float32 cache keys are the ones written before


@pytest.mark.skipif(not SHARED_NPZ.is_file(), reason="../shared/data not available")
def test_real_npz_institution_is_a_tensor_split() -> None:
    cfg = RunConfig(dataset="medmnist", data_path=str(SHARED_NPZ), image_size=28,
                    partitioner="iid")
    inst = load_institution(cfg, 0, 2)
    assert isinstance(inst.train, ImageTensorDataset) and inst.train.batch_augment is not None
    assert isinstance(inst.val, ImageTensorDataset) and inst.val.deterministic
    src = load_medmnist(SHARED_NPZ)
    assert len(inst.train) + len(load_institution(cfg, 1, 2).train) == len(src.train)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_bf16_training_and_embedding() -> None:
    items = _array_items(64, size=16)
    aug = make_dataset(items, build_transforms(16, True, False, seed=0), False, image_size=16)
    net = _net()
    out = train_local(net, aug, **_kw(device="cuda", num_workers=2))
    assert np.isfinite(out["train-loss"])
    assert all(p.is_contiguous() for p in net.parameters())  # channels-last undone
    ref = _net()
    train_local(ref, aug, **_kw(device="cuda", precision="fp32"))
    ds = make_dataset(items, build_transforms(16, False, False), False, image_size=16)
    bb = build_backbone("monai-resnet18", input_size=32, device="cuda")
    assert bb.identity["precision"] == "bfloat16"
    x16, _ = extract_embeddings(bb, ds, device="cuda")
    x32, _ = extract_embeddings(build_backbone("monai-resnet18", input_size=32, device="cuda",
                                               precision="fp32"), Items(ds), num_workers=2)
    cos = (x16 * x32).sum(1) / np.linalg.norm(x16, axis=1) / np.linalg.norm(x32, axis=1)
    assert cos.min() > 0.99
