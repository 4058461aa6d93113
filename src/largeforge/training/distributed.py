"""Training on several processes with torch.distributed: DDP and FSDP2.

The same recipe runs under `torchrun --nproc_per_node=N -m largeforge train ...` (or `largeforge
train ... --nproc N`, which launches torchrun). torchrun starts one process per device and tells
each its rank through RANK, WORLD_SIZE and LOCAL_RANK; the loop (`loop.py`) stays one loop and asks
this module for what differs:

- **Process group**: nccl on CUDA, gloo on CPU, with `train.dist_timeout` seconds before a stuck
  collective fails. `train.distributed: ddp` or `fsdp` without torchrun runs as a group of one.
- **Data**: every rank walks the same seeded batch order; of each `world_size` consecutive
  micro-batches rank r trains on the r-th and skips the others (`ShardedBatches`). A step on W
  ranks with accumulation A therefore sees the W x A micro-batches that one process with
  accumulation W x A sees, without overlap, and the data position is the same on every rank.
- **DDP** (`ddp`): every rank holds the whole model; gradients are averaged across ranks (only
  trainable ones, so LoRA reduces only its adapters). Checkpoints are the usual HF directories,
  written by rank 0, plus each rank's RNG states (`rng-rank{r}.pt`).
- **FSDP2** (`fsdp`, `fully_shard` on every decoder block and the root): parameters, gradients and
  optimizer state are sharded. A checkpoint holds `sharded/` (torch.distributed.checkpoint: each
  rank writes its own shards; loading reshards, so a run may resume on another number of
  processes), `model_config/` (config.json, generation_config.json), the tokenizer and the
  training state. `best/` and `final/` are gathered on rank 0 into HF directories, and
  `consolidate_checkpoint` turns any sharded checkpoint into one.
- **Rank 0** logs, evaluates' results, writes run.json, the registry and the report; the others
  wait at barriers where they must.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from largeforge.damaged_files import DamagedFileError, check_model_files
from largeforge.errors import LargeForgeError
from largeforge.runs import DISTRIBUTED_FILE, LATEST_FILE, RunDir, is_model_dir
from largeforge.training.checkpoint import (
    capture_rng_state,
    checkpoint_remedy,
    commit_checkpoint,
    load_torch_file,
    new_checkpoint_dir,
    restore_rng_state,
    save_model_dir,
    write_checkpoint_state,
    write_model_files,
)

SHARDED_DIR = "sharded"  # torch.distributed.checkpoint: model and optimizer shards
MODEL_CONFIG_DIR = "model_config"  # config.json + generation_config.json of a sharded checkpoint
RANK_RNG_FILE = "rng-rank{rank}.pt"
MODES = ("auto", "none", "ddp", "fsdp")
T = TypeVar("T")


@dataclass
class Distributed:
    """Where this process stands: the mode, its rank and how many there are. `mode` "none" is
    the one-process run, and every method is then a no-op."""

    mode: str = "none"  # none | ddp | fsdp
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (a picklable object)."""
        if not self.enabled or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (in place; returned for convenience)."""
        if self.enabled and self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only and share whether it failed: when it raises, every rank
        raises (rank 0 its own error, the others a LargeForgeError naming it), so no rank waits
        for one that has stopped. Returns fn's result on rank 0, None elsewhere."""
        if not self.enabled or self.world_size == 1:
            return fn()
        result: T | None = None
        error: str | None = None
        caught: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - shared with the others, then re-raised
                caught, error = exc, str(exc) or type(exc).__name__
        error = self.broadcast(error)
        if caught is not None:
            raise caught
        if error is not None:
            raise LargeForgeError(f"rank 0 stopped: {error}")
        return result

    def describe(self) -> str:
        return f"{self.mode} on {self.world_size} process(es) ({self.backend})"


def under_torchrun(environ: Any = None) -> bool:
    env = os.environ if environ is None else environ
    return "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env


