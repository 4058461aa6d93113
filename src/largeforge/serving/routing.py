"""Which expert answers a request: by keywords, or by a trained text classifier.

Both routers take the text a request is about (`routing_text`: the prompt of a completion, the
last user message of a chat) and return a `RouteDecision`.

- `KeywordRouter`: each expert's keywords are matched as whole words or phrases, case-insensitive
  (a keyword ending in `*` matches as a prefix: `program*` matches "programming"); the expert with
  the most matches wins, ties go to the expert listed first, no match goes to the default.
- `ClassifierRouter`: a scikit-learn pipeline (TF-IDF of word 1-2 grams and character 2-5
  grams + logistic regression)
  trained by `train_router_classifier` on labelled prompts, whose labels are expert names. A
  prediction below `min_confidence` goes to the default.

A trained router is a directory: `classifier.skops` (the pipeline, saved with skops, which
loads only the scikit-learn and numpy types it knows instead of unpickling arbitrary objects) and
`router.json` (labels, per-label counts, held-out accuracy, library versions).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from largeforge.errors import LargeForgeError
from largeforge.text_files import read_json_lines

CLASSIFIER_FILE = "classifier.skops"
META_FILE = "router.json"
FORMAT = "largeforge-router-classifier"


@dataclass(frozen=True)
class RouteDecision:
    """`expert` answers; `method` is keywords, classifier or default (nothing matched);
    `score` is the number of keyword matches or the classifier's probability."""

    expert: str
    method: str
    score: float = 0.0


class Router(Protocol):
    def route(self, text: str) -> RouteDecision: ...


# -- the text a request is about ----------------------------------------------------------------


