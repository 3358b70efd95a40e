"""Compare runs of different strategies on the same data: ``report.md`` + plots + ``report.json``.

    from flower_focal.compare import collect, write_report
    runs = collect(["multirun/.../0-fedavg-medmnist", "multirun/.../1-he-fedavg-medmnist"])
    write_report(runs, "multirun/.../report")

Everything in the report is read from what the runs wrote: ``metrics.json`` (per round:
federation accuracy / macro AUROC, wall time, bytes up and down), ``config.json`` (the run
config) and, when the run was audited, ``audit.json`` (the leakage rate of a gradient-inversion
attack; see :mod:`flower_focal.audit`). A run without ``audit.json`` is reported as "not audited".

Runs are comparable when they share the data, the partition, the number of institutions, the
seed and the number of rounds; :func:`differences` lists what differs (every run is compared,
however many runs share a strategy) and :func:`write_report` refuses non-comparable runs unless
``allow_mismatch=True`` (then the report says what differs, at the top, and shows one summary
table per group of comparable runs, :func:`comparable_groups`). Every row is labelled
``strategy (dataset)`` (the data file's stem), with the run directory added where two rows would
otherwise read the same. The model and local-training settings may differ (FOCAL trains a linear head on a
frozen backbone, the others a whole network) and are listed per run.

Bytes per round per institution are the round's totals (``bytes_up`` / ``bytes_down`` in
``metrics.json``: array payload of every message, training and evaluation) divided by the
number of institutions in the federation: the mean share of one institution. With
``fraction-train`` = ``fraction-evaluate`` = 1 every institution gets the same messages in
fedavg and he-fedavg; in focal the embedding upload of round 1 grows with each institution's
number of examples.

The Hydra launcher writes this report after a multirun (``simulations/callbacks.py``);
``flower-focal report --runs DIR... --out DIR`` rebuilds it from run directories.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flower_focal.strategy.specs import STRATEGY_SPECS, TRAINING_KEYS

STRATEGY_ORDER = tuple(STRATEGY_SPECS)
REPORT_FILE = "report.md"
REPORT_JSON = "report.json"
PLOTS = {
    "auroc": "auroc.png",
    "accuracy": "accuracy.png",
    "wall_time": "wall_time.png",
    "bytes": "bytes.png",
    "leakage": "leakage.png",
}
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
# fedavg and he-fedavg often give the same curve: distinct markers and dashes keep both visible
_MARKS = (("o", "-", 7), ("s", "--", 5), ("^", ":", 6), ("D", "-.", 5), ("v", "-", 6), ("P", "--", 6))
_COLORS = {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(STRATEGY_SPECS)}
_STYLES = {name: _MARKS[i % len(_MARKS)] for i, name in enumerate(STRATEGY_SPECS)}

# Settings that must agree for runs to be compared (key -> when it matters).
_ALWAYS = ("dataset", "data-path", "image-size", "train-split", "val-split", "partitioner",
           "min-partition-size", "seed", "num-server-rounds")
# Settings listed per run (they may differ between strategies), by strategy.
_TRAINING = TRAINING_KEYS
_PER_RUN = {name: spec.settings for name, spec in STRATEGY_SPECS.items()}
_OFF_BY_ZERO = {"dp-noise-multiplier": "dp-clipping-norm", "he-clip-norm": "he-noise-multiplier"}


class NotComparable(ValueError):
    """The runs differ in data, partition, institutions, seed, rounds or status."""


@dataclass(frozen=True)
class RunSummary:
    """One run as the report sees it: read from its run directory, nothing recomputed."""

    run_dir: Path
    label: str
    strategy: str
    status: str
    config: dict[str, Any]
    info: dict[str, Any]
    rounds: list[dict[str, Any]]
    institutions: int
    audit: dict[str, Any] | None

    # ----------------------------------------------------------------- per round
    def series(self, phase: str, key: str) -> tuple[list[int], list[float]]:
        """Federation-level ``key`` of ``phase`` ('train' / 'evaluate') for rounds that have it."""
        xs, ys = [], []
        for rnd in self.rounds:
            value = (rnd.get(phase) or {}).get(key)
            if value is not None:
                xs.append(int(rnd["round"]))
                ys.append(float(value))
        return xs, ys

    def per_round(self) -> list[dict[str, Any]]:
        """One row per round: accuracy, AUROC, wall time, bytes (total and per institution)."""
        rows = []
        for rnd in self.rounds:
            ev = rnd.get("evaluate") or {}
            up, down = int(rnd.get("bytes_up", 0)), int(rnd.get("bytes_down", 0))
            rows.append({
                "round": int(rnd["round"]),
                "accuracy": ev.get("accuracy"),
                "auroc": ev.get("auroc"),
                "loss": ev.get("loss"),
                "wall_time_s": rnd.get("wall_time_s"),
                "bytes_up": up,
                "bytes_down": down,
                "bytes_up_per_institution": up / self.institutions,
                "bytes_down_per_institution": down / self.institutions,
                "failures": len(rnd.get("failures") or []),
            })
        return rows

    # ----------------------------------------------------------------- whole run
    def final(self, key: str) -> float | None:
        """``key`` of the last round that evaluated (None if no round did)."""
        _, ys = self.series("evaluate", key)
        return ys[-1] if ys else None

    def wall_time_s(self) -> float:
        """Sum of the rounds' wall times (the server's time from a round's first message to
        its evaluation; FOCAL's round 1 includes the embedding upload)."""
        return float(sum(r.get("wall_time_s") or 0.0 for r in self.rounds))

    def bytes_total(self) -> tuple[int, int]:
        """(bytes up, bytes down) over all rounds, all institutions."""
        return (sum(int(r.get("bytes_up", 0)) for r in self.rounds),
                sum(int(r.get("bytes_down", 0)) for r in self.rounds))

    def leakage(self) -> dict[str, Any] | None:
        """The audit's headline numbers, or None when the run was not audited."""
        if self.audit is None:
            return None
        a = self.audit
        inst = a.get("institution_side")
        cfg = a.get("config") or {}
        return {
            "leakage_rate": float(a["leakage_rate"]),
            "attackable": bool(a.get("attackable", True)),
            "reason": str(a.get("reason", "")),
            "ssim_threshold": a.get("ssim_threshold"),
            "rule": a.get("rule"),
            "attacked_samples": int(a.get("attacked", len(a.get("ssim") or []))),
            "attack": cfg.get("attack"),
            "num_samples": cfg.get("num_samples"),
            "institution_side_leakage_rate": (
                float(inst["leakage_rate"]) if isinstance(inst, dict) and inst.get("leakage_rate") is not None
                else None),
        }

    def settings(self) -> dict[str, Any]:
        """The settings of this run that may differ between strategies (model, training, HE,
        DP); DP / clipping settings only when switched on."""
        keys = _PER_RUN.get(self.strategy, _TRAINING)
        out = {k: self.config[k] for k in keys if k in self.config}
        for switch, dependent in _OFF_BY_ZERO.items():
            if switch in out and not out[switch]:
                out.pop(switch)
                out.pop(dependent, None)
        return out

    def to_json(self) -> dict[str, Any]:
        """The run's entry in ``report.json``."""
        up, down = self.bytes_total()
        rows = self.per_round()
        n = max(len(rows), 1)
        return {
            "label": self.label,
            "strategy": self.strategy,
            "status": self.status,
            "run_dir": str(self.run_dir),
            "institutions": self.institutions,
            "settings": self.settings(),
            "final_accuracy": self.final("accuracy"),
            "final_auroc": self.final("auroc"),
            "wall_time_s": self.wall_time_s(),
            "bytes_up_total": up,
            "bytes_down_total": down,
            "bytes_up_per_round_per_institution": up / self.institutions / n,
            "bytes_down_per_round_per_institution": down / self.institutions / n,
            "leakage": self.leakage(),
            "rounds": rows,
        }


