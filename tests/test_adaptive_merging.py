"""AdaMerging, Fisher merging and RegMean against their definitions (smoke zoo and tiny linear models)."""

from __future__ import annotations

import pytest
import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.merging import (
    MergeOptions,
    add_vectors,
    check_method,
    evaluate_merge,
    merge,
    task_arithmetic,
    task_vectors,
)
from surgery_lib.merging.adamerging import adamerging, prediction_entropy
from surgery_lib.merging.fisher import diagonal_fisher, fisher_merging
from surgery_lib.merging.regmean import (
    _attention_values,
    gram_matrices,
    regmean_merging,
)
from surgery_lib.models import load_encoder


def _run(zoo, **kwargs):
    vectors = task_vectors(zoo.pretrained, zoo.experts)
    defaults = dict(split="adapt", steps=0, batch_size=8, batches_per_task=1, progress=False)
    return adamerging(zoo.encoder(), zoo.pretrained, vectors, zoo.heads, zoo.suite.tasks, **{**defaults, **kwargs})


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_at_initialisation_is_task_arithmetic(smoke_zoo, granularity):
    result = _run(smoke_zoo, granularity=granularity)
    expected = task_arithmetic(smoke_zoo.pretrained, smoke_zoo.experts, 0.3)
    for key, value in expected.items():
        assert torch.allclose(result.merged[key], value, atol=1e-6), key
    groups = len(smoke_zoo.pretrained) if granularity == "layer" else 1
    assert result.coefficients.shape == (2, groups)


def test_adamerging_lowers_entropy_and_keeps_coefficients_in_range(smoke_zoo):
    result = _run(smoke_zoo, granularity="layer", steps=25, lr=0.05)
    assert 0.0 <= result.coefficients.min() and result.coefficients.max() <= 1.0
    assert not torch.allclose(result.coefficients, torch.full_like(result.coefficients, 0.3))

    def mean_entropy(state):
        encoder = load_encoder(smoke_zoo.preset.encoder, state)
        with torch.no_grad():
            values = [
                prediction_entropy(smoke_zoo.heads[t](encoder(smoke_zoo.suite[t].normalized("adapt")))).mean()
                for t in smoke_zoo.tasks
            ]
        return float(sum(values))

    before = mean_entropy(task_arithmetic(smoke_zoo.pretrained, smoke_zoo.experts, 0.3))
    assert mean_entropy(result.merged) < before
    assert sum(result.entropy[-5:]) < sum(result.entropy[:5])  # per-step values are single noisy batches


def test_a_coefficient_driven_below_zero_stays_at_zero(smoke_zoo):
    from surgery_lib.merging.adamerging import merge_with_coefficients

    # The clamp sits inside the merge: outside [0, 1] a coefficient gets no gradient.
    vectors = task_vectors(smoke_zoo.pretrained, smoke_zoo.experts)
    stacked = {k: torch.stack([v[k] for v in vectors.values()]) for k in next(iter(vectors.values()))}
    coefficients = torch.tensor([[-0.2], [1.4]], requires_grad=True)
    merged = merge_with_coefficients(smoke_zoo.pretrained, stacked, coefficients)
    sum(v.sum() for v in merged.values()).backward()
    assert torch.equal(coefficients.grad, torch.zeros(2, 1))
    for key in stacked:
        torch.testing.assert_close(merged[key], smoke_zoo.pretrained[key] + stacked[key][1])

    # A large learning rate pushes coefficients past 0 in the first steps; they stay there (Adam keeps
    # moving them on their momentum alone), so the merge uses exactly 0 for them from then on.
    first = _run(smoke_zoo, granularity="layer", steps=2, lr=0.5)
    later = _run(smoke_zoo, granularity="layer", steps=6, lr=0.5)
    below = first.raw_coefficients < 0
    assert below.any()
    assert (later.raw_coefficients[below] < 0).all() and (later.coefficients[below] == 0).all()
    assert later.coefficients.min() >= 0 and later.coefficients.max() <= 1


