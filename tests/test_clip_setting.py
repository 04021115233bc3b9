"""The real-CLIP code path end to end, on fabricated files in the published formats: task_vectors' dataset
folders and checkpoints, FusionBench snapshots, zero-shot heads, presets, and every command on top."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip_fixtures import (
    CLASSES,
    TEST_SIZES,
    TINY_CLIP,
    fabricate_datasets,
    fabricate_fusionbench_snapshots,
    fabricate_task_vectors_checkpoints,
)

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.presets import get_preset
from surgery_lib.settings.clip.config import clip_config
from surgery_lib.settings.clip.data import (
    hub_dataset,
    load_clip_task,
    local_dataset,
    read_cache,
)
from surgery_lib.settings.clip.tasks import (
    CLIP_TASK_NAMES,
    CLIP_TASKS,
    EUROSAT_CLASSES,
    GTSRB_CLASSES,
    get_clip_task,
)
from surgery_lib.settings.clip.zero_shot import cached_zero_shot_head, zero_shot_head
from surgery_lib.settings.clip.zoo import ClipSources, load_clip_zoo

pytestmark = pytest.mark.filterwarnings("ignore:Couldn.t retrieve source code")


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    return fabricate_datasets(tmp_path_factory.mktemp("datasets"))


@pytest.fixture
def clip_env(monkeypatch):
    for variable in ("FAMILY", "CHECKPOINTS", "DATA_SOURCE", "DATA_ROOT", "TEST_FOLDER"):
        monkeypatch.delenv(f"SURGERY_BOOK_{variable}", raising=False)
    return monkeypatch


def test_task_metadata_matches_the_papers():
    assert CLIP_TASK_NAMES == ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
    templates = {name: len(task.templates) for name, task in CLIP_TASKS.items()}
    assert templates == {
        "SUN397": 2,
        "Cars": 8,
        "RESISC45": 18,
        "EuroSAT": 3,
        "SVHN": 1,
        "GTSRB": 3,
        "MNIST": 1,
        "DTD": 8,
    }
    assert all(t.count("{}") == 1 for task in CLIP_TASKS.values() for t in task.templates)
    assert (
        sum(task.test_size for task in CLIP_TASKS.values()) == 19887 + 8041 + 6300 + 2700 + 26032 + 12630 + 10000 + 1880
    )
    assert len(GTSRB_CLASSES) == 43 and len(set(GTSRB_CLASSES)) == 43
    assert EUROSAT_CLASSES[0] == "annual crop land" and EUROSAT_CLASSES[-1] == "lake or sea"
    assert get_clip_task("eurosat").name == "EuroSAT"
    with pytest.raises(SurgeryBookError, match="unknown task 'ImageNet'.*SUN397"):
        get_clip_task("ImageNet")


def test_clip_presets_describe_the_papers_backbones():
    from surgery_lib.models import build_encoder

    for name, layers, width, output, rank in (
        ("clip-vit-b-32", 12, 768, 512, 16),
        ("clip-vit-b-16", 12, 768, 512, 16),
        ("clip-vit-l-14", 24, 1024, 768, 4),
    ):
        preset = get_preset(name)
        assert (preset.encoder.layers, preset.encoder.width, preset.encoder.output_dim) == (layers, width, output)
        assert preset.encoder.activation == "quick_gelu" and clip_config(preset).surgery_v2_rank == rank
        assert (preset.surgery_rank(1), preset.surgery_rank(2)) == (16, rank)
        assert preset.tasks == CLIP_TASK_NAMES and preset.adamerging_steps == 500
    assert get_preset("mini").surgery_rank(2) == 16
    encoder = build_encoder(get_preset("clip-vit-b-32").encoder)
    # the official layer-wise AdaMerging counts 158 tensors: these 152 of the image tower plus 6 unused text
    # leftovers (whose coefficients get no gradient, so leaving them out changes nothing)
    assert len(encoder.state_dict()) == 152
    assert sum(p.numel() for p in encoder.parameters()) == 87_849_216  # open_clip's ViT-B-32 image tower


@pytest.mark.parametrize("task", CLIP_TASK_NAMES)
def test_local_folder_layouts_are_read(datasets_root, task):
    test = local_dataset(task, datasets_root, "test")
    train = local_dataset(task, datasets_root, "train")
    assert len(test) == TEST_SIZES[task] and len(train) > 0
    image, label = test[0]
    assert image.mode in ("RGB", "L") and 0 <= label < len(test.class_names)
    fixed = CLIP_TASKS[task].class_names
    assert test.class_names == (fixed if fixed is not None else test.class_names)
    assert len(test.class_names) == CLASSES[task]


def test_class_names_come_from_folders_and_renaming(datasets_root):
    assert local_dataset("SUN397", datasets_root, "test").class_names == ("abbey", "airplane cabin", "bakery")
    assert local_dataset("RESISC45", datasets_root, "test").class_names == ("airplane", "baseball diamond", "beach")
    assert local_dataset("Cars", datasets_root, "test").class_names == (
        "AM General Hummer SUV 2000",
        "Acura RL Sedan 2012",
    )
    assert local_dataset("EuroSAT", datasets_root, "test").class_names == EUROSAT_CLASSES
    gtsrb = local_dataset("GTSRB", datasets_root, "test")
    assert [gtsrb[i][1] for i in range(len(gtsrb))] == [3, 14, 42, 0]
    svhn = local_dataset("SVHN", datasets_root, "test")
    assert [svhn[i][1] for i in range(len(svhn))] == [1, 2, 3, 4, 5]  # stored as 1..10, 10 = digit 0


@pytest.mark.parametrize(
    "task, folder", [("SUN397", "sun397/val"), ("DTD", "dtd/train"), ("EuroSAT", "EuroSAT_splits/test")]
)
def test_folder_layouts_list_the_images_imagefolder_lists_in_its_order(datasets_root, task, folder):
    from torchvision.datasets import ImageFolder

    from surgery_lib.settings.clip.data import folder_samples

    reference = ImageFolder(str(datasets_root / folder))
    assert folder_samples(datasets_root / folder, datasets_root) == (reference.samples, reference.classes)
    split = "train" if folder == "dtd/train" else "test"
    dataset = local_dataset(task, datasets_root, split)
    assert [dataset.describe(i) for i in range(len(dataset))] == [path for path, _ in reference.samples]


def test_links_that_loop_or_leave_the_dataset_root_are_not_followed(datasets_root, tmp_path):
    import os

    root = tmp_path / "data"
    shutil.copytree(datasets_root / "dtd", root / "dtd")
    before = len(local_dataset("DTD", root, "test"))
    banded = root / "dtd" / "val" / "banded"
    os.symlink("..", banded / "up")  # a loop: walking it would list every class again, ~20 times over
    os.symlink(".", banded / "here")  # a second loop: together they branch until memory runs out
    outside = tmp_path / "elsewhere" / "photos"
    outside.mkdir(parents=True)
    shutil.copy(banded / "0.jpg", outside / "private.jpg")
    os.symlink(outside, banded / "elsewhere")  # leaves the dataset root
    os.symlink(outside / "private.jpg", banded / "linked.jpg")
    os.symlink(outside.parent, root / "dtd" / "val" / "zz_outside_class")
    inside = root / "dtd" / "val" / "blotchy" / "alias.jpg"
    os.symlink(root / "dtd" / "val" / "braided" / "0.jpg", inside)  # a link that stays inside is fine
    test = local_dataset("DTD", root, "test")
    assert len(test) == before + 1 and test.class_names == ("banded", "blotchy", "braided")
    assert str(inside) in [test.describe(i) for i in range(len(test))]


@pytest.mark.parametrize("kind", ["tall", "not-an-image"])
def test_an_image_that_cannot_be_decoded_is_one_line_naming_the_file(datasets_root, tmp_path, kind):
    from PIL import Image

    from surgery_lib.settings.clip.data import decode_to_cache

    root = tmp_path / "data"
    shutil.copytree(datasets_root / "dtd", root / "dtd")
    bad = root / "dtd" / "val" / "blotchy" / "9.jpg"
    if kind == "tall":  # 12 KB on disk, and 0.9 G pixels once its short side is resized to 224
        Image.new("L", (1, 4_000_000)).save(bad.with_suffix(".png"))
        bad = bad.with_suffix(".png")
    else:
        bad.write_text("<html>404 Not Found</html>")
    images = local_dataset("DTD", root, "test")
    target = tmp_path / "cache" / "dtd-test.npy"
    with pytest.raises(SurgeryBookError, match=f"cannot decode {re.escape(str(bad))}: ") as error:
        decode_to_cache(images, target, 224, workers=1, progress=False)
    assert ("once resized" if kind == "tall" else "UnidentifiedImageError") in str(error.value)
    assert not target.parent.exists() or not any(target.parent.iterdir())  # nothing half-written


def test_missing_local_data_names_the_folder(tmp_path):
    with pytest.raises(SurgeryBookError, match="DTD \\(test\\) was not found.*dtd/val"):
        local_dataset("DTD", tmp_path, "test")
    with pytest.raises(SurgeryBookError, match="needs a data root"):
        load_clip_task("DTD", source="local", cache_dir=tmp_path)
    with pytest.raises(SurgeryBookError, match="unknown data source 'ftp'"):
        load_clip_task("DTD", source="ftp", cache_dir=tmp_path)


def test_the_dtd_and_sun397_test_folder_is_an_explicit_choice(datasets_root, tmp_path):
    shutil.copy(datasets_root / "dtd" / "train" / "banded" / "0.jpg", tmp_path / "marker.jpg")
    val = load_clip_task(
        "DTD", source="local", root=datasets_root, cache_dir=tmp_path / "c", image_size=32, workers=0, progress=False
    )
    test = load_clip_task(
        "DTD",
        source="local",
        root=datasets_root,
        test_folder="test",
        cache_dir=tmp_path / "c",
        image_size=32,
        workers=0,
        progress=False,
    )
    assert not torch.equal(val.images["test"], test.images["test"])  # two different folders, two caches


def test_decoded_cache_equals_open_clips_eval_transform(datasets_root, tmp_path):
    import open_clip
    from PIL import Image

    data = load_clip_task(
        "SUN397",
        source="local",
        root=datasets_root,
        cache_dir=tmp_path,
        image_size=32,
        train_images=4,
        workers=0,
        progress=False,
    )
    assert data.images["test"].dtype == torch.uint8 and data.images["test"].shape == (6, 3, 32, 32)
    assert len(data.labels["train"]) == 4 and data.images["adapt"] is data.images["train"]
    transform = open_clip.image_transform(32, is_train=False)  # Resize, CenterCrop, RGB, ToTensor, Normalize
    with Image.open(datasets_root / "sun397" / "val" / "abbey" / "0.jpg") as image:
        expected = transform(image)
    assert torch.allclose(data.normalized("test", torch.tensor([0]))[0], expected, atol=1e-6)
    assert data.labels["test"].tolist() == [0, 0, 1, 1, 2, 2]
    in_workers = load_clip_task(
        "SUN397",
        source="local",
        root=datasets_root,
        cache_dir=tmp_path / "w",
        image_size=32,
        train_images=4,
        workers=2,
        progress=False,
    )
    assert torch.equal(in_workers.images["test"], data.images["test"])  # decoded in 2 DataLoader worker processes


def test_a_damaged_image_cache_is_reported_with_its_path(datasets_root, tmp_path):
    options = dict(
        source="local", root=datasets_root, cache_dir=tmp_path, image_size=32, train_images=4, workers=0, progress=False
    )
    load_clip_task("DTD", **options)
    path = next(tmp_path.rglob("DTD-test-val.npy"))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SurgeryBookError, match="image cache .*DTD-test-val.npy is damaged.*delete"):
        load_clip_task("DTD", **options)
    assert read_cache  # the reader is what raised (CorruptFileError), translated into the message above


def test_hub_datasets_are_read_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    from PIL import Image

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["banded", "blotchy_spots"])}
    )
    local = datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(3)],
            "label": [0, 1, 1],
        },
        features=features,
    )
    calls = []

    def load(name, *args, split):
        calls.append((name, args, split))
        return local

    dtd = CLIP_TASKS["DTD"]
    patched = type(dtd)(**{**dtd.__dict__, "num_classes": 2})
    data = hub_dataset(patched, "test", load=load)
    assert calls == [("tanganke/dtd", (), "test")] and len(data) == 3
    assert data.class_names == ("banded", "blotchy spots") and data[2][1] == 1 and data[0][0].size == (24, 20)
    with pytest.raises(SurgeryBookError, match="tanganke/dtd has 2 classes, DTD has 47"):
        hub_dataset("DTD", "test", load=load)
    hub_dataset("SVHN", "test", load=load)
    assert calls[-1] == ("ufldl-stanford/svhn", ("cropped_digits",), "test")


def _tiny_text_clip():
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(
        embed_dim=64,
        vision_cfg=CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
    )
    return model.eval(), open_clip.get_tokenizer("ViT-B-32")


def test_zero_shot_head_follows_the_recipe():
    model, tokenizer = _tiny_text_clip()
    names, templates = ["cat", "dog", "fish"], ["a photo of a {}.", "a drawing of the {}.", "{}!"]
    head = zero_shot_head(model, tokenizer, names, templates, batch_size=4)
    with torch.no_grad():
        for row, name in zip(head.linear.weight, names):
            per_template = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1)
            expected = F.normalize(per_template.mean(0), dim=0) * model.logit_scale.exp()
            assert torch.allclose(row, expected, atol=1e-5)
    assert torch.allclose(head.linear.weight.norm(dim=1), model.logit_scale.exp().expand(3), rtol=1e-5)
    assert torch.count_nonzero(head.linear.bias) == 0 and not any(p.requires_grad for p in head.parameters())
    with pytest.raises(SurgeryBookError, match="exactly one"):
        zero_shot_head(model, tokenizer, names, ["no placeholder"])


def test_zero_shot_heads_are_cached_and_rebuilt_when_damaged(tmp_path):
    built = []

    def load():
        built.append(1)
        return _tiny_text_clip()

    first = cached_zero_shot_head(tmp_path, "ViT-B-32", "DTD", ["banded", "dotted"], ["a photo of a {} texture."], load)
    again = cached_zero_shot_head(tmp_path, "ViT-B-32", "DTD", ["banded", "dotted"], ["a photo of a {} texture."], load)
    assert len(built) == 1 and torch.equal(first.linear.weight, again.linear.weight)
    path = next(tmp_path.rglob("DTD-*.safetensors"))
    path.write_bytes(b"garbage")
    rebuilt = cached_zero_shot_head(
        tmp_path, "ViT-B-32", "DTD", ["banded", "dotted"], ["a photo of a {} texture."], load
    )
    assert len(built) == 2 and torch.allclose(rebuilt.linear.weight, first.linear.weight)


@pytest.fixture
def tiny_clip_zoo(tmp_path, datasets_root, published_classes, tiny_visual, clip_env):
    checkpoints = fabricate_task_vectors_checkpoints(tmp_path / "checkpoints", published_classes, tiny_visual)
    sources = ClipSources(
        checkpoints=str(checkpoints), data_source="local", data_root=str(datasets_root), train_images=6
    )
    zoo = load_clip_zoo(
        TINY_CLIP, device="cpu", cache_dir=tmp_path / "cache", sources=sources, workers=0, progress=False
    )
    return zoo, tmp_path, sources


def test_task_vectors_setting_loads_into_a_zoo(tiny_clip_zoo, tiny_visual):
    zoo, tmp_path, sources = tiny_clip_zoo
    assert zoo.tasks == CLIP_TASK_NAMES and zoo.mtl is None
    assert all(zoo.heads[t].num_classes == CLASSES[t] for t in zoo.tasks)
    assert all(len(zoo.suite[t].labels["test"]) == TEST_SIZES[t] for t in zoo.tasks)
    images = torch.randn(3, 3, 32, 32)
    assert torch.equal(zoo.encoder("pretrained")(images), tiny_visual(images))  # QuickGELU, every weight in place
    table = zoo.accuracy_table()
    assert list(table.index) == ["pretrained (zero-shot)", "individual (expert)"]
    with pytest.raises(SurgeryBookError, match="no model 'mtl'"):
        zoo.encoder("mtl")
    # second time: everything from the cache, with the original files gone
    shutil.rmtree(tmp_path / "checkpoints")
    again = load_clip_zoo(
        TINY_CLIP, device="cpu", cache_dir=tmp_path / "cache", sources=sources, workers=0, progress=False
    )
    assert again.accuracy_table().equals(table)


def test_every_method_runs_on_the_clip_path(tiny_clip_zoo):
    from surgery_lib.merging import MergeOptions, evaluate_merge, merge, task_arithmetic
    from surgery_lib.surgery.run import run_surgery
    from surgery_lib.surgery.v1 import SurgeryConfig

    zoo, _, _ = tiny_clip_zoo
    result = merge(zoo, "task_arithmetic", device="cpu", progress=False)
    assert all(torch.equal(result.state[k], v) for k, v in task_arithmetic(zoo.pretrained, zoo.experts, 0.3).items())
    assert set(evaluate_merge(zoo, result, "cpu")) == set(CLIP_TASK_NAMES)
    ada = merge(zoo, "adamerging_layer", MergeOptions(steps=2, batch_size=2), device="cpu", progress=False)
    assert ada.details["adamerging"].coefficients.shape == (8, 8 + 12 * 2)  # tensors of a 2-block tower
    for version in (1, 2):
        run = run_surgery(
            zoo,
            result.state,
            config=SurgeryConfig(steps=3, batch_size=2, eval_every=3),
            version=version,
            device="cpu",
            progress=False,
        )
        assert set(run.accuracy_after) == set(CLIP_TASK_NAMES) and all(b >= 0 for b in run.bias_after.values())


def test_commands_accept_clip_presets(tiny_clip_zoo, capsys, monkeypatch):
    from surgery_lib.cli import main
    from surgery_lib.presets import PRESETS

    monkeypatch.setitem(PRESETS, TINY_CLIP.name, TINY_CLIP)
    zoo, tmp_path, sources = tiny_clip_zoo  # the caches exist; the command finds them through its options
    argv = [
        "--preset",
        TINY_CLIP.name,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--data-source",
        "local",
        "--data-root",
        sources.data_root,
        "--json",
        "--quiet",
    ]
    import os

    before = dict(os.environ)
    try:
        assert main(["merge", *argv, "--method", "weight_averaging", "--device", "cpu"]) == 0
        payload = json.loads(capsys.readouterr().out)
        assert set(payload["accuracy"]["weight averaging"]) == {*CLIP_TASK_NAMES, "average"}
        assert main(["zoo", *argv, "--device", "cpu"]) == 0
        assert "pretrained (zero-shot)" in json.loads(capsys.readouterr().out)["accuracy"]
        assert main(["data", *argv]) == 0  # the data cards name each task's files (Paths) as strings
        cards = json.loads(capsys.readouterr().out)["cards"]
        assert set(cards) >= set(CLIP_TASK_NAMES) and all(isinstance(card["source"], str) for card in cards.values())
    finally:
        os.environ.clear()
        os.environ.update(before)


def test_fusionbench_snapshots_convert_and_get_zero_shot_heads(tmp_path, datasets_root, clip_env, capsys):
    pytest.importorskip("transformers")
    from surgery_lib.settings.clip.checkpoints import (
        build_clip_visual,
        fusionbench_sources,
        load_converted,
    )

    snapshots = tmp_path / "hub"
    pretrained, experts = fabricate_fusionbench_snapshots(snapshots)  # named like the hub repositories
    assert (
        fusionbench_sources("ViT-B-32", "hub", ("Cars",))["expert/Cars"]
        == "tanganke/clip-vit-base-patch32_stanford-cars"
    )
    with pytest.raises(SurgeryBookError, match="9 FusionBench snapshot folder"):
        fusionbench_sources("ViT-B-32", str(tmp_path / "nothing"), CLIP_TASK_NAMES)

    from surgery_lib.cli import main

    assert (
        main(
            [
                "convert",
                "--family",
                "fusionbench",
                "--model",
                "ViT-B-32",
                "--source",
                str(snapshots),
                "--out",
                str(tmp_path / "converted"),
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["family"] == "fusionbench" and manifest["tasks"] == list(CLIP_TASK_NAMES)
    assert manifest["architecture"]["layers"] == 2 and len(manifest["files"]) == 9  # pretrained + 8 experts
    _, converted, heads, _ = load_converted(tmp_path / "converted" / "ViT-B-32")
    assert heads == {}  # the family ships none
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = pretrained.visual_projection(experts["MNIST"](pixel_values=images).pooler_output)
        assert torch.allclose(build_clip_visual(converted["MNIST"])(images), reference, atol=1e-5)

    sources = ClipSources(
        family="fusionbench",
        checkpoints=str(tmp_path / "converted" / "ViT-B-32"),
        data_source="local",
        data_root=str(datasets_root),
        train_images=4,
    )
    zoo = load_clip_zoo(
        TINY_CLIP,
        device="cpu",
        cache_dir=tmp_path / "cache",
        sources=sources,
        workers=0,
        load_text_model=_tiny_text_clip,
        progress=False,
    )
    model, tokenizer = _tiny_text_clip()
    expected = zero_shot_head(model, tokenizer, EUROSAT_CLASSES, CLIP_TASKS["EuroSAT"].templates)
    assert torch.allclose(zoo.heads["EuroSAT"].linear.weight, expected.linear.weight, atol=1e-6)
    assert zoo.heads["SUN397"].num_classes == 3 and zoo.manifest["family"] == "fusionbench"


def _edit_snapshot(folder, edit):
    """Rewrite ``folder/model.safetensors`` with ``edit(tensors)`` applied, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_a_broken_fusionbench_expert_is_refused_and_the_earlier_conversion_kept(tmp_path, capsys):
    pytest.importorskip("transformers")
    from surgery_lib.cli import main
    from surgery_lib.core.storage import sha256_file
    from surgery_lib.settings.clip.checkpoints import load_converted

    good, converted = tmp_path / "hub", tmp_path / "converted"
    fabricate_fusionbench_snapshots(good)
    command = [
        "convert",
        "--family",
        "fusionbench",
        "--model",
        "ViT-B-32",
        "--out",
        str(converted),
        "--quiet",
        "--source",
    ]
    assert main([*command, str(good)]) == 0
    capsys.readouterr()
    before = {p.relative_to(converted): sha256_file(p) for p in converted.rglob("*") if p.is_file()}

    def broken(name, edit=None, remove=None):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        expert = folder / "clip-vit-base-patch32_dtd"
        if edit is not None:
            _edit_snapshot(expert, edit)
        if remove is not None:
            (expert / remove).unlink()
        return folder, expert

    def first_key(tensors, part):
        return next(k for k in tensors if part in k)

    def delete(t):
        del t[first_key(t, "layers.1.mlp.fc1.weight")]

    def quantise(t):
        key = first_key(t, "layers.0.self_attn.q_proj.weight")
        t[key] = t[key].to(torch.int8)

    def poison(t):
        t[first_key(t, "layers.0.mlp.fc2.bias")][3] = float("nan")

    def extra(t):
        t["vision_model.encoder.layers.0.adapter.weight"] = torch.zeros(2, 2)

    def reshape(t):
        key = first_key(t, "layers.1.mlp.fc2.weight")
        t[key] = t[key][:, :-1].contiguous()

    cases = {
        "deleted": (dict(edit=delete), r"missing weight '(vision_model\.)?encoder\.layers\.1\.mlp\.fc1\.weight'"),
        "int8": (dict(edit=quantise), r"q_proj\.weight' is torch\.int8, not a floating-point weight"),
        "nan": (dict(edit=poison), r"fc2\.bias' holds NaN or infinite values"),
        "unexpected": (dict(edit=extra), r"unexpected transformers keys \['encoder\.layers\.0\.adapter\.weight'\]"),
        "no-config": (dict(remove="config.json"), r"has no config\.json"),
        "shape": (
            dict(edit=reshape),
            r"expert 'DTD' has shape \(128, 511\) for 'transformer\.resblocks\.1\.mlp\.c_proj\.weight'",
        ),
    }
    for name, (change, message) in cases.items():
        folder, expert = broken(name, **change)
        assert main([*command, str(folder)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(expert) in err and re.search(message, err), (name, err)
    for name, damage in (
        ("truncated", lambda b: b[: len(b) // 2]),
        ("huge-header", lambda b: (2**62).to_bytes(8, "little") + b[8:]),
    ):
        folder, expert = broken(name)
        weights = expert / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
        assert main([*command, str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot read {weights}" in err, (name, err)

    # Nothing of the failed conversions reached the folder, and no temporary folder is left beside it.
    after = {p.relative_to(converted): sha256_file(p) for p in converted.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in converted.iterdir()) == ["ViT-B-32"]
    load_converted(converted / "ViT-B-32")

    (tmp_path / "a-file").write_text("")
    assert (
        main(
            [
                "convert",
                "--family",
                "fusionbench",
                "--model",
                "ViT-B-32",
                "--out",
                str(tmp_path / "a-file"),
                "--quiet",
                "--source",
                str(good),
            ]
        )
        == 2
    )
    assert "a-file is a file" in capsys.readouterr().err


def test_fusionbench_hub_ids_are_downloaded_as_weights_and_config_only(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from surgery_lib.cli import main

    local = tmp_path / "hub"
    fabricate_fusionbench_snapshots(local)
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, tuple(allow_patterns)))
        if repo_id.endswith("_dtd"):
            raise OSError("Repository Not Found for url: https://huggingface.co/api/models/" + repo_id)
        return str(local / repo_id.split("/")[-1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    command = ["convert", "--family", "fusionbench", "--model", "ViT-B-32", "--source", "hub", "--quiet", "--out"]
    assert main([*command, str(tmp_path / "converted"), "--tasks", "SUN397,Cars"]) == 0
    assert [repo for repo, _ in asked] == [
        "openai/clip-vit-base-patch32",
        "tanganke/clip-vit-base-patch32_sun397",
        "tanganke/clip-vit-base-patch32_stanford-cars",
    ]
    assert all("config.json" in patterns and not any(p.endswith(".bin") for p in patterns) for _, patterns in asked)
    assert main([*command, str(tmp_path / "failed")]) == 2
    err = capsys.readouterr().err
    assert "cannot download tanganke/clip-vit-base-patch32_dtd from the hub (OSError: Repository Not Found" in err
    assert not (tmp_path / "failed" / "ViT-B-32").exists()


def test_presets_round_trip_through_json_files(tmp_path, monkeypatch):
    from surgery_lib.presets import (
        PRESETS,
        preset_from_dict,
        register_presets_from_file,
    )

    for name in ("mini", "clip-vit-l-14"):
        assert preset_from_dict(json.loads(json.dumps(get_preset(name).to_dict()))) == get_preset(name)
    path = tmp_path / "presets.json"
    path.write_text(json.dumps([TINY_CLIP.to_dict()]))
    assert register_presets_from_file(path) == [TINY_CLIP]
    monkeypatch.delitem(PRESETS, TINY_CLIP.name)  # registered for this test only
    mini = tmp_path / "mini.json"
    mini.write_text(json.dumps(get_preset("mini").to_dict()))
    with pytest.raises(SurgeryBookError, match="already registered"):  # a built-in is never replaced silently
        register_presets_from_file(mini)
    path.write_text(json.dumps({"name": "broken"}))
    with pytest.raises(SurgeryBookError, match="invalid preset description"):
        register_presets_from_file(path)


def test_pipeline_benchmark_times_every_stage(monkeypatch):
    from surgery_lib.benchmark import pipeline_benchmark, synthetic_clip_zoo
    from surgery_lib.presets import PRESETS

    monkeypatch.setitem(PRESETS, TINY_CLIP.name, TINY_CLIP)
    sizes = {"SUN397": 12, "DTD": 6}
    zoo = synthetic_clip_zoo(TINY_CLIP.name, sizes)
    assert zoo.heads["SUN397"].num_classes == 397 and zoo.suite["DTD"].images["test"].shape == (6, 3, 32, 32)
    relative = [(zoo.experts["DTD"][k] - v).norm() / v.norm() for k, v in zoo.pretrained.items() if v.norm() > 0]
    assert 0.001 < float(torch.stack(relative).median()) < 0.1  # task vectors of a realistic relative size
    stages = pipeline_benchmark(zoo, device="cpu", adamerging_steps=1, surgery_steps=2, progress=False)
    names = [s.stage for s in stages]
    assert names[0] == "task arithmetic merge" and names[-1].startswith("end to end") and len(stages) == 6
    assert all(s.seconds > 0 and s.peak_memory_gb is None for s in stages)
    assert stages[1].images_per_s > 0 and stages[-1].seconds == pytest.approx(
        sum(s.seconds for s in stages[:-1]) - stages[1].seconds
    )


def test_bench_times_a_synthetic_tower_at_the_papers_sizes_with_its_surgery_v2_rank(monkeypatch, capsys):
    import dataclasses

    from surgery_lib.cli import main
    from surgery_lib.presets import PRESETS

    low_rank = dataclasses.replace(
        TINY_CLIP, name="clip-tiny-rank-4", setting_config={**TINY_CLIP.setting_config, "surgery_v2_rank": 4}
    )
    monkeypatch.setitem(PRESETS, low_rank.name, low_rank)
    argv = ["bench", "--synthetic", low_rank.name, "--scale", "0.0001", "--iterations", "1", "--json", "--quiet"]
    assert main([*argv, "--versions", "1,2", "--adam", "shared,per-task"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["setting"].startswith(f"{low_rank.name} (random weights), random 32x32 images: 128 test images")
    rows = report["results"]
    assert [(r["version"], r["adam"], r["rank"]) for r in rows] == [
        ("V1", "shared", 16),
        ("V2", "shared", 4),
        ("V1", "per-task", 16),
        ("V2", "per-task", 4),
    ]
    for row in rows:
        assert row["steps per task"] == 2 and row["features (images/s)"] > 0 and row["library / features"] >= 1
        assert "library peak (GiB)" not in row  # peak memory is the accelerator's: none on a CPU
    assert main([*argv, "--vit-b32"]) == 2
    assert "name two towers" in capsys.readouterr().err
    assert main(["bench", "--synthetic", "smoke", "--quiet"]) == 2
    assert "random weights stand in for a published CLIP tower only" in capsys.readouterr().err


def test_a_new_checkpoint_source_is_converted_again(tmp_path, datasets_root, published_classes, tiny_visual, clip_env):
    import copy

    first = fabricate_task_vectors_checkpoints(tmp_path / "a", published_classes, tiny_visual)
    shifted = copy.deepcopy(tiny_visual)
    with torch.no_grad():
        shifted.proj.add_(1.0)
    second = fabricate_task_vectors_checkpoints(tmp_path / "b", published_classes, shifted)
    options = dict(device="cpu", cache_dir=tmp_path / "cache", workers=0, progress=False)
    data = dict(data_source="local", data_root=str(datasets_root), train_images=4)
    zoo_a = load_clip_zoo(TINY_CLIP, sources=ClipSources(checkpoints=str(first), **data), **options)
    zoo_b = load_clip_zoo(TINY_CLIP, sources=ClipSources(checkpoints=str(second), **data), **options)
    assert torch.equal(zoo_b.pretrained["proj"], zoo_a.pretrained["proj"] + 1.0)
    again = load_clip_zoo(TINY_CLIP, sources=ClipSources(**data), **options)  # no source named: the last conversion
    assert torch.equal(again.pretrained["proj"], zoo_b.pretrained["proj"])


def test_suite_cards_name_the_cache_files(datasets_root, tmp_path):
    from surgery_lib.settings.clip.data import load_clip_suite

    suite = load_clip_suite(
        ("DTD", "MNIST"),
        source="local",
        root=datasets_root,
        cache_dir=tmp_path,
        image_size=32,
        train_images=4,
        workers=0,
        progress=False,
    )
    assert all(path.is_file() for path in suite.files.values()) and suite.files["DTD"].name == "DTD-test-val.npy"
    cards = suite.cards()
    assert cards.loc["MNIST", "test"] == TEST_SIZES["MNIST"] and cards.loc["DTD", "adapt"] == 4
    with pytest.raises(SurgeryBookError, match=r"the tasks 'DTD', 'mnist', 'MNIST' name MNIST more than once"):
        load_clip_suite(("DTD", "mnist", "MNIST"), source="local", root=datasets_root, cache_dir=tmp_path)


def _official_ties(folder, tasks, keep=0.2, scale=0.3):
    """The official TIES, step by step: flatten every task vector of the whole pickled ImageEncoder (text
    leftovers included, sorted keys), keep entries >= the (d - int(d k))-th smallest magnitude, elect signs
    (majority sign where the sum is 0), disjoint sum. Returns the kept entries and the merged state by key."""
    from surgery_lib.settings.clip.checkpoints import (
        module_tensors,
        read_pickled_checkpoint,
    )

    def full(path):
        return {k: v.float() for k, v in module_tensors(read_pickled_checkpoint(path)).items() if v.is_floating_point()}

    pretrained = full(folder / "zeroshot.pt")
    keys = sorted(pretrained)
    flat = torch.stack(
        [torch.cat([(full(folder / t / "finetuned.pt")[k] - pretrained[k]).flatten() for k in keys]) for t in tasks]
    )
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * keep), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    kept = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
    merged = torch.cat([pretrained[k].flatten() for k in keys]) + scale * kept.sum(dim=0)
    out_kept, out_merged, start = {}, {}, 0
    for k in keys:
        size = pretrained[k].numel()
        out_kept[k] = kept[:, start : start + size].reshape(len(tasks), *pretrained[k].shape)
        out_merged[k] = merged[start : start + size].reshape(pretrained[k].shape)
        start += size
    return out_kept, out_merged


def test_ties_keeps_exactly_the_entries_the_official_flatten_then_trim_keeps(tiny_clip_zoo):
    from surgery_lib.merging import merge, method_label, task_vectors, ties_vectors
    from surgery_lib.settings.clip.checkpoints import TASK_VECTORS_TASKS, VISUAL_PREFIX

    zoo, tmp_path, _ = tiny_clip_zoo
    official_kept, official_merged = _official_ties(tmp_path / "checkpoints" / "ViT-B-32", TASK_VECTORS_TASKS)
    leftovers = [k for k in official_kept if not k.startswith(VISUAL_PREFIX)]
    assert len(leftovers) == 6 and all(not official_kept[k].any() for k in leftovers)  # zero, as published
    vectors = list(task_vectors(zoo.pretrained, zoo.experts).values())
    assert zoo.published and zoo.ties_zero_entries == clip_config(zoo.preset).ties_text_entries > 0  # on the zoo
    ours = ties_vectors(vectors, 0.2, zoo.ties_zero_entries)
    image_tower_only = ties_vectors(vectors, 0.2)
    state = merge(zoo, "ties", device="cpu", progress=False).state
    differs = False
    for key in zoo.pretrained:
        reference = official_kept[VISUAL_PREFIX + key]
        for t in range(len(vectors)):
            assert torch.equal(ours[t][key] != 0, reference[t] != 0), (key, t)
            differs |= not torch.equal(image_tower_only[t][key] != 0, reference[t] != 0)
        torch.testing.assert_close(state[key], official_merged[VISUAL_PREFIX + key], atol=1e-6, rtol=1e-6)
    assert differs  # trimming the image tower alone would keep other entries
    assert "% of the tower" in method_label(zoo, "ties") and "% of the tower" in method_label(zoo, "adamerging_plus")


def test_clip_presets_carry_the_official_ties_scope():
    from open_clip.transformer import QuickGELU, VisionTransformer

    from surgery_lib.merging import kept_fraction
    from surgery_lib.settings.clip.tasks import text_leftover_entries

    expected = {"clip-vit-b-32": 25.83, "clip-vit-b-16": 25.94, "clip-vit-l-14": 22.54}
    for name, percent in expected.items():
        preset = get_preset(name)
        e = preset.encoder
        text_width, embed = (768, 768) if e.layers == 24 else (512, 512)
        assert clip_config(preset).ties_text_entries == text_leftover_entries(text_width, embed)
        with torch.device("meta"):
            tower = VisionTransformer(
                image_size=e.image_size,
                patch_size=e.patch_size,
                width=e.width,
                layers=e.layers,
                heads=e.heads,
                mlp_ratio=e.mlp_ratio,
                output_dim=e.output_dim,
                act_layer=QuickGELU,
            )
        entries = sum(p.numel() for p in tower.state_dict().values())
        assert round(100 * kept_fraction(entries, 0.2, clip_config(preset).ties_text_entries), 2) == percent, name
    assert get_preset("mini").setting_config is None  # offline presets trim their own vector: 20 %
