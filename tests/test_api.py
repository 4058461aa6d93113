"""The library API the README documents: every exported name resolves, and the README's
example (recipe -> train -> generate) works as written, on a small recipe."""

from __future__ import annotations

import pytest
import yaml

import largeforge
from largeforge import ModelConfig, build_model, generate, load_recipe, train


def test_every_exported_name_resolves():
    for name in largeforge.__all__:
        assert getattr(largeforge, name) is not None, name
    with pytest.raises(AttributeError):
        _ = largeforge.no_such_name


def test_readme_example(tmp_path, shared_data):
    text = (shared_data / "tinystories_sample.txt").read_text(encoding="utf-8")[:60_000]
    (tmp_path / "stories.txt").write_text(text, encoding="utf-8")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "dim": 64, "n_layers": 2, "max_seq_len": 64},
        "tokenizer": {"vocab_size": 400},
        "data": {"train": [str(tmp_path / "stories.txt")], "seq_len": 32},
        "train": {"batch_size": 4, "max_steps": 10, "eval_every": 5},
        "output": {"dir": str(tmp_path / "runs"), "name": "api"},
    }))
    recipe = load_recipe(str(path), overrides=["train.max_steps=12"], environ={})
    result = train(recipe)
    assert result.steps == 12 and result.final_dir == tmp_path / "runs" / "api" / "final"
    assert result.best_val_loss is not None
    first = generate(result.final_dir, "Once upon a time", max_new_tokens=20, seed=0)
    again = generate(result.final_dir, "Once upon a time", max_new_tokens=20, seed=0)
    assert isinstance(first, str) and first and first == again

    model = build_model(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                                    vocab_size=512, max_seq_len=128))
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == 512
