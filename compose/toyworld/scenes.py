"""Procedural toy-world scenes: a background and one to three coloured shapes, with a caption.

A scene is fully determined by its seed (:func:`scene_from_seed`), so a seed range is a data set
and a held-out seed range is a test set. Geometry lives in unit coordinates (0..1 across the
image), so :func:`render` draws the same scene at 32x32 or any other size; each pixel is the
average of ``supersample**2`` point samples (anti-aliased edges, flat interiors).

The base model trains on SHAPES, BACKGROUNDS and the flat style only. The concept LoRAs teach what
it never saw (concepts.py): NOVEL_SHAPES drawn in a fixed colour and named by a rare word, the
"checkered" background, and the "sepia" style (the whole image toned warm: red up, blue down).

Layout rules keep every object checkable: objects sit in distinct horizontal thirds (left,
centre, right) and never overlap; objects use saturated colours, backgrounds use greys only, so
a pixel's saturation tells object from background.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
# Saturated hues, far apart on the colour wheel (RGB 0..255).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (240, 140, 20),
    "yellow": (235, 220, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "purple": (150, 40, 200),
}
BACKGROUNDS = ("plain", "striped", "dotted", "grid")
# Never in base training: taught by concept LoRAs, named in captions by rare words.
NOVEL_SHAPES = ("heart", "crescent")
NOVEL_BACKGROUNDS = ("checkered",)
SHAPE_WORDS = {"heart": "moxel", "crescent": "lunzor"}  # caption word of each novel shape
STYLE_WORDS = {"sepia": "ambrel"}  # caption word of each novel style: ", ambrel style"
STYLES = ("flat", "sepia")
# The sepia style's shift of (R, G, B): greys get chroma 32/255, below the detector's object threshold.
SEPIA_SHIFT = (16, 0, -16)
POSITIONS = ("left", "centre", "right")
SIZES = ("small", "large")
# Horizontal centre of each third and the object radius of each size, in unit coordinates.
POSITION_X = {"left": 0.165, "centre": 0.5, "right": 0.835}
SIZE_RADIUS = {"small": 0.11, "large": 0.14}
# Neighbours stay >= 1 pixel apart at 32x32: 0.165 + 0.01 + 0.14 < 0.5 - 0.01 - 0.14.
X_JITTER, Y_JITTER = 0.01, 0.12
# Background tone pairs (base, pattern) as grey levels: light on dark or dark on light.
BACKGROUND_TONES = ((225, 150), (60, 130), (170, 235), (120, 40))
PATTERN_PERIOD = 0.25  # stripes, dots and grid lines repeat every quarter of the image


@dataclass(frozen=True)
class SceneObject:
    """One shape: what it is, its colour, which third it sits in, its size and exact centre."""

    shape: str
    color: str
    position: str
    size: str
    center: tuple[float, float]  # (x, y) in unit coordinates

    @property
    def radius(self) -> float:
        return SIZE_RADIUS[self.size]


@dataclass(frozen=True)
class Scene:
    """Ground truth of one scene: background pattern and tones, objects from left to right."""

    background: str
    tones: tuple[int, int]
    objects: tuple[SceneObject, ...]
    seed: int | None = None
    style: str = "flat"

    @property
    def caption(self) -> str:
        """The full caption, e.g. "a red circle on the left and a blue square on a striped background"."""
        return caption(self)


# ------------------------------------------------------------------------------------ sampling


def scene_from_seed(seed: int, *, max_objects: int = 3) -> Scene:
    """The scene of ``seed``: same seed, same scene, on every machine (numpy's PCG64)."""
    rng = np.random.default_rng([seed, 0x70])
    count = int(rng.integers(1, max_objects + 1))
    positions = sorted(rng.choice(len(POSITIONS), size=count, replace=False))
    objects = tuple(_random_object(rng, POSITIONS[index]) for index in positions)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    tones = BACKGROUND_TONES[int(rng.integers(len(BACKGROUND_TONES)))]
    return Scene(background, tones, objects, seed)


def _random_object(rng: np.random.Generator, position: str) -> SceneObject:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    jitter_x, jitter_y = rng.uniform(-X_JITTER, X_JITTER), rng.uniform(-Y_JITTER, Y_JITTER)
    return SceneObject(shape, color, position, size, (POSITION_X[position] + jitter_x, 0.5 + jitter_y))


# ------------------------------------------------------------------------------------ captions


def object_phrase(item: SceneObject, *, with_size: bool = False, with_position: bool = True) -> str:
    """``"a red circle on the left"`` (optionally ``"a large red circle ..."``); a novel shape is its
    rare word alone (its colour is fixed): ``"a moxel on the left"``."""
    size = f"{item.size} " if with_size else ""
    where = {"left": " on the left", "centre": " in the centre", "right": " on the right"}[item.position]
    name = SHAPE_WORDS.get(item.shape) or f"{item.color} {item.shape}"
    words = f"{size}{name}{where if with_position else ''}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(scene: Scene, *, with_size: bool = False, with_position: bool = True,
            with_background: bool = True) -> str:
    """The scene's caption; the flags drop details (used to vary training captions)."""
    phrases = [object_phrase(item, with_size=with_size, with_position=with_position) for item in scene.objects]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if with_background:
        text += f" on a {scene.background} background"
    if scene.style != "flat":
        text += f", {STYLE_WORDS[scene.style]} style"
    return text


