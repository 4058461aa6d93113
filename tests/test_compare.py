"""`largeforge compare`: two real tiny runs compared end to end (an A/B test) and read by
headless Chromium; the best per metric marked, ties too; model text escaped; the errors."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from browser import open_in_chromium, table_cells_probe
from conftest import run_cli
from largeforge.evaluation.compare import ab_summary, compare_results, summary_dict
from largeforge.evaluation.compare import write_compare_report as write_report
from test_report import tiny_run

SCRIPT = "<script>alert('x')</script>"
RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": f"Blue {SCRIPT} & green"},
    {"instruction": f"Repeat {SCRIPT}", "input": "", "output": "No."},
    {"instruction": "Say hello.", "input": "", "output": "Hello."},
    {"instruction": "Count to three.", "input": "", "output": "One, two, three."},
]
NO_SCRIPTS = "() => document.scripts.length"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two real runs made by the tool, same data, different learning rates (the first is
    the one test_report.py reports on: each is trained once per session)."""
    return (tiny_run(tmp_path_factory, "fast", lr=1e-2),
            tiny_run(tmp_path_factory, "slow", lr=1e-3))


@pytest.fixture
def alpaca(tmp_path: Path) -> Path:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    return path


def best_flags(rows: list[list[dict]]) -> list[list[bool]]:
    """Per model row, whether each metric cell (after label, model, examples) is marked best
    and bold."""
    out = []
    for row in rows:
        for cell in row[3:]:
            assert cell["best"] == (cell["weight"] >= 700) == cell["text"].endswith("▲ best")
        out.append([cell["best"] for cell in row[3:]])
    return out


