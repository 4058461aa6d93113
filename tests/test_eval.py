"""`largeforge eval`: perplexity, generation metrics, batched generation and the command."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer
from transformers import PreTrainedTokenizerFast

import tiny_models
from conftest import run_cli
from largeforge.chat_templates import ALPACA, IGNORE_INDEX, render_for_training
from largeforge.errors import LargeForgeError
from largeforge.evaluation import metrics as M
from largeforge.evaluation.evaluate import (
    HIGHER_IS_BETTER,
    METRICS,
    EvalResult,
    evaluate_model,
    notes,
    results_document,
)
from largeforge.evaluation.perplexity import (
    ids_perplexity,
    sliding_windows,
    text_perplexity,
    text_token_stream,
)
from largeforge.inference import CHATML_TEMPLATE, ChatSession, SamplingParams, generate
from largeforge.inference.batched_generation import (
    cut_at_first,
    generate_batch,
    generate_batch_ids,
)
from largeforge.inference.generate import encode_prompt, load_for_inference

DATA = Path(__file__).parent / "data" / "eval"
HARNESS_TASKS = Path(__file__).parent / "data" / "harness_tasks"  # the harness tests' tasks
TEXT = [
    "Once upon a time there was a little fox who lived in the forest.",
    "The fox liked to run and jump, and every day it found something new.",
    "<|im_start|>user\nHello fox<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
    "### Instruction:\nName the animal.\n\n### Response:\nA fox.",
]
ALL_METRICS = "perplexity,rouge,bleu,chrf,exact_match"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = tiny_models.make_tokenizer(TEXT)
    tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def model(tokenizer) -> torch.nn.Module:
    return tiny_models.make_model(len(tokenizer), 256)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("eval-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def hf_loss_sum(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """(sum of token losses, tokens scored) straight from the transformers model's own loss."""
    scored = sum(label != IGNORE_INDEX for label in labels[1:])
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([labels])).loss
    return float(loss) * scored, scored


def conversations(path: Path) -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line]


# --- perplexity ------------------------------------------------------------------------------


def test_text_perplexity_is_exp_of_the_transformers_loss(model, tokenizer) -> None:
    docs = [TEXT[0], TEXT[1]]
    eos = tokenizer.eos_token_id
    expected_ids = [t for d in docs for t in [*tokenizer(d, add_special_tokens=False)
                                                 ["input_ids"], eos]]
    assert text_token_stream(tokenizer, docs) == expected_ids
    result = text_perplexity(model, tokenizer, docs)  # one window: the context is 256
    with torch.no_grad():
        loss = model(torch.tensor([expected_ids]), labels=torch.tensor([expected_ids])).loss
    assert result.tokens == len(expected_ids) - 1
    assert result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert result.loss == pytest.approx(float(loss), rel=1e-5)


def test_sliding_windows_score_every_token_once(model, tokenizer) -> None:
    ids = text_token_stream(tokenizer, TEXT[:2] * 4)
    max_length, stride = 40, 16
    assert len(ids) > 3 * max_length
    windows = sliding_windows(ids, max_length, stride)
    scored: list[int] = []
    for number, (window, labels) in enumerate(windows):
        begin = number * stride
        assert window == ids[begin:begin + max_length]
        positions = [begin + j for j in range(1, len(labels)) if labels[j] != IGNORE_INDEX]
        if number > 0:  # every scored token sees at least max_length - stride tokens before it
            assert min(p - begin for p in positions) >= max_length - stride
        scored += positions
    assert scored == list(range(1, len(ids)))

    # Token-weighted over the windows, as transformers scores each window on its own.
    total = count = 0.0
    for window, labels in windows:
        loss_sum, n = hf_loss_sum(model, window, labels)
        total, count = total + loss_sum, count + n
    result = ids_perplexity(model, ids, max_length=max_length, stride=stride, batch_size=3)
    assert result.tokens == count == len(ids) - 1
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_text_files_through_evaluate_model(model, tokenizer) -> None:
    raw = (DATA / "text.txt").read_text()
    docs = [d for d in raw.split("<|endoftext|>") if d.strip()]
    ids = text_token_stream(tokenizer, docs)
    result = evaluate_model((model, tokenizer), DATA / "text.txt")
    with torch.no_grad():
        loss = float(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss)
    assert result.num_examples == 3
    assert set(result.metrics) == {"perplexity", "loss"}
    assert result.metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result.details["perplexity_tokens"] == len(ids) - 1
    assert result.samples == []

    jsonl = evaluate_model((model, tokenizer), DATA / "text.jsonl", max_examples=1)
    first = json.loads((DATA / "text.jsonl").read_text().splitlines()[0])["text"]
    assert jsonl.num_examples == 1
    assert jsonl.metrics["perplexity"] == pytest.approx(
        text_perplexity(model, tokenizer, [first]).perplexity, rel=1e-6
    )


