"""flower-focal dropped into someone else's Flower app, exactly as the README says.

``tests/foreign_app`` is written the way Flower's quickstart-pytorch is: its own model (`Net`,
1-channel), its own DataLoader, its own run-config keys (``learning-rate``, ``batch-size``,
``out-dir``), no flower-focal code. Each test copies it, applies the README's diff for one
strategy verbatim (``git apply``) and runs it with ``flwr run`` in Flower's Ray simulation
engine. Slow: every run starts a local SuperLink and Ray (~25 s on 2 cores).
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flower_focal.simulation import Federation, SimulationFailed, repo_root, run_app

pytestmark = pytest.mark.slow

APP = Path(__file__).parent / "foreign_app"
LEGACY_APP = Path(__file__).parent / "foreign_legacy_app"
NODES = 3


def readme_diffs() -> dict[str, str]:
    text = (repo_root() / "README.md").read_text()
    return dict(re.findall(r"<!-- foreign-app-diff: (\S+) -->\s*```diff\n(.*?)```", text, re.S))


def changed_lines(diff: str) -> int:
    """Lines the diff adds or changes (a replaced line counts once)."""
    added = sum(1 for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in diff.splitlines() if line.startswith("-") and not line.startswith("---"))
    return max(added, removed)


def app_with(tmp: Path, strategy: str | None, base: Path = APP) -> Path:
    """A copy of the foreign app with the README's diff for ``strategy`` applied (None: as is)."""
    app = Path(tempfile.mkdtemp(prefix=f"app-{base.name}-{strategy or 'flower'}-", dir=tmp))
    shutil.copytree(base, app, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    if strategy is not None:
        patch = app.with_suffix(".diff")
        patch.write_text(readme_diffs()[strategy])
        subprocess.run(["git", "apply", "--whitespace=nowarn", str(patch)], cwd=app, check=True)
    return app


def app_task(app: Path, package: str):
    """The foreign app's own ``task`` module (its model and data), imported from its folder."""
    sys.path.insert(0, str(app))
    try:
        return importlib.import_module(f"{package}.task")
    finally:
        sys.path.remove(str(app))
        for name in [m for m in sys.modules if m.startswith(package)]:
            del sys.modules[name]


def keygen(out: Path, preset: str) -> Path:
    subprocess.run([sys.executable, "-m", "flower_focal.cli", "keygen", "--out", str(out), "--preset", preset],
                   check=True, capture_output=True)
    return out


def decrypt(model: Path, keys: Path) -> dict[str, torch.Tensor]:
    out = subprocess.run([sys.executable, "-m", "flower_focal.cli", "decrypt-model", "--model", str(model),
                          "--key", str(keys)], check=True, capture_output=True, text=True)
    return torch.load(json.loads(out.stdout)["model"])


def run(app: Path, out: Path, **config) -> float:
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    run_app(app, {"out-dir": str(out), **config}, Federation(num_supernodes=NODES), out / "flwr.log",
            echo=False, timeout_s=600)
    return time.time() - start


def fail(app: Path, out: Path, **config) -> tuple[str, float]:
    """Run an app that must fail; return Flower's failure details and the seconds it took."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with pytest.raises(SimulationFailed) as info:
        run_app(app, {"out-dir": str(out), **config}, Federation(num_supernodes=NODES), out / "flwr.log",
                echo=False, timeout_s=300)
    return str(info.value), time.time() - start


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("foreign")


@pytest.fixture(scope="module")
def flower_fedavg(tmp) -> Path:
    """The unmodified app: Flower's own FedAvg (the reference)."""
    run(app_with(tmp, None), tmp / "flower")
    return tmp / "flower"


@pytest.fixture(scope="module")
def ff_fedavg(tmp) -> Path:
    run(app_with(tmp, "fedavg"), tmp / "fedavg")
    return tmp / "fedavg"


@pytest.fixture(scope="module")
def he_keys(tmp) -> Path:
    return keygen(tmp / "keys-he", "compact")


def test_readme_diffs_are_small():
    diffs = readme_diffs()
    assert set(diffs) == {"fedavg", "he-fedavg", "focal", "legacy"}
    sizes = {name: changed_lines(diff) for name, diff in diffs.items()}
    print(json.dumps({"changed_lines": sizes}))
    assert sizes["fedavg"] == 1
    assert all(n <= 10 for n in sizes.values()), sizes
    claims = dict(re.findall(r"^\*\*([\w-]+)\*\* \((\d+) lines?\)", (repo_root() / "README.md").read_text(), re.M))
    assert claims and all(int(n) == sizes[name] for name, n in claims.items()), (claims, sizes)  # the README is true


def test_fedavg_swap_equals_flowers_fedavg(flower_fedavg, ff_fedavg):
    ref = torch.load(flower_fedavg / "final_model.pt")
    got = torch.load(ff_fedavg / "final_model.pt")
    assert list(ref) == list(got)
    diff = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    assert diff <= 1e-6, diff
    init = {k: v for k, v in torch.load(flower_fedavg / "final_model.pt").items()}
    assert any(float(v.abs().sum()) > 0 for v in init.values())
    log = (ff_fedavg / "flwr.log").read_text()
    assert log.count("did not answer the describe query") == 1  # said once, with what is lost


def test_he_fedavg_swap_equals_fedavg_and_the_server_holds_only_ciphertext(tmp, ff_fedavg, he_keys):
    out = tmp / "he"
    run(app_with(tmp, "he-fedavg"), out, **{"he-key-dir": str(he_keys)})
    assert not (out / "final_model.pt").exists()
    assert json.loads((out / "final_model.he.json").read_text())["kind"] == "he-fedavg"
    decrypted = decrypt(out / "final_model.he", he_keys)
    ref = torch.load(ff_fedavg / "final_model.pt")
    assert list(decrypted) == list(ref)
    assert all(decrypted[k].dtype == ref[k].dtype for k in ref)
    diff = max(float((decrypted[k].double() - ref[k].double()).abs().max()) for k in ref)
    assert diff <= 1e-5, diff
    log = (out / "flwr.log").read_text()
    assert "summed 3 ciphertexts" in log  # every round sealed all three institutions


def test_focal_trains_with_the_apps_own_network_as_backbone(tmp):
    """FOCAL on the app's own Net (1 channel) and DataLoaders equals its plaintext twin."""
    from flower_focal.testing import InstitutionEmbeddings, train_plaintext

    keys = keygen(tmp / "keys-focal", "focal")
    app = app_with(tmp, "focal")
    out = tmp / "focal"
    rounds = 10
    run(app, out, **{"he-key-dir": str(keys), "num-server-rounds": rounds})
    head = decrypt(out / "final_head.he", keys)
    assert head["weight"].shape == (3, 32) and head["bias"].shape == (3,)
    task = app_task(app, "quickstart")
    torch.manual_seed(0)
    backbone = task.Net().features
    institutions = []
    for pid in range(NODES):
        train, _ = task.load_data(pid, NODES, 16)
        with torch.no_grad():
            x = torch.cat([backbone(images) for images, _ in
                           torch.utils.data.DataLoader(train.dataset, batch_size=16)]).double().numpy()
        institutions.append(InstitutionEmbeddings(str(pid), x, train.dataset.tensors[1].numpy()))
    twin = train_plaintext(institutions, 3, epochs=rounds, init_seed=0)  # the defaults, like the app
    encrypted = np.vstack([head["weight"].numpy().T, head["bias"].numpy()[None, :]])
    x1 = np.vstack([np.hstack([i.x, np.ones((len(i.y), 1))]) for i in institutions])
    # compare what the heads compute (folded standardisation scales rows of near-constant features)
    gap = float(np.abs(x1 @ (encrypted - twin.head)).max() / max(1.0, np.abs(x1 @ twin.head).max()))
    losses = [h["loss"] for h in twin.history]
    print(json.dumps({"focal_head_vs_plaintext_twin": gap, "twin_train_loss": [losses[0], losses[-1]]}))
    assert gap <= 1e-3, gap
    assert losses[-1] < losses[0] - 0.005  # the head trained
    assert "updated the head with 3 of 3 institutions" in (out / "flwr.log").read_text()


def test_misconfigured_apps_fail_fast_with_the_cause(tmp, he_keys):
    """Missing key dir, missing institution key, evaluate_fn under HE: fail, never complete."""
    timings = {}
    app = app_with(tmp, "he-fedavg")
    details, timings["missing-key-dir"] = fail(app, tmp / "bad1", **{"he-key-dir": str(tmp / "nowhere")})
    assert "public.ctx" in details and "not found" in details

    public_only = tmp / "public-only"
    public_only.mkdir()
    shutil.copy(he_keys / "public.ctx", public_only / "public.ctx")
    details, timings["institutions-without-secret-key"] = fail(
        app, tmp / "bad2", **{"he-key-dir": str(public_only), "num-server-rounds": 1})
    assert "nothing was trained" in details and "secret key" in details and "not found on this institution" in details

    server = app / "quickstart" / "server_app.py"
    server.write_text(server.read_text().replace("num_rounds=num_rounds,", "num_rounds=num_rounds,\n        evaluate_fn=lambda r, a: None,"))
    details, timings["evaluate-fn-under-he"] = fail(app, tmp / "bad3", **{"he-key-dir": str(he_keys)})
    assert "evaluate_fn" in details and "federated evaluation" in details
    # the strategy picked by one config value, misspelt (flwr run directly: no launcher preflight)
    (tmp / "bad4").mkdir()
    start = time.time()
    with pytest.raises(SimulationFailed) as info:
        run_app(repo_root(), {"strategy": "fedavgg", "run-dir": str(tmp / "bad4" / "run")},
                Federation(num_supernodes=NODES), tmp / "bad4" / "flwr.log", echo=False, timeout_s=300)
    details, timings["unknown-strategy"] = str(info.value), time.time() - start
    assert "Unknown strategy 'fedavgg'" in details and "fedavg, he-fedavg, focal" in details
    print(json.dumps({"seconds_to_failure": {k: round(v, 1) for k, v in timings.items()}}))
    assert all(v < 120 for v in timings.values()), timings
    assert not list((tmp / "bad3").glob("final_model*"))


def distributed_losses(log: str) -> list[float]:
    """The legacy server's "History (loss, distributed)" values, round by round."""
    section = log.split("History (loss, distributed):", 1)[1]
    return [float(v) for v in re.findall(r"round \d+: ([0-9.eE+-]+)", section.split("History", 1)[0])]


def test_legacy_numpyclient_app_under_he_fedavg_equals_plain_legacy_fedavg(tmp, he_keys):
    """Flower's legacy API (flwr.server.strategy + NumPyClient) with the README's legacy diff."""
    plain, he = tmp / "legacy-plain", tmp / "legacy-he"
    run(app_with(tmp, None, LEGACY_APP), plain)
    app = app_with(tmp, "legacy", LEGACY_APP)
    run(app, he, **{"he-key-dir": str(he_keys)})
    want = distributed_losses((plain / "flwr.log").read_text())
    got = distributed_losses((he / "flwr.log").read_text())
    assert len(want) == len(got) == 3
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert ((he / "flwr.log").read_text()).count("summed 3 ciphertexts") == 3

    state = decrypt(he / "final_model.he", he_keys)  # arrays "0", "1", ... in get_weights order
    task = app_task(app, "legacyapp")
    net = task.Net()
    task.set_weights(net, [state[str(i)].numpy() for i in range(len(state))])
    losses, sizes = [], []
    for pid in range(NODES):
        _, val = task.load_data(pid, NODES, 16)
        losses.append(task.test(net, val, "cpu")[0])
        sizes.append(len(val.dataset))
    final = float(np.average(losses, weights=sizes))
    assert abs(final - want[-1]) <= 1e-5 * max(1.0, abs(want[-1])), (final, want[-1])
