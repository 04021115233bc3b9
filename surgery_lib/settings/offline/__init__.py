"""The offline setting: eight small image tasks generated on this machine (numpy and Pillow only), and a zoo
trained here (pretraining on a label-disjoint mix, probe heads, one expert per task, multi-task learning).

- :mod:`~surgery_lib.settings.offline.generators`  the tasks' image generators and data cards
- :mod:`~surgery_lib.settings.offline.suite`       generation, caching and loading of a preset's tasks
- :mod:`~surgery_lib.settings.offline.training`    pretraining, probes, fine-tuning
- :mod:`~surgery_lib.settings.offline.zoo`         building, caching and loading the zoo
- ``presets.json``                                  ``smoke``, ``mini`` (CPU) and ``base`` (GPU)
"""

from __future__ import annotations

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.settings.base import Setting
from surgery_lib.settings.offline.suite import load_suite
from surgery_lib.settings.offline.zoo import build_offline_zoo


class OfflineSetting(Setting):
    name = "offline"
    description = "eight generated tasks and a zoo trained on this machine"

    def check_preset(self, preset):
        if preset.suite is None or preset.recipe is None:
            raise SurgeryBookError(
                f"preset {preset.name!r} of the offline setting has no {'suite' if preset.suite is None else 'recipe'}",
                "give it a suite and a recipe section (see `surgery-book presets --json` for the mini preset's)",
            )

    def build_zoo(self, preset, *, options=None, **zoo_options):
        # The offline setting has no options of its own; the rest (device, cache_dir, ...) are build_offline_zoo's.
        return build_offline_zoo(preset, **zoo_options)

    def load_suite(self, preset, *, tasks=None, cache_dir=None, workers=None, progress=True, options=None):
        return load_suite(preset, tasks=tasks, cache_dir=cache_dir, workers=workers, progress=progress)


SETTING = OfflineSetting()
