"""Validation-loss curves: loss against training time and against tokens, one run or several overlaid.

Curves come from the trainer's DVCLive files, metrics/dvclive/plots/metrics/val/{loss,seconds,tokens}.tsv
(tab-separated, a header `step<TAB><name>`, one row per validation), joined on the step.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
from pathlib import Path

from .atomic import atomic_path

VAL_DIR = Path("plots/metrics/val")   # inside a DVCLive directory
SERIES = ("loss", "seconds", "tokens")


@dataclasses.dataclass
class Curve:
    label: str
    steps: list[int]
    loss: list[float]
    seconds: list[float]
    tokens: list[float]


def parse_tsv(text: str) -> dict[int, float]:
    """step -> value of a DVCLive TSV (the value column is named after the metric)."""
    rows = csv.reader(io.StringIO(text), delimiter="\t")
    header = next(rows, None)
    if not header or header[0] != "step" or len(header) < 2:
        return {}
    out = {}
    for row in rows:
        if len(row) >= 2 and row[0].strip():
            try:
                out[int(float(row[0]))] = float(row[1])  # resumed runs rewrite a step: last wins
            except ValueError:
                continue
    return out


def curve_from_texts(label: str, texts: dict[str, str | None]) -> Curve:
    """Join the three series on the steps they share (a run may be cut between two writes)."""
    series = {k: parse_tsv(texts.get(k) or "") for k in SERIES}
    steps = sorted(set.intersection(*(set(s) for s in series.values())))
    return Curve(label, steps, *[[series[k][s] for s in steps] for k in SERIES])


def read_curve(live_dir: str | os.PathLike, label: str | None = None) -> Curve:
    d = Path(live_dir) / VAL_DIR
    texts = {k: (d / f"{k}.tsv").read_text() if (d / f"{k}.tsv").is_file() else None for k in SERIES}
    return curve_from_texts(label or str(live_dir), texts)


def plot_curves(curves: list[Curve], out: str | os.PathLike, target: float | None = None,
                title: str = "validation loss") -> Path:
    """Two panels (loss vs training seconds, loss vs tokens), one line per curve; written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True, constrained_layout=True)
    panels = ((axes[0], "seconds", "training time (s)"), (axes[1], "tokens", "training tokens"))
    drawn = [c for c in curves if c.steps]
    for ax, key, xlabel in panels:
        for c in drawn:
            ax.plot(getattr(c, key), c.loss, marker="o", markersize=3, linewidth=1.5, label=c.label)
        if target is not None:
            ax.axhline(target, color="crimson", linestyle="--", linewidth=1, label=f"target {target}")
        ax.set_xlabel(xlabel)
        ax.set_xlim(left=0)  # time and tokens start at zero: the slope reads as speed
        ax.grid(True, alpha=0.3)
    axes[1].xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())
    axes[0].set_ylabel("validation loss")
    if not drawn:
        for ax in axes:
            ax.text(0.5, 0.5, "no validation history", ha="center", va="center", transform=ax.transAxes)
    axes[1].legend(loc="upper right", fontsize="small")
    fig.suptitle(title)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(out)
