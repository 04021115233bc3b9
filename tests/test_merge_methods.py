"""Every registered merging method through the same checks (the contract), DARE against a hand-computed
example, and the merge cache keyed by the options each method reads."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.merging import (
    MERGE_METHODS,
    MergeMethod,
    MergeOptions,
    cached_merge,
    merge,
    merge_cache_path,
    register_method,
    task_arithmetic,
)
from surgery_lib.merging.dare import dare_vectors, drop_and_rescale

#: Small but complete runs: every AdaMerging and data-based method still takes real steps.
FAST = MergeOptions(steps=2, batch_size=4, samples=16)


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_every_registered_method_keeps_the_contract(method, smoke_zoo, tmp_path):
    result = merge(smoke_zoo, method, FAST, device="cpu", progress=False)
    assert result.method == method and result.seconds >= 0
    assert {k: v.shape for k, v in result.state.items()} == {k: v.shape for k, v in smoke_zoo.pretrained.items()}
    assert all(torch.isfinite(v).all() for v in result.state.values() if v.is_floating_point())
    assert any(not torch.equal(result.state[k], v) for k, v in smoke_zoo.pretrained.items())  # it merged something
    again = merge(smoke_zoo, method, FAST, device="cpu", progress=False)
    assert all(torch.equal(again.state[k], v) for k, v in result.state.items()), "not deterministic"
    zoo = dataclasses.replace(smoke_zoo, directory=tmp_path)  # a private merge cache
    stored = cached_merge(zoo, method, FAST, device="cpu", progress=False)
    assert merge_cache_path(zoo, method, FAST, zoo.tasks).is_file()
    loaded = cached_merge(zoo, method, FAST, device="cpu", progress=False)
    assert all(torch.equal(loaded.state[k], v) for k, v in stored.state.items())
    assert loaded.seconds == stored.seconds  # read back, not recomputed
    assert MERGE_METHODS[method].data in ("free", "labeled", "unlabeled") and MERGE_METHODS[method].label


def test_the_cache_key_covers_exactly_the_options_a_method_reads(smoke_zoo):
    tasks = smoke_zoo.tasks
    path = merge_cache_path(smoke_zoo, "task_arithmetic", MergeOptions(), tasks)
    assert (
        merge_cache_path(smoke_zoo, "task_arithmetic", MergeOptions(keep_fraction=0.5, steps=9, seed=3), tasks) == path
    )
    assert merge_cache_path(smoke_zoo, "task_arithmetic", MergeOptions(scale=0.5), tasks) != path
    ties = merge_cache_path(smoke_zoo, "ties", MergeOptions(), tasks)
    assert merge_cache_path(smoke_zoo, "ties", MergeOptions(keep_fraction=0.5), tasks) != ties
    assert merge_cache_path(smoke_zoo, "ties", MergeOptions(lr=0.5), tasks) == ties
    assert merge_cache_path(smoke_zoo, "task_arithmetic", MergeOptions(), tasks[:1]) != path


def test_a_method_must_name_real_options_and_a_fresh_name():
    with pytest.raises(SurgeryBookError, match="reads unknown options"):
        MergeMethod("bad", "bad", lambda *a: ({}, {}), reads=("sclae",))
    with pytest.raises(SurgeryBookError, match="already registered"):
        register_method(MergeMethod("ties", "again", lambda *a: ({}, {})))
    with pytest.raises(SurgeryBookError, match="unknown merging method 'dare'.*dare_task_arithmetic"):
        MERGE_METHODS["dare"]


def test_dare_drops_and_rescales_a_hand_computed_example():
    # theta_0 = [1, 1, 1, 1]; expert = [3, 1, 2, 5], so tau = [2, 0, 1, 4]. Keep entries 0 and 2 at p = 0.5:
    # the survivors double, the rest vanish: [4, 0, 2, 0].
    tau = {"w": torch.tensor([2.0, 0.0, 1.0, 4.0])}
    keep = {"w": torch.tensor([True, False, True, False])}
    assert torch.equal(drop_and_rescale(tau, keep, 0.5)["w"], torch.tensor([4.0, 0.0, 2.0, 0.0]))
    # p = 0.75 keeps one entry in four, scaled by 4.
    assert torch.equal(
        drop_and_rescale(tau, {"w": torch.tensor([False, False, False, True])}, 0.75)["w"],
        torch.tensor([0.0, 0.0, 0.0, 16.0]),
    )


def test_dare_is_seeded_unbiased_and_reduces_to_task_arithmetic_without_drops():
    torch.manual_seed(0)
    vectors = [{"a": torch.randn(200, 50), "b": torch.randn(50)} for _ in range(2)]
    first, again = dare_vectors(vectors, 0.5, seed=7), dare_vectors(vectors, 0.5, seed=7)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(first, again) for k in x)
    assert not torch.equal(dare_vectors(vectors, 0.5, seed=8)[0]["a"], first[0]["a"])
    kept = (first[0]["a"] != 0).float().mean()
    assert abs(float(kept) - 0.5) < 0.03  # about half survive ...
    assert torch.allclose(first[0]["a"][first[0]["a"] != 0], 2 * vectors[0]["a"][first[0]["a"] != 0])  # ... doubled
    mean = torch.stack([dare_vectors(vectors, 0.5, seed=s)[0]["a"] for s in range(400)]).mean(0)
    assert (mean - vectors[0]["a"]).abs().mean() < 0.06  # E[dropped and rescaled] = tau
    assert all(torch.equal(x[k], v[k]) for x, v in zip(dare_vectors(vectors, 0.0), vectors) for k in v)
    with pytest.raises(SurgeryBookError, match="drop rate 1.0"):
        dare_vectors(vectors, 1.0)


def test_dare_over_task_arithmetic_on_a_zoo_equals_the_formula(smoke_zoo):
    options = MergeOptions(drop_rate=0.3, seed=5, scale=0.4)
    result = merge(smoke_zoo, "dare_task_arithmetic", options, device="cpu", progress=False)
    vectors = [{k: e[k] - v for k, v in smoke_zoo.pretrained.items()} for e in smoke_zoo.experts.values()]
    sparse = dare_vectors(vectors, 0.3, seed=5)
    for key, value in smoke_zoo.pretrained.items():
        assert torch.allclose(result.state[key], value + 0.4 * sum(s[key] for s in sparse), atol=1e-6)
    plain = merge(
        smoke_zoo, "dare_task_arithmetic", MergeOptions(drop_rate=0.0, scale=0.4), device="cpu", progress=False
    )
    reference = task_arithmetic(smoke_zoo.pretrained, smoke_zoo.experts, 0.4)
    assert all(torch.allclose(plain.state[k], v, atol=1e-6) for k, v in reference.items())
