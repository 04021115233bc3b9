"""Files in exactly the published task_vectors formats, for tests (shared by several test modules).

The published ``zeroshot.pt`` / ``finetuned.pt`` are pickled ``src.modeling.ImageEncoder`` objects holding an
open_clip 2.0.2 ``CLIP`` (``open_clip.model.VisualTransformer`` etc.) plus torchvision preprocessing; the
heads are pickled ``src.modeling.ClassificationHead`` objects. ``published_classes`` recreates those class
names (so the pickles reference the same globals) for the duration of one test.
"""

from __future__ import annotations

import math
import pickle
import sys
import types
from collections import OrderedDict

import pytest
import torch
from torch import nn

LEGACY_NAMES = {"VisionTransformer": "VisualTransformer"}  # open_clip 2.0.2's name for the image tower


@pytest.fixture
def published_classes(monkeypatch):
    """Classes pickled under the names the published files use (restored after the test)."""
    import open_clip.model

    classes = {}
    for name, base in [
        ("VisualTransformer", nn.Module),
        ("Transformer", nn.Module),
        ("ResidualAttentionBlock", nn.Module),
        ("LayerNorm", nn.LayerNorm),
        ("QuickGELU", nn.Module),
        ("CLIP", nn.Module),
    ]:
        classes[name] = type(name, (base,), {"__module__": "open_clip.model"})
        monkeypatch.setattr(open_clip.model, name, classes[name], raising=False)
    modeling = types.ModuleType("src.modeling")
    for name, base in [("ImageEncoder", nn.Module), ("ClassificationHead", nn.Linear)]:
        classes[name] = type(name, (base,), {"__module__": "src.modeling"})
        setattr(modeling, name, classes[name])
    monkeypatch.setitem(sys.modules, "src", types.ModuleType("src"))
    monkeypatch.setitem(sys.modules, "src.modeling", modeling)
    return classes


def _as_published(module: nn.Module, classes) -> nn.Module:
    """A copy of an open_clip 3.x module tree whose open_clip classes carry the 2.0.2 names."""
    kind = type(module)
    if kind.__module__.startswith("open_clip"):
        kind = classes[LEGACY_NAMES.get(kind.__name__, kind.__name__)]
    copy = kind.__new__(kind)
    copy.__dict__ = dict(module.__dict__)
    copy._modules = OrderedDict(
        (k, _as_published(c, classes) if c is not None else None) for k, c in module._modules.items()
    )
    return copy


@pytest.fixture
def tiny_visual():
    from open_clip.transformer import QuickGELU, VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(
        image_size=32, patch_size=8, width=128, layers=2, heads=2, mlp_ratio=4.0, output_dim=64, act_layer=QuickGELU
    )
    with torch.no_grad():  # non-trivial values everywhere, so a key mix-up cannot go unnoticed
        for parameter in visual.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return visual.eval()


def _image_encoder(visual: nn.Module, classes) -> nn.Module:
    from open_clip.transform import _convert_to_rgb
    from torchvision import transforms

    clip = classes["CLIP"]()
    clip.visual = _as_published(visual, classes)
    # The text leftovers the published files keep, the same in every file (fine-tuning never touched them,
    # so their task vectors are exactly zero, as in the published checkpoints).
    generator = torch.Generator().manual_seed(1234)
    clip.token_embedding = nn.Embedding(12, 16)
    with torch.no_grad():
        clip.token_embedding.weight.copy_(torch.randn(12, 16, generator=generator))
    clip.positional_embedding = nn.Parameter(torch.randn(5, 16, generator=generator))
    clip.ln_final = classes["LayerNorm"](16)
    clip.text_projection = nn.Parameter(torch.randn(16, 64, generator=generator))
    clip.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    encoder = classes["ImageEncoder"]()
    encoder.model = clip
    normalize = transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    encoder.train_preprocess = transforms.Compose(
        [
            transforms.RandomResizedCrop(32, interpolation=transforms.InterpolationMode.BICUBIC),
            _convert_to_rgb,
            transforms.ToTensor(),
            normalize,
        ]
    )
    encoder.val_preprocess = transforms.Compose(
        [
            transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(32),
            _convert_to_rgb,
            transforms.ToTensor(),
            normalize,
        ]
    )
    encoder.cache_dir = None
    return encoder


def _save(obj, path, kind: str) -> None:
    if kind == "zip":
        torch.save(obj, path)
    elif kind == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # the raw-pickle variant (ViT-B-16/Cars/finetuned.pt): torch.load says "Invalid magic number"
        with open(path, "wb") as handle:
            pickle.dump(obj, handle, protocol=2)
