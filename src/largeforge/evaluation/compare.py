"""Compare models on one data set: `largeforge compare --models A B [C ...]`.

Every model is evaluated on the same examples with the same metrics (`evaluate_model`); the
HTML report holds the metrics table with the best value per metric marked (ties too), an A/B
summary when there are two models, the loss curves of the models that are run directories
overlaid on one chart, and the generated samples side by side. An A/B test is this same
comparison with two models.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from largeforge.errors import LargeForgeError
from largeforge.runs import METRICS_FILE, is_run_dir, resolve_model_dir
from largeforge.runs.plots import overlaid_loss_chart, read_metrics
from largeforge.runs.report import (
    PAGE_FOOT,
    PAGE_HEAD,
    check_output_file,
    fmt,
    render,
    write_html,
)
from largeforge.text_files import json_safe

if TYPE_CHECKING:
    from largeforge.evaluation.evaluate import EvalResult

MAX_SAMPLES_SHOWN = 50


class ResultLike(Protocol):
    """What the report reads of an `EvalResult`."""

    model: str
    data: str
    num_examples: int
    metrics: dict[str, float]
    samples: list[dict[str, str]]


def compare_models(
    models: Sequence[str],
    data: str | Path,
    metrics: Sequence[str],
    *,
    max_examples: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    device: str = "auto",
    chat_template: str | None = None,
    on_model: Callable[[int, str], None] | None = None,
) -> list[EvalResult]:
    """Evaluate every model on the same examples with the same metrics (greedy decoding), in
    the order given.

    Everything that can be checked without loading a model is checked first (two models or
    more, each one found, known metrics, readable data), so a typo in the last model costs no
    evaluation of the first. `on_model(index, model)` is called as each evaluation starts."""
    from largeforge.evaluation.evaluate import evaluate_model

    metric_names = check_compare_inputs(models, data, metrics, max_examples=max_examples)
    results = []
    for index, model in enumerate(models):
        if on_model is not None:
            on_model(index, model)
        results.append(evaluate_model(
            model, data, metric_names, max_examples=max_examples, max_new_tokens=max_new_tokens,
            batch_size=batch_size, device=device, chat_template=chat_template))
    return results


def metric_list(metrics: str | Sequence[str]) -> list[str]:
    """Metric names from comma-separated strings, one or several (`["perplexity,rouge"]`)."""
    values = [metrics] if isinstance(metrics, str) else list(metrics)
    return [m.strip() for value in values for m in value.split(",") if m.strip()]


@dataclass
class CompareOutcome:
    """What `compare` produced: every model's result, the comparison (labels, best per metric)
    and the files written."""

    results: list[EvalResult]
    comparison: Comparison
    report: Path  # the HTML report
    json: Path | None  # the JSON summary, when asked for


def compare(
    models: Sequence[str],
    data: str | Path,
    output: str | Path,
    *,
    metrics: str | Sequence[str] = ("perplexity", "rouge"),
    max_examples: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    device: str = "auto",
    chat_template: str | None = None,
    json_output: str | Path | None = None,
    title: str = "Model comparison",
    run_dirs: dict[str, Path] | None = None,
    on_model: Callable[[int, str], None] | None = None,
) -> CompareOutcome:
    """Compare models on one data set as `largeforge compare` does: evaluate each (greedy) with
    the same metrics, write the HTML report to `output` and, with `json_output`, every result
    and the comparison as JSON. Both outputs are checked before any model is evaluated.

    `run_dirs` maps a model reference to its run directory for the loss curves (default: every
    model that is a run directory). `on_model(index, model)` is called as each evaluation starts.
    """
    output = Path(output)
    check_output_file(output)
    json_path = Path(json_output) if json_output is not None else None
    if json_path is not None and json_path.is_dir():
        raise LargeForgeError(f"--json {json_path} is a directory; name a .json file")
    results = compare_models(models, data, metric_list(metrics), max_examples=max_examples,
                             max_new_tokens=max_new_tokens, batch_size=batch_size,
                             device=device, chat_template=chat_template, on_model=on_model)
    report = write_compare_report(results, output, run_dirs=run_dirs, title=title)
    if json_path is not None:
        write_summary_json(json_path, results)
    return CompareOutcome(results, compare_results(results), report, json_path)


def write_summary_json(path: str | Path, results: Sequence[ResultLike]) -> Path:
    """Write `summary_dict(results)` as JSON, atomically; NaN and infinities (a metric with no
    defined value) become null. Returns the path."""
    import json

    from largeforge.atomic_files import write_atomic_text

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(summary_dict(results)), indent=2, ensure_ascii=False,
                      allow_nan=False)
    write_atomic_text(target, text + "\n")
    return target


def check_compare_inputs(models: Sequence[str], data: str | Path, metrics: Sequence[str], *,
                         max_examples: int | None = None) -> list[str]:
    """Refuse what cannot be compared; returns the metric names, checked and deduplicated."""
    from largeforge.evaluation.evaluate import load_eval_data, parse_metrics

    if len(models) < 2:
        raise LargeForgeError(
            f"compare needs at least two models, got {len(models)}: --models A B [C ...]"
        )
    names = parse_metrics(metrics)
    for model in models:
        resolve_model_dir(model)  # a clear error for a missing model or an empty run
    load_eval_data(data, max_examples)  # missing, empty or unusable data
    return names


# --- what the comparison says, for the report, the console and JSON -------------------------


@dataclass
class Comparison:
    labels: list[str]  # A, B, C ... in the order of the results
    metric_names: list[str]
    best: dict[str, list[int]]  # metric -> indices of the best results (ties: several)
    higher_is_better: dict[str, bool | None]  # None: no known direction, nothing marked

    def is_best(self, metric: str, index: int) -> bool:
        return index in self.best.get(metric, [])


def compare_results(results: Sequence[ResultLike]) -> Comparison:
    from largeforge.evaluation.evaluate import HIGHER_IS_BETTER

    names: dict[str, None] = {}
    for result in results:
        names.update(dict.fromkeys(result.metrics))
    best: dict[str, list[int]] = {}
    direction: dict[str, bool | None] = {}
    for name in names:
        higher = HIGHER_IS_BETTER.get(name)
        direction[name] = higher
        values = [(i, r.metrics.get(name)) for i, r in enumerate(results)]
        finite = [(i, float(v)) for i, v in values if _finite(v)]
        if higher is None or not finite:
            continue
        top = (max if higher else min)(v for _, v in finite)
        best[name] = [i for i, v in finite if math.isclose(v, top, rel_tol=1e-9, abs_tol=1e-12)]
    return Comparison(labels=compare_labels(len(results)), metric_names=list(names), best=best,
                      higher_is_better=direction)


@dataclass
class ABSummary:
    """Two models head to head: who wins each metric, and how often their outputs differ."""

    rows: list[dict[str, Any]]  # metric, a, b, winner ("A", "B", "tie" or "-"), difference
    compared_samples: int
    differing_samples: int


def ab_summary(results: Sequence[ResultLike], comparison: Comparison) -> ABSummary:
    a, b = results
    rows = []
    for name in comparison.metric_names:
        va, vb = a.metrics.get(name), b.metrics.get(name)
        winners = comparison.best.get(name, [])
        winner = "tie" if len(winners) == 2 else comparison.labels[winners[0]] if winners else "-"
        diff = float(vb) - float(va) if _finite(va) and _finite(vb) else None
        rows.append({"metric": name, "a": va, "b": vb, "winner": winner, "difference": diff})
    pairs = _paired_samples(a.samples, b.samples)
    differing = sum(1 for x, y in pairs if x.get("output") != y.get("output"))
    return ABSummary(rows=rows, compared_samples=len(pairs), differing_samples=differing)


def summary_dict(results: Sequence[ResultLike]) -> dict[str, Any]:
    """The comparison as JSON-ready data: every result, the best per metric and, for two
    models, the A/B summary."""
    comparison = compare_results(results)
    out: dict[str, Any] = {
        "models": [_result_dict(r) for r in results],
        "best": {m: [results[i].model for i in idx] for m, idx in comparison.best.items()},
        "higher_is_better": comparison.higher_is_better,
    }
    if len(results) == 2:
        ab = ab_summary(results, comparison)
        out["ab"] = {
            "a": results[0].model, "b": results[1].model,
            "metrics": [dict(row, winner=_winner_name(row["winner"], results, comparison))
                        for row in ab.rows],
            "compared_samples": ab.compared_samples,
            "differing_samples": ab.differing_samples,
        }
    return out


# --- the HTML report -----------------------------------------------------------------------

COMPARE_TEMPLATE = PAGE_HEAD + """
<h1>{{ title }}</h1>
<p class="sub">Data: {{ data }} &middot; {{ examples }}</p>

