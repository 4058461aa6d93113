"""The library API of every command: each public name imported from `largeforge`, called on tiny
inputs (a random 2-layer model, a few records), and the CLI commands calling these same
functions (the commands' own behaviour is tested end to end in their own files)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import tiny_models
from largeforge import (
    CompareOutcome,
    DatasetValidator,
    DPOTrainer,
    Evaluation,
    ORPOTrainer,
    SyntheticDataGenerator,
    Trainer,
    build_server_app,
    compare,
    evaluate,
    export_model,
    plan_export,
    prepare_dataset,
    quantize,
    serve,
    serve_router,
    split_dataset,
)
from largeforge.errors import LargeForgeError
from sft_tasks import CHAT_SPECIALS, task_texts

TEXT = ["Once upon a time there was a little fox who lived in the forest.",
        "The fox liked to run and jump, and every day it found something new."]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny random Llamas (different weights) with a ChatML tokenizer, saved."""
    from largeforge.inference import CHATML_TEMPLATE

    root = tmp_path_factory.mktemp("models")
    tokenizer = tiny_models.make_tokenizer(TEXT + task_texts(), *CHAT_SPECIALS)
    tokenizer.chat_template = CHATML_TEMPLATE
    dirs = []
    for seed in (0, 1):
        path = root / f"m{seed}"
        tiny_models.make_family_model("llama", tokenizer, seed=seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return dirs[0], dirs[1]


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(TEXT) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_import_is_cheap_and_every_name_is_listed():
    code = ("import sys, largeforge; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(' '.join(largeforge.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    names = set(proc.stdout.split())
    assert {"evaluate", "compare", "export_model", "quantize", "DatasetValidator",
            "prepare_dataset", "split_dataset", "SyntheticDataGenerator", "serve", "serve_router",
            "import_model", "DPOTrainer", "ORPOTrainer", "SimPOTrainer", "Trainer"} <= names


# --- evaluate, compare ---------------------------------------------------------------------------


def test_evaluate(models, text_file, tmp_path):
    said: list[str] = []
    out = tmp_path / "results.json"
    evaluation = evaluate(models[0], text_file, "perplexity", batch_size=2, output=out,
                          on_status=said.append)
    assert isinstance(evaluation, Evaluation) and evaluation.num_examples == 1  # one document
    assert math.isfinite(evaluation.metrics["perplexity"]) and evaluation.tasks is None
    assert said == [f"evaluated {models[0]} on {text_file} in {evaluation.seconds:.1f} s"]
    written = json.loads(out.read_text())
    assert written["metrics"] == evaluation.metrics and written["settings"]["batch_size"] == 2
    with pytest.raises(LargeForgeError, match="give --data FILE, --tasks a,b, or both"):
        evaluate(models[0])
    with pytest.raises(LargeForgeError, match="go with --tasks"):
        evaluate(models[0], text_file, limit=3)


def test_compare(models, text_file, tmp_path):
    started: list[tuple[int, str]] = []
    outcome = compare([str(m) for m in models], text_file, tmp_path / "report.html",
                      metrics="perplexity", json_output=tmp_path / "cmp.json",
                      on_model=lambda i, m: started.append((i, m)))
    assert isinstance(outcome, CompareOutcome)
    assert [i for i, _ in started] == [0, 1] and outcome.comparison.labels == ["A", "B"]
    assert outcome.report.is_file() and "perplexity" in outcome.report.read_text()
    summary = json.loads(outcome.json.read_text()) if outcome.json else {}
    assert [m["model"] for m in summary["models"]] == [str(m) for m in models]
    assert len(outcome.comparison.best["perplexity"]) >= 1
    with pytest.raises(LargeForgeError, match="at least two models"):
        compare([str(models[0])], text_file, tmp_path / "one.html", metrics="perplexity")


# --- export, quantize ----------------------------------------------------------------------------


def test_export_dispatches_and_checks_first(models, tmp_path):
    target = export_model(models[0], format="hf", output=tmp_path / "hf", dtype="float16")
    assert (target / "config.json").is_file() and (target / "tokenizer.json").is_file()
    plan = plan_export(models[0], "HF", tmp_path / "hf2")
    assert (plan.format, plan.dtype) == ("hf", "float32") and not (tmp_path / "hf2").exists()
    for options, message in [
        (dict(format="onnx", opset=17), "opset"),
        (dict(format="hf", opset=18), "--opset applies to --format onnx only, not hf"),
        (dict(format="hf", kv_cache=False), "--no-kv-cache applies to --format onnx only"),
        (dict(format="gguf", dtype="float32"), "--dtype 'float32' is not valid for --format gguf"),
        (dict(format="onnx", temperature=0.5), "temperature applies to format"),
        (dict(format="zip"), "unknown format 'zip'"),
        (dict(format="hf", colour="red"), "unknown export option"),
    ]:
        with pytest.raises(LargeForgeError, match=message):
            export_model(models[0], output=tmp_path / "never", **options)
    with pytest.raises(LargeForgeError, match="not empty"):
        export_model(models[0], format="hf", output=target)
    assert not (tmp_path / "never").exists()


def test_quantize_checks_the_method(models, tmp_path):
    with pytest.raises(LargeForgeError, match="int3"):
        quantize(models[0], tmp_path / "q", method="int3")


# --- data -------------------------------------------------------------------------------------


ALPACA = [{"instruction": "Name the animal.", "input": "", "output": "A fox."},
          {"instruction": "Say hi.", "input": "", "output": ""},
          {"instruction": "Name the animal.", "input": "", "output": "A fox."}]


def test_dataset_validator_on_records_and_files(tmp_path):
    report = DatasetValidator(format="alpaca").validate(ALPACA)
    assert not report.ok and report.total == 3 and report.valid_records == [ALPACA[0]]
    assert report.counts() == {"empty_assistant": 1, "duplicate": 1}
    assert [str(p).split(":")[:2] for p in report.problems] == [["<records>", "2"],
                                                              ["<records>", "3"]]
    from_file = DatasetValidator().validate(write_jsonl(tmp_path / "a.jsonl", ALPACA))
    assert from_file.format == "alpaca" and from_file.counts() == report.counts()
    assert from_file.write_clean(tmp_path / "clean.jsonl") == 1
    assert DatasetValidator(format="alpaca").validate([ALPACA[0], "text"]).counts() == {
        "bad_json": 1}
    with pytest.raises(LargeForgeError, match="go together"):
        DatasetValidator(max_length=10)


def test_prepare_and_split_dataset(tmp_path):
    records = [{"text": f"Record number {i} says something about foxes and the forest."}
               for i in range(20)] + [{"text": "Record number 0 says something about foxes "
                                               "and the forest."}]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    prepared = prepare_dataset(data, tmp_path / "prep", eval_percent=20, near_dedup=0)
    assert prepared.format == "text" and prepared.report is not None
    assert prepared.report.exact_duplicates == 1
    assert len(prepared.train) + len(prepared.eval) == 20
    assert (tmp_path / "prep" / "report.json").is_file()
    split = split_dataset([data], tmp_path / "split", eval_percent=20)
    assert len(split.train) + len(split.eval) == 21 and split.records_in == 21
    with pytest.raises(LargeForgeError, match="--normal-form"):
        prepare_dataset(data, tmp_path / "bad", normal_form="NFX")


def test_synthetic_data_generator(tmp_path):
    asked: list[list[dict[str, str]]] = []

    def teacher(messages: list[dict[str, str]], settings: Any) -> str:
        asked.append(messages)
        return messages[-1]["content"].upper()

    out = tmp_path / "synth.jsonl"
    generator = SyntheticDataGenerator(teacher, format="alpaca", system="Be brief.",
                                       concurrency=2)
    report = generator.generate(["hello fox", "good night", "hello fox"], out)
    assert (report.prompts, report.written, report.failed) == (2, 2, [])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["output"] for r in lines) == ["GOOD NIGHT", "HELLO FOX"]
    assert asked[0][0] == {"role": "system", "content": "Be brief."}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello fox\nnew one\n", encoding="utf-8")
    again = generator.generate(prompts, out)
    assert (again.skipped, again.written) == (1, 1)


# --- serve -------------------------------------------------------------------------------------


def test_build_server_app_answers(models):
    from fastapi.testclient import TestClient

    app = build_server_app(models[0], served_model_name="tiny", max_batch_size=2)
    with TestClient(app) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        reply = client.post("/v1/completions", json={
            "model": "tiny", "prompt": "Once upon", "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] <= 4


def test_serve_checks_before_loading(models):
    for options, message in [(dict(max_batch_size=0), "--max-batch-size"),
                             (dict(port=70000), "--port"), (dict(threads=0), "--threads")]:
        with pytest.raises(LargeForgeError, match=message):
            serve(models[0], **options)
    assert callable(serve_router)


# --- training --------------------------------------------------------------------------------


PAIRS = [{"prompt": "red cat blue", "chosen": "blue cat red", "rejected": "red cat blue"},
         {"prompt": "sun moon", "chosen": "moon sun", "rejected": "sun moon star"},
         {"prompt": "dog fish", "chosen": "fish dog", "rejected": "dog fish"},
         {"prompt": "king ship", "chosen": "ship king", "rejected": "king ship"}]


def test_preference_trainers_build_the_train_dpo_recipe(models, tmp_path):
    dpo = DPOTrainer(model=str(models[0]), train_dataset=PAIRS, beta=0.2, loss_type="ipo",
                     output_dir=tmp_path / "dpo", overrides=["train.log_every=1"])
    recipe = dpo.recipe
    assert (recipe.train.objective, recipe.preference.beta, recipe.preference.loss_type) == (
        "dpo", 0.2, "ipo")
    # `train dpo`'s preference learning rates: 1e-6 full (no lora_config), 5e-5 LoRA
    assert recipe.train.method == "full" and recipe.train.lr == 1e-6
    assert recipe.train.log_every == 1
    orpo = ORPOTrainer(model=str(models[0]), train_dataset=PAIRS, output_dir=tmp_path / "orpo",
                       method="lora")
    assert orpo.recipe.train.objective == "orpo" and orpo.recipe.train.lr == 5e-5


def test_dpo_trainer_trains(models, tmp_path):
    result = DPOTrainer(
        model=str(models[0]), train_dataset=PAIRS * 3, beta=0.1, method="lora",
        output_dir=tmp_path / "dpo", max_steps=2, batch_size=2, seq_len=32,
        chat_template="chatml", precision="fp32",
    ).train()
    assert result.steps == 2 and (result.final_dir / "adapter_model.safetensors").is_file()
    losses = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text()
              .splitlines() if '"loss"' in line]
    assert losses and "reward_margin" in losses[-1]


def test_trainer_train_evaluate_export(tmp_path, text_file):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXT * 40), encoding="utf-8")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "dim": 32, "n_layers": 1, "max_seq_len": 32},
        "tokenizer": {"vocab_size": 300},
        "data": {"train": [str(corpus)], "seq_len": 16},
        "train": {"batch_size": 2, "max_steps": 3, "eval_every": 3},
        "output": {"dir": str(tmp_path / "runs"), "name": "t"},
    }))
    trainer = Trainer(config_file=recipe, overrides=["train.max_steps=2"], environ={})
    result = trainer.train()
    assert result.steps == 2 and trainer.model_dir == result.final_dir
    assert math.isfinite(trainer.evaluate(text_file).metrics["perplexity"])
    assert (trainer.export(format="hf", output=tmp_path / "hf") / "config.json").is_file()


