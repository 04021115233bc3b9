"""Mid-training checkpoints: a training loop killed part-way resumes from its last saved state, and the model it
finishes equals, bit for bit, the one an uninterrupted run trains (smoke preset)."""

from __future__ import annotations

import errno
import functools
import json
import logging
from pathlib import Path

import pytest
import torch

from surgery_lib.models import build_encoder, load_encoder
from surgery_lib.presets import get_preset
from surgery_lib.settings import build_zoo
from surgery_lib.settings.offline import checkpoint as checkpoint_module
from surgery_lib.settings.offline import training
from surgery_lib.settings.offline import zoo as zoo_module
from surgery_lib.settings.offline.checkpoint import TrainingCheckpoint
from surgery_lib.settings.offline.zoo import CHECKPOINTS_DIR, MANIFEST

KEY = {"model": "test", "torch_threads": 1}


def _kill_at_step(monkeypatch, step: int) -> list[int]:
    """Make the training loops raise KeyboardInterrupt when they start step ``step`` (0-based); returns the call
    log. Every loop calls ``random_translate`` once per step, after drawing its batch and before any update."""
    calls: list[int] = []
    real = training.random_translate

    def translate(*args, **kwargs):
        calls.append(len(calls))
        if len(calls) == step + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "random_translate", translate)
    return calls


