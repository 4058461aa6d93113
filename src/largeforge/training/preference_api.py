"""`DPOTrainer`, `ORPOTrainer` and `SimPOTrainer`: preference optimisation from Python, in the
spirit of TRL's.

They are `SFTTrainer` with the recipe's `train.objective` set to dpo, orpo or simpo and the
`preference.*` keys from their arguments: the same recipe layers (`resolve_sft_recipe`, so the
lower preference learning rates apply) and the one training loop (`loop.train`), exactly as
`largeforge train dpo` / `train orpo` build and run them. The data are preference records
(prompt/chosen/rejected, or hh-rlhf chosen/rejected dialogues):

    from largeforge import DPOTrainer

    DPOTrainer(model="runs/my-sft/final", train_dataset="pairs.jsonl", beta=0.1,
               output_dir="runs/my-dpo").train()
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from largeforge.training.sft import SFTTrainer


class _PreferenceTrainer(SFTTrainer):
    """An SFTTrainer whose recipe optimises `objective` on preference pairs."""

    objective: str = ""

    def __init__(
        self,
        model: Any,
        train_dataset: Any,
        *,
        output_dir: str | Path,
        beta: float | None = None,
        overrides: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        own = [f"train.objective={self.objective}"]
        if beta is not None:
            own.append(f"preference.beta={beta!r}")
        own += self._extra_overrides()
        # Ahead of the caller's own `overrides`, which can still change any of them.
        super().__init__(model, train_dataset, output_dir=output_dir,
                         overrides=[*own, *overrides], **kwargs)

    def _extra_overrides(self) -> list[str]:
        return []

    def train(self, *, resume: str | Path | None = None, overwrite: bool = False) -> Any:
        """Run the training; returns a `TrainResult` (final_dir holds the model or adapter)."""
        from largeforge.training.loop import train

        return train(self.resolved, resume=resume, overwrite=overwrite, console=self.console,
                     sft=False)


class DPOTrainer(_PreferenceTrainer):
    """Direct preference optimisation of `model` on `train_dataset` (chosen/rejected pairs);
    `.train()` runs it and returns a `TrainResult`.

    `beta` is the KL strength (default 0.1); `loss_type` "sigmoid" (default) or "ipo";
    `label_smoothing` for conservative DPO. LoRA runs use the base with the adapters off as the
    reference model, full runs a frozen copy. Every other argument is `SFTTrainer`'s (`model`,
    `train_dataset`, `output_dir`, `eval_dataset`, `tokenizer`, `lora_config`, `qlora`,
    `method`, `num_epochs`, `max_steps`, `learning_rate`, `batch_size`, `grad_accum`, `seq_len`,
    `chat_template`, `precision`, `config`, `overrides`, `console`)."""

    objective = "dpo"

    def __init__(
        self,
        model: Any,
        train_dataset: Any,
        *,
        output_dir: str | Path,
        beta: float | None = None,
        loss_type: str | None = None,
        label_smoothing: float | None = None,
        **kwargs: Any,
    ) -> None:
        self._loss_type = loss_type
        self._label_smoothing = label_smoothing
        super().__init__(model, train_dataset, output_dir=output_dir, beta=beta, **kwargs)

    def _extra_overrides(self) -> list[str]:
        extra = []
        if self._loss_type is not None:
            extra.append(f"preference.loss_type={self._loss_type}")
        if self._label_smoothing is not None:
            extra.append(f"preference.label_smoothing={self._label_smoothing!r}")
        return extra


class ORPOTrainer(_PreferenceTrainer):
    """ORPO of `model` on `train_dataset` (chosen/rejected pairs): the SFT loss on the chosen
    completions plus `beta` (default 0.1) times the odds-ratio loss; no reference model.
    `.train()` runs it and returns a `TrainResult`. Every other argument is `SFTTrainer`'s."""

    objective = "orpo"


class SimPOTrainer(_PreferenceTrainer):
    """SimPO of `model` on `train_dataset` (chosen/rejected pairs): the length-normalised
    log-likelihood margin, scaled by `beta`, must beat `gamma` (`preference.simpo_gamma`,
    default 0.5); no reference model. `.train()` runs it and returns a `TrainResult`. Every
    other argument is `SFTTrainer`'s."""

    objective = "simpo"

    def __init__(self, model: Any, train_dataset: Any, *, output_dir: str | Path,
                 beta: float | None = None, gamma: float | None = None, **kwargs: Any) -> None:
        self._gamma = gamma
        super().__init__(model, train_dataset, output_dir=output_dir, beta=beta, **kwargs)

    def _extra_overrides(self) -> list[str]:
        return [] if self._gamma is None else [f"preference.simpo_gamma={self._gamma!r}"]
