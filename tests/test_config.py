"""The run config: pyproject's Flower table and RunConfig must agree key for key."""

import tomllib
from pathlib import Path

import pytest

from flower_focal.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_run_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_declares_exactly_the_runconfig_keys():
    declared = _pyproject_run_config()
    assert set(declared) == set(RunConfig().to_flower())


def test_pyproject_table_is_generated_from_runconfig():
    """Keys, defaults and comments are declared once (RunConfig); pyproject holds the derived table.

    Regenerate it with ``python -c "from flower_focal.config import RunConfig; print(RunConfig.pyproject_table(), end='')"``.
    """
    table = (ROOT / "pyproject.toml").read_text().split("[tool.flwr.app.config]\n", 1)[1]
    assert table == RunConfig.pyproject_table()


def test_pyproject_defaults_equal_runconfig_defaults():
    assert RunConfig.from_mapping(_pyproject_run_config()) == RunConfig()


def test_kebab_and_snake_keys_and_int_to_float():
    cfg = RunConfig.from_mapping({"num-server-rounds": 7, "local_epochs": 2, "lr": 1})
    assert (cfg.num_server_rounds, cfg.local_epochs, cfg.lr) == (7, 2, 1.0)
    assert isinstance(cfg.lr, float)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="'learning-rate'"):
        RunConfig.from_mapping({"learning-rate": 0.1})


def test_wrong_type_is_named():
    with pytest.raises(ValueError, match="'num-server-rounds'.*int"):
        RunConfig.from_mapping({"num-server-rounds": "three"})


def test_a_clientapp_ignores_the_apps_own_keys():
    cfg = RunConfig.from_mapping({"learning-rate": 0.1, "lr": 0.2}, others="ignore")
    assert cfg.lr == 0.2
    with pytest.raises(ValueError, match="'lr' must be of type float"):
        RunConfig.from_mapping({"learning-rate": 0.1, "lr": "fast"}, others="ignore")