def test_adamerging_draws_a_fresh_shuffle_every_step_and_sums_batch_entropies(smoke_zoo, monkeypatch):
    import surgery_lib.merging.adamerging as module

    drawn = []
    original = torch.randperm

    def recording(n, *args, **kwargs):
        order = original(n, *args, **kwargs)
        drawn.append(order)
        return order

    monkeypatch.setattr(module.torch, "randperm", recording)
    losses = []
    real_entropy = module.prediction_entropy
    monkeypatch.setattr(module, "prediction_entropy", lambda logits: losses.append(1) or real_entropy(logits))
    _run(smoke_zoo, granularity="task", steps=3, batches_per_task=2)
    assert len(drawn) == 3 * 2  # a permutation per task per step
    assert len(losses) == 3 * 2 * 2  # two batches per task per step, each its own loss term
    assert not torch.equal(drawn[0], drawn[2])


def test_adamerging_refuses_nan_and_missing_heads(smoke_zoo):
    vectors = task_vectors(smoke_zoo.pretrained, smoke_zoo.experts)
    key = next(iter(vectors["mnist"]))
    vectors["mnist"][key] = vectors["mnist"][key] * float("nan")
    with pytest.raises(SurgeryBookError, match="NaN"):
        adamerging(
            smoke_zoo.encoder(),
            smoke_zoo.pretrained,
            vectors,
            smoke_zoo.heads,
            smoke_zoo.suite.tasks,
            steps=1,
            batch_size=4,
            batches_per_task=1,
            progress=False,
        )
    with pytest.raises(SurgeryBookError, match="no head or data"):
        adamerging(
            smoke_zoo.encoder(),
            smoke_zoo.pretrained,
            task_vectors(smoke_zoo.pretrained, smoke_zoo.experts),
            {"mnist": smoke_zoo.heads["mnist"]},
            smoke_zoo.suite.tasks,
            steps=1,
            progress=False,
        )
    with pytest.raises(SurgeryBookError, match="NaN or infinity"):
        add_vectors(smoke_zoo.pretrained, list(vectors.values()), [0.3, float("nan")])


def test_regmean_on_linear_models_is_the_least_squares_merge():
    generator = torch.Generator().manual_seed(0)
    inputs = {t: torch.randn(50, 6, generator=generator) for t in ("a", "b", "c")}
    experts = {
        t: {"fc.weight": torch.randn(4, 6, generator=generator), "fc.bias": torch.randn(4, generator=generator)}
        for t in inputs
    }
    grams = {t: {"fc.weight": (x.T @ x).double()} for t, x in inputs.items()}
    merged = regmean_merging(experts, grams, alpha=1.0)
    stacked_x = torch.cat(list(inputs.values())).double()
    stacked_y = torch.cat([inputs[t].double() @ experts[t]["fc.weight"].double().T for t in inputs])
    least_squares = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    assert torch.allclose(merged["fc.weight"].double(), least_squares, atol=1e-5)
    assert torch.allclose(merged["fc.bias"], torch.stack([e["fc.bias"] for e in experts.values()]).mean(0))
    # alpha = 0 keeps only the diagonal: a per-input-feature weighted average, not the least-squares solution.
    assert not torch.allclose(
        regmean_merging(experts, grams, alpha=0.0)["fc.weight"].double(), least_squares, atol=1e-3
    )


def test_regmean_of_identical_experts_is_that_expert(smoke_zoo):
    images = smoke_zoo.suite["mnist"].normalized("train", slice(0, 32))
    grams = {t: gram_matrices(smoke_zoo.encoder("mnist"), images) for t in ("x", "y")}
    blocks = smoke_zoo.preset.encoder.layers
    assert len(grams["x"]) == 4 * blocks + 1 and grams["x"]["proj"].shape == (64, 64)
    merged = regmean_merging({t: smoke_zoo.experts["mnist"] for t in ("x", "y")}, grams)
    for key, value in smoke_zoo.experts["mnist"].items():
        assert torch.allclose(merged[key], value, atol=1e-4), key


