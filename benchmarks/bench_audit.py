"""Privacy audit: leakage rates of gradient inversion against what the server observes.

    python benchmarks/bench_audit.py                          # every case below
    python benchmarks/bench_audit.py --cases lenet-bs1-path,he-server --samples 8

Each case is one :func:`flower_focal.audit.run_audit` (a real federated round through the
library's ClientApp handlers, then the attack). Leakage rule: a sample leaks when its
reconstruction reaches SSIM >= 0.6 to the true image. Real images from ../shared/data
(PathMNIST, RetinaMNIST; the synthetic stand-ins when absent, flagged in each case's "data").
Prints one JSON object; timings carry the load average because the machine is shared.
The README's audit table is rendered from ``benchmarks/results/audit.json`` by
``python benchmarks/readme_tables.py --write``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from _common import emit, loadavg, machine

from flower_focal.audit import AuditConfig, run_audit

LENET = {"model": "lenet-sigmoid", "batch_size": 1, "local_steps": 1}


def cases(samples: int, main_samples: int) -> dict[str, dict[str, Any]]:
    """Case name -> AuditConfig fields (iterations: L-BFGS evaluations)."""
    return {
        "lenet-bs1-path": {**LENET, "dataset": "pathmnist", "num_samples": main_samples},
        "lenet-bs1-path-idlg": {**LENET, "dataset": "pathmnist", "num_samples": samples,
                                "attack": "idlg", "iterations": 1000},
        "lenet-bs1-retina": {**LENET, "dataset": "retinamnist", "num_samples": main_samples},
        "lenet-bs4-path": {**LENET, "dataset": "pathmnist", "num_samples": samples, "batch_size": 4,
                           "iterations": 1000},
        "lenet-bs1-5steps-path": {**LENET, "dataset": "pathmnist", "num_samples": samples,
                                  "local_steps": 5},
        "smallcnn-bs1-path": {"model": "small-cnn", "batch_size": 1, "dataset": "pathmnist",
                              "num_samples": samples, "iterations": 1000},
        "smallcnn-bs32-path": {"model": "small-cnn", "batch_size": 32, "dataset": "pathmnist",
                               "num_samples": 32, "iterations": 400},
        "lenet-bs1-dp-z0.001": {**LENET, "dataset": "pathmnist", "num_samples": samples,
                                "dp_clip_norm": 0.1, "dp_noise_multiplier": 0.001},
        "lenet-bs1-dp-z0.01": {**LENET, "dataset": "pathmnist", "num_samples": samples,
                               "dp_clip_norm": 0.1, "dp_noise_multiplier": 0.01},
        "he-fedavg-m1": {**LENET, "strategy": "he-fedavg", "dataset": "pathmnist",
                         "num_samples": samples, "aggregate_size": 1},
        "he-fedavg-m4": {**LENET, "strategy": "he-fedavg", "dataset": "pathmnist",
                         "num_samples": samples, "aggregate_size": 4, "iterations": 1000},
        "focal": {**LENET, "strategy": "focal", "dataset": "pathmnist", "num_samples": samples,
                  "lr": 0.5},
    }


def _row(block: dict[str, Any]) -> dict[str, Any]:
    return {
        "leakage_rate": block.get("leakage_rate"),
        "ssim_only_leakage_rate": block.get("ssim_only_leakage_rate"),
        "attacked": block.get("attacked"),
        "ssim_median": (block.get("ssim_summary") or {}).get("median"),
        "ssim_q25_q75": [(block.get("ssim_summary") or {}).get("q25"), (block.get("ssim_summary") or {}).get("q75")],
        "psnr_median": (block.get("psnr_summary") or {}).get("median"),
        "label_accuracy": block.get("label_accuracy"),
        "attack_s": block.get("attack_s"),
    }


def run_case(name: str, fields: dict[str, Any]) -> dict[str, Any]:
    cfg = AuditConfig(**fields)
    load_before = loadavg()
    result = run_audit(cfg)
    out: dict[str, Any] = {
        "case": name,
        "strategy": cfg.strategy, "model": cfg.model, "batch_size": cfg.batch_size,
        "local_steps": cfg.local_steps, "attack": cfg.attack, "iterations": cfg.iterations,
        "data": result["data"],
        "server": {"attackable": result["attackable"], **_row(result)},
        "wall_time_s": result["wall_time_s"],
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }
    if result.get("dp"):
        dp = result["dp"]
        out["dp"] = {"clip_norm": dp["clip_norm"], "noise_multiplier": dp["noise_multiplier"]}
        if dp.get("after_noise"):
            out["dp"]["after_noise"] = {"noise_std": dp["after_noise"]["noise_std"], **_row(dp["after_noise"])}
    inst = result.get("institution_side")
    if inst:
        out["institution_side"] = {"attackable": inst["attackable"], **_row(inst)}
        if "victims_per_aggregate" in inst:
            out["institution_side"]["victims_per_aggregate"] = inst["victims_per_aggregate"]
        if inst.get("applicable") is False:
            out["institution_side"]["applicable"] = False
    if not result["attackable"]:
        out["server"]["checks"] = [c["outcome"][:90] for c in result.get("checks", [])]
    print(f"[bench_audit] {name}: server {out['server']['leakage_rate']}"
          + (f", institution {out['institution_side']['leakage_rate']}" if inst else "")
          + (f", after noise {out['dp']['after_noise']['leakage_rate']}" if result.get("dp") else "")
          + f" ({result['wall_time_s']} s)", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="attacked images per case")
    parser.add_argument("--main-samples", type=int, default=32,
                        help="attacked images of the two headline lenet batch-1 cases")
    parser.add_argument("--cases", default="", help="comma-separated subset of case names")
    args = parser.parse_args()
    table = cases(args.samples, args.main_samples)
    chosen = [c for c in args.cases.split(",") if c] or list(table)
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(table)}")
    start = time.time()
    results = [run_case(name, table[name]) for name in chosen]
    emit({
        "benchmark": "audit",
        "rule": "leak = reconstruction SSIM >= 0.6 to the true image (best of the 8 "
                "augmentation flips/rotations; Hungarian matching within a batch)",
        "machine": machine(),
        "cases": results,
        "total_wall_time_s": round(time.time() - start, 1),
        "loadavg_end": loadavg(),
    })


if __name__ == "__main__":
    main()
