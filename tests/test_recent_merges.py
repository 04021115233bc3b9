"""The post-2024 merges (TSV-M, Iso-C, Iso-CTS, WUDI, consensus) against hand-computed examples and
independent formulas; the registry contract test runs them on the smoke zoo as well."""

from __future__ import annotations

import math

import pytest
import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.merging import MergeOptions, merge
from surgery_lib.merging.consensus import (
    consensus_merging,
    consensus_vector,
    tall_masks,
)
from surgery_lib.merging.isotropic import iso_c_matrix, iso_cts_matrix, iso_cts_split
from surgery_lib.merging.tsv import (
    nearest_orthonormal,
    per_task_rank,
    tsv_matrix,
    tsv_merging,
)
from surgery_lib.merging.vectors import task_vectors
from surgery_lib.merging.wudi import (
    WUDI_LR,
    WUDI_OFFICIAL_LR,
    convergence_curve,
    convergence_table,
    interference_loss,
    interference_minimum,
    wudi_matrix,
    wudi_merging,
)
from surgery_lib.presets import get_preset

E = torch.eye(4)


def outer(u, v):
    return torch.outer(u, v)


def test_tsv_of_tasks_in_orthogonal_directions_is_their_sum():
    # Delta_1 = 2 e1 f1^T and Delta_2 = 3 e2 f2^T (4 x 3): rank 3 split between 2 tasks keeps 1 triplet each,
    # the kept vectors are already orthonormal, so whitening changes nothing and TSV-M adds them.
    f = torch.eye(3)
    deltas = [2 * outer(E[0], f[0]), 3 * outer(E[1], f[1])]
    assert per_task_rank(4, 3, 2) == 1
    assert torch.allclose(tsv_matrix(deltas), deltas[0] + deltas[1], atol=1e-6)


def test_tsv_keeps_only_each_tasks_top_triplets():
    # Each task has two directions (5, 1 and 3, 2); with rank 4 // 2 = 2 each, all stay; with rank 1 the weak ones go.
    f = torch.eye(4)
    deltas = [5 * outer(E[0], f[0]) + outer(E[1], f[1]), 3 * outer(E[2], f[2]) + 2 * outer(E[3], f[3])]
    assert torch.allclose(tsv_matrix(deltas), deltas[0] + deltas[1], atol=1e-6)
    assert torch.allclose(tsv_matrix(deltas, rank=1), 5 * outer(E[0], f[0]) + 3 * outer(E[2], f[2]), atol=1e-6)


def test_nearest_orthonormal_equals_whitening():
    # U (U^T U)^{-1/2}, computed independently from an eigendecomposition of the Gram matrix.
    u = torch.tensor([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)], [0.0, 0.0]], dtype=torch.float64)
    values, vectors = torch.linalg.eigh(u.T @ u)
    whitened = u @ vectors @ torch.diag(values.rsqrt()) @ vectors.T
    assert torch.allclose(nearest_orthonormal(u), whitened, atol=1e-12)
    assert torch.allclose(
        nearest_orthonormal(u).T @ nearest_orthonormal(u), torch.eye(2, dtype=torch.float64), atol=1e-12
    )


def test_tsv_merging_adds_the_mean_task_vector_to_non_matrix_parameters():
    pretrained = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    f = torch.eye(3)
    experts = {
        "a": {"w": 2 * outer(E[0], f[0]), "b": torch.tensor([1.0, 2, 3])},
        "c": {"w": 3 * outer(E[1], f[1]), "b": torch.tensor([3.0, 2, 1])},
    }
    merged = tsv_merging(pretrained, experts)
    assert torch.allclose(merged["w"], experts["a"]["w"] + experts["c"]["w"], atol=1e-6)
    assert torch.equal(merged["b"], torch.tensor([2.0, 2, 2]))


