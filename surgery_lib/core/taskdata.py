"""The containers every setting returns: one task's images and labels (:class:`TaskData`), a preset's tasks
(:class:`Suite`), and the normalisation of uint8 images that every encoder input goes through."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery_lib.core.errors import SurgeryBookError

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader


@dataclass
class TaskData:
    """One task's images (uint8, (N, 3, H, W)) and labels (int64, (N,)) per split."""

    name: str
    class_names: tuple[str, ...]
    images: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    #: Where each split's images are cached on disk, where known.
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.images)

    def with_split(self, name: str, source: str, index: torch.Tensor) -> TaskData:
        """A copy with one more split ``name`` holding the images (and labels) ``index`` of split ``source``."""
        return dataclasses.replace(
            self,
            images={**self.images, name: self.images[source][index]},
            labels={**self.labels, name: self.labels[source][index]},
            files=dict(self.files),
        )

    def normalized(self, split: str, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images of ``split`` (optionally a subset) as float32 (N, 3, H, W), normalised for the encoder."""
        images = self.images[split] if index is None else self.images[split][index]
        return normalize(images, self.mean, self.std)

    def few_shot(self, split: str, shots: int, seed: int = 0) -> torch.Tensor:
        """Indices of ``shots`` random images per class of ``split`` (all of them if ``shots`` is 0)."""
        import torch

        labels = self.labels[split]
        if shots <= 0:
            return torch.arange(len(labels))
        generator = torch.Generator().manual_seed(seed)
        picks = []
        for label in range(self.num_classes):
            members = torch.nonzero(labels == label).flatten()
            picks.append(members[torch.randperm(len(members), generator=generator)[:shots]])
        return torch.cat(picks).sort().values

    def dataset(self, split: str) -> ImageDataset:
        """A map-style dataset of ``(normalised image, label)`` pairs for ``split``."""
        return ImageDataset(self.images[split], self.labels[split], self.mean, self.std)

    def loader(
        self, split: str, batch_size: int = 256, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> DataLoader:
        """A standard :class:`~torch.utils.data.DataLoader` over ``split``, seeded when shuffling.

        Batches are gathered with one tensor index each (no per-sample Python calls), so iterating is
        about as fast as slicing the tensors directly.
        """
        import torch
        from torch.utils.data import (
            BatchSampler,
            DataLoader,
            RandomSampler,
            SequentialSampler,
        )

        dataset = self.dataset(split)
        if shuffle:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
        else:
            sampler = SequentialSampler(dataset)
        return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last), batch_size=None)


class ImageDataset:
    """``dataset[i]`` is one ``(image, label)``; ``dataset[list_of_indices]`` is a whole batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
        self.images, self.labels, self.mean, self.std = images, labels, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(self.images[index], self.mean, self.std), self.labels[index]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 ``(x / 255 - mean) / std`` per channel."""
    import torch

    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return (images.float() / 255 - mean_t) / std_t


@dataclass
class Suite:
    """The tasks of a preset plus the pretraining mix, all in memory (real-CLIP suites: memory-mapped,
    with neither a suite config nor a mix)."""

    config: Any  # the setting's data configuration (the offline SuiteConfig; None for real CLIP)
    tasks: dict[str, TaskData]
    mix: TaskData | None
    files: dict[str, Path] = field(default_factory=dict)
    #: The setting's data cards (a DataFrame indexed by task); None: the generic cards of :meth:`cards`.
    describe: Callable[[], pd.DataFrame] | None = field(default=None, repr=False, compare=False)

    def __getitem__(self, task: str) -> TaskData:
        try:
            return self.tasks[task]
        except KeyError:
            raise SurgeryBookError(
                f"task {task!r} is not part of this suite",
                f"use one of: {', '.join(self.tasks)} (or load a preset that includes it)",
            ) from None

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    def cards(self) -> pd.DataFrame:
        """One data card per task (and the mix): classes, split sizes, source and licence."""
        if self.describe is not None:
            return self.describe()
        import pandas as pd  # the generic cards: what was read from the data, in the same columns

        rows = [
            {
                "task": n,
                "stands in for": n,
                "classes": d.num_classes,
                "train": len(d.labels.get("train", ())),
                "adapt": len(d.labels.get("adapt", ())),
                "test": len(d.labels.get("test", ())),
                "source": str(self.files.get(n, "")),
                "licence": "the dataset's own terms",
            }
            for n, d in self.tasks.items()
        ]
        return pd.DataFrame(rows).set_index("task")
