"""EleutherAI's lm-eval harness on our models: a model adapter and `run_harness`.

`LargeForgeLM` is an `lm_eval` model (registered as "largeforge", so
`lm_eval --model largeforge --model_args pretrained=runs/x` works too) over any model reference
`load_for_inference` accepts: a model dir, a run dir, a LoRA adapter dir or a hub id.

- `loglikelihood`: the harness's own `TemplateLM` encodes each (context, continuation) pair the way
  its `HFLM` does (the whole string is encoded and split at the context's token count; trailing
  spaces of the context go to the continuation; an empty context becomes the prefix token). The
  pairs are sorted by length, right-padded and scored one forward pass per batch; a pair longer
  than the context window loses tokens from the left of its context. Results come back in
  request order.
- `loglikelihood_rolling`: the text's tokens (without special tokens), after the prefix token,
  cut into windows of the model's context by the harness's `get_rolling_token_windows`; every
  token is scored exactly once, each window with as much context as fits.
- `generate_until`: our own decoding loop (`inference.generate.generate_ids`), greedy unless the
  task's generation kwargs ask to sample, stopped by `until` strings, EOS or `max_gen_toks`.

The prefix token (the condition of an empty context and of the first rolling window) is BOS for
tokenizers that put BOS in front of text themselves (Llama, Mistral: their models saw it at the
start of every document), else EOS: LargeForge pretraining ends every document with EOS and never
writes BOS, so EOS is what came before a document there. (HFLM takes BOS whenever the tokenizer
has one.)

`run_harness` loads the tasks (names, globs, YAML paths; `include_path` adds a folder of task
YAMLs), then the model, and returns task -> metric -> value. Relative `data_files` of tasks built
on a packaged `datasets` loader (`dataset_path: json`, `csv`, `text`, `parquet`...) are read
relative to the task's YAML file, so a task folder works wherever it is run from.
"""

from __future__ import annotations

import difflib
import glob
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from largeforge.errors import LargeForgeError

HARNESS_INSTALL_HINT = "pip install 'largeforge[harness]'"
MIN_LM_EVAL = "0.4.13"  # the version this adapter is tested with


class HarnessNotInstalledError(LargeForgeError, ImportError):
    """lm-eval cannot be imported. An ImportError too, so `except ImportError` still works."""


try:
    import lm_eval
except ImportError as _exc:
    raise HarnessNotInstalledError(
        f"the EleutherAI lm-eval harness is not installed ({_exc}); {HARNESS_INSTALL_HINT}"
    ) from _exc
try:
    import lm_eval.models  # noqa: F401  (registers the harness's own models before ours)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.models.utils import (
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
        resolve_max_length,
    )
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._factory import TaskFactory
except ImportError as _exc:
    raise HarnessNotInstalledError(
        f"lm-eval {getattr(lm_eval, '__version__', '?')} lacks what LargeForge uses ({_exc}); "
        f"LargeForge needs lm-eval >= {MIN_LM_EVAL}: pip install -U 'largeforge[harness]'"
    ) from _exc


MODEL_NAME = "largeforge"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # as HFLM
# `datasets` loaders that read local files named by `data_files` (not hub datasets).
PACKAGED_LOADERS = frozenset(
    {"json", "csv", "text", "parquet", "arrow", "pandas", "xml", "webdataset", "imagefolder",
     "audiofolder"}
)
# Generation kwargs we map onto SamplingParams; anything else a task asks for is an error.
_SAMPLING_KEYS = {"temperature", "top_k", "top_p", "repetition_penalty", "seed"}


def _batch_size(value: int | str | None) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE  # no probing for the largest batch that fits
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise LargeForgeError(f"batch_size must be a positive integer, got {value!r}")
    return size


