"""Is the accelerator busy? flower-focal's data path end to end against the raw network, same run.

    python benchmarks/bench_gpu_path.py --smoke                      # CPU, small sizes (~1-2 min)
    python benchmarks/bench_gpu_path.py --device cuda --out r.json   # full size (< 4 min, H200)

Measures what ``tools/gpu-probe`` measures, through the project's own API:

* ``embed``: FOCAL's embed step. The raw backbone network (``Backbone.module`` on tensors
  already on the device, at the backbone's input size, in float32 and at the project's
  precision) against ``load_split`` + ``extract_embeddings`` end to end (dataset build time
  included), for an ``.npz`` of 28 px tiles (40,000; PathMNIST tiles repeated with noise)
  and for a class folder of 512 px JPEGs (2,400) resized to 224 by the data layer;
* ``train``: ``load_institution`` + ``train_local`` (one epoch after a warm-up epoch) against
  a raw loop (one fixed batch on the device, same model, batch size and precision) for
  small-cnn at 28 px and, on CUDA, MONAI ResNet-18 at 128 px.

``share`` is project img/s over raw img/s. Prints one JSON object (and rewrites ``--out`` after
every section, so a run cut short by a time limit still leaves what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import ROOT, emit, loadavg, machine, shared_npz

from flower_focal.config import RunConfig
from flower_focal.data import clear_caches, load_institution, load_split
from flower_focal.data.loader import resolve_num_workers
from flower_focal.models import build_model
from flower_focal.models.backbones import build_backbone
from flower_focal.models.embeddings import extract_embeddings
from flower_focal.training import autocast, resolve_precision, train_local

FULL = {"npz_n": 40_000, "jpeg_n": 2_400, "embed_bs": 256, "train_n": 8_192, "train_bs": 128,
        "raw_reps": 10, "rounds": 2}
SMOKE = {"npz_n": 64, "jpeg_n": 30, "embed_bs": 32, "train_n": 2_048, "train_bs": 64,
         "raw_reps": 1, "rounds": 3}
"""``rounds``: project and raw timings alternate this many times; the best of each is kept (on a
shared machine the other load only ever slows a timing down)."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def raw_rate(fn: Any, x: torch.Tensor, device: torch.device, reps: int,
             warmup: int = 2) -> float:
    """Images per second of ``fn(x)`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn(x)
    _, seconds = timed(lambda: [fn(x) for _ in range(reps)], device)
    return reps * x.shape[0] / seconds


def tiles_npz(src: Path | None, n: int, out: Path) -> Path:
    """An npz of ``n`` 28 px RGB tiles: PathMNIST tiles repeated with noise (random tiles when
    the file is absent), 9 classes."""
    rng = np.random.default_rng(0)
    if src is not None:
        with np.load(src) as z:
            imgs, labs = z["train_images"], z["train_labels"].reshape(-1)
    else:
        imgs, labs = rng.integers(0, 256, (500, 28, 28, 3), dtype=np.uint8), np.arange(500) % 9
    rep = n // len(imgs) + 1
    big = np.tile(imgs, (rep, 1, 1, 1))[:n].astype(np.int16) + rng.integers(-8, 9, (n, 28, 28, 3))
    path = out / "tiles.npz"
    np.savez(path, train_images=np.clip(big, 0, 255).astype(np.uint8),
             train_labels=np.tile(labs, rep)[:n], val_images=imgs[:50], val_labels=labs[:50])
    return path


def jpeg_folder(n: int, out: Path, unique: int = 120) -> Path:
    """A class folder (3 classes) of ``n`` 512 px JPEGs: ``unique`` drawn ones, the rest copies
    (each file is still decoded on its own)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    root = out / "folder"
    per = n // 3
    for c in range(3):
        d = root / f"grade{c}"
        d.mkdir(parents=True)
        for i in range(per):
            if i < unique // 3:
                im = Image.fromarray(rng.integers(0, 60, (512, 512, 3), dtype=np.uint8))
                ImageDraw.Draw(im).ellipse((16, 16, 496, 496), fill=(150 + 30 * c, 60, 20))
                im.save(d / f"{i}.jpg", quality=90)
            else:
                shutil.copyfile(d / f"{i % (unique // 3)}.jpg", d / f"{i}.jpg")
    return root


