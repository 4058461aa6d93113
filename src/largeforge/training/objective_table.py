"""What a run optimises: one table row per `train.objective`, saying which data it needs, whether
it tunes an existing model, and how its loss functions are built.

The trainer never branches on the objective: a new one is an `ObjectiveSpec` row and a function
that builds it (SimPO below took exactly that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from largeforge.config import Recipe
from largeforge.errors import LargeForgeError
from largeforge.models import load_model
from largeforge.training.data_kinds import DataKind
from largeforge.training.objectives import Objective
from largeforge.training.setup import base_model_ref, check_teacher_tokenizer


@dataclass(frozen=True)
class ObjectiveSpec:
    # (recipe, model, device, data kind) -> (the loss trained on, the loss evaluated with)
    build: Callable[[Recipe, Any, Any, DataKind], tuple[Objective, Objective]]
    data_kind: str | None = None  # the data it trains on; None: what the data files hold
    tunes_existing_model: bool = False  # needs model.from_pretrained
    needs: tuple[str, str] | None = None  # (recipe key that must be set, its CLI flag)
    # (recipe, tokenizer): refuses a tokenizer the objective cannot train with
    check_tokenizer: Callable[[Recipe, Any], None] | None = None


def _language_modelling(recipe: Recipe, model: Any, device: Any,
                        kind: DataKind) -> tuple[Objective, Objective]:
    assert kind.lm_objective is not None  # decide_data_kind gives lm no preference data
    return kind.lm_objective, kind.lm_objective


def _dpo(recipe: Recipe, model: Any, device: Any, kind: DataKind) -> tuple[Objective, Objective]:
    """DPO against a frozen copy (full training) or the adapters switched off (LoRA, QLoRA)."""
    from largeforge.adapters import uses_adapters
    from largeforge.training.preference import DPOObjective

    cfg = recipe.preference
    if uses_adapters(model):
        objective = DPOObjective(beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                                 loss_type=cfg.loss_type, adapters_off=model.disable_adapter)
        return objective, objective
    # The model the run started from, also when it resumes from a later checkpoint.
    base = base_model_ref(str(recipe.model.from_pretrained), recipe.train.method)
    reference = load_model(base).to(next(model.parameters()).device).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    objective = DPOObjective(beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                             loss_type=cfg.loss_type, reference=reference)
    return objective, objective


def _orpo(recipe: Recipe, model: Any, device: Any, kind: DataKind) -> tuple[Objective, Objective]:
    from largeforge.training.preference import ORPOObjective

    objective = ORPOObjective(beta=recipe.preference.beta)
    return objective, objective


def _simpo(recipe: Recipe, model: Any, device: Any,
           kind: DataKind) -> tuple[Objective, Objective]:
    from largeforge.training.preference import SimPOObjective

    objective = SimPOObjective(beta=recipe.preference.beta, gamma=recipe.preference.simpo_gamma)
    return objective, objective


def _distill(recipe: Recipe, model: Any, device: Any,
             kind: DataKind) -> tuple[Objective, Objective]:
    """The teacher, loaded frozen in evaluation mode, behind the distillation loss; the student
    is judged by its own next-token loss."""
    from largeforge.training.distill import DistillObjective

    if kind.lm_objective is None:
        raise LargeForgeError("distillation trains on text or instruction data, not on "
                              "preference pairs")
    cfg = recipe.distill
    teacher = load_model(str(cfg.teacher)).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    objective = DistillObjective(teacher, temperature=cfg.temperature, alpha=cfg.alpha,
                                 shifted=kind.name == "pretrain")
    return objective, kind.lm_objective


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "lm": ObjectiveSpec(_language_modelling),
    "dpo": ObjectiveSpec(_dpo, data_kind="preference", tunes_existing_model=True),
    "orpo": ObjectiveSpec(_orpo, data_kind="preference", tunes_existing_model=True),
    "simpo": ObjectiveSpec(_simpo, data_kind="preference", tunes_existing_model=True),
    "distill": ObjectiveSpec(_distill, needs=("distill.teacher", "--teacher"),
                             check_tokenizer=check_teacher_tokenizer),
}


def decide_data_kind(recipe: Recipe, *, sft: bool = False) -> str:
    """"pretrain", "instruction" or "preference", decided once per run. `sft`: only
    instruction data will do, and anything else is refused with what to do instead."""
    from largeforge.data.instruct_data import data_kind

    data = recipe.data
    wanted = OBJECTIVES[recipe.train.objective].data_kind
    if wanted is not None:
        return wanted
    try:
        kind = data_kind(data.train, data.format, data.text_field)
    except LargeForgeError as exc:
        if sft and "preference" in str(exc):
            raise _not_for_sft("preference") from None
        raise
    if sft and kind != "instruction":
        raise _not_for_sft("text")
    return kind


def _not_for_sft(fmt: str) -> LargeForgeError:
    if fmt == "preference":
        return LargeForgeError(
            "the dataset holds preference pairs (prompt/chosen/rejected), which train with DPO "
            "or ORPO, not SFT; SFT needs alpaca, sharegpt or messages records"
        )
    return LargeForgeError(
        "the dataset is plain text, which SFT cannot learn from: it needs alpaca "
        "(instruction/input/output), sharegpt (conversations) or messages records; to continue "
        "pretraining on text, use `largeforge train --data FILE --set model.from_pretrained=...`"
    )


def check_method(recipe: Recipe, kind: str) -> None:
    """LoRA and QLoRA adapt an existing model, as preference objectives tune one; an eval file
    is for instruction data."""
    objective = recipe.train.objective
    spec = OBJECTIVES[objective]
    if recipe.train.method != "full" and not recipe.model.from_pretrained:
        raise LargeForgeError(
            f"train.method={recipe.train.method} adapts an existing model: set "
            "model.from_pretrained (or --model) to a model directory, run or hub id"
        )
    if spec.needs is not None:
        key, flag = spec.needs
        section, name = key.split(".")
        if getattr(getattr(recipe, section), name) is None:
            raise LargeForgeError(f"train.objective={objective} needs {key} ({flag})")
    if spec.tunes_existing_model and not recipe.model.from_pretrained:
        raise LargeForgeError(
            f"train.objective={objective} tunes an existing (instruction-tuned) "
            "model: set model.from_pretrained (or --model)"
        )
    if recipe.data.eval and kind != "instruction":
        raise LargeForgeError(
            "data.eval is for instruction data; pretraining text is split by data.val_percent"
        )
