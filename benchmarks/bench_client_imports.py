"""What a deployed SuperNode pays per message before any work: the ClientApp's imports.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message, so every message pays
the import of the ClientApp and of whatever its handler imports. Each figure is the median over
``--repeats`` fresh interpreters (``python -c``), measured inside the child with
``time.perf_counter`` around the import only:

* ``flwr_s``: ``import flwr.clientapp`` (what the flwr-clientapp runtime has loaded anyway);
* ``client_app_s``: ``import clients.client_app`` (flower-focal's ClientApp, all handlers and mods);
* ``focal_step_s``: the ClientApp plus what a FOCAL step or evaluation needs (crypto, protocol,
  metrics: numpy only);
* ``train_s``: the ClientApp plus what a fedavg / he-fedavg train message needs (torch, MONAI).

Prints one JSON object. ``python benchmarks/bench_client_imports.py --repeats 5``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from _common import ROOT, emit, loadavg, machine

CASES = {
    "flwr_s": "import flwr.clientapp",
    "client_app_s": "import clients.client_app",
    "focal_step_s": "import clients.client_app, flower_focal.client.focal, flower_focal.focal, "
                    "flower_focal.crypto, flower_focal.metrics",
    "train_s": "import clients.client_app, flower_focal.training, flower_focal.data, flower_focal.models",
}
PROBE = ("import time, sys; t = time.perf_counter(); {stmt}; "
         "print(time.perf_counter() - t); print('torch' in sys.modules, 'monai' in sys.modules)")


def measure(stmt: str) -> tuple[float, bool, bool]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(stmt=stmt or "pass")], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), out[1] == "True", out[2] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result: dict[str, object] = {"benchmark": "client_imports", "machine": machine(), "settings": vars(args),
                                 "loadavg_before": loadavg()}
    for name, stmt in CASES.items():
        runs = [measure(stmt) for _ in range(args.repeats)]
        result[name] = round(statistics.median(r[0] for r in runs), 3)
        result[name[:-2] + "_imports_torch"] = runs[0][1]
        result[name[:-2] + "_imports_monai"] = runs[0][2]
    result["loadavg_after"] = loadavg()
    emit(result)


if __name__ == "__main__":
    main()
