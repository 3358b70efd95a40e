"""FOCAL at simulation scale: 100 institutions in one Flower Ray simulation.

    python benchmarks/bench_focal_scale.py                                # 100 institutions, 3 rounds
    python benchmarks/bench_focal_scale.py --institutions 20 100 --rounds 2

Runs ``strategy=focal`` through Flower's Ray simulation engine (``flwr run`` via
``flower_focal.simulation.simulate``, a temporary ``focal`` key set) on the built-in synthetic
fundus images (5 classes, IID, ``--images-per-institution`` training images each), with the
default frozen backbone (EfficientNet-Lite0, ImageNet weights) at ``--input-size`` px. Round 1
includes the one-off embed exchange (every institution embeds, encrypts and uploads its
embeddings); every round then takes ``--steps-per-round`` FOCAL steps with all institutions
and a federated evaluation on ``--fraction-evaluate`` of them (each evaluated institution gets
only its own encrypted validation logits, computed by the server on the encrypted validation
embeddings uploaded with the embed exchange). Reported per round: wall time, replies, bytes
(up, down, and evaluation's share of down, in all and per evaluated institution), the
server's seconds for the evaluation forward passes, federated validation AUROC / accuracy;
peak RSS of the whole process tree
(SuperLink, Ray workers, ServerApp: an upper bound, shared pages counted per process); the
load average before and after. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import TreeMemorySampler, emit, loadavg, machine

from flower_focal import wire
from flower_focal.config import RunConfig
from flower_focal.simulation import Federation, simulate

# what the server spent on evaluation forward passes per round
FORWARD_S = wire.FOCAL_EVALUATE_FORWARD_S


def one(n: int, args: argparse.Namespace, out: Path) -> dict:
    cfg = RunConfig(
        strategy="focal",
        num_server_rounds=args.rounds,
        num_samples=args.images_per_institution * n,
        dataset="synthetic-retina",
        partitioner="iid",
        min_partition_size=1,
        image_size=args.image_size,
        min_available_nodes=n,
        fraction_evaluate=args.fraction_evaluate,
        lr=args.lr,
        backbone=args.backbone,
        backbone_input_size=args.input_size,
        embedding_cache_dir=str(out / "emb"),
        focal_steps_per_round=args.steps_per_round,
        device="cpu",
        run_dir=str(out / f"n{n}"),
        seed=0,
    )
    fed = Federation(num_supernodes=n, client_cpus=args.client_cpus)
    # this run's own FLWR_HOME marks its processes (other simulations on the machine are not counted)
    home = Path(tempfile.mkdtemp(prefix="flower-focal-home-focal-scale-"))
    load_before = loadavg()
    with TreeMemorySampler(marker=str(home)) as mem:
        t0 = time.time()
        result = simulate(cfg, fed, echo=False, timeout_s=args.timeout, flwr_home=home)
        wall = time.time() - t0
    metrics = result.metrics()
    rounds = [{
        "round": r["round"],
        "wall_s": round(r["wall_time_s"], 2),
        "train_replies": len(r["train_institutions"]),
        "evaluate_replies": len(r["evaluate_institutions"]),
        "failures": len(r["failures"]),
        "bytes_up_mib": round(r["bytes_up"] / 2**20, 1),
        "bytes_down_mib": round(r["bytes_down"] / 2**20, 1),
        # evaluation's share of bytes_down (absent in metrics.json before it was recorded)
        "evaluate_bytes_down_mib": (round(r["bytes_down_evaluate"] / 2**20, 2)
                                    if "bytes_down_evaluate" in r else None),
        "evaluate_bytes_down_per_institution_kib": (
            round(r["bytes_down_evaluate"] / 2**10 / len(r["evaluate_institutions"]), 1)
            if r.get("bytes_down_evaluate") and r["evaluate_institutions"] else None),
        "evaluate_server_forward_s": (round(r["timings"][FORWARD_S], 2)
                                      if FORWARD_S in r.get("timings", {}) else None),
        "train_loss": r["train"].get("train-loss"),
        "val_auroc": r["evaluate"].get("auroc"),
        "val_accuracy": r["evaluate"].get("accuracy"),
    } for r in metrics["rounds"]]
    last = metrics["rounds"][-1]
    return {
        "institutions": n,
        "status": metrics["status"],
        "images_train_total": cfg.num_samples,
        "images_per_institution": args.images_per_institution,
        "model_parameters": metrics["info"].get("model_parameters"),
        "rounds": rounds,
        "round1_includes_embed_exchange": True,
        "final_val_auroc": last["evaluate"].get("auroc"),
        "final_val_accuracy": last["evaluate"].get("accuracy"),
        "final_val_examples": last["evaluate"].get("num-examples"),
        "simulation_wall_s": round(wall, 1),
        "peak_rss_gib": round(mem.peak_kib / 2**20, 2),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--institutions", type=int, nargs="+", default=[100])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-per-round", type=int, default=1)
    p.add_argument("--images-per-institution", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--input-size", type=int, default=32, help="backbone input size (0: its default)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--fraction-evaluate", type=float, default=1.0)
    p.add_argument("--client-cpus", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ff-focal-scale-") as tmp:
        rows = [one(n, args, Path(tmp)) for n in args.institutions]
    emit({
        "benchmark": "simulation_scale_focal",
        "settings": vars(args),
        "note": "round wall_s from metrics.json (configure_train to aggregate_evaluate); round 1 "
                "adds the embed exchange (embedding, encryption and upload of every institution's "
                "training and validation images); evaluate_bytes_down_* is what evaluation sends "
                "(each institution's encrypted validation logits); simulation_wall_s adds SuperLink/Ray start-up and the describe query; "
                "peak_rss_gib sums RSS over the process tree (upper bound)",
        "machine": machine(),
        "results": rows,
    })


if __name__ == "__main__":
    main()
