"""The model zoo on the smoke preset: manifest, reuse, resume, corruption, config changes, frozen heads."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest
import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.state_dict import state_fingerprint
from surgery_lib.presets import get_preset
from surgery_lib.settings import base as settings_base
from surgery_lib.settings import build_zoo
from surgery_lib.settings.offline import training
from surgery_lib.settings.offline import zoo as zoo_module
from surgery_lib.settings.offline.zoo import MANIFEST, default_zoo_dir


def _forbid_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was retrained")

    monkeypatch.setattr(zoo_module, "pretrain", fail)
    monkeypatch.setattr(zoo_module, "finetune", fail)
    monkeypatch.setattr(zoo_module, "fit_probe", fail)


def test_manifest_records_everything(smoke_zoo):
    manifest = json.loads((smoke_zoo.directory / MANIFEST).read_text())
    preset = get_preset("smoke")
    assert manifest["preset"] == "smoke" and manifest["config"]["encoder"]["width"] == preset.encoder.width
    assert set(manifest["models"]) == {"pretrained", "heads", "expert/mnist", "expert/shapes", "mtl"}
    for entry in manifest["models"].values():
        assert len(entry["sha256"]) == 64 and entry["wall_time_s"] >= 0
        assert (smoke_zoo.directory / entry["file"]).exists()
    assert {"torch", "open_clip", "surgery_lib"} <= set(manifest["versions"])
    assert set(manifest["seeds"]) == {"pretrained", "heads", "expert/mnist", "expert/shapes", "mtl"}
    assert set(manifest["accuracy"]["expert"]) == {"mnist", "shapes"}


def test_rerun_loads_identical_weights_without_training(smoke_zoo, cache_dir, monkeypatch):
    _forbid_training(monkeypatch)
    again = build_zoo("smoke", device="cpu", cache_dir=cache_dir, progress=False)
    for key, tensor in smoke_zoo.experts["shapes"].items():
        assert torch.equal(tensor, again.experts["shapes"][key])
    assert again.accuracy_table().equals(smoke_zoo.accuracy_table())


def test_interrupted_build_resumes_at_the_last_finished_model(smoke_zoo, tmp_path, cache_dir, monkeypatch):
    calls = []
    real_finetune = zoo_module.finetune

    def interrupt_second(*args, desc="", **kwargs):
        calls.append(desc)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_finetune(*args, desc=desc, **kwargs)

    monkeypatch.setattr(zoo_module, "finetune", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        build_zoo("smoke", device="cpu", cache_dir=cache_dir, zoo_dir=tmp_path / "zoo", progress=False)
    manifest = json.loads((tmp_path / "zoo" / MANIFEST).read_text())
    assert set(manifest["models"]) == {"pretrained", "heads", "expert/mnist"}
    assert not list((tmp_path / "zoo").glob("*.tmp")) and not list((tmp_path / "zoo").glob(".*"))

    calls.clear()
    monkeypatch.setattr(zoo_module, "pretrain", lambda *a, **k: pytest.fail("pretraining was repeated"))
    monkeypatch.setattr(
        zoo_module, "finetune", lambda *a, desc="", **k: calls.append(desc) or real_finetune(*a, desc=desc, **k)
    )
    resumed = build_zoo("smoke", device="cpu", cache_dir=cache_dir, zoo_dir=tmp_path / "zoo", progress=False)
    assert calls == ["expert shapes", "multi-task learning"]
    # Seeded steps: the resumed zoo equals the one built in one go.
    for key, tensor in smoke_zoo.experts["shapes"].items():
        assert torch.equal(tensor, resumed.experts["shapes"][key])


def test_corrupt_model_file_is_rebuilt_with_a_warning(smoke_zoo, tmp_path, cache_dir, caplog):
    zoo_dir = tmp_path / "zoo"
    build_zoo("smoke", device="cpu", cache_dir=cache_dir, zoo_dir=zoo_dir, progress=False)
    expert = zoo_dir / "expert-mnist.safetensors"
    expert.write_bytes(expert.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        rebuilt = build_zoo("smoke", device="cpu", cache_dir=cache_dir, zoo_dir=zoo_dir, progress=False)
    assert "expert-mnist.safetensors is corrupt" in caplog.text and "rebuilding" in caplog.text
    for key, tensor in smoke_zoo.experts["mnist"].items():
        assert torch.equal(tensor, rebuilt.experts["mnist"][key])


def test_corrupt_manifest_starts_afresh(tmp_path, cache_dir, caplog):
    zoo_dir = tmp_path / "zoo"
    zoo_dir.mkdir()
    (zoo_dir / MANIFEST).write_text('{"preset": "smo')
    with caplog.at_level(logging.WARNING):
        zoo = build_zoo("smoke", device="cpu", cache_dir=cache_dir, zoo_dir=zoo_dir, progress=False)
    assert "invalid JSON" in caplog.text and set(zoo.experts) == {"mnist", "shapes"}


def test_changed_config_gets_a_new_zoo_directory():
    preset = get_preset("smoke")
    changed = dataclasses.replace(preset, recipe=dataclasses.replace(preset.recipe, expert_lr=1e-4))
    assert default_zoo_dir(preset, "/tmp/x") != default_zoo_dir(changed, "/tmp/x")
    # Only what determines the weights counts: the description does not.
    relabelled = dataclasses.replace(preset, description="other words")
    assert default_zoo_dir(preset, "/tmp/x") == default_zoo_dir(relabelled, "/tmp/x")


def test_manifest_from_another_config_is_a_clear_error(smoke_zoo, cache_dir):
    preset = get_preset("smoke")
    changed = dataclasses.replace(preset, recipe=dataclasses.replace(preset.recipe, expert_steps=3))
    with pytest.raises(SurgeryBookError, match=r"was built for preset 'smoke'.*--rebuild"):
        build_zoo(changed, device="cpu", cache_dir=cache_dir, zoo_dir=smoke_zoo.directory, progress=False)


def test_heads_stay_frozen_while_experts_train(smoke_zoo):
    head = smoke_zoo.heads["shapes"]
    before = {k: v.clone() for k, v in head.state_dict().items()}
    encoder = smoke_zoo.encoder("pretrained")
    training.finetune(
        encoder,
        [(smoke_zoo.suite["shapes"], head)],
        steps=3,
        batch_per_task=16,
        lr=1e-3,
        weight_decay=0.1,
        warmup_fraction=0.0,
        translate_px=2,
        seed=0,
        device=torch.device("cpu"),
        progress=False,
    )
    assert all(not p.requires_grad for p in head.parameters())
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    moved = [not torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), smoke_zoo.pretrained.values())]
    assert any(moved)


def test_experts_differ_from_pretrained_and_each_other(smoke_zoo):
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    pre, mnist, shapes = smoke_zoo.pretrained[key], smoke_zoo.experts["mnist"][key], smoke_zoo.experts["shapes"][key]
    assert not torch.equal(pre, mnist) and not torch.equal(mnist, shapes)


def test_accuracy_table_shape(smoke_zoo):
    table = smoke_zoo.accuracy_table()
    assert list(table.columns) == ["mnist", "shapes", "average"]
    assert list(table.index) == ["pretrained + probe", "individual (expert)", "traditional MTL"]
    assert ((table >= 0) & (table <= 100)).all().all()
    assert table["average"].tolist() == pytest.approx(table[["mnist", "shapes"]].mean(axis=1).tolist())


def test_unknown_model_and_missing_gpu_are_clear_errors(smoke_zoo, cache_dir):
    with pytest.raises(SurgeryBookError, match="no model 'letters'"):
        smoke_zoo.encoder("letters")
    with pytest.raises(SurgeryBookError, match="no model 'letters'"):
        smoke_zoo.model_fingerprint("letters")
    task = smoke_zoo.tasks[0]
    assert (
        smoke_zoo.model_fingerprint(task) == state_fingerprint(smoke_zoo.experts[task]) != smoke_zoo.model_fingerprint()
    )
    if not torch.cuda.is_available():
        with pytest.raises(SurgeryBookError, match="CUDA was requested"):
            build_zoo("smoke", device="cuda", cache_dir=cache_dir, progress=False)


def test_weights_of_another_architecture_are_refused(smoke_zoo):
    from surgery_lib.models import load_encoder

    with pytest.raises(SurgeryBookError, match="do not fit the encoder architecture"):
        load_encoder(get_preset("mini").encoder, smoke_zoo.pretrained)
    # Integer weights were cast to float and evaluated without a word; an array failed inside torch.
    key = next(k for k, v in smoke_zoo.pretrained.items() if v.ndim == 2)
    for value, kind in (
        (smoke_zoo.pretrained[key].to(torch.int64), "torch.int64"),
        (smoke_zoo.pretrained[key].numpy(), "ndarray"),
    ):
        with pytest.raises(SurgeryBookError, match=f"weight '{re.escape(key)}' is {kind}, not a floating-point tensor"):
            load_encoder(smoke_zoo.preset.encoder, {**smoke_zoo.pretrained, key: value})
    half = {k: v.to(torch.bfloat16) for k, v in smoke_zoo.pretrained.items()}  # any float dtype loads (precision runs)
    load_encoder(smoke_zoo.preset.encoder, half)


def test_a_loaded_encoder_is_the_initialised_one_with_the_weights_and_draws_no_random_numbers(smoke_zoo):
    """``load_encoder`` skips the random initialisation that every weight overwrites: the module, its weights and
    its embeddings are those of a built-then-loaded encoder, and torch's global generator is left where it was."""
    from surgery_lib.models import build_encoder, embed, load_encoder

    state = smoke_zoo.experts[smoke_zoo.tasks[0]]
    reference = build_encoder(smoke_zoo.preset.encoder)
    reference.load_state_dict(state)
    generator = torch.get_rng_state()
    encoder = load_encoder(smoke_zoo.preset.encoder, state)
    assert torch.equal(torch.get_rng_state(), generator)
    assert str(encoder) == str(reference)
    loaded = encoder.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    assert all(t.device.type == "cpu" for t in [*encoder.parameters(), *encoder.buffers()])
    data = smoke_zoo.suite[smoke_zoo.tasks[0]]
    images = data.images["test"][:16]
    assert torch.equal(embed(encoder, images, data.mean, data.std), embed(reference, images, data.mean, data.std))


