"""Acceptance check of the full mini zoo (minutes on 2 cores): run with ``pytest -m slow``.

Uses the project cache ($SURGERY_BOOK_CACHE, .cache/ under ``make``), so the zoo built here is the
one ``make run`` and the notebooks reuse.
"""

from __future__ import annotations

import pytest

from surgery_lib.evaluation import task_accuracy
from surgery_lib.merging import task_arithmetic
from surgery_lib.models import load_encoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mini_zoo():
    from surgery_lib.zoo import build_zoo

    return build_zoo("mini", device="cpu", progress=False)


def test_every_expert_beats_pretrained_by_five_points(mini_zoo):
    table = mini_zoo.accuracy_table()
    gains = table.loc["individual (expert)"] - table.loc["pretrained + probe"]
    print("\nmini zoo:\n" + table.round(2).to_markdown())
    assert (gains.drop("average") >= 5).all(), gains


def test_task_arithmetic_loses_at_least_ten_points(mini_zoo):
    merged = load_encoder(mini_zoo.preset.encoder, task_arithmetic(mini_zoo.pretrained, mini_zoo.experts, 0.3))
    accuracies = [task_accuracy(merged, mini_zoo.heads[t], mini_zoo.suite[t]) for t in mini_zoo.tasks]
    average = sum(accuracies) / len(accuracies)
    experts = mini_zoo.accuracy_table().loc["individual (expert)", "average"]
    print(f"\ntask arithmetic (0.3): {average:.2f}, experts {experts:.2f}")
    assert average <= experts - 10
