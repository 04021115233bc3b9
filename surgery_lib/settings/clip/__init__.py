"""The papers' setting: OpenAI CLIP ViT-B/32, B/16 and L/14, the published experts and heads, the eight datasets.

- :mod:`~surgery_lib.settings.clip.config`       this setting's section of a preset (model, hub id, family, TIES scope, tasks)
- :mod:`~surgery_lib.settings.clip.tasks`        the eight tasks: classes, prompt templates, sizes
- :mod:`~surgery_lib.settings.clip.published`    the papers' ViT-B/32 averages, keyed like the table rows
- :mod:`~surgery_lib.settings.clip.sources`      where checkpoints and data come from (the ``SURGERY_BOOK_*`` variables)
- :mod:`~surgery_lib.settings.clip.safe_pickle`  the safe unpickler of task_vectors' pickles (allow-listed globals only)
- :mod:`~surgery_lib.settings.clip.task_vectors` the task_vectors folder: encoders, heads, conversion
- :mod:`~surgery_lib.settings.clip.fusionbench`  FusionBench's hub experts: snapshots, name mapping, conversion
- :mod:`~surgery_lib.settings.clip.converted`    the converted format (safetensors + manifest) and its open_clip encoder
- :mod:`~surgery_lib.settings.clip.checkpoints`  the four above's public names in one place
- :mod:`~surgery_lib.settings.clip.data`         the datasets, decoded once into the cache
- :mod:`~surgery_lib.settings.clip.zero_shot`    zero-shot heads from the text tower
- :mod:`~surgery_lib.settings.clip.zoo`          all of it behind the :class:`~surgery_lib.settings.base.Zoo` interface
- ``presets.json``                                ``clip-vit-b-32``, ``clip-vit-b-16``, ``clip-vit-l-14``
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

from surgery_lib.core.errors import SurgeryBookError, path_argument
from surgery_lib.settings.base import Setting
from surgery_lib.settings.clip.config import clip_config
from surgery_lib.settings.clip.sources import FAMILIES, TEST_FOLDERS, VARIABLES, ClipSources
from surgery_lib.settings.clip.zoo import clip_suite, load_clip_zoo


class ClipSetting(Setting):
    name = "clip"
    description = "the papers' CLIP checkpoints, heads and datasets"

    def check_preset(self, preset):
        clip_config(preset)

    def build_zoo(
        self,
        preset,
        *,
        device=None,
        cache_dir=None,
        zoo_dir=None,
        rebuild=False,
        progress=True,
        options=None,
        exact=False,  # met as it is: nothing here is trained, the published checkpoints are converted as they are
    ):
        if zoo_dir is not None or rebuild:
            raise SurgeryBookError(
                f"zoo_dir and rebuild do not apply to the real-CLIP preset {preset.name!r}",
                "its caches live under <cache>/clip/; delete a file there to redo that step",
            )
        sources = ClipSources.from_environment(preset, **(options or {}))
        return load_clip_zoo(preset, device=device, cache_dir=cache_dir, sources=sources, progress=progress)

    def load_suite(self, preset, *, tasks=None, cache_dir=None, workers=None, progress=True, options=None):
        sources = ClipSources.from_environment(preset, **(options or {}))
        return clip_suite(preset, sources=sources, tasks=tasks, cache_dir=cache_dir, workers=workers, progress=progress)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(
            "real CLIP presets (clip-vit-b-32, clip-vit-b-16, clip-vit-l-14)",
            "each option overrides its SURGERY_BOOK_* variable and is passed on to the notebooks that reproduce runs",
        )
        group.add_argument(
            "--family",
            choices=FAMILIES,
            default=None,
            help=f"checkpoint family (default task_vectors; ${VARIABLES['family']})",
        )
        group.add_argument(
            "--checkpoints",
            type=path_argument,
            default=None,
            help="task_vectors' folder, a converted folder, or FusionBench "
            f"snapshots; 'hub' for FusionBench from the hub (${VARIABLES['checkpoints']})",
        )
        group.add_argument(
            "--data-source",
            choices=("hub", "local"),
            default=None,
            help=f"datasets from the Hugging Face hub (default) or task_vectors' folders (${VARIABLES['data_source']})",
        )
        group.add_argument(
            "--data-root",
            type=path_argument,
            default=None,
            help=f"root of task_vectors' dataset folders (${VARIABLES['data_root']})",
        )
        group.add_argument(
            "--test-folder",
            choices=TEST_FOLDERS,
            default=None,
            help="which DTD/SUN397 folder is the test split in the local layout (default val, as task_vectors)",
        )
        group.add_argument(
            "--validation-images",
            type=int,
            default=None,
            metavar="N",
            help="labelled images per task held out of its training split as task_vectors held them out (10 %%, at "
            "most 5,000; EuroSAT: its val folder), at most N; the *_tuned merges choose their hyper-parameters on "
            f"them (default 0: no validation split; ${VARIABLES['validation_images']})",
        )

    def options_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {field: getattr(args, field, None) for field in VARIABLES}

    @contextlib.contextmanager
    def exported(self, options: Any) -> Iterator[None]:
        with ClipSources.exported(options or {}):
            yield


SETTING = ClipSetting()
