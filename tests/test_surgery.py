"""Surgery and SurgeryV2: identity at initialisation, equivalence with the official loop, seeds, saving."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from surgery_lib.bias import block_bias
from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.evaluation import accuracy_from_features
from surgery_lib.merging import task_arithmetic
from surgery_lib.models import forward_blocks, load_encoder
from surgery_lib.settings import base as settings_base
from surgery_lib.surgery.run import (
    bias_table,
    block_bias_table,
    load_surgery,
    run_surgery,
    save_surgery,
    task_embeddings,
)
from surgery_lib.surgery.v1 import SurgeryConfig, TaskSurgery, train_surgery
from surgery_lib.surgery.v2 import DeepSurgery


@pytest.fixture(scope="module")
def merged_state(smoke_zoo):
    return task_arithmetic(smoke_zoo.pretrained, smoke_zoo.experts, 0.3)


def test_surgery_starts_as_the_identity(smoke_zoo, merged_state):
    modules = TaskSurgery(("mnist", "shapes"), 64, rank=16, seed=3)
    z = torch.randn(2, 5, 64)
    assert torch.equal(modules(z), z)
    assert torch.equal(modules.module("shapes")(z[1]), z[1])
    run = run_surgery(smoke_zoo, merged_state, config=SurgeryConfig(steps=0), progress=False)
    assert run.accuracy_after == run.accuracy_before and run.bias_after == run.bias_before


def test_surgery_v2_starts_as_the_identity(smoke_zoo, merged_state):
    from surgery_lib.models import load_encoder

    encoder = load_encoder(smoke_zoo.preset.encoder, merged_state)
    deep = DeepSurgery.for_encoder(encoder, ("mnist", "shapes"), rank=4)
    images = torch.stack([smoke_zoo.suite[t].normalized("test", slice(0, 3)) for t in ("mnist", "shapes")])
    with torch.no_grad():
        final, means = deep.forward_tasks(encoder, images)
        plain_final, plain_means = forward_blocks(encoder, images.flatten(0, 1))
    assert torch.allclose(final.flatten(0, 1), plain_final, atol=1e-6)
    assert torch.allclose(means.flatten(0, 1), plain_means, atol=1e-6)


def _official_v1_replay(merged, expert, config):
    """The official procedure, step by step: one torch.optim.Adam over every task's own module, and for
    each task's batch, in the official order, zero_grad / backward / step. ``zero_grad(set_to_none=False)``
    is torch 1.10's behaviour (the published runs); ``True`` is torch >= 2's."""
    tasks = tuple(merged)
    initial = TaskSurgery(tasks, next(iter(merged.values())).shape[1], config.rank, config.seed)
    modules = torch.nn.ModuleList([initial.module(t) for t in tasks])
    optimizer = torch.optim.Adam(modules.parameters(), lr=config.lr)
    for iteration in config.iterations([len(merged[t]) for t in tasks]):
        for i, task in enumerate(tasks):
            for index in iteration.batches[i]:
                loss = (modules[i](merged[task][index]) - expert[task][index]).abs().mean()
                optimizer.zero_grad(set_to_none=config.adam != "shared")
                loss.backward()
                optimizer.step()
    return modules


def _features(sizes, dim=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    merged = {f"task{i}": torch.randn(n, dim, generator=generator) for i, n in enumerate(sizes)}
    expert = {t: z + 0.5 * torch.randn(z.shape, generator=generator) + 0.2 for t, z in merged.items()}
    return merged, expert


@pytest.fixture
def float64():
    """Run a test in double precision: equivalence tests of the Surgery and SurgeryV2 trainers compare there.

    In float32 the two computations sum in different orders, and the L1 loss on one-image batches (the online
    variant) turns a residual within rounding of zero into a gradient of either sign, which Adam scales to a
    full step: on an Intel Xeon (AVX-512) the batched trainer and the replay differed by 1.8e-4 on 16 weights
    where an AMD EPYC agreed to 2e-5. In float64 they agree exactly there (0.0 for Surgery, measured on the Intel
    Xeon), and a tolerance of 1e-10 leaves room for another processor's rounding, not for another procedure."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


#: Agreement demanded of two orders of the same float64 computation.
EXACT = {"atol": 1e-10, "rtol": 1e-9}