def test_out_proj_inputs_are_recomputed_exactly(smoke_zoo):
    attn = smoke_zoo.encoder().transformer.resblocks[0].attn
    x = torch.randn(3, 5, attn.embed_dim)
    with torch.no_grad():
        reference = attn(x, x, x, need_weights=False)[0]
        recomputed = attn.out_proj(_attention_values(attn, x))
    assert torch.allclose(reference, recomputed, atol=1e-5)


def test_fisher_merging_weights_by_fisher():
    experts = {"a": {"w": torch.tensor([1.0, 1.0])}, "b": {"w": torch.tensor([3.0, 3.0])}}
    fishers = {"a": {"w": torch.tensor([1.0, 0.0])}, "b": {"w": torch.tensor([1.0, 1.0])}}
    assert torch.allclose(fisher_merging(experts, fishers)["w"], torch.tensor([2.0, 3.0]))


def test_diagonal_fisher_is_a_mean_of_squared_gradients(smoke_zoo):
    encoder, head = smoke_zoo.encoder("mnist"), smoke_zoo.heads["mnist"]
    images = smoke_zoo.suite["mnist"].normalized("train", slice(0, 3))
    fisher = diagonal_fisher(encoder, head, images)
    manual = {}
    for image in images:
        encoder.zero_grad()
        log_probs = head(encoder(image[None])).log_softmax(-1)
        log_probs[0, log_probs.argmax()].backward()
        for name, p in encoder.named_parameters():
            manual[name] = manual.get(name, 0) + p.grad**2 / 3
    for name, value in fisher.items():
        assert (value >= 0).all() and torch.allclose(value, manual[name], atol=1e-7, rtol=1e-4), name


@pytest.mark.parametrize(
    "method",
    [
        "weight_averaging",
        "task_arithmetic",
        "ties",
        "ties_mean",
        "fisher",
        "regmean",
        "adamerging_task",
        "adamerging_layer",
        "adamerging_plus",
    ],
)
def test_every_method_runs_on_the_zoo(smoke_zoo, method):
    options = MergeOptions(steps=2, batch_size=4, samples=8)
    result = merge(smoke_zoo, method, options, progress=False)
    assert set(result.state) == set(smoke_zoo.pretrained)
    accuracy = evaluate_merge(smoke_zoo, result)
    assert set(accuracy) == {"mnist", "shapes"} and all(0 <= a <= 100 for a in accuracy.values())


def test_unknown_method_is_a_clear_error():
    with pytest.raises(SurgeryBookError, match=r"unknown merging method 'dare'.*use one of"):
        check_method("dare")


def test_evaluation_needs_a_head_for_every_task(smoke_zoo):
    from surgery_lib.evaluation import evaluate_tasks

    with pytest.raises(SurgeryBookError, match="no head for task"):
        evaluate_tasks(smoke_zoo.encoder(), {"mnist": smoke_zoo.heads["mnist"]}, smoke_zoo.suite.tasks)


def test_block_table_averages_the_coefficients_of_each_block(smoke_zoo):
    result = _run(smoke_zoo, granularity="layer", steps=3, lr=0.05)
    blocks = result.block_table()
    layers = smoke_zoo.preset.encoder.layers
    assert list(blocks.columns) == [f"block {i + 1}" for i in range(layers)] + ["embeddings, ln, proj"]
    table = result.coefficient_table()
    first = [c for c in table.columns if c.startswith("transformer.resblocks.0.")]
    assert blocks["block 1"].tolist() == pytest.approx(table[first].mean(axis=1).tolist())
    with pytest.raises(SurgeryBookError, match="no blocks"):
        _run(smoke_zoo, granularity="task").block_table()
