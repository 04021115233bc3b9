"""The task_vectors checkpoint reader, on files made here in exactly the published formats.

The published ``zeroshot.pt`` / ``finetuned.pt`` are pickled ``src.modeling.ImageEncoder`` objects holding an
open_clip 2.0.2 ``CLIP`` (``open_clip.model.VisualTransformer`` etc.) plus torchvision preprocessing; the
heads are pickled ``src.modeling.ClassificationHead`` objects. The fixture below recreates those class names
(so the pickles reference the same globals), saves tiny models as torch zip archives, legacy torch files and
raw pickles, and the tests read them back without those classes.
"""

from __future__ import annotations

import math
import os
import pickle
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery_lib.checkpoints import (
    UnsafeCheckpointError,
    build_clip_visual,
    load_head,
    load_image_encoder_state,
    read_pickled_checkpoint,
    visual_architecture,
)
from surgery_lib.errors import SurgeryBookError

pytestmark = pytest.mark.filterwarnings("ignore:Couldn.t retrieve source code")

LEGACY_NAMES = {"VisionTransformer": "VisualTransformer"}  # open_clip 2.0.2's name for the image tower


@pytest.fixture
def published_classes(monkeypatch):
    """Classes pickled under the names the published files use (restored after the test)."""
    import open_clip.model

    classes = {}
    for name, base in [("VisualTransformer", nn.Module), ("Transformer", nn.Module), ("ResidualAttentionBlock", nn.Module),
                       ("LayerNorm", nn.LayerNorm), ("QuickGELU", nn.Module), ("CLIP", nn.Module)]:  # fmt: skip
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
    copy._modules = OrderedDict((k, _as_published(c, classes) if c is not None else None) for k, c in module._modules.items())
    return copy


@pytest.fixture
def tiny_visual():
    from open_clip.transformer import QuickGELU, VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=32, patch_size=8, width=128, layers=2, heads=2, mlp_ratio=4.0, output_dim=64, act_layer=QuickGELU)
    with torch.no_grad():  # non-trivial values everywhere, so a key mix-up cannot go unnoticed
        for parameter in visual.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return visual.eval()


def _image_encoder(visual: nn.Module, classes) -> nn.Module:
    from torchvision import transforms

    from open_clip.transform import _convert_to_rgb

    clip = classes["CLIP"]()
    clip.visual = _as_published(visual, classes)
    clip.token_embedding = nn.Embedding(12, 16)  # the text leftovers the published files keep
    clip.positional_embedding = nn.Parameter(torch.randn(5, 16))
    clip.ln_final = classes["LayerNorm"](16)
    clip.text_projection = nn.Parameter(torch.randn(16, 64))
    clip.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    encoder = classes["ImageEncoder"]()
    encoder.model = clip
    normalize = transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    encoder.train_preprocess = transforms.Compose([transforms.RandomResizedCrop(32, interpolation=transforms.InterpolationMode.BICUBIC), _convert_to_rgb, transforms.ToTensor(), normalize])
    encoder.val_preprocess = transforms.Compose([transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(32), _convert_to_rgb, transforms.ToTensor(), normalize])
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


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw"])
def test_image_encoder_round_trips_from_every_file_kind(tmp_path, published_classes, tiny_visual, kind):
    path = tmp_path / "finetuned.pt"
    _save(_image_encoder(tiny_visual, published_classes), path, kind)
    if kind == "raw":
        with pytest.raises(Exception, match="magic number"):
            torch.load(path, weights_only=False)
    state = load_image_encoder_state(path)
    expected = tiny_visual.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert visual_architecture(state) == {"image_size": 32, "patch_size": 8, "width": 128, "layers": 2, "heads": 2, "mlp_ratio": 4.0, "output_dim": 64}
    rebuilt = build_clip_visual(state)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(images), tiny_visual(images), atol=1e-6)


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_head_loads_as_a_classification_head(tmp_path, published_classes, kind):
    torch.manual_seed(1)
    head = published_classes["ClassificationHead"](64, 10)
    head.normalize = True
    with torch.no_grad():
        head.weight.copy_(F.normalize(torch.randn(10, 64), dim=-1) * 100.0)
        head.bias.zero_()
    path = tmp_path / "head_MNIST.pt"
    _save(head, path, kind)
    loaded = load_head(path)
    z = torch.randn(4, 64) * 3
    with torch.no_grad():
        assert torch.allclose(loaded(z), F.normalize(z, dim=-1) @ head.weight.T + head.bias, atol=1e-5)
    assert loaded.num_classes == 10


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_a_pickle_that_would_run_a_command_is_refused_unexecuted(tmp_path, kind):
    marker = tmp_path / "executed"
    path = tmp_path / "finetuned.pt"
    payload = {"model": _RunsACommand(marker), "weights": torch.ones(3)}
    _save(payload, path, kind)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        read_pickled_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_truncated_or_wrong_files_give_a_clear_error(tmp_path, published_classes, tiny_visual, kind):
    path = tmp_path / "zeroshot.pt"
    _save(_image_encoder(tiny_visual, published_classes), path, kind)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SurgeryBookError, match="zeroshot.pt is truncated"):
        load_image_encoder_state(path)
    with pytest.raises(SurgeryBookError, match="no checkpoint"):
        load_image_encoder_state(tmp_path / "missing.pt")
    head_path = tmp_path / "head.pt"
    torch.save(nn.Linear(4, 2), head_path)
    with pytest.raises(SurgeryBookError, match="no CLIP image encoder"):
        load_image_encoder_state(head_path)


