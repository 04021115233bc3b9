"""What a setting provides and how the rest of the package sees it.

A *setting* is where the pretrained model, the experts, the heads and the tasks come from: the offline
suite trained on this machine (:mod:`surgery_lib.settings.offline`) or the papers' real CLIP checkpoints and
datasets (:mod:`surgery_lib.settings.clip`). Each is one folder holding a :class:`Setting` named ``SETTING``
and its ``presets.json``; merging, surgery and the apps only ever see the :class:`Zoo` and :class:`Suite`
a setting returns.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgery_lib.core.errors import SurgeryBookError, refuse_text, use_one_of
from surgery_lib.core.state_dict import state_fingerprint
from surgery_lib.core.storage import TensorStore, config_hash, source_checksum
from surgery_lib.core.taskdata import Suite
from surgery_lib.evaluation import results_table
from surgery_lib.models import (
    ClassificationHead,
    StateDict,
    load_encoder,
    task_features,
)
from surgery_lib.presets import Preset

if TYPE_CHECKING:
    import pandas as pd

#: Rows of the zoo's accuracy table (manifest key -> label), in the order of the papers' tables.
ZOO_ROWS = {"pretrained": "pretrained + probe", "expert": "individual (expert)", "mtl": "traditional MTL"}
#: The label every setting gives its experts' row (tables and plots single it out as the reference).
EXPERT_ROW = ZOO_ROWS["expert"]
#: The pretrained model's row where it classifies zero-shot through text-tower heads (real CLIP).
ZERO_SHOT_ROW = "pretrained (zero-shot)"
#: Every reference row label of every setting: rows that are not merges (plots colour them apart).
REFERENCE_ROWS = frozenset({*ZOO_ROWS.values(), ZERO_SHOT_ROW})
#: The folder of a zoo's directory where :meth:`Zoo.features` keeps embeddings on disk.
EMBEDDINGS_DIR = "embeddings"


@functools.cache
def _embedding_code() -> str:
    """What decides an embedding besides weights and data: the module that embeds (an edit there computes
    stored embeddings afresh) and the torch and open_clip versions."""
    source = source_checksum([inspect.getfile(task_features)])
    return f"{source}/torch {torch.__version__}/open_clip {importlib.metadata.version('open_clip_torch')}"


@dataclass
class Zoo:
    """Trained weights of one preset. Encoders are returned as fresh modules so callers may modify them."""

    preset: Preset
    directory: Path
    manifest: dict[str, Any]
    pretrained: StateDict
    heads: dict[str, ClassificationHead]
    experts: dict[str, StateDict]
    mtl: StateDict | None  # None for the real-CLIP presets (the papers' MTL numbers are quoted instead)
    suite: Suite = field(repr=False)
    #: Manifest accuracy key -> row label of the reference rows (the setting's: e.g. "pretrained (zero-shot)" for CLIP).
    reference_labels: dict[str, str] = field(default_factory=lambda: dict(ZOO_ROWS), repr=False)
    #: A checksum of every image and label of ``suite`` (the offline setting's); None where the data have none
    #: (real CLIP: hashing 87k images costs more than embedding them), and then embeddings stay in memory.
    data_fingerprint: str | None = field(default=None, repr=False)
    #: All-zero entries the official TIES trimmed together with this zoo's task vectors (real CLIP: the text-tower
    #: leftovers of the published pickles, so its top 20 % keeps about 26 % of the image tower); 0 elsewhere.
    ties_zero_entries: int = field(default=0, repr=False)
    #: Whether the experts are the published checkpoints the papers merged (real CLIP): a method whose authors
    #: chose a hyper-parameter for them (WUDI's learning rate) takes theirs, a zoo trained here its own.
    published: bool = field(default=False, repr=False)
    _expert_features: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor | None]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    #: The features of the one merged model seen last, ``(weights fingerprint, {key: features})``.
    _merged_features: tuple[str, dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor | None]]] = field(
        default=("", {}), init=False, repr=False, compare=False
    )
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)
    _model_fingerprints: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.experts)

    def features(
        self,
        model: nn.Module,
        task: str,
        split: str = "test",
        *,
        blocks: bool = False,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        fingerprint: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``model``'s features of ``task``'s ``split`` images: final (N, output_dim) and, with ``blocks``, the
        per-block token means (N, blocks, width), float32 on the CPU (``None`` without ``blocks``).
        :func:`~surgery_lib.models.task_features` is the same for a :class:`~surgery_lib.core.taskdata.TaskData`.

        Computed every time unless ``fingerprint``, the checksum of ``model``'s weights
        (:func:`~surgery_lib.core.state_dict.state_fingerprint`, or :meth:`model_fingerprint`), is given; ``model``
        must then be this zoo's encoder loaded with those weights. Then they are

        - kept in memory for the last model asked about that way: ablations run surgery many times on one merge
          (ranks, data amounts, seeds, V1 then V2), and with one model's only, memory stays that of one run (for
          ViT-L/14 with blocks, gigabytes);
        - and kept on disk under ``<zoo>/embeddings/`` where the zoo has a :attr:`data_fingerprint` (the offline
          setting): every process that evaluates the same model (a chapter's sweep, the next chapter's tables,
          the tests) reads them instead of embedding the test sets again. The file's key holds everything that
          decides the numbers: the weights, the task, split, blocks and precision, the data's checksum, the zoo's
          config, the embedding code (``models.py``), the torch and open_clip versions, the device type and
          torch's thread count; any change computes them afresh.

        Treat them as read-only; :meth:`expert_features` keeps the experts'; :meth:`forget_features` frees both
        (the files stay; :func:`~surgery_lib.settings.offline.zoo.clear_zoo` deletes them).
        """
        if fingerprint is None:
            return task_features(model, self.suite[task], split, blocks=blocks, device=device, precision=precision)
        kept_for, kept = self._merged_features
        if kept_for != fingerprint:
            kept = {}
            self._merged_features = (fingerprint, kept)
        key = (task, split, blocks, str(torch.device(device)), precision)
        if key not in kept:
            kept[key] = self._stored_features(model, fingerprint, task, split, blocks, device, precision)
        return kept[key]

    def _stored_features(
        self, model: nn.Module, fingerprint: str, task: str, split: str, blocks: bool, device: Any, precision: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        store, key = self._embedding_store(), self._embedding_key(fingerprint, task, split, blocks, device, precision)
        found = store.get(key) if store is not None else None
        if found is not None and "final" in found:
            return found["final"], found.get("blocks")
        final, means = task_features(model, self.suite[task], split, blocks=blocks, device=device, precision=precision)
        if store is not None:
            store.put(key, {"final": final, **({"blocks": means} if means is not None else {})})
        return final, means

    def _embedding_store(self) -> TensorStore | None:
        if self.data_fingerprint is None:
            return None
        return TensorStore(Path(self.directory) / EMBEDDINGS_DIR)

    def _embedding_key(
        self, fingerprint: str, task: str, split: str, blocks: bool, device: Any, precision: str
    ) -> dict[str, Any]:
        return {
            "weights": fingerprint,
            "task": task,
            "split": split,
            "blocks": blocks,
            "precision": precision,
            "data": self.data_fingerprint,
            "zoo": self.manifest.get("config_hash"),
            "code": _embedding_code(),
            "device": torch.device(device).type,
            "threads": torch.get_num_threads(),
        }

    def model_fingerprint(self, which: str = "pretrained") -> str:
        """The weights checksum of ``"pretrained"``, ``"mtl"`` or a task's expert (as :meth:`encoder` names
        them), computed once per zoo object: what :meth:`features` takes as ``fingerprint``."""
        if which not in self._model_fingerprints:
            named = {
                "pretrained": self.pretrained,
                **({"mtl": self.mtl} if self.mtl is not None else {}),
                **self.experts,
            }
            if which not in named:
                self.encoder(which)  # raises the error that names the models there are
            self._model_fingerprints[which] = state_fingerprint(named[which])
        return self._model_fingerprints[which]

    def expert_features(
        self,
        task: str,
        split: str = "test",
        *,
        blocks: bool = False,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``task``'s expert embeddings of its ``split`` images: final (N, output_dim) and, with ``blocks``,
        the per-block token means (N, blocks, width), float32 on the CPU (``None`` without ``blocks``).

        Every surgery run and bias measurement compares against these targets, and they never change for a
        zoo, so they are computed once per process and kept (the papers' grid reuses them 30 times). Treat
        them as read-only; :meth:`forget_features` frees them (for ViT-L/14 with blocks, gigabytes).
        """
        key = (task, split, blocks, str(torch.device(device)), precision)
        if key not in self._expert_features:
            self._expert_features[key] = self._stored_features(
                self.encoder(task), self.model_fingerprint(task), task, split, blocks, device, precision
            )
        return self._expert_features[key]

    def weights_fingerprint(self) -> str:
        """A checksum of the weights merges are computed from (pretrained, experts, heads): the merge cache
        records it, so a merge of experts that were since rebuilt differently is recomputed, not reused.

        Read from the manifest where it records each model's tensor checksum, else hashed once per zoo object.
        """
        if self._fingerprint is None:
            models = self.manifest.get("models")
            names = ["pretrained", "heads", *(f"expert/{t}" for t in self.tasks)]
            if isinstance(models, dict) and all(
                isinstance(models.get(n), dict) and models[n].get("content") for n in names
            ):
                self._fingerprint = config_hash({n: models[n]["content"] for n in names})
            else:
                heads = {f"{t}.{k}": v for t, h in self.heads.items() for k, v in h.state_dict().items()}
                states = {
                    "pretrained": self.pretrained,
                    "heads": heads,
                    **{f"expert/{t}": s for t, s in self.experts.items()},
                }
                self._fingerprint = config_hash({n: state_fingerprint(s) for n, s in states.items()})
        return self._fingerprint

    def forget_features(self) -> None:
        """Free the embeddings :meth:`expert_features` and :meth:`features` kept."""
        self._expert_features.clear()
        self._merged_features = ("", {})

    def task_subset(self, tasks: Sequence[str] | None) -> list[str]:
        """The zoo's tasks (``None``), or ``tasks`` checked against them: what a merge, its evaluation or a surgery
        run takes as its ``tasks``.

        Raises:
            SurgeryBookError: for a task the zoo does not have (naming the closest one and all of them), one
                named twice (it was used once, silently: a typo is more likely than a wish), no task at all, or
                one name given as a string (whose letters were read as task names).
        """
        if tasks is None:
            return list(self.tasks)
        refuse_text("tasks", tasks, f"pass tasks=[{tasks!r}]")
        names = list(tasks)
        if not names:
            raise SurgeryBookError("no task given (tasks=[])", "name at least one task, or pass tasks=None for all")
        for name in names:
            if name not in self.tasks:
                raise SurgeryBookError(f"the {self.preset.name} zoo has no task {name!r}", use_one_of(name, self.tasks))
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise SurgeryBookError(f"tasks named more than once: {', '.join(repeated)}", "name each task once")
        return names

    def encoder(self, which: str = "pretrained") -> nn.Module:
        """A fresh encoder loaded with ``"pretrained"``, ``"mtl"`` or a task's expert weights."""
        if which == "pretrained":
            state = self.pretrained
        elif which == "mtl" and self.mtl is not None:
            state = self.mtl
        elif which in self.experts:
            state = self.experts[which]
        else:
            models = ["pretrained", *(["mtl"] if self.mtl is not None else [])]
            raise SurgeryBookError(
                f"the zoo has no model {which!r}",
                f"use {', '.join(repr(m) for m in models)} or a task: {', '.join(self.tasks)}",
            )
        return load_encoder(self.preset.encoder, state).eval()

    def reference_rows(self) -> dict[str, dict[str, float]]:
        """The reference rows of the papers' tables, ``{label: {task: accuracy %}}``: pretrained (+ probe
        offline, zero-shot for CLIP), each expert on its own task, and MTL where the zoo has it."""
        accuracy = self.manifest["accuracy"]
        return {
            label: {t: accuracy[key][t] for t in self.tasks}
            for key, label in self.reference_labels.items()
            if key in accuracy
        }

    def accuracy_table(self) -> pd.DataFrame:
        """Test accuracy (%) of the reference rows (:meth:`reference_rows`), with the average."""
        return results_table(self.reference_rows())


class Setting(ABC):
    """The contract of a setting: it builds a preset's zoo and loads its tasks, and says which command-line
    options it takes and which environment variables carry them into notebook kernels."""

    #: The folder name under ``surgery_lib/settings`` (and the ``setting`` field of its presets).
    name: str = ""
    description: str = ""

    @abstractmethod
    def build_zoo(
        self,
        preset: Preset,
        *,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        zoo_dir: str | os.PathLike[str] | None = None,
        rebuild: bool = False,
        progress: bool = True,
        options: Any = None,
        exact: bool = False,
    ) -> Zoo:
        """The preset's zoo: built (or downloaded and converted) once, then loaded from the cache; with ``exact``,
        a model another machine trained is trained again here (:func:`surgery_lib.settings.build_zoo`)."""

    @abstractmethod
    def load_suite(
        self,
        preset: Preset,
        *,
        tasks: Sequence[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        workers: int | None = None,
        progress: bool = True,
        options: Any = None,
    ) -> Suite:
        """The preset's tasks (all, or ``tasks``), prepared once and then read from the cache."""

    def check_preset(self, preset: Preset) -> None:  # noqa: B027  (optional: the generic checks may be all)
        """Check what this setting needs of ``preset`` beyond the generic schema (its own section, the
        sections it trains from); raise a :class:`SurgeryBookError` naming the field. Called before every zoo
        or suite it loads."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: B027  (optional: a setting may add none)
        """Add this setting's command-line options (an argument group) to a subcommand's parser."""

    def options_from_args(self, args: argparse.Namespace) -> Any:
        """This setting's options from parsed arguments (passed back as ``options=``); None: the defaults."""
        return None

    @contextlib.contextmanager
    def exported(self, options: Any) -> Iterator[None]:
        """While inside, ``options`` are where kernels started by papermill find them (environment variables)."""
        yield
