"""One PNG comparing evaluation directories: miss / incorrect / hallucination / EER across checkpoints or rounds.

    python -m src.evaluate --compare checkpoints/sft/final runs/mrdpo/round1 runs/mrdpo/round2 --plot docs/eer.png

Draws on a bare matplotlib Figure with the Agg canvas (no pyplot, no global backend switch), so it works on
headless machines and inside other programs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SERIES = (("miss", "miss", "o"), ("incorrect", "incorrect", "s"), ("hallucination", "hallucination", "^"),
          ("eer", "EER (sum)", "D"))


def default_label(directory: str | Path) -> str:
    """A short name for an evaluation directory: its name, or parent/name when the name is generic."""
    path = Path(directory).resolve()
    if path.name in {"final", "eval", "last", "out"} and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def plot_compare(runs: Sequence[tuple[str, dict]], path: str | Path, *, title: str | None = None) -> Path:
    """Write a line chart of the rates (in %) of ``runs`` = [(label, results dict), ...] in the given order."""
    if not runs:
        raise ValueError("nothing to plot: give at least one evaluation directory")
    labels = [label for label, _ in runs]
    x = list(range(len(runs)))
    fig = Figure(figsize=(max(6.0, 1.3 * len(runs) + 3), 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = max(100 * result[key] for _, result in runs for key, _, _ in SERIES)
    for key, name, marker in SERIES:
        values = [100 * result[key] for _, result in runs]
        ax.plot(x, values, marker=marker, linewidth=2.5 if key == "eer" else 1.5, label=name)
        if key == "eer":
            for xi, value in zip(x, values):
                ax.annotate(f"{value:.1f}%", (xi, value), textcoords="offset points", xytext=(0, 7),
                            ha="center", fontsize=8)
    ax.set_xticks(x, labels, rotation=20 if len(runs) > 4 else 0, ha="right" if len(runs) > 4 else "center")
    ax.set_ylabel("% of ground-truth events")
    ax.set_ylim(0, 1.15 * top if top > 0 else 1.0)  # room for the EER labels
    ax.margins(x=0.15)
    ax.grid(axis="y", alpha=0.3)
    judges = sorted({str(result.get("judge", "?")) for _, result in runs})
    clips = sorted({str(result.get("n_clips", "?")) for _, result in runs})
    ax.set_title(title or f"Caption errors (judge: {', '.join(judges)}; {'/'.join(clips)} clips)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