def _count_steps(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = training.random_translate
    monkeypatch.setattr(training, "random_translate", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _pretrain(suite, checkpoint=None):
    torch.manual_seed(7)
    encoder = build_encoder(get_preset("smoke").encoder)
    stats = training.pretrain(
        encoder,
        suite.mix,
        epochs=2,
        lr=1e-3,
        weight_decay=0.05,
        warmup_steps=2,
        batch_size=64,
        translate_px=2,
        seed=7,
        device=torch.device("cpu"),
        progress=False,
        checkpoint=checkpoint,
    )
    return encoder.state_dict(), stats


def _finetune(zoo, mode, checkpoint=None):
    tasks = [(zoo.suite[task], zoo.heads[task]) for task in (["shapes"] if mode == "lora" else zoo.tasks)]
    stats, state = training.finetune(
        load_encoder(zoo.preset.encoder, zoo.pretrained),
        tasks,
        steps=20,
        batch_per_task=16,
        lr=1e-3,
        weight_decay=0.01,
        warmup_fraction=0.2,
        translate_px=2,
        seed=11,
        device=torch.device("cpu"),
        progress=False,
        mode=mode,
        checkpoint=checkpoint,
    )
    return state, stats


LOOPS = {
    "pretraining": lambda zoo, checkpoint=None: _pretrain(zoo.suite, checkpoint),
    "expert (LoRA)": lambda zoo, checkpoint=None: _finetune(zoo, "lora", checkpoint),
    "multi-task (two batch streams)": lambda zoo, checkpoint=None: _finetune(zoo, "full", checkpoint),
}


@pytest.mark.parametrize("loop", LOOPS)
def test_a_loop_killed_part_way_resumes_to_the_weights_of_an_uninterrupted_run(smoke_zoo, tmp_path, monkeypatch, loop):
    train = LOOPS[loop]
    reference_state, reference_stats = train(smoke_zoo)
    steps = reference_stats.steps
    kill_at = steps // 2 + 1  # past the first epoch (pretraining) or before it (fine-tuning): both replays are tested
    path = tmp_path / "loop.pt"

    _kill_at_step(monkeypatch, kill_at)
    with pytest.raises(KeyboardInterrupt):
        train(smoke_zoo, TrainingCheckpoint(path, KEY, every_s=0))
    assert torch.load(path, weights_only=True)["step"] == kill_at  # saved after every finished step
    monkeypatch.undo()

    calls = _count_steps(monkeypatch)
    state, stats = train(smoke_zoo, TrainingCheckpoint(path, KEY, every_s=0))
    assert len(calls) == steps - kill_at, "the rerun trained from the start instead of resuming"
    assert stats == reference_stats  # the losses of the saved steps were kept
    assert stats.resumed_from_step == kill_at and reference_stats.resumed_from_step == 0
    assert state.keys() == reference_state.keys()
    for name, tensor in reference_state.items():
        assert torch.equal(state[name], tensor), name


def test_a_checkpoint_of_another_run_or_a_damaged_one_is_discarded_with_a_warning(tmp_path, caplog):
    path = tmp_path / "loop.pt"
    TrainingCheckpoint(path, {"model": "test", "torch_threads": 2}).save({"step": 3})
    with caplog.at_level(logging.WARNING):
        assert TrainingCheckpoint(path, KEY).restore() is None
    assert "torch_threads (2, now 1)" in caplog.text and "from its start" in caplog.text
    assert not path.exists()

    state = {name: 0 for name in ("parameters", "optimizer", "schedule", "generator", "torch_rng", "losses")}
    TrainingCheckpoint(path, {"torch_threads": 1, "model": "test"}).save({**state, "step": 3})  # key in another order
    assert TrainingCheckpoint(path, KEY).restore()["step"] == 3

    TrainingCheckpoint(path, KEY).save({"step": 3})  # the right key, not the state a loop saves
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert TrainingCheckpoint(path, KEY).restore() is None
    assert "it lacks generator, losses, optimizer, parameters, schedule, torch_rng" in caplog.text

    earlier = TrainingCheckpoint(path, KEY)
    earlier._started -= 100.0  # a run that trained 100 s before its save
    earlier.save({**state, "step": 3})
    resumed = TrainingCheckpoint(path, KEY)
    assert resumed.earlier_s == 0.0 and resumed.restore() is not None
    assert 100.0 <= resumed.earlier_s < 160.0 and resumed.seconds() >= resumed.earlier_s

    TrainingCheckpoint(path, KEY).save({"step": 3})
    path.write_bytes(path.read_bytes()[:100])  # a copy cut short
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert TrainingCheckpoint(path, KEY).restore() is None
    assert "cannot be read" in caplog.text and not path.exists()


def test_a_zoo_build_killed_during_pretraining_resumes_inside_it(smoke_zoo, tmp_path, cache_dir, monkeypatch):
    zoo_dir = tmp_path / "zoo"
    monkeypatch.setattr(zoo_module, "TrainingCheckpoint", functools.partial(TrainingCheckpoint, every_s=0))
    pretraining_steps = json.loads((smoke_zoo.directory / MANIFEST).read_text())["models"]["pretrained"]["steps"]
    kill_at = pretraining_steps - 1
    _kill_at_step(monkeypatch, kill_at)
    with pytest.raises(KeyboardInterrupt):
        build_zoo("smoke", device="cpu", cache_dir=cache_dir, zoo_dir=zoo_dir, progress=False)
    assert [p.name for p in (zoo_dir / CHECKPOINTS_DIR).iterdir()] == ["pretrained.pt"]
    seconds_before_kill = torch.load(zoo_dir / CHECKPOINTS_DIR / "pretrained.pt", weights_only=True)["seconds"]
    monkeypatch.undo()
    monkeypatch.setattr(zoo_module, "TrainingCheckpoint", functools.partial(TrainingCheckpoint, every_s=0))

    calls = _count_steps(monkeypatch)
    resumed = build_zoo("smoke", device="cpu", cache_dir=cache_dir, zoo_dir=zoo_dir, progress=False)
    manifest = json.loads((zoo_dir / MANIFEST).read_text())
    assert len(calls) == sum(entry.get("steps", 0) for entry in manifest["models"].values()) - kill_at
    assert manifest["models"]["pretrained"]["sha256"] == smoke_zoo.manifest["models"]["pretrained"]["sha256"]
    assert manifest["models"]["pretrained"]["resumed_from_step"] == kill_at
    assert manifest["models"]["pretrained"]["wall_time_s"] >= round(seconds_before_kill, 2)  # the earlier run's too
    assert not any("resumed_from_step" in entry for name, entry in manifest["models"].items() if name != "pretrained")
    for task, expert in smoke_zoo.experts.items():
        assert all(torch.equal(tensor, resumed.experts[task][name]) for name, tensor in expert.items())
    assert not list((zoo_dir / CHECKPOINTS_DIR).iterdir())  # each checkpoint deleted once its model was saved


@pytest.mark.parametrize(
    "failure", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("file write failed")], ids=repr
)
def test_a_checkpoint_that_cannot_be_written_warns_once_and_training_goes_on(
    smoke_zoo, tmp_path, monkeypatch, caplog, failure
):
    reference_state, reference_stats = LOOPS["expert (LoRA)"](smoke_zoo)

    def full_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")  # what a write cut short leaves
        raise failure

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with caplog.at_level(logging.WARNING):
        state, stats = LOOPS["expert (LoRA)"](smoke_zoo, TrainingCheckpoint(tmp_path / "loop.pt", KEY, every_s=0))
    assert caplog.text.count("cannot save the training checkpoint") == 1 and "training goes on" in caplog.text
    assert stats == reference_stats and all(torch.equal(state[k], v) for k, v in reference_state.items())
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary
