"""The papers' eight datasets: read from the Hugging Face hub or task_vectors' folders, preprocessed once.

Decoding JPEGs is the slow part of evaluating CLIP (an H100 embeds ~16,000 images/s; a CPU core decodes
and resizes a few hundred). So each split is decoded once, in DataLoader worker processes, through the
resize and centre crop of open_clip's eval transform, and stored as a uint8 array (N, 3, S, S) on disk.
Every later pass (evaluation, AdaMerging, Surgery, representation bias) memory-maps that array and
normalises on the device, which is exactly ``ToTensor`` + ``Normalize`` of the eval transform. Disk:
150 KB per 224x224 image, 13 GB for the 87k test images of the eight tasks.

Splits: ``test`` is the task's test split (for DTD and SUN397 the folder is an explicit choice,
``test_folder``, because task_vectors and AdaMerging disagree); ``train`` is a seeded random subset of
the training split (Fisher, RegMean and held-out Surgery adaptation need a few hundred to a few thousand
images, not all of them); ``adapt`` is the same subset, under the name the offline suite uses for
held-out unlabeled images.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.openclip import import_open_clip
from surgery_lib.core.progress import tqdm
from surgery_lib.core.storage import (
    CorruptFileError,
    atomic_path,
    entry_lock,
    read_json,
    write_json,
)
from surgery_lib.core.taskdata import Suite, TaskData
from surgery_lib.settings.clip.tasks import (
    EUROSAT_CLASSES,
    EUROSAT_FOLDERS,
    OPENAI_MEAN,
    OPENAI_STD,
    ClipTask,
    get_clip_task,
    readable_class_name,
)

CACHE_FORMAT = 1
DATA_SOURCES = ("hub", "local")


class LabelledImages:
    """A map-style dataset of ``(PIL image, label)`` with class names; what every source returns.
    ``describe(i)`` names image ``i`` in error messages (its file, where there is one)."""

    def __init__(
        self,
        get: Callable[[int], tuple[Any, int]],
        length: int,
        class_names: Sequence[str],
        origin: str,
        describe: Callable[[int], str] | None = None,
    ):
        self._get, self._length, self.class_names, self.origin = get, length, tuple(class_names), origin
        self._describe = describe

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self._get(index)

    def describe(self, index: int) -> str:
        """Where image ``index`` comes from: its file, or ``origin[index]``."""
        return self._describe(index) if self._describe is not None else f"{self.origin}[{index}]"

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        """The images at ``indices``, in that order."""
        picked = list(indices)
        return LabelledImages(
            lambda i: self._get(picked[i]),
            len(picked),
            self.class_names,
            self.origin,
            lambda i: self.describe(picked[i]),
        )


#: The file extensions torchvision's ImageFolder reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _inside(path: str, boundary: str) -> bool:
    return path == boundary or path.startswith(boundary.rstrip(os.sep) + os.sep)


def folder_samples(
    directory: Path, boundary: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS
) -> tuple[list[tuple[str, int]], list[str]]:
    """torchvision ImageFolder's ``(samples, classes)`` for ``directory``, in its order, except that a link
    is followed only once (a loop would multiply the images, two loops walk until memory runs out) and never
    to a place outside ``boundary`` (the dataset root).

    Raises:
        FileNotFoundError: ``directory`` is missing, or a class folder holds no image (as ImageFolder).
    """
    if not directory.is_dir():
        raise FileNotFoundError(directory)
    limit = os.path.realpath(boundary)
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and _inside(os.path.realpath(e.path), limit))
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        seen: set[str] = set()
        walked = []
        top = os.path.realpath(directory / name)
        for current, folders, files in os.walk(directory / name, followlinks=True):
            real = os.path.realpath(current)
            # A link back to a folder already walked, to an ancestor of the class folder (a loop: it would list
            # every class again), or out of the dataset root is not followed.
            if real in seen or not _inside(real, limit) or (real != top and _inside(top, real)):
                folders[:] = []
                continue
            seen.add(real)
            walked.append((current, files))
        found = [
            (os.path.join(current, file), index)
            for current, files in sorted(walked)
            for file in sorted(files)
            if file.lower().endswith(extensions) and _inside(os.path.realpath(os.path.join(current, file)), limit)
        ]
        if not found:
            raise FileNotFoundError(f"no image ({', '.join(extensions)}) in {directory / name}")
        samples += found
    if not classes:
        raise FileNotFoundError(f"no class folders in {directory}")
    return samples, classes


def _open_rgb(path: str) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _folder(path: Path, boundary: Path, names: Callable[[list[str]], Sequence[str]] | None = None) -> LabelledImages:
    samples, folders = folder_samples(path, boundary)
    classes = names(folders) if names else [readable_class_name(c) for c in folders]
    return LabelledImages(
        lambda i: (_open_rgb(samples[i][0]), samples[i][1]), len(samples), classes, str(path), lambda i: samples[i][0]
    )


def _torchvision(dataset: Any, class_names: Sequence[str], origin: str) -> LabelledImages:
    return LabelledImages(dataset.__getitem__, len(dataset), class_names, origin)


def _resisc45(root: Path, split: str) -> LabelledImages:
    from PIL import Image

    base = root / "resisc45"
    listing = base / f"resisc45-{split}.txt"
    if not listing.is_file():
        raise FileNotFoundError(listing)
    files = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    folders = sorted(p.name for p in (base / "NWPU-RESISC45").iterdir() if p.is_dir())
    index = {name: i for i, name in enumerate(folders)}
    samples = []
    for name in files:
        folder = name.rsplit("_", 1)[0]  # "baseball_diamond_001.jpg" lives in NWPU-RESISC45/baseball_diamond/
        if folder not in index:
            raise SurgeryBookError(
                f"{listing} names {name}, but NWPU-RESISC45/{folder}/ does not exist", "re-extract RESISC45"
            )
        samples.append((base / "NWPU-RESISC45" / folder / name, index[folder]))

    def get(i: int) -> tuple[Any, int]:
        path, label = samples[i]
        with Image.open(path) as image:
            return image.convert("RGB"), label

    return LabelledImages(
        get, len(samples), [readable_class_name(f) for f in folders], str(base), lambda i: str(samples[i][0])
    )


def _svhn(root: Path, split: str) -> LabelledImages:
    """torchvision's SVHN layout (``svhn/<split>_32x32.mat``), read without its MD5 check, which refuses
    any re-saved copy; labels are stored as 1..10 with 10 meaning the digit 0."""
    import scipy.io
    from PIL import Image

    path = root / "svhn" / f"{split}_32x32.mat"
    if not path.is_file():
        raise FileNotFoundError(path)
    mat = scipy.io.loadmat(str(path))
    images = np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2))  # (32, 32, 3, N) -> (N, 32, 32, 3)
    labels = mat["y"].astype(np.int64).flatten() % 10
    return LabelledImages(lambda i: (Image.fromarray(images[i]), int(labels[i])), len(labels), (), str(path))


def _eurosat_names(folders: list[str]) -> list[str]:
    renamed = dict(zip(EUROSAT_FOLDERS, EUROSAT_CLASSES))
    unknown = [f for f in folders if f not in renamed]
    if unknown:
        raise SurgeryBookError(f"unexpected EuroSAT class folders {unknown}", f"expect {', '.join(EUROSAT_FOLDERS)}")
    return [renamed[f] for f in folders]


def local_dataset(
    task: str | ClipTask, root: str | os.PathLike[str], split: str, test_folder: str = "val"
) -> LabelledImages:
    """One split of a task from task_vectors' local folder layout under ``root``.

    Layout: ``sun397/{train,val}`` and ``dtd/{train,val}`` (ImageFolder; which folder is the test split
    is ``test_folder``), ``stanford_cars/`` (devkit .mat files, torchvision's layout),
    ``resisc45/{NWPU-RESISC45/<class>/, resisc45-{train,val,test}.txt}``,
    ``EuroSAT_splits/{train,val,test}/<class>/``, ``gtsrb/`` (torchvision), ``MNIST/raw`` and
    ``svhn/{train,test}_32x32.mat`` (torchvision).

    Raises:
        SurgeryBookError: naming the missing folder or file and what to put there.
    """
    from torchvision import datasets

    spec = get_clip_task(task) if isinstance(task, str) else task
    if split == "validation" and spec.name != "EuroSAT":
        raise SurgeryBookError(
            f"{spec.name} has no validation folder in task_vectors' layout",
            "hold the validation images out of its train split (held_out_validation)",
        )
    if split not in ("train", "test", "validation"):
        raise SurgeryBookError(f"unknown split {split!r}", "use 'train' or 'test'")
    root = Path(root)
    folder_split = test_folder if split == "test" else "train"
    try:
        if spec.name == "SUN397":
            return _folder(root / "sun397" / folder_split, root)
        if spec.name == "DTD":
            return _folder(root / "dtd" / folder_split, root)
        if spec.name == "EuroSAT":  # task_vectors' EuroSATVal reads the val folder
            folder = "val" if split == "validation" else split
            return _folder(root / "EuroSAT_splits" / folder, root, _eurosat_names)
        if spec.name == "RESISC45":
            return _resisc45(root, split)
        if spec.name == "Cars":
            cars = datasets.StanfordCars(str(root), split=split)
            return _torchvision(cars, [readable_class_name(c) for c in cars.classes], str(root / "stanford_cars"))
        if (
            spec.name == "GTSRB" and split == "train"
        ):  # torchvision walks Training/ following every link: the same walk, bounded
            samples, _ = folder_samples(root / "gtsrb" / "GTSRB" / "Training", root, (".ppm",))
            return LabelledImages(
                lambda i: (_open_rgb(samples[i][0]), samples[i][1]),
                len(samples),
                spec.class_names or (),
                str(root / "gtsrb"),
                lambda i: samples[i][0],
            )
        if spec.name == "GTSRB":
            gtsrb = datasets.GTSRB(str(root), split=split)
            return LabelledImages(
                gtsrb.__getitem__,
                len(gtsrb),
                spec.class_names or (),
                str(root / "gtsrb"),
                lambda i: gtsrb._samples[i][0],
            )
        if spec.name == "MNIST":
            return _torchvision(
                datasets.MNIST(str(root), train=split == "train"), spec.class_names or (), str(root / "MNIST")
            )
        svhn = _svhn(root, split)
        return LabelledImages(svhn.__getitem__, len(svhn), spec.class_names or (), svhn.origin)
    except (FileNotFoundError, RuntimeError) as exc:
        raise SurgeryBookError(
            f"{spec.name} ({split}) was not found under {root}: {exc}",
            "put the dataset in task_vectors' layout there (see surgery_lib.settings.clip.data.local_dataset), or use --data-source hub",
        ) from None


def hub_dataset(task: str | ClipTask, split: str, *, load: Callable[..., Any] | None = None) -> LabelledImages:
    """One split of a task from the Hugging Face hub (the repository named by its :class:`ClipTask`), via ``datasets``.

    ``load`` replaces ``datasets.load_dataset`` (tests pass a local dataset). Class names: the task's
    fixed names where it has them, else the dataset's ``ClassLabel`` names.
    """
    spec = get_clip_task(task) if isinstance(task, str) else task
    if load is None:
        try:
            from datasets import load_dataset as load
        except ImportError:
            raise SurgeryBookError(
                "reading the datasets from the hub needs the `datasets` package", "pip install 'surgery-book[hub]'"
            ) from None
    data = load(spec.hub, spec.hub_config, split=split) if spec.hub_config else load(spec.hub, split=split)
    image_key = "image" if "image" in data.features else "img"
    names = spec.class_names or tuple(readable_class_name(n) for n in data.features["label"].names)
    if len(names) != spec.num_classes:
        raise SurgeryBookError(
            f"{spec.hub} has {len(names)} classes, {spec.name} has {spec.num_classes}",
            "check the dataset id and config",
        )

    def get(i: int) -> tuple[Any, int]:
        row = data[i]
        return row[image_key].convert("RGB"), int(row["label"])

    return LabelledImages(get, len(data), names, f"hf://{spec.hub}/{split}")


def eval_resize(image_size: int) -> Callable[[Any], Any]:
    """The PIL part of open_clip's eval transform (RGB, bicubic resize of the short side, centre crop);
    ``ToTensor`` and ``Normalize`` are applied later, on the device."""
    open_clip = import_open_clip()
    from torchvision import transforms

    pipeline = open_clip.image_transform(image_size, is_train=False)
    keep = [
        t for t in pipeline.transforms if not isinstance(t, transforms.Normalize) and "ToTensor" not in type(t).__name__
    ]
    return transforms.Compose(keep)


#: The most pixels an image may have after the short side is resized to the model's size: a 1 x 4,000,000
#: PNG of 12 KB would otherwise ask for gigabytes in the resize. Photographs stay far below (a 16:1
#: panorama at 224: 0.8 M pixels).
MAX_RESIZED_PIXELS = 50_000_000


class _Decoded:
    """Worker-side decoding: ``(uint8 (3, S, S), label, problem)``. An image that cannot be decoded, or
    would be too large once resized, comes back as zeros with ``problem`` naming its file and why, so the
    parent reports it as one line instead of a worker's traceback."""

    def __init__(self, images: LabelledImages, resize: Callable[[Any], Any], image_size: int):
        self.images, self.resize, self.image_size = images, resize, image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        import warnings

        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image, label = self.images[index]
                width, height = image.size
                resized = self.image_size**2 * max(width, height) / max(1, min(width, height))
                if resized > MAX_RESIZED_PIXELS:
                    raise ValueError(
                        f"a {width} x {height} image would be {resized:,.0f} pixels once resized (at most {MAX_RESIZED_PIXELS:,})"
                    )
                return pil_to_tensor(self.resize(image).convert("RGB")), int(label), ""
        except Exception as exc:  # noqa: BLE001  (PIL raises many types for damaged or hostile files)
            problem = f"{self.images.describe(index)}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), -1, problem


def decode_to_cache(
    images: LabelledImages,
    path: str | os.PathLike[str],
    image_size: int,
    *,
    workers: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
    description: str = "decoding",
) -> Path:
    """Decode ``images`` once into ``path`` (a ``.npy`` uint8 array (N, 3, S, S)) plus ``path.json``
    (labels, class names, origin). Both are written atomically, the JSON last, so an interrupted run leaves
    nothing that :func:`read_cache` would accept."""
    from torch.utils.data import DataLoader

    path = Path(path)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    # The readers hold closures over their files, so workers are forked (the default start method became
    # forkserver on Linux with Python 3.14, which would have to pickle them).
    context = "fork" if workers > 0 and "fork" in multiprocessing.get_all_start_methods() else None
    loader = DataLoader(
        _Decoded(images, eval_resize(image_size), image_size),
        batch_size=batch_size,
        num_workers=workers,
        shuffle=False,
        multiprocessing_context=context,
    )
    labels = np.empty(len(images), dtype=np.int64)
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(images), 3, image_size, image_size)
        )
        start = 0
        for batch, batch_labels, problems in tqdm(loader, desc=description, disable=not progress, unit="batch"):
            bad = [problem for problem in problems if problem]
            if bad:
                del array
                raise SurgeryBookError(
                    f"cannot decode {bad[0]}" + (f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""),
                    "remove or replace that file (a damaged download, or not an image), then run the same command again",
                )
            array[start : start + len(batch)] = batch.numpy()
            labels[start : start + len(batch)] = batch_labels.numpy()
            start += len(batch)
        array.flush()
        del array
    write_json(
        {
            "format": CACHE_FORMAT,
            "count": len(images),
            "image_size": image_size,
            "class_names": list(images.class_names),
            "origin": images.origin,
            "labels": labels.tolist(),
        },
        path.with_suffix(".json"),
    )
    return path