def test_an_encoder_with_a_buffer_no_state_holds_is_initialised_when_loaded(smoke_zoo, monkeypatch):
    """A non-persistent buffer is not in a state dict, so skipping the initialisation would leave it uninitialised
    memory: such an encoder is built as usual."""
    from surgery_lib import models

    build = models.build_encoder

    def with_a_buffer(config):
        encoder = build(config)
        encoder.register_buffer("scale_table", torch.arange(4.0) + 0.5, persistent=False)
        return encoder

    monkeypatch.setattr(models, "build_encoder", with_a_buffer)
    encoder = models.load_encoder(smoke_zoo.preset.encoder, smoke_zoo.pretrained)
    assert torch.equal(encoder.scale_table, torch.arange(4.0) + 0.5)


def test_expert_features_are_each_experts_embeddings_computed_once(smoke_zoo, monkeypatch):
    from surgery_lib.models import embed, embed_blocks

    task = smoke_zoo.tasks[0]
    data = smoke_zoo.suite[task]
    monkeypatch.setattr(smoke_zoo, "data_fingerprint", None)  # memory only: the next test checks the disk
    smoke_zoo.forget_features()
    final, none = smoke_zoo.expert_features(task)
    assert none is None
    assert torch.equal(final, embed(smoke_zoo.encoder(task), data.images["test"], data.mean, data.std))
    final_b, blocks = smoke_zoo.expert_features(task, blocks=True)
    reference = embed_blocks(smoke_zoo.encoder(task), data.images["test"], data.mean, data.std)
    assert torch.equal(final_b, reference[0]) and torch.equal(blocks, reference[1])
    assert blocks.shape[:2] == (len(data.labels["test"]), smoke_zoo.preset.encoder.layers)

    def fail(*args, **kwargs):
        raise AssertionError("the expert's embeddings were computed again")

    monkeypatch.setattr(settings_base, "task_features", fail)  # the one seam Zoo.features goes through
    assert smoke_zoo.expert_features(task)[0] is final
    assert smoke_zoo.expert_features(task, blocks=True)[1] is blocks
    smoke_zoo.forget_features()
    with pytest.raises(AssertionError, match="computed again"):
        smoke_zoo.expert_features(task)