def embed_section(device: torch.device, size: dict[str, int], tmp: Path, npz_src: Path | None,
                  precision: str, out: dict[str, Any], save: Any) -> None:
    bb = build_backbone("efficientnet-lite0", input_size=224, device=device, precision=precision)
    amp = bb.autocast_dtype
    bs, reps = size["embed_bs"], size["raw_reps"]
    x = torch.rand(bs, 3, 224, 224, device=device) * 2 - 1
    out.update(backbone="efficientnet-lite0@224", batch_size=bs,
               autocast=str(amp).removeprefix("torch.") if amp else "fp32")
    with torch.no_grad():
        pre = bb.preprocess(x)
        if amp is not None:  # the network as the project runs it: channels-last, autocast
            pre = pre.contiguous(memory_format=torch.channels_last)

    def raw_net(warmup: int = 1) -> float:
        with torch.no_grad(), autocast(device, amp):
            return raw_rate(bb.module, pre, device, reps, warmup)

    raws = [raw_net(warmup=2)]
    if amp is not None:
        with torch.no_grad():
            bb.module.to(memory_format=torch.contiguous_format)
            out["raw_net_fp32_img_s"] = round(raw_rate(bb.module, pre.contiguous(), device, reps))
            bb.module.to(memory_format=torch.channels_last)
    x28 = torch.rand(bs, 3, 28, 28, device=device) * 2 - 1
    out["embed_api_28to224_img_s"] = round(raw_rate(bb.embed, x28, device, reps))
    save()

    def end_to_end(name: str, cfg: RunConfig) -> None:
        best: dict[str, float] = {}
        for _ in range(size["rounds"]):
            clear_caches()
            ds, build = timed(lambda: load_split(cfg, "train"), device)
            (feats, _), emb = timed(
                lambda: extract_embeddings(bb, ds, batch_size=bs, device=device),  # noqa: B023
                device)
            best["build"] = min(best.get("build", build), build)
            best["embed"] = min(best.get("embed", emb), emb)
            best["e2e"] = min(best.get("e2e", build + emb), build + emb)
            raws.append(raw_net())
        raw = max(raws)
        n = len(feats)
        out[name] = {"n": n, "dataset_build_s": round(best["build"], 2),
                     "embed_img_s": round(n / best["embed"]),
                     "end_to_end_img_s": round(n / best["e2e"]), "raw_net_img_s": round(raw),
                     "share_of_raw": round(n / best["e2e"] / raw, 3),
                     "embed_share_of_raw": round(n / best["embed"] / raw, 3)}
        save()

    end_to_end("npz28_to224", RunConfig(dataset="medmnist", image_size=28,
                                        data_path=str(tiles_npz(npz_src, size["npz_n"], tmp))))
    folder, gen = timed(lambda: jpeg_folder(size["jpeg_n"], tmp), device)
    out["jpeg_generation_s"] = round(gen, 2)
    end_to_end("folder512_to224", RunConfig(dataset="folder", data_path=str(folder),
                                            image_size=224))
    out["raw_net_img_s"] = round(max(raws))
    out.setdefault("raw_net_fp32_img_s", out["raw_net_img_s"])