def _longer_prompts(convs: list[list[dict[str, str]]]) -> list[list[dict[str, str]]]:
    return [
        [dict(m, content=m["content"] + " Please think about the little fox in the forest first.")
         if m["role"] != "assistant" else m for m in messages]
        for messages in convs
    ]


def test_instruction_perplexity_scores_only_the_responses(model, tokenizer, tmp_path) -> None:
    convs = conversations(DATA / "chat.jsonl")
    total = count = 0
    for messages in convs:  # rendered and masked by training's own function
        loss_sum, n = hf_loss_sum(model, *render_for_training(tokenizer, messages,
                                                              CHATML_TEMPLATE))
        total, count = total + loss_sum, count + n
    result = evaluate_model((model, tokenizer), DATA / "chat.jsonl", ["perplexity"])
    assert result.num_examples == 4
    assert result.details["perplexity_tokens"] == count
    assert result.metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)

    # Longer prompts, the same replies: the same tokens are scored (the prompt is masked).
    longer = tmp_path / "longer.jsonl"
    longer.write_text("".join(json.dumps({"messages": m}) + "\n" for m in _longer_prompts(convs)))
    again = evaluate_model((model, tokenizer), longer, ["perplexity"])
    assert again.details["perplexity_tokens"] == count
    assert again.metrics["perplexity"] != result.metrics["perplexity"]
    assert notes(again) == []


def test_cut_conversations_are_counted(tokenizer) -> None:
    short = tiny_models.make_model(len(tokenizer), 48)
    result = evaluate_model((short, tokenizer), DATA / "chat.jsonl", ["perplexity", "bleu"],
                            max_new_tokens=4)
    rendered = [render_for_training(tokenizer, m, CHATML_TEMPLATE)
                for m in conversations(DATA / "chat.jsonl")]
    assert result.details["perplexity_truncated"] == sum(len(ids) > 48 for ids, _ in rendered)
    # The second conversation's reply starts after 48 tokens: nothing of it is left to score.
    assert result.details["perplexity_skipped"] == 1
    assert result.details["perplexity_tokens"] == sum(
        sum(label != IGNORE_INDEX for label in labels[1:48]) for _, labels in rendered)
    # Prompts are cut from the left to leave max_new_tokens of room in the context.
    assert result.details["prompts_truncated"] == 2
    assert all(len(tokenizer(s["prompt"])["input_ids"]) <= 44 for s in result.samples)
    assert len(notes(result)) == 3 and any("cut at its end" in n for n in notes(result))


def test_alpaca_data_without_a_chat_template_uses_the_alpaca_format(model, tokenizer) -> None:
    plain = tiny_models.make_tokenizer(TEXT)
    assert not plain.chat_template
    records = json.loads((DATA / "alpaca.json").read_text())
    total = count = 0
    for r in records:
        user = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": r["output"]}]
        loss_sum, n = hf_loss_sum(model, *render_for_training(plain, messages, ALPACA))
        total, count = total + loss_sum, count + n
    result = evaluate_model((model, plain), DATA / "alpaca.json", ["perplexity", "exact_match"],
                            max_new_tokens=4)
    assert result.details["format"] == "alpaca"
    assert result.metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert [s["prompt"] for s in result.samples][1].endswith("### Response:\n")
    # sharegpt/messages data has no such fallback: a template must be named.
    with pytest.raises(LargeForgeError, match="no chat template.*--chat-template"):
        evaluate_model((model, plain), DATA / "chat.jsonl")
    named = evaluate_model((model, plain), DATA / "chat.jsonl", chat_template="chatml")
    assert named.details["perplexity_tokens"] > 0