def test_embeddings_are_stored_under_a_key_of_everything_that_decides_them(smoke_zoo, monkeypatch, caplog):
    """Another process (another zoo object) reads what one computed; any change to what decides the numbers
    (threads, data, blocks) computes afresh; a damaged or misplaced file is recomputed, never trusted."""
    from surgery_lib.merging import task_arithmetic
    from surgery_lib.models import load_encoder

    state = task_arithmetic(smoke_zoo.pretrained, smoke_zoo.experts, scale=0.37)  # a merge no other test embeds
    encoder, fingerprint = load_encoder(smoke_zoo.preset.encoder, state), state_fingerprint(state)
    task = smoke_zoo.tasks[0]
    computed = []
    original = settings_base.task_features
    monkeypatch.setattr(
        settings_base, "task_features", lambda *a, **k: computed.append(k["blocks"]) or original(*a, **k)
    )
    fresh = lambda **changes: dataclasses.replace(smoke_zoo, **changes)  # noqa: E731  (a new process's zoo object)

    first = fresh().features(encoder, task, fingerprint=fingerprint)[0]
    assert computed == [False]
    assert torch.equal(first, original(encoder, smoke_zoo.suite[task], "test")[0])
    read = fresh().features(encoder, task, fingerprint=fingerprint)[0]
    assert computed == [False] and torch.equal(read, first)  # read from disk by the second object
    fresh().features(encoder, task, blocks=True, fingerprint=fingerprint)
    means = fresh().features(encoder, task, blocks=True, fingerprint=fingerprint)[1]
    assert computed == [False, True] and means.shape[1] == smoke_zoo.preset.encoder.layers
    fresh(data_fingerprint="other images").features(encoder, task, fingerprint=fingerprint)
    assert computed == [False, True, False]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        fresh().features(encoder, task, fingerprint=fingerprint)
    finally:
        torch.set_num_threads(threads)
    assert computed == [False, True, False, False]

    store, key = smoke_zoo._embedding_store(), smoke_zoo._embedding_key(fingerprint, task, "test", False, "cpu", "fp32")
    path = store.path(key)
    path.write_bytes(path.read_bytes()[:-100])  # a damaged file
    with caplog.at_level(logging.WARNING):
        again = fresh().features(encoder, task, fingerprint=fingerprint)[0]
    assert len(computed) == 5 and torch.equal(again, first) and "recomputing" in caplog.text
    other = smoke_zoo._embedding_key(fingerprint, task, "test", True, "cpu", "fp32")
    path.write_bytes(store.path(other).read_bytes())  # another key's file copied over this one's name
    fresh().features(encoder, task, fingerprint=fingerprint)
    assert len(computed) == 6 and "another key" in caplog.text
    files = sorted(store.directory.iterdir())
    fresh(data_fingerprint=None).features(encoder, smoke_zoo.tasks[1], fingerprint=fingerprint)
    assert sorted(store.directory.iterdir()) == files  # no data checksum (real CLIP): nothing is stored


