"""Merge cache, task-arithmetic sweep, task-vector similarity and the bias tables the notebooks use."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from surgery_lib import merging as methods
from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.evaluation import task_accuracy
from surgery_lib.merging import cosine_similarities, task_arithmetic
from surgery_lib.models import load_encoder
from surgery_lib.surgery.run import (
    bias_table,
    block_bias_table,
    run_surgery,
    task_embeddings,
)
from surgery_lib.surgery.v1 import SurgeryConfig


@pytest.fixture
def private_zoo(smoke_zoo, tmp_path):
    """The smoke zoo with its merge cache in a fresh directory."""
    return dataclasses.replace(smoke_zoo, directory=tmp_path)


def test_cosine_similarities_of_hand_made_vectors():
    vectors = {
        "a": {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])},
        "b": {"w": torch.tensor([0.0, 3.0]), "b": torch.tensor([0.0])},
        "c": {"w": torch.tensor([-2.0, 0.0]), "b": torch.tensor([0.0])},
    }
    expected = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]])
    assert torch.allclose(cosine_similarities(vectors), expected)


def test_cached_merge_is_reused_and_equal(private_zoo, monkeypatch):
    options = methods.MergeOptions(steps=3, batch_size=4, split="adapt")
    first = methods.cached_merge(private_zoo, "adamerging_layer", options, progress=False)
    path = methods.merge_cache_path(private_zoo, "adamerging_layer", options, private_zoo.tasks)
    assert path.exists() and not list(path.parent.glob("*.tmp*"))

    def fail(*args, **kwargs):
        raise AssertionError("the cached merge was recomputed")

    monkeypatch.setattr("surgery_lib.merging.api.merge", fail)  # the name cached_merge computes through
    second = methods.cached_merge(private_zoo, "adamerging_layer", options, progress=False)
    for key, value in first.state.items():
        assert torch.equal(second.state[key], value), key
    found, loaded = first.details["adamerging"], second.details["adamerging"]
    assert torch.equal(found.coefficients, loaded.coefficients) and loaded.entropy == found.entropy
    assert loaded.coefficient_table().shape == (len(private_zoo.tasks), len(found.keys))
    path.write_bytes(path.read_bytes()[:100])  # the guard fires where the cache cannot be used
    with pytest.raises(AssertionError, match="recomputed"):
        methods.cached_merge(private_zoo, "adamerging_layer", options, progress=False)


def test_cached_merge_keys_on_options_and_recomputes_a_damaged_file(private_zoo, caplog):
    a = methods.merge_cache_path(private_zoo, "task_arithmetic", methods.MergeOptions(scale=0.3), private_zoo.tasks)
    b = methods.merge_cache_path(private_zoo, "task_arithmetic", methods.MergeOptions(scale=0.5), private_zoo.tasks)
    assert a != b
    methods.cached_merge(private_zoo, "task_arithmetic", progress=False)
    path = methods.merge_cache_path(private_zoo, "task_arithmetic", methods.MergeOptions(), private_zoo.tasks)
    path.write_bytes(path.read_bytes()[:100])  # truncated, as after a crash in another tool
    with caplog.at_level(logging.WARNING):
        result = methods.cached_merge(private_zoo, "task_arithmetic", progress=False)
    assert "unusable" in caplog.text
    expected = task_arithmetic(private_zoo.pretrained, private_zoo.experts, 0.3)
    assert all(torch.equal(result.state[k], v) for k, v in expected.items())


def test_scale_sweep_starts_at_the_pretrained_model(smoke_zoo):
    sweep = methods.scale_sweep(smoke_zoo, [0.0, 0.3], progress=False)
    assert list(sweep.index) == [0.0, 0.3] and sweep.index.name == "scale"
    for task in smoke_zoo.tasks:
        assert sweep.loc[0.0, task] == pytest.approx(smoke_zoo.manifest["accuracy"]["pretrained"][task], abs=1e-6)
    ta = methods.evaluate_merge(smoke_zoo, methods.merge(smoke_zoo, "task_arithmetic", progress=False))
    assert sweep.loc[0.3, list(ta)].to_dict() == pytest.approx(ta)
    with pytest.raises(SurgeryBookError, match=r"scales='0.3' is a string, not a list"):  # was "could not convert '.'"
        methods.scale_sweep(smoke_zoo, "0.3", progress=False)


def test_the_main_table_takes_a_list_of_methods_each_once(smoke_zoo):
    with pytest.raises(SurgeryBookError, match=r"methods='ties' is a string, not a list. Fix: pass methods=\['ties'\]"):
        methods.main_table(smoke_zoo, "ties", progress=False)  # was "unknown merging method 't'"
    table, results = methods.main_table(smoke_zoo, ["task_arithmetic", "task_arithmetic"], progress=False)
    assert list(results) == ["task_arithmetic"] and list(table.index).count(methods.row_label("task_arithmetic")) == 1


def test_a_merge_of_some_tasks_is_evaluated_on_those_tasks(smoke_zoo):
    subset = list(smoke_zoo.tasks[:2])
    result = methods.merge(smoke_zoo, "task_arithmetic", tasks=subset, progress=False)
    accuracy = methods.evaluate_merge(smoke_zoo, result, "cpu", tasks=subset)
    assert list(accuracy) == subset
    encoder = load_encoder(
        smoke_zoo.preset.encoder, task_arithmetic(smoke_zoo.pretrained, {t: smoke_zoo.experts[t] for t in subset}, 0.3)
    )
    assert accuracy[subset[0]] == pytest.approx(
        task_accuracy(encoder, smoke_zoo.heads[subset[0]], smoke_zoo.suite[subset[0]])
    )
    with pytest.raises(SurgeryBookError, match="zoo has no task 'nope'. Fix: use one of"):
        methods.evaluate_merge(smoke_zoo, result, "cpu", tasks=["nope"])


def test_bias_is_zero_for_the_expert_itself(smoke_zoo):
    task = smoke_zoo.tasks[0]
    table = bias_table(smoke_zoo, {"expert": smoke_zoo.experts[task], "pretrained": smoke_zoo.pretrained})
    assert table.loc["expert", task] == 0.0
    assert (table.loc["pretrained"] > 0).all()
    blocks = block_bias_table(smoke_zoo, {"expert": smoke_zoo.experts[task]}, tasks=[task])
    assert list(blocks.columns) == [f"block {i + 1}" for i in range(smoke_zoo.preset.encoder.layers)]
    assert (blocks.loc["expert"] == 0).all()
    features = task_embeddings(smoke_zoo, "expert", [task])
    assert features[task].shape == (len(smoke_zoo.suite[task].labels["test"]), smoke_zoo.preset.encoder.output_dim)


def test_surgery_adapt_limit_uses_fewer_images_for_both_versions(smoke_zoo):
    merged = task_arithmetic(smoke_zoo.pretrained, smoke_zoo.experts, 0.3)
    config = SurgeryConfig(steps=5, batch_size=8, eval_every=0)
    limited = run_surgery(smoke_zoo, merged, config=config, adapt_limit=8, progress=False)
    full = run_surgery(smoke_zoo, merged, config=config, progress=False)
    assert not torch.equal(limited.modules.up, full.modules.up)  # other images, other updates
    deep_limited = run_surgery(smoke_zoo, merged, version=2, config=config, adapt_limit=8, progress=False)
    deep_full = run_surgery(smoke_zoo, merged, version=2, config=config, progress=False)
    assert not torch.equal(deep_limited.modules.block_up, deep_full.modules.block_up)
    assert deep_limited.accuracy_before == deep_full.accuracy_before  # evaluated on the whole test split
    with pytest.raises(SurgeryBookError, match="1 image or more"):
        run_surgery(smoke_zoo, merged, config=config, adapt_limit=0, progress=False)
