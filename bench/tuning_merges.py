#!/usr/bin/env python3
"""What a tuned merge's search spends on merging, with and without its scale-free part computed once.

A tuned twin (``tsv_tuned``, ``iso_cts_tuned``, ``dare_ties_tuned``, ...) merges at every value of its grid and
evaluates each candidate on the validation split. The methods of the form ``theta_0 + scale * update`` prepare
the update once per value of the other searched options (DARE's drop rate) and finish it at each scale
(``MergeMethod.prepare``); before, every candidate ran the whole merge. This times, on a preset's architecture
with random experts (no data, no evaluation: the evaluation is unchanged), one preparation and one finishing
step; the search's merging before is derived from them (every candidate prepared and finished), and now (one
preparation per value of the other searched options, every candidate finished).

    .venv/bin/python bench/tuning_merges.py --preset clip-vit-b-32 --methods tsv,iso_cts,dare_ties
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from surgery_lib.benchmark import synthetic_clip_zoo
from surgery_lib.core.errors import OneLineArgumentParser, positive_int, run_script
from surgery_lib.merging import MERGE_METHODS, MergeOptions, get_method
from surgery_lib.models import resolve_device


def prepared_methods(text: str) -> tuple[str, ...]:
    """The argparse ``type`` of ``--methods``: comma-separated names of merges prepared at a scale."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    prepared = [name for name, method in MERGE_METHODS.items() if method.prepare is not None]
    strays = [name for name in names if name not in prepared]
    if not names or strays:
        raise argparse.ArgumentTypeError(
            f"{', '.join(map(repr, strays)) or repr(text)} names no merge prepared at a scale (those are: "
            f"{', '.join(prepared)})"
        )
    return names


def time_search(zoo, name: str, device: torch.device) -> dict[str, float]:
    """Seconds of one preparation and of one finishing step of ``name``, and the counts of the search's grid."""
    method = get_method(name)
    grid = dict(method.search)
    scales = grid.pop("scale")
    others = math.prod(len(values) for values in grid.values())
    experts = dict(zoo.experts)
    started = time.perf_counter()
    at_scale = method.prepare(zoo, experts, MergeOptions(), device, False)
    prepare_s = time.perf_counter() - started
    started = time.perf_counter()
    at_scale(scales[0])
    finish_s = time.perf_counter() - started
    return {"prepare": prepare_s, "finish": finish_s, "scales": len(scales), "others": others}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="clip-vit-b-32", help="an architecture to draw random experts of")
    parser.add_argument(
        "--methods", type=prepared_methods, default=("tsv", "iso_c", "iso_cts", "dare_ties"), help="comma-separated"
    )
    parser.add_argument("--tasks", type=positive_int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    zoo = synthetic_clip_zoo(args.preset, {f"task{i}": 2 for i in range(args.tasks)})
    print(
        f"{args.preset}, {args.tasks} random experts, {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'method':<22}{'prepare s':>10}{'finish s':>10}{'candidates':>11}{'search before s':>16}{'now s':>8}")
    for name in args.methods:
        t = time_search(zoo, name, device)
        candidates = t["scales"] * t["others"]
        before = candidates * (t["prepare"] + t["finish"])
        now = t["others"] * t["prepare"] + candidates * t["finish"]
        print(f"{name:<22}{t['prepare']:10.2f}{t['finish']:10.2f}{candidates:11d}{before:16.1f}{now:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