def routing_text(body: Mapping[str, Any]) -> str:
    """The prompt of a completion request, or the last user message of a chat request
    (text parts of a multi-part message joined); "" when there is none."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, Mapping) and message.get("role") == "user":
                return _content_text(message.get("content"))
        return ""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "\n".join(str(part.get("text", "")) for part in content
                         if isinstance(part, Mapping) and part.get("type") == "text")
    return ""


# -- keywords -----------------------------------------------------------------------------------


def _keyword_pattern(keyword: str) -> re.Pattern[str]:
    prefix = keyword.endswith("*")
    words = keyword.rstrip("*").split()
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){body}" + (r"\w*" if prefix else r"(?!\w)"), re.IGNORECASE)


class KeywordRouter:
    """Routes to the expert whose keywords occur most often in the text."""

    def __init__(self, keywords: Mapping[str, Sequence[str]], default: str) -> None:
        self.default = default
        self._patterns = {
            name: [_keyword_pattern(k) for k in words if k.rstrip("*").strip()]
            for name, words in keywords.items()
        }
        if not any(self._patterns.values()):
            raise LargeForgeError("keyword routing needs at least one expert with keywords")

    def scores(self, text: str) -> dict[str, int]:
        return {name: sum(len(p.findall(text)) for p in patterns)
                for name, patterns in self._patterns.items()}

    def route(self, text: str) -> RouteDecision:
        best, best_score = self.default, 0
        for name, score in self.scores(text).items():  # dicts keep the experts' order
            if score > best_score:
                best, best_score = name, score
        if best_score == 0:
            return RouteDecision(self.default, "default", 0.0)
        return RouteDecision(best, "keywords", float(best_score))


# -- classifier ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabeledPrompt:
    text: str
    label: str


@dataclass(frozen=True)
class TrainResult:
    output: Path
    labels: list[str]
    counts: dict[str, int]
    n_train: int
    n_test: int
    heldout_accuracy: float | None


def read_labeled_prompts(path: str | Path) -> list[LabeledPrompt]:
    """JSONL records `{"text": ..., "label": ...}` (or `prompt` / `expert`). Every bad line is an
    error naming the file and line."""
    out: list[LabeledPrompt] = []
    for line in read_json_lines(path, "labelled prompts file"):
        record, where = line.object(), line.where
        text = record.get("text", record.get("prompt"))
        label = record.get("label", record.get("expert"))
        if not isinstance(text, str) or not text.strip():
            raise LargeForgeError(f"{where}: 'text' (or 'prompt') must be non-empty text")
        if not isinstance(label, str) or not label.strip():
            raise LargeForgeError(f"{where}: 'label' (or 'expert') must be non-empty text")
        out.append(LabeledPrompt(text, label.strip()))
    if not out:
        raise LargeForgeError(f"{path} holds no labelled prompts")
    return out


def _pipeline(seed: int) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    # Character n-grams within words catch spelling and morphology ("thou'rt", "def foo(")
    # that whole words miss: 0.92 -> 0.95 held-out accuracy on tests/data/router's prompts.
    features = make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, strip_accents="unicode"),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
    )
    return make_pipeline(features, LogisticRegression(C=10.0, max_iter=2000,
                                                      random_state=seed))


def train_router_classifier(
    data: str | Path | Sequence[LabeledPrompt],
    output: str | Path,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> TrainResult:
    """Train TF-IDF + logistic regression on labelled prompts and save it to `output`.

    A stratified `test_fraction` of the prompts is held out; the saved classifier is the one
    trained on the rest, and its accuracy on the held-out part is returned and written to
    router.json. `test_fraction=0` trains on everything (no accuracy)."""
    records = read_labeled_prompts(data) if isinstance(data, (str, Path)) else list(data)
    output = Path(output)
    if not 0.0 <= test_fraction < 1.0:
        raise LargeForgeError(f"--test-fraction must be in [0, 1), not {test_fraction}")
    _check_output(output, overwrite)
    counts = Counter(r.label for r in records)
    if len(counts) < 2:
        raise LargeForgeError(
            f"a router classifier needs prompts of at least 2 labels; found {len(counts)} "
            f"({', '.join(counts) or 'none'})"
        )
    texts, labels = [r.text for r in records], [r.label for r in records]
    train_x, test_x, train_y, test_y = texts, [], labels, []
    if test_fraction > 0:
        train_x, test_x, train_y, test_y = _split(texts, labels, counts, test_fraction, seed)
    pipeline = _pipeline(seed).fit(train_x, train_y)
    accuracy = float(pipeline.score(test_x, test_y)) if test_x else None
    _save(pipeline, output, {
        "format": FORMAT, "version": 1, "labels": sorted(counts),
        "counts": dict(sorted(counts.items())), "n_train": len(train_x), "n_test": len(test_x),
        "test_fraction": test_fraction, "seed": seed, "heldout_accuracy": accuracy,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), **_versions(),
    })
    return TrainResult(output, sorted(counts), dict(sorted(counts.items())), len(train_x),
                       len(test_x), accuracy)


def _split(texts: list[str], labels: list[str], counts: Counter[str], fraction: float,
           seed: int) -> tuple[list[str], list[str], list[str], list[str]]:
    from sklearn.model_selection import train_test_split

    rare = sorted(label for label, n in counts.items() if n < 2)
    if rare:
        raise LargeForgeError(
            f"label(s) {', '.join(rare)} have a single prompt: a stratified held-out split needs "
            "at least 2 per label (add prompts, or --test-fraction 0)"
        )
    n_test = round(len(texts) * fraction)
    if n_test < len(counts) or len(texts) - n_test < len(counts):
        raise LargeForgeError(
            f"--test-fraction {fraction} of {len(texts)} prompts leaves {n_test} to test and "
            f"{len(texts) - n_test} to train; each needs at least one per label ({len(counts)})"
        )
    return train_test_split(texts, labels, test_size=n_test, random_state=seed,
                            stratify=labels)


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise LargeForgeError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise LargeForgeError(f"output directory {output} is not empty; use --overwrite")


def _save(pipeline: Any, output: Path, meta: dict[str, Any]) -> None:
    import skops.io

    from largeforge.staging import staged_output

    # Staged beside `output` and renamed into place whole: a failed or killed training leaves
    # no half-written output to refuse the next one (its staging is swept then).
    with staged_output(output, overwrite=True) as staging:  # `_check_output` decided
        skops.io.dump(pipeline, staging / CLASSIFIER_FILE)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _versions() -> dict[str, str]:
    import sklearn
    import skops

    return {"sklearn_version": sklearn.__version__, "skops_version": skops.__version__}


class ClassifierRouter:
    """Routes by a classifier trained with `train_router_classifier` (its labels are experts)."""

    def __init__(self, path: str | Path, default: str, *, min_confidence: float = 0.0) -> None:
        self.path = Path(path)
        self.default = default
        self.min_confidence = min_confidence
        self.meta, self.pipeline = load_router_classifier(self.path)
        self.labels: list[str] = [str(c) for c in self.pipeline.classes_]

    def route(self, text: str) -> RouteDecision:
        if not text.strip():
            return RouteDecision(self.default, "default", 0.0)
        probs = self.pipeline.predict_proba([text])[0]
        best = int(probs.argmax())
        if float(probs[best]) < self.min_confidence:
            return RouteDecision(self.default, "default", float(probs[best]))
        return RouteDecision(self.labels[best], "classifier", float(probs[best]))


def load_router_classifier(path: str | Path) -> tuple[dict[str, Any], Any]:
    """(router.json, pipeline) of a trained router directory."""
    path = Path(path)
    meta_file, model_file = path / META_FILE, path / CLASSIFIER_FILE
    if not meta_file.is_file() or not model_file.is_file():
        raise LargeForgeError(
            f"{path} is not a trained router (expected {META_FILE} and {CLASSIFIER_FILE}; "
            "make one with `largeforge router train`)"
        )
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LargeForgeError(f"{meta_file} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LargeForgeError(f"{meta_file} is not a LargeForge router description")
    import skops.io  # here: importing it takes seconds (it lists every scikit-learn type)

    try:
        # trusted=[]: only the types skops trusts by default (scikit-learn, numpy, scipy) load.
        pipeline = skops.io.load(model_file, trusted=[])
    except Exception as exc:  # skops raises UntrustedTypesFoundException, zip and value errors
        raise LargeForgeError(f"cannot load the router classifier {model_file}: {exc}") from None
    return meta, pipeline


# -- evaluation ---------------------------------------------------------------------------------


def routing_accuracy(router: Router, records: Iterable[LabeledPrompt]) -> float:
    """The share of prompts the router sends to the expert named by their label."""
    records = list(records)
    if not records:
        raise LargeForgeError("no labelled prompts to measure routing accuracy on")
    hits = sum(router.route(r.text).expert == r.label for r in records)
    return hits / len(records)
