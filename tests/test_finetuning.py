"""Fine-tuning modes (surgery_lib.finetuning) and the kept-share measurement (surgery_lib.disentanglement)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.disentanglement import kept_share_curve, summarize_curve, task_subsets
from surgery_lib.evaluation import task_accuracy
from surgery_lib.finetuning import FINETUNING_MODES, LinearizedEncoder, attention_parameter, prepare_finetuning
from surgery_lib.merging.vectors import add_vectors, task_vectors
from surgery_lib.models import build_encoder, clone_state, load_encoder
from surgery_lib.presets import check_preset, get_preset
from surgery_lib.settings.offline import training
from surgery_lib.settings.offline.zoo import zoo_config_hash

SMOKE = get_preset("smoke")


def _trained(mode: str, steps: int = 3, **options):
    """A smoke-sized encoder, its initial weights, and the state ``mode`` exports after ``steps`` AdamW steps."""
    torch.manual_seed(0)
    encoder = build_encoder(SMOKE.encoder)
    before = clone_state(encoder)
    tuning = prepare_finetuning(encoder, mode, **options)
    optimizer = torch.optim.AdamW(tuning.parameters, lr=1e-2, weight_decay=0.1)
    images, targets = torch.randn(8, 3, 32, 32), torch.randn(8, SMOKE.encoder.output_dim)
    for _ in range(steps):
        loss = F.mse_loss(tuning.forward(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, tuning.export()


def test_the_four_modes_are_registered():
    assert list(FINETUNING_MODES) == ["full", "attention", "lora", "tangent"]


@pytest.mark.parametrize("mode", ["full", "attention", "lora", "tangent"])
def test_every_mode_exports_the_encoders_full_state_and_moves_it(mode):
    before, after = _trained(mode)
    assert sorted(after) == sorted(before)
    assert all(after[k].shape == before[k].shape for k in before)
    assert any(not torch.equal(after[k], before[k]) for k in before)
    load_encoder(SMOKE.encoder, after)  # loads strictly


@pytest.mark.parametrize("mode", ["lora", "tangent"])
def test_modes_that_add_an_update_start_at_the_pretrained_weights(mode):
    before, after = _trained(mode, steps=0)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_an_attention_only_task_vector_is_zero_outside_attention():
    before, after = _trained("attention")
    moved = {k for k in before if not torch.equal(after[k], before[k])}
    assert moved and all(attention_parameter(k) for k in moved)
    assert {k for k in before if attention_parameter(k)} == moved  # Q/K/V/out weights and biases all train


@pytest.mark.parametrize("rank", [1, 3])
def test_a_lora_task_vector_has_the_declared_rank_in_every_target_matrix_and_is_zero_elsewhere(rank):
    before, after = _trained("lora", lora_rank=rank)
    tau = {k: after[k] - before[k] for k in before}
    targets = {k for k in tau if k.endswith(("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight"))}
    assert len(targets) == 4 * SMOKE.encoder.layers
    for key in targets:
        assert torch.linalg.matrix_rank(tau[key].double(), rtol=1e-6).item() == rank, key
    assert all(torch.equal(tau[k], torch.zeros_like(tau[k])) for k in tau if k not in targets)


def test_the_linearised_encoder_is_the_first_order_taylor_model():
    """f_lin(theta_0 + tau) = f(theta_0) + J tau, checked against central finite differences in float64."""
    torch.manual_seed(0)
    encoder = build_encoder(SMOKE.encoder).double().eval()
    theta0 = {k: v.detach().clone() for k, v in encoder.named_parameters()}
    tau = {k: 0.05 * torch.randn_like(v) for k, v in theta0.items()}
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    linear = LinearizedEncoder(encoder, tau)(images)

    def f(step: float) -> torch.Tensor:
        shifted = build_encoder(SMOKE.encoder).double().eval()
        shifted.load_state_dict({k: theta0[k] + step * tau[k] for k in theta0}, strict=False)
        return shifted(images)

    eps = 1e-4
    finite = f(0.0) + (f(eps) - f(-eps)) / (2 * eps)
    assert torch.allclose(linear, finite, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(linear, f(1.0), atol=1e-3)  # and it is not the non-linear model at theta_0 + tau
    assert torch.allclose(LinearizedEncoder(encoder)(images), f(0.0), atol=1e-12)  # zero tangent: f(theta_0)


def test_a_tangent_expert_moves_only_through_its_tangent():
    before, after = _trained("tangent", steps=2)
    moved = [k for k in before if not torch.equal(after[k], before[k])]
    assert len(moved) == len(before)  # every parameter has a tangent component


def test_bad_modes_and_ranks_are_clear_errors():
    encoder = build_encoder(SMOKE.encoder)
    with pytest.raises(SurgeryBookError, match=r"unknown fine-tuning mode 'bogus'.*full, attention, lora, tangent"):
        prepare_finetuning(encoder, "bogus")
    with pytest.raises(SurgeryBookError, match=r"LoRA rank 0 is not a positive integer"):
        prepare_finetuning(encoder, "lora", lora_rank=0)
    with pytest.raises(SurgeryBookError, match=r"LoRA rank 100 exceeds the smaller side of a 192x64 weight.*<= 64"):
        prepare_finetuning(build_encoder(SMOKE.encoder), "lora", lora_rank=100)
    with pytest.raises(SurgeryBookError, match=r"mode 'attention' finds no parameter to train"):
        prepare_finetuning(torch.nn.Linear(4, 4), "attention")
    bad = dataclasses.replace(SMOKE, recipe=dataclasses.replace(SMOKE.recipe, expert_finetune="lora2"))
    with pytest.raises(SurgeryBookError, match=r"recipe.expert_finetune = 'lora2' is invalid.*one of full, attention"):
        check_preset(bad)


def test_the_recipe_mode_names_the_zoo_only_when_it_is_not_the_earlier_default():
    assert zoo_config_hash(SMOKE) == zoo_config_hash(
        dataclasses.replace(SMOKE, recipe=dataclasses.replace(SMOKE.recipe))
    )
    lora = dataclasses.replace(SMOKE, recipe=dataclasses.replace(SMOKE.recipe, expert_finetune="lora"))
    lora8 = dataclasses.replace(
        SMOKE, recipe=dataclasses.replace(SMOKE.recipe, expert_finetune="lora", expert_lora_rank=8)
    )
    assert len({zoo_config_hash(SMOKE), zoo_config_hash(lora), zoo_config_hash(lora8)}) == 3


def test_an_attention_zoo_trains_attention_only_experts(smoke_zoo, cache_dir, tmp_path):
    from surgery_lib.settings import build_zoo

    preset = dataclasses.replace(SMOKE, recipe=dataclasses.replace(SMOKE.recipe, expert_finetune="attention"))
    zoo = build_zoo(preset, device="cpu", cache_dir=cache_dir, zoo_dir=tmp_path / "zoo", progress=False)
    for tau in task_vectors(zoo.pretrained, zoo.experts).values():
        moved = {k for k, v in tau.items() if v.abs().max() > 0}
        assert moved and all(attention_parameter(k) for k in moved)
    recorded = zoo.manifest["models"]["expert/shapes"]["test_accuracy"]
    assert recorded == task_accuracy(zoo.encoder("shapes"), zoo.heads["shapes"], zoo.suite["shapes"])
    # The pretrained model and heads do not depend on how experts are fine-tuned: same seeds, same bits.
    assert all(torch.equal(zoo.pretrained[k], smoke_zoo.pretrained[k]) for k in zoo.pretrained)


def test_finetune_keeps_the_mtl_baseline_a_full_fine_tune(smoke_zoo):
    encoder = smoke_zoo.encoder("pretrained")
    _, state = training.finetune(
        encoder,
        [(smoke_zoo.suite[t], smoke_zoo.heads[t]) for t in smoke_zoo.tasks],
        steps=2,
        batch_per_task=8,
        lr=1e-3,
        weight_decay=0.1,
        warmup_fraction=0.0,
        translate_px=0,
        seed=0,
        device=torch.device("cpu"),
        progress=False,
    )
    assert all(not torch.equal(state[k], smoke_zoo.pretrained[k]) for k in ("proj", "conv1.weight", "ln_post.weight"))


def test_task_subsets_are_seeded_distinct_and_checked():
    tasks = [f"t{i}" for i in range(8)]
    picked = task_subsets(tasks, 3, 4, seed=1)
    assert picked == task_subsets(tasks, 3, 4, seed=1) and len(set(picked)) == 4 and all(len(s) == 3 for s in picked)
    assert task_subsets(tasks, 8, 4) == [tuple(tasks)]
    with pytest.raises(SurgeryBookError, match=r"cannot merge 9 of 8 tasks"):
        task_subsets(tasks, 9, 1)


def test_kept_share_equals_a_step_by_step_evaluation(smoke_zoo):
    """The curve's numbers replayed by hand: merge, evaluate, divide; one task alone has no interference."""
    load = lambda s: load_encoder(SMOKE.encoder, s)  # noqa: E731
    tasks = {t: smoke_zoo.suite[t] for t in smoke_zoo.tasks}

    def curve(sizes):
        zoo = smoke_zoo
        return kept_share_curve(
            zoo.pretrained, zoo.experts, zoo.heads, tasks, load, sizes=sizes, subsets=5, scale=0.5, progress=False
        )

    rows = curve((1, 2))
    assert sorted(rows["size"].tolist()) == [1, 1, 2, 2]
    vectors = task_vectors(smoke_zoo.pretrained, smoke_zoo.experts)
    merged = load(add_vectors(smoke_zoo.pretrained, list(vectors.values()), [0.5, 0.5]))
    for _, row in rows[rows["size"] == 2].iterrows():
        task = row["task"]
        pre = task_accuracy(load(smoke_zoo.pretrained), smoke_zoo.heads[task], tasks[task])
        expert = task_accuracy(load(smoke_zoo.experts[task]), smoke_zoo.heads[task], tasks[task])
        acc = task_accuracy(merged, smoke_zoo.heads[task], tasks[task])
        assert row["merged"] == pytest.approx(acc) and row["pretrained"] == pytest.approx(pre)
        if expert > pre:
            assert row["kept_share"] == pytest.approx((acc - pre) / (expert - pre))
    alone = rows[rows["size"] == 1]
    assert (alone["disentanglement_error"] == 0).all()
    assert alone["merged"].tolist() == alone["alone"].tolist()
    summary = summarize_curve(rows)
    assert list(summary.index) == [1, 2] and summary.loc[1, "disentanglement_error"] == 0
    twice = curve((2, 2))  # a size given twice counted its subsets twice
    assert twice.equals(rows[rows["size"] == 2].reset_index(drop=True))


