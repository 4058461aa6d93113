"""`train`: the library's entry to the one training loop (`trainer.Trainer`).

It joins the process group under torchrun, gives rank 0 the run observer (console, logs,
`run.json`, registry, report) and the other ranks a silent one, runs the trainer's phases and
records a failure before it propagates.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from largeforge.config import Recipe, ResolvedRecipe
from largeforge.hardware import detect_device
from largeforge.training.distributed import collective_errors, init_distributed, shutdown
from largeforge.training.observer import NullObserver, RunObserver
from largeforge.training.state import TrainResult
from largeforge.training.trainer import Trainer


def _write_report(run_dir: Path) -> Path:
    from largeforge.runs.report import write_run_report

    return write_run_report(run_dir)


def train(
    recipe: Recipe | ResolvedRecipe,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    verify_only: bool = False,
    console: Console | None = None,
    sft: bool = False,
) -> TrainResult:
    """Train as the recipe says: pretraining, SFT, DPO/ORPO/SimPO or distillation.

    `resume`: "latest" for the run's latest checkpoint, or a checkpoint / run directory.
    `verify_only`: check data, tokenizer, model and output directory, then return.
    `sft`: the data must be instruction or chat records (`train sft`, `SFTTrainer`).
    """
    console = console or Console()
    plain = recipe.recipe if isinstance(recipe, ResolvedRecipe) else recipe
    # Under torchrun (or with train.distributed set) this process joins the process group;
    # rank 0 alone prints, logs and records, the others train alongside it.
    d = init_distributed(plain.train.distributed, detect_device(plain.train.device),
                         plain.train.dist_timeout)
    ok = False
    try:
        if not d.is_main:
            console = Console(quiet=True)
        observer = RunObserver(console, _write_report) if d.is_main else NullObserver()
        trainer = Trainer(plain, resume=resume, overwrite=overwrite, sft=sft, console=console,
                          dist=d, observer=observer)
        try:
            with collective_errors(d):
                trainer.check()
                if verify_only:
                    result = trainer.verify()
                else:
                    trainer.setup()
                    result = trainer.fit()
            ok = True
            return result
        except BaseException as exc:
            observer.failed(exc)
            raise
        finally:
            trainer.release()
    finally:
        shutdown(d, ok=ok)
