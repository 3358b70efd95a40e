"""Every command in the README runs, as written, at small size.

The fast test below extracts every shell command from the README's ``bash`` blocks and checks
that each one has a plan in :data:`PLANS`: a new README command fails it until someone says how it
is run. The slow test runs every plan: the command as written, with only

* placeholders filled (``/data/pathmnist.npz`` -> the shared PathMNIST, ``runs/<run>`` -> the run
  an earlier command made, ``keys/`` -> a key set in a temporary directory),
* outputs sent to a temporary directory (run directories, Hydra's, keys, reports),
* the size cut: 1 round, 2 institutions (``flwr run`` keeps its federation), the first value of
  each Hydra sweep except ``strategy``, fewer audit samples and DP noise levels.

Commands that need several hosts (the multi-site guide) are listed with the test that runs the
same binaries and flags on one machine. Needs ``../shared/data`` (skips without it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from flower_focal.simulation import Federation, processes_mentioning, repo_root, run_app
from tests.conftest import shared_npz

README = repo_root() / "README.md"
ROUNDS, INSTITUTIONS = 1, 2


def readme_commands() -> list[str]:
    """The README's shell commands: continuation lines joined, comments and prompts dropped,
    a heredoc kept with its command."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL):
        lines = [line.strip() for line in block.splitlines()]
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if not line or line.startswith("#"):
                continue
            while line.endswith("\\") and i < len(lines):
                line = line[:-1].rstrip() + " " + lines[i]
                i += 1
            heredoc = re.search(r"<<'(\w+)'", line)
            if heredoc:
                while i < len(lines) and lines[i] != heredoc.group(1):
                    line += "\n" + lines[i]
                    i += 1
                line += "\n" + heredoc.group(1)
                i += 1
            commands.append(_strip_comment(line))
    return commands


def _strip_comment(line: str) -> str:
    """The command without a trailing ``# comment`` (outside quotes)."""
    quote = None
    for k, ch in enumerate(line):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (k == 0 or line[k - 1] == " "):
            return line[:k].rstrip()
    return line.rstrip()


@dataclass(frozen=True)
class Plan:
    pattern: str  # regex matched against the start of the command
    run: str  # name of the runner below, or "" for a command not runnable on one machine
    why: str = ""  # for run == "": what runs the same thing instead


PLANS = [
    Plan(r"ray start |python -m simulations\.run federation\.ray_address=<head>|flower-focal simulate --ray-address <head>",
         "", "multi-machine Ray recipe: tests/test_ray_cluster.py starts the same two `ray start` nodes on one machine "
         "and runs a simulation on them"),
    Plan(r"flower-superlink |cat >> ~/\.flwr/config\.toml|flwr supernode |flower-supernode |flwr run \. consortium "
         r"|flwr run \. <connection> |flwr ls <connection> ", "",
         "multi-site guide: the same binaries and flags (TLS, SuperNode auth, register, node config) run on one "
         "machine in tests/test_deployment.py (LoopbackDeployment)"),
    Plan(r"python -m pip install ", "", "the install itself: run by CI (.ci/run) and tests/test_readme.py"),
    Plan(r"python -m simulations\.run \.\.\. ", "", "a fragment: the audit multirun above runs it in full"),
    Plan(r"python -m simulations\.run", "hydra"),
    Plan(r"export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1$", "export"),
    Plan(r"flwr run \. --stream", "flwr_run"),
    Plan(r"flwr ls --format json$", "flwr_ls"),
    Plan(r"flower-focal ", "cli"),
    Plan(r"python benchmarks/bench_dp\.py", "bench_dp"),
    Plan(r"python benchmarks/readme_tables\.py", "readme_tables"),
]


def plan_of(command: str) -> Plan:
    plans = [p for p in PLANS if re.match(p.pattern, command)]
    if not plans:
        raise LookupError(f"README command without a plan in tests/test_readme_commands.py: {command!r}")
    return plans[0]


def test_every_readme_command_has_a_plan():
    commands = readme_commands()
    assert len(commands) > 30  # the extraction found the README's commands
    missing = []
    for command in commands:
        try:
            plan_of(command)
        except LookupError as exc:
            missing.append(str(exc))
    assert not missing, "\n".join(missing)
    assert any(plan_of(c).run == "hydra" for c in commands) and any(plan_of(c).run == "cli" for c in commands)


