"""surgery_lib: Representation Surgery and SurgeryV2 for multi-task model merging.

The tree is the architecture; dependencies point down this list, never up or sideways (a test checks it):

- the apps: :mod:`surgery_lib.cli` (the command line), :mod:`~surgery_lib.grid` (the papers' table in one
  process), :mod:`~surgery_lib.cluster` (the same grid as submitit jobs, local or Slurm),
  :mod:`~surgery_lib.tables` (readable tables), :mod:`~surgery_lib.plots` (figures), :mod:`~surgery_lib.diagrams`
  (the book's method diagrams), :mod:`~surgery_lib.book` (notebook helpers: style, banners, glue),
  :mod:`~surgery_lib.reproduce` (papermill), :mod:`~surgery_lib.benchmark` (speed and memory)
- :mod:`surgery_lib.disentanglement`  how much of the experts' gain a merge keeps against the number of tasks
- :mod:`surgery_lib.merging`      merging methods, one module per family, registered by name
- :mod:`surgery_lib.surgery`      Surgery and SurgeryV2: modules, the official schedule, runs on a zoo
- :mod:`surgery_lib.bias`         representation bias
- :mod:`surgery_lib.settings`     where models, heads and tasks come from: ``offline/`` (trained here) and ``clip/``
  (the papers' checkpoints and datasets), each one folder with its ``presets.json``
- :mod:`surgery_lib.evaluation`   accuracy and tables
- :mod:`surgery_lib.models`       open_clip vision encoders, heads, feature extraction
- :mod:`surgery_lib.presets`      the preset schema and registry (the presets themselves are JSON data)
- :mod:`surgery_lib.finetuning`   how experts are fine-tuned: whole encoder, attention only, LoRA, tangent space
- :mod:`surgery_lib.core`         errors, atomic storage and hashing, registries, task-data containers, progress

Merging, surgery and bias never import a setting, and settings never import them: they meet in the
:class:`~surgery_lib.settings.base.Zoo`. Importing the package is cheap: torch loads with the first submodule that needs it.
"""

from surgery_lib.core import compat as _compat
from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.project import REPOSITORY_URL, __version__

_compat.install()

__all__ = ["REPOSITORY_URL", "SurgeryBookError", "__version__"]