class LargeForgeLM(TemplateLM):
    """An lm-eval model over a LargeForge (or any Hugging Face causal) model."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        pretrained: str | Path | None = None,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        device: str | None = "auto",
        max_length: int | None = None,
        loaded: tuple[Any, Any] | None = None,
        max_batch_size: int | None = None,  # passed by the harness; unused (no auto batch size)
    ) -> None:
        super().__init__()
        refs = [r for r in (model, pretrained) if r is not None]
        if loaded is not None:
            if refs:
                raise LargeForgeError("give either a model reference or a loaded model, not both")
            self._model, self.tokenizer = loaded
        elif len(refs) == 1:
            from largeforge.inference.generate import load_for_inference

            chosen = None if device in (None, "auto") else str(device)
            self._model, self.tokenizer = load_for_inference(refs[0], chosen)
        else:
            raise LargeForgeError(
                "name one model: `model` (or `pretrained=` in harness model_args)"
                if not refs
                else f"two models named: model={model!s} and pretrained={pretrained!s}"
            )
        self._model.eval()
        self._device = next(self._model.parameters()).device
        self._batch_size = _batch_size(batch_size)
        limit = resolve_max_length(self._model.config, self.tokenizer)
        if max_length is not None:
            if int(max_length) < 2:
                raise LargeForgeError(f"max_length must be at least 2, got {max_length}")
            positions = getattr(self._model.config, "max_position_embeddings", None)
            if positions is not None and int(max_length) > positions:
                raise LargeForgeError(
                    f"max_length {max_length} is longer than the model's context of "
                    f"{positions} tokens"
                )
            limit = int(max_length)
        self._max_length = limit
        self._forward_takes_logits_to_keep = _accepts(self._model, "logits_to_keep")
        self._prefix = _prefix_token(self.tokenizer)

    # ---------------------------------------------------------------- properties
    @property
    def model(self) -> Any:
        return self._model

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos) if eos is not None else self.prefix_token_id

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is None:
            raise LargeForgeError(
                "the tokenizer has neither a BOS nor an EOS token to condition an empty "
                "context on"
            )
        return self._prefix

    # ---------------------------------------------------------------- tokenisation
    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """Ids of `string`; special tokens as the tokenizer adds them by default (as HFLM),
        except that a string already starting with BOS gets no second one."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))

    # ---------------------------------------------------------------- scoring
    def _loglikelihood_tokens(
        self,
        requests: Sequence[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether greedy decoding yields it) for each
        (cache key, context ids, continuation ids), in request order."""
        from tqdm import tqdm

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        rows: list[tuple[int, list[int], list[int]]] = []
        for index, (_, context, continuation) in enumerate(requests):
            if not continuation:
                results[index] = (0.0, True)
                continue
            if len(continuation) > self.max_length:
                raise LargeForgeError(
                    f"a continuation of {len(continuation)} tokens does not fit the model's "
                    f"context of {self.max_length} tokens"
                )
            if not context:
                raise LargeForgeError("a loglikelihood request needs at least one context token")
            # The last token is only predicted, never input; too long: drop context from the left.
            inputs = (context + continuation)[-(self.max_length + 1) :][:-1]
            rows.append((index, inputs, continuation))
        # Longest first (as HFLM): padding stays small and an out-of-memory shows up at once.
        rows.sort(key=lambda row: -len(row[1]))
        batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        for batch in tqdm(batches, disable=disable_tqdm, desc="loglikelihood batches"):
            for (index, _, _), answer in zip(batch, self._score_batch(batch), strict=True):
                results[index] = answer
                key = requests[index][0]
                if key is not None:  # rolling windows have no key; their sum is cached later
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return [r for r in results if r is not None]

    def _score_batch(
        self, batch: list[tuple[int, list[int], list[int]]]
    ) -> list[tuple[float, bool]]:
        width = max(len(inputs) for _, inputs, _ in batch)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(batch), width), 0 if pad is None else int(pad), dtype=torch.long)
        for row, (_, inputs, _) in enumerate(batch):
            ids[row, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        # Right padding needs no attention mask in a causal model: real positions never see it.
        # Only the positions from the earliest continuation start on need logits.
        first = min(len(inputs) - len(cont) for _, inputs, cont in batch)
        extra: dict[str, Any] = {}
        if self._forward_takes_logits_to_keep:
            extra["logits_to_keep"] = width - first
        with torch.inference_mode():
            logits = self._model(input_ids=ids.to(self._device), use_cache=False, **extra).logits
        offset = width - logits.size(1)  # position of logits[:, 0]
        answers = []
        for row, (_, inputs, cont) in enumerate(batch):
            start = len(inputs) - len(cont) - offset
            logprobs = F.log_softmax(logits[row, start : start + len(cont)].float(), dim=-1)
            target = torch.tensor(cont, dtype=torch.long, device=logprobs.device)
            total = logprobs.gather(1, target.unsqueeze(1)).sum()
            greedy = bool((logprobs.argmax(dim=-1) == target).all())
            answers.append((float(total), greedy))
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-probability of each whole text (after the prefix token), in windows of the
        model's context, one forward pass per batch of windows."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for index, (text,) in enumerate(req.args for req in requests):
            # Text tokens only: a BOS added by the tokenizer would itself be scored after the
            # prefix token (HFLM does that for Llama tokenizers).
            tokens = self.tok_encode(text, add_special_tokens=False)
            pairs = lm_utils.get_rolling_token_windows(
                token_list=tokens,
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        for owner, (logprob, _) in zip(owners, scores, strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------- generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, gen_kwargs = req.args
            text = self._generate_one(context, dict(gen_kwargs or {}), req.task_name)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def _generate_one(self, context: str, gen_kwargs: dict[str, Any], task: str | None) -> str:
        from largeforge.inference.generate import detokenize_stream, generate_ids, model_eos_ids
        from largeforge.inference.sampling import SamplingParams

        where = f" (task {task})" if task else ""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = [u for u in handle_stop_sequences(kwargs.pop("until", None), eos=None) if u]
        max_gen = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        unknown = sorted(set(kwargs) - _SAMPLING_KEYS)
        if unknown:
            raise LargeForgeError(f"unsupported generation option(s) {unknown}{where}")
        room = self.max_length - max_gen
        if room < 1:
            raise LargeForgeError(
                f"max_gen_toks {max_gen}{where} leaves no room for the prompt in the model's "
                f"context of {self.max_length} tokens; lower it in the task's generation_kwargs"
            )
        params = SamplingParams(
            max_new_tokens=max_gen,
            temperature=float(kwargs.get("temperature") or 0.0) if do_sample else 0.0,
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
            repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0),
            seed=kwargs.get("seed"),
        )
        ids = self.tok_encode(context) if context else [self.prefix_token_id]
        prompt = torch.tensor([ids[-room:]], dtype=torch.long)  # left-truncated, as HFLM
        eos = model_eos_ids(self._model, self.tokenizer)
        text = ""
        new_ids = generate_ids(self._model, prompt, params, eos)
        for piece in detokenize_stream(self.tokenizer, new_ids):
            text += piece
            # A stop string may straddle pieces: look back as far as the longest one reaches.
            tail = text[-(len(piece) + max((len(u) for u in until), default=0)) :]
            if any(u in tail for u in until):
                break
        return postprocess_generated_text(text, until, None)


def _prefix_token(tokenizer: Any) -> int | None:
    """BOS where the tokenizer writes it before text itself, else EOS (see the module doc)."""
    from largeforge.chat_templates import tokenizer_adds_bos

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for candidate in (bos, eos) if tokenizer_adds_bos(tokenizer) else (eos, bos):
        if candidate is not None:
            return int(candidate)
    return None


def _accepts(model: Any, name: str) -> bool:
    import inspect

    return name in inspect.signature(type(model).forward).parameters


if MODEL_NAME not in model_registry:  # a module reload keeps the first registration
    register_model(MODEL_NAME)(LargeForgeLM)


# -------------------------------------------------------------------- tasks
def _anchor(value: Any, base: Path) -> Any:
    """`data_files` (a path or glob, a list of them, or split -> either) with every relative
    entry that exists next to the YAML made absolute; others are left for `datasets` to read
    relative to the working directory."""
    if isinstance(value, str):
        if "://" in value or Path(value).expanduser().is_absolute():
            return value
        candidate = base / value
        return str(candidate) if glob.glob(str(candidate), recursive=True) else value
    if isinstance(value, list):
        return [_anchor(item, base) for item in value]
    if isinstance(value, dict):
        return {key: _anchor(item, base) for key, item in value.items()}
    return value


def anchor_local_data(config: dict[str, Any], yaml_dir: Path) -> None:
    """Make a task config's local data paths absolute, relative to its YAML's folder."""
    loader = config.get("dataset_path")
    kwargs = config.get("dataset_kwargs")
    if isinstance(loader, str) and loader not in PACKAGED_LOADERS:
        local = yaml_dir / loader
        if not Path(loader).is_absolute() and local.exists():
            config["dataset_path"] = str(local)  # a local dataset folder next to the YAML
        return
    if isinstance(kwargs, dict) and "data_files" in kwargs and not kwargs.get("data_dir"):
        kwargs["data_files"] = _anchor(kwargs["data_files"], yaml_dir)


class _LocalDataTaskFactory(TaskFactory):
    """The harness's task factory, with relative data paths read from the YAML's folder.

    `datasets` resolves relative `data_files` against the working directory, so a task YAML
    naming `data.jsonl` beside it would only work when run from that folder. The factory is the
    one place that sees each task's full config (includes merged) and its YAML path before the
    data is loaded, hence this (private) hook.
    """

    def _load_full_config(self, entry: Any, overrides: dict[str, Any] | None = None) -> dict:
        config = super()._load_full_config(entry, overrides)
        if getattr(entry, "yaml_path", None):
            anchor_local_data(config, Path(entry.yaml_path).parent)
        return config


def task_manager(include_path: Path | None = None, *, include_defaults: bool = True) -> Any:
    """A harness TaskManager over lm-eval's own tasks and/or `include_path`."""
    if include_path is not None and not Path(include_path).is_dir():
        raise LargeForgeError(f"task include path {include_path} is not a directory")
    manager = TaskManager(
        include_path=str(include_path) if include_path is not None else None,
        include_defaults=include_defaults,
    )
    factory = getattr(manager, "_factory", None)
    if type(factory) is TaskFactory:
        manager._factory = _LocalDataTaskFactory(meta=factory._meta)
    return manager


def _is_yaml_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) and Path(spec).expanduser().is_file()