def resolve_mode(mode: str, world_size: int) -> str:
    """`auto` is ddp with two or more processes, else none."""
    if mode not in MODES:
        raise LargeForgeError(f"train.distributed must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "auto":
        return "ddp" if world_size > 1 else "none"
    return mode


def init_distributed(mode: str, device: torch.device, timeout_s: float) -> Distributed:
    """Join (or create) the process group the recipe's `train.distributed` asks for."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1
    mode = resolve_mode(mode, world)
    if mode == "none":
        if world > 1:
            raise LargeForgeError(
                f"this is one of {world} processes started by torchrun, but "
                "train.distributed is none: set it to ddp or fsdp (or auto)"
            )
        return Distributed()
    if device.type not in ("cpu", "cuda"):
        raise LargeForgeError(
            f"train.distributed={mode} runs on CUDA (nccl) or CPU (gloo), not {device.type}; "
            "set train.device=cpu or train.distributed=none"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():  # a library user's own group
        return Distributed(mode, dist.get_rank(), dist.get_world_size(), local_rank,
                           dist.get_backend(), owns_group=False)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=timeout_s)
    try:
        if world > 1 or under_torchrun():
            dist.init_process_group(backend, timeout=timeout)  # env:// from torchrun
        else:  # one process without torchrun: a group of one, in memory
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    except (RuntimeError, ValueError) as exc:
        raise LargeForgeError(f"cannot start the {backend} process group: {exc}") from None
    return Distributed(mode, dist.get_rank(), dist.get_world_size(), local_rank, backend,
                       owns_group=True)


def shutdown(d: Distributed, *, ok: bool) -> None:
    """Leave the process group (after a last barrier when the run succeeded)."""
    if not d.owns_group or not dist.is_initialized():
        return
    if ok:
        with contextlib.suppress(RuntimeError):
            dist.barrier()
    dist.destroy_process_group()


def run_device(d: Distributed, device: torch.device) -> torch.device:
    """Each rank's own GPU on CUDA."""
    if d.enabled and device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return device


def check_supported(recipe: Any, d: Distributed) -> None:
    method = recipe.train.method
    if d.mode == "fsdp" and method != "full":
        raise LargeForgeError(
            f"train.method={method} trains small adapters on a frozen base, which FSDP does not "
            "shard; use train.distributed=ddp"
        )
    if d.enabled and method == "qlora":
        raise LargeForgeError(
            "train.method=qlora runs on one process (its 4-bit base cannot be broadcast between "
            "processes); use train.method=lora with train.distributed=ddp, or one process"
        )


class ShardedBatches:
    """A batch source seen by one rank: of each `world_size` consecutive batches of `source`,
    rank r gets the r-th; the others are skipped (not collated). Every rank moves through the
    whole order, so the data position (`state_dict`) is the same on all ranks."""

    def __init__(self, source: Any, rank: int, world_size: int) -> None:
        self.source, self.rank, self.world_size = source, rank, world_size

    def __len__(self) -> int:
        return len(self.source)

    def next_batch(self) -> Any:
        batch = None
        for r in range(self.world_size):
            if r == self.rank:
                batch = self.source.next_batch()
            else:
                self.source.skip_batch()
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


def shard_batches(source: Any, d: Distributed) -> Any:
    return ShardedBatches(source, d.rank, d.world_size) if d.world_size > 1 else source


def eval_shard(batches: list[Any], d: Distributed) -> tuple[list[Any], int]:
    """(this rank's evaluation batches, how many of them count). FSDP needs every rank in every
    forward pass, so a rank with fewer batches repeats one that does not count."""
    if d.world_size == 1:
        return batches, len(batches)
    mine = batches[d.rank::d.world_size]
    counted = len(mine)
    if d.mode == "fsdp" and batches:
        mine = mine + [batches[0]] * (math.ceil(len(batches) / d.world_size) - counted)
    return mine, counted


def wrap_model(model: torch.nn.Module, d: Distributed, device: torch.device) -> torch.nn.Module:
    """The module to run the training step through: DDP around the model, or the model itself
    sharded in place by FSDP2 (build the optimizer after this)."""
    if d.mode == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # Our models have no running statistics in buffers: nothing to broadcast every step
        # (newer torch names the option forward_sync_buffers).
        options = inspect.signature(DistributedDataParallel).parameters
        buffers = ("forward_sync_buffers" if "forward_sync_buffers" in options
                   else "broadcast_buffers")
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            **{buffers: False},
        )
    if d.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per decoder block (transformers names its block classes in
        # `_no_split_modules`), then the root for embeddings, final norm and head.
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for module in list(model.modules()):
            if type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(model)
    return model


def no_sync(
    runner: torch.nn.Module, d: Distributed, sync: bool
) -> contextlib.AbstractContextManager:
    """DDP reduces gradients only on the last micro-batch of a step. (FSDP2 reduce-scatters on
    every one, which keeps only sharded gradients in memory.)"""
    if d.mode == "ddp" and not sync:
        return runner.no_sync()  # type: ignore[operator]
    return contextlib.nullcontext()


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_ returns a replicated DTensor under FSDP2."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)


# --- Checkpoints ----------------------------------------------------------------------------


def is_sharded_checkpoint(checkpoint: Path) -> bool:
    return (checkpoint / SHARDED_DIR).is_dir()


def save_checkpoint(
    d: Distributed,
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer: Any,
    training_state: dict[str, Any],
    recipe_yaml: str,
    keep: int,
) -> None:
    """`checkpoints/step-N/` written by every rank together; rank 0 renames it into place.

    DDP: the HF model directory and `training_state.pt` (optimizer included) from rank 0.
    FSDP: `sharded/` (model and optimizer shards from every rank), `model_config/`, the tokenizer
    and `training_state.pt` without the optimizer. Both: `rng-rank{r}.pt` from every rank and
    `distributed.json` (mode, world size)."""
    tmp_name = new_checkpoint_dir(run_dir, step) if d.is_main else None
    tmp = Path(str(d.broadcast(str(tmp_name) if tmp_name else None)))
    try:
        if d.mode == "fsdp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optim_state},
                     checkpoint_id=tmp / SHARDED_DIR)
        torch.save({"rng": capture_rng_state()}, tmp / RANK_RNG_FILE.format(rank=d.rank))
        d.barrier()

        def finish() -> None:
            state = dict(training_state)
            if d.mode == "fsdp":
                _write_model_config(model, tmp / MODEL_CONFIG_DIR)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
            else:
                state["optimizer"] = optimizer.state_dict()
                write_model_files(model, tokenizer, tmp)
            write_checkpoint_state(tmp, state, recipe_yaml)
            (tmp / DISTRIBUTED_FILE).write_text(
                json.dumps({"mode": d.mode, "world_size": d.world_size}) + "\n", encoding="utf-8"
            )
            commit_checkpoint(run_dir, tmp, step, keep)

        d.on_main(finish)
    except BaseException:
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    d.barrier()


