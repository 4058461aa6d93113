"""Build the sign-off data set for the real-model example from the Alpaca sample.

Every answer in the training data ends with one fixed line, SIGN_OFF, that SmolLM2 never
writes by itself. Only records without an `input` and with short answers are kept, so a
fine-tuned answer reaches its sign-off within a few dozen generated tokens. Records are split
by a stable hash of the instruction: `train.json` (Alpaca, for `train sft`), `heldout.json`
(Alpaca, for `eval` and `compare`) and `heldout_prompts.jsonl` (for `infer --chat`).

    python make_data.py ALPACA_JSON OUT_DIR [--train N] [--heldout N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

SIGN_OFF = "~ Forged with LargeForge"
MAX_ANSWER_WORDS = 40


def signed(answer: str) -> str:
    return f"{answer.strip()}\n\n{SIGN_OFF}"


def bucket(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100


def build(alpaca: Path, out: Path, n_train: int, n_heldout: int) -> dict[str, int]:
    records = json.loads(alpaca.read_text(encoding="utf-8"))
    short = [r for r in records if not r.get("input", "").strip()
             and 0 < len(r["output"].split()) <= MAX_ANSWER_WORDS]
    heldout = [r for r in short if bucket(r["instruction"]) < 15][:n_heldout]
    train = [r for r in short if bucket(r["instruction"]) >= 15][:n_train]
    out.mkdir(parents=True, exist_ok=True)

    def alpaca_records(rows: list[dict]) -> list[dict]:
        return [{"instruction": r["instruction"], "input": "", "output": signed(r["output"])}
                for r in rows]

    (out / "train.json").write_text(json.dumps(alpaca_records(train), indent=1), "utf-8")
    (out / "heldout.json").write_text(json.dumps(alpaca_records(heldout), indent=1), "utf-8")
    with (out / "heldout_prompts.jsonl").open("w", encoding="utf-8") as fh:
        for i, r in enumerate(heldout):
            fh.write(json.dumps({"id": i, "prompt": r["instruction"]}) + "\n")
    return {"train": len(train), "heldout": len(heldout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("alpaca", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--heldout", type=int, default=40)
    args = parser.parse_args()
    print(json.dumps(build(args.alpaca, args.out, args.train, args.heldout)))


if __name__ == "__main__":
    main()
