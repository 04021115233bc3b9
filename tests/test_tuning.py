"""Hyper-parameters chosen on validation data: the tuned twins against a plain replay of the official searches,
the validation split as the only data they read, and the validation splits of both settings."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.taskdata import Suite
from surgery_lib.merging import MERGE_METHODS, MergeOptions, cached_merge, merge
from surgery_lib.merging.consensus import TALL_LAMBDAS
from surgery_lib.merging.tuning import SCALES_TO_ONE, SCALES_TO_THREE, is_tuned, tuned_name
from surgery_lib.models import load_encoder


def _plain_accuracy(zoo, state, task):
    """Validation accuracy (%) of ``state`` on ``task``, the way the official eval loop computes it: the whole
    split through the encoder and the head, argmax, the fraction correct."""
    encoder = load_encoder(zoo.preset.encoder, state).eval()
    data = zoo.suite[task]
    with torch.no_grad():
        predictions = zoo.heads[task](encoder(data.normalized("validation"))).argmax(dim=1)
    return 100.0 * (predictions == data.labels["validation"]).float().mean().item()


def _plain_score(zoo, state):
    experts = {t: _plain_accuracy(zoo, zoo.experts[t], t) for t in zoo.tasks}
    return float(np.mean([_plain_accuracy(zoo, state, t) / experts[t] for t in zoo.tasks]))


def _first_best(scores):
    best = max(scores.values())
    return next(value for value, score in scores.items() if score == best)


def test_every_searched_method_has_a_twin_with_the_official_grid():
    twins = {name for name in MERGE_METHODS if is_tuned(name)}
    searched = {name for name, method in MERGE_METHODS.items() if method.search}
    assert twins == {tuned_name(name) for name in searched}
    assert searched == {
        "task_arithmetic",
        "dare_task_arithmetic",
        "dare_ties",
        "consensus_ta",
        "consensus_ties",
        "tsv",
        "iso_c",
        "iso_cts",
    }
    assert SCALES_TO_THREE == tuple(round(x, 6) for x in np.linspace(0, 3, 31)[1:])  # the official linspace grids
    assert SCALES_TO_ONE == tuple(round(x, 6) for x in np.linspace(0, 1, 11)[1:])
    assert dict(MERGE_METHODS["tsv"].search) == {"scale": SCALES_TO_THREE}
    assert dict(MERGE_METHODS["dare_ties"].search) == {"drop_rate": (0.1, 0.3, 0.5, 0.7, 0.9), "scale": SCALES_TO_ONE}
    for name in twins:  # the twin reads what its method reads, except what the search sets
        base = MERGE_METHODS[name.removesuffix("_tuned")]
        assert set(MERGE_METHODS[name].reads) == set(base.reads) - {option for option, _ in base.search}
        assert MERGE_METHODS[name].label == base.label + ", tuned" and MERGE_METHODS[name].data == "validation"


def test_tsv_tuned_equals_a_plain_replay_of_the_official_search(smoke_zoo):
    scores = {}
    for scale in SCALES_TO_THREE:
        scores[scale] = _plain_score(
            smoke_zoo, merge(smoke_zoo, "tsv", MergeOptions(scale=scale), progress=False).state
        )
    chosen = _first_best(scores)
    tuned = merge(smoke_zoo, "tsv_tuned", progress=False)
    search = tuned.details["tuned"]
    assert search["chosen"] == {"scale": chosen} and search["merges_evaluated"] == 30
    assert [c["scale"] for c in search["candidates"]] == list(SCALES_TO_THREE)
    assert [c["score"] for c in search["candidates"]] == pytest.approx(list(scores.values()), abs=1e-6)
    at_chosen = merge(smoke_zoo, "tsv", MergeOptions(scale=chosen), progress=False).state
    assert all(torch.equal(tuned.state[k], v) for k, v in at_chosen.items())


def test_consensus_tuned_equals_a_plain_replay_of_the_official_two_stages(smoke_zoo):
    """tall_masks' procedure on flat vectors: each task's lambda by its TALL-masked model's validation accuracy,
    then the scale of the consensus merge by the mean normalized accuracy."""
    keys = [k for k, v in smoke_zoo.pretrained.items() if v.is_floating_point()]
    flat = lambda state: torch.cat([state[k].flatten() for k in keys])  # noqa: E731
    theta_0 = flat(smoke_zoo.pretrained)
    thetas = torch.stack([flat(smoke_zoo.experts[t]) for t in smoke_zoo.tasks])
    tvs = thetas - theta_0
    merged_tv = tvs.sum(dim=0)

    def unflatten(vector):
        out, start = dict(smoke_zoo.pretrained), 0
        for k in keys:
            n = smoke_zoo.pretrained[k].numel()
            out[k] = vector[start : start + n].view_as(smoke_zoo.pretrained[k])
            start += n
        return out

    lambdas = []
    for i, task in enumerate(smoke_zoo.tasks):
        accuracy = {}
        for lam in TALL_LAMBDAS:
            mask = (theta_0 - thetas[i]).abs() > ((theta_0 + merged_tv) - thetas[i]).abs() * lam
            accuracy[lam] = _plain_accuracy(smoke_zoo, unflatten(theta_0 + mask * merged_tv), task)
        lambdas.append(max(accuracy, key=accuracy.get))
    masks = torch.stack(
        [(theta_0 - thetas[i]).abs() > ((theta_0 + merged_tv) - thetas[i]).abs() * lam for i, lam in enumerate(lambdas)]
    )
    consensus = merged_tv * (masks.sum(dim=0) >= 2)
    scores = {scale: _plain_score(smoke_zoo, unflatten(theta_0 + scale * consensus)) for scale in SCALES_TO_ONE}
    tuned = merge(smoke_zoo, "consensus_ta_tuned", progress=False)
    chosen = tuned.details["tuned"]["chosen"]
    assert chosen == {"lambda": dict(zip(smoke_zoo.tasks, lambdas)), "scale": _first_best(scores)}
    expected = unflatten(theta_0 + chosen["scale"] * consensus)
    assert all(torch.allclose(tuned.state[k], expected[k], atol=1e-6) for k in keys)


def _with_splits(zoo, change):
    """``zoo`` with every task's images of each split replaced by ``change(split, images)``."""
    tasks = {
        t: dataclasses.replace(d, images={s: change(s, x) for s, x in d.images.items()})
        for t, d in zoo.suite.tasks.items()
    }
    return dataclasses.replace(zoo, suite=Suite(zoo.suite.config, tasks, zoo.suite.mix, zoo.suite.files))