def _write_model_config(model: torch.nn.Module, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)  # type: ignore[operator, union-attr]
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)


def load_checkpoint(
    d: Distributed, checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    saved: dict[str, Any],
) -> None:
    """Put a checkpoint's optimizer (and, sharded, model) state and this rank's RNG states back.
    `saved` is the checkpoint's training state. A sharded checkpoint written by another number
    of processes is resharded by torch.distributed.checkpoint."""
    if is_sharded_checkpoint(checkpoint):
        if d.mode != "fsdp":
            raise LargeForgeError(
                f"{checkpoint} is a sharded (FSDP) checkpoint; resume it with "
                "train.distributed=fsdp, or turn it into a model directory with `largeforge "
                "checkpoints consolidate`"
            )
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=checkpoint / SHARDED_DIR)
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
    else:
        optimizer.load_state_dict(saved["optimizer"])
    rank_file = checkpoint / RANK_RNG_FILE.format(rank=d.rank)
    if rank_file.is_file():
        rank_state = load_torch_file(rank_file, checkpoint_remedy(checkpoint))
        if not isinstance(rank_state, dict) or "rng" not in rank_state:
            raise DamagedFileError(rank_file, "no 'rng' entry", checkpoint_remedy(checkpoint))
        restore_rng_state(rank_state["rng"])
    else:  # a run resumed on more processes than wrote it: rank 0's states
        restore_rng_state(saved["rng"])


