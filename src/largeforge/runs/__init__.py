"""Everything LargeForge knows about run directories, in one place.

    run_dir.py    RunDir (every file name of a run, run.json), is_run_dir, latest_checkpoint
    model_ref.py  resolve_model_dir: what `--model` accepts (model dir, run dir, hub id, GGUF)
    database.py   the registry's SQLite file: location, locking, migrations applied
    registry.py   Registry and RunRecord: the runs table; resolve_run_dir (a name or a path)
    actions.py    ActionRecord and the registry's action log (what the dashboard did to runs)
    experts.py    ExpertRecord and the registry's expert methods (the router's experts)
    recorder.py   RunRecorder: a training run's registry row, never failing the run
    logs.py       reading metrics.jsonl (also while it grows) and a run's live status
    cleanup.py    removing surplus checkpoints (`largeforge checkpoints cleanup`)
    report.py     report.html of a run (plots.py draws its charts); imported where used, since
                  it loads jinja2 and matplotlib

The names below are the package's public API. Importing it does not import torch (nor
anything of training/, evaluation/, serving/ or cli/, which import this package), so commands
can resolve and check their arguments before the slow imports.
"""

from __future__ import annotations

from largeforge.runs.actions import ActionRecord
from largeforge.runs.cleanup import (
    Checkpoint,
    CleanupPlan,
    CleanupResult,
    cleanup_checkpoints,
    format_size,
    plan_cleanup,
)
from largeforge.runs.database import default_registry_path, format_time
from largeforge.runs.experts import ExpertRecord
from largeforge.runs.logs import (
    MetricsTail,
    follow_records,
    format_record,
    last_records,
    live_status,
    read_records,
)
from largeforge.runs.model_ref import not_cached_error, resolve_model_dir
from largeforge.runs.recorder import RunRecorder
from largeforge.runs.registry import (
    MIGRATIONS,
    SHOWN_STATUSES,
    STATUSES,
    Registry,
    RunRecord,
    process_alive,
    recipe_hash,
    resolve_run_dir,
)
from largeforge.runs.run_dir import (
    BEST_DIR,
    CHECKPOINTS_DIR,
    CONSOLIDATED_DIR,
    DISTRIBUTED_FILE,
    FINAL_DIR,
    LATEST_FILE,
    METRICS_FILE,
    RECIPE_FILE,
    REPORT_FILE,
    RUN_STATE_FILE,
    STATE_FILE,
    TENSORBOARD_DIR,
    TOKENIZER_DIR,
    RunDir,
    RunStateError,
    checkpoint_name,
    is_model_dir,
    is_run_dir,
    latest_checkpoint,
    parse_step,
    read_run_state,
    write_run_state,
)

__all__ = [
    "ActionRecord",
    "BEST_DIR",
    "CHECKPOINTS_DIR",
    "CONSOLIDATED_DIR",
    "DISTRIBUTED_FILE",
    "FINAL_DIR",
    "LATEST_FILE",
    "METRICS_FILE",
    "MIGRATIONS",
    "RECIPE_FILE",
    "REPORT_FILE",
    "RUN_STATE_FILE",
    "SHOWN_STATUSES",
    "STATE_FILE",
    "STATUSES",
    "TENSORBOARD_DIR",
    "TOKENIZER_DIR",
    "Checkpoint",
    "CleanupPlan",
    "CleanupResult",
    "ExpertRecord",
    "MetricsTail",
    "Registry",
    "RunDir",
    "RunRecord",
    "RunRecorder",
    "RunStateError",
    "checkpoint_name",
    "cleanup_checkpoints",
    "default_registry_path",
    "follow_records",
    "format_record",
    "format_size",
    "format_time",
    "is_model_dir",
    "is_run_dir",
    "last_records",
    "latest_checkpoint",
    "live_status",
    "not_cached_error",
    "parse_step",
    "plan_cleanup",
    "process_alive",
    "read_records",
    "read_run_state",
    "recipe_hash",
    "resolve_model_dir",
    "resolve_run_dir",
    "write_run_state",
]
