"""Preference optimisation: DPO (Rafailov et al. 2023, with its label-smoothed and IPO variants),
ORPO (Hong et al. 2024) and SimPO (Meng et al. 2024), as plain loss functions on per-sequence
log-probabilities, and the objectives that feed them from a batch of pairs (chosen rows first,
rejected rows after).

DPO's reference model is a frozen copy for full training, or the policy itself with its LoRA
adapters switched off, so no second copy is held. ORPO and SimPO need no reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from largeforge.training.cross_entropy import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of log p(label) over target tokens, and the number of targets. `labels`
    are aligned with the inputs (Hugging Face's convention) and shifted here."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    token_logps = torch.gather(logits.log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards of chosen and rejected.

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
    sigmoid: -(1 - e) log s(beta h) - e log s(-beta h)   (e: label smoothing, conservative DPO)
    ipo:     (h - 1 / (2 beta))^2                        (Azar et al. 2023)
    rewards: beta (log pi(y) - log ref(y))
    """
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}: sigmoid or ipo")
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def orpo_odds_ratio_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor
) -> torch.Tensor:
    """Per-pair -log s(log odds(y_w) - log odds(y_l)), odds(y) = P(y) / (1 - P(y)), where log P(y)
    is the mean per-token log-probability of the completion (ORPO, eq. 4-7)."""
    log_odds = (chosen_mean_logps - rejected_mean_logps) - (
        torch.log1p(-torch.exp(chosen_mean_logps)) - torch.log1p(-torch.exp(rejected_mean_logps))
    )
    return -F.logsigmoid(log_odds)


def simpo_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, *, beta: float,
    gamma: float,
) -> torch.Tensor:
    """Per-pair SimPO loss (Meng et al. 2024, eq. 6): the reward of a completion is its
    length-normalised log-likelihood scaled by beta, and the chosen one must beat the rejected
    one by the target margin gamma:

        -log s(beta / |y_w| log pi(y_w|x) - beta / |y_l| log pi(y_l|x) - gamma)
    """
    return -F.logsigmoid(beta * (chosen_mean_logps - rejected_mean_logps) - gamma)


def _split(batch: Batch, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum log-probs, target counts) of every row: one forward over chosen and rejected."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    return sequence_logps(logits, batch["labels"])


def _metrics(chosen_rewards: torch.Tensor,
             rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached tensors: the loop reads them only when it logs, so no step waits on a device
    sync for them."""
    return {
        "rewards_chosen": chosen_rewards.mean(),
        "rewards_rejected": rejected_rewards.mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "preference_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }


class DPOObjective:
    """`(model, batch) -> (loss, metrics)`. `reference` is a frozen model, or None to use the
    policy with its adapters disabled (LoRA, QLoRA)."""

    def __init__(self, *, beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                 reference: torch.nn.Module | None = None,
                 adapters_off: Callable[[], contextlib.AbstractContextManager] | None = None):
        if reference is None and adapters_off is None:
            raise ValueError("DPO needs a reference model or a way to switch adapters off")
        self.beta, self.label_smoothing, self.loss_type = beta, label_smoothing, loss_type
        self.reference, self.adapters_off = reference, adapters_off

    def reference_logps(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return _split(batch, self.reference)[0]
            assert self.adapters_off is not None
            with self.adapters_off():
                return _split(batch, model)[0]

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        logps, _ = _split(batch, model)
        reference = self.reference_logps(model, batch)
        n = logps.size(0) // 2
        losses, chosen, rejected = dpo_loss(
            logps[:n], logps[n:], reference[:n], reference[n:], beta=self.beta,
            label_smoothing=self.label_smoothing, loss_type=self.loss_type,
        )
        return losses.mean(), _metrics(chosen, rejected)


class ORPOObjective:
    """SFT loss on the chosen completions plus `beta` times the odds-ratio loss; no reference."""

    def __init__(self, *, beta: float) -> None:
        self.beta = beta

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        logps, counts = _split(batch, model)
        n = logps.size(0) // 2
        mean = logps / counts.clamp(min=1)
        nll = -logps[:n].sum() / counts[:n].sum().clamp(min=1)
        ratio = orpo_odds_ratio_loss(mean[:n], mean[n:])
        loss = nll + self.beta * ratio.mean()
        metrics = _metrics(self.beta * mean[:n].detach(), self.beta * mean[n:].detach())
        metrics.update(nll=nll.detach(), odds_ratio_loss=ratio.mean().detach())
        return loss, metrics


class SimPOObjective:
    """SimPO: the margin between length-normalised rewards, no reference model."""

    def __init__(self, *, beta: float, gamma: float) -> None:
        self.beta, self.gamma = beta, gamma

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        logps, counts = _split(batch, model)
        n = logps.size(0) // 2
        mean = logps / counts.clamp(min=1)
        losses = simpo_loss(mean[:n], mean[n:], beta=self.beta, gamma=self.gamma)
        return losses.mean(), _metrics(self.beta * mean[:n].detach(),
                                       self.beta * mean[n:].detach())
