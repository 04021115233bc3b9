#!/usr/bin/env python3
"""Peak accelerator memory of SurgeryV2's training at a real tower's size (issue 26, item 3).

This library trains every task's modules in one pass (all tasks' batches stacked: 8 x 16 images through the
merged tower, every block's activations kept for the backward pass), where the official code runs one task's
batch at a time; the peak therefore grows with the number of tasks. For 1, 2, 4 and 8 tasks and each precision,
one short training run (random weights and images, the preset's SurgeryV2 rank, batch 16 per task) reports
``torch.cuda.max_memory_allocated`` over the training alone (the merged tower's weights included, the expert
targets computed beforehand), or that it ran out of memory; one JSON object per line.

    python3 bench/gpu/v2_memory.py --preset clip-vit-l-14 --device cuda
    python3 bench/gpu/v2_memory.py --preset clip-vit-b-32 --device cpu --tasks 1 --steps 2   # a dry run
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from surgery_lib.benchmark import PAPER_TEST_SIZES, synthetic_clip_zoo
from surgery_lib.merging import task_arithmetic
from surgery_lib.models import embed_blocks, load_encoder
from surgery_lib.surgery.v1 import SurgeryConfig
from surgery_lib.surgery.v2 import train_deep_surgery


def probe(preset: str, tasks: int, precision: str, device: torch.device, steps: int, batch: int) -> dict:
    names = list(PAPER_TEST_SIZES)[:tasks]
    zoo = synthetic_clip_zoo(preset, dict.fromkeys(names, 2 * batch))
    row = {"preset": preset, "tasks": tasks, "precision": precision, "batch per task": batch}
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
    else:
        if cuda:
            torch.cuda.synchronize(device)
            row["peak GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        row["seconds per step"] = round((time.perf_counter() - started) / steps, 3)
    if cuda:
        row["card GiB"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="clip-vit-l-14")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tasks", default="1,2,4,8", help="task counts, comma-separated")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=4, help="training steps per task (default 4)")
    parser.add_argument("--batch", type=int, default=16, help="images per task and step (the official 16)")
    args = parser.parse_args()
    device = torch.device(args.device)
    for precision in args.precisions.split(","):
        for tasks in (int(t) for t in args.tasks.split(",")):
            print(json.dumps(probe(args.preset, tasks, precision, device, args.steps, args.batch)), flush=True)


if __name__ == "__main__":
    main()