def read_cache(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Memory-map a split written by :func:`decode_to_cache`: ``(uint8 images (N, 3, S, S), labels (N,), class names)``.

    Raises:
        CorruptFileError: if the array's shape disagrees with its JSON (a damaged or foreign file).
    """
    path = Path(path)
    meta = read_json(path.with_suffix(".json"))
    try:
        array = np.load(path, mmap_mode="c")  # copy-on-write: writable for torch, never written back
    except (ValueError, OSError) as exc:
        raise CorruptFileError(path, f"unreadable image cache ({exc})") from None
    expected = (meta["count"], 3, meta["image_size"], meta["image_size"])
    if array.shape != expected or array.dtype != np.uint8 or len(meta["labels"]) != meta["count"]:
        raise CorruptFileError(path, f"image cache holds {array.shape} {array.dtype}, its JSON says {expected} uint8")
    return torch.from_numpy(array), torch.tensor(meta["labels"], dtype=torch.int64), tuple(meta["class_names"])


def split_cache_path(
    cache_dir: str | os.PathLike[str], task: str, split: str, source: str, image_size: int, tag: str = ""
) -> Path:
    """``<cache_dir>/<source>/<image_size>/<task>-<split>[-tag].npy``."""
    return Path(cache_dir) / source / str(image_size) / f"{task}-{split}{'-' + tag if tag else ''}.npy"


#: task_vectors' validation split: this fraction of each training split, at most this many images, drawn by
#: ``random_split`` with this seed (its experts were fine-tuned on the rest).
VALIDATION_FRACTION, VALIDATION_MAX, VALIDATION_SEED = 0.1, 5000, 0


def held_out_validation(train_size: int, images: int | None = None) -> list[int]:
    """The indices of task_vectors' validation split of a training split of ``train_size`` images, in its order
    (``random_split(train, [n - v, v], generator=torch.Generator().manual_seed(0))`` with ``v = min(int(0.1 n),
    5000)``: the last ``v`` entries of that seeded permutation); the first ``images`` of them if given.
    """
    size = min(int(train_size * VALIDATION_FRACTION), VALIDATION_MAX)
    if size < 1:
        raise SurgeryBookError(
            f"a training split of {train_size} images holds out no validation images (10 % rounds down to 0)",
            "use a dataset with at least 10 training images",
        )
    order = torch.randperm(train_size, generator=torch.Generator().manual_seed(VALIDATION_SEED))
    held_out = order[train_size - size :].tolist()
    return held_out if images is None else held_out[:images]


def load_clip_task(
    task: str,
    *,
    source: str,
    cache_dir: str | os.PathLike[str],
    image_size: int = 224,
    root: str | os.PathLike[str] | None = None,
    test_folder: str = "val",
    train_images: int = 1000,
    validation_images: int = 0,
    seed: int = 0,
    workers: int | None = None,
    hub_load: Callable[..., Any] | None = None,
    progress: bool = True,
) -> TaskData:
    """One task as :class:`TaskData` (memory-mapped uint8 images, OpenAI CLIP normalisation), decoding
    on first use. Splits: ``test`` (all of it), ``train`` = ``adapt`` (``train_images`` seeded picks) and,
    with ``validation_images``, ``validation``: at most that many of task_vectors' held-out validation images
    (:func:`held_out_validation`; EuroSAT's from its own val folder in the local layout, as task_vectors reads
    it), the labelled data the ``*_tuned`` merges choose their hyper-parameters on. ``files`` names the cache
    file of each split.

    Raises:
        SurgeryBookError: unknown task or source, missing local folder, or a damaged cache (with its path).
    """
    spec = get_clip_task(task)
    if source not in DATA_SOURCES:
        raise SurgeryBookError(f"unknown data source {source!r}", f"use one of: {', '.join(DATA_SOURCES)}")
    if source == "local" and root is None:
        raise SurgeryBookError("the local data source needs a data root", "pass --data-root DIR (task_vectors' layout)")
    tag = test_folder if spec.name in ("SUN397", "DTD") and source == "local" else ""  # caches named by the folder used

    def reader(split: str) -> LabelledImages:
        if source == "hub":
            return hub_dataset(spec, split, load=hub_load)
        return local_dataset(spec, root, split, test_folder)  # type: ignore[arg-type]

    if validation_images < 0:
        raise SurgeryBookError(f"validation_images {validation_images} is negative", "pass 0 (none) or more")

    def validation() -> LabelledImages:
        if source == "local" and spec.name == "EuroSAT":  # its own folder: a seeded sample where it is capped
            data = local_dataset(spec, root, "validation")  # type: ignore[arg-type]
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(VALIDATION_SEED))
            return data.subset(order[: min(validation_images, len(data))].tolist())
        data = reader("train")
        return data.subset(held_out_validation(len(data), validation_images))

    splits = [("test", tag), ("train", f"{train_images}-{seed}")]
    if validation_images:
        splits.append(("validation", f"{validation_images}"))
    images, labels, names, paths = {}, {}, None, {}
    for split, count_tag in splits:
        path = paths[split] = split_cache_path(cache_dir, spec.name, split, source, image_size, count_tag)
        with entry_lock(
            path, f"the {spec.name} {split} image cache"
        ):  # a concurrent run decodes it once, the other waits
            if not (path.is_file() and path.with_suffix(".json").is_file()):
                data = validation() if split == "validation" else reader(split)
                if split == "train":
                    picks = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[
                        : min(train_images, len(data))
                    ]
                    data = data.subset(picks.tolist())
                decode_to_cache(
                    data, path, image_size, workers=workers, progress=progress, description=f"{spec.name} {split}"
                )
        try:
            images[split], labels[split], names = read_cache(path)
        except CorruptFileError as exc:
            raise SurgeryBookError(
                f"the image cache {path} is damaged ({exc.problem})",
                f"delete {path} and {path.with_suffix('.json')} and run again",
            ) from None
    images["adapt"], labels["adapt"] = images["train"], labels["train"]
    return TaskData(spec.name, names or (), images, labels, mean=OPENAI_MEAN, std=OPENAI_STD, files=paths)


def load_clip_suite(tasks: Sequence[str], **options: Any) -> Suite:
    """:func:`load_clip_task` for each of ``tasks`` (same options), as a :class:`Suite` without a mix.

    Raises:
        SurgeryBookError: a task named twice (``MNIST`` and ``mnist`` too: the suite would hold it twice and
            every average over tasks would count it twice), or as :func:`load_clip_task`.
    """
    names = [get_clip_task(t).name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SurgeryBookError(
            f"the tasks {', '.join(map(repr, tasks))} name {', '.join(repeated)} more than once", "name each task once"
        )
    data = {t: load_clip_task(t, **options) for t in tasks}
    files = {t: d.files["test"] for t, d in data.items()}
    return Suite(config=None, tasks=data, mix=None, files=files)
