"""The lm-eval harness adapter: its loglikelihoods equal direct computations with the
transformers model (and lm-eval's own HFLM), rolling windows, generation, `run_harness` on the
local tasks under tests/data/harness_tasks/, and the errors."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import sys
import uuid
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import tiny_models
from largeforge.errors import LargeForgeError
from largeforge.evaluation import harness
from largeforge.evaluation.harness import LargeForgeLM, run_harness
from largeforge.inference.generate import generate

TASKS_DIR = Path(__file__).parent / "data" / "harness_tasks"
DATA = TASKS_DIR / "data"
TASK_NAMES = ["lf_tiny_choice", "lf_tiny_generate", "lf_tiny_rolling"]
CORPUS = (DATA / "tiny_corpus.txt").read_text(encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


CHOICE_DOCS = read_jsonl(DATA / "tiny_choice.jsonl")
GENERATE_DOCS = read_jsonl(DATA / "tiny_generate.jsonl")


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    texts = [line for line in CORPUS.splitlines() if line]
    texts += [f"Question: {d['question']}\nAnswer: {' '.join(d['choices'])}" for d in CHOICE_DOCS]
    texts += [d["prompt"] + d["target"] for d in GENERATE_DOCS]
    return tiny_models.make_tokenizer(texts)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("harness-model")
    tiny_models.make_model(len(tokenizer), 256).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ref_model(model_dir):
    """The same weights loaded by transformers itself: the reference for every number."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def lm(model_dir) -> LargeForgeLM:
    return LargeForgeLM(model_dir, batch_size=4, device="cpu")


def ll_requests(pairs: list[tuple[str, str]]) -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def rolling_requests(texts: list[str]) -> list[Instance]:
    return [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]


