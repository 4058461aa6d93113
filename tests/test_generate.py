"""The KV-cache decoding loop, streaming text, loading, and `largeforge generate`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

import tiny_models
from largeforge.cli.generate_cmd import register
from largeforge.errors import LargeForgeError
from largeforge.inference import (
    SamplingParams,
    detokenize_stream,
    encode_prompt,
    generate,
    generate_ids,
    load_for_inference,
    stream_text,
)
from largeforge.inference.sampling import sample_next_token

TEXT = [
    "Once upon a time there was a little fox who lived in the forest.",
    "The fox liked to run and jump, and every day it found something new.",
    "One day the fox met a bird. Héllo, said the bird, in a tiny wörld.",
]
MAX_SEQ_LEN = 128


def make_tokenizer() -> PreTrainedTokenizerFast:
    return tiny_models.make_tokenizer(TEXT)


def make_model(vocab_size: int) -> torch.nn.Module:
    return tiny_models.make_model(vocab_size, MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> torch.nn.Module:
    return make_model(len(tokenizer))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def prompt_ids(tokenizer, text: str = "Once upon a time") -> torch.Tensor:
    return encode_prompt(tokenizer, text)


def hf_generate(model, input_ids: torch.Tensor, n: int, **kwargs) -> list[int]:
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
        eos_token_id=None, pad_token_id=0, **kwargs,
    )
    return out[0, input_ids.size(1):].tolist()


def no_cache_loop(model, input_ids: torch.Tensor, params: SamplingParams, n: int) -> list[int]:
    """The reference: recompute the whole sequence from scratch for every token."""
    ids = input_ids
    with torch.inference_mode():
        for _ in range(n):
            logits = model(ids, use_cache=False).logits[:, -1, :]
            token = sample_next_token(logits, ids, params)
            ids = torch.cat([ids, token[:, None]], dim=1)
    return ids[0, input_ids.size(1):].tolist()


# --- the decoding loop ---------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_transformers_and_no_cache_loop(model, tokenizer, penalty: float) -> None:
    ids = prompt_ids(tokenizer)
    params = SamplingParams(temperature=0, max_new_tokens=40, repetition_penalty=penalty)
    ours = list(generate_ids(model, ids, params, eos_token_ids=set()))
    assert len(ours) == 40 and len(set(ours)) > 10  # a real sequence, not one token repeated
    assert ours == hf_generate(model, ids, 40, do_sample=False, repetition_penalty=penalty)
    assert ours == no_cache_loop(model, ids, params, 40)


def test_seeded_sampling_matches_transformers(model, tokenizer) -> None:
    """Same processors, same order, same random stream: the same tokens as `model.generate`."""
    ids = prompt_ids(tokenizer)
    params = SamplingParams(
        temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=5, max_new_tokens=30
    )
    ours = list(generate_ids(model, ids, params, eos_token_ids=set()))
    torch.manual_seed(5)
    reference = hf_generate(
        model, ids, 30, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
        repetition_penalty=1.2,
    )
    assert ours == reference


def test_stops_at_eos_without_yielding_it(model, tokenizer) -> None:
    ids = prompt_ids(tokenizer)
    greedy = SamplingParams(temperature=0, max_new_tokens=30)
    full = list(generate_ids(model, ids, greedy, eos_token_ids=set()))
    stop_token = full[6]
    cut = full.index(stop_token)
    assert list(generate_ids(model, ids, greedy, eos_token_ids={stop_token})) == full[:cut]
    keep_going = SamplingParams(temperature=0, max_new_tokens=30, stop_at_eos=False)
    assert list(generate_ids(model, ids, keep_going, eos_token_ids={stop_token})) == full


def test_default_eos_comes_from_the_model(model, tokenizer) -> None:
    ids = prompt_ids(tokenizer)
    params = SamplingParams(temperature=0, max_new_tokens=30)
    full = list(generate_ids(model, ids, params, eos_token_ids=set()))
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = full[3]
    try:
        assert list(generate_ids(model, ids, params)) == full[: full.index(full[3])]
    finally:
        model.generation_config.eos_token_id = original


def test_max_new_tokens_and_context_limit(model, tokenizer) -> None:
    ids = prompt_ids(tokenizer)
    assert list(generate_ids(model, ids, SamplingParams(max_new_tokens=0))) == []
    assert len(list(generate_ids(model, ids, SamplingParams(max_new_tokens=7), set()))) == 7
    long_prompt = torch.randint(4, len(tokenizer), (1, MAX_SEQ_LEN - 5))
    out = list(generate_ids(model, long_prompt, SamplingParams(max_new_tokens=50), set()))
    assert len(out) == 5  # stops at the context length instead of crashing
    full = torch.randint(4, len(tokenizer), (1, MAX_SEQ_LEN))
    assert list(generate_ids(model, full, SamplingParams(), set())) == []
    too_long = torch.randint(4, len(tokenizer), (1, MAX_SEQ_LEN + 1))
    with pytest.raises(LargeForgeError, match="context"):
        list(generate_ids(model, too_long, SamplingParams()))


def test_seed_determinism(model, tokenizer) -> None:
    ids = prompt_ids(tokenizer)

    def run(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=20)
        return list(generate_ids(model, ids, params, eos_token_ids=set()))

    assert run(1) == run(1)
    assert len({tuple(run(seed)) for seed in (1, 2, 3)}) > 1


def test_loop_restores_mode_and_leaves_inference_mode_to_the_step(model, tokenizer) -> None:
    model.train()
    try:
        gen = generate_ids(model, prompt_ids(tokenizer), SamplingParams(max_new_tokens=3), set())
        for _ in gen:
            assert not model.training
            assert not torch.is_inference_mode_enabled()  # the caller's code runs normally
        assert model.training
    finally:
        model.eval()


# --- prompts and streaming text ------------------------------------------------------------


def test_encode_prompt_bos_rules(tokenizer) -> None:
    bos = tokenizer.bos_token_id
    text_ids = tokenizer("Once upon", add_special_tokens=False)["input_ids"]
    assert encode_prompt(tokenizer, "Once upon")[0].tolist() == [bos, *text_ids]
    assert encode_prompt(tokenizer, "<s>Once upon")[0].tolist() == [bos, *text_ids]
    assert encode_prompt(tokenizer, "Once upon", add_bos=False)[0].tolist() == text_ids
    assert encode_prompt(tokenizer, "")[0].tolist() == [bos]
    assert encode_prompt(tokenizer, "", add_bos=False)[0].tolist() == [bos]


def test_empty_prompt_generates(model, tokenizer) -> None:
    text = "".join(stream_text(model, tokenizer, "", SamplingParams(max_new_tokens=5, seed=0)))
    assert isinstance(text, str)


def test_stream_text_equals_full_decode(model, tokenizer) -> None:
    ids = prompt_ids(tokenizer)
    for seed in range(3):
        # Sampling from a random byte-level model makes plenty of broken UTF-8 to hold back.
        params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=40)
        expected = list(generate_ids(model, ids, params))
        pieces = list(stream_text(model, tokenizer, "Once upon a time", params))
        assert "".join(pieces) == tokenizer.decode(expected)


def test_detokenize_holds_back_partial_characters(tokenizer) -> None:
    text = "Héllo 😀 wörld, 日本語 🦊!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # the emoji and CJK characters are split into byte tokens
    pieces = list(detokenize_stream(tokenizer, ids))
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert any("😀" in piece for piece in pieces) and any("🦊" in piece for piece in pieces)


def test_detokenize_flushes_an_unfinished_character(tokenizer) -> None:
    ids = tokenizer("ab😀", add_special_tokens=False)["input_ids"][:-1]  # cut inside the emoji
    pieces = list(detokenize_stream(tokenizer, ids))
    assert "".join(pieces) == tokenizer.decode(ids)
    assert pieces[-1].endswith("\ufffd")


# --- loading and the library call ----------------------------------------------------------


def test_load_and_generate_from_model_and_run_dirs(tmp_path, model_dir, model, tokenizer) -> None:
    loaded, tok = load_for_inference(model_dir, device="cpu")
    assert not loaded.training and len(tok) == len(tokenizer)
    expected = generate(model, "Once upon", tokenizer, temperature=0, max_new_tokens=15)
    assert generate(model_dir, "Once upon", temperature=0, max_new_tokens=15) == expected
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "recipe.yaml").write_text("model: {}\n")
    for file in model_dir.iterdir():
        (run / "final" / file.name).write_bytes(file.read_bytes())
    assert generate(str(run), "Once upon", temperature=0, max_new_tokens=15) == expected


def test_load_errors(tmp_path, model, model_dir) -> None:
    with pytest.raises(LargeForgeError, match="not found"):
        load_for_inference(tmp_path / "missing")
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    with pytest.raises(LargeForgeError, match="no tokenizer"):
        load_for_inference(bare)
    with pytest.raises(LargeForgeError, match="tokenizer"):
        generate(model, "hi")
    with pytest.raises(LargeForgeError, match="unknown sampling option"):
        generate(model_dir, "hi", temprature=0)


# --- the command line ----------------------------------------------------------------------


def cli_app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_generate_streams_only_the_text(model_dir, model, tokenizer) -> None:
    expected = generate(model, "Once upon", tokenizer, temperature=0, max_new_tokens=12)
    args = ["generate", "--model", str(model_dir), "--prompt", "Once upon", "--temperature", "0",
            "--max-new-tokens", "12"]
    for extra in ([], ["--no-stream"]):
        result = CliRunner().invoke(cli_app(), args + extra)
        assert result.exit_code == 0, result.output
        assert result.stdout == expected + "\n"
        assert "loading" in result.stderr


def test_cli_generate_bad_input_is_one_line_error(tmp_path, model_dir) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli_app(), ["generate", "-m", str(tmp_path / "nope"), "-p", "x"])
    assert isinstance(missing.exception, LargeForgeError)
    assert "\n" not in str(missing.exception)
    bad = runner.invoke(cli_app(), ["generate", "-m", str(model_dir), "-p", "x", "--top-p", "2"])
    assert isinstance(bad.exception, LargeForgeError) and "top_p" in str(bad.exception)


def _main_or_skip():  # noqa: ANN202
    try:
        from largeforge.cli import main
    except Exception as exc:  # other command modules may not exist yet
        pytest.skip(f"largeforge.cli.main does not import yet: {exc}")
    return main


def test_main_exit_code_2_for_missing_model(tmp_path, capsys) -> None:
    main = _main_or_skip()
    code = main.main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "nope" in err


def test_subprocess_generate(model_dir, model, tokenizer) -> None:
    _main_or_skip()
    expected = generate(model, "Once upon", tokenizer, temperature=0, max_new_tokens=10)
    result = subprocess.run(
        [sys.executable, "-m", "largeforge.cli.main", "generate", "--model", str(model_dir),
         "--prompt", "Once upon", "--temperature", "0", "--max-new-tokens", "10"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    missing = subprocess.run(
        [sys.executable, "-m", "largeforge.cli.main", "generate", "--model", "/no/such/dir",
         "--prompt", "hi"],
        capture_output=True, text=True, timeout=120,
    )
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr and "/no/such/dir" in missing.stderr
