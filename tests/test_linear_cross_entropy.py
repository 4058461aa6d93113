"""The fused output projection + cross-entropy equals logits = hidden @ W.T followed by the
library's cross-entropy, in value and in the gradients of both inputs; and the training
objectives take the fused path exactly where it is sound, with the same loss and gradients as
the model's own forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import largeforge.training.linear_cross_entropy as lce
from largeforge.models import ModelConfig, build_model
from largeforge.training import objectives
from largeforge.training.cross_entropy import IGNORE_INDEX


def _reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=IGNORE_INDEX)


def _inputs(n: int = 37, d: int = 24, v: int = 50, seed: int = 0):
    torch.manual_seed(seed)
    hidden = torch.randn(n, d, requires_grad=True)
    weight = (torch.randn(v, d) * 0.5).requires_grad_()
    labels = torch.randint(0, v, (n,))
    labels[[0, 5, n - 1]] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("block", [256, 8, 10])  # one block; several; an uneven last block
def test_value_and_both_gradients_match_the_unfused_computation(monkeypatch, block):
    monkeypatch.setattr(lce, "BLOCK_TOKENS_CPU", block)
    hidden, weight, labels = _inputs()
    want = _reference(hidden, weight, labels)
    want_h, want_w = torch.autograd.grad(want * 2.5, (hidden, weight))  # scaled upstream grad
    got = lce.linear_cross_entropy(hidden, weight, labels)
    got_h, got_w = torch.autograd.grad(got * 2.5, (hidden, weight))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-7)
    assert got_h[[0, 5, 36]].abs().max() == 0  # ignored rows get no gradient


def test_extreme_logits_stay_finite():
    # A target logit far below the row's maximum: exp underflows, the loss must not.
    hidden = torch.tensor([[1.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[200.0, 0.0], [-200.0, 0.0]], requires_grad=True)
    labels = torch.tensor([1])
    got = lce.linear_cross_entropy(hidden, weight, labels)
    got.backward()
    torch.testing.assert_close(got, _reference(hidden.detach(), weight.detach(), labels))
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_all_labels_ignored_gives_zero_loss_and_gradient():
    hidden, weight, _ = _inputs()
    loss = lce.linear_cross_entropy(hidden, weight, torch.full((37,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_a_frozen_weight_gets_no_gradient_and_the_hidden_states_do():
    hidden, weight, labels = _inputs()
    weight = weight.detach()
    lce.linear_cross_entropy(hidden, weight, labels).backward()
    want_h, = torch.autograd.grad(_reference(hidden, weight, labels), hidden)
    torch.testing.assert_close(hidden.grad, want_h, rtol=1e-5, atol=1e-7)


def test_without_gradients_it_gives_the_same_loss(monkeypatch):
    monkeypatch.setattr(lce, "BLOCK_TOKENS_CPU", 8)
    hidden, weight, labels = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            lce.linear_cross_entropy(hidden, weight, labels), _reference(hidden, weight, labels)
        )


def test_under_bf16_autocast_it_is_close_to_autocast_logits():
    hidden, weight, labels = _inputs(v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _reference(hidden, weight, labels)
        got = lce.linear_cross_entropy(hidden, weight, labels)
    want_h, want_w = torch.autograd.grad(want, (hidden, weight))
    got_h, got_w = torch.autograd.grad(got, (hidden, weight))
    assert got.dtype == torch.float32 and weight.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got_h, want_h, rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(got_w, want_w, rtol=5e-2, atol=2e-3)


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                         vocab_size=97, max_seq_len=32)
    return build_model(config)


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 16))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX  # a masked prompt
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("objective", ["causal_lm_loss", "instruction_loss"])
def test_objectives_fused_path_equals_the_models_own_forward(monkeypatch, objective):
    model, batch = _tiny_llama(), _batch()
    loss_fn = getattr(objectives, objective)
    assert objectives.fused_head(model) is not None
    fused_loss, _ = loss_fn(model, batch)
    fused_grads = torch.autograd.grad(fused_loss, list(model.parameters()))
    monkeypatch.setattr(objectives, "fused_head", lambda model: None)  # the model's forward
    plain_loss, _ = loss_fn(model, batch)
    plain_grads = torch.autograd.grad(plain_loss, list(model.parameters()))
    # and the model's own loss, for the shifted (Hugging Face) convention
    if objective == "instruction_loss":
        hf_loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        torch.testing.assert_close(fused_loss, hf_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_lora_models_take_the_fused_path_and_train_only_the_adapters():
    model = get_peft_model(
        _tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8)
    )
    decoder, weight = objectives.fused_head(model)
    assert not weight.requires_grad
    loss, _ = objectives.causal_lm_loss(model, _batch())
    loss.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)


def test_other_models_keep_their_own_forward():
    model = _tiny_llama()
    model.config.model_type = "gemma2"  # soft-caps its logits: the head cannot be fused
    assert objectives.fused_head(model) is None
    model = _tiny_llama()
    model.lm_head = torch.nn.Linear(32, 97, bias=True)  # a head with a bias
    assert objectives.fused_head(model) is None
    wrapped = torch.nn.Sequential(_tiny_llama())  # not a transformers model
    assert objectives.fused_head(wrapped) is None


def test_a_second_backward_through_the_same_loss_is_refused():
    hidden, weight, labels = _inputs()
    loss = lce.linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