@pytest.mark.parametrize("method", ["tsv_tuned", "consensus_ties_tuned", "dare_task_arithmetic_tuned"])
def test_tuning_reads_only_the_validation_split(smoke_zoo, method):
    options = MergeOptions(seed=1)
    plain = merge(smoke_zoo, method, options, progress=False)
    blanked = _with_splits(
        smoke_zoo, lambda split, images: images if split == "validation" else torch.zeros_like(images)
    )
    same = merge(blanked, method, options, progress=False)
    assert same.details["tuned"]["candidates"] == plain.details["tuned"]["candidates"]
    assert all(torch.equal(same.state[k], v) for k, v in plain.state.items())
    flipped = _with_splits(smoke_zoo, lambda split, images: images.flip(-1) if split == "validation" else images)
    moved = merge(flipped, method, options, progress=False)
    assert moved.details["tuned"]["candidates"] != plain.details["tuned"]["candidates"]


def test_a_zoo_without_a_validation_split_is_refused_with_the_fix(smoke_zoo):
    tasks = {
        t: dataclasses.replace(d, images={s: x for s, x in d.images.items() if s != "validation"})
        for t, d in smoke_zoo.suite.tasks.items()
    }
    without = dataclasses.replace(smoke_zoo, suite=Suite(smoke_zoo.suite.config, tasks, smoke_zoo.suite.mix))
    for method in ("tsv_tuned", "consensus_ta_tuned"):
        with pytest.raises(SurgeryBookError, match="validation images.*validation_per_task.*--validation-images"):
            merge(without, method, progress=False)


def test_the_merge_cache_keeps_what_the_search_chose(smoke_zoo, tmp_path):
    zoo = dataclasses.replace(smoke_zoo, directory=tmp_path)
    stored = cached_merge(zoo, "iso_c_tuned", progress=False)
    loaded = cached_merge(zoo, "iso_c_tuned", progress=False)
    assert loaded.details["tuned"] == stored.details["tuned"] and loaded.seconds == stored.seconds
    assert loaded.details["tuned"]["chosen"]["scale"] in SCALES_TO_THREE