def token_logprobs(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(ids[i] | ids[:i]) for i >= 1 and the argmax token at each of those positions."""
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    return logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], logprobs.argmax(-1)


def direct_loglikelihood(model, tok, context: str, continuation: str, max_length: int = 256):
    """Encode as HFLM (trailing spaces move to the continuation; the whole string is split at
    the context's token count; an empty context is the EOS token), keep the last
    max_length + 1 tokens, and sum the continuation's log-probs from one forward pass."""
    if context:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = tok.encode(context)
        cont = tok.encode(context + continuation)[len(ctx) :]
    else:
        ctx, cont = [tok.eos_token_id], tok.encode(continuation)
    ids = (ctx + cont)[-(max_length + 1) :]
    logprobs, argmax = token_logprobs(model, ids)
    n = len(cont)
    return float(logprobs[-n:].sum()), argmax[-n:].tolist() == cont


def direct_rolling(model, tok, text: str, max_length: int) -> float:
    """Every token scored once, after EOS: targets are cut into chunks of max_length and each
    chunk is predicted by one window of max_length inputs that ends just before the chunk's
    last token (the first window starts at EOS)."""
    full = [tok.eos_token_id] + tok.encode(text)
    n, total = len(full) - 1, 0.0
    for chunk_start in range(0, n, max_length):
        end = min(chunk_start + max_length, n)  # targets full[chunk_start + 1 .. end]
        window_start = max(0, end - max_length)
        logprobs, _ = token_logprobs(model, full[window_start : end + 1])
        total += float(logprobs[chunk_start - window_start :].sum())
    return total


def greedy_tokens(model, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


# -------------------------------------------------------------------- loglikelihood
PAIRS = [
    ("The river ran", " past the old mill"),
    ("Beans climbed the ", "fence"),  # the trailing space moves to the continuation
    ("", "A small garden grew behind the house."),  # empty context: conditioned on EOS
    ("Question: What is frozen water called?\nAnswer:", " ice"),
    ("In winter the pond froze over, and the children from the village came", " to slide"),
]


def test_loglikelihood_equals_direct_logprobs(lm, ref_model, tokenizer):
    # One case the model itself would produce greedily, so is_greedy must be True there.
    context = "The river ran past the"
    greedy = greedy_tokens(ref_model, tokenizer.encode(context), 3)
    greedy_text = tokenizer.decode(greedy)
    assert tokenizer.encode(context + greedy_text) == tokenizer.encode(context) + greedy
    pairs = [*PAIRS, (context, greedy_text)]

    got = lm.loglikelihood(ll_requests(pairs))

    for (ctx, cont), (logprob, is_greedy) in zip(pairs, got, strict=True):
        want_logprob, want_greedy = direct_loglikelihood(ref_model, tokenizer, ctx, cont)
        assert logprob == pytest.approx(want_logprob, abs=1e-5), (ctx, cont)
        assert is_greedy == want_greedy, (ctx, cont)
    assert got[-1][1] is True
    assert not any(is_greedy for _, is_greedy in got[:-1])


def test_loglikelihood_same_for_any_batch_size_and_order(model_dir, lm, ref_model, tokenizer):
    requests = ll_requests(PAIRS)
    batched = lm.loglikelihood(requests)
    one_by_one = LargeForgeLM(loaded=(ref_model, tokenizer), batch_size=1).loglikelihood(requests)
    reversed_order = lm.loglikelihood(requests[::-1])[::-1]
    for a, b, c in zip(batched, one_by_one, reversed_order, strict=True):
        assert a[0] == pytest.approx(b[0], abs=1e-5) and a[1] == b[1]
        assert a[0] == pytest.approx(c[0], abs=1e-5) and a[1] == c[1]


def test_context_longer_than_the_window_is_cut_from_the_left(ref_model, tokenizer):
    short = LargeForgeLM(loaded=(ref_model, tokenizer), batch_size=3, max_length=12)
    long_pairs = [(CORPUS[:200], " the end"), ("The river ran past the old mill", " again")]
    assert len(tokenizer.encode(long_pairs[0][0])) > 12
    for (ctx, cont), (logprob, greedy) in zip(
        long_pairs, short.loglikelihood(ll_requests(long_pairs)), strict=True
    ):
        want, want_greedy = direct_loglikelihood(ref_model, tokenizer, ctx, cont, max_length=12)
        assert logprob == pytest.approx(want, abs=1e-5)
        assert greedy == want_greedy


# -------------------------------------------------------------------- rolling
def test_rolling_loglikelihood_over_windows_equals_direct(ref_model, tokenizer):
    texts = [CORPUS, "Short text.", CORPUS[:90]]
    assert len(tokenizer.encode(CORPUS)) > 10 * 16  # many windows
    windowed = LargeForgeLM(loaded=(ref_model, tokenizer), batch_size=4, max_length=16)
    got = windowed.loglikelihood_rolling(rolling_requests(texts))
    for text, value in zip(texts, got, strict=True):
        assert value == pytest.approx(direct_rolling(ref_model, tokenizer, text, 16), abs=1e-4)
    # Batch size does not matter.
    one = LargeForgeLM(loaded=(ref_model, tokenizer), batch_size=1, max_length=16)
    assert one.loglikelihood_rolling(rolling_requests(texts)) == pytest.approx(got, abs=1e-4)


def test_rolling_within_one_window_is_one_forward_pass(lm, ref_model, tokenizer):
    ids = [tokenizer.eos_token_id] + tokenizer.encode(CORPUS)
    assert len(ids) <= lm.max_length
    logprobs, _ = token_logprobs(ref_model, ids)
    (value,) = lm.loglikelihood_rolling(rolling_requests([CORPUS]))
    # A sum of hundreds of fp32 log-probabilities (about -1857): equal to float32 precision,
    # whatever order the batched and the plain forward pass add them in.
    assert value == pytest.approx(float(logprobs.sum()), rel=1e-6)
    assert lm.loglikelihood_rolling(rolling_requests([""])) == [0.0]


def test_matches_lm_evals_own_hflm(ref_model, tokenizer):
    """Our adapter gives the numbers lm-eval's own HF adapter gives on the same model (with the
    same prefix token; HFLM would take BOS, which LargeForge pretraining never writes)."""
    from lm_eval.models.huggingface import HFLM

    hflm = HFLM(pretrained=ref_model, tokenizer=tokenizer, batch_size=3, max_length=24,
                prefix_token_id=tokenizer.eos_token_id)
    ours = LargeForgeLM(loaded=(ref_model, tokenizer), batch_size=2, max_length=24)
    requests = ll_requests(PAIRS)
    for a, b in zip(ours.loglikelihood(requests), hflm.loglikelihood(requests), strict=True):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
    rolling = rolling_requests([CORPUS, "Short text."])
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(
        hflm.loglikelihood_rolling(rolling), abs=1e-3
    )


# -------------------------------------------------------------------- generation
def test_generate_until_equals_greedy_generate_cut_at_until(lm, ref_model, tokenizer):
    prompt = "The cat sat on the"
    full = generate(ref_model, prompt, tokenizer, add_bos=False, max_new_tokens=12,
                    temperature=0.0)
    assert len(full) > 4
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full.split(stop)[0]
    assert expected != full
    requests = [
        Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 0),
        Instance("generate_until", {}, (prompt, {"until": "@@never@@", "max_gen_toks": 12,
                                                 "do_sample": False}), 1),
        Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 2}), 2),
    ]
    two_tokens = generate(ref_model, prompt, tokenizer, add_bos=False, max_new_tokens=2,
                          temperature=0.0)
    assert lm.generate_until(requests) == [expected, full, two_tokens.split(stop)[0]]


# -------------------------------------------------------------------- run_harness
@pytest.fixture(scope="module")
def harness_results(model_dir) -> dict[str, dict[str, float]]:
    return run_harness(str(model_dir), TASK_NAMES, include_path=TASKS_DIR, batch_size=4)


def choice_loglikelihoods(lm, doc: dict) -> list[float]:
    """The task's requests by hand: " " + choice after "Question: ...\\nAnswer:"."""
    ctx = f"Question: {doc['question']}\nAnswer:"
    return [ll for ll, _ in lm.loglikelihood(ll_requests([(ctx, " " + c) for c in doc["choices"]]))]


def test_run_harness_multiple_choice_metrics_equal_hand_computation(harness_results, lm):
    hits, norm_hits = [], []
    for doc in CHOICE_DOCS:
        lls = choice_loglikelihoods(lm, doc)
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
        hits.append(lls.index(max(lls)) == doc["answer"])
        norm_hits.append(norm.index(max(norm)) == doc["answer"])
    metrics = harness_results["lf_tiny_choice"]
    assert metrics["acc"] == pytest.approx(sum(hits) / len(hits))
    assert metrics["acc_norm"] == pytest.approx(sum(norm_hits) / len(norm_hits))
    assert "acc_stderr" in metrics and metrics["sample_len"] == len(CHOICE_DOCS)


def test_run_harness_perplexity_metrics_equal_hand_computation(harness_results, lm):
    import datasets

    docs = datasets.load_dataset("text", data_files=str(DATA / "tiny_corpus.txt"),
                                 sample_by="paragraph")["train"]["text"]
    assert len(docs) == 3
    lls = lm.loglikelihood_rolling(rolling_requests(docs))
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    metrics = harness_results["lf_tiny_rolling"]
    assert metrics["word_perplexity"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-6)
    assert metrics["byte_perplexity"] == pytest.approx(math.exp(-sum(lls) / nbytes), rel=1e-6)
    assert metrics["bits_per_byte"] == pytest.approx(-sum(lls) / nbytes / math.log(2), rel=1e-6)


def test_run_harness_generation_task_through_a_copied_folder(tmp_path, model_dir, ref_model,
                                                            tokenizer, harness_results):
    """The generation task, copied elsewhere (its relative data_files still resolve), with
    targets set to the model's own greedy text (cut at the task's "\\n") for docs 0 and 3:
    exact_match counts doc 0, and `limit=3` leaves doc 3 out (2/4 if it were ignored)."""
    assert harness_results["lf_tiny_generate"]["exact_match"] == 0.0  # random model, real targets
    folder = tmp_path / "copied"
    shutil.copytree(TASKS_DIR, folder)
    docs = []
    for i, doc in enumerate(GENERATE_DOCS):
        if i in (0, 3):
            doc = {**doc, "target": generate(ref_model, doc["prompt"], tokenizer, add_bos=False,
                                              max_new_tokens=12, temperature=0.0).split("\n")[0]}
        docs.append(doc)
    (folder / "data" / "tiny_generate.jsonl").write_text(
        "".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8"
    )
    results = run_harness(str(model_dir), ["lf_tiny_generate"], include_path=folder, limit=3)
    assert results["lf_tiny_generate"]["exact_match"] == pytest.approx(1 / 3)
    assert results["lf_tiny_generate"]["sample_len"] == 3


