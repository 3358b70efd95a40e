"""The ``flower-focal`` command line: check, version, help texts, keygen safety."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flower_focal.cli import build_parser, main, parse_run_config


def _npz(path: Path, n_train: int = 40, classes: int = 2) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path,
             train_images=rng.integers(0, 255, (n_train, 28, 28), dtype=np.uint8),
             train_labels=(np.arange(n_train) % classes).reshape(-1, 1),
             val_images=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
             val_labels=(np.arange(10) % classes).reshape(-1, 1))
    return path


def test_parse_run_config_takes_toml_files_and_pairs(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('strategy = "he-fedavg"\nlr = 0.1\n')
    values = parse_run_config([str(toml), "lr=0.2 data-path='/a b/x.npz'", "resume=true", "model=resnet18"])
    assert values == {"strategy": "he-fedavg", "lr": 0.2, "data-path": "/a b/x.npz", "resume": True,
                      "model": "resnet18"}


def test_check_passes_and_prints_the_partition(tmp_path, capsys):
    data = _npz(tmp_path / "ok.npz")
    rc = main(["check", "--run-config", "dataset=medmnist", f"data-path={data}", "partitioner=iid",
               "--num-institutions", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "4 institutions with 10..10 training items" in out and "1 channel(s)" in out


def test_check_fails_with_one_line_for_too_many_institutions(tmp_path, capsys):
    data = _npz(tmp_path / "ok.npz")
    rc = main(["check", "--run-config", "dataset=medmnist", f"data-path={data}", "partitioner=iid",
               "--num-institutions", "400"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("flower-focal check: error: 400 institutions on ") and err.count("\n") == 1


def test_check_json_and_keys_for_a_deployment(tmp_path, capsys):
    data = _npz(tmp_path / "ok.npz")
    base = ["check", "--run-config", "dataset=medmnist", f"data-path={data}", "strategy=he-fedavg"]
    assert main(base) == 2
    assert "needs the institutions' HE key set" in capsys.readouterr().err
    assert main(["keygen", "--out", str(tmp_path / "keys")]) == 0
    capsys.readouterr()
    assert main([*base[:-1], "strategy=he-fedavg", f"he-key-dir={tmp_path / 'keys'}", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["key_preset"] == "compact" and doc["num_classes"] == 2


def test_unknown_run_config_key_is_named(capsys):
    assert main(["check", "--run-config", "learning-rate=0.1"]) == 2
    assert "Unknown run-config key 'learning-rate'" in capsys.readouterr().err