@pytest.mark.parametrize("adam", ["shared", "per-task"])
@pytest.mark.parametrize("online", [False, True])
def test_batched_trainer_equals_a_step_by_step_replay_of_the_official_loop(adam, online, float64):
    # Three tasks: a short second batch (20 images), a task with a single short batch (10), and an odd
    # step count, so the last iteration takes one batch per task.
    merged, expert = _features([40, 20, 10])
    config = SurgeryConfig(rank=4, steps=21, batch_size=16, lr=1e-2, seed=3, eval_every=0, adam=adam, online=online)
    reference = _official_v1_replay(merged, expert, config)
    batched, history = train_surgery(merged, expert, config, progress=False)
    for i in range(3):
        assert batched.up[i].abs().sum() > 0 and batched.up.dtype == torch.float64  # it did train, in float64
        torch.testing.assert_close(batched.down[i], reference[i].down.weight, **EXACT)
        torch.testing.assert_close(batched.up[i], reference[i].up.weight, **EXACT)
    assert len(history.loss) == (40 + 20 + 10 if online else 21)  # online: each task's pass in turn, one step per image


@pytest.mark.parametrize(("adam", "tasks_per_pass"), [("shared", None), ("per-task", None), ("shared", 1)])
def test_surgery_v2_batched_trainer_equals_a_step_by_step_replay(
    smoke_zoo, merged_state, adam, tasks_per_pass, float64
):
    from surgery_lib.models import embed_blocks, load_encoder
    from surgery_lib.surgery.v2 import train_deep_surgery

    tasks = smoke_zoo.tasks
    encoder = load_encoder(smoke_zoo.preset.encoder, merged_state).double().eval().requires_grad_(False)
    # Few images per task, so that batches come short and one task takes a single batch per iteration.
    data = {t: smoke_zoo.suite[t].with_split("few", "adapt", torch.arange(n)) for t, n in zip(tasks, (20, 12))}
    targets = {  # the experts' embeddings are data here: computed as usual, then held in float64
        t: tuple(
            x.double()
            for x in embed_blocks(smoke_zoo.encoder(t).float(), data[t].images["few"], data[t].mean, data[t].std)
        )
        for t in tasks
    }
    config = SurgeryConfig(rank=4, steps=5, batch_size=8, lr=1e-2, seed=2, eval_every=0, adam=adam)
    batched, _ = train_deep_surgery(
        encoder, data, targets, config, split="few", progress=False, tasks_per_pass=tasks_per_pass
    )

    initial = DeepSurgery.for_encoder(encoder, tasks, config.rank, config.seed)
    modules = torch.nn.ModuleList([DeepSurgery.for_encoder(encoder, (t,), config.rank) for t in tasks])
    with torch.no_grad():
        for i, module in enumerate(modules):
            for name, value in initial.state_dict().items():
                module.state_dict()[name].copy_(value[i : i + 1])
    optimizer = torch.optim.Adam(modules.parameters(), lr=config.lr)
    for iteration in config.iterations([len(data[t].labels["few"]) for t in tasks]):
        for i, task in enumerate(tasks):
            for index in iteration.batches[i]:
                images = data[task].normalized("few", index).double()
                final, means = modules[i].forward_tasks(encoder, images[None])
                loss = (means[0] - targets[task][1][index]).abs().mean(dim=(0, 2)).sum()
                loss = loss + (final[0] - targets[task][0][index]).abs().mean()
                optimizer.zero_grad(set_to_none=adam != "shared")
                loss.backward()
                optimizer.step()
    for i, module in enumerate(modules):
        for name, value in module.state_dict().items():
            torch.testing.assert_close(batched.state_dict()[name][i : i + 1], value, **EXACT, msg=name)
    assert batched.block_up.abs().sum() > 0 and batched.block_up.dtype == torch.float64


