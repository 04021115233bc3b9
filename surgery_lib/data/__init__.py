"""The offline task suite: eight 32x32 tasks and a label-disjoint pretraining mix, generated offline.

>>> from surgery_lib.data import load_suite
>>> suite = load_suite("mini")          # generates once (~40 s on 2 cores), then loads in < 1 s
>>> x, y = next(iter(suite["mnist"].loader("test", batch_size=64)))   # x: float32 (64, 3, 32, 32)
"""

from surgery_lib.data.generators import MIX, TASKS, TaskSpec
from surgery_lib.data.suite import ImageDataset, Suite, TaskData, check_tasks, data_cards, load_suite, normalize

__all__ = [
    "MIX",
    "TASKS",
    "ImageDataset",
    "Suite",
    "TaskData",
    "TaskSpec",
    "check_tasks",
    "data_cards",
    "load_suite",
    "normalize",
]
