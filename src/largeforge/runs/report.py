"""The HTML report of a training run: `runs/<name>/report.html`.

One self-contained file: inline CSS, curves as data-URI PNGs, no scripts, no fonts or anything
else fetched (a Content-Security-Policy in the page forbids it), so it reads offline and can be
mailed or archived as it is. Pages are rendered by Jinja2 with autoescaping on, so text from a
recipe, a model or a data file can never become markup.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largeforge.errors import LargeForgeError
from largeforge.runs import CHECKPOINTS_DIR, RECIPE_FILE, RunDir
from largeforge.runs.plots import Metrics, read_metrics, run_charts

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 72rem; padding: 0 1rem; color: #1b1f24; background: #fff; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem;
     border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
.sub { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .92rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td, td.best { font-weight: 700; background: #dafbe1; }
.marker { color: #1a7f37; font-weight: 700; white-space: nowrap; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(30rem, 1fr));
          gap: 1rem; }
figure { margin: 0; border: 1px solid #d0d7de; border-radius: 6px; padding: .5rem; }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: #57606a; font-size: .85rem; text-align: center; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: .8rem;
      overflow-x: auto; font-size: .85rem; white-space: pre-wrap; word-break: break-word; }
.note { color: #9a6700; } footer { margin-top: 3rem; color: #57606a; font-size: .8rem; }
.status-completed { color: #1a7f37; } .status-failed { color: #cf222e; }
table.sample { width: 100%; }
.sample td { white-space: pre-wrap; word-break: break-word; max-width: 28rem; }
.sample td.output { min-width: 12rem; } tr.differ td.output { background: #fff8c5; }
.blank { color: #8c959f; font-style: italic; }
figure.wide { max-width: 48rem; }
"""

# No scripts, no remote anything: the browser itself refuses whatever the page might ask for.
PAGE_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title><style>{{ style }}</style></head><body>
"""
PAGE_FOOT = """<footer>Written by LargeForge {{ version }} on {{ generated }}.
Self-contained: nothing in this page is loaded from the network.</footer></body></html>
"""

RUN_TEMPLATE = PAGE_HEAD + """
<h1>Run {{ name }}</h1>
<p class="sub">{{ run_dir }}</p>
<table id="summary"><tbody>
<tr><th>Status</th><td class="status-{{ status }}">{{ status }}</td></tr>
<tr><th>Steps</th><td>{{ steps }}</td></tr>
<tr><th>Method</th><td>{{ method }}</td></tr>
<tr><th>Parameters</th><td>{{ parameters }}</td></tr>
<tr><th>Best checkpoint</th><td>{{ best }}</td></tr>
<tr><th>Last val loss</th><td>{{ last_val }}</td></tr>
<tr><th>Throughput (median)</th><td>{{ throughput }}</td></tr>
<tr><th>MFU (median)</th><td>{{ mfu }}</td></tr>
<tr><th>Updated</th><td>{{ updated }}</td></tr>
</tbody></table>
{% if skipped_lines %}<p class="note">{{ skipped_lines }} unreadable line(s) of metrics.jsonl
were skipped.</p>{% endif %}

<h2>Curves</h2>
{% if charts %}<div class="charts">
{% for title, uri in charts %}<figure><img src="{{ uri }}" alt="{{ title }}">
<figcaption>{{ title }}</figcaption></figure>
{% endfor %}</div>
{% else %}<p>No metrics logged yet.</p>{% endif %}

<h2>Evaluation</h2>
{% if eval_rows %}<table id="eval"><thead><tr><th>step</th>
{% for column in eval_columns %}<th>{{ column }}</th>{% endfor %}<th></th></tr></thead><tbody>
{% for row in eval_rows %}<tr{% if row.best %} class="best"{% endif %}><td class="num">
{{ row.step }}</td>{% for value in row.values %}<td class="num">{{ value }}</td>{% endfor %}
<td>{% if row.best %}<span class="marker">&#9733; best</span>{% endif %}</td></tr>
{% endfor %}</tbody></table>
{% else %}<p>No evaluation records: the run logged no validation loss.</p>{% endif %}

