"""Models: presets, parameter counts, FLOPs, and transformers loading what we save."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from largeforge.errors import LargeForgeError
from largeforge.models import (
    PRESETS,
    ModelConfig,
    build_model,
    count_parameters,
    flops_per_token,
    preset,
)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("tiny", 0.8e6, 1.6e6), ("small", 14.5e6, 15.5e6), ("medium", 40e6, 44e6),
     ("base", 105e6, 115e6)],
)
def test_preset_sizes(name, low, high):
    with torch.device("meta"):
        model = build_model(PRESETS[name])
    assert low <= count_parameters(model)["total"] <= high


def test_small_is_the_stories15m_shape():
    cfg = PRESETS["small"]
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.ffn_dim, cfg.vocab_size) == (
        288, 6, 6, 768, 32000)


def test_llama_architecture_features():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100,
                      max_seq_len=32, tie_embeddings=False, rope_theta=500000.0)
    model = build_model(cfg)
    hf = model.config
    assert hf.model_type == "llama" and hf.hidden_act == "silu"
    assert hf.num_key_value_heads == 2
    assert hf.rope_parameters["rope_theta"] == 500000.0
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert cfg.ffn_dim % 32 == 0
    tied = build_model(cfg.model_copy(update={"tie_embeddings": True}))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    # k/v projections are smaller than q under GQA
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == attn.q_proj.out_features // 2


def test_saved_model_loads_in_transformers_with_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    vocab_size=300, max_seq_len=64))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 300, (2, 20))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_flops_per_token_counts_matmuls_not_lookups():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=1000, max_seq_len=32,
                      tie_embeddings=False)
    model = build_model(cfg)
    n_total = count_parameters(model)["total"]
    expected = 6 * (n_total - 1000 * 64) + 12 * 2 * 4 * 16 * 32
    assert flops_per_token(model, 32) == expected


def test_bad_configs():
    with pytest.raises(LargeForgeError, match="unknown model preset 'huge'"):
        preset("huge")
    with pytest.raises(ValidationError, match="divisible by n_heads"):
        ModelConfig(dim=65, n_heads=4)
    with pytest.raises(ValidationError, match="divisible by n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)


def test_load_model_from_directories_and_clear_errors(tmp_path, monkeypatch):
    from largeforge.models import load_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=300,
                                    max_seq_len=32))
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m")(ids).logits, model.eval()(ids).logits)
    # a run directory resolves to its final/
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("{}")
    model.save_pretrained(tmp_path / "run" / "final")
    assert load_model(tmp_path / "run").config.vocab_size == 300

    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(LargeForgeError, match="has no weights"):
        load_model(tmp_path / "m")
    with pytest.raises(LargeForgeError, match="not found"):
        load_model(tmp_path / "nowhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable when imported: tell it too, or it retries the network
    # for 20 s before giving up.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(LargeForgeError, match="not in the local Hugging Face cache"):
        load_model("largeforge-tests/no-such-model")
