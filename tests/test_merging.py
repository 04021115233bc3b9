"""Merging formulas against hand computations."""

from __future__ import annotations

import re

import pytest
import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.merging import task_arithmetic, task_vectors, weight_averaging


def _models(num_tasks: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pretrained = {
        "w": torch.randn(4, 3, generator=generator),
        "b": torch.randn(3, generator=generator),
        "steps": torch.tensor(7),
    }
    experts = {
        f"task{i}": {
            k: (v + torch.randn(v.shape, generator=generator) if v.is_floating_point() else v)
            for k, v in pretrained.items()
        }
        for i in range(num_tasks)
    }
    return pretrained, experts


def test_task_arithmetic_equals_the_formula():
    pretrained, experts = _models(3)
    merged = task_arithmetic(pretrained, experts, scale=0.3)
    for key in ("w", "b"):
        expected = pretrained[key] + 0.3 * sum(e[key] - pretrained[key] for e in experts.values())
        assert torch.allclose(merged[key], expected, atol=1e-6)
    assert torch.equal(merged["steps"], pretrained["steps"])


def test_weight_averaging_is_the_mean_of_the_experts():
    pretrained, experts = _models(4)
    merged = weight_averaging(pretrained, experts)
    for key in ("w", "b"):
        assert torch.allclose(merged[key], torch.stack([e[key] for e in experts.values()]).mean(0), atol=1e-6)


def test_ten_tasks_are_all_used():
    pretrained, experts = _models(10)
    merged = weight_averaging(pretrained, experts)
    assert len(task_vectors(pretrained, experts)) == 10
    without_last = weight_averaging(pretrained, dict(list(experts.items())[:9]))
    assert not torch.allclose(merged["w"], without_last["w"])


def test_experts_of_another_architecture_are_refused():
    pretrained, experts = _models(2)
    experts["task1"]["w"] = torch.zeros(5, 3)
    with pytest.raises(SurgeryBookError, match=r"expert 'task1' has shape \(5, 3\)"):
        task_arithmetic(pretrained, experts)
    del experts["task1"]["w"]
    with pytest.raises(SurgeryBookError, match="missing"):
        weight_averaging(pretrained, experts)


def test_experts_with_integer_weights_are_refused_and_float_precisions_may_mix():
    from surgery_lib.merging import ties_merging

    pretrained, experts = _models(2)
    experts["task1"]["w"] = experts["task1"]["w"].round().to(torch.int64)  # was merged as truncated values
    for merge_fn in (task_arithmetic, ties_merging):
        with pytest.raises(SurgeryBookError, match=r"expert 'task1' has dtype torch.int64 for 'w'"):
            merge_fn(pretrained, experts)
    experts["task1"]["w"] = experts["task1"]["w"].to(torch.float16)
    half = task_arithmetic(pretrained, experts, 0.3)
    expected = pretrained["w"] + 0.3 * sum(e["w"].float() - pretrained["w"] for e in experts.values())
    torch.testing.assert_close(half["w"].float(), expected)


def test_ties_on_a_hand_computed_example():
    from surgery_lib.merging import ties_merging

    pretrained = {"w": torch.zeros(6)}
    experts = {
        "a": {"w": torch.tensor([4.0, -3.0, 0.1, 2.0, -0.2, 1.0])},
        "b": {"w": torch.tensor([2.0, 0.9, -0.3, -5.0, 0.1, -1.0])},
        "c": {"w": torch.tensor([-1.0, 2.0, 0.2, 4.0, 0.1, 0.5])},
    }
    # keep 50 % of each vector's 6 entries as the official code counts, int(0.5 * 6) + 1 = 4 (global top-4):
    #   a -> [4, -3, 0, 2, 0, 1]; b -> [2, 0.9, 0, -5, 0, -1]; c -> [-1, 2, 0, 4, 0, 0.5]
    # sums [5, -0.1, 0, 1, 0, 0.5] elect signs [+, -, 0, +, 0, +] (zeros take the majority sign, +); agreeing:
    #   a [4, -3, 0, 2, 0, 1]; b [2, 0, 0, 0, 0, 0]; c [0, 0, 0, 4, 0, 0.5]
    disjoint_sum = torch.tensor([6.0, -3.0, 0.0, 6.0, 0.0, 1.5])
    disjoint_mean = torch.tensor([3.0, -3.0, 0.0, 3.0, 0.0, 0.75])
    merged_sum = ties_merging(pretrained, experts, keep_fraction=0.5, scale=0.3, combine="sum")
    merged_mean = ties_merging(pretrained, experts, keep_fraction=0.5, scale=1.0, combine="mean")
    assert torch.allclose(merged_sum["w"], 0.3 * disjoint_sum)
    assert torch.allclose(merged_mean["w"], disjoint_mean)
    # An entry whose trimmed values cancel exactly takes the majority sign of all elected signs (+ here).
    cancel = ties_merging(
        {"w": torch.zeros(2)},
        {"a": {"w": torch.tensor([1.0, 3.0])}, "b": {"w": torch.tensor([-1.0, 3.0])}},
        keep_fraction=1.0,
        scale=1.0,
    )
    assert torch.equal(cancel["w"], torch.tensor([1.0, 6.0]))


def test_ties_threshold_is_global_over_all_tensors():
    from surgery_lib.merging import trim_threshold

    vector = {"small": torch.tensor([0.1, 0.2]), "large": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    # 50 % of 6 entries, counted as the official code does (int(0.5 * 6) + 1 = 4): the four large ones,
    # where a per-tensor trim would keep 0.2 too.
    assert trim_threshold(vector, 0.5) == 5.0
    # With 6 more all-zero entries trimmed alongside (real CLIP's text leftovers) the cut falls among the
    # zeros (the 6th smallest of 12): every real entry is kept.
    assert trim_threshold(vector, 0.5, zero_entries=6) == 0.0
    assert trim_threshold(vector, 0.4, zero_entries=6) == pytest.approx(
        0.2
    )  # int(0.4 * 12) + 1 = 5 kept: 0.2 and the large ones
    with pytest.raises(SurgeryBookError, match="outside"):
        trim_threshold(vector, 0.0)


@pytest.mark.parametrize(
    "tasks, problem",
    [(["nope"], "the smoke zoo has no task 'nope'. Fix: use one of: "), (["mnist", "mnist"], "more than once: mnist")],
)
def test_merges_and_their_evaluation_refuse_unknown_or_repeated_tasks(smoke_zoo, tasks, problem):
    from surgery_lib.merging import cached_merge, evaluate_merge, merge

    result = merge(smoke_zoo, "weight_averaging", progress=False)
    for call in (  # merge: a KeyError for an unknown task; a repeat was silently merged once
        lambda: merge(smoke_zoo, "weight_averaging", tasks=tasks, progress=False),
        lambda: cached_merge(smoke_zoo, "weight_averaging", tasks=tasks, progress=False),
        lambda: evaluate_merge(smoke_zoo, result, tasks=tasks),
    ):
        with pytest.raises(SurgeryBookError, match=re.escape(problem)):
            call()
