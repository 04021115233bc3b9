"""Speed benchmark: the official training loop against this library's, for Surgery and SurgeryV2.

Both run in one process on the same model and data. The official-style loop follows the released
code's structure with its one avoidable cost removed (the merge is done once, not in every forward):
every iteration visits every task, takes ``batches`` batches of ``batch_size`` images, forwards the
merged encoder and the task's expert on them, and takes one optimiser step per batch. This library
instead caches expert targets (and, for V1, merged embeddings) once, then trains all tasks together.

On CPU the benchmark uses the mini preset's zoo and test images; on a GPU it uses the ViT-B/32
architecture with random weights and random 224x224 images at the paper's eight test-set sizes.

:func:`pipeline_benchmark` times the whole method end to end (merge, layer-wise AdaMerging, Surgery,
SurgeryV2) with peak accelerator memory and feature-extraction throughput, on any zoo, including
:func:`synthetic_clip_zoo` (the real architecture with random weights at the paper's test-set sizes).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.taskdata import Suite, TaskData
from surgery_lib.merging import MergeOptions, merge
from surgery_lib.models import (
    ClassificationHead,
    autocast,
    build_encoder,
    clone_state,
    embed,  # noqa: F401  (0.1 re-exported it here)
    embed_blocks,
    forward_blocks,
    load_encoder,
    resolve_device,
    task_features,
)
from surgery_lib.presets import Preset, encoder_parameters, get_preset
from surgery_lib.settings.base import Zoo
from surgery_lib.settings.clip.config import clip_config
from surgery_lib.settings.clip.tasks import CLIP_TASKS
from surgery_lib.surgery import run_surgery
from surgery_lib.surgery.v1 import DEFAULT_RANK, SurgeryConfig, TaskSurgery, train_surgery
from surgery_lib.surgery.v2 import DeepSurgery, train_deep_surgery

#: Test-set sizes of the paper's 8 datasets (SUN397 ... DTD): 87,190 images.
PAPER_TEST_SIZES = {name: task.test_size for name, task in CLIP_TASKS.items()}


def peak_memory(device: torch.device | str = "cpu") -> dict[str, float | None]:
    """Peak memory of this process so far: ``{"rss_mib": resident set size in MiB (None where the OS
    does not report it), "gpu_gib": torch's peak allocation on ``device`` in GiB (None off CUDA)}``.

    The resident peak covers the whole process (data, zoo and the method together), so it bounds what
    one command needs; comparing two runs that differ in one thing (say, the number of tasks) isolates it.
    """
    try:
        import resource
    except ImportError:  # Windows
        rss_mib = None
    else:
        # ru_maxrss is in KiB on Linux, in bytes on macOS.
        scale = 2**20 if sys.platform == "darwin" else 2**10
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    device = torch.device(device)
    gpu_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"rss_mib": rss_mib, "gpu_gib": gpu_gib}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class BenchResult:
    """Wall times in seconds of the official-style loop and of this library for one surgery version."""

    version: int
    official_s: float
    ours_s: float
    ours_features_s: float
    steps_per_task: int
    adam: str = "shared"
    #: The modules' rank (SurgeryV2 on ViT-L/14: the papers' 4).
    rank: int = DEFAULT_RANK
    #: Images the library's feature pass encoded (V1: every test image through the merged model and its expert;
    #: V2: through the expert, every block's token means kept).
    images_encoded: int = 0
    #: Peak accelerator memory of each path in GiB (``torch.cuda.max_memory_allocated``; None off CUDA).
    official_peak_gib: float | None = None
    ours_peak_gib: float | None = None

    @property
    def speedup(self) -> float:
        return self.official_s / self.ours_s

    @property
    def images_per_s(self) -> float:
        """Throughput of the library's feature pass (images/s): the floor of Surgery end to end."""
        return self.images_encoded / self.ours_features_s

    @property
    def of_floor(self) -> float:
        """The library's whole run (features and training) in multiples of its feature pass."""
        return self.ours_s / self.ours_features_s


def official_style(
    version: int,
    merged: nn.Module,
    experts: Mapping[str, nn.Module],
    data: Mapping[str, TaskData],
    config: SurgeryConfig,
    batches: int,
    device: torch.device,
    precision: str = "fp32",
) -> float:
    """The released code's loop (merge done once), with ``zero_grad()`` as ``config.adam`` says: returns its
    wall time in seconds."""
    tasks = tuple(data)
    if version == 1:
        modules: nn.Module = TaskSurgery(tasks, merged.output_dim, config.rank, config.seed).to(device)
    else:
        modules = DeepSurgery.for_encoder(merged, tasks, config.rank, config.seed).to(device)
    optimizer = torch.optim.Adam(modules.parameters(), lr=config.lr)
    sizes = [len(data[t].labels["test"]) for t in tasks]
    schedule = dataclasses.replace(config, batches_per_iteration=batches)
    _sync(device)
    started = time.perf_counter()
    for iteration in schedule.iterations(sizes):
        for i, task in enumerate(tasks):
            for index in iteration.batches[i]:
                images = data[task].normalized("test", index).to(device)
                with torch.no_grad(), autocast(device, precision):
                    if version == 1:
                        z = merged(images).float()
                        target = experts[task](images).float()
                    else:
                        target, target_means = forward_blocks(experts[task], images)
                with autocast(device, precision):
                    if version == 1:
                        loss = (modules.apply_task(task, z) - target).abs().mean()
                    else:
                        rows = torch.tensor([i], device=device)
                        final, means = modules.forward_tasks(merged, images[None], rows)
                        loss = (means[0].float() - target_means.float()).abs().mean(dim=(0, 2)).sum()
                        loss = loss + (final[0] - target.float()).abs().mean()
                optimizer.zero_grad(set_to_none=config.adam != "shared")
                loss.backward()
                optimizer.step()
    _sync(device)
    return time.perf_counter() - started


def ours(
    version: int,
    merged: nn.Module,
    experts: Mapping[str, nn.Module],
    data: Mapping[str, TaskData],
    config: SurgeryConfig,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[float, float]:
    """This library's path, feature extraction included: returns (total seconds, feature seconds)."""
    _sync(device)
    started = time.perf_counter()
    tasks = tuple(data)
    if version == 1:
        z = {t: task_features(merged, data[t], device=device, precision=precision)[0] for t in tasks}
        target = {t: task_features(experts[t], data[t], device=device, precision=precision)[0] for t in tasks}
        _sync(device)
        features = time.perf_counter() - started
        train_surgery(z, target, config, device=device, progress=False)
    else:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        targets = {
            t: embed_blocks(
                experts[t],
                data[t].images["test"],
                data[t].mean,
                data[t].std,
                device=device,
                dtype=dtype,
                precision=precision,
            )
            for t in tasks
        }
        _sync(device)
        features = time.perf_counter() - started
        train_deep_surgery(
            merged, data, targets, config, split="test", device=device, precision=precision, progress=False
        )
    _sync(device)
    return time.perf_counter() - started, features


def run_benchmark(
    merged: nn.Module,
    experts: Mapping[str, nn.Module],
    data: Mapping[str, TaskData],
    *,
    versions: tuple[int, ...] = (1, 2),
    iterations: int = 500,
    batches: int = 2,
    batch_size: int = 16,
    adams: tuple[str, ...] = ("shared",),
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    ranks: Mapping[int, int] | None = None,
) -> list[BenchResult]:
    """Time both paths for each surgery version and optimiser semantics on the official schedule
    (``iterations`` x ``batches`` steps per task), with each path's peak accelerator memory.

    Args:
        ranks: surgery version -> the modules' rank (default 16 for both; the papers ran SurgeryV2 on ViT-L/14
            at 4: ``{2: preset.surgery_rank(2)}``).
    """
    device = torch.device(device)
    merged = merged.to(device).eval().requires_grad_(False)
    experts = {t: e.to(device).eval().requires_grad_(False) for t, e in experts.items()}
    test_images = sum(len(d.labels["test"]) for d in data.values())
    results = []
    for adam in adams:
        for version in versions:
            config = SurgeryConfig(
                rank=(ranks or {}).get(version, DEFAULT_RANK),
                steps=iterations * batches,
                batch_size=batch_size,
                eval_every=0,
                adam=adam,
                batches_per_iteration=batches,
            )
            _reset_peak(device)
            official_s = official_style(version, merged, experts, data, config, batches, device, precision)
            official_peak = peak_memory(device)["gpu_gib"]
            _reset_peak(device)
            ours_s, features_s = ours(version, merged, experts, data, config, device, precision)
            results.append(
                BenchResult(
                    version,
                    official_s,
                    ours_s,
                    features_s,
                    config.steps,
                    adam,
                    config.rank,
                    test_images * (2 if version == 1 else 1),
                    official_peak,
                    peak_memory(device)["gpu_gib"],
                )
            )
    return results


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class PipelineStage:
    """One stage of the end-to-end benchmark: wall time, peak accelerator memory, and throughput."""

    stage: str
    seconds: float
    peak_memory_gb: float | None
    images_per_s: float | None = None


def _check_synthetic_fits(spec: Preset, sizes: Mapping[str, int]) -> None:
    """Refuse, before allocating, a synthetic zoo whose images (uint8) and weights (fp32: the pretrained tower,
    one expert per task and the temporary of the expert being drawn) exceed this machine's free memory."""
    import psutil

    size = spec.encoder.image_size
    images = sum(sizes.values()) * 3 * size * size
    expert = encoder_parameters(spec.encoder) * 4
    weights = (len(sizes) + 2) * expert
    free = psutil.virtual_memory().available
    if images + weights > free:
        fewer = (  # the larger of the two is what a smaller request must cut
            "ask for fewer images (`surgery-book bench --scale`: 1 is the paper's 87,190 test images, 13 GB at 224x224)"
            if images >= weights
            else f"ask for fewer tasks (each {spec.name} expert holds {expert / 2**30:.2f} GiB)"
        )
        raise SurgeryBookError(
            f"{sum(sizes.values()):,} random {size}x{size} test images and {len(sizes)} {spec.name} experts need "
            f"{(images + weights) / 2**30:,.1f} GiB, this machine has {free / 2**30:.1f} GiB free",
            f"{fewer}, or use a machine with more memory",
        )


def synthetic_clip_zoo(
    preset: str = "clip-vit-b-32", sizes: Mapping[str, int] = PAPER_TEST_SIZES, seed: int = 0, adapt_images: int = 256
) -> Zoo:
    """A :class:`~surgery_lib.settings.base.Zoo` of the real architecture with random weights and random images.

    Experts are the pretrained weights plus independent noise of 1 % of each tensor's spread (task
    vectors of a realistic relative size); heads are random unit rows x 100 with each task's class count;
    test sets are random 224x224 uint8 images of ``sizes`` (the paper's: 87,190 images, 13 GB).
    """
    spec = get_preset(preset)
    _check_synthetic_fits(spec, sizes)
    torch.manual_seed(seed)
    pretrained = clone_state(build_encoder(spec.encoder))
    generator = torch.Generator().manual_seed(seed)
    experts, heads, tasks = {}, {}, {}
    for task, n in sizes.items():
        experts[task] = {
            k: v + 0.01 * v.float().std().nan_to_num() * torch.randn(v.shape, generator=generator)
            for k, v in pretrained.items()
        }
        classes = CLIP_TASKS[task].num_classes if task in CLIP_TASKS else 10
        heads[task] = ClassificationHead.from_weights(
            F.normalize(torch.randn(classes, spec.encoder.output_dim, generator=generator), dim=-1) * 100
        )
        size = spec.encoder.image_size
        test = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
        adapt = test[: min(adapt_images, n)]
        labels = torch.randint(0, classes, (n,), generator=generator)
        tasks[task] = TaskData(
            task,
            tuple(str(c) for c in range(classes)),
            {"test": test, "train": adapt, "adapt": adapt},
            {"test": labels, "train": labels[: len(adapt)], "adapt": labels[: len(adapt)]},
            spec.encoder.mean,
            spec.encoder.std,
        )
    manifest = {
        "accuracy": {"pretrained": dict.fromkeys(sizes, 0.0), "expert": dict.fromkeys(sizes, 0.0)},
        "synthetic": True,
    }
    zeros = clip_config(spec).ties_text_entries if spec.setting == "clip" else 0  # TIES trims as on the checkpoints
    return Zoo(
        spec,
        Path("synthetic"),
        manifest,
        pretrained,
        heads,
        experts,
        None,
        Suite(None, tasks, None),
        ties_zero_entries=zeros,
        published=spec.setting == "clip",  # merges take the hyper-parameters of the published checkpoints
    )


def pipeline_benchmark(
    zoo: Zoo,
    *,
    device: torch.device | str = "cuda",
    adamerging_steps: int | None = None,
    surgery_steps: int = 1000,
    progress: bool = True,
) -> list[PipelineStage]:
    """Time merge -> layer-wise AdaMerging -> Surgery -> SurgeryV2 end to end on ``zoo`` (all 8 tasks).

    Each stage runs the library's own code (:func:`~surgery_lib.merging.api.merge`,
    :func:`~surgery_lib.surgery.run.run_surgery`) with the official schedules unless overridden; Surgery
    and SurgeryV2 start from the AdaMerging merge, as in the paper. Also measures feature extraction
    (images/s of the merged encoder over every test image). Peak memory is the accelerator's
    (``torch.cuda.max_memory_allocated``), None on a CPU.
    """
    device = resolve_device(device, "cuda")
    cuda = device.type == "cuda"
    stages: list[PipelineStage] = []

    def timed(name: str, work, images: int | None = None):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        result = work()
        _sync(device)
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        stages.append(PipelineStage(name, seconds, peak, images / seconds if images else None))
        return result

    total = sum(len(zoo.suite[t].labels["test"]) for t in zoo.tasks)
    merged = timed("task arithmetic merge", lambda: merge(zoo, "task_arithmetic", device=device, progress=False))
    encoder = load_encoder(zoo.preset.encoder, merged.state)
    timed(
        "feature extraction (every test image)",
        lambda: [zoo.features(encoder, t, device=device) for t in zoo.tasks],
        images=total,
    )
    options = MergeOptions(steps=adamerging_steps)
    ada = timed(
        "layer-wise AdaMerging", lambda: merge(zoo, "adamerging_layer", options, device=device, progress=progress)
    )
    config = SurgeryConfig(steps=surgery_steps, eval_every=0)
    deep = dataclasses.replace(config, rank=zoo.preset.surgery_rank(2))
    timed(
        "Surgery (V1, features and evaluation included)",
        lambda: run_surgery(zoo, ada.state, version=1, config=config, device=device, progress=progress),
    )
    timed(
        "SurgeryV2 (targets and evaluation included)",
        lambda: run_surgery(zoo, ada.state, version=2, config=deep, device=device, progress=progress),
    )
    pipeline = [s for s in stages if not s.stage.startswith("feature extraction")]
    peak = max((s.peak_memory_gb or 0.0) for s in pipeline) if cuda else None
    stages.append(
        PipelineStage("end to end (merge, AdaMerging, Surgery, SurgeryV2)", sum(s.seconds for s in pipeline), peak)
    )
    return stages
