"""The CLIP checkpoints, one module per unit (this module gathers their public names, the 0.2 path):

- :mod:`~surgery_lib.settings.clip.safe_pickle`   the safe unpickler of the task_vectors pickles
- :mod:`~surgery_lib.settings.clip.task_vectors`  the task_vectors folder: encoders, heads, conversion
- :mod:`~surgery_lib.settings.clip.fusionbench`   FusionBench's hub experts: snapshots, name mapping, conversion
- :mod:`~surgery_lib.settings.clip.converted`     the converted format (safetensors + manifest) and its open_clip encoder
"""

from surgery_lib.core.errors import SurgeryBookError  # noqa: F401  (0.1 re-exported these two here)
from surgery_lib.models import ClassificationHead  # noqa: F401
from surgery_lib.settings.clip.converted import (
    CONVERTED_FORMAT,
    build_clip_visual,
    check_weights,
    load_converted,
    visual_architecture,
)
from surgery_lib.settings.clip.fusionbench import (
    CLIP_TEXT_KEYS,
    FUSIONBENCH_MODELS,
    FUSIONBENCH_OWNER,
    SNAPSHOT_WEIGHTS,
    convert_fusionbench,
    fusionbench_sources,
    open_clip_state_from_transformers,
    snapshot_state,
)
from surgery_lib.settings.clip.safe_pickle import (
    MAX_MODULE_DEPTH,
    STAND_IN_MODULES,
    SafeUnpickler,
    StandIn,
    UnsafeCheckpointError,
    module_tensors,
    read_pickled_checkpoint,
)
from surgery_lib.settings.clip.task_vectors import (
    TASK_VECTORS_TASKS,
    VISUAL_PREFIX,
    convert_task_vectors,
    load_head,
    load_image_encoder_state,
    task_vectors_files,
)

__all__ = [
    "STAND_IN_MODULES",
    "UnsafeCheckpointError",
    "StandIn",
    "SafeUnpickler",
    "read_pickled_checkpoint",
    "MAX_MODULE_DEPTH",
    "module_tensors",
    "VISUAL_PREFIX",
    "load_image_encoder_state",
    "load_head",
    "TASK_VECTORS_TASKS",
    "task_vectors_files",
    "convert_task_vectors",
    "visual_architecture",
    "build_clip_visual",
    "CONVERTED_FORMAT",
    "check_weights",
    "load_converted",
    "FUSIONBENCH_MODELS",
    "FUSIONBENCH_OWNER",
    "fusionbench_sources",
    "SNAPSHOT_WEIGHTS",
    "snapshot_state",
    "CLIP_TEXT_KEYS",
    "convert_fusionbench",
    "open_clip_state_from_transformers",
]
