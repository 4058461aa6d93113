"""`data stats`: what a data set holds, as numbers and as a self-contained HTML page.

The page draws its histograms as inline SVG, so it needs no plotting library and opens offline.
"""

from __future__ import annotations

import html
import json
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from largeforge.data.cleaning import exact_key, record_text

Record = dict[str, Any]
EXAMPLES = 3


@dataclass
class DataStats:
    records: int = 0
    kind: str = ""
    field_coverage: dict[str, int] = field(default_factory=dict)  # field -> records having it
    lengths: dict[str, list[int]] = field(default_factory=dict)  # field -> length per record
    length_unit: str = "characters"
    turns: list[int] = field(default_factory=list)
    roles: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    examples: list[Record] = field(default_factory=list)

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [("records", f"{self.records:,}"), ("kind", self.kind or "-"),
                ("exact duplicates", f"{self.duplicates:,}")]
        for name, values in sorted(self.lengths.items()):
            if values:
                rows.append((
                    f"{name} length ({self.length_unit})",
                    f"median {statistics.median(values):,.0f}, p95 {_percentile(values, 95):,.0f}, "
                    f"max {max(values):,}",
                ))
        if self.turns:
            rows.append(("turns per conversation",
                         f"median {statistics.median(self.turns):g}, max {max(self.turns)}"))
        if self.roles:
            rows.append(("roles", ", ".join(f"{r} {n:,}" for r, n in sorted(self.roles.items()))))
        coverage = ", ".join(f"{k} {100 * v / max(self.records, 1):.0f}%"
                             for k, v in sorted(self.field_coverage.items()))
        rows.append(("field coverage", coverage or "-"))
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records, "kind": self.kind, "field_coverage": self.field_coverage,
            "length_unit": self.length_unit, "duplicates": self.duplicates, "roles": self.roles,
            "lengths": {k: _describe(v) for k, v in self.lengths.items()},
            "turns": _describe(self.turns),
        }


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))])


def _describe(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values),
            "p95": _percentile(values, 95), "max": max(values), "mean": statistics.fmean(values)}


def _kind(record: Record) -> str:
    if "messages" in record:
        return "conversation"
    if "chosen" in record:
        return "preference"
    return "text"


def compute_stats(records: Iterable[Record], tokenizer: Any = None) -> DataStats:
    """Statistics of normalised records (see `formats.py`); lengths in tokens when a tokenizer
    is given, else in characters."""
    stats = DataStats(length_unit="tokens" if tokenizer is not None else "characters")
    seen: set[str] = set()
    kinds: Counter[str] = Counter()

    def measure(text: str) -> int:
        if tokenizer is None:
            return len(text)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for record in records:
        stats.records += 1
        kinds[_kind(record)] += 1
        for key, value in record.items():
            if value not in (None, "", []):
                stats.field_coverage[key] = stats.field_coverage.get(key, 0) + 1
        key = exact_key(record_text(record))
        if key in seen:
            stats.duplicates += 1
        seen.add(key)
        if len(stats.examples) < EXAMPLES:
            stats.examples.append(record)
        if "text" in record:
            stats.lengths.setdefault("text", []).append(measure(str(record["text"])))
        if isinstance(record.get("messages"), list):
            messages = record["messages"]
            stats.turns.append(len(messages))
            for message in messages:
                role = str(message.get("role", "?"))
                stats.roles[role] = stats.roles.get(role, 0) + 1
                stats.lengths.setdefault(role, []).append(measure(str(message.get("content", ""))))
        for part in ("prompt", "chosen", "rejected"):
            value = record.get(part)
            if isinstance(value, list):
                text = "\n".join(str(m.get("content", "")) for m in value)
                stats.lengths.setdefault(part, []).append(measure(text))
            elif isinstance(value, str):
                stats.lengths.setdefault(part, []).append(measure(value))
    stats.kind = ", ".join(k for k, _ in kinds.most_common())
    return stats


def _svg_histogram(values: list[int], bins: int = 30, width: int = 520, height: int = 160) -> str:
    low, high = min(values), max(values)
    span = max(high - low, 1)
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - low) / span * bins))] += 1
    top = max(counts)
    bar = width / bins
    rects = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - 20 - (c / top) * (height - 30):.1f}" '
        f'width="{bar - 1:.1f}" height="{(c / top) * (height - 30):.1f}" fill="#4a78b5">'
        f"<title>{low + i * span / bins:,.0f}-{low + (i + 1) * span / bins:,.0f}: {c}</title>"
        "</rect>"
        for i, c in enumerate(counts)
    )
    axis = (f'<text x="0" y="{height - 4}" font-size="11">{low:,}</text>'
            f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{high:,}</text>')
    return f'<svg width="{width}" height="{height}" role="img">{rects}{axis}</svg>'


def write_html_report(stats: DataStats, path: str | Path, title: str = "data stats") -> Path:
    """A single self-contained HTML page: summary, histograms, role counts, examples."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>body{{font-family:sans-serif;max-width:900px;"
        "margin:2em auto}td,th{padding:2px 10px;text-align:left}pre{background:#f4f4f4;"
        "padding:8px;white-space:pre-wrap}</style></head><body>",
        f"<h1>{esc(title)}</h1><table>",
        *(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in stats.summary_rows()),
        "</table>",
    ]
    for name, values in sorted(stats.lengths.items()):
        if values:
            parts.append(f"<h2>{esc(name)} length ({esc(stats.length_unit)})</h2>")
            parts.append(_svg_histogram(values))
    if stats.turns:
        parts.append("<h2>turns per conversation</h2>" + _svg_histogram(stats.turns))
    parts.append("<h2>examples</h2>")
    for example in stats.examples:
        parts.append(f"<pre>{esc(json.dumps(example, ensure_ascii=False, indent=2))}</pre>")
    parts.append("</body></html>\n")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(parts), encoding="utf-8")
    return target
