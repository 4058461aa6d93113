"""The one training loop, as a `Trainer` with phases.

    check       the data read by its kind, the objective and method checked, the run directory
                checked (nothing written yet)
    setup       tokenizer, corpus and model; the run directory claimed; optimizer, batches,
                objectives; a checkpoint restored
    train_step  one optimizer step over grad_accum micro-batches
    evaluate    validation loss, the best model kept, overfitting noticed
    save        a checkpoint
    finish      best weights put back, final/ saved, the run's end reported

Pretraining, SFT, DPO, ORPO, SimPO and distillation are all this loop: what is fed comes from the
data-kind table (`data_kinds.py`), what is optimised from the objective table
(`objective_table.py`). Everything the run tells the world goes through its observer.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from largeforge.atomic_files import lock_path, replace_path, temp_dir
from largeforge.config import Recipe
from largeforge.errors import LargeForgeError
from largeforge.hardware import detect_device, release_freed_memory, resolve_precision
from largeforge.models import ModelConfig, count_parameters, flops_per_token
from largeforge.runs import CHECKPOINTS_DIR, TOKENIZER_DIR, RunDir
from largeforge.training.checkpoint import (
    load_training_state,
    restore_rng_state,
    resuming_from,
    save_checkpoint,
)
from largeforge.training.data_kinds import DATA_KINDS, LoadedData
from largeforge.training.distributed import (
    Distributed,
    check_supported,
    eval_shard,
    grad_norm_value,
    is_sharded_checkpoint,
    load_checkpoint,
    load_full_weights,
    no_sync,
    run_device,
    save_model,
    shard_batches,
    wrap_model,
)
from largeforge.training.distributed import save_checkpoint as save_distributed_checkpoint
from largeforge.training.interrupt import StopRequest, stop_on_sigint
from largeforge.training.objective_table import OBJECTIVES, check_method, decide_data_kind
from largeforge.training.observer import NullObserver, RunObserver
from largeforge.training.optimization import compile_for_training, make_optimizer
from largeforge.training.preflight import tokenizer_for, verify
from largeforge.training.resources import check_batch_fits, check_new_model_fits, check_threads
from largeforge.training.run_claim import checkpoint_world_size, claim_run_dir
from largeforge.training.schedule import lr_at
from largeforge.training.setup import model_for_run
from largeforge.training.state import TrainResult, TrainState
from largeforge.training.steps import (
    Throughput,
    autocast_for,
    check_model_fits,
    check_seq_len,
    eval_sums,
    evaluate,
    hardware_summary,
    max_steps_for,
    median_of_windows,
    model_shape,
    peak_flops,
    ppl,
    reduce_step,
    set_generation_ids,
    to_device,
)

OVERFIT_RISE = 0.005  # a relative rise of eval loss below this is noise, not overfitting


class Trainer:
    """One run of the recipe. `train()` (loop.py) drives it: check, then setup, then steps with
    evaluations and checkpoints, then finish."""

    def __init__(self, recipe: Recipe, *, resume: str | Path | None = None,
                 overwrite: bool = False, sft: bool = False, console: Console | None = None,
                 dist: Distributed | None = None, observer: RunObserver | None = None) -> None:
        self.recipe = recipe
        self.resume, self.overwrite, self.sft = resume, overwrite, sft
        self.console = console or Console()
        self.say = self.console.print
        self.dist = dist or Distributed()
        self.observer = observer or NullObserver()
        self.state = TrainState()
        self.run_dir = _run_dir(recipe.run_dir, resume)
        self.run_lock: int | None = None  # the run directory's lock, once claimed

    # -- check ---------------------------------------------------------------------------------

    def check(self) -> None:
        """Read and check everything before touching the output directory: a run that fails to
        start must not have replaced (with --overwrite) or half-written anything."""
        recipe = self.recipe
        if not recipe.data.train:
            raise LargeForgeError("no training data: set data.train in the recipe or pass --data")
        kind = decide_data_kind(recipe, sft=self.sft)
        check_method(recipe, kind)
        check_supported(recipe, self.dist)
        check_threads(recipe.train.threads)
        self.kind = DATA_KINDS[kind]
        self.data: LoadedData = self.kind.load(recipe, self.say)
        self.checkpoint = claim_run_dir(self.run_dir, recipe, resume=self.resume,
                                        overwrite=self.overwrite, dry_run=True,
                                        world_size=self.dist.world_size,
                                        say=lambda line: self.say(line, soft_wrap=True))

    def verify(self) -> TrainResult:
        return verify(self.recipe, self.data, self.run_dir, self.say)

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything a run needs, checked and built before the run directory is claimed (the
        last thing here but restoring a checkpoint): a run that fails to start leaves nothing,
        and a tokenizer trained for the run waits in a staging directory until the claim."""
        cfg_t = self.recipe.train
        if cfg_t.threads:
            torch.set_num_threads(cfg_t.threads)
        self.device = run_device(self.dist, detect_device(cfg_t.device))
        self.precision = self._precision()
        checked = self.checkpoint
        with temp_dir(self.run_dir) as staging, resuming_from(checked):
            # Read before the claim: a damaged checkpoint fails with the run left as it was.
            saved = load_training_state(checked) if checked is not None else None
            self._tokenizer_corpus_model(staging)
            self._place_model()
            self.optimizer = make_optimizer(self.model, self.recipe, self.device)
            self._batches_and_objectives()
            self.dist.barrier()  # every rank has checked all before rank 0 claims the directory
            claimed = self.dist.on_main(lambda: self._claim(staging))
            self.checkpoint = claimed if self.dist.is_main else self.checkpoint
        if self.checkpoint is not None:
            self._restore(self.checkpoint, saved if self.checkpoint == checked else None)
        self._start()

    def _precision(self) -> str:
        """train.precision, with `auto` measured at the run's start only: a resumed run keeps
        the precision it started with (run.json), where a new measurement under load could
        pick another one."""
        cfg_t = self.recipe.train
        if cfg_t.precision == "auto" and self.checkpoint is not None:
            started = RunDir(self.run_dir).read_state().get("hardware") or {}
            kept = started.get("precision")
            if kept in ("fp32", "bf16", "fp16") and started.get("device") == self.device.type:
                self.say(f"precision {kept}, as the run started (train.precision auto)")
                return str(kept)
        return resolve_precision(cfg_t.precision, self.device)

    def _tokenizer_corpus_model(self, staging: Path) -> None:
        """Tokenizer, tokenised corpus and model: a model without weights or adapters that do
        not fit it fail here, before anything is written."""
        recipe, d = self.recipe, self.dist
        self.tokenizer = tokenizer_for(
            recipe, self.checkpoint, lambda: self.kind.texts(self.data, recipe), staging,
            self.say, d)
        self.corpus = self.kind.prepare(self.data, self.tokenizer, recipe, self.say)
        if recipe.model.from_pretrained is None and self.checkpoint is None:
            self._check_new_model(recipe.model.resolve(len(self.tokenizer)))
        check_tokenizer = OBJECTIVES[recipe.train.objective].check_tokenizer
        if check_tokenizer is not None:  # e.g. a teacher that must share the vocabulary
            check_tokenizer(recipe, self.tokenizer)
        torch.manual_seed(recipe.train.seed)
        # A sharded checkpoint is no model directory: the model is built as at the start
        # and its weights come from the shards once it is sharded.
        sharded = self.checkpoint is not None and is_sharded_checkpoint(self.checkpoint)
        self.model = model_for_run(recipe, None if sharded else self.checkpoint,
                                   self.tokenizer, self.precision)
        if d.rank > 0:  # every rank built the same model; dropout differs from here on
            torch.manual_seed(recipe.train.seed + d.rank)
        release_freed_memory()
        check_model_fits(self.model, self.tokenizer, recipe.data.seq_len)
        config = self.model.config
        check_batch_fits(recipe.train.batch_size, recipe.data.seq_len, config.hidden_size,
                         config.num_hidden_layers, self.device)

    def _check_new_model(self, shape: ModelConfig) -> None:
        """A model about to be built: its context, and that it and one micro-batch fit the
        device, before a byte of it is allocated."""
        check_seq_len(self.recipe.data.seq_len, shape.max_seq_len)
        check_new_model_fits(shape, self.device)
        check_batch_fits(self.recipe.train.batch_size, self.recipe.data.seq_len, shape.dim,
                         shape.n_layers, self.device)

    def _claim(self, staging: Path) -> Path | None:
        claimed = claim_run_dir(self.run_dir, self.recipe, resume=self.resume,
                                overwrite=self.overwrite, world_size=self.dist.world_size)
        # Held while this process trains the run: another start of it is refused meanwhile,
        # and once this process ends (even killed) the lock is gone with it.
        self.run_lock = lock_path(self.run_dir)
        self.observer.claimed(self.run_dir, self.recipe, resumed=claimed is not None)
        trained = staging / TOKENIZER_DIR
        if trained.is_dir():
            replace_path(trained, RunDir(self.run_dir).tokenizer)
        return claimed

    def release(self) -> None:
        """Let go of the run directory (the run ended, however)."""
        if self.run_lock is not None:
            os.close(self.run_lock)
            self.run_lock = None

    def _place_model(self) -> None:
        """The model on its device, in training mode, wrapped for several processes and
        compiled when asked."""
        recipe, model, d = self.recipe, self.model, self.dist
        self.say(self.corpus.summary())
        set_generation_ids(model, self.tokenizer)
        self.counts = counts = count_parameters(model)
        self.method = recipe.train.method if recipe.model.from_pretrained else "pretrain"
        self.say(
            f"model: {counts['total'] / 1e6:.2f}M parameters "
            f"({counts['embedding'] / 1e6:.2f}M in the embedding table), {model_shape(model)}; "
            f"{self.method}: {counts['trainable'] / 1e6:.3f}M trainable "
            f"({100 * counts['trainable'] / max(counts['total'], 1):.2f}%)"
        )
        if recipe.train.method != "qlora":  # a 4-bit model is placed when it is loaded
            model.to(self.device)
        if recipe.train.gradient_checkpointing:
            _enable_activation_checkpointing(model)
        model.train()
        self.runner = wrap_model(model, d, self.device)  # DDP around it, or sharded in place
        if recipe.train.compile:
            self.runner = compile_for_training(self.runner)
        # DDP's wrapper is for training steps; evaluation runs the model itself on each rank.
        self.eval_runner = model if d.mode == "ddp" else self.runner

    def _batches_and_objectives(self) -> None:
        recipe, d = self.recipe, self.dist
        batches, self.val = self.kind.batches(self.corpus, self.tokenizer, recipe)
        self.batches = shard_batches(batches, d)
        self.val_mine, self.val_counted = eval_shard(self.val, d)
        spec = OBJECTIVES[recipe.train.objective]
        self.objective, self.eval_objective = spec.build(recipe, self.model, self.device,
                                                         self.kind)
        self.max_steps = max_steps_for(recipe.train, len(self.batches), self.say, d.world_size)
        if d.enabled:
            b, a, w = recipe.train.batch_size, recipe.train.grad_accum, d.world_size
            self.say(f"distributed: {d.describe()}; global batch {b} per process x {a} "
                     f"accumulation x {w} processes = {b * a * w} sequences per step")

    def _restore(self, checkpoint: Path, saved: dict[str, Any] | None = None) -> None:
        d = self.dist
        saved = saved if saved is not None else load_training_state(checkpoint)
        if d.enabled:  # optimizer (and sharded model) state, this rank's RNG states
            load_checkpoint(d, checkpoint, self.model, self.optimizer, saved)
        else:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.batches.load_state_dict(saved["data"])
        self.state.restore(saved)
        if not d.enabled:
            restore_rng_state(saved["rng"])
        self.say(f"resumed from {checkpoint} at step {self.state.step}")
        written_by = checkpoint_world_size(checkpoint)
        if written_by != d.world_size:
            self.say(f"the checkpoint was written by {written_by} process(es); continuing on "
                     f"{d.world_size}")

    def _start(self) -> None:
        recipe, cfg_t, d = self.recipe, self.recipe.train, self.dist
        flops = flops_per_token(self.model, recipe.data.seq_len)
        peak = peak_flops(self.device, self.precision)
        self.throughput = Throughput(flops, peak, d.world_size)
        self.say(
            f"device {self.device.type}, precision {self.precision}, "
            f"{torch.get_num_threads()} threads; peak {peak / 1e9:,.0f} GFLOP/s measured"
        )
        self.observer.started(
            step=self.state.step, max_steps=self.max_steps, resumed=self.checkpoint is not None,
            method=self.method, parameters=self.counts["total"],
            trainable_parameters=self.counts["trainable"],
            hardware=hardware_summary(self.device, self.precision, peak, d),
        )
        self.autocast = autocast_for(self.device, self.precision)
        self.min_lr = cfg_t.min_lr if cfg_t.min_lr is not None else cfg_t.lr / 10
        self.warmup_steps = (math.ceil(cfg_t.warmup_ratio * self.max_steps)
                             if cfg_t.warmup_ratio is not None else cfg_t.warmup_steps)
        self.save_every = cfg_t.save_every or cfg_t.eval_every
        self.result = TrainResult(
            run_dir=self.run_dir, steps=self.state.step, parameters=self.counts["total"],
            device=self.device.type, precision=self.precision, rank=d.rank)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.train_loss_sum = torch.zeros((), device=self.device)  # since the last evaluation
        self.train_loss_steps = 0

    # -- steps ---------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Steps until max_steps, an early stop or a stop asked for with SIGINT, evaluating and
        saving as the recipe says."""
        self.throughput.restart()
        with stop_on_sigint(self.dist.world_size == 1, self.observer.message) as stop:
            return self._steps(stop)

    def _steps(self, stop: StopRequest) -> TrainResult:
        cfg_t = self.recipe.train
        try:
            while self.state.step < self.max_steps:
                record = self.train_step()
                step = self.state.step
                last = step == self.max_steps
                self.observer.logged(step, record)
                if record is not None:
                    self.throughput.restart()
                evaluated = step % cfg_t.eval_every == 0 or last
                if evaluated:
                    self.evaluate(step)
                patience = cfg_t.early_stopping_patience
                stop_early = bool(patience) and (
                    self.state.evals_without_improvement >= (patience or 0))
                if step % self.save_every == 0 or last or stop_early or stop.requested:
                    self.save(step)
                    self.observer.checkpointed(step, self.state.best_val_loss,
                                               self.state.best_step)
                if evaluated or step % self.save_every == 0:
                    self.throughput.restart()
                if stop_early:
                    self.result.stopped_early = True
                    self.observer.message(f"early stop at step {step}: no better val loss in "
                                          f"{patience} evaluations")
                    break
                if stop.requested and not last:
                    return self._interrupted(step)
        finally:
            self.observer.stopped()
        return self.finish()

    def _interrupted(self, step: int) -> TrainResult:
        """Stopped on request (SIGINT) with a checkpoint at `step`: no final/, status stopped."""
        result = self.result
        result.steps, result.interrupted = step, True
        result.best_dir = RunDir(self.run_dir).best if RunDir(self.run_dir).best.is_dir() else None
        result.best_val_loss = self.state.best_val_loss
        self.observer.interrupted(step, self.state.best_val_loss, self.state.best_step)
        return result

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step; the step's log record when it is a logging step."""
        cfg_t, d, state = self.recipe.train, self.dist, self.state
        step = state.step
        lr = lr_at(step, lr=cfg_t.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                   max_steps=self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        metrics: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro in range(cfg_t.grad_accum):
            batch = to_device(self.batches.next_batch(), self.device)
            tokens += batch["input_ids"].numel()
            with no_sync(self.runner, d, sync=micro == cfg_t.grad_accum - 1):
                with self.autocast:
                    loss, micro_metrics = self.objective(self.runner, batch)
                (loss / cfg_t.grad_accum).backward()
            loss_sum += loss.detach()
            for key, value in micro_metrics.items():  # averaged over the micro-batches
                metrics[key] = metrics.get(key, 0.0) + value / cfg_t.grad_accum
        if d.world_size > 1:  # the step's loss and metrics: means over ranks; tokens: sum
            loss_sum, metrics, tokens = reduce_step(d, loss_sum, metrics, tokens)
        self.train_loss_sum += loss_sum / cfg_t.grad_accum
        self.train_loss_steps += 1
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, cfg_t.grad_clip)
                     if cfg_t.grad_clip > 0 else None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step = step = step + 1
        state.tokens_seen += tokens
        self.throughput.tokens += tokens
        if step % cfg_t.log_every and step != self.max_steps:
            return None
        return self._step_record(step, loss_sum / cfg_t.grad_accum, lr, grad_norm, metrics)

    def _step_record(self, step: int, loss: torch.Tensor, lr: float, grad_norm: Any,
                     metrics: dict[str, torch.Tensor]) -> dict[str, Any]:
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise LargeForgeError(
                f"training diverged at step {step}: loss is {loss_value}; lower train.lr or "
                "raise train.warmup_steps"
            )
        speed, mfu = self.throughput.measure()
        return {
            "step": step, "loss": loss_value, "lr": lr,
            "grad_norm": grad_norm_value(grad_norm) if grad_norm is not None else None,
            "tokens": self.state.tokens_seen, "tokens_per_s": speed, "mfu": mfu,
            **{key: float(value) for key, value in metrics.items()},
        }

    def evaluate(self, step: int) -> float | None:
        """Validation loss; the best model so far kept in best/; a warning when validation loss
        rises while training loss falls."""
        if not self.val:
            return None
        d = self.dist
        if d.enabled:  # each rank its share; (loss sum, targets) summed over ranks
            sums = torch.tensor(
                eval_sums(self.eval_runner, self.val_mine, self.device, self.autocast,
                          self.eval_objective, self.val_counted),
                dtype=torch.float64, device=self.device,
            )
            total, count = d.all_reduce_sum(sums).tolist()
            val_loss = total / max(count, 1)
        else:
            val_loss = evaluate(self.runner, self.val, self.device, self.autocast,
                                self.eval_objective)
        self.observer.logged(step, {"step": step, "val_loss": val_loss, "val_ppl": ppl(val_loss)})
        self.result.last_val_loss = val_loss
        self._watch_overfitting(step, val_loss)
        state = self.state
        if state.best_val_loss is None or val_loss < state.best_val_loss:
            state.best_val_loss, state.best_step = val_loss, step
            state.evals_without_improvement = 0
            save_model(d, self.model, self.tokenizer, RunDir(self.run_dir).best)
        else:
            state.evals_without_improvement += 1
        return val_loss

    def _watch_overfitting(self, step: int, val_loss: float) -> None:
        steps_since = self.train_loss_steps
        train_loss = (self.train_loss_sum / max(steps_since, 1)).item()
        self.train_loss_sum, self.train_loss_steps = torch.zeros((), device=self.device), 0
        if steps_since and self.state.last_eval is not None:
            before_val, before_train = self.state.last_eval
            if val_loss > before_val * (1 + OVERFIT_RISE) and train_loss < before_train:
                self.result.overfitting_warnings += 1
                self.observer.message(
                    f"[yellow]warning[/]: at step {step} eval loss rose ({before_val:.4f} -> "
                    f"{val_loss:.4f}) while train loss fell ({before_train:.4f} -> "
                    f"{train_loss:.4f}): the model is starting to overfit; fewer epochs, more "
                    "data or train.early_stopping_patience help"
                )
        self.state.last_eval = (val_loss, train_loss)

    def save(self, step: int) -> None:
        """A checkpoint of the step: weights, optimizer, data position, counters, RNG."""
        cfg_t, d = self.recipe.train, self.dist
        training_state = dict(self.state.to_dict(), data=self.batches.state_dict(),
                              scheduler={"kind": "warmup-cosine", "step": step})
        if d.enabled:  # every rank takes part; rank 0 commits
            save_distributed_checkpoint(
                d, self.run_dir, step, self.model, self.optimizer, self.tokenizer,
                training_state, self.recipe.to_yaml(), keep=cfg_t.keep_checkpoints,
            )
            return
        save_checkpoint(
            self.run_dir, step, self.model, self.tokenizer,
            dict(training_state, optimizer=self.optimizer.state_dict()), self.recipe.to_yaml(),
            keep=cfg_t.keep_checkpoints,
        )

    # -- finish --------------------------------------------------------------------------------

    def finish(self) -> TrainResult:
        """final/ (the best evaluation's weights unless told otherwise), the result, and the
        run's end reported."""
        run, state, result = RunDir(self.run_dir), self.state, self.result
        if self.recipe.train.load_best_at_end and run.best.is_dir() and state.best_step not in (
            None, state.step
        ):
            load_full_weights(self.dist, self.model, run.best)
            self.say(
                f"final/ holds the best evaluation (step {state.best_step}, val loss "
                f"{state.best_val_loss:.4f}), not the last step (train.load_best_at_end)"
            )
        save_model(self.dist, self.model, self.tokenizer, run.final)
        result.steps = state.step
        result.final_dir = run.final
        result.best_dir = run.best if run.best.is_dir() else None
        result.best_val_loss = state.best_val_loss
        result.model = self.model
        result.tokens_per_s = median_of_windows(self.throughput.speeds)
        result.mfu = median_of_windows(self.throughput.mfus)
        self.observer.finished(result, state.best_step)
        return result


def _enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant checkpointing, which also works when the inputs need no gradient (a frozen
    embedding under LoRA). transformers 5.2x renamed the method (the old name warns)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _run_dir(run_dir: Path, resume: str | Path | None) -> Path:
    """The recipe's run directory, or the one a checkpoint or run directory to resume names."""
    if resume in (None, "latest"):
        return run_dir
    path = Path(str(resume))
    return path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path