def test_the_zoo_curve_reads_stored_embeddings_and_equals_the_plain_one(smoke_zoo, monkeypatch):
    """zoo_kept_share embeds through the zoo (what other runs stored is read, not recomputed) and gives the
    plain curve's numbers exactly."""
    from surgery_lib import disentanglement
    from surgery_lib.disentanglement import zoo_kept_share
    from surgery_lib.settings import base as settings_base

    options = {"sizes": (2,), "subsets": 2, "scale": 0.45, "progress": False}
    plain = kept_share_curve(
        smoke_zoo.pretrained,
        smoke_zoo.experts,
        smoke_zoo.heads,
        {t: smoke_zoo.suite[t] for t in smoke_zoo.tasks},
        lambda s: load_encoder(SMOKE.encoder, s),
        **options,
    )
    first = zoo_kept_share(smoke_zoo, **options)
    computed = []
    original = settings_base.task_features
    for module in (settings_base, disentanglement):  # every way an embedding can be computed
        monkeypatch.setattr(module, "task_features", lambda *a, **k: computed.append(a[2]) or original(*a, **k))
    smoke_zoo.forget_features()
    again = zoo_kept_share(smoke_zoo, **options)
    assert computed == []  # every model's embeddings were stored by the first call
    assert first.equals(plain) and again.equals(plain)
    with pytest.raises(SurgeryBookError, match=r"no size of \[3, 4\] fits the 2 tasks of the smoke zoo"):
        zoo_kept_share(smoke_zoo, sizes=(3, 4), progress=False)  # an empty table came back
