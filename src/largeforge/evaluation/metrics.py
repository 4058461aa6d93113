"""Generation metrics: a model's outputs scored against reference texts.

ROUGE comes from Google's `rouge-score` (the package the ROUGE numbers of most papers and of
Hugging Face `evaluate` come from), BLEU and chrF from `sacrebleu` (the reference
implementation of reportable BLEU). Scales follow the libraries: ROUGE F1 and exact match in
[0, 1], BLEU and chrF in [0, 100].
"""

from __future__ import annotations

from collections.abc import Sequence

from largeforge.errors import LargeForgeError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check(outputs: Sequence[str], references: Sequence[str]) -> None:
    if len(outputs) != len(references):
        raise LargeForgeError(
            f"{len(outputs)} outputs but {len(references)} references: they must pair up"
        )
    if not outputs:
        raise LargeForgeError("no outputs to score")


def rouge(outputs: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over the pairs (rouge-score's default tokenizer,
    no stemming, as Hugging Face `evaluate` computes it by default)."""
    from rouge_score import rouge_scorer

    _check(outputs, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for output, reference in zip(outputs, references, strict=True):
        scores = scorer.score(reference, output)  # (target, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / len(outputs) for name, total in totals.items()}


def bleu(outputs: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenisation, exponential smoothing), 0-100."""
    import sacrebleu

    _check(outputs, references)
    return float(sacrebleu.corpus_bleu(list(outputs), [list(references)]).score)


def chrf(outputs: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (character 6-grams, beta 2: sacrebleu's defaults), 0-100."""
    import sacrebleu

    _check(outputs, references)
    return float(sacrebleu.corpus_chrf(list(outputs), [list(references)]).score)


def normalise_answer(text: str) -> str:
    """Leading and trailing space stripped and every run of whitespace made one space."""
    return " ".join(text.split())


def exact_match(outputs: Sequence[str], references: Sequence[str]) -> float:
    """The share of outputs equal to their reference after `normalise_answer`."""
    _check(outputs, references)
    hits = sum(
        normalise_answer(o) == normalise_answer(r)
        for o, r in zip(outputs, references, strict=True)
    )
    return hits / len(outputs)


def generation_metrics(
    names: Sequence[str], outputs: Sequence[str], references: Sequence[str]
) -> dict[str, float]:
    """The asked metrics ("rouge", "bleu", "chrf", "exact_match") by their result keys
    ("rouge" gives rouge1, rouge2 and rougeL)."""
    result: dict[str, float] = {}
    for name in names:
        if name == "rouge":
            result.update(rouge(outputs, references))
        elif name == "bleu":
            result["bleu"] = bleu(outputs, references)
        elif name == "chrf":
            result["chrf"] = chrf(outputs, references)
        elif name == "exact_match":
            result["exact_match"] = exact_match(outputs, references)
        else:
            raise LargeForgeError(f"unknown generation metric {name!r}")
    return result