<h2>Checkpoints</h2>
{% if checkpoints %}<table id="checkpoints"><thead><tr><th>directory</th><th>step</th>
<th>holds</th><th>size</th><th></th></tr></thead><tbody>
{% for c in checkpoints %}<tr><td>{{ c.name }}</td><td class="num">{{ c.step }}</td>
<td>{{ c.kind }}</td><td class="num">{{ c.size }}</td><td>{{ c.note }}</td></tr>
{% endfor %}</tbody></table>
{% else %}<p>No checkpoints yet.</p>{% endif %}

<h2>Hardware</h2>
{% if hardware %}<table id="hardware"><tbody>
{% for key, value in hardware %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>{% endfor %}
</tbody></table>{% else %}<p>Not recorded.</p>{% endif %}

<h2>Recipe (resolved)</h2>
{% if recipe %}<pre id="recipe">{{ recipe }}</pre>{% else %}<p>No recipe.yaml.</p>{% endif %}
""" + PAGE_FOOT

HARDWARE_LABELS = {
    "device": "Device", "device_name": "Device name", "precision": "Precision",
    "cpu_cores": "CPU cores", "torch_threads": "Torch threads", "memory_gib": "Memory (GiB)",
    "peak_gflops": "Measured peak (GFLOP/s)", "python": "Python", "torch": "torch",
    "transformers": "transformers", "peft": "peft",
}


def write_run_report(run_dir: Path, output: Path | None = None) -> Path:
    """Write the HTML report of the run in `run_dir` (default `run_dir/report.html`); returns
    its path. Works on a finished, running or failed run, with or without eval records."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise LargeForgeError(f"run directory {run} not found")
    if not run.is_run():
        raise LargeForgeError(f"{run} is not a run directory (it has no {RECIPE_FILE})")
    target = Path(output) if output is not None else run.report
    check_output_file(target)
    html = render_run_report(run.path)
    write_html(target, html)
    return target


def render_run_report(run_dir: Path) -> str:
    """The report of `run_dir` as an HTML string. A damaged run.json is an error (RunStateError,
    naming the file), not an empty report: a report is what people trust about a run."""
    run = RunDir(run_dir)
    state = run.read_state()
    metrics = read_metrics(run.metrics)
    best_step = _best_step(state, metrics)
    columns, rows = _eval_table(metrics, best_step)
    return render(
        RUN_TEMPLATE,
        title=f"LargeForge run {run.name}",
        name=run.name,
        run_dir=str(run.path.resolve()),
        status=state.get("status", "unknown"),
        steps=_steps_text(state, metrics),
        method=state.get("method", "unknown"),
        parameters=_parameters_text(state),
        best=_best_text(state, metrics, best_step),
        last_val=fmt(state.get("last_val_loss")),
        throughput=_rate_text(state.get("median_tokens_per_s")),
        mfu=fmt_percent(state.get("median_mfu")),
        updated=state.get("updated", "unknown"),
        skipped_lines=metrics.skipped_lines,
        charts=run_charts(metrics),
        eval_columns=columns,
        eval_rows=rows,
        checkpoints=_checkpoints(run, best_step),
        recipe=run.recipe.read_text(encoding="utf-8", errors="replace"),
        hardware=[(HARDWARE_LABELS.get(k, k), "" if v is None else str(v))
                  for k, v in (state.get("hardware") or {}).items()],
    )


# --- shared by the run and compare reports -------------------------------------------------


def render(template: str, **context: Any) -> str:
    from jinja2 import Environment, StrictUndefined
    from markupsafe import Markup

    from largeforge.version import __version__

    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True)
    return env.from_string(template).render(
        style=Markup(STYLE),  # our own CSS; escaping it would break its quotes
        version=__version__,
        generated=time.strftime("%Y-%m-%d %H:%M:%S"), **context,
    )


def check_output_file(path: Path) -> None:
    """Refuse an output that cannot be a file, before any work is done."""
    if path.is_dir():
        raise LargeForgeError(f"output {path} is a directory; name an .html file")
    if path.suffix.lower() not in (".html", ".htm"):
        raise LargeForgeError(f"output {path} must end in .html")


