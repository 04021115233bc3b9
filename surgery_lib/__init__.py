"""surgery_lib: Representation Surgery and SurgeryV2 for multi-task model merging.

The package is organised one concept per module:

- :mod:`surgery_lib.presets`   model, data and training configurations (data, not code)
- :mod:`surgery_lib.data`      the offline task suite (generation, caching, loading)
- :mod:`surgery_lib.models`    open_clip vision encoders and classification heads
- :mod:`surgery_lib.training`  pretraining, linear probes, experts, multi-task learning
- :mod:`surgery_lib.zoo`       building, caching and loading the model zoo
- :mod:`surgery_lib.evaluation` accuracy tables
- :mod:`surgery_lib.merging`, :mod:`~surgery_lib.adamerging`, :mod:`~surgery_lib.fisher`, :mod:`~surgery_lib.regmean`,
  :mod:`~surgery_lib.methods`   merging methods, as functions over state dicts
- :mod:`surgery_lib.surgery`, :mod:`~surgery_lib.surgery_v2`, :mod:`~surgery_lib.bias`, :mod:`~surgery_lib.pipeline`
  Surgery, SurgeryV2 and representation bias
- :mod:`surgery_lib.checkpoints`, :mod:`~surgery_lib.clip_tasks`, :mod:`~surgery_lib.clip_data`,
  :mod:`~surgery_lib.zero_shot`, :mod:`~surgery_lib.clip_zoo`   the real CLIP setting (published checkpoints,
  the eight datasets, zero-shot heads) behind the same zoo interface
- :mod:`surgery_lib.plots`, :mod:`~surgery_lib.benchmark`, :mod:`~surgery_lib.reproduce`   figures, speed, papermill
- :mod:`surgery_lib.cli`       the ``surgery-book`` command line

Importing the package is cheap: submodules that need torch import it themselves.
"""

from surgery_lib.errors import SurgeryBookError
from surgery_lib.project import REPOSITORY_URL, __version__

__all__ = ["REPOSITORY_URL", "SurgeryBookError", "__version__"]