# --------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def expand_run_dirs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Run directories from ``paths``: a directory with ``metrics.json`` is a run; one without
    (e.g. a Hydra sweep directory) stands for its sub-directories that have one."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"run directory {path} does not exist")
        if (path / "metrics.json").is_file():
            out.append(path)
            continue
        children = sorted(p.parent for p in path.glob("*/metrics.json"))
        if not children:
            raise FileNotFoundError(f"{path} holds no metrics.json (nor do its sub-directories): not a run directory")
        out.extend(children)
    return out


def read_run(run_dir: str | os.PathLike[str]) -> RunSummary:
    """Read one run directory (``metrics.json``, ``config.json``, optional ``audit.json``)."""
    run_dir = Path(run_dir).expanduser().resolve()
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found: not a flower-focal run directory")
    metrics = _read_json(metrics_path)
    for key in ("strategy", "rounds"):
        if key not in metrics:
            raise ValueError(f"{metrics_path} has no {key!r}: not a flower-focal metrics.json")
    config_path = run_dir / "config.json"
    config = _read_json(config_path) if config_path.is_file() else dict(metrics.get("config") or {})
    if config.get("data-path"):  # one file, however the launcher spelled its path
        config["data-path"] = os.path.normpath(str(config["data-path"]))
    info = dict(metrics.get("info") or {})
    institutions = int(info.get("institutions") or config.get("min-available-nodes") or 0)
    if institutions < 1:
        raise ValueError(f"{metrics_path}: the number of institutions is unknown")
    audit = None
    audit_path = run_dir / "audit.json"
    if audit_path.is_file():
        audit = _read_json(audit_path)
        rate = audit.get("leakage_rate")
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"{audit_path}: 'leakage_rate' must be a number in [0, 1], got {rate!r}")
    strategy = str(metrics["strategy"])
    return RunSummary(run_dir=run_dir, label=f"{strategy} ({dataset_name(config)})", strategy=strategy,
                      status=str(metrics.get("status", "unknown")), config=config, info=info,
                      rounds=list(metrics["rounds"]), institutions=institutions, audit=audit)