# --- generation metrics ----------------------------------------------------------------------


def test_metrics_on_hand_known_cases() -> None:
    refs = ["the cat sat on the mat", "a big dog barked"]
    same = M.generation_metrics(["rouge", "bleu", "chrf", "exact_match"], refs, refs)
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "bleu": pytest.approx(100.0),
                    "chrf": pytest.approx(100.0), "exact_match": 1.0}
    disjoint = ["xyz wvu", "qpl fjy"]  # no word and no letter in common with the references
    assert M.generation_metrics(["rouge", "bleu", "chrf", "exact_match"], disjoint, refs) == {
        "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "bleu": 0.0, "chrf": 0.0,
        "exact_match": 0.0}
    # Exact match forgives surrounding and repeated whitespace, nothing else.
    assert M.exact_match(["  the   cat\n sat "], ["the cat sat"]) == 1.0
    assert M.exact_match(["The cat sat", "the cat sat."], ["the cat sat"] * 2) == 0.0
    assert M.exact_match(["a", "b", "c", "d"], ["a", "b", "x", "y"]) == 0.5
    with pytest.raises(LargeForgeError, match="pair up"):
        M.bleu(["a"], ["a", "b"])


def test_metrics_equal_the_libraries_on_the_same_outputs() -> None:
    refs = ["the quick brown fox jumps over the lazy dog", "it lives in the forest",
            "hello said the bird", "a fox"]
    outs = ["the quick fox jumped over a lazy dog", "it lived in a forest near here",
            "hello the bird said", "the fox"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(r, o) for r, o in zip(refs, outs, strict=True)]
    rouge = M.rouge(outs, refs)
    for name in ("rouge1", "rouge2", "rougeL"):
        expected = sum(s[name].fmeasure for s in scores) / len(scores)
        assert rouge[name] == pytest.approx(expected)
        assert 0 < rouge[name] < 1
    assert M.bleu(outs, refs) == pytest.approx(sacrebleu.corpus_bleu(outs, [refs]).score)
    assert M.chrf(outs, refs) == pytest.approx(sacrebleu.corpus_chrf(outs, [refs]).score)
    assert 0 < M.bleu(outs, refs) < 100 and 0 < M.chrf(outs, refs) < 100


def test_metric_names_and_directions() -> None:
    assert METRICS == ("perplexity", "rouge", "bleu", "chrf", "exact_match")
    assert HIGHER_IS_BETTER["perplexity"] is False and HIGHER_IS_BETTER["loss"] is False
    assert all(HIGHER_IS_BETTER[k] for k in ("rouge1", "rouge2", "rougeL", "bleu", "chrf",
                                              "exact_match"))


# --- batched generation ----------------------------------------------------------------------

PROMPTS = [
    "Once",
    "The fox liked to run and jump, and every day it found",
    "a little fox who",
    "x",
    "Once upon a time there was a little fox who lived in the forest. The fox liked to run",
]


@pytest.fixture(scope="module")
def gpt2(tokenizer) -> torch.nn.Module:
    """Learned absolute positions: a batch that got its padding's positions wrong differs here
    (RoPE, being relative, would hide a constant shift)."""
    model = tiny_models.make_family_model("gpt2", tokenizer)
    with torch.no_grad():  # a wider init than GPT-2's 0.02, so greedy text is not one token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize(("family", "repetition_penalty"),
                         [("llama", 1.0), ("llama", 1.3), ("gpt2", 1.0)])
def test_batched_greedy_equals_generate_one_prompt_at_a_time(
    request, tokenizer, family, repetition_penalty
) -> None:
    model = request.getfixturevalue("model" if family == "llama" else "gpt2")
    params = SamplingParams(temperature=0, max_new_tokens=12,
                            repetition_penalty=repetition_penalty)
    alone = [generate(model, p, tokenizer, temperature=0, max_new_tokens=12,
                      repetition_penalty=repetition_penalty) for p in PROMPTS]
    batched = generate_batch(model, tokenizer, PROMPTS, params, batch_size=3)
    assert batched == alone
    assert len(set(alone)) == len(alone)  # a real test: the prompts give different texts


