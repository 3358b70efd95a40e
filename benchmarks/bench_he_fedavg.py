"""HE-FedAvg vs FedAvg: bytes, crypto times, error, and round wall time in the same simulation.

    python benchmarks/bench_he_fedavg.py                                  # 1M + 11M, all presets
    python benchmarks/bench_he_fedavg.py --models medium-cnn --presets compact nvflare
    python benchmarks/bench_he_fedavg.py --auroc-rounds 20                # + PathMNIST AUROC, 5 institutions

Part 1 (micro, per preset, at each model's exact parameter count, 10 institutions):
upload/download bytes per parameter, client encrypt/decrypt time, server aggregation time,
relative error (benchmarks/bench_crypto.py:bench_preset).
Part 2 (simulation): the same Flower Ray simulation (10 institutions, synthetic pathology
tiles, --image-size px (28), 1 local epoch) run with fedavg and with he-fedavg per preset, for each workload
in --images-per-institution; ratio of the mean round wall time of the rounds after
--warmup-rounds (default 1: round 1 downloads a plaintext model; each Ray worker also builds
the cached data of every institution it meets for the first time, so with many institutions
per worker the early rounds carry that one-off work: raise --warmup-rounds with --rounds for a
steady state) he / plain (and the ratio of medians, less sensitive to one
slow round; every round's wall time is listed), the CPU seconds the whole machine spent on
each run (/proc/stat; whole runs, start-up included, so run it on an otherwise idle
machine) with the HE CPU overhead per round and the CPU ratio, which do not depend on how
the scheduler interleaved the run's processes, and that overhead split into the CPU seconds
of HE's own work (institutions' encryptions and decryptions, the server's summing and
serialising, as each reported them) and the rest (moving the larger messages through Flower
and Ray), the HE overhead in seconds per round (which does not
grow with the data, so the ratio falls as institutions hold more images), the training
replies summed per round and every failure the run recorded (a preset whose run fails is
reported with its error; the others still run).
Part 3 (optional): PathMNIST macro AUROC / accuracy of he-fedavg next to fedavg, 5
institutions, val split, via `flower-focal evaluate`, and of a control: fedavg with the
learning rate changed by 1e-7 (relative), which shows how much this training regime alone
moves after many rounds from a perturbation as small as CKKS's error.
Prints one JSON object. The README's HE-FedAvg tables are rendered from
``benchmarks/results/he_fedavg-*.json`` (each this script's printed JSON, verbatim, after a
``provenance`` field) by ``python benchmarks/readme_tables.py --write``; store a new run's
output there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import emit, loadavg, machine, machine_cpu_s, shared_npz
from bench_crypto import bench_preset

from flower_focal import wire
from flower_focal.config import RunConfig
from flower_focal.crypto import PRESETS
from flower_focal.models import build_model, count_parameters
from flower_focal.simulation import Federation, simulate


def _walls(rounds: list[dict]) -> list[float]:
    """Wall time of every round (round 1 has a plaintext download, so it is not averaged)."""
    return [round(r["wall_time_s"], 2) for r in rounds]


def _cpu_since(start: float | None) -> float | None:
    end = machine_cpu_s()
    return None if start is None or end is None else round(end - start, 1)


def _failures(rounds: list[dict]) -> dict:
    """Per round: training replies summed, and every failure line the run recorded."""
    return {
        "train_replies_per_round": [len(r["train_institutions"]) for r in rounds],
        "failures": [f"round {r['round']}: {f}" for r in rounds for f in r["failures"]],
    }


def he_cpu_breakdown(rounds: list[dict]) -> dict:
    """HE's own CPU seconds per round (mean over all rounds, as the run's CPU overhead is).

    Institutions report the CPU seconds of their decryptions and encryptions in their reply
    metrics and the server its summing and serialising in the round's ``timings``; what the
    run's CPU overhead holds beyond these is everything else HE costs (moving the larger
    messages through Flower and Ray, pickling them, fresh memory).
    """
    def inst(r: dict, phase: str, key: str) -> float:
        return sum(m.get(key, 0.0) for m in r[f"{phase}_institutions"].values())

    parts = {
        "institutions_encrypt": [inst(r, "train", wire.HE_ENCRYPT_CPU_S) for r in rounds],
        "institutions_decrypt": [inst(r, "train", wire.HE_DECRYPT_CPU_S) + inst(r, "evaluate", wire.HE_DECRYPT_CPU_S)
                                 for r in rounds],
        "server_sum": [r["timings"].get(wire.HE_SUM_CPU_S, 0.0) for r in rounds],
        "server_serialize": [r["timings"].get(wire.HE_SERIALIZE_CPU_S, 0.0) for r in rounds],
    }
    out = {k: round(statistics.mean(v), 2) for k, v in parts.items()}
    out["total"] = round(sum(out.values()), 2)
    encrypt_walls = [m[wire.HE_ENCRYPT_S] for r in rounds for m in r["train_institutions"].values()
                     if wire.HE_ENCRYPT_S in m]
    out["encrypt_wall_s_per_upload"] = round(statistics.mean(encrypt_walls), 2) if encrypt_walls else None
    return out


def simulation_ratio(model: str, presets: list[str], args, out: Path, images: int) -> dict:
    base = RunConfig(
        dataset="synthetic-pathology", num_samples=images * args.institutions,
        image_size=args.image_size, model=model, num_server_rounds=args.rounds, partitioner="iid",
        min_available_nodes=args.institutions, seed=1, local_epochs=1,
    )
    fed = Federation(num_supernodes=args.institutions)
    cpu0 = machine_cpu_s()
    plain = simulate(base.replace(run_dir=str(out / f"{model}-{images}-fedavg")), fed, echo=False)
    plain_cpu = _cpu_since(cpu0)
    plain_rounds = plain.metrics()["rounds"]
    plain_walls = _walls(plain_rounds)
    skip = args.warmup_rounds
    plain_wall = statistics.mean(plain_walls[skip:])
    rows = {"images_per_institution": images, "image_size": args.image_size,
            "fedavg_round_wall_s": round(plain_wall, 2), "fedavg_round_walls_s": plain_walls,
            "fedavg_run_cpu_s": plain_cpu, "fedavg_loadavg": loadavg(), "presets": {}}
    for preset in presets:
        cfg = base.replace(strategy="he-fedavg", he_preset=preset, run_dir=str(out / f"{model}-{images}-{preset}"))
        cpu0 = machine_cpu_s()
        try:
            he = simulate(cfg, fed, echo=False)
        except Exception as exc:  # report the preset's failure and go on with the others
            rows["presets"][preset] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            continue
        he_cpu = _cpu_since(cpu0)
        he_rounds = he.metrics()["rounds"]
        breakdown = he_cpu_breakdown(he_rounds)
        cpu = {"he_cpu_s_per_round": breakdown}
        if he_cpu is not None and plain_cpu is not None:
            overhead = (he_cpu - plain_cpu) / args.rounds
            cpu |= {"run_cpu_s": he_cpu,
                    "cpu_overhead_s_per_round": round(overhead, 2),
                    "cpu_overhead_beyond_crypto_s_per_round": round(overhead - breakdown["total"], 2),
                    "cpu_ratio_vs_fedavg": round(he_cpu / plain_cpu, 2)}
        walls = _walls(he_rounds)
        wall = statistics.mean(walls[skip:])
        last = he_rounds[-1]
        rows["presets"][preset] = {
            "round_wall_s": round(wall, 2),
            "round_walls_s": walls,
            "ratio_vs_fedavg": round(wall / plain_wall, 2),
            "ratio_of_medians": round(statistics.median(walls[skip:]) / statistics.median(plain_walls[skip:]), 2),
            "overhead_s_per_round": round(wall - plain_wall, 2),
            **cpu,
            "loadavg": loadavg(),
            **_failures(he_rounds),
            "bytes_up_per_round": last["bytes_up"],
            "bytes_down_per_round": last["bytes_down"],
            "val_auroc_he": last["evaluate"].get("auroc"),
            "val_auroc_plain": plain_rounds[-1]["evaluate"].get("auroc"),
        }
    return rows


def break_even(rows: list[dict], presets: list[str], target: float = 1.25) -> dict:
    """Per preset: the workload at which the ratio reaches ``target``, from the measured rows.

    Fits the FedAvg round as ``a + b * images`` through the smallest and largest workload and
    takes the HE overhead per round as the mean over the workloads (it does not grow with the
    data), so ``ratio <= target`` once ``a + b * images >= overhead / (target - 1)``. A model
    of two points: it says where to look, the rows say what was measured.
    """
    ok = [r for r in rows if r["images_per_institution"] > 0]
    if len(ok) < 2:
        return {}
    lo, hi = min(ok, key=lambda r: r["images_per_institution"]), max(ok, key=lambda r: r["images_per_institution"])
    di = hi["images_per_institution"] - lo["images_per_institution"]
    if di <= 0:
        return {}
    b = (hi["fedavg_round_wall_s"] - lo["fedavg_round_wall_s"]) / di
    a = lo["fedavg_round_wall_s"] - b * lo["images_per_institution"]
    out = {"fedavg_round_s_fixed": round(a, 2), "fedavg_round_s_per_image": round(b, 5)}
    for preset in presets:
        over = [r["presets"][preset]["overhead_s_per_round"] for r in ok
                if "overhead_s_per_round" in r["presets"].get(preset, {})]
        if not over or b <= 0:
            continue
        h = statistics.mean(over)
        need = h / (target - 1.0)
        out[preset] = {"overhead_s_per_round": round(h, 2), "fedavg_round_s_needed": round(need, 1),
                       "images_per_institution_needed": max(0, round((need - a) / b))}
    return out


def pathmnist_auroc(args, out: Path) -> dict:
    data = shared_npz("pathmnist")
    if data is None:
        return {"skipped": "../shared/data/pathmnist absent"}
    res = {}
    # The third run is plain FedAvg with the learning rate moved by one part in 10^7: how far
    # this training regime itself drifts from a perturbation the size of CKKS's error, i.e.
    # the yardstick for the he-fedavg / fedavg difference after many rounds.
    runs = {"fedavg": ("fedavg", 0.05), "he-fedavg": ("he-fedavg", 0.05),
            "fedavg-lr-1e-7-perturbed": ("fedavg", 0.05 * (1 + 1e-7))}
    for name, (strategy, lr) in runs.items():
        cfg = RunConfig(
            strategy=strategy, dataset="medmnist", data_path=str(data), image_size=32,
            num_server_rounds=args.auroc_rounds, local_epochs=2, lr=lr, partitioner="iid",
            min_available_nodes=5, seed=42, run_dir=str(out / f"pathmnist-{name}"),
        )
        run = simulate(cfg, Federation(num_supernodes=5), echo=False)
        ev = subprocess.run(
            [sys.executable, "-m", "flower_focal.cli", "evaluate", "--run-dir", str(run.run_dir),
             "--data", str(data), "--split", "val"], capture_output=True, text=True, check=True)
        final = json.loads(ev.stdout)
        res[name] = {"val_auroc_macro": round(final["auroc_macro"], 4),
                     "val_accuracy": round(final["accuracy"], 4), "wall_s": round(run.wall_time_s, 1)}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["medium-cnn", "resnet18"])
    p.add_argument("--presets", nargs="+", default=sorted(PRESETS), choices=sorted(PRESETS))
    p.add_argument("--institutions", type=int, default=10)
    p.add_argument("--images-per-institution", type=int, nargs="+", default=[100, 1000],
                   help="workloads: the plain round time grows with them, the HE overhead does not")
    p.add_argument("--image-size", type=int, default=28,
                   help="side of the synthetic tiles (training cost grows with it; HE cost does not)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup-rounds", type=int, default=1,
                   help="leading rounds left out of the means and medians (data-cache warm-up)")
    p.add_argument("--auroc-rounds", type=int, default=0, help="PathMNIST rounds (0 = skip part 3)")
    p.add_argument("--skip-micro", action="store_true")
    p.add_argument("--skip-simulation", action="store_true")
    args = p.parse_args()
    if not 0 <= args.warmup_rounds < args.rounds:
        p.error(f"--warmup-rounds must be in 0..{args.rounds - 1} (--rounds {args.rounds})")
    result = {"benchmark": "he_fedavg_vs_fedavg", "machine": machine(), "settings": vars(args), "models": {}}
    with tempfile.TemporaryDirectory(prefix="ff-he-") as tmp:
        for model in args.models:
            n_params = count_parameters(build_model(model, 3, 9, 28))
            entry: dict = {"params": n_params}
            if not args.skip_micro:
                entry["micro"] = [bench_preset(pr, n_params, args.institutions, 0, 0) for pr in args.presets]
            if not args.skip_simulation:
                entry["simulation"] = [simulation_ratio(model, args.presets, args, Path(tmp), images)
                                       for images in args.images_per_institution]
                entry["break_even"] = break_even(entry["simulation"], args.presets)
            result["models"][model] = entry
        if args.auroc_rounds:
            result["pathmnist"] = pathmnist_auroc(args, Path(tmp))
    emit(result)


if __name__ == "__main__":
    main()
