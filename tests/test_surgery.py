"""Surgery and SurgeryV2: identity at initialisation, equivalence with the official loop, seeds, saving."""

from __future__ import annotations

import pytest
import torch

from surgery_lib.errors import SurgeryBookError
from surgery_lib.merging import task_arithmetic
from surgery_lib.models import embed, forward_blocks
from surgery_lib.pipeline import load_surgery, run_surgery, save_surgery
from surgery_lib.surgery import SurgeryConfig, TaskSurgery, batch_stream, task_seed, train_surgery
from surgery_lib.surgery_v2 import DeepSurgery


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


def _official_loop(zoo, merged_encoder, tasks, config, split):
    """The official procedure, step by step: both encoders forwarded on every batch, one Adam optimiser
    over all modules, zero_grad/step after every single task batch."""
    initial = TaskSurgery(tasks, merged_encoder.output_dim, config.rank, config.seed)
    modules = torch.nn.ModuleList([initial.module(t) for t in tasks])
    optimizer = torch.optim.Adam(modules.parameters(), lr=config.lr)
    experts = {t: zoo.encoder(t) for t in tasks}
    streams = [batch_stream(len(zoo.suite[t].labels[split]), config.batch_size, task_seed(config.seed, i)) for i, t in enumerate(tasks)]
    for _ in range(config.steps):
        for i, task in enumerate(tasks):
            images = zoo.suite[task].normalized(split, next(streams[i]))
            with torch.no_grad():
                z, target = merged_encoder(images), experts[task](images)
            loss = (modules[i](z) - target).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return modules


def test_cached_batched_trainer_equals_the_official_loop(smoke_zoo, merged_state):
    from surgery_lib.models import load_encoder

    tasks = ("mnist", "shapes")
    config = SurgeryConfig(rank=8, steps=30, batch_size=16, lr=1e-2, seed=5, eval_every=0)
    encoder = load_encoder(smoke_zoo.preset.encoder, merged_state).eval()
    reference = _official_loop(smoke_zoo, encoder, tasks, config, "adapt")
    data = {t: smoke_zoo.suite[t] for t in tasks}
    merged = {t: embed(encoder, data[t].images["adapt"], data[t].mean, data[t].std) for t in tasks}
    expert = {t: embed(smoke_zoo.encoder(t), data[t].images["adapt"], data[t].mean, data[t].std) for t in tasks}
    batched, history = train_surgery(merged, expert, config, progress=False)
    assert len(history.loss) == 30
    for i in range(len(tasks)):
        assert torch.allclose(batched.down[i], reference[i].down.weight, atol=1e-5)
        assert torch.allclose(batched.up[i], reference[i].up.weight, atol=1e-5)
        assert batched.up[i].abs().sum() > 0  # it did train


def test_surgery_lowers_bias_and_seeds_reproduce(smoke_zoo, merged_state):
    config = SurgeryConfig(rank=8, steps=150, batch_size=32, lr=1e-2, seed=1, eval_every=50)
    first = run_surgery(smoke_zoo, merged_state, config=config, progress=False)
    again = run_surgery(smoke_zoo, merged_state, config=config, progress=False)
    other = run_surgery(smoke_zoo, merged_state, config=SurgeryConfig(rank=8, steps=150, batch_size=32, lr=1e-2, seed=2), progress=False)
    for task in smoke_zoo.tasks:
        assert first.bias_after[task] < first.bias_before[task]
    assert torch.equal(first.modules.down, again.modules.down) and torch.equal(first.modules.up, again.modules.up)
    assert first.accuracy_after == again.accuracy_after
    assert not torch.equal(first.modules.down, other.modules.down)
    assert sorted(first.history.accuracy) == [0, 50, 100, 150]
    assert first.history.accuracy[0] == first.accuracy_before


def test_online_surgery_sees_each_image_once(smoke_zoo, merged_state):
    run = run_surgery(smoke_zoo, merged_state, config=SurgeryConfig(rank=4, online=True), split="adapt", progress=False)
    assert len(run.history.loss) == sum(len(smoke_zoo.suite[t].labels["adapt"]) for t in smoke_zoo.tasks)
    assert all(run.bias_after[t] < run.bias_before[t] for t in smoke_zoo.tasks)


def test_surgery_v2_lowers_bias_at_every_block(smoke_zoo, merged_state):
    config = SurgeryConfig(rank=4, steps=40, batch_size=32, lr=1e-2, eval_every=20)
    run = run_surgery(smoke_zoo, merged_state, version=2, config=config, progress=False)
    for task in smoke_zoo.tasks:
        assert (run.block_bias_after[task] < run.block_bias_before[task]).all(), task
        assert run.bias_after[task] < run.bias_before[task]
    assert sorted(run.history.accuracy) == [0, 20, 40]


def test_v2_parameter_count_matches_the_formula():
    vit_b32 = DeepSurgery(tuple("abcdefgh"), blocks=12, width=768, dim=512, rank=16)
    assert vit_b32.parameters_per_task() == 12 * 2 * 768 * 16 + 2 * 512 * 16 == 311_296
    assert sum(p.numel() for p in vit_b32.parameters()) == 8 * 311_296
    # The parameter-matched V1 rank: 311,296 / (2 * 512) = 304.
    assert TaskSurgery(("a",), 512, rank=304).parameters_per_task() == 311_296


def test_v2_runs_a_24_block_width_1024_encoder():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    encoder = VisionTransformer(image_size=16, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4.0, output_dim=768)
    encoder.requires_grad_(False)
    deep = DeepSurgery.for_encoder(encoder, ("a", "b"), rank=4)
    assert deep.blocks == 24 and deep.block_down.shape == (2, 24, 4, 1024)
    final, means = deep.forward_tasks(encoder, torch.randn(2, 1, 3, 16, 16))
    assert final.shape == (2, 1, 768) and means.shape == (2, 1, 24, 1024)
    (final.abs().mean() + means.abs().mean()).backward()
    assert deep.block_down.grad is not None and deep.final.down.grad is not None


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


def test_bad_surgery_settings_are_clear_errors(smoke_zoo, merged_state):
    with pytest.raises(SurgeryBookError, match="unknown surgery version"):
        run_surgery(smoke_zoo, merged_state, version=3, progress=False)
    with pytest.raises(SurgeryBookError, match="unknown adaptation split"):
        run_surgery(smoke_zoo, merged_state, split="train", progress=False)
    with pytest.raises(SurgeryBookError, match="invalid surgery schedule"):
        SurgeryConfig(lr=-1.0)


def test_batch_stream_fills_every_batch_when_a_task_has_fewer_images_than_a_batch():
    stream = batch_stream(3, 8, seed=0)
    batches = [next(stream) for _ in range(3)]  # 24 indices = 8 epochs of 3
    assert all(len(b) == 8 for b in batches)
    flat = torch.cat(batches)
    assert all(sorted(flat[e * 3 : e * 3 + 3].tolist()) == [0, 1, 2] for e in range(8))  # whole epochs, in order
    big = batch_stream(40, 16, seed=0)
    assert [len(next(big)) for _ in range(3)] == [16, 16, 16]  # the usual case is unchanged: 2 batches per epoch