def test_surgery_v2_out_of_gpu_memory_runs_fewer_tasks_per_pass_with_the_same_result(
    smoke_zoo, merged_state, monkeypatch, caplog
):
    from surgery_lib.models import embed_blocks, load_encoder
    from surgery_lib.surgery.v2 import train_deep_surgery

    tasks = smoke_zoo.tasks
    encoder = load_encoder(smoke_zoo.preset.encoder, merged_state).eval().requires_grad_(False)
    data = {t: smoke_zoo.suite[t].with_split("few", "adapt", torch.arange(24)) for t in tasks}
    targets = {
        t: embed_blocks(smoke_zoo.encoder(t).float(), data[t].images["few"], data[t].mean, data[t].std) for t in tasks
    }
    config = SurgeryConfig(rank=4, steps=4, batch_size=8, lr=1e-2, seed=1, eval_every=0)
    together, together_history = train_deep_surgery(encoder, data, targets, config, split="few", progress=False)

    passes = []
    forward_tasks = DeepSurgery.forward_tasks

    def small_gpu(self, encoder, images, rows=None, **kwargs):  # as if two tasks' activations did not fit
        passes.append(len(images))
        if len(images) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 44.00 GiB")
        return forward_tasks(self, encoder, images, rows, **kwargs)

    monkeypatch.setattr(DeepSurgery, "forward_tasks", small_gpu)
    with caplog.at_level("WARNING"):
        apart, apart_history = train_deep_surgery(encoder, data, targets, config, split="few", progress=False)
    assert passes[:3] == [2, 1, 1] and set(passes[3:]) == {1}  # one failed pass, then one task per pass
    assert "ran out of memory with 2 tasks per pass: 1 per pass from now on" in caplog.text
    for name, value in together.state_dict().items():
        torch.testing.assert_close(apart.state_dict()[name], value, atol=1e-6, rtol=1e-5, msg=name)
    assert apart_history.loss == pytest.approx(together_history.loss, rel=1e-5)

    def no_gpu_memory(self, encoder, images, rows=None, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 5.50 GiB")

    for wrong in (0, -1, True):
        with pytest.raises(SurgeryBookError, match="a pass takes at least one task"):
            train_deep_surgery(encoder, data, targets, config, split="few", progress=False, tasks_per_pass=wrong)
    monkeypatch.setattr(DeepSurgery, "forward_tasks", no_gpu_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # one task per pass does not fit: nothing is left to shrink
        train_deep_surgery(encoder, data, targets, config, split="few", progress=False)


def test_shared_adam_moves_idle_modules_and_per_task_does_not():
    merged, expert = _features([32, 32])
    shared, _ = train_surgery(merged, expert, SurgeryConfig(rank=4, steps=2, lr=1e-2, eval_every=0), progress=False)
    per_task, _ = train_surgery(
        merged, expert, SurgeryConfig(rank=4, steps=2, lr=1e-2, eval_every=0, adam="per-task"), progress=False
    )
    # One iteration: task 0 steps twice, then coasts through task 1's two steps; task 1 is last and never coasts.
    assert not torch.allclose(shared.up[0], per_task.up[0], atol=1e-7)
    torch.testing.assert_close(shared.up[1], per_task.up[1], atol=1e-7, rtol=0)
    torch.testing.assert_close(shared.down[1], per_task.down[1], atol=1e-7, rtol=0)


def test_coasting_in_closed_form_equals_torch_adam_with_zero_gradients():
    from surgery_lib.surgery.schedule import TaskAdam

    torch.manual_seed(0)
    weights = torch.nn.Parameter(torch.randn(3, 5))
    reference = [torch.nn.Parameter(weights[t].detach().clone()) for t in range(3)]
    optimizer = torch.optim.Adam(reference, lr=0.05)
    adam = TaskAdam([weights], 3, lr=0.05)
    grads = torch.randn(3, 5)
    weights.grad = grads.clone()
    adam.step()
    adam.coast([7, 0, 300])
    adam.flush()
    for t, p in enumerate(reference):
        p.grad = grads[t].clone()
    optimizer.step()
    for t, extra in enumerate([7, 0, 300]):
        for _ in range(extra):
            others = [q for q in reference if q is not reference[t]]
            for q in others:
                q.grad = None
            reference[t].grad = torch.zeros(5)
            optimizer.step()
    torch.testing.assert_close(weights.detach(), torch.stack([p.detach() for p in reference]), atol=1e-6, rtol=1e-5)
    assert adam.steps == [8, 1, 301]


def test_official_iterations_draw_two_batches_from_a_fresh_shuffle_each_iteration():
    from surgery_lib.surgery.schedule import official_iterations

    iterations = list(official_iterations([40, 20, 10], steps=5, batch_size=16, seed=1))
    assert [it.counts for it in iterations] == [[2, 2, 1], [2, 2, 1], [1, 1, 1]]
    assert [len(b) for b in iterations[0].batches[1]] == [16, 4]  # a DataLoader without drop_last
    for it in iterations:
        for batches in it.batches:
            flat = torch.cat(batches)
            assert len(set(flat.tolist())) == len(flat)  # within an iteration: one permutation, no repeats
    assert iterations[0].before == [0, 2, 4] and iterations[0].after == [3, 1, 0]
    assert not torch.equal(iterations[0].batches[0][0], iterations[1].batches[0][0])  # a fresh shuffle
    # Asking for a batch larger than the task is one short batch per iteration, not a hang.
    huge = next(official_iterations([3], steps=2, batch_size=1_000_000))
    assert [len(b) for b in huge.batches[0]] == [3]


@pytest.mark.parametrize("order", ["official", "interleaved"])
def test_online_iterations_see_every_image_once_with_checkpoints(order):
    from surgery_lib.surgery.schedule import ONLINE_CHECKPOINTS, online_iterations

    iterations = list(online_iterations([1000, 250], seed=0, order=order))
    if order == "official":  # task 0's whole pass, cut at every checkpoint, then task 1's
        assert [(it.checkpoint, it.checkpoint_tasks) for it in iterations] == [
            (p, (t,)) for t in (0, 1) for p in ONLINE_CHECKPOINTS
        ]
        assert all(not it.batches[1] for it in iterations[: len(ONLINE_CHECKPOINTS)])
    else:
        assert [it.checkpoint for it in iterations] == list(ONLINE_CHECKPOINTS)
    first_task = [it for it in iterations if it.batches[0]]
    assert [sum(it.counts[0] for it in first_task[: k + 1]) for k in range(2)] == [10, 100]
    for t, size in enumerate([1000, 250]):
        seen = torch.cat([b for it in iterations for b in it.batches[t]])
        assert sorted(seen.tolist()) == list(range(size))


def _official_online_replay(merged, expert, config):
    """The official online script step by step (``main_AdaMerging_with_surgery_online.py``): one torch.optim.Adam
    over every task's module; each task in turn makes its whole pass, one image at a time in its shuffled order,
    zero_grad / backward / step. Returns the modules at the end and each task's module at the end of its pass."""
    from surgery_lib.surgery.schedule import task_seed

    tasks = tuple(merged)
    initial = TaskSurgery(tasks, next(iter(merged.values())).shape[1], config.rank, config.seed)
    modules = torch.nn.ModuleList([initial.module(t) for t in tasks])
    optimizer = torch.optim.Adam(modules.parameters(), lr=config.lr)
    end_of_pass = {}
    for i, task in enumerate(tasks):
        order = torch.randperm(len(merged[task]), generator=torch.Generator().manual_seed(task_seed(config.seed, i)))
        for index in order:
            loss = (modules[i](merged[task][index[None]]) - expert[task][index[None]]).abs().mean()
            optimizer.zero_grad(set_to_none=config.adam != "shared")
            loss.backward()
            optimizer.step()
        end_of_pass[task] = (modules[i].down.weight.detach().clone(), modules[i].up.weight.detach().clone())
    return modules, end_of_pass


@pytest.mark.parametrize("adam", ["shared", "per-task"])
def test_online_surgery_equals_the_official_online_loop_task_by_task(adam, float64):
    merged, expert = _features([40, 20, 10])
    config = SurgeryConfig(rank=4, lr=1e-2, seed=3, eval_every=0, adam=adam, online=True)
    reference, reference_end = _official_online_replay(merged, expert, config)
    batched, history = train_surgery(merged, expert, config, progress=False)
    for i, task in enumerate(merged):
        # At the end of the run: under shared Adam the first two tasks coasted through the later passes.
        torch.testing.assert_close(batched.down[i], reference[i].down.weight, **EXACT)
        torch.testing.assert_close(batched.up[i], reference[i].up.weight, **EXACT)
        # What the official log evaluates: each module as its own pass left it.
        torch.testing.assert_close(history.end_of_pass[task].down.weight, reference_end[task][0], **EXACT)
        torch.testing.assert_close(history.end_of_pass[task].up.weight, reference_end[task][1], **EXACT)
    # The interleaved order is the same computation only under per-task Adam.
    interleaved, _ = train_surgery(
        merged, expert, dataclasses.replace(config, online_order="interleaved"), progress=False
    )
    gap = max((interleaved.up[i] - reference[i].up.weight).abs().max().item() for i in range(3))
    assert gap > 1e-3 if adam == "shared" else gap < 1e-10


def test_surgery_lowers_bias_and_seeds_reproduce(smoke_zoo, merged_state):
    config = SurgeryConfig(rank=8, steps=150, batch_size=32, lr=1e-2, seed=1, eval_every=50)
    first = run_surgery(smoke_zoo, merged_state, config=config, progress=False)
    again = run_surgery(smoke_zoo, merged_state, config=config, progress=False)
    other = run_surgery(
        smoke_zoo, merged_state, config=SurgeryConfig(rank=8, steps=150, batch_size=32, lr=1e-2, seed=2), progress=False
    )
    for task in smoke_zoo.tasks:
        assert first.bias_after[task] < first.bias_before[task]
    assert torch.equal(first.modules.down, again.modules.down) and torch.equal(first.modules.up, again.modules.up)
    assert first.accuracy_after == again.accuracy_after
    assert not torch.equal(first.modules.down, other.modules.down)
    assert sorted(first.history.accuracy) == [0, 50, 100, 150]
    assert first.history.accuracy[0] == first.accuracy_before


def test_runs_on_one_merge_embed_it_once_and_another_merge_replaces_it(smoke_zoo, merged_state, monkeypatch):
    config = SurgeryConfig(rank=4, steps=30, batch_size=32, seed=1)
    monkeypatch.setattr(smoke_zoo, "data_fingerprint", None)  # what is kept in memory; tests/test_zoo.py: on disk
    smoke_zoo.forget_features()
    fresh = run_surgery(smoke_zoo, merged_state, config=config, block_bias_too=True, progress=False)
    for task in smoke_zoo.tasks:  # the experts' too, so that what follows counts merged embeddings only
        smoke_zoo.expert_features(task, "adapt"), smoke_zoo.expert_features(task, "test")
    computed = []
    original = settings_base.task_features
    monkeypatch.setattr(settings_base, "task_features", lambda *a, **k: computed.append(a[2]) or original(*a, **k))
    again = run_surgery(smoke_zoo, merged_state, config=config, block_bias_too=True, progress=False)
    v2 = run_surgery(smoke_zoo, merged_state, version=2, config=config, progress=False)
    assert computed == []  # the same merge: V1 again and V2 (blocks) reuse the first run's embeddings
    assert again.accuracy_after == fresh.accuracy_after and again.bias_before == fresh.bias_before
    assert v2.accuracy_before == fresh.accuracy_before
    run_surgery(smoke_zoo, merged_state, config=config, split="adapt", block_bias_too=True, progress=False)
    assert computed == ["adapt"] * len(smoke_zoo.tasks)  # a split not asked for yet is computed, once
    other = task_arithmetic(smoke_zoo.pretrained, smoke_zoo.experts, scale=0.5)
    replaced = run_surgery(smoke_zoo, other, config=config, progress=False)
    assert len(computed) == 2 * len(smoke_zoo.tasks)  # another merge is embedded ...
    assert replaced.accuracy_before != fresh.accuracy_before
    run_surgery(smoke_zoo, merged_state, config=config, progress=False)
    assert len(computed) == 3 * len(smoke_zoo.tasks)  # ... and replaces the first: one merge is kept at a time


def test_online_surgery_sees_each_image_once(smoke_zoo, merged_state):
    run = run_surgery(smoke_zoo, merged_state, config=SurgeryConfig(rank=4, online=True), split="adapt", progress=False)
    # Every task takes its images one by one, each task's whole pass in turn (the official order).
    assert len(run.history.loss) == sum(len(smoke_zoo.suite[t].labels["adapt"]) for t in smoke_zoo.tasks)
    assert run.history.unit == "%" and sorted(run.history.accuracy) == [0, 1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert all(set(row) == set(smoke_zoo.tasks) for row in run.history.accuracy.values())
    assert all(run.bias_after[t] < run.bias_before[t] for t in smoke_zoo.tasks)
    # The reported accuracy is each task's at the end of its own pass, as in the official log.
    assert run.accuracy_after == pytest.approx(run.history.accuracy[100])


@pytest.mark.parametrize("steps", [40, 30])  # the last step a checkpoint, or not
def test_surgery_v2_lowers_bias_at_every_block(smoke_zoo, merged_state, steps):
    config = SurgeryConfig(rank=4, steps=steps, batch_size=32, lr=1e-2, eval_every=20)
    run = run_surgery(smoke_zoo, merged_state, version=2, config=config, progress=False)
    for task in smoke_zoo.tasks:
        assert (run.block_bias_after[task] < run.block_bias_before[task]).all(), task
        assert run.bias_after[task] < run.bias_before[task]
    assert sorted(run.history.accuracy) == ([0, 20, 40] if steps == 40 else [0, 20])
    # What the run reports after training (taken from the last checkpoint where there is one) is what the final
    # modules compute.
    encoder = load_encoder(smoke_zoo.preset.encoder, merged_state).eval().requires_grad_(False)  # as trained
    for task in smoke_zoo.tasks:
        final, blocks = run.modules.embed(encoder, task, smoke_zoo.suite[task])
        expert = smoke_zoo.expert_features(task, blocks=True)
        labels = smoke_zoo.suite[task].labels["test"]
        assert run.accuracy_after[task] == accuracy_from_features(final, smoke_zoo.heads[task], labels)
        assert torch.equal(run.block_bias_after[task], block_bias(blocks, expert[1]))


def test_v2_parameter_count_matches_the_formula():
    vit_b32 = DeepSurgery(tuple("abcdefgh"), blocks=12, width=768, dim=512, rank=16)
    assert vit_b32.parameters_per_task() == 12 * 2 * 768 * 16 + 2 * 512 * 16 == 311_296
    assert sum(p.numel() for p in vit_b32.parameters()) == 8 * 311_296
    # The parameter-matched V1 rank: 311,296 / (2 * 512) = 304.
    assert TaskSurgery(("a",), 512, rank=304).parameters_per_task() == 311_296


@pytest.mark.heavy
def test_v2_runs_a_24_block_width_1024_encoder():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    encoder = VisionTransformer(
        image_size=16, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4.0, output_dim=768
    )
    encoder.requires_grad_(False)
    deep = DeepSurgery.for_encoder(encoder, ("a", "b"), rank=4)
    assert deep.blocks == 24 and deep.block_down.shape == (2, 24, 4, 1024)
    final, means = deep.forward_tasks(encoder, torch.randn(2, 1, 3, 16, 16))
    assert final.shape == (2, 1, 768) and means.shape == (2, 1, 24, 1024)
    (final.abs().mean() + means.abs().mean()).backward()
    assert deep.block_down.grad is not None and deep.final.down.grad is not None


def test_a_file_save_surgery_did_not_write_is_named_as_such(smoke_zoo, merged_state, tmp_path):
    from safetensors.torch import save_file

    from surgery_lib.core.state_dict import state_fingerprint

    encoder = load_encoder(smoke_zoo.preset.encoder, merged_state)
    fingerprint = state_fingerprint(merged_state)
    written = {
        "none": None,  # was "trained on another merged model (fingerprint None, ...)": now "lacks 'tasks'"
        "partial": {"base_fingerprint": fingerprint},  # was a KeyError: 'tasks'
        "garbled": {"base_fingerprint": fingerprint, "tasks": "[mnist", "rank": "4", "version": "1"},  # JSONDecodeError
        "version-3": {"base_fingerprint": fingerprint, "tasks": '["mnist"]', "rank": "4", "version": "3"},
    }
    for name, metadata in written.items():
        save_file({"x": torch.zeros(2)}, tmp_path / f"{name}.safetensors", metadata=metadata)
        with pytest.raises(SurgeryBookError, match="Fix: pass the file that `surgery --save`"):
            load_surgery(tmp_path / f"{name}.safetensors", merged_state, encoder)
    with pytest.raises(SurgeryBookError, match="no surgery modules at .*missing.safetensors"):  # was "is corrupt"
        load_surgery(tmp_path / "missing.safetensors", merged_state, encoder)


def test_saved_modules_load_only_for_their_base_merge(smoke_zoo, merged_state, tmp_path):
    run = run_surgery(smoke_zoo, merged_state, config=SurgeryConfig(rank=4, steps=5), progress=False)
    path = save_surgery(run, tmp_path / "surgery.safetensors")
    encoder = smoke_zoo.encoder()
    loaded = load_surgery(path, merged_state, encoder)
    assert torch.equal(loaded.down, run.modules.down) and torch.equal(loaded.up, run.modules.up)
    with pytest.raises(SurgeryBookError, match="trained on another merged model"):
        load_surgery(path, smoke_zoo.pretrained, encoder)
    from surgery_lib.models import build_encoder
    from surgery_lib.presets import EncoderConfig

    wider = build_encoder(EncoderConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, output_dim=32))
    with pytest.raises(SurgeryBookError, match="do not fit this encoder"):
        load_surgery(path, merged_state, wider)


def test_bias_and_accuracy_refuse_embeddings_and_labels_of_other_images(smoke_zoo):
    from surgery_lib.bias import block_bias, representation_bias
    from surgery_lib.evaluation import accuracy_from_features

    z, head = torch.randn(10, 64), smoke_zoo.heads["mnist"]
    with pytest.raises(SurgeryBookError, match=r"embeddings of different shapes: \(10, 64\) vs \(9, 64\)"):
        representation_bias(z, z[:9])  # a ValueError before, without a fix
    with pytest.raises(SurgeryBookError, match="block means of different shapes"):
        block_bias(torch.zeros(4, 2, 8), torch.zeros(4, 3, 8))
    with pytest.raises(SurgeryBookError, match=r"no images to compare \(embeddings of shape \(0, 64\)\)"):
        representation_bias(z[:0], z[:0])  # NaN before
    with pytest.raises(SurgeryBookError, match="no images to compare"):
        block_bias(torch.zeros(0, 2, 8), torch.zeros(0, 2, 8))
    labels = head(z).argmax(dim=-1)
    assert accuracy_from_features(z, head, labels) == 100.0
    for wrong in (labels[:1], labels[:9], labels[:, None]):  # labels[:1] broadcast to a wrong accuracy, silently
        with pytest.raises(SurgeryBookError, match="labels for embeddings of shape"):
            accuracy_from_features(z, head, wrong)


def test_a_split_or_an_expert_accuracy_that_is_not_there_is_named(smoke_zoo):
    from surgery_lib.evaluation import normalized_accuracy, results_table

    encoder = smoke_zoo.encoder("pretrained")
    for features in (  # each was a bare KeyError: 'tset'
        lambda: smoke_zoo.features(encoder, "mnist", "tset"),
        lambda: smoke_zoo.features(encoder, "mnist", "tset", fingerprint=smoke_zoo.model_fingerprint()),
        lambda: smoke_zoo.expert_features("mnist", "tset"),
    ):
        with pytest.raises(SurgeryBookError, match="task 'mnist' has no split 'tset'. Fix: use one of: .*test"):
            features()
    table = results_table({"merged": {"mnist": 50.0, "shapes": 40.0}})
    assert normalized_accuracy(table, {"mnist": 100.0, "shapes": 80.0}).loc["merged", "average"] == 50.0
    with pytest.raises(SurgeryBookError, match=r"no expert accuracy for task\(s\) \['shapes'\]"):
        normalized_accuracy(table, {"mnist": 90.0})  # a KeyError from pandas
    for expert in (-5.0, 100.5):
        with pytest.raises(SurgeryBookError, match=f"expert accuracy {expert} for task 'shapes' is outside"):
            normalized_accuracy(table, {"mnist": 90.0, "shapes": expert})
    for expert in (0.0, float("nan")):  # a share of nothing: it was inf, and so was the average
        with pytest.warns(
            UserWarning, match=f"no normalised accuracy where the expert's accuracy is 0 or NaN \\(shapes: {expert}\\)"
        ):
            shares = normalized_accuracy(table, {"mnist": 100.0, "shapes": expert}).loc["merged"]
        assert shares["mnist"] == 50.0 and math.isnan(shares["shapes"]) and math.isnan(shares["average"])


def test_bad_surgery_settings_are_clear_errors(smoke_zoo, merged_state):
    with pytest.raises(SurgeryBookError, match="unknown surgery version"):
        run_surgery(smoke_zoo, merged_state, version=3, progress=False)
    with pytest.raises(SurgeryBookError, match="unknown adaptation split"):
        run_surgery(smoke_zoo, merged_state, split="train", progress=False)
    with pytest.raises(SurgeryBookError, match="invalid surgery schedule"):
        SurgeryConfig(lr=-1.0)
    with pytest.raises(SurgeryBookError, match="eval every -200"):  # was accepted, and then no checkpoint was ever due
        SurgeryConfig(eval_every=-200)
    # steps=1.5 failed inside the schedule, rank=2.5 inside torch.empty, steps="3" on a comparison; batch_size=True
    # trained with batches of one, seed -1 and 2**40 ran where every command refuses them, online=1 ran online
    for bad, message in (
        (
            {"steps": 1.5},
            r"SurgeryConfig steps 1.5 is not a whole number. Fix: pass steps as a whole number, e.g. steps=1000",
        ),
        ({"steps": "3"}, "SurgeryConfig steps '3' is not a whole number"),
        ({"rank": 2.5}, "SurgeryConfig rank 2.5 is not a whole number.*rank=16"),
        ({"batch_size": True}, "SurgeryConfig batch_size True is not a whole number"),
        ({"eval_every": float("inf")}, "SurgeryConfig eval_every inf is not a whole number"),
        ({"seed": -1}, r"SurgeryConfig seed -1 is outside \[0, 4294967295\]"),
        ({"seed": 2**40}, r"seed 1099511627776 is outside"),
        ({"lr": True}, "SurgeryConfig lr True is not a number"),
        ({"online": 1}, "SurgeryConfig online 1 is not True or False"),
    ):
        with pytest.raises(SurgeryBookError, match=message):
            SurgeryConfig(**bad)
    whole = SurgeryConfig(steps=np.int64(4), rank=2.0, batch_size=np.int32(8))  # an ablation's np.arange, a 2.0
    assert (whole.steps, whole.rank, whole.batch_size) == (4, 2, 8)
    assert all(type(v) is int for v in (whole.steps, whole.rank, whole.batch_size, whole.seed))
    with pytest.raises(SurgeryBookError, match=re.escape("pass config=SurgeryConfig(**{'steps': 2})")):
        run_surgery(smoke_zoo, merged_state, config={"steps": 2}, progress=False)  # an AttributeError inside
    config, z = SurgeryConfig(rank=4, steps=2), torch.randn(10, 64)
    with pytest.raises(SurgeryBookError, match="no task to train surgery for"):  # was a StopIteration
        train_surgery({}, {}, config, progress=False)
    mismatched = [  # a RuntimeError from inside the first step, or an IndexError (1-D)
        ({"a": z}, {"a": z[:, :32]}, r"task 'a': merged embeddings \(10, 64\), expert \(10, 32\)"),
        ({"a": z, "b": z[:, :32]}, {"a": z, "b": z[:, :32]}, "task 'b'.*one width d for every task \\(here 64\\)"),
        ({"a": z[0]}, {"a": z[0]}, "give \\(N_t, d\\) embeddings"),
    ]
    for merged, expert, problem in mismatched:
        with pytest.raises(SurgeryBookError, match=problem):
            train_surgery(merged, expert, config, progress=False)


def test_an_explicit_rank_is_kept_and_a_rank_left_open_is_the_presets(smoke_zoo):
    """The papers run SurgeryV2 at rank 4 on ViT-L/14: a preset with that rank gets it when the caller leaves
    the rank open, and an explicit rank 16 stays 16 (it was replaced by the preset's before)."""
    from surgery_lib.grid import surgery_grid

    section = {"surgery_v2_rank": 4}  # as the ViT-L/14 preset's section says
    zoo = dataclasses.replace(smoke_zoo, preset=dataclasses.replace(smoke_zoo.preset, setting_config=section))
    assert zoo.preset.surgery_rank(2) == 4 and zoo.preset.surgery_rank(1) == 16
    ranks = {}
    for rank in (None, 16):
        grid = surgery_grid(
            zoo,
            ["task_arithmetic"],
            versions=(1, 2),
            seeds=1,
            reference_rows=False,
            progress=False,
            config=SurgeryConfig(rank=rank, steps=2, eval_every=0),
        )
        ranks[rank] = sorted(run.modules.rank for runs in grid.runs.values() for run in runs)
    assert ranks == {None: [4, 16], 16: [16, 16]}
    assert SurgeryConfig().with_rank(4).rank == 4 and SurgeryConfig(rank=8).with_rank(4).rank == 8
    with pytest.raises(SurgeryBookError, match="rank >= 1"):
        SurgeryConfig(rank=0)


def test_surgery_refuses_unknown_or_repeated_tasks_before_any_work(smoke_zoo):
    from surgery_lib.core.errors import SurgeryBookError

    merged = smoke_zoo.pretrained
    refused = [
        (["nope"], "the smoke zoo has no task 'nope'"),
        (["mnist", "mnist"], "more than once"),
        ([], "no task given"),  # was a StopIteration (V1) or an IndexError (V2), and a NaN average in bias_table
        ("mnist", r"is a string, not a list. Fix: pass tasks=\['mnist'\]"),  # was: "no task 'm'"
    ]
    for tasks, problem in refused:
        for version in (1, 2):  # a repeat was trained once, silently; an unknown task "no model"
            with pytest.raises(SurgeryBookError, match=problem):
                run_surgery(smoke_zoo, merged, version=version, config=SurgeryConfig(steps=1), tasks=tasks)
        for table in (bias_table, block_bias_table):  # were "no model 'nope'"; a repeat was used once, silently
            with pytest.raises(SurgeryBookError, match=problem):
                table(smoke_zoo, {"pretrained": merged}, tasks=tasks)
        with pytest.raises(SurgeryBookError, match=problem):
            task_embeddings(smoke_zoo, "pretrained", tasks)