@pytest.mark.parametrize("folder", ["merges", "embeddings", "checkpoints"])
def test_rebuild_never_deletes_through_a_linked_folder(tmp_path, folder):
    """A merges, embeddings or checkpoints folder moved to another disk and linked back: clearing the zoo removes
    the zoo's own files only; another folder, a plain one, is emptied."""
    zoo_dir, elsewhere = tmp_path / "zoo", tmp_path / "big-disk"
    zoo_dir.mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep.safetensors").write_bytes(b"someone else's file")
    (elsewhere / "keep.pt").write_bytes(b"someone else's checkpoint")
    (zoo_dir / folder).symlink_to(elsewhere, target_is_directory=True)
    plain = zoo_dir / ("embeddings" if folder == "merges" else "merges")
    plain.mkdir()
    (plain / "mine.safetensors").write_bytes(b"y")
    (zoo_dir / "pretrained.safetensors").write_bytes(b"x")
    (zoo_dir / MANIFEST).write_text(
        json.dumps({"models": {"pretrained": {"file": "pretrained.safetensors", "sha256": "0"}}})
    )
    zoo_module.clear_zoo(zoo_dir)
    assert (elsewhere / "keep.safetensors").read_bytes() == b"someone else's file"
    assert (elsewhere / "keep.pt").read_bytes() == b"someone else's checkpoint"
    assert not (zoo_dir / "pretrained.safetensors").exists() and not (zoo_dir / MANIFEST).exists()
    assert not (plain / "mine.safetensors").exists()
