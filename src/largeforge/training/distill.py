"""Knowledge distillation (Hinton et al. 2015): the student matches the teacher's softened
next-token distribution, mixed with the ordinary cross-entropy on the data.

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

averaged over target tokens (labels != -100). T^2 keeps the gradient scale of the soft term
independent of T. The teacher runs without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from largeforge.training.cross_entropy import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KL term, cross-entropy) over the target positions; logits [N, V], labels [N]."""
    mask = labels != IGNORE_INDEX
    student, teacher, targets = student_logits[mask].float(), teacher_logits[mask].float(), (
        labels[mask])
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean()
    kl = kl * temperature**2
    ce = F.cross_entropy(student, targets)
    return alpha * kl + (1 - alpha) * ce, kl, ce


class DistillObjective:
    """`(model, batch) -> (loss, metrics)` with a frozen teacher. `shifted`: the labels are already
    the next tokens (pretraining windows); otherwise they are aligned with the inputs and shifted
    here (instruction data)."""

    def __init__(self, teacher: torch.nn.Module, *, temperature: float, alpha: float,
                 shifted: bool) -> None:
        self.teacher, self.temperature, self.alpha, self.shifted = (
            teacher, temperature, alpha, shifted)

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        extra = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        student = model(input_ids=batch["input_ids"], use_cache=False, **extra).logits
        with torch.no_grad():
            teacher = self.teacher(input_ids=batch["input_ids"], use_cache=False, **extra).logits
        labels = batch["labels"]
        if not self.shifted:
            student, teacher, labels = student[:, :-1], teacher[:, :-1], labels[:, 1:]
        vocab = min(student.size(-1), teacher.size(-1))  # a padded vocabulary adds no tokens
        loss, kl, ce = distillation_loss(
            student[..., :vocab].reshape(-1, vocab), teacher[..., :vocab].reshape(-1, vocab),
            labels.reshape(-1), temperature=self.temperature, alpha=self.alpha,
        )
        return loss, {"kd_loss": kl.detach(), "ce_loss": ce.detach()}