def test_dare_tuned_searches_every_drop_rate_and_scale(smoke_zoo):
    tuned = merge(smoke_zoo, "dare_ties_tuned", MergeOptions(seed=2), progress=False)
    search = tuned.details["tuned"]
    assert search["merges_evaluated"] == 50
    assert [(c["drop_rate"], c["scale"]) for c in search["candidates"]][:11] == [
        *((0.1, s) for s in SCALES_TO_ONE),
        (0.3, 0.1),
    ]
    chosen = merge(smoke_zoo, "dare_ties", MergeOptions(seed=2, **search["chosen"]), progress=False)
    assert all(torch.equal(tuned.state[k], v) for k, v in chosen.state.items())


def test_clip_validation_is_task_vectors_held_out_split(tmp_path):
    """task_vectors held out min(int(0.1 n), 5000) training images with random_split(seed 0); its own check on
    MNIST (60,000 training images): the first training index is 36044."""
    from torch.utils.data import random_split

    from surgery_lib.settings.clip.data import held_out_validation

    train, val = random_split(range(60000), [55000, 5000], generator=torch.Generator().manual_seed(0))
    assert train.indices[0] == 36044
    assert held_out_validation(60000) == list(val.indices) and held_out_validation(60000, 7) == list(val.indices[:7])
    train, val = random_split(range(1234), [1111, 123], generator=torch.Generator().manual_seed(0))
    assert held_out_validation(1234) == list(val.indices)
    with pytest.raises(SurgeryBookError, match="holds out no validation images"):
        held_out_validation(9)


def test_clip_tasks_get_their_validation_images_decoded_from_the_right_files(tmp_path):
    from clip_fixtures import EUROSAT_FOLDERS, _idx, _image

    from surgery_lib.settings.clip.data import held_out_validation, load_clip_task

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    digits = rng.integers(0, 256, (40, 28, 28))
    for prefix, images in (("train", digits), ("t10k", digits[:10])):
        _idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", images)
        _idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", np.arange(len(images)) % 10)
    for split in ("train", "val", "test"):
        for name in EUROSAT_FOLDERS:
            _image(root / "EuroSAT_splits" / split / name / f"{name}_1.jpg", rng, (64, 64))
    options = dict(source="local", root=root, cache_dir=tmp_path / "cache", image_size=28, workers=0, progress=False)
    mnist = load_clip_task("MNIST", train_images=40, validation_images=3, **options)
    held_out = held_out_validation(40)
    assert len(held_out) == 4 and mnist.labels["validation"].tolist() == [i % 10 for i in held_out[:3]]
    picks = torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist()  # the train split's order
    for position, index in enumerate(held_out[:3]):
        assert torch.equal(mnist.images["validation"][position], mnist.images["train"][picks.index(index)])
    assert mnist.files["validation"].name == "MNIST-validation-3.npy"
    assert "validation" not in load_clip_task("MNIST", train_images=40, **options).images  # none unless asked
    eurosat = load_clip_task("EuroSAT", train_images=4, validation_images=100, **options)
    assert sorted(eurosat.labels["validation"].tolist()) == list(range(10))  # all of its own val folder


def test_fixed_and_tuned_puts_each_method_beside_its_twin(smoke_zoo):
    from surgery_lib.grid import cell_table, compute_cell, fixed_and_tuned
    from surgery_lib.surgery import SurgeryConfig

    config = SurgeryConfig(steps=2, batch_size=4)
    records = [
        {"preset": "smoke", **compute_cell(smoke_zoo, method, version, config=config)[0]}
        for method in ("tsv", "tsv_tuned", "consensus_ta_tuned", "ties")
        for version in (0, 1)
    ]
    table = cell_table(records).loc["smoke"]
    shown = fixed_and_tuned(table, records)
    assert list(shown.index) == ["TSV-M (task singular vectors)"]  # ties has no twin; consensus_ta no fixed row
    row = shown.iloc[0]
    by_key = {(r["method"], r["version"]): r["average"] for r in records}
    assert row["alone: fixed"] == by_key[("tsv", 0)] and row["alone: tuned"] == by_key[("tsv_tuned", 0)]
    assert row["+ Surgery: tuned"] == by_key[("tsv_tuned", 1)]
    tuned = next(r for r in records if r["method"] == "tsv_tuned" and r["version"] == 0)["tuned"]
    assert row["chosen"] == f"scale {tuned['chosen']['scale']:g}" and row["merges evaluated"] == 30
    consensus = next(r for r in records if r["method"] == "consensus_ta_tuned")["tuned"]["chosen"]
    assert set(consensus) == {"lambda", "scale"} and set(consensus["lambda"]) == set(smoke_zoo.tasks)