# ------------------------------------------------------------------------ running them
class Session:
    """What earlier commands made, for later ones (README order)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(repo_root()), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.env["FLWR_HOME"] = str(tmp / "flwr-home")
        self.keys: dict[str, Path] = {}  # preset -> key dir made by "flower-focal keygen"
        self.runs: list[Path] = []  # run directories, in order
        self.sweeps: list[Path] = []  # multirun sweep directories
        self.count = 0
        self.pathmnist = shared_npz("pathmnist")
        self.retinamnist = shared_npz("retinamnist")

    def out(self, name: str) -> Path:
        self.count += 1
        return self.tmp / f"{self.count:02d}-{name}"

    def fill(self, text: str) -> str:
        """Placeholders and relative data paths -> this machine's files."""
        text = text.replace("../shared/data/", str(self.pathmnist.parents[1]) + "/")
        for placeholder in ("/data/pathmnist.npz", "/abs/path/pathmnist.npz"):
            text = text.replace(placeholder, str(self.pathmnist))
        return text

    def key_dir(self, preset: str) -> Path:
        if preset not in self.keys:
            out = self.tmp / f"keys-{preset}"
            self.sh(["flower-focal", "keygen", "--out", str(out), "--preset", preset])
            self.keys[preset] = out
        return self.keys[preset]

    def sh(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        if argv[0] == "flower-focal":
            argv = [sys.executable, "-m", "flower_focal.cli", *argv[1:]]
        elif argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
        proc = subprocess.run(argv, cwd=repo_root(), env=self.env, capture_output=True, text=True,
                              timeout=1800, **kw)
        assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc


def _set(args: list[str], key: str, value: object) -> list[str]:
    """Hydra overrides with ``key=value`` replacing the command's own (or appended)."""
    kept = [a for a in args if a.split("=", 1)[0].lstrip("+") != key]
    return [*kept, f"{key}={value}"]


def run_hydra(s: Session, command: str) -> None:
    args = shlex.split(s.fill(command))[3:]
    multirun = "-m" in args
    preset = next((a.split("=", 1)[1] for a in args if a.startswith("strategy.he.preset=")), "compact")
    for k, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if multirun and "," in value and key != "strategy":
            args[k] = f"{key}={value.split(',')[0]}"  # one value per sweep (strategy: all)
        if key == "run_dir":
            args[k] = f"run_dir={s.out('run')}"
        if key == "strategy.he.key_dir":
            args[k] = f"{key}={s.key_dir(preset)}"
    args = _set(_set(args, "num_rounds", ROUNDS), "num_institutions", INSTITUTIONS)
    if "audit.num_samples=4" in args:
        args = _set(args, "audit.num_samples", 2)
    out = s.out("hydra")
    if multirun:
        args = _set(args, "hydra.sweep.dir", out)
    else:
        args = _set(args, "hydra.run.dir", out)
        if not any(a.startswith("run_dir=") for a in args):
            args = _set(args, "run_dir", out / "run")
    proc = s.sh([sys.executable, "-m", "simulations.run", *args])
    if multirun:
        s.sweeps.append(out)
        runs = sorted(p.parent for p in out.glob("*/metrics.json"))
        assert runs, proc.stdout[-2000:]
        if len(runs) > 1:  # the size cut can leave one run, which has nothing to compare
            assert (out / "report").is_dir()  # the multirun's comparison report
    else:
        run = Path(next(a.split("=", 1)[1] for a in args if a.startswith("run_dir=")))
        runs = [run]
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "completed" and len(metrics["rounds"]) == ROUNDS, run
        s.runs.append(run)


def run_export(s: Session, command: str) -> None:
    key, value = command.split(" ", 1)[1].split("=", 1)
    s.env[key] = value  # used by the flwr run commands after it


def run_flwr(s: Session, command: str) -> None:
    args = shlex.split(s.fill(command))
    federation, config = Federation(num_supernodes=5), {}
    if "--federation-config" in args:
        items = dict(i.split("=", 1) for i in shlex.split(args[args.index("--federation-config") + 1]))
        federation = Federation(num_supernodes=int(items["num-supernodes"]),
                                client_cpus=int(items.get("client-resources-num-cpus", 1)))
    if "--run-config" in args:
        from flower_focal.cli import parse_run_config

        config = parse_run_config([args[args.index("--run-config") + 1]])
    for key, value in list(config.items()):
        if key == "he-key-dir":
            config[key] = str(s.key_dir("focal" if config.get("strategy") == "focal" else "compact"))
    out = s.out("flwr-run")
    out.mkdir()
    config.update({"num-server-rounds": ROUNDS, "run-dir": str(out / "run")})
    run_app(repo_root(), config, federation, out / "flwr.log", echo=False, timeout_s=900)
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    s.runs.append(out / "run")


def run_flwr_ls(s: Session, command: str) -> None:
    # flwr ls --format json is how run_app reads every run's final status
    # (flower_focal.simulation.run_status): the flwr run commands above went through it.
    assert any(p.name == "run" and p.parent.name.endswith("flwr-run") for p in s.runs)


def _test_only_npz(s: Session) -> Path:
    path = s.tmp / "hospital_b_test.npz"
    with np.load(s.pathmnist) as d:
        np.savez(path, test_images=d["val_images"][:40], test_labels=d["val_labels"][:40])
    return path


def run_cli(s: Session, command: str) -> None:
    args = shlex.split(s.fill(command))
    sub = args[1]
    if sub == "keygen":
        preset = args[args.index("--preset") + 1]
        out = s.out("keys")
        s.sh([*args[:args.index("--out") + 1], str(out), *args[args.index("--out") + 2:]])
        assert (out / "secret.ctx").is_file() and (out / "public.ctx").is_file()
        s.keys.setdefault(preset, out)
        return
    if sub == "check":
        config = args[args.index("--run-config") + 1]
        if config == "run.toml":
            toml = s.tmp / "run.toml"
            toml.write_text(f'strategy = "he-fedavg"\nhe-key-dir = "{s.key_dir("compact")}"\n'
                            f'dataset = "medmnist"\ndata-path = "{s.pathmnist}"\n')
            config = str(toml)
        config = config.replace("he-key-dir='keys'", f"he-key-dir='{s.key_dir('compact')}'")
        args[args.index("--run-config") + 1] = config
        assert "preflight ok" in s.sh(args).stdout
        return
    if sub == "decrypt-model":
        run = next(r for r in reversed(s.runs) if (r / "model.he").is_file())
        key = s.key_dir("focal" if "focal" in json.loads((run / "metrics.json").read_text())["strategy"]
                        else "compact")
        out = s.sh(["flower-focal", "decrypt-model", "--run-dir", str(run), "--key", str(key)]).stdout
        assert (run / "model.pt").is_file(), out
        return
    if sub == "report":
        out = s.out("report")
        s.sh(["flower-focal", "report", "--runs", str(s.sweeps[0]), "--out", str(out)])
        assert (out / "report.md").is_file() or any(out.iterdir())
        return
    if sub == "evaluate":
        run = next(r for r in s.runs if str(s.pathmnist) in (r / "run_config.toml").read_text())
        data = args[args.index("--data") + 1]
        data = str(_test_only_npz(s)) if data == "hospital_b_test.npz" else data
        result = json.loads(s.sh(["flower-focal", "evaluate", "--run-dir", str(run), "--data", data,
                                  "--split", args[args.index("--split") + 1]]).stdout)
        assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["auroc_macro"] <= 1.0, result
        shown, shown_class = readme_evaluate_keys()  # the README's sketch of this output
        assert shown <= set(result) and shown_class <= set(result["per_class"][0]), (shown, result)
        assert result["confusion_matrix_axes"] in README.read_text()
        return
    if sub == "audit":
        out = s.out("audit")
        args[args.index("--out") + 1] = str(out)
        if "--num-samples" in args:
            args[args.index("--num-samples") + 1] = "2"
        s.sh(args)
        assert (out / "audit.json").is_file()
        return
    if sub == "stop-local":  # $FLWR_HOME is this session's: a user's own local SuperLink is not touched
        assert json.loads(s.sh(args).stdout)["processes_stopped"] >= 0
        return
    if sub == "deploy-local":
        config = args.index("--run-config") + 1
        args[config] += f" num-server-rounds={ROUNDS}"
        out = s.out("deploy")
        result = json.loads(s.sh([*args, "--run-dir", str(out)]).stdout.strip().splitlines()[-1])
        assert result["status"] == "finished:completed" and result["secure"] is True
        deployment = out / "deployment"
        assert {Path(p).name for p in result["logs"]} >= {"superlink.log", "supernode0.log", "supernode1.log"}
        assert not (deployment / "server-keys" / "secret.ctx").exists()  # the server host: public.ctx only
        assert (out / "model.he").is_file() and (out / "model.pt").is_file()  # decrypted by an institution
        assert len(json.loads((out / "metrics.json").read_text())["rounds"][0]["train_institutions"]) == 2
        assert processes_mentioning(str(deployment)) == []  # every process stopped
        return
    if sub == "certs":
        out = s.out("consortium")
        args[args.index("--out") + 1] = str(out)
        s.sh(args)
        assert (out / "SHA256SUMS").is_file() or any(out.rglob("*.crt"))
        return
    raise AssertionError(f"no runner for flower-focal {sub}: {command}")




def run_bench_dp(s: Session, command: str) -> None:
    args = shlex.split(command)
    for flag, value in (("--rounds", "1"), ("--local-epochs", "1")):
        args[args.index(flag) + 1] = value
    zs = args.index("--zs")
    end = next((k for k in range(zs + 1, len(args)) if args[k].startswith("--")), len(args))
    args[zs + 1:end] = ["1.0"]
    proc = s.sh([*args, "--institutions", str(INSTITUTIONS), "--no-controls"])
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result


def readme_evaluate_keys() -> tuple[set[str], set[str]]:
    """The keys the README's ``# {...}`` sketch of ``flower-focal evaluate``'s output names:
    top level, and those of a ``per_class`` entry."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL)
                 if "flower-focal evaluate" in b)
    sketch = "\n".join(line.lstrip("# ") for line in block.splitlines() if line.startswith("#"))
    per_class = re.search(r'"per_class": \[(\{.*?\})', sketch)
    top = re.sub(r'"per_class": \[\{.*?\}', '"per_class": [', sketch)
    assert per_class, sketch
    return set(re.findall(r'"(\w+)":', top)), set(re.findall(r'"(\w+)":', per_class[1]))


def run_readme_tables(s: Session, command: str) -> None:
    args = shlex.split(command)
    if "--write" in args:  # on a copy: the README itself must already be what --write makes
        copy = s.out("README.md")
        copy.write_text(README.read_text())
        s.sh([*args, "--readme", str(copy)])
        assert copy.read_text() == README.read_text(), "README tables differ from their renderings"
    else:
        s.sh(args)  # --check exits 1 on a difference


RUNNERS = {"hydra": run_hydra, "export": run_export, "flwr_run": run_flwr, "flwr_ls": run_flwr_ls,
           "cli": run_cli, "bench_dp": run_bench_dp, "readme_tables": run_readme_tables}


@pytest.mark.slow
def test_every_readme_command_runs_at_small_size(tmp_path):
    if shared_npz("pathmnist") is None or shared_npz("retinamnist") is None:
        pytest.skip("needs ../shared/data (PathMNIST, RetinaMNIST)")
    s = Session(tmp_path)
    ran, failures = [], []
    for command in readme_commands():
        plan = plan_of(command)
        if not plan.run:
            continue
        try:
            RUNNERS[plan.run](s, command)
            ran.append(command)
        except Exception as exc:  # noqa: BLE001 - collect every failing command, then report
            failures.append(f"{command}\n    -> {type(exc).__name__}: {str(exc)[-1500:]}")
    print(json.dumps({"ran": len(ran), "failed": len(failures)}))
    assert not failures, "\n\n".join(failures)
    assert len(ran) >= 20
    shutil.rmtree(tmp_path, ignore_errors=True)