def test_iso_c_flattens_the_spectrum_of_the_sum():
    # sum = diag(3, 1): singular values 3 and 1, mean 2, directions e1, e2 -> 2 * I.
    deltas = [torch.diag(torch.tensor([3.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))]
    assert torch.allclose(iso_c_matrix(deltas), 2 * torch.eye(2), atol=1e-6)


def test_iso_cts_fills_the_rank_with_each_tasks_own_direction():
    # sum = diag(3, 1, 0.5): the common subspace (1/3 of rank 3) is e1; what is left of task 1 is 0.5 e3 e3^T
    # and of task 2 e2 e2^T, one direction each; all three with the sum's mean singular value 1.5 -> 1.5 * I.
    deltas = [torch.diag(torch.tensor([3.0, 0.0, 0.5])), torch.diag(torch.tensor([0.0, 1.0, 0.0]))]
    assert torch.allclose(iso_cts_matrix(deltas, common_fraction=1 / 3), 1.5 * torch.eye(3), atol=1e-6)
    # Iso-C keeps the sum's directions instead: also the identity here, as the sum is diagonal.
    assert torch.allclose(iso_c_matrix(deltas), 1.5 * torch.eye(3), atol=1e-6)
    with pytest.raises(SurgeryBookError, match="common fraction"):
        iso_cts_matrix(deltas, common_fraction=0)


@pytest.mark.parametrize(
    ("rank", "tasks", "fraction", "split"),
    [
        (128, 8, 0.8, (104, 3)),  # mini: 26 spare directions, 3.25 per task rounds to 3, the common part takes 104
        (768, 8, 0.8, (616, 19)),  # ViT-B: 154 spare, 19.25 -> 19
        (1024, 8, 0.8, (816, 26)),  # ViT-L: 205 spare, 25.6 -> 26, so the common part gives some back
        (4, 3, 0.5, (1, 1)),
        (16, 8, 0.8, (16, 0)),  # 4 spare over 8 tasks: 0.5 rounds to even (0), the common part takes all
    ],
)
def test_iso_cts_splits_the_rank_as_the_official_code_every_direction_used(rank, tasks, fraction, split):
    assert iso_cts_split(rank, tasks, fraction) == split
    common, per_task = split
    assert common + tasks * per_task == rank


def test_iso_cts_uses_every_direction_and_the_mean_of_the_kept_spectrum():
    # Rank 4, 3 tasks, common fraction 0.5: 1 common direction (the sum's top, e1 with 4) and 1 per task.
    # What the common subspace leaves of each task: 1.5 e3, 2 e2 and 0.8 e4 (its top; -0.5 e3 is second).
    # Kept spectrum 4, 1.5, 2, 0.8: mean 2.075 (the sum's whole spectrum 4, 2, 1, 0.8 would give 1.95), and
    # the four directions span everything: 2.075 * I. Flooring the task-specific share (the earlier code)
    # kept 2 common directions and none per task: 1.95 * diag(1, 1, 0, 0).
    deltas = [torch.diag(torch.tensor(v)) for v in ([3.0, 0, 1.5, 0], [0.0, 2, 0, 0], [1.0, 0, -0.5, 0.8])]
    assert torch.allclose(iso_cts_matrix(deltas, common_fraction=0.5), 2.075 * torch.eye(4), atol=1e-5)
    with pytest.raises(SurgeryBookError, match="common fraction"):
        iso_cts_split(4, 3, 1.5)


def test_wudi_gradient_is_that_of_the_papers_loss_and_adam_reaches_its_minimum():
    torch.manual_seed(0)
    deltas = [torch.randn(6, 4, dtype=torch.float64) * 0.01 for _ in range(3)]
    merged = torch.stack(deltas).sum(0).requires_grad_(True)
    interference_loss(merged, deltas).backward()
    weights = [1 / d.square().sum() for d in deltas]
    analytic = 2 * sum(w * (merged.detach() - d) @ d.T @ d for w, d in zip(weights, deltas))
    assert torch.allclose(merged.grad, analytic)
    assert torch.equal(
        wudi_matrix(deltas, steps=0), torch.stack([d.float() for d in deltas]).sum(0)
    )  # starts at the sum
    # The minimum in closed form: tau_m A = B with A = sum w D^T D, B = sum w D D^T D (A is invertible here).
    a = sum(w * d.T @ d for w, d in zip(weights, deltas))
    b = sum(w * d @ d.T @ d for w, d in zip(weights, deltas))
    exact = b @ torch.linalg.inv(a)
    found = wudi_matrix(deltas, steps=3000, lr=1e-3).double()
    assert float(interference_loss(found, deltas)) <= float(interference_loss(exact, deltas)) * 1.001
    assert float(interference_loss(wudi_matrix(deltas), deltas)) < float(
        interference_loss(torch.stack(deltas).sum(0), deltas)
    )


def test_wudi_convergence_curve_measures_the_gap_left_by_wudis_own_iterates(smoke_zoo):
    torch.manual_seed(0)
    deltas = [torch.randn(6, 4, dtype=torch.float64) * 0.01 for _ in range(3)]
    weights = [1 / d.square().sum() for d in deltas]
    exact = sum(w * d @ d.T @ d for w, d in zip(weights, deltas)) @ torch.linalg.inv(
        sum(w * d.T @ d for w, d in zip(weights, deltas))
    )
    assert torch.allclose(interference_minimum(deltas), exact)
    curve = convergence_curve(deltas, lr=1e-3, steps=200, every=50)
    assert [step for step, _ in curve] == [0, 50, 100, 150, 200] and curve[0][1] == pytest.approx(1.0)
    best, start = float(interference_loss(exact, deltas)), float(interference_loss(torch.stack(deltas).sum(0), deltas))
    final = float(interference_loss(wudi_matrix(deltas, steps=200, lr=1e-3).double(), deltas))
    assert curve[-1][1] == pytest.approx((final - best) / (start - best), rel=1e-4)
    assert convergence_curve(deltas, lr=1e-3, steps=3000, every=3000)[-1][1] < 1e-3  # Adam gets there
    table = convergence_table(smoke_zoo.pretrained, smoke_zoo.experts, lrs=(1e-5, 1e-4), steps=20, every=10)
    assert table["layer"].nunique() == 4 * get_preset("smoke").encoder.layers  # the official scope's matrices
    assert sorted(table["step"].unique()) == [0, 10, 20] and set(table["lr"]) == {1e-5, 1e-4}


def test_wudi_takes_the_official_learning_rate_on_the_published_checkpoints_only(smoke_zoo):
    import dataclasses

    options = MergeOptions(steps=1)
    trained_here = merge(smoke_zoo, "wudi", options, device="cpu", progress=False)
    published = merge(dataclasses.replace(smoke_zoo, published=True), "wudi", options, device="cpu", progress=False)
    assert (trained_here.details["lr"], published.details["lr"]) == (WUDI_LR, WUDI_OFFICIAL_LR)
    key = "transformer.resblocks.0.mlp.c_fc.weight"  # optimised in the official scope
    assert not torch.equal(trained_here.state[key], published.state[key])  # the step size reached the merge


def test_wudi_scopes_choose_what_is_optimised_and_what_the_rest_gets():
    # A block's four matrices, a LayerNorm weight (1-D), a positional embedding (2-D, not a linear layer) and proj.
    torch.manual_seed(0)
    shapes = {
        "transformer.resblocks.0.attn.in_proj_weight": (12, 4),
        "transformer.resblocks.0.attn.out_proj.weight": (4, 4),
        "transformer.resblocks.0.mlp.c_fc.weight": (8, 4),
        "transformer.resblocks.0.mlp.c_proj.weight": (4, 8),
        "transformer.resblocks.0.ln_1.weight": (4,),
        "positional_embedding": (5, 4),
        "proj": (4, 3),
    }
    pretrained = {k: torch.randn(shape) for k, shape in shapes.items()}
    experts = {t: {k: v + 0.01 * torch.randn_like(v) for k, v in pretrained.items()} for t in "abc"}
    vectors = list(task_vectors(pretrained, experts).values())
    mean = {k: torch.stack([v[k] for v in vectors]).mean(0) for k in pretrained}
    optimised = {
        k: pretrained[k] + wudi_matrix([v[k] for v in vectors], 20, 1e-4) for k in pretrained if len(shapes[k]) == 2
    }
    block = [k for k in shapes if ".attn." in k or ".mlp." in k]

    official = wudi_merging(pretrained, experts, steps=20, scope="official")
    assert all(torch.allclose(official[k], optimised[k]) for k in block)
    assert all(torch.equal(official[k], pretrained[k]) for k in shapes if k not in block)  # no task vector there

    fusionbench = wudi_merging(pretrained, experts, steps=20, scope="fusionbench")
    assert all(torch.allclose(fusionbench[k], optimised[k]) for k in [*block, "positional_embedding", "proj"])
    assert torch.allclose(
        fusionbench["transformer.resblocks.0.ln_1.weight"],
        pretrained["transformer.resblocks.0.ln_1.weight"] + mean["transformer.resblocks.0.ln_1.weight"],
    )

    linear = wudi_merging(pretrained, experts, steps=20, scope="linear")
    assert torch.allclose(
        linear["positional_embedding"], pretrained["positional_embedding"] + mean["positional_embedding"]
    )
    transposed = pretrained["proj"] + wudi_matrix([v["proj"].T for v in vectors], 20, 1e-4).T
    assert torch.allclose(linear["proj"], transposed)
    with pytest.raises(SurgeryBookError, match=r"unknown WUDI scope 'all'.*official, fusionbench, linear"):
        wudi_merging(pretrained, experts, scope="all")


def test_consensus_keeps_entries_at_least_two_tall_masks_keep():
    # tau_1 = [1, 0.1, 2], tau_2 = [1, 0, -2]: tau_MTL = [2, 0.1, 0]. With lambda = 0.4,
    # m_1 = |tau_1| >= 0.4 |tau_MTL - tau_1| = [1 >= 0.4, 0.1 >= 0, 2 >= 0.8] = [T, T, T]
    # m_2 = |tau_2| >= 0.4 |tau_MTL - tau_2| = [1 >= 0.4, 0 >= 0.04, 2 >= 0.8] = [T, F, T]
    # so entries 0 and 2 are in two masks, entry 1 in one (selfish): consensus = [2, 0, 0].
    vectors = [{"w": torch.tensor([1.0, 0.1, 2.0])}, {"w": torch.tensor([1.0, 0.0, -2.0])}]
    summed = {"w": vectors[0]["w"] + vectors[1]["w"]}
    masks = tall_masks(vectors, summed, 0.4)
    assert masks[0]["w"].tolist() == [True, True, True] and masks[1]["w"].tolist() == [True, False, True]
    assert torch.equal(consensus_vector(vectors, summed, 0.4)["w"], torch.tensor([2.0, 0.0, 0.0]))
    merged = consensus_merging(
        {"w": torch.ones(3)}, {"a": {"w": 1 + vectors[0]["w"]}, "b": {"w": 1 + vectors[1]["w"]}}, scale=0.5
    )
    assert torch.allclose(merged["w"], torch.tensor([2.0, 1.0, 1.0]))


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "wudi", "consensus_ta", "consensus_ties"])
def test_each_recent_merge_moves_the_zoo_and_reads_its_scale_or_steps(method, smoke_zoo):
    base = merge(smoke_zoo, method, MergeOptions(steps=5), device="cpu", progress=False)
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.equal(base.state[key], smoke_zoo.pretrained[key])
    changed = MergeOptions(steps=5, scale=0.1) if method != "wudi" else MergeOptions(steps=1)
    other = merge(smoke_zoo, method, changed, device="cpu", progress=False)
    assert not torch.equal(other.state[key], base.state[key])
