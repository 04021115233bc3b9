"""Representation Surgery (Yang et al., ICML 2024) and SurgeryV2 (Yang et al., 2024): small task-specific
modules, trained without labels, that pull a merged model's representations back toward each expert's.

- :mod:`~surgery_lib.surgery.schedule`  the official training schedule and the optimiser's semantics (shared / per-task Adam)
- :mod:`~surgery_lib.surgery.v1`        Surgery: one low-rank module per task on the final embedding
- :mod:`~surgery_lib.surgery.v2`        SurgeryV2: a module after every block, on every token
- :mod:`~surgery_lib.surgery.run`       either version on a zoo and a merged model: features, training, accuracy
  and representation bias before and after, saving and loading
"""

from surgery_lib.core.errors import SurgeryBookError  # noqa: F401  (0.1 re-exported it here)
from surgery_lib.surgery.run import (
    SurgeryRun,
    bias_table,
    block_bias_table,
    load_surgery,
    run_surgery,
    save_surgery,
    state_fingerprint,
    task_embeddings,
)
from surgery_lib.surgery.schedule import (
    ADAM_SEMANTICS,
    Iteration,
    TaskAdam,
    check_adam,
    official_iterations,
    online_iterations,
    task_seed,
    train_on_schedule,
)
from surgery_lib.surgery.v1 import (
    SurgeryConfig,
    SurgeryHistory,
    SurgeryModule,
    TaskSurgery,
    l1_loss_per_task,
    train_surgery,
)
from surgery_lib.surgery.v2 import DeepSurgery, train_deep_surgery

__all__ = [
    "ADAM_SEMANTICS",
    "DeepSurgery",
    "Iteration",
    "SurgeryConfig",
    "SurgeryHistory",
    "SurgeryModule",
    "SurgeryRun",
    "TaskAdam",
    "TaskSurgery",
    "bias_table",
    "block_bias_table",
    "check_adam",
    "l1_loss_per_task",
    "load_surgery",
    "official_iterations",
    "online_iterations",
    "run_surgery",
    "save_surgery",
    "state_fingerprint",
    "task_embeddings",
    "task_seed",
    "train_deep_surgery",
    "train_on_schedule",
    "train_surgery",
]
