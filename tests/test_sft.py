"""Supervised fine-tuning of existing models: LoRA on eight model families, adapters that `peft`
loads with our logits, merging, QLoRA in 4 bits, evaluation-driven training, the Python API, and
a model that really learns a task."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from conftest import run_cli
from largeforge.errors import LargeForgeError
from largeforge.merge import merge_adapter
from largeforge.training.sft import SFTTrainer
from sft_tasks import CHAT_SPECIALS, split_task, task_texts
from tiny_models import FAMILIES, make_family_model, make_tokenizer

FAST = ["train.log_every=1", "train.eval_every=5", "train.warmup_steps=0"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(task_texts(), *CHAT_SPECIALS)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, list[dict], list[dict]]:
    root = tmp_path_factory.mktemp("task")
    train, test = split_task(300, 40)
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    return path, train, test


def save_base(family: str, tokenizer, directory: Path) -> Path:
    make_family_model(family, tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def logged(run_dir: Path, key: str = "loss") -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)[key] for line in lines if f'"{key}"' in line]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_on_each_family_trains_saves_loads_and_merges(family, tokenizer, task, tmp_path):
    base = save_base(family, tokenizer, tmp_path / "base")
    result = SFTTrainer(
        str(base), str(task[0]), output_dir=tmp_path / "run", chat_template="chatml",
        method="lora", max_steps=15, learning_rate=2e-2, batch_size=8, seq_len=64,
        precision="fp32", overrides=FAST,
    ).train()
    losses = logged(result.run_dir)
    assert len(losses) == 15 and sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses

    final = result.run_dir / "final"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in
                                                                     final.iterdir()}
    config = json.loads((final / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == base.resolve()
    # peft, on a plain transformers model, loads our adapter with our logits.
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final)
    ids = torch.randint(0, len(tokenizer), (2, 12))
    ours = logits(result.model, ids)
    assert (logits(theirs, ids) - ours).abs().max() < 1e-5
    assert (logits(AutoModelForCausalLM.from_pretrained(base), ids) - ours).abs().max() > 1e-3

    merged = merge_adapter(final, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert (logits(plain, ids) - ours).abs().max() < 1e-4
    assert AutoTokenizer.from_pretrained(merged).chat_template  # the template travels along


def test_cli_lora_options_dora_and_a_run_as_model(tokenizer, task, tmp_path):
    base = save_base("llama", tokenizer, tmp_path / "base")
    out = tmp_path / "runs" / "dora"
    proc = run_cli(
        "train", "sft", "--model", str(base), "--dataset", str(task[0]), "--output", str(out),
        "--num-epochs", "1", "--lora-r", "4", "--lora-alpha", "8", "--target-modules",
        "q_proj,v_proj", "--dora", "--chat-template", "chatml", "--seq-len", "64",
        "--precision", "fp32", "--batch-size", "16",
    )
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_dora"] is True
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    # About 270 train records (90%) in batches of 16: 17 steps make one epoch.
    assert recipe["train"]["num_epochs"] == 1 and json.loads(
        (out / "run.json").read_text())["step"] == 17
    # generate takes the LoRA run directly: its base with the adapter merged in.
    proc = run_cli("generate", "--model", str(out), "--prompt", "red", "--max-new-tokens", "4",
                   "--temperature", "0")
    assert proc.returncode == 0, proc.stderr


def test_qlora_keeps_the_base_in_4_bits_and_its_adapter_loads_in_peft(tokenizer, task,
                                                                        tmp_path):
    from bitsandbytes.nn import Linear4bit

    from largeforge.training.lora import load_quantized_base

    base = save_base("llama", tokenizer, tmp_path / "base")
    result = SFTTrainer(
        str(base), str(task[0]), output_dir=tmp_path / "run", chat_template="chatml",
        lora_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), qlora=True,
        max_steps=15, learning_rate=2e-2, batch_size=8, seq_len=64, precision="fp32",
        overrides=FAST,
    ).train()
    layer = result.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, Linear4bit) and layer.weight.quant_type == "nf4"
    losses = logged(result.run_dir)
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    # peft on a transformers model loaded in 4 bits: the same logits as ours.
    theirs = PeftModel.from_pretrained(load_quantized_base(str(base)), result.run_dir / "final")
    ids = torch.randint(0, len(tokenizer), (2, 12))
    ours = logits(result.model, ids)
    assert (logits(theirs, ids) - ours).abs().max() < 1e-5
    # Loaded the plain transformers way, bitsandbytes may take its bf16 CPU inference kernel
    # (on AVX512-BF16 machines): the same model within that kernel's rounding.
    plain_4bit = AutoModelForCausalLM.from_pretrained(base, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    plain = PeftModel.from_pretrained(plain_4bit, result.run_dir / "final")
    assert (logits(plain, ids) - ours).abs().max() < 2e-2


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_gradient_checkpointing_keeps_the_losses(method, tokenizer, task, tmp_path):
    """Recomputing activations in the backward pass saves memory and changes nothing else, on a
    frozen (or 4-bit) base whose inputs need no gradient; accumulation runs alongside."""
    base = save_base("llama", tokenizer, tmp_path / "base")
    runs = {}
    for checkpointing in (False, True):
        runs[checkpointing] = SFTTrainer(
            str(base), str(task[0]), output_dir=tmp_path / f"gc-{checkpointing}",
            chat_template="chatml", method=method, max_steps=6, learning_rate=1e-2,
            batch_size=4, grad_accum=2, seq_len=64, precision="fp32",
            overrides=[*FAST, "lora.dropout=0", f"train.gradient_checkpointing={checkpointing}"],
        ).train()
    assert runs[True].model.base_model.model.is_gradient_checkpointing
    plain, checkpointed = logged(runs[False].run_dir), logged(runs[True].run_dir)
    assert len(plain) == 6 and plain == pytest.approx(checkpointed, abs=1e-5)


def test_eval_split_best_model_early_stopping_and_overfitting_warning(tokenizer, tmp_path):
    """Few records, many epochs, full fine-tuning: eval loss turns up while train loss falls."""
    train, held_out = split_task(24, 40, seed=3)
    base = save_base("llama", tokenizer, tmp_path / "base")
    result = SFTTrainer(
        str(base), train, eval_dataset=held_out, output_dir=tmp_path / "run",
        chat_template="chatml", method="full", max_steps=400, learning_rate=1e-2,
        batch_size=8, seq_len=64, precision="fp32",
        overrides=["train.eval_every=10", "train.log_every=10", "train.warmup_steps=0",
                   "train.early_stopping_patience=3"],
    ).train()
    val = logged(result.run_dir, "val_loss")
    assert result.stopped_early and result.steps < 400
    assert result.overfitting_warnings >= 1
    best = min(val)
    assert result.best_val_loss == best and val[-1] > best
    # load_best_at_end: final/ holds the weights of the best evaluation, in memory too.
    final = AutoModelForCausalLM.from_pretrained(result.run_dir / "final")
    best_dir = AutoModelForCausalLM.from_pretrained(result.run_dir / "best")
    ids = torch.randint(0, len(tokenizer), (1, 10))
    assert torch.equal(logits(final, ids), logits(best_dir, ids))
    assert torch.equal(logits(result.model, ids), logits(best_dir, ids))
    state = json.loads((result.run_dir / "run.json").read_text())
    assert state["status"] == "stopped_early" and state["best_step"] < result.steps


def test_default_split_holds_out_a_tenth(tokenizer, task, tmp_path, capsys):
    base = save_base("llama", tokenizer, tmp_path / "base")
    SFTTrainer(str(base), str(task[0]), output_dir=tmp_path / "run", chat_template="chatml",
               max_steps=1, seq_len=64, precision="fp32").train()
    out = " ".join(capsys.readouterr().out.split())
    found = re.search(r"300 messages records -> (\d+) train samples .*?, (\d+) val samples", out)
    assert found, out
    train, val = int(found.group(1)), int(found.group(2))
    # A stable hash of each record decides, so the tenth is a tenth on average.
    assert train + val == 300 and 20 <= val <= 40


def test_python_api_takes_objects_and_a_peft_config(tokenizer, task, tmp_path):
    model = make_family_model("qwen2", tokenizer)
    trainer = SFTTrainer(
        model=model, train_dataset=task[1][:64], output_dir=tmp_path / "api", tokenizer=tokenizer,
        lora_config=LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0,
                               target_modules=["q_proj", "v_proj"]),
        chat_template="chatml", max_steps=3, seq_len=64, precision="fp32",
    )
    assert trainer.recipe.train.method == "lora" and trainer.recipe.lora.r == 4
    result = trainer.train()
    config = json.loads((result.run_dir / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    # The model object was saved once, by content, where the adapter can find it again.
    saved_base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    ids = torch.randint(0, len(tokenizer), (1, 8))
    assert torch.equal(logits(saved_base, ids), logits(model, ids))
    with pytest.raises(LargeForgeError, match="do not carry"):
        SFTTrainer(model, task[1], output_dir=tmp_path / "x", tokenizer=tokenizer,
                   lora_config=LoraConfig(r=4, bias="all"))
    with pytest.raises(LargeForgeError, match="pass tokenizer="):
        SFTTrainer(model, task[1], output_dir=tmp_path / "y")


def reverse_accuracy(model_or_run, held_out: list[dict], tokenizer=None,
                     template: str | None = None) -> float:
    """Share of held-out prompts whose greedy reply is exactly the words reversed, through the
    chat path users take (`ChatSession`, the saved chat template)."""
    from largeforge.inference.chat import ChatSession
    from largeforge.inference.generate import load_for_inference
    from largeforge.inference.sampling import SamplingParams

    if tokenizer is None:
        model, tokenizer = load_for_inference(model_or_run, "cpu")
    else:
        model = model_or_run
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    right = 0
    for record in held_out:
        session = ChatSession(model, tokenizer, params=params, chat_template=template)
        reply = "".join(session.send(record["messages"][0]["content"])).strip()
        right += reply == record["messages"][1]["content"]
    return right / len(held_out)


LEARN = ["train.eval_every=500", "train.log_every=100", "train.warmup_steps=20"]


@pytest.mark.slow  # a learning proof; `make test` runs the slow tests after the rest
def test_full_fine_tuning_learns_to_reverse_words(tokenizer, tmp_path):
    """Not only a falling loss: held-out prompts answered correctly (greedy) after fine-tuning,
    and not before."""
    from largeforge.chat_templates import get_template

    train, held_out = split_task(3000, 50)
    base = save_base("llama", tokenizer, tmp_path / "base")
    before = reverse_accuracy(AutoModelForCausalLM.from_pretrained(base), held_out, tokenizer,
                              get_template("chatml"))
    result = SFTTrainer(
        str(base), train, output_dir=tmp_path / "run", chat_template="chatml", method="full",
        max_steps=1500, learning_rate=3e-3, batch_size=16, seq_len=64, precision="fp32",
        overrides=LEARN,
    ).train()
    after = reverse_accuracy(result.run_dir, held_out)  # the saved model and its template
    assert before < 0.10 and after >= 0.90, (before, after)


@pytest.mark.slow  # a learning proof; `make test` runs the slow tests after the rest
def test_lora_teaches_a_model_that_copies_to_reverse(tokenizer, tmp_path):
    """The LoRA path on a base that already knows the chat format: a tiny model first trained
    (fully) to repeat the words, then LoRA adapters on its frozen weights to reverse them."""
    train, held_out = split_task(3000, 50)
    copying = [{"messages": [r["messages"][0], {"role": "assistant",
                                                "content": r["messages"][0]["content"]}]}
               for r in train]
    base = save_base("llama", tokenizer, tmp_path / "base")
    copier = SFTTrainer(
        str(base), copying, output_dir=tmp_path / "copy", chat_template="chatml", method="full",
        max_steps=1000, learning_rate=3e-3, batch_size=16, seq_len=64, precision="fp32",
        overrides=LEARN,
    ).train()
    before = reverse_accuracy(copier.run_dir, held_out)
    result = SFTTrainer(
        str(copier.run_dir), train, output_dir=tmp_path / "reverse",
        lora_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                               target_modules="all-linear"),
        max_steps=2000, learning_rate=3e-3, batch_size=16, seq_len=64, precision="fp32",
        overrides=LEARN,
    ).train()
    assert (result.run_dir / "final" / "adapter_model.safetensors").is_file()
    after = reverse_accuracy(result.run_dir, held_out)  # base + adapter, merged on load
    assert before < 0.10 and after >= 0.90, (before, after)
