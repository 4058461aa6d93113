"""`Trainer`: a recipe's whole life from Python: train, then evaluate and export the result.

    from largeforge import Trainer

    trainer = Trainer(config_file="recipes/pretrain-tiny.yaml", overrides=["train.max_steps=200"])
    result = trainer.train()                       # as `largeforge train --config ...`
    trainer.evaluate("held-out.txt")               # as `largeforge eval --model <run>`
    trainer.export(format="onnx", output="model-onnx/")   # as `largeforge export <run>`

Each method is the library function its command uses (`train`, `evaluate`, `export`) applied
to the recipe or to the run it trains; nothing here trains, measures or writes by itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class Trainer:
    """Train the recipe in `config_file` (a YAML file, or a mapping) with `overrides`
    (`["train.max_steps=200", ...]`, as `--set`), then evaluate or export the trained model.

    `environ`: recipe values from the environment (LARGEFORGE_TRAIN__LR=...); default
    `os.environ`, `{}` to ignore it. `console`: a rich Console for progress (default: stdout).
    """

    def __init__(
        self,
        config_file: str | Path | Mapping[str, Any] | None = None,
        *,
        overrides: Sequence[str] = (),
        environ: Mapping[str, str] | None = None,
        console: Any = None,
    ) -> None:
        from largeforge.config import load_recipe

        self.resolved = load_recipe(config_file, overrides=overrides, environ=environ)
        self.console = console
        self.result: Any = None  # the TrainResult once `train` has run

    @property
    def recipe(self) -> Any:
        """The resolved `Recipe`."""
        return self.resolved.recipe

    @property
    def model_dir(self) -> Path:
        """What `evaluate` and `export` use: the trained model (`final_dir`) after `train`, else
        the recipe's run directory (a run trained before)."""
        if self.result is not None:
            return Path(self.result.final_dir)
        return Path(self.recipe.run_dir)

    def train(self, *, resume: str | Path | None = None, overwrite: bool = False) -> Any:
        """Train (or, with `resume`, continue) the run; returns the `TrainResult`."""
        from largeforge.training.loop import train

        self.result = train(self.resolved, resume=resume, overwrite=overwrite,
                            console=self.console)
        return self.result

    def evaluate(self, data: str | Path | None = None, metrics: str | Sequence[str] = "perplexity",
                 **options: Any) -> Any:
        """`largeforge.evaluate` on the trained model; returns an `Evaluation`."""
        from largeforge.evaluation.evaluate import evaluate

        return evaluate(str(self.model_dir), data, metrics, **options)

    def export(self, format: str, output: str | Path, **options: Any) -> Path:
        """`largeforge.export_model` of the trained model as `format` to `output`; returns the
        path written."""
        from largeforge.export.dispatch import export_model

        return export_model(str(self.model_dir), format, output, **options)