def train_section(device: torch.device, size: dict[str, int], tmp: Path, npz_src: Path | None,
                  precision: str, out: dict[str, Any], save: Any) -> None:
    n, bs = size["train_n"], size["train_bs"]
    path = tiles_npz(npz_src, n, tmp)
    amp = resolve_precision(precision, device)
    models = [("small-cnn", 28)] + ([("resnet18", 128)] if device.type == "cuda" else [])
    for model_name, image_size in models:
        clear_caches()
        cfg = RunConfig(dataset="medmnist", data_path=str(path), image_size=image_size,
                        partitioner="iid", model=model_name)
        inst, build = timed(lambda: load_institution(cfg, 0, 1), device)  # noqa: B023
        ds = inst.train
        kw = {"epochs": 1, "lr": 0.01, "batch_size": bs, "momentum": 0.9, "weight_decay": 0.0,
              "optimizer": "sgd", "device": device, "precision": precision}
        model = build_model(model_name, 3, 9, image_size).to(device)
        train_local(model, ds, seed=0, **kw)  # warm-up (allocator, cuDNN)
        steps = len(ds) // bs

        def raw_loop(autocast_dtype: torch.dtype | None, steps: int = steps) -> float:
            torch.manual_seed(0)
            net = build_model(model_name, 3, 9, image_size).to(device)  # noqa: B023
            x = torch.randn(bs, 3, image_size, image_size, device=device)  # noqa: B023
            if autocast_dtype is not None:
                net.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 9, (bs,), device=device)
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                with autocast(device, autocast_dtype):
                    logits = net(x)
                F.cross_entropy(logits.float(), y).backward()
                opt.step()

            for _ in range(5):
                step()
            _, secs = timed(lambda: [step() for _ in range(steps)], device)  # noqa: B023
            return steps * bs / secs

        projects, raws = [], []
        for r in range(size["rounds"]):
            _, seconds = timed(lambda: train_local(model, ds, seed=1 + r, **kw),  # noqa: B023
                               device)
            projects.append(steps * bs / seconds)
            raws.append(raw_loop(amp))
        project, raw = max(projects), max(raws)
        row = {"image_size": image_size, "n_train": len(ds), "batch_size": bs,
               "dataset_build_s": round(build, 2), "train_local_img_s": round(project),
               "raw_loop_img_s": round(raw), "ratio": round(project / raw, 3)}
        if amp is not None:
            fp32 = raw_loop(None)
            row.update(raw_loop_fp32_img_s=round(fp32), ratio_to_fp32_raw=round(project / fp32, 3))
        out[model_name] = row
        save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes (CPU check)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16")
    parser.add_argument("--npz", default=None, help="source of the 28 px tiles "
                        "(default: ../shared/data/pathmnist or .gpu-probe/pathmnist.npz)")
    parser.add_argument("--sections", nargs="+", default=["embed", "train"],
                        choices=["embed", "train"])
    parser.add_argument("--train-n", type=int, default=None)
    parser.add_argument("--train-batch", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the JSON here (after each section)")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    size = dict(SMOKE if args.smoke else FULL)
    if args.train_n:
        size["train_n"] = args.train_n
    if args.train_batch:
        size["train_bs"] = args.train_batch
    npz_src = Path(args.npz) if args.npz else (shared_npz("pathmnist") or next(
        (p for p in [ROOT / ".gpu-probe" / "pathmnist.npz"] if p.is_file()), None))
    result: dict[str, Any] = {
        "benchmark": "gpu_path", "smoke": args.smoke, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "precision": args.precision,
        "num_workers_auto": resolve_num_workers(None, device),
        "torch_threads": torch.get_num_threads(), "sizes": size,
        "tiles_from": str(npz_src) if npz_src else "random", "machine": machine(),
        "loadavg_before": loadavg(),
    }
    start = time.perf_counter()

    def save() -> None:
        result["wall_s"] = round(time.perf_counter() - start, 1)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        for section in args.sections:
            sub = Path(tmp) / section
            sub.mkdir()
            fn = embed_section if section == "embed" else train_section
            result[section] = {}
            save()
            fn(device, size, sub, npz_src, args.precision, result[section], save)
            result["wall_s"] = round(time.perf_counter() - start, 1)
            save()
    result["loadavg_after"] = loadavg()
    save()
    emit(result)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