def test_compare_two_runs_end_to_end(runs, alpaca, tmp_path):
    a, b = runs
    report, results = tmp_path / "out" / "ab.html", tmp_path / "out" / "ab.json"
    proc = run_cli("compare", "--models", str(a), str(b), "--data", str(alpaca),
                   "--metrics", "perplexity,rouge", "--output", str(report),
                   "--json", str(results), "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert "perplexity ↓" in proc.stdout and "rougeL ↑" in proc.stdout
    assert f"report: {report}" in proc.stdout.replace("\n", "")

    doc = json.loads(results.read_text(encoding="utf-8"))
    assert [m["model"] for m in doc["models"]] == [str(a), str(b)]
    metrics = [m["metrics"] for m in doc["models"]]
    assert set(metrics[0]) == {"perplexity", "loss", "rouge1", "rouge2", "rougeL"}
    assert all(m["num_examples"] == 4 and len(m["samples"]) == 4 for m in doc["models"])
    names = list(metrics[0])
    expected = []
    for name in names:
        values = [m[name] for m in metrics]
        top = max(values) if name.startswith("rouge") else min(values)
        expected.append([math.isclose(v, top, rel_tol=1e-9, abs_tol=1e-12) for v in values])
    assert doc["best"] == {n: [str(r) for r, flag in zip((a, b), e, strict=True) if flag]
                           for n, e in zip(names, expected, strict=True)}
    outputs = [[s["output"] for s in m["samples"]] for m in doc["models"]]
    differing = sum(x != y for x, y in zip(*outputs, strict=True))
    assert doc["ab"]["compared_samples"] == 4 and doc["ab"]["differing_samples"] == differing

    html = report.read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    page = open_in_chromium(report, "compare-ab", probes={
        "metrics": table_cells_probe("metrics"), "ab": table_cells_probe("ab"),
        "scripts": NO_SCRIPTS,
    })
    assert page.external_requests == [] and page.console_errors == []
    assert len(page.images) == 1 and page.images[0]["alt"] == "Loss curves"
    assert not page.broken_images
    assert page.tables == {"metrics": 2, "ab": 5, "samples": 4}
    assert page.probes["scripts"] == 0 and SCRIPT in page.text  # shown as text, not run
    transposed = [list(col) for col in zip(*expected, strict=True)]
    assert best_flags(page.probes["metrics"]) == transposed
    winners = {row[0]["text"]: row[4]["text"] for row in page.probes["ab"]}
    for name, flags in zip(names, expected, strict=True):
        assert winners[name] == ("tie" if all(flags) else "A" if flags[0] else "B")
    assert f"Outputs differ on {differing} of 4 samples" in page.text


@dataclass
class Result:
    """Shaped as `largeforge.evaluation.evaluate.EvalResult`."""

    model: str
    metrics: dict[str, float]
    outputs: list[str]
    data: str = "qa.json"
    num_examples: int = 3
    samples: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.samples = [{"prompt": f"question {i} <b>?</b>", "reference": f"answer {i}",
                         "output": out} for i, out in enumerate(self.outputs)]


def test_best_is_marked_with_ties_and_model_text_is_escaped(runs, tmp_path):
    nan = float("nan")
    results = [
        Result(str(runs[0]), {"perplexity": 10.0, "rougeL": 0.2, "bleu": 1.0, "novelty": 3.0},
               ["same", SCRIPT, "a"]),
        Result("hub/model-b", {"perplexity": 8.0, "rougeL": 0.5, "bleu": 2.0, "novelty": 1.0},
               ["same", "<img src=x onerror=alert(2)>", "b"]),
        Result("model-c", {"perplexity": 8.0, "rougeL": nan, "bleu": 3.0, "novelty": 2.0},
               ["same", "", "c"]),
    ]
    comparison = compare_results(results)
    # perplexity: lower wins, B and C tie; rougeL: NaN is never best; novelty: no known
    # direction, nothing marked.
    assert comparison.best == {"perplexity": [1, 2], "rougeL": [1], "bleu": [2]}

    report = write_report(results, tmp_path / "cmp.html", title="Three <models>")
    html = report.read_text(encoding="utf-8")
    assert "<script>" not in html and "<img src=x" not in html and "<b>?" not in html
    assert "<title>Three &lt;models&gt;</title>" in html
    page = open_in_chromium(report, "compare-three", probes={
        "metrics": table_cells_probe("metrics"), "samples": table_cells_probe("samples"),
        "scripts": NO_SCRIPTS, "differ": "() => Array.from(document.querySelectorAll("
        "'#samples tbody tr')).map(tr => tr.classList.contains('differ'))",
    })
    assert page.probes["scripts"] == 0
    # Only the loss curves of the one run directory: the injected <img> is text.
    assert [i["alt"] for i in page.images] == ["Loss curves"] and not page.broken_images
    assert page.tables == {"metrics": 3, "samples": 3}  # no A/B table for three models
    assert best_flags(page.probes["metrics"]) == [
        [False, False, False, False], [True, True, False, False], [True, False, True, False]]
    assert page.probes["metrics"][2][4]["text"] == "n/a"  # C's rougeL: NaN
    samples = page.probes["samples"]
    assert [c["text"] for c in samples[1][3:]] == [SCRIPT, "<img src=x onerror=alert(2)>",
                                                   "(empty)"]
    assert samples[0][1]["text"] == "question 0 <b>?</b>"
    assert page.probes["differ"] == [False, True, True]
    assert page.external_requests == []


def test_ab_summary_counts_wins_ties_and_differing_outputs():
    a = Result("a", {"perplexity": 5.0, "rouge1": 0.4, "exact_match": 0.5},
               ["x", "y", "z", "w"])
    b = Result("b", {"perplexity": 6.0, "rouge1": 0.6, "exact_match": 0.5},
               ["x", "Y", "z", "W"])
    b.samples[3]["prompt"] = "another question"  # not the same example: not compared
    ab = ab_summary([a, b], compare_results([a, b]))
    assert [(r["metric"], r["winner"]) for r in ab.rows] == [
        ("perplexity", "A"), ("rouge1", "B"), ("exact_match", "tie")]
    assert ab.rows[0]["difference"] == pytest.approx(1.0)
    assert (ab.compared_samples, ab.differing_samples) == (3, 1)
    summary = summary_dict([a, b])
    assert summary["best"] == {"perplexity": ["a"], "rouge1": ["b"], "exact_match": ["a", "b"]}
    assert [m["winner"] for m in summary["ab"]["metrics"]] == ["a", "b", "tie"]


@pytest.mark.parametrize("case", ["one model", "missing model", "output is a directory",
                                  "bad metric", "missing data"])
def test_errors_exit_2_and_write_nothing(case, runs, alpaca, tmp_path):
    a, b = (str(r) for r in runs)
    out = tmp_path / "out"
    args = {"models": [a, b], "data": str(alpaca), "metrics": "perplexity",
            "output": str(out / "r.html")}
    expected = {
        "one model": ("models", [a], "compare needs at least two models, got 1"),
        "missing model": ("models", [a, str(tmp_path / "nope")], "not found"),
        "output is a directory": ("output", str(tmp_path), "is a directory"),
        "bad metric": ("metrics", "perplexity,accuracy", "unknown metric 'accuracy'"),
        "missing data": ("data", str(tmp_path / "none.json"), "data file not found"),
    }
    key, value, message = expected[case]
    args[key] = value
    proc = run_cli("compare", "--models", *args["models"], "--data", args["data"],
                   "--metrics", args["metrics"], "--output", args["output"],
                   "--json", str(out / "r.json"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2
    assert not out.exists()