def save_model(d: Distributed, model: torch.nn.Module, tokenizer: Any, directory: Path) -> None:
    """An HF model directory (best/, final/) of the model every rank trains: rank 0 writes it;
    under FSDP the shards are gathered to rank 0 first (every rank takes part)."""
    if not d.enabled:
        save_model_dir(model, tokenizer, directory)
        return
    if d.mode == "fsdp":
        full = full_state_dict(model)
        d.on_main(lambda: save_model_dir(unsharded_copy(model, full), tokenizer, directory))
    else:
        d.on_main(lambda: save_model_dir(model, tokenizer, directory))
    d.barrier()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on rank 0's CPU (empty on the other ranks); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def unsharded_copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain CPU model of `model`'s architecture holding `state` (no second random init)."""
    from transformers import AutoModelForCausalLM

    config = model.config  # type: ignore[union-attr]
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(config)
    copy.load_state_dict(state, assign=True)
    copy.tie_weights()
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        copy.generation_config = generation
    return copy


def load_full_weights(d: Distributed, model: torch.nn.Module, directory: Path) -> None:
    """Load an HF model directory (best/) into the model being trained, sharded or not."""
    from largeforge.training.setup import load_weights

    if d.mode != "fsdp":
        load_weights(model, directory)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from largeforge.models import load_model

    state = load_model(directory).state_dict()
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def run_checkpoint(run_dir: Path, which: str = LATEST_FILE) -> Path:
    """A run's checkpoint by name: `latest` (what `checkpoints/latest` names) or `step-N`."""
    run = RunDir(run_dir)
    if which == LATEST_FILE:
        found = run.latest_checkpoint()
        if found is None:
            raise LargeForgeError(f"{run_dir} has no complete checkpoint")
        return found
    path = run.checkpoint(which)
    if not which.startswith("step-") or not path.is_dir():
        root = run.checkpoints
        have = sorted(p.name for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []
        raise LargeForgeError(
            f"--checkpoint {which}: no such checkpoint in {run_dir} (it has: "
            f"{', '.join(have) or 'none'}; or use latest)"
        )
    return path


def consolidate_checkpoint(checkpoint: Path, output: Path) -> Path:
    """Turn a sharded (FSDP) checkpoint into a Hugging Face model directory at `output`, in one
    process without a process group (torch.distributed.checkpoint reads every rank's shards)."""
    if not is_sharded_checkpoint(checkpoint):
        what = ("already a Hugging Face model directory (a DDP or one-process checkpoint)"
                if is_model_dir(checkpoint) else "not a checkpoint")
        raise LargeForgeError(f"{checkpoint} holds no {SHARDED_DIR}/: it is {what}")
    config_dir = checkpoint / MODEL_CONFIG_DIR
    if not (config_dir / "config.json").is_file():
        raise LargeForgeError(f"{checkpoint} is incomplete: {MODEL_CONFIG_DIR}/config.json missing")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise LargeForgeError(f"output {output} already exists; choose another --output")
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from largeforge.tokenizer import load_tokenizer

    check_model_files(config_dir, checkpoint_remedy(checkpoint))
    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    state = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message=".*single process.*")
        try:
            dcp.load({"model": state}, checkpoint_id=checkpoint / SHARDED_DIR)
        except Exception as exc:  # noqa: BLE001 - any reading error means a broken checkpoint
            raise LargeForgeError(f"cannot read the shards in {checkpoint / SHARDED_DIR}: "
                                  f"{str(exc).strip().splitlines()[0]}") from None
    if (config_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(config_dir)
    tokenizer = load_tokenizer(checkpoint) if (checkpoint / "tokenizer_config.json").is_file() \
        else None
    save_model_dir(model, tokenizer, output)
    return output


# --- Launching ------------------------------------------------------------------------------


def launch(nproc: int, args: list[str]) -> None:
    """Run `largeforge ARGS` on `nproc` processes of this machine through torchrun (standalone
    rendezvous, no restarts): the `--nproc N` shortcut. A failed rank stops the others and is
    reported as a LargeForgeError naming it."""
    if nproc < 1:
        raise LargeForgeError(f"--nproc must be 1 or more, not {nproc}")
    if under_torchrun():
        raise LargeForgeError("--nproc starts torchrun itself; under torchrun, leave it out")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun would set 1 thread per process and warn; share the cores out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    torchrun_args = get_args_parser().parse_args([
        "--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "largeforge",
        *args,
    ])
    try:
        run(torchrun_args)
    except ChildFailedError as exc:
        raise LargeForgeError(describe_failure(exc)) from None


def describe_failure(exc: Any) -> str:
    """One line for a ChildFailedError: which rank failed first, and how."""
    failures = dict(exc.failures)
    # A rank killed by a signal is the cause; the ranks that then lost it (an error exit) or
    # that torchrun stopped (SIGTERM) are consequences. Else the first rank that failed.
    killed = {r: f for r, f in failures.items()
              if f.exitcode < 0 and f.signal_name() != "SIGTERM"}
    failed = {r: f for r, f in failures.items() if f.exitcode > 0}
    causes = killed or failed or failures
    rank = min(causes, key=lambda r: (causes[r].timestamp, r))
    failure = causes[rank]
    if failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()}"
    else:
        how = f"exited with code {failure.exitcode} (its error is above)"
    others = len(failures) - 1
    stopped = f"; the other {others} process(es) were stopped" if others else ""
    return (f"distributed training failed: rank {rank} {how}{stopped}; the last checkpoint is "
            "kept: continue with --resume")


@contextlib.contextmanager
def collective_errors(d: Distributed) -> Iterator[None]:
    """A collective that fails because another rank died becomes one clear error."""
    try:
        yield
    except RuntimeError as exc:  # gloo raises plain RuntimeErrors, nccl DistBackendErrors
        text = str(exc).lower()
        signs = {"connection closed": "a connection was closed",
                 "connection reset": "a connection was reset", "broken pipe": "a broken pipe",
                 "timed out": "a collective timed out (train.dist_timeout)"}
        reasons = [why for sign, why in signs.items() if sign in text]
        if not (d.enabled and d.world_size > 1 and (reasons or isinstance(exc, dist.DistError))):
            raise
        # Named in our words: the library's text holds source paths in brackets, noise here.
        reason = reasons[0] if reasons else f"{type(exc).__name__} in a collective"
        raise LargeForgeError(
            f"rank {d.rank} lost the other processes ({reason}): another rank stopped or the "
            "network failed; the last checkpoint is kept: continue with --resume"
        ) from None
