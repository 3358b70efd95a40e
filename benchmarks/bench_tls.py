"""TLS + SuperNode authentication against --insecure on a loopback deployment: what does it cost?

    python benchmarks/bench_tls.py [--rounds 3] [--repeats 2]

Two loopback deployments are up at once, the secure default (HTTPS with a consortium CA,
SuperNode keys registered with ``flwr supernode register``, every Fleet request signed) and
``insecure=True`` (plain HTTP, open registration), each with 2 SuperNodes on the same synthetic
data. FedAvg runs of ``--rounds`` rounds alternate between them ``--repeats`` times, so machine
load hits both alike. Reported per mode: deployment start-up (secure: PKI + registration
included), mean round wall time (rounds 2..), whole-run wall, CPU seconds of the SuperLink and
SuperNode process trees over the runs, and the request latency of the SuperLink's ``/health``
on one kept-alive connection and on a new connection per request (TLS handshake each time).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, loadavg, machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flower_focal.config import RunConfig
from flower_focal.deployment import LoopbackDeployment
from flower_focal.simulation import _process_tree
from tests.conftest import write_synthetic_npz


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` and all their live descendants."""
    total = 0
    for pid in _process_tree(set(pids)):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def _latency_ms(dep: LoopbackDeployment, n_keepalive: int = 100, n_new: int = 30) -> dict:
    import httpx

    scheme = "http" if dep.insecure else "https"
    # one prebuilt SSL context for both modes (unused over http): a client built with
    # verify=True would load the system CA bundle each time and time that instead of the handshake
    verify = ssl.create_default_context(cafile=None if dep.insecure else str(dep.ca_cert))
    url = f"{scheme}://{dep.address}/health"
    with httpx.Client(verify=verify) as client:
        client.get(url)
        keep = []
        for _ in range(n_keepalive):
            t = time.perf_counter()
            client.get(url).raise_for_status()
            keep.append(time.perf_counter() - t)
    new = []
    for _ in range(n_new):
        t = time.perf_counter()
        with httpx.Client(verify=verify) as client:
            client.get(url).raise_for_status()
        new.append(time.perf_counter() - t)
    return {"health_keepalive_ms": round(1e3 * statistics.median(keep), 2),
            "health_new_connection_ms": round(1e3 * statistics.median(new), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    out: dict = {"benchmark": "tls_auth_vs_insecure", "machine": machine(), "strategy": "fedavg",
                 "supernodes": 2, "rounds": args.rounds, "repeats": args.repeats, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="ff-tls-") as tmp:
        tmp = Path(tmp)
        data = write_synthetic_npz(tmp / "site.npz", sizes=(200, 50, 50))
        nodes = [{"partition-id": i, "num-partitions": 2, "data-path": str(data)} for i in range(2)]
        base = RunConfig(strategy="fedavg", dataset="medmnist", image_size=28, num_server_rounds=args.rounds,
                         min_available_nodes=2, seed=1)
        deps: dict[str, LoopbackDeployment] = {}
        stats: dict[str, dict] = {}
        try:
            for mode in ("secure", "insecure"):
                t = time.time()
                deps[mode] = LoopbackDeployment(nodes, workdir=tmp / mode, insecure=mode == "insecure").start()
                stats[mode] = {"startup_s": round(time.time() - t, 1), "round_s": [], "run_s": [], "loadavg": []}
            for mode, dep in deps.items():
                stats[mode].update(_latency_ms(dep))
            for repeat in range(args.repeats):
                for mode in (("insecure", "secure") if repeat % 2 == 0 else ("secure", "insecure")):
                    dep = deps[mode]
                    pids = [p.pid for p in (dep.superlink, *dep.supernodes) if p is not None]
                    cpu0 = _cpu_s(pids)
                    result = dep.run(base.replace(run_dir=str(tmp / f"{mode}-{repeat}")))
                    stats[mode].setdefault("cpu_s", []).append(round(_cpu_s(pids) - cpu0, 1))
                    walls = [r["wall_time_s"] for r in result.metrics()["rounds"]]
                    assert len(walls) == args.rounds, walls
                    stats[mode]["round_s"] += walls[1:] or walls
                    stats[mode]["run_s"].append(round(result.wall_time_s, 1))
                    stats[mode]["loadavg"].append(loadavg()[0])
        finally:
            for dep in deps.values():
                dep.stop()
    for mode, s in stats.items():
        out["modes"][mode] = {
            "startup_s": s["startup_s"],
            "mean_round_s": round(statistics.mean(s["round_s"]), 2),
            "round_s": [round(w, 2) for w in s["round_s"]],
            "run_s": s["run_s"],
            "cpu_s_per_run": s["cpu_s"],  # SuperLink + SuperNodes + their ServerApp/ClientApp children
            "health_keepalive_ms": s["health_keepalive_ms"],
            "health_new_connection_ms": s["health_new_connection_ms"],
            "loadavg_1m": s["loadavg"],
        }
    sec, ins = out["modes"]["secure"], out["modes"]["insecure"]
    out["secure_over_insecure"] = {
        "round_time_ratio": round(sec["mean_round_s"] / ins["mean_round_s"], 3),
        "round_time_diff_s": round(sec["mean_round_s"] - ins["mean_round_s"], 2),
        "cpu_ratio": round(statistics.mean(sec["cpu_s_per_run"]) / max(1e-9, statistics.mean(ins["cpu_s_per_run"])), 3),
    }
    emit(out)


if __name__ == "__main__":
    main()
