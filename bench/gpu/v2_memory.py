#!/usr/bin/env python3
"""Peak accelerator memory of SurgeryV2's training at a real tower's size (issue 26, item 3).

This library trains every task's modules in one pass (all tasks' batches stacked: 8 x 16 images through the
merged tower, every block's activations kept for the backward pass), where the official code runs one task's
batch at a time; the peak therefore grows with the number of tasks. For 1, 2, 4 and 8 tasks and each precision,
one short training run (random weights and images, the preset's SurgeryV2 rank, batch 16 per task) reports
``torch.cuda.max_memory_allocated`` over the training alone (the merged tower's weights included, the expert
targets computed beforehand), or that it ran out of memory; one JSON object per line. Where the stacked pass
did not fit and the library ran fewer tasks per pass, ``shrunk`` says so (the peak is then that of the smaller
passes).

    python3 bench/gpu/v2_memory.py --preset clip-vit-l-14 --device cuda
    python3 bench/gpu/v2_memory.py --preset clip-vit-b-32 --device cpu --tasks 1 --steps 2   # a dry run
    python3 bench/gpu/v2_memory.py --preset clip-vit-l-14 --saved-only   # what autograd keeps, on any machine
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time

import torch

from surgery_lib.benchmark import PAPER_TEST_SIZES, synthetic_clip_zoo
from surgery_lib.core.errors import OneLineArgumentParser, SurgeryBookError, run_script
from surgery_lib.merging import task_arithmetic
from surgery_lib.models import build_encoder, embed_blocks, load_encoder, resolve_device, resolve_precision
from surgery_lib.presets import get_preset
from surgery_lib.surgery.v1 import SurgeryConfig
from surgery_lib.surgery.v2 import DeepSurgery, train_deep_surgery


def probe(preset: str, tasks: int, precision: str, device: torch.device, steps: int, batch: int) -> dict:
    names = list(PAPER_TEST_SIZES)[:tasks]
    zoo = synthetic_clip_zoo(preset, dict.fromkeys(names, 2 * batch))
    # The precision really run: a CPU dry run computes in fp32 whatever was asked.
    row = {"preset": preset, "tasks": tasks, "precision": resolve_precision(precision, device), "batch per task": batch}
    row.update(rank=zoo.preset.surgery_rank(2), steps=steps)
    merged = load_encoder(zoo.preset.encoder, task_arithmetic(zoo.pretrained, zoo.experts, 0.3))
    targets = {}
    for task in names:
        expert = zoo.encoder(task)
        data = zoo.suite[task]
        targets[task] = embed_blocks(expert, data.images["test"], data.mean, data.std, device=device)
        del expert
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    config = SurgeryConfig(rank=row["rank"], steps=steps, batch_size=batch, eval_every=0)
    shrunk: list[str] = []  # a pass that ran out of memory is run with fewer tasks: say so beside the peak
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: shrunk.append(record.getMessage())
    logging.getLogger("surgery_lib.surgery.schedule").addHandler(handler)
    started = time.perf_counter()
    try:
        train_deep_surgery(
            merged,
            {t: zoo.suite[t] for t in names},
            targets,
            config,
            split="test",
            device=device,
            precision=precision,
            progress=False,
        )
    except torch.cuda.OutOfMemoryError as error:
        row["peak GiB"] = "out of memory: " + str(error).splitlines()[0]
    finally:
        logging.getLogger("surgery_lib.surgery.schedule").removeHandler(handler)
    if shrunk:
        row["shrunk"] = shrunk
    else:
        if cuda:
            torch.cuda.synchronize(device)
            row["peak GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        row["seconds per step"] = round((time.perf_counter() - started) / steps, 3)
    if cuda:
        row["card GiB"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        torch.cuda.empty_cache()
    return row


def saved_by_autograd(preset: str, images: int) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of SurgeryV2's forward on ``images`` random
    images (one task, fp32, on the CPU): the merged tower's frozen weights, which the input gradients need, and
    every block's activations. Each storage is counted once."""
    spec = get_preset(preset)
    encoder = build_encoder(spec.encoder).eval().requires_grad_(False)
    surgery = DeepSurgery.for_encoder(encoder, ("task",), spec.surgery_rank(2))
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    size = spec.encoder.image_size
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        surgery.forward_tasks(encoder, torch.randn(1, images, 3, size, size))
    return sum(storages.values())


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The options, every one checked before anything is built (a task count past the eight tasks would be
    measured with eight and labelled with the count asked for)."""
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="clip-vit-l-14")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tasks", default="1,2,4,8", help="task counts, comma-separated (1 to 8)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=4, help="training steps per task (default 4)")
    parser.add_argument("--batch", type=int, default=16, help="images per task and step (the official 16)")
    parser.add_argument(
        "--saved-only",
        action="store_true",
        help="no training: the MiB autograd keeps per image and for the weights (any machine, a CPU too)",
    )
    args = parser.parse_args(argv)
    get_preset(args.preset)
    most = len(PAPER_TEST_SIZES)
    counts = [t.strip() for t in args.tasks.split(",")]
    if not all(t.isdigit() and 1 <= int(t) <= most for t in counts):
        raise SurgeryBookError(
            f"--tasks {args.tasks!r} is not a list of task counts from 1 to {most}", "pass e.g. 1,2,4,8"
        )
    args.tasks = [int(t) for t in counts]
    args.precisions = [p.strip() for p in args.precisions.split(",")]
    for name, value in (("--steps", args.steps), ("--batch", args.batch)):
        if value < 1:
            raise SurgeryBookError(f"{name} {value} is below 1", f"pass a positive {name}")
    if not args.saved_only:  # which counts on the CPU, whatever --device says
        args.device = resolve_device(args.device)
        for precision in args.precisions:
            resolve_precision(precision, args.device)
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.saved_only:
        one, two = saved_by_autograd(args.preset, 1), saved_by_autograd(args.preset, 2)
        per_image = (two - one) / 2**20
        row = {"preset": args.preset, "saved per image (MiB)": round(per_image, 1)}
        row["saved for any batch (MiB)"] = round(one / 2**20 - per_image, 1)
        print(json.dumps(row))
        return
    for precision in args.precisions:
        for tasks in args.tasks:
            print(json.dumps(probe(args.preset, tasks, precision, args.device, args.steps, args.batch)), flush=True)


if __name__ == "__main__":
    sys.exit(run_script(main))