def _order(run: RunSummary) -> int:
    return STRATEGY_ORDER.index(run.strategy) if run.strategy in STRATEGY_ORDER else len(STRATEGY_ORDER)


def dataset_name(config: dict[str, Any]) -> str:
    """The data a run used, as a report names it: the data file's stem (``pathmnist`` for
    ``.../pathmnist.npz``, the folder's name for an image folder), else the dataset name."""
    from flower_focal.reporting import dataset_label

    return dataset_label(config)


def unique_labels(runs: Sequence[RunSummary]) -> list[RunSummary]:
    """``runs`` labelled ``strategy (dataset)``; where two would share a label, the run
    directory (then its parent, then a number) is added, so no two rows read the same."""
    def label(run: RunSummary, level: int) -> str:
        ds = dataset_name(run.config)
        if level == 0:
            return f"{run.strategy} ({ds})"
        where = run.run_dir.name if level == 1 else f"{run.run_dir.parent.name}/{run.run_dir.name}"
        return f"{run.strategy} ({ds}, {where})"

    levels = [0] * len(runs)
    for _ in range(3):
        labels = [label(r, lv) for r, lv in zip(runs, levels, strict=True)]
        clash = {lab for lab in labels if labels.count(lab) > 1}
        if not clash:
            break
        levels = [min(lv + 1, 2) if lab in clash else lv
                  for lab, lv in zip(labels, levels, strict=True)]
    labels = [label(r, lv) for r, lv in zip(runs, levels, strict=True)]
    seen: dict[str, int] = {}
    out = []
    for run, lab in zip(runs, labels, strict=True):
        seen[lab] = seen.get(lab, 0) + 1
        if labels.count(lab) > 1:
            lab = f"{lab} #{seen[lab]}"
        out.append(dataclasses.replace(run, label=lab))
    return out


def collect(run_dirs: Iterable[str | os.PathLike[str]]) -> list[RunSummary]:
    """Read the runs (a sweep directory stands for its runs), ordered fedavg, he-fedavg, focal.

    Runs are labelled ``strategy (dataset)``; two runs that would share a label get their
    directory names too (:func:`unique_labels`).
    """
    runs = [read_run(d) for d in expand_run_dirs(run_dirs)]
    if not runs:
        raise ValueError("no run directories given")
    runs.sort(key=_order)  # stable: same strategy keeps the given order
    return unique_labels(runs)