def test_dataset_folder_beside_the_yaml(tmp_path, monkeypatch):
    """`dataset_path` naming a folder next to the YAML is read from there, from any cwd. (The
    name is new each run: offline, `datasets` falls back to a cache entry of the same name.)"""
    name = f"docs_{uuid.uuid4().hex[:12]}"
    (tmp_path / "tasks" / name).mkdir(parents=True)
    shutil.copy(DATA / "tiny_choice.jsonl", tmp_path / "tasks" / name / "test.jsonl")
    config = (TASKS_DIR / "lf_tiny_choice.yaml").read_text(encoding="utf-8")
    config = config.replace("task: lf_tiny_choice", "task: lf_folder_choice")
    config = re.sub(r"dataset_path: json\ndataset_kwargs:\n(  .*\n)+",
                    f"dataset_path: {name}\ndataset_kwargs:\n  cache_dir: {tmp_path / 'cache'}\n",
                    config)
    assert "data_files" not in config
    (tmp_path / "tasks" / "folder.yaml").write_text(config, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    manager, specs = harness.resolve_tasks(["lf_folder_choice"], tmp_path / "tasks")
    (task,) = harness.load_tasks(manager, specs)
    assert len(list(task.test_docs())) == len(CHOICE_DOCS)


def test_registered_for_lm_evals_own_entry_point(model_dir, lm):
    """`simple_evaluate(model="largeforge", model_args="pretrained=...")` builds our adapter."""
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model

    assert get_model("largeforge") is LargeForgeLM
    results = simple_evaluate(
        model="largeforge", model_args=f"pretrained={model_dir},batch_size=2",
        tasks=["lf_tiny_choice"], limit=2, log_samples=False,
        task_manager=harness.task_manager(TASKS_DIR, include_defaults=False),
    )
    hits = []
    for doc in CHOICE_DOCS[:2]:
        lls = choice_loglikelihoods(lm, doc)
        hits.append(lls.index(max(lls)) == doc["answer"])
    assert results["results"]["lf_tiny_choice"]["acc,none"] == pytest.approx(sum(hits) / 2)


# -------------------------------------------------------------------- errors
def test_unknown_task_says_where_it_looked(model_dir):
    with pytest.raises(LargeForgeError) as err:
        run_harness(str(model_dir), ["lf_tiny_choise"], include_path=TASKS_DIR)
    message = str(err.value)
    assert "'lf_tiny_choise'" in message and "built-in" in message
    assert str(TASKS_DIR) in message and "lf_tiny_choice" in message  # listed and suggested


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(tasks=[]), "no task names"),
        (dict(tasks=["lf_tiny_choice"], include_path=TASKS_DIR / "nope"), "not a directory"),
        (dict(tasks=["lf_tiny_choice"], include_path=TASKS_DIR, limit=0), "limit"),
        (dict(tasks=["lf_tiny_choice"], include_path=TASKS_DIR, num_fewshot=-1), "num_fewshot"),
    ],
)
def test_bad_run_harness_arguments(model_dir, kwargs, expected):
    with pytest.raises(LargeForgeError, match=expected):
        run_harness(str(model_dir), **kwargs)


def test_task_with_missing_data_file(tmp_path, model_dir):
    (tmp_path / "broken.yaml").write_text(
        (TASKS_DIR / "lf_tiny_choice.yaml").read_text(encoding="utf-8")
        .replace("lf_tiny_choice", "lf_broken").replace("data/tiny_choice.jsonl", "missing.jsonl"),
        encoding="utf-8",
    )
    with pytest.raises(LargeForgeError, match=r"cannot load task\(s\) lf_broken.*missing\.jsonl"):
        run_harness(str(model_dir), ["lf_broken"], include_path=tmp_path)


def test_bad_model_arguments(model_dir, tmp_path, ref_model, tokenizer):
    cases = [
        (dict(), "name one model"),
        (dict(model=model_dir, pretrained=model_dir), "two models"),
        (dict(model=model_dir, loaded=(ref_model, tokenizer)), "not both"),
        (dict(model=model_dir, batch_size="many"), "batch_size"),
        (dict(model=model_dir, batch_size=0), "batch_size"),
        (dict(loaded=(ref_model, tokenizer), max_length=1), "at least 2"),
        (dict(loaded=(ref_model, tokenizer), max_length=4096), "context of 256"),
        (dict(model=tmp_path / "absent"), "not found"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(LargeForgeError, match=expected):
            LargeForgeLM(**kwargs)


def test_bad_generation_options(lm):
    too_long = Instance("generate_until", {}, ("Hi", {"until": ["\n"], "max_gen_toks": 256}), 0,
                        metadata=("lf_task", 0, 1))
    with pytest.raises(LargeForgeError, match=r"max_gen_toks 256 \(task lf_task\)"):
        lm.generate_until([too_long])
    beams = Instance("generate_until", {}, ("Hi", {"until": ["\n"], "num_beams": 4}), 0)
    with pytest.raises(LargeForgeError, match="num_beams"):
        lm.generate_until([beams])


def test_missing_lm_eval_names_the_extra(monkeypatch):
    """With lm_eval unimportable, importing the module raises a LargeForgeError (which is an
    ImportError too) that says how to install it."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    spec = importlib.util.spec_from_file_location("harness_without_lm_eval", harness.__file__)
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(LargeForgeError, match=r"pip install 'largeforge\[harness\]'") as err:
        spec.loader.exec_module(module)
    assert isinstance(err.value, ImportError)
