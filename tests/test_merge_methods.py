"""Every registered merging method through the same checks (the contract), DARE against a hand-computed
example, and the merge cache keyed by the options each method reads."""

from __future__ import annotations

import dataclasses
import pickle
import re

import numpy as np
import pytest
import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.merging import (
    MERGE_METHODS,
    MERGE_OPTIONS,
    MergeMethod,
    MergeOptions,
    Option,
    cached_merge,
    merge,
    merge_cache_path,
    register_method,
    register_option,
    task_arithmetic,
)
from surgery_lib.merging.base import DATA_KINDS
from surgery_lib.merging.dare import dare_vectors, drop_and_rescale
from surgery_lib.merging.options import SCALE

#: Small but complete runs: every AdaMerging and data-based method still takes real steps.
FAST = MergeOptions(steps=2, batch_size=4, samples=16)


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_every_registered_method_keeps_the_contract(method, smoke_zoo, tmp_path):
    """A registered method merges something finite of the pretrained shapes, deterministically, and reads only the
    options it declares: the merge cache keys its entry by those, so every other option must not change what it
    computes. The second computation (the cache's) has every undeclared option changed; it must equal the first
    bit for bit and land in the same entry, which a third call reads back."""
    spec = MERGE_METHODS[method]
    result = merge(smoke_zoo, method, FAST, device="cpu", progress=False)
    assert result.method == method and result.seconds >= 0
    assert {k: v.shape for k, v in result.state.items()} == {k: v.shape for k, v in smoke_zoo.pretrained.items()}
    assert all(torch.isfinite(v).all() for v in result.state.values() if v.is_floating_point())
    assert any(not torch.equal(result.state[k], v) for k, v in smoke_zoo.pretrained.items())  # it merged something
    others = {o.name: _another_value(o, getattr(FAST, o.name)) for o in MERGE_OPTIONS.values() if o not in spec.options}
    assert set(others) | set(spec.reads) == set(MERGE_OPTIONS)
    zoo = dataclasses.replace(smoke_zoo, directory=tmp_path)  # a private merge cache
    stored = cached_merge(zoo, method, FAST.replace(**others), device="cpu", progress=False)
    if not _same_state(stored.state, result.state):  # which of the two: only a failure pays for a third merge
        again = merge(smoke_zoo, method, FAST, device="cpu", progress=False)
        pytest.fail(
            f"{method} reads an undeclared option"
            if _same_state(again.state, result.state)
            else f"{method} is not deterministic"
        )
    assert merge_cache_path(zoo, method, FAST, zoo.tasks).is_file()
    loaded = cached_merge(zoo, method, FAST, device="cpu", progress=False)
    assert _same_state(loaded.state, stored.state)
    assert loaded.seconds == stored.seconds  # read back, not recomputed
    assert MERGE_METHODS[method].data in DATA_KINDS and MERGE_METHODS[method].label


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], v) for k, v in b.items())


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


def test_the_cache_key_covers_threads_data_and_code(smoke_zoo, monkeypatch):
    """A merge cached by a run with another thread count, other images or other merging code is computed afresh."""
    from surgery_lib.merging import api

    path = merge_cache_path(smoke_zoo, "ties", MergeOptions(), smoke_zoo.tasks)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert merge_cache_path(smoke_zoo, "ties", MergeOptions(), smoke_zoo.tasks) != path
    finally:
        torch.set_num_threads(threads)
    other_images = dataclasses.replace(smoke_zoo, data_fingerprint="other images")
    assert merge_cache_path(other_images, "ties", MergeOptions(), smoke_zoo.tasks) != path
    monkeypatch.setattr(api, "_merging_code", lambda: "edited/torch 9")
    assert merge_cache_path(smoke_zoo, "ties", MergeOptions(), smoke_zoo.tasks) != path
    monkeypatch.undo()
    assert merge_cache_path(smoke_zoo, "ties", MergeOptions(), smoke_zoo.tasks) == path
    assert api._merging_code().endswith(f"torch {torch.__version__}")


def _another_value(option: Option, value):
    """A valid value of ``option`` other than ``value``."""
    if option.choices:
        return next(choice for choice in option.choices if choice != value)
    if option.kind is int:
        return 2 if value is None else (value + 1 if option.high is None or value + 1 <= option.high else value - 1)
    return 0.7 if value is None else value / 2