def test_batched_generation_stops_at_the_context_and_at_stop_strings(tokenizer) -> None:
    short = tiny_models.make_model(len(tokenizer), 48)  # the longest prompt fills 39 of 48
    params = SamplingParams(temperature=0, max_new_tokens=16)
    alone = [generate(short, p, tokenizer, temperature=0, max_new_tokens=16) for p in PROMPTS]
    assert generate_batch(short, tokenizer, PROMPTS, params) == alone
    ids = [encode_prompt(tokenizer, p)[0].tolist() for p in PROMPTS]
    new = generate_batch_ids(short, [ids[0], ids[-1]], params, eos_token_ids=set())
    assert [len(row) for row in new] == [16, 48 - len(ids[-1])]

    # A stop string ends the row, and the text from it on is cut off.
    text = alone[0]
    stop = re.search(r"[A-Za-z]{2,}", text[3:]).group()
    cut = generate_batch(short, tokenizer, [PROMPTS[0], PROMPTS[2]], params, stop_strings=[stop])
    assert cut == [cut_at_first(text, [stop]), cut_at_first(alone[2], [stop])]
    assert len(cut[0]) < len(text)


def test_sampled_batches_are_seeded(model, tokenizer) -> None:
    def sample(seed: int) -> list[str]:
        params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=seed)
        return generate_batch(model, tokenizer, PROMPTS[:3], params, batch_size=2)

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_generated_answers_are_the_ones_chat_gives(model, tokenizer) -> None:
    result = evaluate_model((model, tokenizer), DATA / "chat.jsonl",
                            ["rouge", "bleu", "chrf", "exact_match"], max_new_tokens=10,
                            batch_size=3)
    convs = conversations(DATA / "chat.jsonl")
    assert [s["reference"] for s in result.samples] == [
        "The fox likes to run and jump.", "It lives in the forest.", "Hello, said the bird.",
        "Hello!"]
    for messages, sample in zip(convs, result.samples, strict=True):
        prompt_turns = messages[:max(i for i, m in enumerate(messages)
                                     if m["role"] == "assistant")]
        session = ChatSession(model, tokenizer, params=SamplingParams(temperature=0,
                                                                      max_new_tokens=10))
        session.messages = prompt_turns[:-1]
        assert "".join(session.send(prompt_turns[-1]["content"])) == sample["output"]
        assert sample["prompt"].endswith("<|im_start|>assistant\n")
    outputs = [s["output"] for s in result.samples]
    references = [s["reference"] for s in result.samples]
    assert result.metrics == M.generation_metrics(["rouge", "bleu", "chrf", "exact_match"],
                                                  outputs, references)
    assert "perplexity" not in result.metrics


def test_eval_result_to_dict(model, tokenizer) -> None:
    result = evaluate_model((model, tokenizer), DATA / "chat.jsonl", ["exact_match"],
                            max_examples=2, max_new_tokens=3)
    assert isinstance(result, EvalResult)
    doc = result.to_dict()
    assert doc["num_examples"] == 2 and len(doc["samples"]) == 2
    assert set(doc["samples"][0]) == {"prompt", "reference", "output"}
    assert json.loads(json.dumps(doc)) == doc


def test_results_document_for_tasks_only() -> None:
    doc = results_document(None, model="m", data=None, settings={"tasks": ["t"]},
                           tasks={"t": {"acc": 0.5}})
    assert doc["tasks"] == {"t": {"acc": 0.5}} and doc["metrics"] == {} and doc["data"] is None
    assert doc["num_examples"] == 0 and doc["versions"]["largeforge"]


# --- the command -----------------------------------------------------------------------------


