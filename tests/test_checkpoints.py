"""The task_vectors checkpoint reader, on files made here in exactly the published formats.

The published ``zeroshot.pt`` / ``finetuned.pt`` are pickled ``src.modeling.ImageEncoder`` objects holding an
open_clip 2.0.2 ``CLIP`` (``open_clip.model.VisualTransformer`` etc.) plus torchvision preprocessing; the
heads are pickled ``src.modeling.ClassificationHead`` objects. The fixtures of ``published_formats.py`` recreate those class names
(so the pickles reference the same globals), saves tiny models as torch zip archives, legacy torch files and
raw pickles, and the tests read them back without those classes.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from published_formats import _image_encoder, _save
from torch import nn

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.settings.clip.checkpoints import (
    UnsafeCheckpointError,
    build_clip_visual,
    load_head,
    load_image_encoder_state,
    read_pickled_checkpoint,
    visual_architecture,
)

pytestmark = pytest.mark.filterwarnings("ignore:Couldn.t retrieve source code")


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
    assert visual_architecture(state) == {
        "image_size": 32,
        "patch_size": 8,
        "width": 128,
        "layers": 2,
        "heads": 2,
        "mlp_ratio": 4.0,
        "output_dim": 64,
    }
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
    from surgery_lib.cli import main
    from surgery_lib.settings.clip.checkpoints import load_converted

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
    argv = [
        "convert",
        "--model",
        "ViT-B-32",
        "--source",
        str(tmp_path / "checkpoints"),
        "--out",
        str(tmp_path / "out"),
        "--tasks",
        "MNIST,DTD",
        "--quiet",
    ]
    assert main(argv) == 0
    assert "expert/DTD" in capsys.readouterr().out
    pretrained, loaded, heads, manifest = load_converted(tmp_path / "out" / "ViT-B-32")
    assert manifest["architecture"]["layers"] == 2 and manifest["tasks"] == ["MNIST", "DTD"]
    assert all(torch.equal(loaded["DTD"][k], experts["DTD"][k]) for k in experts["DTD"])
    assert heads["DTD"].num_classes == 47 and not torch.equal(pretrained["proj"], loaded["MNIST"]["proj"])

    spaced = [*argv[:-2], " MNIST, DTD,MNIST", "--quiet", "--json"]  # spaces and a repeat: the same two experts
    assert main(spaced) == 0 and json.loads(capsys.readouterr().out)["tasks"] == ["MNIST", "DTD"]
    for nothing in ("", ","):  # "" converted all eight (and failed here on the six missing folders)
        assert main([*argv[:-2], nothing, "--quiet"]) == 2
        assert f"--tasks {nothing!r} names no task" in capsys.readouterr().err

    (root / "DTD" / "finetuned.pt").unlink()
    assert main(argv) == 2
    assert "1 task_vectors file(s) missing" in capsys.readouterr().err


def test_transformers_clip_vision_maps_onto_open_clip_exactly():
    transformers = pytest.importorskip("transformers")
    from surgery_lib.settings.clip.checkpoints import open_clip_state_from_transformers

    torch.manual_seed(2)
    # head width 64, as in every CLIP (the head count is not stored in the weights)
    config = transformers.CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
        hidden_act="quick_gelu",
    )
    reference = transformers.CLIPVisionModelWithProjection(config).eval()
    state = reference.state_dict()
    vision = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    mapped = open_clip_state_from_transformers(vision, state["visual_projection.weight"])
    encoder = build_clip_visual(mapped)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(encoder(images), reference(pixel_values=images).image_embeds, atol=1e-5)
    flattened = {k.removeprefix("vision_model."): v for k, v in vision.items()}  # transformers >= 5 CLIPVisionModel
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            open_clip_state_from_transformers(flattened, state["visual_projection.weight"]).values(), mapped.values()
        )
    )
    with pytest.raises(SurgeryBookError, match="missing weight .*: not a complete transformers CLIP"):
        open_clip_state_from_transformers({"weight": torch.ones(1)}, state["visual_projection.weight"])