# --------------------------------------------------------------------------- comparability
def _relevant_keys(config: dict[str, Any]) -> list[str]:
    keys = list(_ALWAYS)
    if str(config.get("dataset", "")).startswith("synthetic"):
        keys.append("num-samples")
    if config.get("partitioner") == "dirichlet":
        keys.append("dirichlet-alpha")
    if config.get("partitioner") == "by-site":
        keys.append("site-column")
    if config.get("dataset") == "csv":
        keys += ["image-column", "label-column"]
    return keys


def _comparable_view(run: RunSummary) -> dict[str, Any]:
    out = {k: run.config.get(k) for k in _relevant_keys(run.config)}
    out["institutions"] = run.institutions
    return out


def common_settings(runs: Sequence[RunSummary]) -> dict[str, Any]:
    """The settings every run shares (data, partition, institutions, seed, rounds); a setting
    the runs do not share is left out (see :func:`differences`)."""
    views = [_comparable_view(run) for run in runs]
    return {k: v for k, v in views[0].items()
            if all(k in view and json.dumps(view[k], sort_keys=True) == json.dumps(v, sort_keys=True)
                   for view in views[1:])}


def comparable_groups(runs: Sequence[RunSummary]) -> list[list[RunSummary]]:
    """``runs`` split into groups that share data, partition, institutions, seed and rounds
    (first-seen order); one group when the runs are comparable."""
    groups: dict[str, list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(json.dumps(_comparable_view(run), sort_keys=True, default=str), []).append(run)
    return list(groups.values())


def differences(runs: Sequence[RunSummary]) -> list[str]:
    """Why the runs are not comparable (empty when they are): one line per problem.

    Every run is compared, whatever its label: two runs of one strategy, or two runs with the
    same directory name, are checked like any others."""
    problems = []
    keys: list[str] = []
    for run in runs:
        keys += [k for k in _relevant_keys(run.config) if k not in keys]
    for key in keys:
        values = [(run.label, run.config.get(key)) for run in runs]
        if len({json.dumps(v, sort_keys=True) for _, v in values}) > 1:
            problems.append(f"{key} differs: " + ", ".join(f"{k}={v!r}" for k, v in values))
    inst = [(run.label, run.institutions) for run in runs]
    if len({v for _, v in inst}) > 1:
        problems.append("institutions differ: " + ", ".join(f"{k}={v}" for k, v in inst))
    for run in runs:
        if run.status != "completed":
            problems.append(f"{run.label} did not complete (status {run.status!r}): {run.run_dir}")
    return problems


# --------------------------------------------------------------------------- formatting
def _num(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _short(text: str, limit: int = 160) -> str:
    """One table cell: no pipes or newlines, at most ``limit`` characters (report.json has it all)."""
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def fmt_bytes(n: float) -> str:
    """Bytes in decimal units (B, kB, MB, GB) with three significant figures."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def leakage_text(run: RunSummary) -> str:
    """The leakage cell of the summary table."""
    leak = run.leakage()
    if leak is None:
        return "not audited"
    text = _num(leak["leakage_rate"], 2)
    if not leak["attackable"]:
        text += " (server holds only ciphertexts)"
    return text


def summary_rows(runs: Sequence[RunSummary]) -> list[list[str]]:
    """The cells of the summary table, in the order of :data:`SUMMARY_HEADER`."""
    rows = []
    for run in runs:
        j = run.to_json()
        rows.append([
            run.label,
            run.status,
            _num(j["final_accuracy"]),
            _num(j["final_auroc"]),
            _num(j["wall_time_s"], 1),
            fmt_bytes(j["bytes_up_per_round_per_institution"]),
            fmt_bytes(j["bytes_down_per_round_per_institution"]),
            fmt_bytes(j["bytes_up_total"] + j["bytes_down_total"]),
            leakage_text(run),
        ])
    return rows


SUMMARY_HEADER = ("strategy", "status", "final accuracy", "final macro AUROC", "wall time (s)",
                  "sent up / round / institution", "sent down / round / institution",
                  "total sent (all rounds)", "leakage rate (server)")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _rel(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:  # another drive
        return str(path)


def render_markdown(runs: Sequence[RunSummary], out_dir: Path, problems: Sequence[str],
                    plots: dict[str, str], command: str | None = None) -> str:
    """The text of ``report.md``."""
    common = common_settings(runs)
    lines = ["# flower-focal strategy comparison", ""]
    lines.append(
        f"{len(runs)} runs, read from their run directories (metrics.json, config.json, "
        "audit.json); nothing here is typed by hand.")
    if command:
        lines += ["", "Command:", "", "```bash", command, "```"]
    groups = comparable_groups(runs)
    if problems:
        lines += ["", "## ⚠ The runs are not comparable", ""] + [f"- {p}" for p in problems]
        if len(groups) > 1:
            lines += ["", (f"The runs are shown in {len(groups)} separate groups, each sharing data, "
                           "partition, institutions, seed and rounds: compare rows only within a group.")]
    lines += ["", "## Same for every run", ""]
    lines += _table(("setting", "value"), ([k, "–" if v in ("", None) else str(v)] for k, v in common.items()))
    if len(groups) == 1:
        lines += ["", "## Summary", ""]
        lines += _table(SUMMARY_HEADER, summary_rows(runs))
    for i, group in enumerate(groups if len(groups) > 1 else [], 1):
        own = ", ".join(f"{k}={v}" for k, v in common_settings(group).items() if k not in common)
        lines += ["", f"## Summary, group {i} of {len(groups)}: {own}", ""]
        lines += _table(SUMMARY_HEADER, summary_rows(group))
    lines += [
        "",
        "Final accuracy / macro AUROC: the last round's federated validation metrics "
        "(example-weighted mean over institutions). Wall time: sum of the rounds' wall times "
        "measured by the server. Sent up / down per round per institution: the round's array "
        "payload (training and evaluation messages) divided by the number of institutions, "
        "averaged over rounds. Leakage rate: fraction of the audited samples that a "
        "gradient-inversion attack by the server reconstructed (see audit.json).",
    ]
    lines += ["", "## Plots", ""]
    for key, title in (("auroc", "Macro AUROC per round"), ("accuracy", "Accuracy per round"),
                       ("wall_time", "Wall time"), ("bytes", "Bytes per round per institution"),
                       ("leakage", "Leakage rate")):
        if key in plots:
            lines += [f"![{title}]({plots[key]})", ""]
    lines += ["## Per round", ""]
    rows = []
    for run in runs:
        for r in run.per_round():
            rows.append([str(r["round"]), run.label, _num(r["accuracy"]), _num(r["auroc"]),
                         _num(r["wall_time_s"], 1), fmt_bytes(r["bytes_up_per_institution"]),
                         fmt_bytes(r["bytes_down_per_institution"]), str(r["failures"])])
    rows.sort(key=lambda row: int(row[0]))  # stable: strategies keep their order within a round
    lines += _table(("round", "strategy", "accuracy", "macro AUROC", "wall time (s)",
                     "up / institution", "down / institution", "failures"), rows)
    lines += ["", "## Privacy audit", ""]
    audit_rows = []
    for run in runs:
        leak = run.leakage()
        if leak is None:
            audit_rows.append([run.label, "not audited", "–", "–", "–", "–"])
            continue
        audit_rows.append([
            run.label, _num(leak["leakage_rate"], 2),
            "yes" if leak["attackable"] else "no",
            str(leak["attacked_samples"]),
            _num(leak["institution_side_leakage_rate"], 2),
            _short(leak["reason"] or ""),
        ])
    lines += _table(("strategy", "leakage rate (server)", "server can attack", "samples attacked",
                     "leakage rate (institution side)", "reason"), audit_rows)
    rules = {leak["rule"] for run in runs if (leak := run.leakage()) and leak.get("rule")}
    if rules:
        lines += [""] + [f"Rule: {rule}" for rule in sorted(rules)]
    lines += ["", "## Runs", ""]
    lines += _table(("strategy", "run directory", "settings"), (
        [run.label, _rel(run.run_dir, out_dir),
         ", ".join(f"{k}={v}" for k, v in run.settings().items())]
        for run in runs))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(run: RunSummary, runs: Sequence[RunSummary]) -> tuple[str | None, str, str, int]:
    """(color, marker, dash, marker size) of ``run``: by strategy, or by position among
    ``runs`` when a strategy appears more than once (its runs must not look alike)."""
    strategies = [r.strategy for r in runs]
    if strategies.count(run.strategy) > 1:
        i = next(k for k, r in enumerate(runs) if r is run or r.label == run.label)
        return (_PALETTE[i % len(_PALETTE)], *_MARKS[i % len(_MARKS)])
    return (_COLORS.get(run.strategy), *_STYLES.get(run.strategy, ("o", "-", 6)))


def _line(ax, run: RunSummary, runs: Sequence[RunSummary], xs: Sequence[float],
          ys: Sequence[float]) -> None:
    color, marker, dash, size = _style(run, runs)
    ax.plot(xs, ys, marker=marker, linestyle=dash, markersize=size, label=run.label, color=color)


def _round_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    rounds = sorted({int(x) for line in ax.get_lines() for x in line.get_xdata()})
    if 0 < len(rounds) <= 12:  # one tick per round (one round must not get ticks 0.95..1.05)
        ax.set_xticks(rounds)
        if len(rounds) == 1:
            ax.set_xlim(rounds[0] - 1, rounds[0] + 1)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def datasets_text(runs: Sequence[RunSummary]) -> str:
    """The datasets of ``runs`` for a plot title (``pathmnist``; ``pathmnist, retinamnist``)."""
    names: list[str] = []
    for run in runs:
        if (name := dataset_name(run.config)) not in names:
            names.append(name)
    return ", ".join(names)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _bars(ax, runs: Sequence[RunSummary], values: Sequence[float]):
    bars = ax.bar(range(len(runs)), values, color=[_style(r, runs)[0] for r in runs])
    ax.set_xticks(range(len(runs)), [r.label for r in runs], rotation=20, ha="right", fontsize=8)
    return bars


def metric_figure(runs: Sequence[RunSummary], key: str, title: str):
    """``auroc.png`` / ``accuracy.png``: the federated validation ``key`` per round."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for run in runs:
        xs, ys = run.series("evaluate", key)
        _line(ax, run, runs, xs, ys)
    _round_axis(ax)
    ax.set_ylabel(title)
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{title} (federated validation)\n{datasets_text(runs)}", fontsize=10)
    fig.tight_layout()
    return fig


def wall_figure(runs: Sequence[RunSummary]):
    """``wall_time.png``: wall time per round and over all rounds."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    for run in runs:
        rows = run.per_round()
        _line(ax1, run, runs, [r["round"] for r in rows], [r["wall_time_s"] or 0.0 for r in rows])
    _round_axis(ax1)
    ax1.set_ylabel("seconds")
    ax1.set_title("wall time per round")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    _bars(ax2, runs, [r.wall_time_s() for r in runs])
    ax2.set_ylabel("seconds")
    ax2.set_title("wall time, all rounds")
    fig.suptitle(f"wall time, {datasets_text(runs)}")
    fig.tight_layout()
    return fig


def _byte_ticks(values: Sequence[float]) -> tuple[list[float], bool]:
    """Y ticks for byte counts that start at or below the smallest value and end at or above
    the largest (no line above the top tick); log scale (decades) only when the values span
    more than 30x."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    positive = [v for v in values if v > 0] or [1.0]
    lo, hi = min(positive), max(positive)
    if hi < 30 * lo:
        ticks = [float(t) for t in MaxNLocator(nbins=5, min_n_ticks=3).tick_values(0.0, hi) if t >= 0]
        return ticks, False
    first, last = int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi)))
    return [10.0 ** e for e in range(first, last + 1)], True


