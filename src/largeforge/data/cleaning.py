"""The cleaning steps of `largeforge data prepare`, on normalised records (see `formats.py`):
Unicode normalisation and control-character stripping, exact and near duplicate removal
(MinHash + LSH from `datasketch`), quality filters, and a stable train/eval split.

Each step is a plain function or a small class so that it can be tested and reused alone; the
`prepare_records` pipeline runs them in order and counts what each removed.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from largeforge.errors import LargeForgeError

# C0 and C1 control characters except tab and newline (carriage returns become newlines first).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)

Record = dict[str, Any]


def normalize_text(text: str, form: str = "NFC") -> str:
    """Unicode normal form `form`, CRLF/CR to LF, control characters removed (tab and newline
    kept). NFC keeps every character's meaning; NFKC also folds compatibility forms (ligatures,
    full-width letters), which changes text, so it is opt-in."""
    text = unicodedata.normalize(form, text.replace("\r\n", "\n").replace("\r", "\n"))
    return _CONTROL.sub("", text)


def normalize_record(record: Any, form: str = "NFC") -> Any:
    """`normalize_text` applied to every string inside a record (dicts and lists walked)."""
    if isinstance(record, str):
        return normalize_text(record, form)
    if isinstance(record, dict):
        return {key: normalize_record(value, form) for key, value in record.items()}
    if isinstance(record, list):
        return [normalize_record(value, form) for value in record]
    return record


def record_text(record: Record) -> str:
    """All the text of a normalised record, for dedup, filters and the split."""
    if "text" in record:
        return str(record["text"])
    parts: list[str] = []
    for key in ("messages", "prompt", "chosen", "rejected"):
        value = record.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts.extend(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return "\n".join(parts)


def stable_fraction(text: str) -> float:
    """A number in [0, 1) fixed by the text alone: the basis of every split, so adding records
    never moves old ones from one side to the other."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_eval_split(text: str, eval_percent: float) -> bool:
    return stable_fraction(text) < eval_percent / 100


def exact_key(text: str) -> str:
    """Equal for texts that differ only in case and whitespace."""
    return hashlib.sha1(_SPACE.sub(" ", text).strip().lower().encode("utf-8")).hexdigest()


class NearDuplicateFinder:
    """Finds records whose word 5-gram sets have Jaccard similarity >= `threshold` with an
    earlier record, by MinHash signatures in an LSH index (`datasketch`)."""

    def __init__(self, threshold: float = 0.85, num_perm: int = 128, ngram: int = 5) -> None:
        from datasketch import MinHash, MinHashLSH

        if not 0 < threshold <= 1:
            from largeforge.errors import LargeForgeError

            raise LargeForgeError(f"near-dedup threshold must be in (0, 1], not {threshold}")
        self._minhash = MinHash
        self.num_perm, self.ngram = num_perm, ngram
        self.index = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._count = 0

    def shingles(self, text: str) -> set[bytes]:
        words = [w.lower() for w in _WORD.findall(text)]
        if len(words) < self.ngram:
            return {" ".join(words).encode("utf-8")} if words else set()
        return {
            " ".join(words[i:i + self.ngram]).encode("utf-8")
            for i in range(len(words) - self.ngram + 1)
        }

    def match_or_add(self, text: str) -> str | None:
        """The key of an earlier near-duplicate of `text`, or None (then `text` is indexed)."""
        grams = self.shingles(text)
        if not grams:
            return None
        signature = self._minhash(num_perm=self.num_perm)
        signature.update_batch(grams)
        found = self.index.query(signature)
        if found:
            return str(sorted(found)[0])
        self.index.insert(str(self._count), signature)
        self._count += 1
        return None


@dataclass
class QualityRules:
    """Heuristic filters in the spirit of Gopher's (Rae et al. 2021, appendix A): drop a record
    that is too short or too long, mostly non-alphabetic, or repeats its lines or n-grams."""

    min_chars: int = 1
    max_chars: int | None = None
    min_alpha_ratio: float = 0.5
    max_duplicate_line_fraction: float = 0.3
    max_top_ngram_fraction: float = 0.3  # share of characters in the most frequent word 3-gram
    ngram: int = 3

    def __post_init__(self) -> None:
        if self.min_chars < 0:
            raise LargeForgeError(f"--min-chars must be 0 or more, not {self.min_chars}")
        if self.max_chars is not None and self.max_chars < max(self.min_chars, 1):
            raise LargeForgeError(
                f"--max-chars {self.max_chars} is below --min-chars {self.min_chars}: every "
                "record would be dropped; raise --max-chars or lower --min-chars"
            )
        if not 0 <= self.min_alpha_ratio <= 1:
            raise LargeForgeError(
                f"--min-alpha-ratio must be in [0, 1], not {self.min_alpha_ratio}")

    def problem(self, text: str) -> str | None:
        """The name of the first rule `text` breaks, or None."""
        n = len(text.strip())
        if n < self.min_chars:
            return "too_short"
        if self.max_chars is not None and n > self.max_chars:
            return "too_long"
        letters = sum(ch.isalpha() for ch in text)
        non_space = sum(not ch.isspace() for ch in text)
        if non_space and letters / non_space < self.min_alpha_ratio:
            return "low_alpha_ratio"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lines) >= 3:
            repeated = len(lines) - len(set(lines))
            if repeated / len(lines) > self.max_duplicate_line_fraction:
                return "repeated_lines"
        words = _WORD.findall(text.lower())
        if len(words) >= 4 * self.ngram:
            grams = Counter(tuple(words[i:i + self.ngram]) for i in range(len(words) - self.ngram))
            gram, count = grams.most_common(1)[0]
            covered = count * sum(len(w) for w in gram)
            if count > 1 and covered / max(sum(len(w) for w in words), 1) > (
                self.max_top_ngram_fraction
            ):
                return "repeated_ngrams"
        return None


@dataclass
class PrepareReport:
    records_in: int = 0
    normalized_changed: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    quality: dict[str, int] = field(default_factory=dict)
    train: int = 0
    eval: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare_records(
    records: Iterable[Record],
    *,
    rules: QualityRules | None = None,
    near_dedup_threshold: float | None = 0.85,
    eval_percent: float = 10.0,
    normal_form: str = "NFC",
) -> tuple[list[Record], list[Record], PrepareReport]:
    """Normalise, deduplicate (exact, then near), filter and split; returns (train, eval,
    report). The first of a set of duplicates is kept, so the result follows input order."""
    rules = rules or QualityRules()
    report = PrepareReport(settings={
        "near_dedup_threshold": near_dedup_threshold, "eval_percent": eval_percent,
        "normal_form": normal_form, "quality_rules": asdict(rules),
    })
    near = NearDuplicateFinder(near_dedup_threshold) if near_dedup_threshold else None
    seen: set[str] = set()
    train: list[Record] = []
    evaluation: list[Record] = []
    for record in records:
        report.records_in += 1
        cleaned = normalize_record(record, normal_form)
        if cleaned != record:
            report.normalized_changed += 1
        text = record_text(cleaned)
        key = exact_key(text)
        if key in seen:
            report.exact_duplicates += 1
            continue
        seen.add(key)
        problem = rules.problem(text)
        if problem:
            report.quality[problem] = report.quality.get(problem, 0) + 1
            continue
        if near is not None and near.match_or_add(text) is not None:
            report.near_duplicates += 1
            continue
        (evaluation if in_eval_split(text, eval_percent) else train).append(cleaned)
    report.train, report.eval = len(train), len(evaluation)
    return train, evaluation, report
