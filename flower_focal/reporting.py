"""Human-facing outputs of a run: ``curves.png`` and ``summary.md`` from a :class:`RunHistory`."""

from __future__ import annotations

from pathlib import Path

from flower_focal.history import RunHistory

_CURVES = (
    ("evaluate", "loss", "validation loss"),
    ("evaluate", "accuracy", "validation accuracy"),
    ("evaluate", "auroc", "validation macro AUROC"),
    ("train", "train-loss", "training loss"),
)


def plot_curves(history: RunHistory, path: Path) -> Path:
    """Plot federation-level loss/accuracy/AUROC per round into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(_CURVES), figsize=(4.2 * len(_CURVES), 3.4))
    for ax, (phase, key, title) in zip(axes, _CURVES, strict=True):
        xs, ys = history.series(phase, key)
        ax.plot(xs, ys, marker="o")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if key in ("accuracy", "auroc"):
            ax.set_ylim(0.0, 1.0)
    fig.suptitle(f"{history.strategy} — {history.config.get('dataset', '')}")
    fig.tight_layout()
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