def _is_plain_task(manager: Any, name: str) -> bool:
    entry = manager.task_index.get(name)
    return entry is not None and entry.kind.name in ("TASK", "PY_TASK")


def _expand(manager: Any, specs: Iterable[str]) -> tuple[list[str], list[str]]:
    """(task specs the manager knows, unknown specs); globs expand to the names they match."""
    known, unknown = [], []
    for spec in specs:
        if spec in manager.task_index or _is_yaml_file(spec):
            known.append(spec)
        elif any(ch in spec for ch in "*?[") and (matched := manager.match_tasks([spec])):
            known.extend(m for m in matched if m not in known)
        else:
            unknown.append(spec)
    return known, unknown


def _unknown_tasks_error(
    unknown: list[str], manager: Any, include_path: Path | None
) -> LargeForgeError:
    places = [f"lm-eval's {len(manager.all_tasks)} built-in tasks, groups and tags"]
    if include_path is not None:
        local = sorted(task_manager(include_path, include_defaults=False).all_tasks)
        shown = ", ".join(local[:20]) + (", ..." if len(local) > 20 else "")
        places.append(f"include path {include_path} ({len(local)} found: {shown or 'none'})")
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        if close:
            hints.append(f"for {name!r} did you mean {', '.join(close)}?")
    where = " nor ".join(places)
    hint = f"; {' '.join(hints)}" if hints else ""
    return LargeForgeError(
        f"unknown task(s) {', '.join(repr(u) for u in unknown)}: not among {where} "
        f"(nor a task YAML file){hint}"
    )