def test_a_search_must_name_options_the_method_reads_with_valid_values():
    from surgery_lib.merging import MergeMethod
    from surgery_lib.merging.options import SCALE
    from surgery_lib.merging.tuning import register_tuned

    def run(*args):
        raise AssertionError("never run")

    with pytest.raises(SurgeryBookError, match="searches \\['drop_rate'\\], which it does not read"):
        MergeMethod("scaled", "scaled", run, options=(SCALE,), search=(("drop_rate", (0.1,)),))
    with pytest.raises(SurgeryBookError, match="searches \\['scale'\\].*at least one value"):
        MergeMethod("scaled", "scaled", run, options=(SCALE,), search=(("scale", ()),))
    with pytest.raises(SurgeryBookError, match="declares no search grid"):
        register_tuned(MergeMethod("scaled", "scaled", run, options=(SCALE,)))
    with pytest.raises(SurgeryBookError, match="prepared for a scale it does not read.*SCALE"):
        MergeMethod("scaled", "scaled", run, prepare=lambda *args: None)


#: The methods whose merge is theta_0 + scale * update, given as a preparation finished at a scale.
PREPARED = [name for name, method in MERGE_METHODS.items() if method.prepare is not None]


def test_the_methods_of_the_form_theta_0_plus_scale_times_update_are_prepared_once_per_search():
    assert set(PREPARED) == {"task_arithmetic", "dare_task_arithmetic", "dare_ties", "tsv", "iso_c", "iso_cts"}


@pytest.mark.parametrize("method", PREPARED)
def test_a_search_prepares_once_per_value_of_its_other_options_and_equals_the_plain_merge(smoke_zoo, method):
    """Each candidate the search finishes from a held preparation is bit for bit the method's own merge at those
    values, including after the other options moved on (DARE's drop rate: a new preparation, its own masks)."""
    from surgery_lib.merging.tuning import candidate_merges

    base = MERGE_METHODS[method]
    experts = dict(smoke_zoo.experts)
    options = MergeOptions(seed=4)
    grid = dict(base.search)
    others = {name: values[-2:] for name, values in grid.items() if name != "scale"}
    candidates = [
        {**dict(zip(others, combination)), "scale": scale}
        for combination in itertools.product(*others.values())
        for scale in (grid["scale"][0], 1.7, grid["scale"][-1])
    ]
    merge_at, counts = candidate_merges(base, smoke_zoo, experts, options, "cpu")
    for values in candidates:
        state, details = merge_at(values)
        plain, plain_details = base.run(smoke_zoo, experts, options.replace(**values), "cpu", False)
        assert details == plain_details and details["scale"] == values["scale"]
        assert state.keys() == plain.keys() and all(torch.equal(state[k], v) for k, v in plain.items())
    assert counts == {"preparations": len(list(itertools.product(*others.values())))}
    default = base.run(smoke_zoo, experts, options, "cpu", False)[1]["scale"]
    assert default in (0.3, 1.0)  # the fixed value of the method without validation data


def test_the_tuning_bench_times_each_prepared_search(capsys):
    """bench/tuning_merges.py on the smoke architecture: one row per method with its grid's candidates, and the
    search's merges now (one preparation per drop rate) cheaper than before (one whole merge per candidate)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "tuning_merges.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--preset", "smoke", "--tasks", "2", "--methods", "tsv,dare_ties"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    table = {row.split()[0]: [float(x) for x in row.split()[1:]] for row in rows}
    assert set(table) == {"tsv", "dare_ties"}
    assert table["tsv"][2] == 30 and table["dare_ties"][2] == 50
    for prepare, finish, candidates, before, now in table.values():
        # The columns are printed rounded (seconds to 0.01, the search's to 0.1): allow that, no more.
        assert before == pytest.approx(candidates * (prepare + finish), abs=candidates * 0.01 + 0.05)
        assert now <= before
