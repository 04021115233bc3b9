"""Merging formulas against hand computations."""

from __future__ import annotations

import pytest
import torch

from surgery_lib.errors import SurgeryBookError
from surgery_lib.merging import task_arithmetic, task_vectors, weight_averaging


def _models(num_tasks: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pretrained = {"w": torch.randn(4, 3, generator=generator), "b": torch.randn(3, generator=generator), "steps": torch.tensor(7)}
    experts = {
        f"task{i}": {k: (v + torch.randn(v.shape, generator=generator) if v.is_floating_point() else v) for k, v in pretrained.items()}
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
