"""The one training loop.

Step, accumulation, clipping, schedule, evaluation, best-model tracking, checkpoints, logging and
early stopping are written here once. What is optimised is an objective function
(`objectives.py`); what is fed is a batch source with a `state_dict` (the data position).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from largeforge.config import Recipe, ResolvedRecipe
from largeforge.data.instruct_batches import PackedBatches, PaddedBatches
from largeforge.data.instruct_data import (
    conversation_texts,
    load_conversations,
    prepare_instruction_data,
)
from largeforge.data.loader import PretrainBatches, eval_batches
from largeforge.data.preference_data import (
    PreferenceBatches,
    eval_pair_batches,
    load_preferences,
    prepare_preference_data,
)
from largeforge.data.pretrain import prepare_pretraining_data
from largeforge.data.sources import iter_documents, resolve_sources
from largeforge.errors import LargeForgeError
from largeforge.hardware import (
    autocast_dtype,
    detect_device,
    device_name,
    installed_version,
    matmul_flops,
    memory_bytes,
    peak_fp32_flops,
    release_freed_memory,
    resolve_precision,
)
from largeforge.models import build_model, count_parameters, flops_per_token, load_model
from largeforge.registry import RunRecorder
from largeforge.tokenizer import MIN_VOCAB_SIZE, load_tokenizer, train_tokenizer
from largeforge.training.checkpoint import (
    checkpoint_world_size,
    load_training_state,
    restore_rng_state,
    save_checkpoint,
)
from largeforge.training.cross_entropy import IGNORE_INDEX
from largeforge.training.distributed import (
    Distributed,
    check_supported,
    collective_errors,
    eval_shard,
    grad_norm_value,
    init_distributed,
    is_sharded_checkpoint,
    load_checkpoint,
    load_full_weights,
    no_sync,
    run_device,
    save_model,
    shard_batches,
    shutdown,
    wrap_model,
)
from largeforge.training.distributed import save_checkpoint as save_distributed_checkpoint
from largeforge.training.logging import MetricsLogger, ProgressReporter
from largeforge.training.objectives import causal_lm_loss, instruction_loss
from largeforge.training.optimization import compile_for_training, make_optimizer
from largeforge.training.run_dir import claim_run_dir, write_run_state
from largeforge.training.schedule import lr_at
from largeforge.training.setup import (
    check_method,
    check_teacher_tokenizer,
    decide_data_kind,
    default_template,
    distill_objective,
    model_for_run,
    preference_objective,
)

Batch = dict[str, torch.Tensor]
OVERFIT_RISE = 0.005  # a relative rise of eval loss below this is noise, not overfitting
# (model, batch) -> (loss, metrics); metrics are detached tensors, read only when logged.
Objective = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_dir: Path | None = None
    best_dir: Path | None = None
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    stopped_early: bool = False
    tokens_per_s: float | None = None
    mfu: float | None = None
    parameters: int = 0
    verified_only: bool = False
    device: str = ""
    precision: str = ""
    overfitting_warnings: int = 0
    rank: int = 0  # this process's rank under torchrun: rank 0 reports
    model: Any = field(default=None, repr=False)  # the trained module, for library users


def train(
    recipe: Recipe | ResolvedRecipe,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    verify_only: bool = False,
    console: Console | None = None,
    sft: bool = False,
) -> TrainResult:
    """Pretrain (or continue pretraining) a causal LM as the recipe says.

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
        # The runs registry (largeforge.registry): the run is recorded once its directory is
        # claimed; an exception after that marks it failed. The recorder never raises.
        recorder: Any = RunRecorder(console) if d.is_main else _OtherRankRecorder()
        try:
            with collective_errors(d):
                result = _train(plain, resume=resume, overwrite=overwrite,
                                verify_only=verify_only, console=console, sft=sft,
                                recorder=recorder, dist=d)
            ok = True
            return result
        except BaseException as exc:
            _record_failure(recorder, exc)
            raise
    finally:
        shutdown(d, ok=ok)


class _OtherRankRecorder:
    """Ranks other than 0 leave the runs registry to rank 0."""

    record = None

    def start(self, *args: Any, **kwargs: Any) -> None:
        pass

    update = checkpoint = finish = fail = start