def resolve_tasks(
    tasks: Sequence[str], include_path: Path | None = None
) -> tuple[Any, list[str]]:
    """(task manager, task specs), or a LargeForgeError naming unknown tasks and where we looked.

    Indexing lm-eval's ~15,000 built-in task YAMLs takes seconds, so when every name is a plain
    task in `include_path` only that folder is indexed. Groups and tags may reach into the
    built-in tasks, so they (and names not found there) get the full index.
    """
    specs = [t.strip() for t in tasks if t and t.strip()]
    if not specs:
        raise LargeForgeError("no task names given")
    if include_path is not None:
        local = task_manager(include_path, include_defaults=False)
        if all(_is_plain_task(local, spec) for spec in specs):
            return local, specs
    manager = task_manager(include_path)
    known, unknown = _expand(manager, specs)
    if unknown:
        raise _unknown_tasks_error(unknown, manager, include_path)
    return manager, known


def _top_level(loaded: dict[str, Any]) -> list[Any]:
    """The groups and standalone tasks a `TaskManager.load` result was built from."""
    group_map = loaded.get("group_map") or {}
    nested = {child for children in group_map.values() for child in children}
    groups = [g for name, g in (loaded.get("groups") or {}).items() if name not in nested]
    grouped = {t.task_name for g in groups for t in g.get_all_tasks()}
    return groups + [t for name, t in loaded["tasks"].items() if name not in grouped]


def load_tasks(manager: Any, specs: list[str]) -> list[Any]:
    """Build the tasks (reading their data) before any model is loaded."""
    try:
        loaded = manager.load(specs)
    except LargeForgeError:
        raise
    except Exception as exc:  # the task's YAML or data: bad input, reported to the user
        raise LargeForgeError(
            f"cannot load task(s) {', '.join(specs)}: {type(exc).__name__}: {exc}"
        ) from exc
    return _top_level(loaded)


def _flatten(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """task -> metric -> value from the harness's results ("acc,none" -> "acc"; metrics of
    other filters keep the filter: "exact_match,strict-match")."""
    table: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        metrics: dict[str, float] = {}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # the alias, "N/A" standard errors
            metric, _, filter_name = key.partition(",")
            metrics[metric if filter_name in ("", "none") else key] = float(value)
        table[task] = metrics
    return table


def run_harness(
    model_ref: str,
    tasks: list[str],
    *,
    include_path: Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
) -> dict[str, dict[str, float]]:
    """Evaluate a model on harness tasks; returns task (or group) -> metric -> value.

    `tasks` are task, group or tag names, globs of them, or task YAML paths; `include_path` is
    a folder of extra task YAMLs. `limit` caps the documents per task.
    """
    from lm_eval.evaluator import simple_evaluate

    if limit is not None and limit < 1:
        raise LargeForgeError(f"limit must be at least 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise LargeForgeError(f"num_fewshot must be >= 0, got {num_fewshot}")
    manager, specs = resolve_tasks(tasks, include_path)
    built = load_tasks(manager, specs)
    lm = LargeForgeLM(model_ref, batch_size=batch_size, device=device)
    results = simple_evaluate(
        model=lm,
        tasks=built,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
    )
    return _flatten(results or {})
