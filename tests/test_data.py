"""The offline task suite: determinism, shapes, disjoint splits, caching and errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.presets import SuiteConfig, get_preset
from surgery_lib.settings import load_suite
from surgery_lib.settings.offline import generators as gen
from surgery_lib.settings.offline import suite as suite_module
from surgery_lib.settings.offline.generators import TASKS
from surgery_lib.settings.offline.suite import check_tasks, data_cards, split_sizes

TINY = SuiteConfig(
    tasks=("street_digits", "textures"), train_per_task=40, adapt_per_task=20, test_per_task=30, mix_per_class=2
)


@pytest.mark.parametrize("task", [t for t, spec in TASKS.items() if spec.render is not None] + ["mix"])
def test_every_renderer_is_deterministic_with_valid_images(task):
    spec = gen.MIX if task == "mix" else TASKS[task]
    labels = np.arange(2 * spec.num_classes) % spec.num_classes
    first = gen.render_batch(spec, labels, "test", (7, 1))
    second = gen.render_batch(spec, labels, "test", (7, 1))
    other_seed = gen.render_batch(spec, labels, "test", (8, 1))
    assert first.shape == (len(labels), 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other_seed)
    # No blank images: every image has real contrast.
    assert (first.reshape(len(labels), -1).std(axis=1) > 3).all()


def test_class_counts_match_the_papers_stand_ins():
    counts = {task: spec.num_classes for task, spec in TASKS.items()}
    assert counts["signs"] == 14 and all(n == 10 for t, n in counts.items() if t != "signs")
    assert len(gen.MIX_CLASSES) == 66
    # The mix's labels are disjoint from every task's labels.
    task_labels = {name.lower() for spec in TASKS.values() for name in spec.class_names}
    mix_labels = {name.split(" ", 1)[1].lower() for name in gen.MIX_CLASSES}
    assert not task_labels & {m for m in mix_labels if len(m) > 1}
    assert not set("abcdefghij") & {m for m in mix_labels if len(m) == 1 and m.isupper()}


def test_balanced_labels_cover_every_class_evenly():
    labels = gen.balanced_labels(14, 140, (0, 1))
    assert np.bincount(labels).tolist() == [10] * 14


def test_mnist_splits_are_disjoint_and_stratified():
    splits = gen.mnist_split_indices(0, {"train": 3500, "adapt": 500, "test": 1000})
    sets = {k: set(v.tolist()) for k, v in splits.items()}
    assert len(sets["train"]) == 3500 and len(sets["adapt"]) == 500 and len(sets["test"]) == 1000
    assert (
        not (sets["train"] & sets["test"])
        and not (sets["train"] & sets["adapt"])
        and not (sets["adapt"] & sets["test"])
    )
    _, labels = gen.mnist_pool()
    assert np.bincount(labels[splits["test"]]).tolist() == [100] * 10


def test_mnist_splits_are_sized_from_the_pool_without_reading_it(monkeypatch):
    config = get_preset("mini").suite
    sizes = split_sizes("mnist", config)
    assert len(gen.mnist_pool()[1]) == gen.MNIST_POOL_SIZE  # the constant is the bundled sample's real size
    held_out = sizes["adapt"] + sizes["test"] + sizes["validation"]
    assert sizes["train"] == min(config.train_per_task, gen.MNIST_POOL_SIZE - held_out)
    monkeypatch.setattr(gen, "mnist_pool", lambda: pytest.fail("the digits were read to size the splits"))
    assert split_sizes("mnist", config) == sizes
    monkeypatch.setattr(gen, "MNIST_POOL_SIZE", 4000)
    assert split_sizes("mnist", config)["train"] == 4000 - held_out


@pytest.mark.parametrize("axis", [0, 1])
def test_real_image_crops_stay_inside_their_split_region(axis):
    # An image whose pixels encode their row (axis 0) or column (axis 1) index.
    ramp = np.arange(500, dtype=np.float64) / 500 * 255
    image = np.broadcast_to(ramp[:, None] if axis == 0 else ramp[None, :], (500, 500)).astype(np.uint8)
    image = np.repeat(image[..., None], 3, axis=2)
    rng = np.random.default_rng(0)
    for split, (lo, hi) in gen.REAL_REGION.items():
        for _ in range(50):
            crop = gen._crop_resized(rng, image, (lo, hi), axis=axis, size_range=(0.12, 0.3))
            assert crop.min() >= lo * 255 - 2 and crop.max() <= hi * 255 + 2, split


def test_the_real_image_bands_a_suite_uses_are_disjoint():
    for with_validation in (False, True):
        splits = ("train", "adapt", "test") + (("validation",) if with_validation else ())
        bands = sorted(gen.REAL_REGION[gen.render_split(split, with_validation)] for split in splits)
        assert bands[0][0] == 0.0 and bands[-1][1] == 1.0
        assert all(a[1] <= b[0] for a, b in zip(bands, bands[1:])), (with_validation, bands)


def test_mnist_validation_digits_come_from_the_training_share():
    counts = {"train": 3500, "adapt": 500, "test": 1000}
    before = gen.mnist_split_indices(0, counts)
    after = gen.mnist_split_indices(0, {**counts, "validation": 400})
    sets = {k: set(v.tolist()) for k, v in after.items()}
    assert len(sets["validation"]) == 400 and len(sets["train"]) == 3100
    assert all(not sets[a] & sets[b] for a in sets for b in sets if a < b)
    for split in ("adapt", "test"):  # the same digits (a validation split reorders them, as train shrank)
        assert sets[split] == set(before[split].tolist())
    assert sets["validation"] | sets["train"] == set(before["train"].tolist())
    _, labels = gen.mnist_pool()
    assert np.bincount(labels[after["validation"]]).tolist() == [40] * 10
    config = SuiteConfig(("mnist",), 4000, 500, 1000, 1, validation_per_task=400)
    assert split_sizes("mnist", config) == {"train": 3100, "adapt": 500, "test": 1000, "validation": 400}
    with pytest.raises(SurgeryBookError, match="leave none to train on.*validation_per_task"):
        split_sizes("mnist", SuiteConfig(("mnist",), 4000, 500, 1000, 1, validation_per_task=3500))


def test_a_validation_split_adds_images_and_changes_no_other_split(tmp_path):
    without = load_suite(TINY, cache_dir=tmp_path, workers=1, progress=False)
    config = SuiteConfig(**{**TINY.__dict__, "validation_per_task": 24})
    assert suite_module.task_file("textures", config, tmp_path) != suite_module.task_file("textures", TINY, tmp_path)
    with_validation = load_suite(config, cache_dir=tmp_path, workers=1, progress=False)
    for task in TINY.tasks:
        old, new = without[task], with_validation[task]
        assert "validation" not in old.splits and new.images["validation"].shape == (24, 3, 32, 32)
        assert np.bincount(new.labels["validation"].numpy()).max() - np.bincount(new.labels["validation"]).min() <= 1
        for split in ("train", "test"):
            assert torch.equal(old.images[split], new.images[split]) and torch.equal(
                old.labels[split], new.labels[split]
            )
        seen = {bytes(image.numpy()) for split in ("train", "adapt", "test") for image in new.images[split]}
        assert not seen & {bytes(image.numpy()) for image in new.images["validation"]}
    assert data_cards(config).loc["textures", "validation"] == 24 and "validation" not in data_cards(TINY)


def test_suite_is_identical_with_one_or_two_workers(tmp_path):
    one = load_suite(TINY, cache_dir=tmp_path / "a", workers=1, progress=False)
    two = load_suite(TINY, cache_dir=tmp_path / "b", workers=2, progress=False)
    for task in TINY.tasks:
        for split in ("train", "adapt", "test"):
            assert torch.equal(one[task].images[split], two[task].images[split])
            assert torch.equal(one[task].labels[split], two[task].labels[split])
    assert torch.equal(one.mix.images["train"], two.mix.images["train"])


def test_procedural_splits_share_no_image(smoke_suite):
    shapes = smoke_suite["shapes"]
    hashes = {split: {bytes(img.numpy()) for img in shapes.images[split]} for split in shapes.splits}
    assert not hashes["train"] & hashes["test"] and not hashes["train"] & hashes["adapt"]


def test_suite_shapes_labels_and_sizes(smoke_suite):
    cfg = get_preset("smoke").suite
    for task in cfg.tasks:
        data = smoke_suite[task]
        for split, count in (("train", cfg.train_per_task), ("adapt", cfg.adapt_per_task), ("test", cfg.test_per_task)):
            assert data.images[split].shape == (count, 3, 32, 32) and data.images[split].dtype == torch.uint8
            assert data.labels[split].shape == (count,) and data.labels[split].dtype == torch.int64
            assert 0 <= data.labels[split].min() and data.labels[split].max() < data.num_classes
    assert smoke_suite.mix.images["train"].shape[0] == 66 * cfg.mix_per_class


def test_loader_yields_normalised_batches(smoke_suite):
    data = smoke_suite["mnist"]
    batches = list(data.loader("test", batch_size=50))
    assert [len(y) for _, y in batches] == [50, 50, 28]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (50, 3, 32, 32)
    expected = (data.images["test"][:50].float() / 255 - 0.5) / 0.25
    assert torch.allclose(x, expected) and torch.equal(y, data.labels["test"][:50])
    shuffled = [torch.cat([y for _, y in data.loader("test", 32, shuffle=True, seed=3)]) for _ in range(2)]
    assert torch.equal(shuffled[0], shuffled[1])
    assert torch.equal(shuffled[0].sort().values, data.labels["test"].sort().values)


def test_cached_suite_loads_without_generating(smoke_suite, cache_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the cached suite was regenerated")

    monkeypatch.setattr(suite_module, "_generate", fail)
    again = load_suite("smoke", cache_dir=cache_dir, progress=False)
    assert torch.equal(again["shapes"].images["test"], smoke_suite["shapes"].images["test"])


def test_generator_version_change_invalidates_the_cache(tmp_path, monkeypatch):
    load_suite(TINY, cache_dir=tmp_path, workers=1, progress=False)
    old = suite_module.task_file("textures", TINY, tmp_path)
    monkeypatch.setattr(gen, "GENERATOR_VERSION", gen.GENERATOR_VERSION + 1)
    new = suite_module.task_file("textures", TINY, tmp_path)
    assert new != old and not new.exists()
    load_suite(TINY, cache_dir=tmp_path, workers=1, progress=False)
    assert new.exists()


def test_corrupt_cache_file_is_regenerated_with_a_warning(tmp_path, caplog):
    first = load_suite(TINY, cache_dir=tmp_path, workers=1, progress=False)
    path = suite_module.task_file("street_digits", TINY, tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncate
    with caplog.at_level(logging.WARNING):
        again = load_suite(TINY, cache_dir=tmp_path, workers=1, progress=False)
    assert "corrupt" in caplog.text and "regenerating" in caplog.text
    assert torch.equal(again["street_digits"].images["test"], first["street_digits"].images["test"])


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        load_suite(TINY, cache_dir=tmp_path, workers=1, progress=False)
    # only the (empty) lock file that serialises builds of this folder; no data file, whole or half
    leftovers = [p.name for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert leftovers == [".v1.lock"] and (tmp_path / "data" / ".v1.lock").stat().st_size == 0


def test_unknown_task_is_a_clear_error():
    with pytest.raises(SurgeryBookError, match=r"unknown task 'cifar'.*use one of: mnist"):
        check_tasks(["mnist", "cifar"])
    with pytest.raises(SurgeryBookError, match="repeats"):
        check_tasks(["mnist", "mnist"])


def test_task_outside_the_suite_is_a_clear_error(smoke_suite):
    with pytest.raises(SurgeryBookError, match="not part of this suite"):
        smoke_suite["letters"]


def test_unwritable_cache_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SurgeryBookError, match=r"cache directory .* is not writable.*--cache-dir"):
        load_suite(TINY, cache_dir=blocker / "cache", progress=False)


def test_data_cards_name_source_and_licence_of_every_task():
    cards = data_cards(get_preset("mini").suite)
    assert list(cards.index) == [*get_preset("mini").suite.tasks, "pretraining_mix"]
    assert cards.loc["mnist", "train"] == 3100 and cards.loc["signs", "classes"] == 14  # 400 held out to validate
    assert cards.loc["mnist", "validation"] == cards.loc["signs", "validation"] == 400
    assert cards["licence"].str.len().min() > 5 and cards["source"].str.len().min() > 20


@pytest.mark.heavy
def test_parallel_generation_works_from_a_script_without_a_main_guard(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "user_script.py"
    script.write_text(
        "from surgery_lib.settings import load_suite\n"
        "from surgery_lib.presets import SuiteConfig\n"
        "cfg = SuiteConfig(tasks=('letters',), train_per_task=600, adapt_per_task=10, test_per_task=10, mix_per_class=1)\n"
        f"suite = load_suite(cfg, cache_dir={str(tmp_path / 'cache')!r}, workers=2, progress=False)\n"
        "print(suite['letters'].images['train'].shape[0])\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "600"
