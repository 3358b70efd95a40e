"""Human-facing outputs of a run: ``curves.png`` and ``summary.md`` from a :class:`RunHistory`."""

from __future__ import annotations

import math
from pathlib import Path

from flower_focal.history import RunHistory

_CURVES = (
    ("evaluate", "loss", "validation loss"),
    ("evaluate", "accuracy", "validation accuracy"),
    ("evaluate", "auroc", "validation macro AUROC"),
    ("train", "train-loss", "training loss"),
)


def dataset_label(config: dict) -> str:
    """The data a run used, as plot titles name it: the data file's stem (``pathmnist``), the
    image folder's name, or the dataset name (``synthetic-retina``)."""
    path = str(config.get("data-path") or "")
    if path:
        p = Path(path)
        return p.stem if p.suffix else p.name
    return str(config.get("dataset") or "unknown data")


def _institution_series(history: RunHistory, phase: str, key: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for rnd in history.rounds:
        per = rnd.train_institutions if phase == "train" else rnd.evaluate_institutions
        for inst, metrics in per.items():
            value = (metrics or {}).get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                xs, ys = out.setdefault(str(inst), ([], []))
                xs.append(rnd.round)
                ys.append(float(value))
    return out


def chance_level(key: str, num_classes: int | None) -> float | None:
    """Chance level of a metric: AUROC 0.5, accuracy 1/K (uniform guessing); None otherwise."""
    if key == "auroc":
        return 0.5
    if key == "accuracy" and num_classes:
        return 1.0 / num_classes
    return None


def curves_figure(history: RunHistory):
    """The ``curves.png`` figure: per round, the federation value (thick) over each
    institution's own value (thin), a dashed chance line on accuracy and AUROC, and the
    dataset in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    num_classes = history.info.get("num_classes")
    fig, axes = plt.subplots(1, len(_CURVES), figsize=(4.2 * len(_CURVES), 3.6))
    for ax, (phase, key, title) in zip(axes, _CURVES, strict=True):
        for i, (inst, (xs, ys)) in enumerate(sorted(_institution_series(history, phase, key).items())):
            ax.plot(xs, ys, color="0.6", linewidth=0.9, alpha=0.7,
                    label="institutions" if i == 0 else None)
        xs, ys = history.series(phase, key)
        ax.plot(xs, ys, marker="o", color="#1f77b4", linewidth=2.2, label="federation", zorder=3)
        chance = chance_level(key, num_classes)
        if chance is not None:
            what = "0.5" if key == "auroc" else f"1/{num_classes}"
            ax.axhline(chance, color="#d62728", linestyle="--", linewidth=1.0,
                       label=f"chance ({what})")
        ax.set_title(title)
        ax.set_xlabel("round")
        rounds = sorted({r.round for r in history.rounds})
        if 0 < len(rounds) <= 12:  # one tick per round
            ax.set_xticks(rounds)
            if len(rounds) == 1:
                ax.set_xlim(rounds[0] - 1, rounds[0] + 1)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if key in ("accuracy", "auroc"):
            ax.set_ylim(0.0, 1.0)
        ax.legend(fontsize=7, loc="best")
    n = history.info.get("institutions")
    fig.suptitle(f"{history.strategy} on {dataset_label(history.config)}"
                 + (f", {n} institutions" if n else ""))
    fig.tight_layout()
    return fig


def plot_curves(history: RunHistory, path: Path) -> Path:
    """Write :func:`curves_figure` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = curves_figure(history)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("–" if value is None else str(value))


def write_summary(history: RunHistory, path: Path) -> Path:
    """A Markdown summary: settings, the per-round table, the final per-institution table."""
    cfg = history.config
    lines = [
        f"# flower-focal run: {history.strategy}",
        "",
        f"Status: **{history.status}**",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for key in ("dataset", "data-path", "model", "num-server-rounds", "partitioner",
                "dirichlet-alpha", "local-epochs", "lr", "batch-size", "seed"):
        if key in cfg:
            lines.append(f"| {key} | {cfg[key]} |")
    for key, value in history.info.items():
        if key != "error" and isinstance(value, str | int | float):
            lines.append(f"| {key} | {value} |")
    lines += [
        "",
        "## Rounds (federation, weighted by validation examples)",
        "",
        "| round | train loss | val loss | val accuracy | val macro AUROC | institutions | failures | wall s | MB up | MB down |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in history.rounds:
        lines.append(
            f"| {r.round} | {_fmt(r.train.get('train-loss'))} | {_fmt(r.evaluate.get('loss'))} | "
            f"{_fmt(r.evaluate.get('accuracy'))} | {_fmt(r.evaluate.get('auroc'))} | "
            f"{len(r.train_institutions)} | {len(r.failures)} | {_fmt(r.wall_time_s)} | "
            f"{r.bytes_up / 1e6:.2f} | {r.bytes_down / 1e6:.2f} |"
        )
    if history.rounds and history.rounds[-1].evaluate_institutions:
        last = history.rounds[-1]
        lines += [
            "",
            f"## Institutions after round {last.round}",
            "",
            "| institution | val examples | accuracy | macro AUROC |",
            "|---|---|---|---|",
        ]
        for pid, m in sorted(last.evaluate_institutions.items()):
            lines.append(
                f"| {pid} | {m.get('num-examples')} | {_fmt(m.get('accuracy'))} | {_fmt(m.get('auroc'))} |"
            )
    failures = [f for r in history.rounds for f in r.failures]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in failures]
    if "error" in history.info:
        lines += ["", "## Error", "", f"```\n{history.info['error']}\n```"]
    path.write_text("\n".join(lines) + "\n")
    return path