<h2>Metrics</h2>
<table id="metrics"><thead><tr><th></th><th>model</th><th>examples</th>
{% for m in metric_heads %}<th>{{ m }}</th>{% endfor %}</tr></thead><tbody>
{% for row in metric_rows %}<tr><th>{{ row.label }}</th><td>{{ row.model }}</td>
<td class="num">{{ row.examples }}</td>
{% for cell in row.cells %}<td class="num{% if cell.best %} best{% endif %}">{{ cell.text }}
{% if cell.best %} <span class="marker">&#9650; best</span>{% endif %}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
<p class="sub">&uarr; higher is better, &darr; lower is better; the best value of each metric is
bold and marked (ties are all marked).</p>

{% if ab %}<h2>A/B: {{ ab_names[0] }} vs {{ ab_names[1] }}</h2>
<table id="ab"><thead><tr><th>metric</th><th>A</th><th>B</th><th>B &minus; A</th>
<th>winner</th></tr></thead><tbody>
{% for row in ab.rows %}<tr><td>{{ row.metric }}</td><td class="num">{{ fmt(row.a) }}</td>
<td class="num">{{ fmt(row.b) }}</td><td class="num">{{ fmt(row.difference) }}</td>
<td><strong>{{ row.winner }}</strong></td></tr>
{% endfor %}</tbody></table>
<p id="ab-samples">Outputs differ on <strong>{{ ab.differing_samples }}</strong> of
{{ ab.compared_samples }} samples{% if ab.compared_samples %}
 ({{ (100 * ab.differing_samples / ab.compared_samples) | round(1) }}%){% endif %}.</p>
{% endif %}

