#!/usr/bin/env python3
"""Would the zoo build faster as two one-thread processes than as one two-thread process? (issue 22)

Times the mini preset's pretraining step (batch 128, AdamW) three ways in one run, alternating so that the
machine's drift between minutes hits all of them: one process with two threads (what the zoo does), and two
one-thread processes that each take half of the batch and average their gradients with one all-reduce (gloo,
over a file store) before the same AdamW step. The second gives the same mathematics in another summation order,
so adopting it would change the zoo's last bits and with them every number in the book; this script only measures.

    .venv/bin/python bench/data_parallel_probe.py --steps 150 --rounds 2
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from train_step import pretraining_setup  # bench/ is the script's folder, first on sys.path

from surgery_lib.core.errors import OneLineArgumentParser, positive_int, run_script
from surgery_lib.presets import get_preset


def one_process(preset: str, batch: int, steps: int, threads: int) -> float:
    """Steps/s of one process with ``threads`` threads."""
    torch.set_num_threads(threads)
    encoder, head, _, optimizer, images, labels = pretraining_setup(preset, batch)
    for step in range(steps + 5):  # five warm-up steps
        if step == 5:
            started = time.perf_counter()
        loss = F.cross_entropy(head(encoder(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps / (time.perf_counter() - started)


def _worker(rank: int, world: int, store: str, preset: str, batch: int, steps: int, result) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    encoder, head, parameters, optimizer, images, labels = pretraining_setup(preset, batch // world)
    for step in range(steps + 5):
        if step == 5:
            dist.barrier()
            started = time.perf_counter()
        loss = F.cross_entropy(head(encoder(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        torch.nn.utils.vector_to_parameters(flat, grads)  # copies the averaged gradient back, tensor by tensor
        optimizer.step()
    dist.barrier()
    if rank == 0:
        result.value = steps / (time.perf_counter() - started)
    dist.destroy_process_group()


def data_parallel(preset: str, batch: int, steps: int, world: int = 2) -> float:
    """Steps/s (of the whole batch) of ``world`` one-thread processes, each on ``batch / world`` images."""
    result = mp.get_context("spawn").Value("d", 0.0)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(world, os.path.join(folder, "store"), preset, batch, steps, result), nprocs=world)
    return result.value


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--steps", type=positive_int, default=150)
    parser.add_argument("--rounds", type=positive_int, default=2, help="alternations of the measurements")
    args = parser.parse_args(argv)
    batch = get_preset(args.preset).recipe.batch_size
    print(f"{args.preset}: pretraining steps of batch {batch}; steps/s")
    print("round  one process, 2 threads  two processes, 1 thread each  ratio")
    for round_index in range(args.rounds):
        single = one_process(args.preset, batch, args.steps, threads=2)
        split = data_parallel(args.preset, batch, args.steps)
        print(f"{round_index + 1:5d}  {single:22.2f}  {split:29.2f}  {split / single:5.2f}")


if __name__ == "__main__":
    sys.exit(run_script(main))
