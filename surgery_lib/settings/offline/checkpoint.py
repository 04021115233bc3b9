"""Mid-training checkpoints: a killed zoo build resumes inside the model it was training, bit for bit.

The zoo already resumes at the last finished model; at ``base`` scale one model (pretraining) is most of the
build, so a killed or preempted job would lose it whole. A training loop therefore saves its entire state
every :data:`CHECKPOINT_EVERY_S` seconds (the trained tensors, the optimiser, the schedule, the random
generators, how many batches it consumed and the losses so far) into one file of the zoo's ``checkpoints/``
folder. A rerun restores it, replays the data streams to the same batch, and trains on: the finished model is
the one an uninterrupted run trains. That holds on the same device and thread count only (the kernels'
reduction order depends on both), so a checkpoint written under others is discarded with a warning.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.storage import atomic_path, to_json

log = logging.getLogger(__name__)

#: Seconds between two saves of a training loop's state: at most this much training is lost to a kill. One save
#: of the mini encoder's state (weights and AdamW moments, 10.2 MB) took 17 ms on 2 cores (AMD EPYC), about six
#: per mini zoo build.
CHECKPOINT_EVERY_S = 60.0


@dataclass
class TrainingCheckpoint:
    """Where one training loop keeps its state, and what a saved state must match to be resumed.

    Args:
        path: the checkpoint file (written atomically; deleted by the zoo once the model is saved).
        key: JSON-able description of the run (model, inputs, config, device, threads); a saved state is
            resumed only under an equal key.
        every_s: seconds between saves (0: after every step, as the tests use).
    """

    path: Path
    key: Mapping[str, Any]
    every_s: float = CHECKPOINT_EVERY_S
    #: Seconds the earlier runs trained up to the restored state (0 until :meth:`restore` finds one).
    earlier_s: float = field(default=0.0, init=False)
    _started: float = field(default_factory=time.monotonic, init=False, repr=False)
    _last_save: float = field(default_factory=time.monotonic, init=False, repr=False)
    _warned: bool = field(default=False, init=False, repr=False)

    def seconds(self) -> float:
        """Training seconds behind the current state: the earlier runs' up to the restored state, plus this run's
        since this object was made (a kill loses the seconds after the last save, and so does this count)."""
        return self.earlier_s + time.monotonic() - self._started

    def restore(self) -> dict[str, Any] | None:
        """The saved state if one exists for this key, else None (an unusable file is deleted with a warning)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated, not torch's format, unsafe pickle: all mean start over
            self._discard(f"it cannot be read ({type(exc).__name__})")
            return None
        saved = _recorded_key(state)
        expected = json.loads(to_json(self.key))  # compared as data: the order of a key's fields does not matter
        if saved != expected:
            self._discard(_difference(saved, expected))
            return None
        missing = sorted(_STATE_FIELDS - set(state))
        if missing:
            self._discard(f"it lacks {', '.join(missing)}")
            return None
        log.info("resuming from %s at step %d", self.path, state["step"])
        seconds = state.get("seconds")
        self.earlier_s = float(seconds) if isinstance(seconds, int | float) else 0.0  # none before it was recorded
        return state

    def due(self) -> bool:
        """Whether :attr:`every_s` have passed since the last save (or since this object was made)."""
        return time.monotonic() - self._last_save >= self.every_s

    def save(self, state: Mapping[str, Any]) -> None:
        """Write ``state`` with this checkpoint's key, atomically: a kill during the write keeps the last one.

        A failed write (a full disk, an unwritable folder) is a warning, once, not an error: a checkpoint only
        saves time, so training goes on, and a lasting problem is reported when the finished model is saved.
        """
        try:
            with atomic_path(self.path) as temporary:
                torch.save({**state, "key": to_json(self.key), "seconds": self.seconds()}, temporary)
        except (
            OSError,
            RuntimeError,
            SurgeryBookError,
        ) as exc:  # torch's zip writer reports a failed write as RuntimeError
            if not self._warned:
                log.warning(
                    "cannot save the training checkpoint %s (%s); training goes on, but a kill from now on loses "
                    "the steps since the last checkpoint saved",
                    self.path,
                    exc,
                )
                self._warned = True
        self._last_save = time.monotonic()

    def discard(self) -> None:
        """Delete the file (the model it was for is finished)."""
        self.path.unlink(missing_ok=True)

    def _discard(self, why: str) -> None:
        log.warning("training checkpoint %s is not resumed: %s; training this model from its start", self.path, why)
        self.discard()


#: What :func:`save_loop` writes besides the key (and ``cuda_rng`` on a GPU).
_STATE_FIELDS = {"step", "parameters", "optimizer", "schedule", "generator", "torch_rng", "losses"}


def _recorded_key(state: Any) -> dict[str, Any] | None:
    """The key a saved state records (stored as JSON text), or None if it records none."""
    try:
        recorded = json.loads(state["key"])
    except (TypeError, KeyError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def _difference(recorded: dict[str, Any] | None, key: dict[str, Any]) -> str:
    """Which fields of ``key`` a saved checkpoint's key differs in, for the warning."""
    if recorded is None:
        return "it records no key"
    fields = sorted(name for name in {*recorded, *key} if recorded.get(name) != key.get(name))
    return "it was saved for another " + ", ".join(
        f"{name} ({recorded.get(name)!r}, now {key.get(name)!r})" for name in fields
    )


def resume_loop(
    checkpoint: TrainingCheckpoint | None,
    parameters: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    streams: Sequence[Iterator[Any]],
    device: torch.device,
) -> tuple[int, list[float]]:
    """Restore a training loop from ``checkpoint``; returns ``(steps done, losses so far)``, ``(0, [])`` if none.

    ``parameters`` are the tensors the optimiser updates, in its order; ``streams`` the loop's endless batch
    iterators, replayed here to the batch the saved run would draw next (their shuffles are seeded per epoch).
    The global random state is restored after the replay, because starting an epoch's loader draws from it.
    """
    state = checkpoint.restore() if checkpoint is not None else None
    if state is None:
        return 0, []
    saved_shapes = [tuple(tensor.shape) for tensor in state["parameters"]]
    if saved_shapes != [tuple(parameter.shape) for parameter in parameters]:
        checkpoint._discard("its tensors do not fit this model")
        return 0, []
    with torch.no_grad():
        for parameter, saved in zip(parameters, state["parameters"], strict=True):
            parameter.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    generator.set_state(state["generator"])
    for stream in streams:
        for _ in range(state["step"]):
            next(stream)
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return state["step"], state["losses"].tolist()


def save_loop(
    checkpoint: TrainingCheckpoint | None,
    step: int,
    total_steps: int,
    parameters: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    losses: Sequence[float],
    device: torch.device,
) -> None:
    """After ``step`` finished steps, save the loop's state if a save is due (never after the last step)."""
    if checkpoint is None or step >= total_steps or not checkpoint.due():
        return
    state = {
        "step": step,
        "parameters": [parameter.detach().cpu() for parameter in parameters],
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "losses": torch.tensor(losses, dtype=torch.float64),  # loss.item() floats, kept exactly
    }
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    checkpoint.save(state)
