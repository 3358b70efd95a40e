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


# ----------------------------------------------------------------------------- evaluate
def _run_dir(path: Path, num_classes: int = 5, in_channels: int = 3, **spec_kw) -> Path:
    import torch

    from flower_focal.artifacts import ModelSpec, save_model
    from flower_focal.models import model_to_arrays

    spec = ModelSpec(model="small-cnn", in_channels=in_channels, num_classes=num_classes,
                     image_size=28, dataset="medmnist", strategy="fedavg", seed=0, rounds=1, **spec_kw)
    torch.manual_seed(0)
    save_model(path, model_to_arrays(spec.build()), spec)
    return path


def _test_only_npz(path: Path, n: int = 30, classes: int = 5) -> Path:
    rng = np.random.default_rng(2)
    np.savez(path, test_images=rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8),
             test_labels=(np.arange(n) % classes).reshape(-1, 1))
    return path


def _evaluate(capsys, *argv: str) -> dict:
    assert main(["evaluate", "--device", "cpu", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_a_test_only_npz_with_per_class_metrics(tmp_path, capsys):
    run = _run_dir(tmp_path / "run")
    data = _test_only_npz(tmp_path / "external_test.npz")
    out = _evaluate(capsys, "--run-dir", str(run), "--data", str(data), "--split", "test")
    assert out["n"] == 30 and len(out["per_class"]) == 5
    cm = np.array(out["confusion_matrix"])
    assert cm.shape == (5, 5) and cm.sum() == 30 and cm.sum(axis=1).tolist() == [6] * 5
    for k, row in enumerate(out["per_class"]):
        assert row["n"] == 6 and row["recall"] == pytest.approx(cm[k, k] / 6)
    aurocs = [row["auroc"] for row in out["per_class"]]
    assert out["auroc_macro"] == pytest.approx(float(np.mean(aurocs)))
    assert out["accuracy"] == pytest.approx(np.trace(cm) / 30)


def test_evaluating_a_5_class_model_on_9_class_data_is_a_clear_error(tmp_path, capsys):
    run = _run_dir(tmp_path / "run", num_classes=5)
    data = _test_only_npz(tmp_path / "pathmnist_test.npz", n=18, classes=9)  # PathMNIST: 9 classes
    assert main(["evaluate", "--run-dir", str(run), "--data", str(data), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "has 9 classes (labels up to 8)" in err and "trained on 5 classes" in err
    assert "IndexError" not in err


def test_evaluate_refuses_a_fedbn_global_model_unless_told(tmp_path, capsys):
    """FedBN's model.pt holds the initial normalisation layers: evaluating it silently would
    report the scores of a model nobody trained or uses."""
    from flower_focal.models import build_model, norm_layers

    run = _run_dir(tmp_path / "run", fedbn=True)
    spec = json.loads((run / "model.json").read_text())
    layers = norm_layers(build_model("small-cnn", 3, 5, 28))
    assert spec["fedbn"] is True and spec["local_layers"] == layers and len(layers) == 4
    data = _test_only_npz(tmp_path / "external_test.npz")
    argv = ["evaluate", "--run-dir", str(run), "--data", str(data), "--device", "cpu"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert not captured.out and "FedBN run" in captured.err and "initial (untrained)" in captured.err
    assert "--initial-norm-layers" in captured.err
    assert main([*argv, "--initial-norm-layers"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "warning: this is a FedBN run" in captured.err
    assert "initial (untrained)" in out["warning"] and out["fedbn_local_layers"] == layers
    assert out["n"] == 30
    plain = _evaluate(capsys, "--run-dir", str(_run_dir(tmp_path / "plain")), "--data", str(data))
    assert "warning" not in plain  # a run without FedBN: nothing to say


def test_fedbn_on_a_model_without_normalisation_layers_is_a_trained_model(tmp_path, capsys):
    """lenet-sigmoid has no norm layer: under FedBN everything was aggregated, nothing to refuse."""
    from flower_focal.artifacts import ModelSpec

    spec = ModelSpec(model="lenet-sigmoid", in_channels=3, num_classes=5, image_size=28,
                     dataset="medmnist", strategy="fedavg", seed=0, rounds=1, fedbn=True)
    assert spec.with_local_layers().local_layers == () and not spec.with_local_layers().norm_warning
    norm = ModelSpec(model="small-cnn", in_channels=3, num_classes=5, image_size=28,
                     dataset="medmnist", strategy="fedavg", seed=0, rounds=1, fedbn=True)
    assert "global model's 4 normalisation layer(s)" in norm.with_local_layers().norm_warning
    run = tmp_path / "run"
    import torch

    from flower_focal.artifacts import save_model
    from flower_focal.models import model_to_arrays

    torch.manual_seed(0)
    save_model(run, model_to_arrays(spec.build()), spec)
    out = _evaluate(capsys, "--run-dir", str(run), "--data", str(_test_only_npz(tmp_path / "t.npz")))
    assert "warning" not in out and out["n"] == 30


def test_evaluate_a_test_only_folder_and_csv(tmp_path, capsys):
    from PIL import Image

    run = _run_dir(tmp_path / "run", num_classes=2)
    rng = np.random.default_rng(3)
    root = tmp_path / "test_set"
    rows = ["image,label"]
    for label, cls in enumerate(("a_benign", "b_malignant")):
        (root / cls).mkdir(parents=True)
        for i in range(3 + label):
            f = root / cls / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(f)
            rows.append(f"{f},{label}")
    out = _evaluate(capsys, "--run-dir", str(run), "--data", str(root), "--split", "test")
    assert out["n"] == 7  # the whole folder is the test split (no 20 % carve)
    assert [r["name"] for r in out["per_class"]] == ["a_benign", "b_malignant"]
    assert [r["n"] for r in out["per_class"]] == [3, 4]
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    out = _evaluate(capsys, "--run-dir", str(run), "--data", str(tmp_path / "test.csv"), "--split", "test")
    assert out["n"] == 7 and np.array(out["confusion_matrix"]).sum() == 7


def test_classification_report_by_hand():
    from flower_focal.metrics import classification_report

    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    rep = classification_report(probs, [0, 1, 1, 2], 3, ("x", "y", "z"))
    assert rep["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert [r["recall"] for r in rep["per_class"]] == [1.0, 0.5, 1.0]
    assert [r["precision"] for r in rep["per_class"]] == [0.5, 1.0, 1.0]
    assert rep["recall_macro"] == pytest.approx(2.5 / 3)
    assert rep["per_class"][2]["auroc"] == 1.0 and rep["per_class"][0]["name"] == "x"


# ----------------------------------------------------------------------------- polish
def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"flower-focal {version('flower-focal')}"


def _subparsers(parser):
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_command_has_a_description_and_every_option_a_help():
    parser = build_parser()
    assert "`" not in parser.description and "`" not in (parser.epilog or "")
    commands = _subparsers(parser)
    assert {"check", "evaluate", "keygen", "decrypt-model", "report", "audit"} <= set(commands)
    for name, sub in commands.items():
        assert sub.description and "`" not in sub.description, name
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help text"


def test_keygen_keeps_the_secret_out_of_git(tmp_path, capsys):
    import shutil
    import subprocess

    outside = tmp_path / "outside" / "keys"
    assert main(["keygen", "--out", str(outside)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert (outside / ".gitignore").read_text().splitlines()[-1] == "secret.ctx"

    repo = tmp_path / "repo"
    repo.mkdir()
    if shutil.which("git") is None:
        (repo / ".git").mkdir()
    else:
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
    assert main(["keygen", "--out", str(repo / "keys")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["gitignore"] == str((repo / "keys" / ".gitignore").resolve())
    assert "is inside the git work tree" in captured.err and str(repo) in captured.err
    if shutil.which("git"):
        def ignored(name: str) -> int:
            return subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", f"keys/{name}"],
                                  check=False).returncode

        assert ignored("secret.ctx") == 0  # git will not add it
        assert ignored("public.ctx") == 1


def test_simulate_is_a_subcommand_with_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "flower_focal.cli", "simulate", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--num-institutions" in out and "installed wheel" in out