<h2>Loss curves</h2>
{% if loss_chart %}<figure class="wide"><img src="{{ loss_chart }}" alt="Loss curves">
<figcaption>Training loss (solid) and validation loss (dashed) of {{ curve_labels }}
</figcaption></figure>
{% else %}<p>None of the models is a run directory with logged metrics, so there are no curves.
</p>{% endif %}

<h2>Samples</h2>
{% if sample_rows %}
{% if samples_hidden %}<p class="note">The first {{ sample_rows | length }} samples are shown
({{ samples_hidden }} more in the results).</p>{% endif %}
<table id="samples" class="sample"><thead><tr><th>#</th><th>prompt</th><th>reference</th>
{% for label in labels %}<th>{{ label }} output</th>{% endfor %}</tr></thead><tbody>
{% for row in sample_rows %}<tr{% if row.differ %} class="differ"{% endif %}>
<td class="num">{{ loop.index }}</td><td>{{ row.prompt }}</td><td>{{ row.reference }}</td>
{% for output in row.outputs %}<td class="output">{% if output.strip() %}{{ output }}
{%- else %}<span class="blank">({{ "empty" if not output else "only whitespace: "
~ (output | tojson) }})</span>
{%- endif %}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
<p class="sub">Highlighted outputs: the models disagree on that sample.</p>
{% else %}<p>No generated samples: choose a generation metric (rouge, bleu, chrf, exact_match)
on instruction data to see the outputs side by side.</p>{% endif %}
""" + PAGE_FOOT


def write_compare_report(
    results: list[EvalResult],
    output: Path,
    *,
    run_dirs: dict[str, Path] | None = None,
    title: str = "Model comparison",
) -> Path:
    """Write the comparison of `results` as one self-contained HTML page; returns its path.

    `run_dirs` maps a result's `model` to its run directory for the loss curves; by default
    every result whose model names a run directory is one."""
    if len(results) < 2:
        raise LargeForgeError(f"a comparison needs at least two results, got {len(results)}")
    output = Path(output)
    check_output_file(output)
    if run_dirs is None:
        run_dirs = {r.model: Path(r.model) for r in results if is_run_dir(Path(r.model))}
    write_html(output, render_compare_report(results, run_dirs=run_dirs, title=title))
    return output


def render_compare_report(results: Sequence[ResultLike], *, run_dirs: dict[str, Path],
                          title: str) -> str:
    comparison = compare_results(results)
    labels = comparison.labels
    heads = [f"{m} {_arrow(comparison.higher_is_better[m])}" for m in comparison.metric_names]
    metric_rows = [
        {"label": label, "model": r.model, "examples": r.num_examples,
         "cells": [{"text": fmt(r.metrics.get(m)), "best": comparison.is_best(m, i)}
                   for m in comparison.metric_names]}
        for i, (label, r) in enumerate(zip(labels, results, strict=True))
    ]
    curves = {
        f"{label}": read_metrics(run_dirs[r.model] / METRICS_FILE)
        for label, r in zip(labels, results, strict=True) if r.model in run_dirs
    }
    sample_rows, hidden = _sample_rows(results)
    counts = sorted({r.num_examples for r in results})
    examples = (f"{counts[0]:,} examples" if len(counts) == 1
                else "examples per model: " + ", ".join(f"{c:,}" for c in counts))
    return render(
        COMPARE_TEMPLATE,
        title=title,
        data=results[0].data,
        examples=examples,
        metric_heads=heads,
        metric_rows=metric_rows,
        ab=ab_summary(results, comparison) if len(results) == 2 else None,
        ab_names=[f"A ({results[0].model})", f"B ({results[1].model})"],
        fmt=fmt,
        loss_chart=overlaid_loss_chart(curves) if curves else None,
        curve_labels=", ".join(curves),
        labels=labels,
        sample_rows=sample_rows,
        samples_hidden=hidden,
    )


def _sample_rows(results: Sequence[ResultLike]) -> tuple[list[dict[str, Any]], int]:
    """One row per example: prompt, reference and every model's output side by side. Rows
    pair by position; a model that has no sample at a position shows an empty cell."""
    count = max(len(r.samples) for r in results)
    rows = []
    for index in range(min(count, MAX_SAMPLES_SHOWN)):
        samples = [r.samples[index] if index < len(r.samples) else {} for r in results]
        first = next(s for s in samples if s)
        outputs = [s.get("output", "") for s in samples]
        rows.append({"prompt": first.get("prompt", ""), "reference": first.get("reference", ""),
                     "outputs": outputs, "differ": len(set(outputs)) > 1})
    return rows, max(0, count - MAX_SAMPLES_SHOWN)


def _paired_samples(a: Sequence[dict[str, str]], b: Sequence[dict[str, str]]
                    ) -> list[tuple[dict[str, str], dict[str, str]]]:
    """Samples of the same example: same position and same prompt."""
    return [(x, y) for x, y in zip(a, b, strict=False) if x.get("prompt") == y.get("prompt")]


def compare_labels(count: int) -> list[str]:
    """A, B, C ... for the models in the order given."""
    letters = string.ascii_uppercase
    return [letters[i] if i < len(letters) else f"M{i + 1}" for i in range(count)]


def _arrow(higher: bool | None) -> str:
    return "" if higher is None else "\u2191" if higher else "\u2193"


def _finite(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _winner_name(winner: str, results: Sequence[ResultLike], comparison: Comparison) -> str:
    if winner in comparison.labels:
        return results[comparison.labels.index(winner)].model
    return winner


def _result_dict(result: ResultLike) -> dict[str, Any]:
    to_dict = getattr(result, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return {"model": result.model, "data": result.data, "num_examples": result.num_examples,
            "metrics": dict(result.metrics), "samples": list(result.samples)}