def test_merge_options_check_their_values_by_the_declaration():
    assert MergeOptions() == MergeOptions(seed=0) and hash(MergeOptions()) == hash(MergeOptions(seed=0))
    assert MergeOptions(scale=0.5).replace(seed=2) == MergeOptions(seed=2, scale=0.5)
    assert pickle.loads(pickle.dumps(MergeOptions(drop_rate=0.25))).drop_rate == 0.25
    assert MergeOptions(steps=3.0).steps == 3 and isinstance(MergeOptions(steps=3.0).steps, int)
    for bad, message in (
        ({"keep_fraction": 1.5}, r"--keep-fraction 1.5 is outside \(0, 1\]"),
        ({"drop_rate": 1}, r"--drop-rate 1.0 is outside \[0, 1\)"),
        ({"steps": 2.5}, "--steps 2.5 is not a whole number"),
        ({"steps": float("nan")}, "--steps nan is not a whole number"),  # a ValueError from int() before
        ({"steps": float("inf")}, "--steps inf is not a whole number"),  # an OverflowError before
        ({"scale": float("nan")}, "--scale nan is not a finite number"),
        ({"split": "train"}, "--data 'train' is not one of: test, adapt"),
        ({"seed": None}, "--seed cannot be None"),
        ({"sclae": 0.3}, "unknown merge option 'sclae'.*scale"),
    ):
        with pytest.raises(SurgeryBookError, match=message):
            MergeOptions(**bad)
    with pytest.raises(AttributeError, match="immutable"):
        MergeOptions().scale = 0.5
    numpy_numbers = MergeOptions(seed=np.int64(3), scale=np.float32(0.5))  # was "--seed 3 is not a number"
    assert numpy_numbers == MergeOptions(seed=3, scale=0.5)
    assert type(MergeOptions(seed=np.int64(3)).seed) is int


def test_merge_options_given_as_a_dict_are_refused_with_the_call_that_builds_them(smoke_zoo):
    """``options={"keep_fraction": 0.2}`` failed with an AttributeError inside the merge."""
    for run in (merge, cached_merge):
        with pytest.raises(SurgeryBookError, match=re.escape("pass options=MergeOptions(**{'keep_fraction': 0.2})")):
            run(smoke_zoo, "ties", {"keep_fraction": 0.2}, progress=False)
    with pytest.raises(
        SurgeryBookError,
        match=r"options 0.2 is a float, not a MergeOptions. Fix: pass options=MergeOptions\(scale=0.3\)",
    ):
        merge(smoke_zoo, "task_arithmetic", 0.2, progress=False)


def test_a_new_option_is_one_declaration_and_the_cli_offers_it(monkeypatch):
    """What a contributor adds: one Option in the method's module. The flag, its check, --help and the
    cache key follow from the registry."""
    from surgery_lib.cli import _merge_options, build_parser

    sharpness = Option("sharpness", float, 1.0, "test: how sharp", low=0)
    method = MergeMethod("sharp_average", "sharp average", lambda *a: ({}, {}), options=(SCALE, sharpness))
    monkeypatch.setitem(MERGE_OPTIONS, "sharpness", sharpness)
    monkeypatch.setitem(MERGE_METHODS, "sharp_average", method)
    parser = build_parser()
    args = parser.parse_args(["merge", "--method", "sharp_average", "--sharpness", "2", "--scale", "0.4"])
    options = _merge_options(args, "sharp_average")
    assert options.sharpness == 2.0 and method.key_options(options) == {"scale": 0.4, "sharpness": 2.0}
    merge_help = next(
        a for a in parser._subparsers._group_actions[0].choices["merge"]._actions if a.dest == "sharpness"
    )
    assert "how sharp" in merge_help.help and "Read by: sharp_average" in merge_help.help
    with pytest.raises(SurgeryBookError, match=r"--sharpness -1.0 is outside \[0, inf\]"):
        _merge_options(parser.parse_args(["merge", "--method", "sharp_average", "--sharpness", "-1"]), "sharp_average")
    with pytest.raises(SurgeryBookError, match="ties does not read --sharpness"):
        _merge_options(parser.parse_args(["merge", "--method", "ties", "--sharpness", "2"]), "ties")


def test_every_declared_option_is_a_flag_of_every_merging_command():
    from surgery_lib.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for command in ("merge", "table", "surgery"):
        flags = {flag for action in commands[command]._actions for flag in action.option_strings}
        for method in MERGE_METHODS.values():
            assert {option.cli_flag for option in method.options} <= flags, (command, method.name)


def test_an_option_is_declared_once():
    with pytest.raises(SurgeryBookError, match="declared twice"):
        register_option(Option("scale", float, 0.3, "another scale"))
    with pytest.raises(SurgeryBookError, match="share --data"):
        register_option(Option("data", str, "x", "a clash", choices=("x",)))
    assert all(MERGE_OPTIONS[o.name] is o for method in MERGE_METHODS.values() for o in method.options)


def test_a_method_must_declare_real_options_and_a_fresh_name():
    with pytest.raises(SurgeryBookError, match="not Option declarations"):
        MergeMethod("bad", "bad", lambda *a: ({}, {}), options=("sclae",))
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
