"""Issue 16's target: a new strategy is its module, one entry in ``strategy/specs.py`` and its
Hydra yaml; every caller iterates over the registry. Checked in a fresh interpreter in which a
fourth entry is added before anything else imports the registry (as an edit of specs.py would)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FOURTH = """
from flower_focal.strategy import specs
specs.STRATEGY_SPECS["fedavgm"] = specs.StrategySpec(
    "fedavgm", "fourth_strategy:build", settings=(*specs.TRAINING_KEYS, *specs.SERVER_OPT_KEYS))

from flower_focal import cli, compare, simulation
from flower_focal.audit import config as audit_config
from flower_focal.config import RunConfig
from flower_focal.strategy import build_strategy
from flower_focal.strategy.registry import core_strategy

assert "fedavgm" in compare.STRATEGY_ORDER and "fedavgm" in compare._PER_RUN and "fedavgm" in compare._COLORS
assert "fedavgm" in audit_config.STRATEGIES
args = cli.build_parser().parse_args(["audit", "--strategy", "fedavgm", "--out", "x"])
assert args.strategy == "fedavgm"
cfg = RunConfig(strategy="fedavgm", min_available_nodes=1)
strategy = build_strategy(cfg)
assert type(core_strategy(strategy)).__name__ == "FedAvg" and core_strategy(strategy).server_opt.momentum == 0.9
print("OK", simulation.KEYED_STRATEGIES)
"""

MODULE = """
from flower_focal.strategy.registry import fedavg_kwargs
from flower_focal.strategy.fedavg import FedAvg


def build(cfg):
    return FedAvg(**fedavg_kwargs(cfg), server_momentum=0.9)
"""


def test_a_fourth_strategy_is_one_registry_entry(tmp_path):
    (tmp_path / "fourth_strategy.py").write_text(MODULE)  # the new strategy's module
    proc = subprocess.run([sys.executable, "-c", FOURTH], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")


def test_every_strategy_has_its_hydra_yaml():
    from flower_focal.strategy.specs import STRATEGY_SPECS

    conf = ROOT / "simulations" / "conf" / "strategy"
    for name in STRATEGY_SPECS:
        assert (conf / f"{name.replace('-', '_')}.yaml").exists() or (conf / f"{name}.yaml").exists(), name