class _OtherRankLogger:
    """Ranks other than 0 leave metrics.jsonl and TensorBoard to rank 0."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _record_failure(recorder: RunRecorder, exc: BaseException) -> None:
    """Registry row and run.json say `failed`, with the message (runs that never started have
    neither)."""
    if recorder.record is None:
        return
    recorder.fail(exc)
    with contextlib.suppress(OSError, ValueError):
        write_run_state(Path(recorder.record.run_dir), status="failed",
                        error=recorder.record.error)


def _train(
    recipe: Recipe | ResolvedRecipe,
    *,
    resume: str | Path | None,
    overwrite: bool,
    verify_only: bool,
    console: Console,
    sft: bool,
    recorder: Any,
    dist: Distributed,
) -> TrainResult:
    if isinstance(recipe, ResolvedRecipe):
        recipe = recipe.recipe
    d = dist
    say = console.print
    cfg_t, cfg_d = recipe.train, recipe.data
    run_dir = recipe.run_dir
    if resume not in (None, "latest"):
        resume_path = Path(str(resume))
        run_dir = resume_path.parent.parent if resume_path.parent.name == "checkpoints" else (
            resume_path
        )

    if not cfg_d.train:
        raise LargeForgeError("no training data: set data.train in the recipe or pass --data")
    kind = decide_data_kind(recipe, sft=sft)
    check_method(recipe, kind)
    check_supported(recipe, d)
    sources = resolve_sources(cfg_d.train) if kind == "pretrain" else []
    # Check everything before touching the output directory: a run that fails to start must
    # not have replaced (with --overwrite) or half-written anything.
    checkpoint = claim_run_dir(run_dir, recipe, resume=resume, overwrite=overwrite, dry_run=True,
                               world_size=d.world_size)
    conversations: list = []
    eval_conversations: list = []
    fmt = ""
    if kind == "instruction":
        fmt, conversations = load_conversations(
            cfg_d.train, cfg_d.format, text_field=cfg_d.text_field, cache_dir=cfg_d.cache_dir
        )
        say(f"instruction data: {len(conversations):,} {fmt} conversations")
        if cfg_d.eval:
            _, eval_conversations = load_conversations(
                cfg_d.eval, cfg_d.format, text_field=cfg_d.text_field, cache_dir=cfg_d.cache_dir
            )
            say(f"eval data: {len(eval_conversations):,} conversations from {len(cfg_d.eval)} "
                "source(s)")
    preferences: list = []
    eval_preferences: list = []
    if kind == "preference":
        fmt = "preference"
        preferences = load_preferences(cfg_d.train, cache_dir=cfg_d.cache_dir)
        eval_preferences = (
            load_preferences(cfg_d.eval, cache_dir=cfg_d.cache_dir) if cfg_d.eval else []
        )
        say(f"preference data: {len(preferences):,} pairs"
            + (f", {len(eval_preferences):,} to evaluate on" if cfg_d.eval else ""))
        conversations = [pair["prompt"] + pair["chosen"] for pair in preferences]
    if verify_only:
        return _verify(recipe, sources, run_dir, say, conversations, fmt)
    if cfg_t.threads:
        torch.set_num_threads(cfg_t.threads)
    device = run_device(d, detect_device(cfg_t.device))
    precision = resolve_precision(cfg_t.precision, device)

    staging = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.tokenizer.", dir=_parent(run_dir)))
    try:
        texts = (
            (lambda: conversation_texts(conversations)) if kind != "pretrain" else
            (lambda: iter_documents(sources, text_field=cfg_d.text_field,
                                    doc_separator=cfg_d.doc_separator))
        )
        tokenizer = _tokenizer_for(recipe, checkpoint, texts, staging, say, d)
        corpus: Any
        if kind == "instruction":
            template = cfg_d.chat_template or default_template(recipe, fmt, tokenizer)
            corpus = prepare_instruction_data(
                fmt, conversations, tokenizer, seq_len=cfg_d.seq_len,
                chat_template=template, train_on_prompt=cfg_d.train_on_prompt,
                overlong=cfg_d.overlong, val_percent=0.0 if cfg_d.eval else cfg_d.val_percent,
            )
            if eval_conversations:
                corpus.val = prepare_instruction_data(
                    fmt, eval_conversations, tokenizer, seq_len=cfg_d.seq_len,
                    chat_template=template, train_on_prompt=cfg_d.train_on_prompt,
                    overlong=cfg_d.overlong, val_percent=0.0,
                ).train
            # Saved with every checkpoint, best/ and final/: generate, chat, serving and
            # exports use the template the model was trained with.
            tokenizer.chat_template = corpus.template
        elif kind == "preference":
            template = cfg_d.chat_template or default_template(recipe, fmt, tokenizer)
            corpus = prepare_preference_data(
                preferences, tokenizer, seq_len=cfg_d.seq_len, chat_template=template,
                val_percent=0.0 if cfg_d.eval else cfg_d.val_percent,
            )
            if eval_preferences:
                corpus.val = prepare_preference_data(
                    eval_preferences, tokenizer, seq_len=cfg_d.seq_len, chat_template=template,
                    val_percent=0.0,
                ).train
            tokenizer.chat_template = corpus.template
        else:
            corpus = prepare_pretraining_data(
                sources,
                tokenizer,
                text_field=cfg_d.text_field,
                doc_separator=cfg_d.doc_separator,
                val_percent=cfg_d.val_percent,
                split=cfg_d.split,
                cache_dir=cfg_d.cache_dir,
                log=lambda text: say(text),
            )
        if recipe.model.from_pretrained is None and checkpoint is None:
            _check_seq_len(cfg_d.seq_len, recipe.model.resolve(len(tokenizer)).max_seq_len)
        # The model too is loaded (or built) before the run directory is claimed: a model
        # without weights or adapters that do not fit it leave nothing behind.
        if cfg_t.objective == "distill":
            check_teacher_tokenizer(recipe, tokenizer)
        torch.manual_seed(cfg_t.seed)
        # A sharded checkpoint is no model directory: the model is built as at the start and
        # its weights come from the shards once it is sharded.
        sharded = checkpoint is not None and is_sharded_checkpoint(checkpoint)
        model = model_for_run(recipe, None if sharded else checkpoint, tokenizer, precision)
        if d.rank > 0:  # every rank built the same model; dropout differs from here on
            torch.manual_seed(cfg_t.seed + d.rank)
        release_freed_memory()
        _check_model_fits(model, tokenizer, cfg_d.seq_len)
        d.barrier()  # every rank has checked the run directory before rank 0 changes it

        def claim() -> Path | None:
            claimed = claim_run_dir(run_dir, recipe, resume=resume, overwrite=overwrite,
                                    world_size=d.world_size)
            recorder.start(run_dir, recipe, resumed=claimed is not None)  # runs registry
            if any(staging.iterdir()):
                staging.rename(run_dir / "tokenizer")
            return claimed

        claimed = d.on_main(claim)
        checkpoint = claimed if d.is_main else checkpoint
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(corpus.summary())
    _set_generation_ids(model, tokenizer)
    counts = count_parameters(model)
    method = cfg_t.method if recipe.model.from_pretrained else "pretrain"
    say(
        f"model: {counts['total'] / 1e6:.2f}M parameters "
        f"({counts['embedding'] / 1e6:.2f}M in the embedding table), {_shape(model)}; "
        f"{method}: {counts['trainable'] / 1e6:.3f}M trainable "
        f"({100 * counts['trainable'] / max(counts['total'], 1):.2f}%)"
    )
    if cfg_t.method != "qlora":  # a 4-bit model is placed when it is loaded
        model.to(device)
    if cfg_t.gradient_checkpointing:
        # Non-reentrant checkpointing also works when the inputs need no gradient (a frozen
        # embedding under LoRA).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    runner = wrap_model(model, d, device)  # DDP around it, or sharded in place (FSDP)
    if cfg_t.compile:
        runner = compile_for_training(runner)
    # DDP's wrapper is for training steps; evaluation runs the model itself on each rank.
    eval_runner = model if d.mode == "ddp" else runner

    optimizer = make_optimizer(model, recipe, device)
    batches, val, objective = _batch_sources(kind, corpus, tokenizer, recipe)
    batches = shard_batches(batches, d)
    val_mine, val_counted = eval_shard(val, d)
    if objective is None:
        objective = preference_objective(recipe, model)
    eval_objective = objective  # distillation is judged by the student's own loss
    if cfg_t.objective == "distill":
        objective = distill_objective(recipe, device, shifted=kind == "pretrain")
    max_steps = _max_steps(cfg_t, len(batches), say, d.world_size)
    if d.enabled:
        b, a, w = cfg_t.batch_size, cfg_t.grad_accum, d.world_size
        say(f"distributed: {d.describe()}; global batch {b} per process x {a} accumulation x "
            f"{w} processes = {b * a * w} sequences per step")

    state: dict[str, Any] = {
        "step": 0,
        "tokens_seen": 0,
        "best_val_loss": None,
        "best_step": None,
        "evals_without_improvement": 0,
        "last_eval": None,  # (val loss, mean train loss since the eval before), to warn
    }
    if checkpoint is not None:
        saved = load_training_state(checkpoint)
        if d.enabled:  # optimizer (and sharded model) state, this rank's RNG states
            load_checkpoint(d, checkpoint, model, optimizer, saved)
        else:
            optimizer.load_state_dict(saved["optimizer"])
        batches.load_state_dict(saved["data"])
        state.update({k: saved.get(k, state[k]) for k in state})
        if not d.enabled:
            restore_rng_state(saved["rng"])
        say(f"resumed from {checkpoint} at step {state['step']}")
        written_by = checkpoint_world_size(checkpoint)
        if written_by != d.world_size:
            say(f"the checkpoint was written by {written_by} process(es); continuing on "
                f"{d.world_size}")

    flops = flops_per_token(model, cfg_d.seq_len)
    peak = _peak_flops(device, precision)
    say(
        f"device {device.type}, precision {precision}, {torch.get_num_threads()} threads; "
        f"peak {peak / 1e9:,.0f} GFLOP/s measured"
    )
    logger: Any = (
        MetricsLogger(run_dir, resume_step=state["step"] if checkpoint else None) if d.is_main
        else _OtherRankLogger()
    )
    progress = ProgressReporter(max_steps, state["step"], console)
    if d.is_main:
        write_run_state(
            run_dir, status="running", step=state["step"], max_steps=max_steps, method=method,
            parameters=counts["total"], trainable_parameters=counts["trainable"],
            hardware=_hardware_summary(device, precision, peak, d),
            pid=os.getpid(), hostname=socket.gethostname(), error=None,  # `runs` tells dead runs
        )
    recorder.update(step=state["step"], max_steps=max_steps)  # runs registry
    autocast = _autocast(device, precision)
    min_lr = cfg_t.min_lr if cfg_t.min_lr is not None else cfg_t.lr / 10
    warmup_steps = (
        math.ceil(cfg_t.warmup_ratio * max_steps) if cfg_t.warmup_ratio is not None
        else cfg_t.warmup_steps
    )
    save_every = cfg_t.save_every or cfg_t.eval_every
    speeds: list[float] = []
    mfus: list[float] = []
    result = TrainResult(run_dir=run_dir, steps=state["step"], parameters=counts["total"],
                         device=device.type, precision=precision, rank=d.rank)
    params = [p for p in model.parameters() if p.requires_grad]

    def save(step: int) -> None:
        training_state = dict(
            state, data=batches.state_dict(), scheduler={"kind": "warmup-cosine", "step": step},
        )
        if d.enabled:  # every rank takes part; rank 0 commits
            save_distributed_checkpoint(
                d, run_dir, step, model, optimizer, tokenizer, training_state, recipe.to_yaml(),
                keep=cfg_t.keep_checkpoints,
            )
            return
        save_checkpoint(
            run_dir, step, model, tokenizer, dict(training_state, optimizer=optimizer.state_dict()),
            recipe.to_yaml(), keep=cfg_t.keep_checkpoints,
        )

    train_loss_sum = torch.zeros((), device=device)
    train_loss_steps = 0

    def run_eval(step: int) -> float | None:
        nonlocal train_loss_sum, train_loss_steps
        if not val:
            return None
        if d.enabled:  # each rank its share; (loss sum, targets) summed over ranks
            sums = torch.tensor(
                _eval_sums(eval_runner, val_mine, device, autocast, eval_objective, val_counted),
                dtype=torch.float64, device=device,
            )
            total, count = d.all_reduce_sum(sums).tolist()
            val_loss = total / max(count, 1)
        else:
            val_loss = evaluate(runner, val, device, autocast, eval_objective)
        record = {"step": step, "val_loss": val_loss, "val_ppl": _ppl(val_loss)}
        logger.log(record)
        progress.update(step, record)
        result.last_val_loss = val_loss
        steps_since = train_loss_steps
        train_loss = (train_loss_sum / max(steps_since, 1)).item()
        train_loss_sum, train_loss_steps = torch.zeros((), device=device), 0
        if steps_since and state["last_eval"] is not None:
            before_val, before_train = state["last_eval"]
            if val_loss > before_val * (1 + OVERFIT_RISE) and train_loss < before_train:
                result.overfitting_warnings += 1
                progress.message(
                    f"[yellow]warning[/]: at step {step} eval loss rose ({before_val:.4f} -> "
                    f"{val_loss:.4f}) while train loss fell ({before_train:.4f} -> "
                    f"{train_loss:.4f}): the model is starting to overfit; fewer epochs, more "
                    "data or train.early_stopping_patience help"
                )
        state["last_eval"] = (val_loss, train_loss)
        if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
            state.update(best_val_loss=val_loss, best_step=step, evals_without_improvement=0)
            save_model(d, model, tokenizer, run_dir / "best")
        else:
            state["evals_without_improvement"] += 1
        return val_loss

    window_start = time.perf_counter()
    window_tokens = 0
    try:
        while state["step"] < max_steps:
            step = state["step"]
            lr = lr_at(step, lr=cfg_t.lr, min_lr=min_lr, warmup_steps=warmup_steps,
                       max_steps=max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            step_metrics: dict[str, torch.Tensor] = {}
            tokens_this_step = 0
            for micro in range(cfg_t.grad_accum):
                batch = _to_device(batches.next_batch(), device)
                tokens_this_step += batch["input_ids"].numel()
                with no_sync(runner, d, sync=micro == cfg_t.grad_accum - 1):
                    with autocast:
                        loss, metrics = objective(runner, batch)
                    (loss / cfg_t.grad_accum).backward()
                loss_sum += loss.detach()
                for key, value in metrics.items():  # averaged over the micro-batches
                    step_metrics[key] = step_metrics.get(key, 0.0) + value / cfg_t.grad_accum
            if d.world_size > 1:  # the step's loss and metrics: means over ranks; tokens: sum
                loss_sum, step_metrics, tokens_this_step = _reduce_step(
                    d, loss_sum, step_metrics, tokens_this_step
                )
            train_loss_sum += loss_sum / cfg_t.grad_accum
            train_loss_steps += 1
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(params, cfg_t.grad_clip)
                if cfg_t.grad_clip > 0 else None
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            state["tokens_seen"] += tokens_this_step
            window_tokens += tokens_this_step
            last = step == max_steps

            if step % cfg_t.log_every == 0 or last:
                loss_value = (loss_sum / cfg_t.grad_accum).item()
                if not math.isfinite(loss_value):
                    raise LargeForgeError(
                        f"training diverged at step {step}: loss is {loss_value}; lower train.lr"
                        " or raise train.warmup_steps"
                    )
                elapsed = time.perf_counter() - window_start
                speed = window_tokens / max(elapsed, 1e-9)
                mfu = flops * speed / (peak * d.world_size)
                speeds.append(speed)
                mfus.append(mfu)
                record = {
                    "step": step, "loss": loss_value, "lr": lr,
                    "grad_norm": grad_norm_value(grad_norm) if grad_norm is not None else None,
                    "tokens": state["tokens_seen"], "tokens_per_s": speed, "mfu": mfu,
                    **{key: float(value) for key, value in step_metrics.items()},
                }
                logger.log(record)
                progress.update(step, record)
                window_start, window_tokens = time.perf_counter(), 0
            else:
                progress.update(step, None)

            evaluated = step % cfg_t.eval_every == 0 or last
            if evaluated:
                run_eval(step)
            patience = cfg_t.early_stopping_patience
            stop_early = bool(patience) and state["evals_without_improvement"] >= (patience or 0)
            if step % save_every == 0 or last or stop_early:
                save(step)
                if d.is_main:
                    write_run_state(run_dir, status="running", step=step)
                recorder.checkpoint(run_dir, step, state["best_val_loss"], state["best_step"])
            if evaluated or step % save_every == 0:
                window_start, window_tokens = time.perf_counter(), 0
            if stop_early:
                result.stopped_early = True
                progress.message(
                    f"early stop at step {step}: no better val loss in {patience} evaluations"
                )
                break
    finally:
        progress.close()
        logger.close()

    best_dir = run_dir / "best"
    if cfg_t.load_best_at_end and best_dir.is_dir() and state["best_step"] not in (
        None, state["step"]
    ):
        load_full_weights(d, model, best_dir)
        say(
            f"final/ holds the best evaluation (step {state['best_step']}, val loss "
            f"{state['best_val_loss']:.4f}), not the last step (train.load_best_at_end)"
        )
    save_model(d, model, tokenizer, run_dir / "final")
    result.steps = state["step"]
    result.final_dir = run_dir / "final"
    result.best_dir = run_dir / "best" if (run_dir / "best").is_dir() else None
    result.best_val_loss = state["best_val_loss"]
    result.model = model
    result.tokens_per_s = _median(speeds)
    result.mfu = _median(mfus)
    if not d.is_main:
        return result
    write_run_state(
        run_dir, status="stopped_early" if result.stopped_early else "completed",
        step=result.steps, best_val_loss=result.best_val_loss, best_step=state["best_step"],
        last_val_loss=result.last_val_loss, median_tokens_per_s=result.tokens_per_s,
        median_mfu=result.mfu,
    )
    recorder.finish(  # runs registry
        run_dir, "stopped_early" if result.stopped_early else "completed", result.steps,
        state["best_val_loss"], state["best_step"],
    )
    _write_report(run_dir, say)
    return result


def _write_report(run_dir: Path, say: Callable[..., None]) -> None:
    """report.html at the end of every run. The run itself is done and saved: a report that
    cannot be written is a warning (`largeforge runs report` writes it again), not a failure."""
    from largeforge.evaluation.report import write_run_report

    try:
        path = write_run_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - any failure here must not fail a finished run
        say(f"[yellow]warning[/]: could not write the run report: {exc}")
        return
    say(f"report: {path}")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: list[Any],
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    objective: Objective = causal_lm_loss,
) -> float:
    """Mean loss over fixed evaluation batches, weighted by each batch's target tokens."""
    total, count = _eval_sums(model, batches, device, autocast, objective)
    return total / max(count, 1)