def bytes_figure(runs: Sequence[RunSummary]):
    """``bytes.png``: bytes sent up and down per round per institution."""
    plt = _plt()
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0))
    for ax, key, title in ((axes[0], "bytes_up_per_institution", "sent up (institution → server)"),
                           (axes[1], "bytes_down_per_institution", "sent down (server → institution)")):
        values = []
        for run in runs:
            rows = run.per_round()
            values += [r[key] for r in rows]
            _line(ax, run, runs, [r["round"] for r in rows], [r[key] for r in rows])
        ticks, log = _byte_ticks(values)
        if log:
            ax.set_yscale("log")
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(ticks, [fmt_bytes(t) for t in ticks])
        ax.set_ylim(ticks[0], ticks[-1])
        _round_axis(ax)
        ax.set_ylabel("bytes per institution")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"bytes per round per institution, {datasets_text(runs)}")
    fig.tight_layout()
    return fig


def leakage_figure(runs: Sequence[RunSummary]):
    """``leakage.png``: leakage rate of the audited runs (None when no run was audited)."""
    audited = [r for r in runs if r.leakage() is not None]
    if not audited:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    values = [r.leakage()["leakage_rate"] for r in audited]  # type: ignore[index]
    bars = _bars(ax, audited, values)
    for bar, run in zip(bars, audited, strict=True):
        leak = run.leakage() or {}
        text = f"{leak['leakage_rate']:.2f}" + ("" if leak["attackable"] else " (ciphertexts)")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("fraction of samples reconstructed")
    ax.set_title(f"leakage rate (server-side gradient inversion), {datasets_text(audited)}",
                 fontsize=9)
    fig.tight_layout()
    return fig