def test_convert_a_task_vectors_folder_and_load_it_back(tmp_path, published_classes, tiny_visual, capsys):
    from surgery_lib.checkpoints import load_converted
    from surgery_lib.cli import main

    root = tmp_path / "checkpoints" / "ViT-B-32"
    (root / "MNIST").mkdir(parents=True)
    (root / "DTD").mkdir()
    _save(_image_encoder(tiny_visual, published_classes), root / "zeroshot.pt", "zip")
    experts = {}
    for task, kind in (("MNIST", "zip"), ("DTD", "raw")):
        with torch.no_grad():
            tiny_visual.proj.add_(0.1)  # a different "fine-tuned" expert per task
        experts[task] = {k: v.clone() for k, v in tiny_visual.state_dict().items()}
        _save(_image_encoder(tiny_visual, published_classes), root / task / "finetuned.pt", kind)
        head = published_classes["ClassificationHead"](64, 10 if task == "MNIST" else 47)
        _save(head, root / f"head_{task}.pt", kind)
    argv = ["convert", "--model", "ViT-B-32", "--source", str(tmp_path / "checkpoints"), "--out", str(tmp_path / "out"), "--tasks", "MNIST,DTD", "--quiet"]
    assert main(argv) == 0
    assert "expert/DTD" in capsys.readouterr().out
    pretrained, loaded, heads, manifest = load_converted(tmp_path / "out" / "ViT-B-32")
    assert manifest["architecture"]["layers"] == 2 and manifest["tasks"] == ["MNIST", "DTD"]
    assert all(torch.equal(loaded["DTD"][k], experts["DTD"][k]) for k in experts["DTD"])
    assert heads["DTD"].num_classes == 47 and not torch.equal(pretrained["proj"], loaded["MNIST"]["proj"])

    (root / "DTD" / "finetuned.pt").unlink()
    assert main(argv) == 2
    assert "1 task_vectors file(s) missing" in capsys.readouterr().err


def test_transformers_clip_vision_maps_onto_open_clip_exactly():
    transformers = pytest.importorskip("transformers")
    from surgery_lib.checkpoints import open_clip_state_from_transformers

    torch.manual_seed(2)
    # head width 64, as in every CLIP (the head count is not stored in the weights)
    config = transformers.CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                                           image_size=32, patch_size=8, projection_dim=32, hidden_act="quick_gelu")  # fmt: skip
    reference = transformers.CLIPVisionModelWithProjection(config).eval()
    state = reference.state_dict()
    vision = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    mapped = open_clip_state_from_transformers(vision, state["visual_projection.weight"])
    encoder = build_clip_visual(mapped)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(encoder(images), reference(pixel_values=images).image_embeds, atol=1e-5)
    flattened = {k.removeprefix("vision_model."): v for k, v in vision.items()}  # transformers >= 5 CLIPVisionModel
    assert all(torch.equal(a, b) for a, b in zip(open_clip_state_from_transformers(flattened, state["visual_projection.weight"]).values(), mapped.values()))
    with pytest.raises(SurgeryBookError, match="not a transformers CLIP"):
        open_clip_state_from_transformers({"weight": torch.ones(1)}, state["visual_projection.weight"])