def test_cli_prints_a_table_and_writes_results(model_dir, tmp_path) -> None:
    out = tmp_path / "sub" / "results.json"
    proc = run_cli("eval", "--model", str(model_dir), "--data", str(DATA / "chat.jsonl"),
                   "--metrics", ALL_METRICS, "--max-new-tokens", "6", "--batch-size", "3",
                   "--tasks", "lf_tiny_choice", "--include-path", str(HARNESS_TASKS),
                   "--limit", "2", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in ("examples", "perplexity", "loss", "rouge1", "rouge2", "rougeL", "bleu", "chrf",
                 "exact_match"):
        assert re.search(rf"\b{name}\b", proc.stdout), (name, proc.stdout)
    assert re.search(r"examples\s*│\s*4\b", proc.stdout)
    doc = json.loads(out.read_text())
    assert doc["model"] == str(model_dir) and doc["data"] == str(DATA / "chat.jsonl")
    assert doc["num_examples"] == 4 and len(doc["samples"]) == 4
    assert doc["settings"]["max_new_tokens"] == 6 and doc["settings"]["metrics"] == \
        ALL_METRICS.split(",")
    assert doc["versions"]["torch"] == torch.__version__ and doc["versions"]["sacrebleu"]
    assert dt.datetime.fromisoformat(doc["date"]).tzinfo is not None
    # lm-eval harness tasks: in the table and under "tasks".
    assert list(doc["tasks"]) == ["lf_tiny_choice"] and doc["tasks"]["lf_tiny_choice"]
    assert doc["settings"]["limit"] == 2 and doc["settings"]["tasks"] == ["lf_tiny_choice"]
    for metric, value in doc["tasks"]["lf_tiny_choice"].items():
        assert re.search(rf"lf_tiny_choice {re.escape(metric)}\s*│\s*{value:.4f}", proc.stdout)
    # The same numbers as the library on the same saved model.
    loaded = load_for_inference(model_dir, "cpu")
    expected = evaluate_model(loaded, DATA / "chat.jsonl", ALL_METRICS.split(","),
                              max_new_tokens=6, batch_size=3)
    assert doc["metrics"] == pytest.approx(expected.metrics, rel=1e-6)
    assert [s["output"] for s in doc["samples"]] == [s["output"] for s in expected.samples]
    assert f"{doc['metrics']['perplexity']:,.1f}" in proc.stdout


def assert_clean_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


BAD_INPUTS = {
    "unknown metric": (["--metrics", "perplexity,blue"],
                       ["'blue'", "perplexity, rouge, bleu, chrf, exact_match"]),
    "missing data": (["--data", "{tmp}/nope.jsonl"], ["data file not found", "nope.jsonl"]),
    "generation on text": (["--data", str(DATA / "text.txt"), "--metrics", "perplexity,rouge"],
                           ["text.txt", "prompt/response"]),
    "empty file": (["--data", "{tmp}/empty.txt"], ["empty.txt", "empty"]),
    "blank jsonl": (["--data", "{tmp}/blank.jsonl"], ["blank.jsonl", "empty"]),
    "blank text": (["--data", "{tmp}/blank.txt"], ["blank.txt", "empty"]),
    "preference data": (["--data", "{tmp}/pref.jsonl"], ["pref.jsonl", "preference"]),
    "output is a directory": (["--output", "{tmp}"], ["is a directory"]),
    "missing model": (["--model", "{tmp}/no-model"], ["no-model", "not found"]),
    "neither data nor tasks": (["--data", None], ["--data", "--tasks"]),
    "bad device": (["--device", "gpu"], ["unknown device 'gpu'"]),
    "harness option without tasks": (["--limit", "2"], ["--limit", "--tasks"]),
    "no new tokens": (["--max-new-tokens", "0"], ["--max-new-tokens must be >= 1"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_and_writes_nothing(case, model_dir, tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    (tmp_path / "blank.txt").write_text("  \n\n")
    (tmp_path / "pref.jsonl").write_text(
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    before = sorted(tmp_path.iterdir())
    options = {"--model": str(model_dir), "--data": str(DATA / "chat.jsonl"),
               "--output": str(tmp_path / "results.json")}
    changes, needles = BAD_INPUTS[case]
    for flag, value in zip(changes[::2], changes[1::2], strict=True):
        options[flag] = value.format(tmp=tmp_path) if value is not None else None
    args = [a for flag, value in options.items() if value is not None for a in (flag, value)]
    proc = run_cli("eval", *args)
    assert_clean_error(proc, *needles)
    assert sorted(tmp_path.iterdir()) == before