def write_plots(runs: Sequence[RunSummary], out_dir: Path) -> dict[str, str]:
    """Write the PNGs into ``out_dir``; returns {plot key: file name}. ``leakage.png`` only
    when at least one run was audited (an old one is removed otherwise)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _save(metric_figure(runs, "auroc", "macro AUROC"), out_dir / PLOTS["auroc"])
    _save(metric_figure(runs, "accuracy", "accuracy"), out_dir / PLOTS["accuracy"])
    _save(wall_figure(runs), out_dir / PLOTS["wall_time"])
    _save(bytes_figure(runs), out_dir / PLOTS["bytes"])
    written = {k: PLOTS[k] for k in ("auroc", "accuracy", "wall_time", "bytes")}
    leak = leakage_figure(runs)
    if leak is None:
        (out_dir / PLOTS["leakage"]).unlink(missing_ok=True)
    else:
        written["leakage"] = PLOTS["leakage"]
        _save(leak, out_dir / PLOTS["leakage"])
    return written


# --------------------------------------------------------------------------- entry point
def write_report(
    runs: Iterable[str | os.PathLike[str]] | Sequence[RunSummary],
    out_dir: str | os.PathLike[str],
    *,
    allow_mismatch: bool = False,
    command: str | None = None,
) -> Path:
    """Write ``report.md``, ``report.json`` and the plots into ``out_dir``; returns report.md.

    ``runs`` are run directories (or a sweep directory, or :func:`collect`'s result).
    Raises :class:`NotComparable` when the runs differ in data, partition, institutions, seed
    or rounds, or one did not complete, unless ``allow_mismatch`` (then the report lists the
    differences at the top). ``command`` is shown in the report (how it was produced).
    """
    runs = list(runs)
    summaries = (unique_labels(runs) if runs and all(isinstance(r, RunSummary) for r in runs)
                 else collect(runs))
    problems = differences(summaries)
    if problems and not allow_mismatch:
        raise NotComparable(
            "the runs are not comparable (same data, partition, institutions, seed and rounds "
            "are required):\n  " + "\n  ".join(problems))
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(summaries, out)
    report = out / REPORT_FILE
    report.write_text(render_markdown(summaries, out, problems, plots, command))
    doc = {
        "common": common_settings(summaries),
        "differences": problems,
        "groups": [{"common": common_settings(g), "runs": [r.label for r in g]}
                   for g in comparable_groups(summaries)],
        "command": command,
        "runs": [r.to_json() for r in summaries],
        "plots": plots,
    }
    (out / REPORT_JSON).write_text(json.dumps(doc, indent=2, allow_nan=False))
    return report