def write_html(path: Path, html: str) -> None:
    from largeforge.atomic_files import write_atomic_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(path, html)


def fmt(value: object, digits: int = 4) -> str:
    """A number as people read it: 4 decimals for small values, thousands separators for big
    ones, a dash for nothing."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.1f}"
    if value != 0 and abs(value) < 10 ** -digits:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def fmt_percent(value: object) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "–"
    return f"{100 * value:.1f}%"


# --- pieces of the run report ---------------------------------------------------------------


@dataclass
class EvalRow:
    step: int
    values: list[str]
    best: bool


@dataclass
class CheckpointRow:
    name: str
    step: str
    kind: str
    size: str
    note: str


def _best_step(state: dict[str, Any], metrics: Metrics) -> int | None:
    steps, losses = metrics.series("val_loss", eval_records=True)
    best = state.get("best_step")
    if isinstance(best, int) and best in steps:
        return best
    if not losses:
        return best if isinstance(best, int) else None
    return steps[losses.index(min(losses))]


def _eval_table(metrics: Metrics, best_step: int | None) -> tuple[list[str], list[EvalRow]]:
    keys = ["val_loss", "val_ppl", *metrics.extra_eval_keys()]
    columns = [k.replace("val_", "val ", 1).replace("_", " ") for k in keys]
    rows = [
        EvalRow(step=int(r["step"]), values=[fmt(r.get(k)) for k in keys],
                best=int(r["step"]) == best_step)
        for r in metrics.eval
    ]
    return columns, rows


def _steps_text(state: dict[str, Any], metrics: Metrics) -> str:
    step = state.get("step")
    if step is None:
        logged = [r["step"] for r in metrics.train + metrics.eval]
        step = max(logged) if logged else None
    total = state.get("max_steps")
    if step is None:
        return "–"
    return f"{step:,} of {total:,}" if isinstance(total, int) else f"{step:,}"


def _parameters_text(state: dict[str, Any]) -> str:
    total, trainable = state.get("parameters"), state.get("trainable_parameters")
    if not isinstance(total, int):
        return "–"
    if isinstance(trainable, int) and trainable != total and total:
        return f"{total:,} ({trainable:,} trainable, {100 * trainable / total:.2f}%)"
    return f"{total:,}"


def _best_text(state: dict[str, Any], metrics: Metrics, best_step: int | None) -> str:
    if best_step is None:
        return "– (no evaluation yet)"
    loss = next((r.get("val_loss") for r in metrics.eval if r["step"] == best_step),
                state.get("best_val_loss"))
    ppl = math.exp(min(loss, 50.0)) if isinstance(loss, (int, float)) else None
    return f"step {best_step:,}: val loss {fmt(loss)} (ppl {fmt(ppl, 2)})"


def _rate_text(value: object) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "–"
    return f"{value:,.0f} tokens/s"


def _checkpoints(run: RunDir, best_step: int | None) -> list[CheckpointRow]:
    rows: list[CheckpointRow] = []
    latest = run.latest_checkpoint()
    for step, path in run.step_checkpoints():
        notes = [n for n, on in (("latest", latest == path), ("best step", step == best_step))
                 if on]
        rows.append(CheckpointRow(f"{CHECKPOINTS_DIR}/{path.name}", f"{step:,}", _kind(path),
                                  _size(path), ", ".join(notes)))
    for path, note in ((run.best, f"best weights (step {best_step:,})" if best_step is not None
                        else "best weights"),
                       (run.final, "the model at the end of the run")):
        if path.is_dir():
            rows.append(CheckpointRow(f"{path.name}/", "", _kind(path), _size(path), note))
    return rows


def _kind(path: Path) -> str:
    if (path / "adapter_config.json").is_file():
        return "PEFT adapter"
    if (path / "config.json").is_file():
        return "model"
    return "incomplete"


def _size(path: Path) -> str:
    size = float(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
    if size < 1024:
        return f"{size:,.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:,.1f} {unit}"