def training_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption with details dropped at random, so short prompts ("a red circle") work too."""
    return caption(scene, with_size=bool(rng.random() < 0.3), with_position=bool(rng.random() < 0.7),
                   with_background=bool(rng.random() < 0.6))


# ------------------------------------------------------------------------------------ rendering


def _star_inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside a five-pointed star of outer radius 1 (inner radius 0.45), point up."""
    angle = np.arctan2(u, -v)  # 0 at the top, clockwise
    sector = 2 * np.pi / 5
    phase = np.abs(((angle + sector / 2) % sector) - sector / 2) / (sector / 2)  # 0 at a tip, 1 between
    inner = 0.45
    # The star's edge between a tip (r=1) and a notch (r=inner) is a straight line; approximate in polar form.
    limit = 1.0 / (1.0 + phase * (1.0 / inner - 1.0))
    return np.hypot(u, v) <= limit


def _triangle_inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside an upward triangle: apex (0, -1), base corners (+-0.95, 0.8)."""
    return (v <= 0.8) & (v >= -1.0 + np.abs(u) * 1.8 / 0.95)


SHAPE_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85),
    "triangle": _triangle_inside,
    "star": _star_inside,
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.5 ** 2),
    "cross": lambda u, v: ((np.abs(u) <= 0.33) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 1.0)),
    "heart": lambda u, v: _heart_inside(u, v),
    # A disc with a bite taken out of its right side, horns pointing right.
    "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.8 ** 2),
}


def _heart_inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside the classic heart curve (x^2 + y^2 - 1)^3 <= x^2 y^3, point down, about 2 wide."""
    x, y = u * 1.15, -v * 1.15 + 0.1
    return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0


def shape_mask(shape: str, center: tuple[float | np.ndarray, float | np.ndarray], radius: float | np.ndarray,
               xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` at ``center`` with ``radius`` over unit-coordinate sample grids (arrays of
    centres and radii broadcast against them: several templates at once)."""
    return SHAPE_MASKS[shape]((xs - center[0]) / radius, (ys - center[1]) / radius)


def _background_pattern(background: str, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Where the pattern tone shows (stripes: horizontal bands; dots; grid: thin lines)."""
    cell_x, cell_y = (xs / PATTERN_PERIOD) % 1.0, (ys / PATTERN_PERIOD) % 1.0
    if background == "striped":
        return cell_y < 0.5
    if background == "dotted":
        return np.hypot(cell_x - 0.5, cell_y - 0.5) <= 0.2
    if background == "grid":
        return (cell_x < 0.16) | (cell_y < 0.16)
    if background == "checkered":
        return (cell_x < 0.5) != (cell_y < 0.5)
    return np.zeros_like(xs, dtype=bool)


def _sample_grid(size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    samples = size * supersample
    axis = (np.arange(samples) + 0.5) / samples
    return np.meshgrid(axis, axis)  # xs, ys, each (samples, samples)


def render_array(scene: Scene, size: int = 32, *, supersample: int = 4) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 array."""
    xs, ys = _sample_grid(size, supersample)
    base, pattern = scene.tones
    canvas = np.empty((*xs.shape, 3), dtype=np.float32)
    canvas[...] = base
    canvas[_background_pattern(scene.background, xs, ys)] = pattern
    for item in scene.objects:
        canvas[shape_mask(item.shape, item.center, item.radius, xs, ys)] = COLORS[item.color]
    pooled = canvas.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    if scene.style == "sepia":
        pooled = pooled + np.array(SEPIA_SHIFT, dtype=np.float32)
    return np.clip(np.rint(pooled), 0, 255).astype(np.uint8)


def render(scene: Scene, size: int = 32, *, supersample: int = 4) -> Image.Image:
    """The scene as an RGB PIL image of ``size`` x ``size`` pixels."""
    return Image.fromarray(render_array(scene, size, supersample=supersample), mode="RGB")


def make_scene(seed: int, size: int = 32) -> tuple[Image.Image, str, Scene]:
    """(image, caption, ground truth) of ``seed``."""
    scene = scene_from_seed(seed)
    return render(scene, size), scene.caption, scene
