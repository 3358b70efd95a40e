"""Deployment vs simulation: wall time per round for each strategy, and recovery times.

    python benchmarks/bench_deployment.py [--strategies fedavg he-fedavg focal] [--rounds 3]

For each strategy, the same run (2 institutions, synthetic pathology tiles in a MedMNIST
file, small CNN; focal: monai-resnet18 backbone at 32 px, its own `--preset focal` key set and
deployment) is executed (a) in Flower's Ray simulation through `flwr run` and (b) on a
real loopback deployment (flower-superlink + 2 flower-supernode processes). Reported: mean
round wall time (rounds 2..), its excess over the simulation's (target <= 4 s), whole-run wall
time, and per message type the SuperNodes' ClientApp process split (before flower-focal's
import / its imports / work, from ``flower_focal.client.timing``'s log lines). Flower's own
floor: ``floor_app`` (an empty message to every SuperNode, a ClientApp importing only Flower)
on the same deployment gives the wall time of one exchange with no work; each strategy's
``exchanges_per_round`` times it is ``flower_floor_round_s``, and ``above_flower_floor_s`` is
what flower-focal adds beyond it. Recovery: (c) a SuperNode SIGKILLed during a round: the wall time of that round (it completes once Flower's heartbeat declares the node
gone) vs a normal round; (d) a server (simulation) killed after a checkpoint and resumed:
seconds from the resume command to the next finished round. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import emit, loadavg, machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import write_synthetic_npz  # noqa: E402

from flower_focal.checkpoint import load_checkpoint  # noqa: E402
from flower_focal.config import RunConfig  # noqa: E402
from flower_focal.crypto import keygen, server_share  # noqa: E402
from flower_focal.deployment import LoopbackDeployment  # noqa: E402
from flower_focal.simulation import Federation, simulate, stop_processes_under  # noqa: E402


MESSAGE_LINE = re.compile(r"flower-focal message (\S+): (?:process ([\d.]+) s before flower-focal's import, "
                          r"imports ([\d.]+) s, )?work ([\d.]+) s")


def _client_times(dep: LoopbackDeployment, offsets: dict[int, int]) -> dict:
    """Per message type, mean seconds of a SuperNode's ClientApp process: before flower-focal's
    import (interpreter, Flower), flower-focal's imports, the work (client/timing.py's log lines
    written since ``offsets``)."""
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for index, offset in offsets.items():
        text = (dep.workdir / f"supernode{index}.log").read_bytes()[offset:].decode(errors="replace")
        for kind, process, imports, work in MESSAGE_LINE.findall(text):
            rows.setdefault(kind, []).append((float(process or 0), float(imports or 0), float(work)))
    return {kind: {"messages": len(r), "process_s": round(statistics.mean(x[0] for x in r), 2),
                   "imports_s": round(statistics.mean(x[1] for x in r), 2),
                   "work_s": round(statistics.mean(x[2] for x in r), 2)} for kind, r in sorted(rows.items())}


def _log_offsets(dep: LoopbackDeployment) -> dict[int, int]:
    return {i: (dep.workdir / f"supernode{i}.log").stat().st_size for i in range(len(dep.node_configs))}


def _round_walls(metrics: dict) -> list[float]:
    return [r["wall_time_s"] for r in metrics["rounds"]]




FLOOR_APP = Path(__file__).resolve().parent / "floor_app"
ONE_OFF = {"query.describe", "train.embed"}  # message types of round 1 only


def _floor(dep: LoopbackDeployment, tmp: Path, exchanges: int = 6) -> dict:
    """Flower's own cost of one exchange on ``dep``: ``floor_app`` sends an empty message to
    every SuperNode and its ClientApp (Flower only, no work) answers; mean of exchanges 2..."""
    out = tmp / "floor.json"
    dep.run_app(FLOOR_APP, {"exchanges": exchanges, "nodes": len(dep.node_configs), "out": str(out)},
                tmp / "floor" / "flwr.log")
    walls = json.loads(out.read_text())["exchange_s"]
    return {"exchange_s": round(statistics.mean(walls[1:]), 2),
            "exchanges_s": [round(w, 2) for w in walls]}


def _exchanges_per_round(client: dict, nodes: int, rounds: int) -> float:
    """Exchanges of a round (rounds 2..): messages of every recurring type per node and round."""
    per = sum(v["messages"] for k, v in client.items() if k not in ONE_OFF)
    return round(per / nodes / rounds, 2)


def _compare(dep: LoopbackDeployment, cfg: RunConfig, tmp: Path, keys: Path | None = None,
             server_keys: Path | None = None, floor: dict | None = None) -> dict:
    """The same run in the Ray simulation and on the loopback deployment.

    Keys: in the simulation this process plays every institution (run config ``he-key-dir`` =
    the whole key set); in the deployment the server gets only ``server_keys`` and the
    SuperNodes their ``secret.ctx`` by node config.
    """
    sim_cfg = cfg.replace(run_dir=str(tmp / f"sim-{cfg.strategy}"), he_key_dir=str(keys or ""))
    sim = simulate(sim_cfg, Federation(num_supernodes=2), echo=False)
    offsets = _log_offsets(dep)
    depl = dep.run(cfg.replace(run_dir=str(tmp / f"dep-{cfg.strategy}"), he_key_dir=str(server_keys or "")))
    s_w, d_w = _round_walls(sim.metrics()), _round_walls(depl.metrics())
    sim_round, dep_round = statistics.mean(s_w[1:] or s_w), statistics.mean(d_w[1:] or d_w)
    client = _client_times(dep, offsets)
    exchanges = _exchanges_per_round(client, len(dep.node_configs), cfg.num_server_rounds)
    out = {
        "simulation_round_s": round(sim_round, 2),
        "deployment_round_s": round(dep_round, 2),
        "deployment_minus_simulation_s": round(dep_round - sim_round, 2),  # target <= 4 s
        "exchanges_per_round": exchanges,
        "client_message_s": client,
        "simulation_run_s": round(sim.wall_time_s, 1),
        "deployment_run_s": round(depl.wall_time_s, 1),
        "loadavg": loadavg(),
    }
    if floor is not None:  # what Flower alone costs for this many exchanges, and the rest
        out["flower_floor_round_s"] = round(exchanges * floor["exchange_s"], 2)
        out["above_flower_floor_s"] = round(dep_round - sim_round - out["flower_floor_round_s"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", nargs="+", default=["fedavg", "he-fedavg", "focal"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-recovery", action="store_true", help="skip the killed SuperNode / server parts")
    args = p.parse_args()
    out: dict = {"benchmark": "deployment_vs_simulation", "machine": machine(), "settings": vars(args),
                 "strategies": {}}
    with tempfile.TemporaryDirectory(prefix="ff-deploy-") as tmp:
        tmp = Path(tmp)
        data = write_synthetic_npz(tmp / "site.npz", sizes=(200, 50, 50))
        keys = keygen(tmp / "keys", "compact")
        server_keys = server_share(keys, tmp / "server-keys")
        base = RunConfig(dataset="medmnist", data_path=str(data), image_size=28,
                         num_server_rounds=args.rounds, min_available_nodes=2, seed=1)
        nodes = [{"partition-id": i, "num-partitions": 2, "data-path": str(data),
                  "he-secret-key": str(keys / "secret.ctx")} for i in range(2)]
        if "focal" in args.strategies:  # its own key set (preset focal) and SuperNodes holding it
            fkeys = keygen(tmp / "focal-keys", "focal")
            fnodes = [{**n, "he-secret-key": str(fkeys / "secret.ctx")} for n in nodes]
            cfg = base.replace(strategy="focal", lr=0.5, backbone="monai-resnet18", backbone_input_size=32,
                               embedding_cache_dir=str(tmp / "emb"))
            with LoopbackDeployment(fnodes, workdir=tmp / "dep-focal") as dep:
                floor = out["flower_exchange_floor"] = _floor(dep, tmp)
                out["strategies"]["focal"] = _compare(dep, cfg, tmp, fkeys, server_share(fkeys, tmp / "fsk"),
                                                      floor)
        with LoopbackDeployment(nodes, workdir=tmp / "dep") as dep:
            if "flower_exchange_floor" not in out:
                out["flower_exchange_floor"] = _floor(dep, tmp)
            floor = out["flower_exchange_floor"]
            for strategy in [s for s in args.strategies if s != "focal"]:
                he = strategy == "he-fedavg"
                out["strategies"][strategy] = _compare(dep, base.replace(strategy=strategy), tmp,
                                                       keys if he else None, server_keys if he else None,
                                                       floor)
            if args.no_recovery:
                emit(out)
                return
            # (c) a SuperNode killed mid-round
            # one of the 2 nodes dies: the run must be allowed to go on with 1
            cfg = base.replace(num_server_rounds=3, min_train_replies=1, min_available_nodes=1,
                               run_dir=str(tmp / "killnode"))
            holder: dict = {}
            thread = threading.Thread(target=lambda: holder.setdefault("r", dep.run(cfg)))
            thread.start()
            while not (tmp / "killnode" / "checkpoint.npz").exists():
                time.sleep(0.3)
            t_kill = time.time()
            dep.kill_node(1)
            thread.join()
            walls = _round_walls(holder["r"].metrics())
            out["killed_supernode"] = {
                "round_walls_s": [round(w, 1) for w in walls],
                "round_with_dead_node_s": round(max(walls[1:]), 1),
                "normal_round_s": round(walls[0], 1),
                "seconds_from_kill_to_run_end": round(time.time() - t_kill, 1),
            }
        # (d) a killed server (simulation) resumed from its checkpoint
        cfg = base.replace(num_server_rounds=4, local_epochs=3, run_dir=str(tmp / "killserver"))
        home = tmp / "home"
        th = threading.Thread(target=lambda: _swallow(lambda: simulate(cfg, Federation(num_supernodes=2), echo=False, flwr_home=home)))
        th.start()
        while not (tmp / "killserver" / "checkpoint.npz").exists():
            time.sleep(0.2)
        stop_processes_under(home, grace_s=0)
        th.join()
        done = load_checkpoint(tmp / "killserver").server_round
        t0 = time.time()
        resumed = simulate(cfg.replace(resume=True), Federation(num_supernodes=2), echo=False)
        rounds = resumed.metrics()["rounds"]
        out["killed_server"] = {
            "checkpoint_round": done,
            "resume_wall_s": round(time.time() - t0, 1),
            "resumed_rounds": len(rounds) - done,
            "mean_round_s": round(statistics.mean(r["wall_time_s"] for r in rounds[done:]), 2),
            "restart_overhead_s": round(time.time() - t0 - sum(r["wall_time_s"] for r in rounds[done:]), 1),
        }
    emit(out)


def _swallow(fn) -> None:
    try:
        fn()
    except Exception:  # the killed run fails by design
        pass


if __name__ == "__main__":
    main()
