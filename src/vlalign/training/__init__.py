"""What every training loop shares: run folder, checkpoints with exact resume, the batch plan,
metrics and trackers, optimiser and schedule, and the guards and global reductions of data
parallelism (:mod:`vlalign.training.distributed`).

Exact resume rests on three facts:

* the data order is a pure function of (seed, step) (:class:`~vlalign.training.plan.BatchPlan`),
  so a checkpoint only needs the step number to know where the data stream stands;
* a checkpoint holds the trainable parameters (the LoRA adapter, or the whole model when every
  weight trains, or a value head...), the optimiser and scheduler states and every RNG state
  of every process (:mod:`vlalign.training.checkpoints`);
* checkpoints are written to a temporary folder and renamed into place, so a run killed while
  saving leaves the previous checkpoint intact and never a half-written one.

Nothing is lost and nothing is silent: a run folder records what made it (``run.json``,
:mod:`vlalign.training.runfolder`) and refuses another command, a finished run or a resume with
changed training options; checkpoints are loaded as data only (``weights_only``), an unreadable
one is named and skipped for the previous one; ``metrics.jsonl`` is cut back to what the resumed
checkpoint had seen; option values are checked before anything loads
(:mod:`vlalign.training.options`).
"""

from vlalign.training.checkpoints import (
    CHECKPOINT_DIR,
    Checkpointer,
    CheckpointError,
    load_trainable_state_dict,
    rng_state,
    seed_everything,
    set_rng_state,
    trainable_state_dict,
)
from vlalign.training.distributed import (
    check_supported,
    global_count,
    mean_over_processes,
    micro_step_context,
    union_of_keys,
    zero_loss,
)
from vlalign.training.metrics import METRICS_FILE, MetricsLog, StepRecords, Throughput, read_metrics
from vlalign.training.plan import BatchPlan, total_steps
from vlalign.training.run import (
    NonFiniteLossError,
    Run,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    check_finite,
    make_accelerator,
    resolve_mixed_precision,
)
from vlalign.training.runfolder import RUN_FILE, ResumeMismatchError, RunFolderError, prepare_run_dir

__all__ = [
    "CHECKPOINT_DIR",
    "RUN_FILE",
    "CheckpointError",
    "ResumeMismatchError",
    "RunFolderError",
    "METRICS_FILE",
    "BatchPlan",
    "Checkpointer",
    "MetricsLog",
    "NonFiniteLossError",
    "Run",
    "StepRecords",
    "Throughput",
    "TrainConfig",
    "build_optimizer",
    "build_scheduler",
    "check_finite",
    "check_supported",
    "global_count",
    "load_trainable_state_dict",
    "make_accelerator",
    "mean_over_processes",
    "micro_step_context",
    "prepare_run_dir",
    "read_metrics",
    "resolve_mixed_precision",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "total_steps",
    "trainable_state_dict",
    "union_of_keys",
    "zero_loss",
]
