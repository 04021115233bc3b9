"""A miniature of the real setting, fabricated in the published formats: task_vectors' dataset folders and
checkpoint files, FusionBench's transformers snapshots, and a tiny CLIP preset that reads them."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from surgery_lib.presets import EncoderConfig, Preset
from surgery_lib.settings.clip.config import ClipConfig
from surgery_lib.settings.clip.tasks import (
    CLIP_TASK_NAMES,
    EUROSAT_FOLDERS,
    OPENAI_MEAN,
    OPENAI_STD,
    text_leftover_entries,
)

#: Classes of each fabricated dataset (tasks with fixed class names keep their full count).
CLASSES = {"SUN397": 3, "Cars": 2, "RESISC45": 3, "EuroSAT": 10, "SVHN": 10, "GTSRB": 43, "MNIST": 10, "DTD": 3}
#: Test images per fabricated dataset.
TEST_SIZES = {"SUN397": 6, "Cars": 2, "RESISC45": 6, "EuroSAT": 10, "SVHN": 5, "GTSRB": 4, "MNIST": 6, "DTD": 6}

#: Not registered globally (tests that look it up by name register it for their own duration).
TINY_CLIP = Preset(
    name="clip-tiny-test",
    description="tests only: a 2-block width-128 CLIP image tower on fabricated data",
    encoder=EncoderConfig(
        image_size=32,
        patch_size=8,
        width=128,
        layers=2,
        heads=2,
        output_dim=64,
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        activation="quick_gelu",
    ),
    suite=None,
    recipe=None,
    # The fabricated checkpoints keep text leftovers of width 16 projecting to 64 (vocabulary 12, context 5).
    setting_config=ClipConfig(
        model="ViT-B-32",
        hub_model="openai/clip-vit-base-patch32",
        ties_text_entries=text_leftover_entries(16, 64, vocabulary=12, context=5),
        tasks=CLIP_TASK_NAMES,
    ).section(),
    setting="clip",
    adamerging_steps=2,
    adamerging_batch_size=4,
)


def _image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (40, 48), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (*size, 3) if mode == "RGB" else size
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


def _idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX format: magic 0x0800 | ndim, big-endian dims, then the uint8 bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fabricate_datasets(root: Path) -> Path:
    """task_vectors' folder layout for all eight tasks, a handful of random images each."""
    import scipy.io

    rng = np.random.default_rng(0)
    for folder, names in (("sun397", ["abbey", "airplane_cabin", "bakery"]), ("dtd", ["banded", "blotchy", "braided"])):
        for split in ("train", "val", "test"):
            for name in names:
                for i in range(2):
                    _image(root / folder / split / name / f"{i}.jpg", rng)
    for split in ("train", "test"):
        for name in EUROSAT_FOLDERS:
            _image(root / "EuroSAT_splits" / split / name / f"{name}_1.jpg", rng, (64, 64))
    resisc = root / "resisc45"
    for split, numbers in (("train", (1, 2, 3)), ("test", (4, 5))):
        lines = []
        for name in ("airplane", "baseball_diamond", "beach"):
            for n in numbers:
                _image(resisc / "NWPU-RESISC45" / name / f"{name}_{n:03d}.jpg", rng, (56, 56))
                lines.append(f"{name}_{n:03d}.jpg")
        (resisc / f"resisc45-{split}.txt").write_text("\n".join(lines) + "\n")
    cars = root / "stanford_cars"
    (cars / "devkit").mkdir(parents=True)
    scipy.io.savemat(
        cars / "devkit" / "cars_meta.mat",
        {"class_names": np.array([["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]], dtype=object)},
    )
    for split, folder, listing in (
        ("train", "cars_train", cars / "devkit" / "cars_train_annos.mat"),
        ("test", "cars_test", cars / "cars_test_annos_withlabels.mat"),
    ):
        records = np.zeros((1, 2), dtype=[("fname", "O"), ("class", "O")])
        for i in range(2):
            _image(cars / folder / f"{split}{i:05d}.jpg", rng, (30, 60))
            records[0, i] = (f"{split}{i:05d}.jpg", i + 1)  # 1-based, as the devkit stores it
        scipy.io.savemat(listing, {"annotations": records})
    gtsrb = root / "gtsrb"
    for label in (0, 1, 42):
        _image(gtsrb / "GTSRB" / "Training" / f"{label:05d}" / f"{label:05d}_00000.ppm", rng, (34, 36))
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, label in enumerate((3, 14, 42, 0)):
        _image(gtsrb / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", rng, (31, 33))
        rows.append(f"{i:05d}.ppm;31;33;5;5;26;28;{label}")
    (gtsrb / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    for prefix, count in (("train", 8), ("t10k", TEST_SIZES["MNIST"])):
        _idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        _idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)
    for split, count in (("train", 7), ("test", TEST_SIZES["SVHN"])):
        (root / "svhn").mkdir(exist_ok=True)
        scipy.io.savemat(
            root / "svhn" / f"{split}_32x32.mat",
            {"X": rng.integers(0, 256, (32, 32, 3, count), dtype=np.uint8), "y": (np.arange(count) % 10 + 1)[:, None]},
        )
    return root


def fabricate_task_vectors_checkpoints(root: Path, classes, visual, heads_dim: int = 64) -> Path:
    """``root/ViT-B-32/{zeroshot.pt, <Task>/finetuned.pt, head_<Task>.pt}`` around the tiny ``visual``:
    experts are the pretrained tower plus a different random perturbation each; heads are random unit
    rows x 100 with zero bias, pickled as ``src.modeling.ClassificationHead`` (an ``nn.Linear``)."""
    import copy

    import torch.nn.functional as F
    from published_formats import _image_encoder, _save

    folder = root / "ViT-B-32"
    folder.mkdir(parents=True)
    _save(_image_encoder(visual, classes), folder / "zeroshot.pt", "zip")
    for i, (task, count) in enumerate(CLASSES.items()):
        expert = copy.deepcopy(visual)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for parameter in expert.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        (folder / task).mkdir()
        _save(_image_encoder(expert, classes), folder / task / "finetuned.pt", "raw" if task == "Cars" else "zip")
        head = classes["ClassificationHead"](heads_dim, count)
        head.normalize = True
        with torch.no_grad():
            head.weight.copy_(F.normalize(torch.randn(count, heads_dim, generator=generator), dim=-1) * 100.0)
            head.bias.zero_()
        _save(head, folder / f"head_{task}.pt", "zip")
    return root


def fabricate_fusionbench_snapshots(root: Path) -> tuple[Any, dict[str, Any]]:
    """``save_pretrained`` folders named like FusionBench's hub repositories under ``root``: a tiny
    transformers ``CLIPModel`` (``clip-vit-base-patch32``) and, per task, a ``CLIPVisionModel`` expert
    (``clip-vit-base-patch32_<task>``) that is its vision tower plus a random perturbation. Returns the models."""
    import transformers

    from surgery_lib.settings.clip.tasks import CLIP_TASK_NAMES, CLIP_TASKS

    torch.manual_seed(3)
    vision = dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        hidden_act="quick_gelu",
    )
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        vocab_size=100,
        bos_token_id=0,
        eos_token_id=1,
    )
    pretrained = transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)
    ).eval()
    pretrained.save_pretrained(root / "clip-vit-base-patch32")
    experts = {}
    for task in CLIP_TASK_NAMES:
        expert = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)).eval()
        source = pretrained.vision_model.state_dict()  # transformers 5 flattened CLIPVisionModel: match either way
        expert.load_state_dict({k: source[k.removeprefix("vision_model.")] for k in expert.state_dict()})
        with torch.no_grad():
            for parameter in expert.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        expert.save_pretrained(root / f"clip-vit-base-patch32_{CLIP_TASKS[task].fusionbench}")
        experts[task] = expert
    return pretrained, experts