@torch.no_grad()
def _eval_sums(
    model: torch.nn.Module,
    batches: list[Any],
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    objective: Objective = causal_lm_loss,
    counted: int | None = None,
) -> tuple[float, int]:
    """(sum of loss x targets, targets) over the first `counted` batches (default all); the
    others only run (an FSDP rank keeps step with the rest)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for index, raw in enumerate(batches):
        batch = _to_device(raw, device)
        targets = int((batch["labels"] != IGNORE_INDEX).sum())
        with autocast or contextlib.nullcontext():
            loss, _ = objective(model, batch)
        if counted is None or index < counted:
            total += loss.item() * targets
            count += targets
    model.train(was_training)
    return total, count


def _reduce_step(
    d: Distributed, loss_sum: torch.Tensor, metrics: dict[str, Any], tokens: int
) -> tuple[torch.Tensor, dict[str, Any], int]:
    """One all-reduce for the step: the loss and metrics averaged over ranks (so the logged
    loss is the global batch's), the tokens summed."""
    keys = list(metrics)
    packed = torch.stack([
        loss_sum.detach().double(), torch.tensor(float(tokens), device=loss_sum.device).double(),
        *[torch.as_tensor(metrics[k], device=loss_sum.device).detach().double() for k in keys],
    ])
    d.all_reduce_sum(packed)
    loss = (packed[0] / d.world_size).to(loss_sum.dtype)
    reduced = {k: (packed[2 + i] / d.world_size).float() for i, k in enumerate(keys)}
    return loss, reduced, int(packed[1].item())


def _to_device(batch: Any, device: torch.device) -> Batch:
    """Pretraining batches are (x, y) pairs; instruction batches are dicts."""
    if isinstance(batch, tuple):
        batch = {"input_ids": batch[0], "labels": batch[1]}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _batch_sources(
    kind: str, corpus: Any, tokenizer: Any, recipe: Recipe
) -> tuple[Any, list[Any], Objective | None]:
    """(training batches with a resumable position, fixed eval batches, objective)."""
    cfg_d, cfg_t = recipe.data, recipe.train
    if kind == "pretrain":
        return (
            PretrainBatches(corpus.train, cfg_d.seq_len, cfg_t.batch_size, cfg_t.seed),
            eval_batches(corpus.val, cfg_d.seq_len, cfg_t.batch_size, cfg_t.eval_batches),
            causal_lm_loss,
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if kind == "preference":  # the objective needs the model (its reference): built later
        return (
            PreferenceBatches(corpus.train, cfg_t.batch_size, cfg_t.seed, pad_id=pad),
            eval_pair_batches(corpus.val, cfg_t.batch_size, cfg_t.eval_batches, pad),
            None,
        )
    train_batches: Any = (
        PackedBatches(corpus.train, cfg_d.seq_len, cfg_t.batch_size, cfg_t.seed, pad_id=pad)
        if cfg_d.packing else PaddedBatches(corpus.train, cfg_t.batch_size, cfg_t.seed, pad_id=pad)
    )
    val: list[Any] = []
    if corpus.val:
        fixed = PaddedBatches(corpus.val, cfg_t.batch_size, 0, pad_id=pad, group_by_length=False)
        val = [fixed.next_batch() for _ in range(min(cfg_t.eval_batches, len(fixed)))]
    return train_batches, val, instruction_loss


def _max_steps(
    cfg_t: Any, batches_per_epoch: int, say: Callable[..., None], world_size: int = 1
) -> int:
    """train.max_steps, or the steps of train.num_epochs passes over the data when set (a step
    takes grad_accum batches on each of `world_size` processes)."""
    if cfg_t.num_epochs is None:
        return int(cfg_t.max_steps)
    per_epoch = max(1, math.ceil(batches_per_epoch / (cfg_t.grad_accum * world_size)))
    steps = max(1, math.ceil(cfg_t.num_epochs * per_epoch))
    say(f"{cfg_t.num_epochs:g} epoch(s) of {per_epoch} steps: {steps} steps")
    return steps


def _verify(
    recipe: Recipe, sources: list, run_dir: Path, say: Callable[..., None],
    conversations: list, fmt: str,
) -> TrainResult:
    """Everything `train` would check before its first step, without training."""
    if not sources:
        n_chars = sum(len(text) for text in conversation_texts(conversations))
        say(f"data: {len(conversations):,} conversations, {n_chars:,} characters")
    else:
        stats: dict[str, int] = {}
        n_chars = 0
        for text in iter_documents(
            sources, text_field=recipe.data.text_field, doc_separator=recipe.data.doc_separator,
            stats=stats,
        ):
            n_chars += len(text)
        if stats.get("documents", 0) == 0:
            raise LargeForgeError("the training data holds no non-empty document")
        say(f"data: {len(sources)} source(s), {stats['documents']:,} documents, "
            f"{n_chars:,} characters")
    if recipe.tokenizer.path or recipe.model.from_pretrained:
        from largeforge.runs import resolve_model_dir

        source = recipe.tokenizer.path or resolve_model_dir(str(recipe.model.from_pretrained))
        tokenizer = load_tokenizer(source)
        vocab = len(tokenizer)
        say(f"tokenizer: {source}, {vocab} tokens")
        if conversations and not recipe.data.chat_template:
            default_template(recipe, fmt, tokenizer)
    else:
        vocab = recipe.tokenizer.vocab_size
        if vocab < MIN_VOCAB_SIZE:
            raise LargeForgeError(
                f"tokenizer.vocab_size {vocab} is too small: a byte-level BPE needs at least "
                f"{MIN_VOCAB_SIZE} (256 bytes + the special tokens)"
            )
        say(f"tokenizer: will train a {vocab}-token byte-level BPE")
    if recipe.model.from_pretrained:
        model = load_model(recipe.model.from_pretrained)
        if recipe.train.method != "full":
            from largeforge.adapters import check_target_modules

            check_target_modules(model, list(recipe.lora.target_modules))
    else:
        with torch.device("meta"):
            model = build_model(recipe.model.resolve(vocab))
    _check_seq_len(recipe.data.seq_len, model.config.max_position_embeddings)
    counts = count_parameters(model)
    say(f"model: {counts['total'] / 1e6:.2f}M parameters, {_shape(model)}")
    say(f"output: {run_dir} is free to use" if not run_dir.exists() else f"output: {run_dir} ok")
    say("[green]verified: ready to train[/]")
    return TrainResult(run_dir=run_dir, steps=0, parameters=counts["total"], verified_only=True)


def _tokenizer_for(
    recipe: Recipe, checkpoint: Path | None, texts: Callable[[], Any], staging: Path,
    say: Callable[..., None], d: Distributed | None = None,
) -> Any:
    """The checkpoint's tokenizer, the recipe's, the base model's, or one trained now (into
    `staging`, moved into the run directory once the run starts). With several processes, rank
    0 trains it and the others load it from rank 0's staging directory."""
    if checkpoint is not None:
        return load_tokenizer(checkpoint)
    if recipe.tokenizer.path:
        return load_tokenizer(recipe.tokenizer.path)
    if recipe.model.from_pretrained:
        from largeforge.runs import resolve_model_dir

        return load_tokenizer(resolve_model_dir(recipe.model.from_pretrained))
    d = d or Distributed()

    def train_here() -> Any:
        say(f"training a {recipe.tokenizer.vocab_size}-token byte-level BPE tokenizer ...")
        started = time.perf_counter()
        shutil.rmtree(staging)
        trained = train_tokenizer(
            texts(),
            recipe.tokenizer.vocab_size,
            staging,
            min_frequency=recipe.tokenizer.min_frequency,
        )
        say(f"tokenizer: {len(trained)} tokens in {time.perf_counter() - started:.1f}s")
        return trained

    tokenizer = d.on_main(train_here)
    where = d.broadcast(str(staging))
    return tokenizer if d.is_main else load_tokenizer(where)


def _parent(run_dir: Path) -> Path:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return run_dir.parent


def _check_seq_len(seq_len: int, max_len: int) -> None:
    if seq_len > max_len:
        raise LargeForgeError(
            f"data.seq_len {seq_len} is above the model's maximum sequence length "
            f"{max_len}; lower data.seq_len or raise model.max_seq_len"
        )


def _check_model_fits(model: torch.nn.Module, tokenizer: Any, seq_len: int) -> None:
    cfg = model.config
    _check_seq_len(seq_len, cfg.max_position_embeddings)
    if cfg.vocab_size < len(tokenizer):
        raise LargeForgeError(
            f"the model's vocabulary ({cfg.vocab_size}) is smaller than the tokenizer's "
            f"({len(tokenizer)})"
        )


def _set_generation_ids(model: Any, tokenizer: Any) -> None:
    """So `generate` in transformers (and ours) stops at our EOS."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(model.config, name, value)
            setattr(model.generation_config, name, value)


def _shape(model: Any) -> str:
    c = model.config
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    ffn = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or "4x"
    return (
        f"{c.model_type}: dim {c.hidden_size}, {c.num_hidden_layers} layers, "
        f"{c.num_attention_heads} heads ({kv} kv), ffn {ffn}, vocab {c.vocab_size}, "
        f"max seq {c.max_position_embeddings}"
    )


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _peak_flops(device: torch.device, precision: str) -> float:
    dtype = autocast_dtype(precision)
    if dtype is None:
        return peak_fp32_flops(device)
    n = 4096 if device.type == "cuda" else 1024
    return matmul_flops(device, dtype, n=n)


def _hardware_summary(
    device: torch.device, precision: str, peak: float, d: Distributed | None = None
) -> dict[str, Any]:
    """What the run ran on (one process's share, and how many there were), for run.json and the
    run's report."""
    import os
    import platform

    memory = memory_bytes()
    processes = {"distributed": d.mode, "processes": d.world_size} if d and d.enabled else {}
    return {
        **processes,
        "device": device.type, "device_name": device_name(device), "precision": precision,
        "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "peak_gflops": round(peak / 1e9, 1), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": installed_version("transformers"),
        "peft": installed_version("peft"),
    }


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _median(values: list[float]) -> float | None:
    # The first logging window includes warm-up; leave it out when there are others.
    usable = values[1:] if len(values) > 2 else values
    if not usable:
        return None
    ordered = sorted(usable)
    return ordered[len(ordered) // 2]
