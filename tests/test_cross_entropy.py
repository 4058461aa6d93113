"""The blockwise cross-entropy equals the library's, in value and gradient, ignored labels
included, in fp32 and under bf16 autocast, across block boundaries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import largeforge.training.cross_entropy as ce


@pytest.mark.parametrize("block", [1 << 20, 64, 100])
def test_matches_the_library_in_value_and_gradient(monkeypatch, block):
    monkeypatch.setattr(ce, "BLOCK_ELEMENTS", block)  # 64: one row per block; 100: uneven
    torch.manual_seed(0)
    logits = (torch.randn(37, 50) * 3).requires_grad_()
    labels = torch.randint(0, 50, (37,))
    labels[[0, 5, 36]] = ce.IGNORE_INDEX
    expected = F.cross_entropy(logits, labels, ignore_index=ce.IGNORE_INDEX)
    (want,) = torch.autograd.grad(expected * 2.5, logits)
    got_loss = ce.cross_entropy(logits, labels)
    (got,) = torch.autograd.grad(got_loss * 2.5, logits)
    torch.testing.assert_close(got_loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert got[[0, 5, 36]].abs().max() == 0


def test_all_labels_ignored_gives_zero_loss_and_gradient():
    logits = torch.randn(4, 10, requires_grad=True)
    loss = ce.cross_entropy(logits, torch.full((4,), ce.IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0 and logits.grad.abs().max() == 0


def test_bf16_logits_get_a_bf16_gradient_close_to_fp32():
    torch.manual_seed(1)
    base = torch.randn(16, 300)
    labels = torch.randint(0, 300, (16,))
    low = base.to(torch.bfloat16).requires_grad_()
    ce.cross_entropy(low, labels).backward()
    ref = base.to(torch.bfloat16).float().requires_grad_()
    F.cross_entropy(ref, labels).backward()
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.float(), ref.grad, rtol=2e-2, atol=1e-3)


def test_without_gradients_it_uses_the_library_kernel():
    logits = torch.randn(3, 7)
    labels = torch.tensor([1, 2, ce.IGNORE_INDEX])
    with torch.no_grad():
        assert ce.cross_entropy(logits, labels) == F.cross_entropy(
            logits, labels, ignore_index=ce.IGNORE_INDEX)
