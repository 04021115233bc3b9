#!/usr/bin/env python3
"""How far the zoo's training step is from the machine's floor (the question behind the zoo's build time).

Counts the FLOPs of one pretraining step of a preset's encoder (forward, backward and AdamW, batch of
``recipe.batch_size`` images) with ``torch.utils.flop_counter``, measures the step's wall time at the
thread counts given, and measures the machine's attainable matrix-multiply rate (a large fp32 GEMM) at
the same thread counts. The floor of a step is its FLOPs at that rate; the ratio says how much a faster
loop could gain at best.

    .venv/bin/python bench/train_step.py --preset mini --threads 1,2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from surgery_lib.core.errors import OneLineArgumentParser, number_list, run_script
from surgery_lib.models import build_encoder
from surgery_lib.presets import get_preset


def gemm_rate(seconds: float = 2.0, size: int = 1024) -> float:
    """Attainable fp32 FLOP/s of this process's torch threads: a square GEMM repeated for ``seconds``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - started)


PRETRAINING_CLASSES = 66  # the pretraining mix's classes


def pretraining_setup(preset_name: str, batch: int):
    """A preset's encoder with the pretraining head, its AdamW and one random batch of ``batch`` images (seeded):
    ``(encoder, head, parameters, optimizer, images, labels)``, images ``(batch, 3, size, size)``."""
    preset = get_preset(preset_name)
    torch.manual_seed(0)
    encoder = build_encoder(preset.encoder).train()
    head = torch.nn.Linear(preset.encoder.output_dim, PRETRAINING_CLASSES)
    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=preset.recipe.pretrain_lr)
    size = preset.encoder.image_size
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, PRETRAINING_CLASSES, (batch,))
    return encoder, head, parameters, optimizer, images, labels


def measure(preset_name: str, steps: int) -> dict[str, float]:
    batch = get_preset(preset_name).recipe.batch_size
    encoder, head, _, optimizer, images, labels = pretraining_setup(preset_name, batch)

    def step() -> None:
        loss = F.cross_entropy(head(encoder(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(5):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - started) / steps
    return {"flops": float(counter.get_total_flops()), "seconds": seconds, "gemm": gemm_rate()}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument(
        "--threads", type=number_list(int, 1), default=(1, 2), help="comma-separated torch thread counts"
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.child)
        result = measure(args.preset, args.steps)
        print(f"{result['flops']} {result['seconds']} {result['gemm']}")
        return 0
    preset = get_preset(args.preset)
    print(
        f"{args.preset}: batch {preset.recipe.batch_size}, torch {torch.__version__}, CPU kernels {torch.backends.cpu.get_cpu_capability()}"
    )
    print(
        f"{'threads':>7}  {'GFLOP/step':>10}  {'steps/s':>7}  {'images/s':>8}  {'GFLOP/s':>7}  {'GEMM GFLOP/s':>12}  {'floor steps/s':>13}  {'of floor':>8}"
    )
    for threads in args.threads:
        out = subprocess.run(
            [sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps), "--child", str(threads)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        flops, seconds, gemm = map(float, out)
        rate = flops / seconds
        print(
            f"{threads:>7}  {flops / 1e9:10.2f}  {1 / seconds:7.2f}  {preset.recipe.batch_size / seconds:8.0f}  {rate / 1e9:7.1f}"
            f"  {gemm / 1e9:12.1f}  {gemm / flops:13.2f}  {100 * rate / gemm:7.0f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