# --- the CLI calls these functions -----------------------------------------------------------


# (library function, the CLI module whose command must call it)
CLI_CALLS = [
    ("evaluate", "largeforge/cli/eval_cmd.py"),
    ("compare", "largeforge/cli/compare_cmd.py"),
    ("plan_export", "largeforge/cli/export_cmd.py"),
    ("quantize", "largeforge/cli/export_cmd.py"),
    ("prepare_dataset", "largeforge/cli/data_cmd.py"),
    ("split_dataset", "largeforge/cli/data_cmd.py"),
    ("DatasetValidator", "largeforge/cli/data_cmd.py"),
    ("SyntheticDataGenerator", "largeforge/cli/data_cmd.py"),
    ("serve", "largeforge/cli/serve_cmd.py"),
    ("serve_router", "largeforge/cli/router_cmd.py"),
    ("merge_adapter", "largeforge/cli/merge_cmd.py"),
    ("import_model", "largeforge/cli/import_cmd.py"),
]


@pytest.mark.parametrize("name, cli_module", CLI_CALLS)
def test_the_cli_calls_the_library(name: str, cli_module: str) -> None:
    """The command imports and calls the very library name (read from its source: the
    commands' behaviour itself is tested end to end in their own files)."""
    import ast

    import largeforge

    source = Path(largeforge.__file__).parent.parent / cli_module
    tree = ast.parse(source.read_text(encoding="utf-8"))
    imported = {alias.asname or alias.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) for alias in node.names}
    called = {node.func.id for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert name in imported and name in called, f"{cli_module} does not call {name}"
    assert getattr(largeforge, name) is not None
