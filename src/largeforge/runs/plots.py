"""Curves for the HTML reports: matplotlib figures rendered by Agg into base64 PNG data URIs.

Figures are built with `matplotlib.figure.Figure` directly, never through `pyplot`, so no global
backend or figure registry is touched (the training process that writes a report keeps its own
state) and no display is needed. A data URI embeds the image in the page itself, so a report is
one self-contained file that reads offline.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Keys every training record carries; anything else numeric is an objective's own metric
# (DPO rewards and preference accuracy, distillation's KD and CE terms, ...).
TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu")
EVAL_KEYS = ("val_loss", "val_ppl")
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
FIGSIZE = (6.4, 3.0)
DPI = 96


@dataclass
class Metrics:
    """The records of a run's `metrics.jsonl`, split into training and evaluation records."""

    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0  # unreadable lines (a run killed mid-write), counted, never hidden

    def extra_train_keys(self) -> list[str]:
        """Numeric keys of the training records beyond the standard ones, in first-seen order."""
        return _numeric_keys(self.train, exclude=("step", *TRAIN_KEYS))

    def extra_eval_keys(self) -> list[str]:
        return _numeric_keys(self.eval, exclude=("step", *EVAL_KEYS))

    def series(self, key: str, *, eval_records: bool = False) -> tuple[list[int], list[float]]:
        """(steps, values) of one key, skipping records that lack it or hold no finite number."""
        records = self.eval if eval_records else self.train
        steps, values = [], []
        for record in records:
            value = record.get(key)
            if _is_number(value) and math.isfinite(value):
                steps.append(int(record["step"]))
                values.append(float(value))
        return steps, values


def read_metrics(path: Path) -> Metrics:
    """Read `metrics.jsonl`. A record with `val_loss` is an eval record, one with `loss` (or any
    other metric) a training record. A later record for the same step and kind replaces an
    earlier one, as a resumed run replays its steps."""
    metrics = Metrics()
    if not path.is_file():
        return metrics
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            metrics.skipped_lines += 1
            continue
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            metrics.skipped_lines += 1
            continue
        step = int(record["step"])
        target = evals if "val_loss" in record else train
        target[step] = {**target.get(step, {}), **record}
    metrics.train = [train[s] for s in sorted(train)]
    metrics.eval = [evals[s] for s in sorted(evals)]
    return metrics


@dataclass
class Series:
    """One line of a chart."""

    label: str
    steps: Sequence[float]
    values: Sequence[float]
    color: str | None = None
    dashed: bool = False


def line_chart(series: Sequence[Series], *, title: str, ylabel: str, xlabel: str = "step",
               log_y: bool = False, percent: bool = False) -> str | None:
    """A line chart of `series` as a PNG data URI; None when no series has a point."""
    series = [s for s in series if len(s.steps)]
    if not series:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    # "tight" lays out as well as "constrained" here at half the cost (a report is written at
    # the end of every run, so its time counts).
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="tight")
    ax = fig.add_subplot()
    for index, s in enumerate(series):
        few = len(s.steps) <= 20  # markers keep single points and short runs visible
        ax.plot(list(s.steps), list(s.values), label=s.label,
                color=s.color or PALETTE[index % len(PALETTE)],
                linestyle="--" if s.dashed else "-", marker="o" if few else None,
                markersize=3.5, linewidth=1.5)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    low, high = min(min(s.steps) for s in series), max(max(s.steps) for s in series)
    if high - low < 2:  # one or two steps: give them room rather than ticks at 1.975, 2.025
        ax.set_xlim(low - 1, high + 1)
    ax.set_ylabel(ylabel)
    if log_y and all(v > 0 for s in series for v in s.values):
        ax.set_yscale("log")
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return figure_to_data_uri(fig)


def figure_to_data_uri(fig: Figure) -> str:
    """Render a figure with Agg into an embeddable `data:image/png;base64,...` string."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    # Light compression: a third faster than the default, the PNG a little bigger.
    fig.savefig(buffer, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def run_charts(metrics: Metrics) -> list[tuple[str, str]]:
    """The curves of one run as (title, data URI): loss with val loss overlaid, learning rate,
    throughput, MFU, gradient norm, then one chart per objective metric."""
    charts: list[tuple[str, str | None]] = []
    loss = Series("train loss", *metrics.series("loss"), color=PALETTE[0])
    val = Series("val loss", *metrics.series("val_loss", eval_records=True), color=PALETTE[1],
                 dashed=True)
    charts.append(("Loss", line_chart([loss, val], title="Loss", ylabel="loss")))
    charts.append(("Learning rate", line_chart(
        [Series("lr", *metrics.series("lr"))], title="Learning rate", ylabel="lr")))
    charts.append(("Throughput", line_chart(
        [Series("tokens/s", *metrics.series("tokens_per_s"), color=PALETTE[2])],
        title="Throughput", ylabel="tokens / s")))
    charts.append(("MFU", line_chart(
        [Series("MFU", *metrics.series("mfu"), color=PALETTE[3])],
        title="Model FLOPs utilisation", ylabel="MFU", percent=True)))
    charts.append(("Gradient norm", line_chart(
        [Series("grad norm", *metrics.series("grad_norm"), color=PALETTE[4])],
        title="Gradient norm", ylabel="norm")))
    for index, key in enumerate(metrics.extra_train_keys()):
        charts.append((key, line_chart(
            [Series(key, *metrics.series(key), color=PALETTE[(5 + index) % len(PALETTE)])],
            title=key.replace("_", " "), ylabel=key)))
    return [(title, uri) for title, uri in charts if uri is not None]


def overlaid_loss_chart(runs: dict[str, Metrics]) -> str | None:
    """Train loss (solid) and val loss (dashed) of several runs on one chart, a colour each."""
    series: list[Series] = []
    for index, (label, metrics) in enumerate(runs.items()):
        color = PALETTE[index % len(PALETTE)]
        series.append(Series(f"{label} train", *metrics.series("loss"), color=color))
        series.append(Series(f"{label} val", *metrics.series("val_loss", eval_records=True),
                             color=color, dashed=True))
    return line_chart(series, title="Loss curves", ylabel="loss")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numeric_keys(records: list[dict[str, Any]], exclude: Sequence[str]) -> list[str]:
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in exclude and _is_number(value):
                keys.setdefault(key)
    return list(keys)
