"""Build the router's labelled prompts from the real text in ../shared/data (see SOURCES.md).

Labels are the names of four experts:

- coding: Alpaca instructions (+ input) whose reference output contains code (a function
  definition, an SQL query, HTML, `print(`, braces...), or that name a programming language;
  the label comes from the output, the router only sees the instruction.
- general: the first other Alpaca instructions, leaving out any that mention programming
  words at all (so "general" holds no borderline coding prompt).
- stories: the first two sentences of every 15th TinyStories story.
- shakespeare: the first two lines of every 40th speech of Tiny Shakespeare.

Each prompt goes to the held-out set when a stable hash of its text says so (about 25%), so
the split does not depend on any library's random generator. The files are built when the
tests run (into a temporary directory) rather than committed, since the sources are only
read from ../shared/data. Run `python tests/data/router/make_labeled.py OUT_DIR` to write
OUT_DIR/labeled_prompts.jsonl and OUT_DIR/heldout.jsonl by hand.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

CODE_OUTPUT = re.compile(
    r"(\bdef \w+\(|\bfunction\s*\w*\s*\(|#include|\bSELECT\b.*\bFROM\b|<(html|body|div|p|head)>"
    r"|console\.log|\bpublic (static|class)|\bprint\(|^\s*(for|while|if)\b.*:\s*$"
    r"|\breturn\b.*;\s*$|^\s*import \w+|\{\s*$|^\s*\}|\w+\[\w*\]\s*=|\bSystem\.out)",
    re.M | re.I,
)
LANGUAGE = re.compile(r"\b(python|java|javascript|sql|html|css|c\+\+|programming|pseudocode|"
                      r"regex|object-oriented)\b", re.I)
PROGRAMMING_WORDS = re.compile(
    r"\b(code|coding|algorithm|debug|compiler?|software|database|api|json|xml|script|program|"
    r"function|array|string|query|computer|website|web page|github)\b", re.I)
N_GENERAL, N_STORIES, N_SHAKESPEARE = 150, 120, 120


def _alpaca(data: Path) -> tuple[list[str], list[str]]:
    coding, general = [], []
    for record in json.loads((data / "alpaca_sample.json").read_text(encoding="utf-8")):
        prompt = record["instruction"].strip()
        if record["input"].strip():
            prompt += "\n\n" + record["input"].strip()
        if CODE_OUTPUT.search(record["output"]) or LANGUAGE.search(prompt):
            coding.append(prompt)
        elif not PROGRAMMING_WORDS.search(prompt) and len(general) < N_GENERAL:
            general.append(prompt)
    return coding, general


def _stories(data: Path) -> list[str]:
    text = (data / "tinystories_sample.txt").read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    out = []
    for story in stories[::15][:N_STORIES]:
        sentences = re.split(r"(?<=[.!?])\s+", " ".join(story.split()))
        out.append(" ".join(sentences[:2]))
    return out


def _shakespeare(data: Path) -> list[str]:
    text = (data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    speeches = [block.splitlines()[1:] for block in text.split("\n\n") if block.strip()]
    speeches = [lines for lines in speeches if lines and len(" ".join(lines[:2])) >= 30]
    return [" ".join(line.strip() for line in lines[:2]) for lines in speeches[::40]][
        :N_SHAKESPEARE]


def build(data: Path) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records), each {"text", "label"}."""
    coding, general = _alpaca(data)
    labelled = ([("coding", t) for t in coding] + [("general", t) for t in general]
                + [("stories", t) for t in _stories(data)]
                + [("shakespeare", t) for t in _shakespeare(data)])
    train, heldout = [], []
    for label, text in labelled:
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        (heldout if digest[0] < 64 else train).append({"text": text, "label": label})
    return train, heldout


def write(data: Path, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "labeled_prompts.jsonl", out / "heldout.jsonl"
    for path, records in zip(paths, build(data), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return paths


if __name__ == "__main__":
    shared = Path(__file__).resolve().parents[4] / "shared" / "data"
    for written in write(shared, Path(sys.argv[1])):
        print(written)
