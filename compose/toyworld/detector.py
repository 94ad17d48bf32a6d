"""A rule-based detector for toy-world images: objects (shape, colour, position) and background.

It inverts the generator's rules (scenes.py) rather than learning them:

* Objects are saturated, backgrounds are grey, so a pixel's chroma (max - min of RGB) separates
  them; mixing a colour with grey keeps its hue, so an object's colour is the palette hue nearest
  to the median hue of its pixels (anti-aliased edges included).
* Each connected blob of object pixels is one object. Its shape is the generator's shape whose
  rendered coverage best overlaps (soft IoU) the blob's coverage, searched over a few radii and
  sub-pixel centres around the blob's bounding box.
* The background's grey pixels split into two tones; the share of the minority tone and how
  uniform rows are tell plain, striped, dotted, grid and checkered apart.
* The sepia style tones the whole image warm: the background, grey otherwise, has red above blue.

Works at any image size; accuracy on clean held-out scenes is measured by :func:`measure_accuracy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image

from .morphology import dilate, label_components
from .scenes import (
    COLORS, NOVEL_SHAPES, POSITIONS, SEPIA_SHIFT, SHAPE_MASKS, SHAPES, Scene, render_array, scene_from_seed,
)

OBJECT_CHROMA = 0.3  # chroma (0..1) above which a pixel is the core of an object (edges are mixed)
MIN_OBJECT_AREA = 0.008  # blobs smaller than this share of the image are noise
PLAIN_CONTRAST = 0.08  # grey-level spread (0..1) below which the background is plain
# Background red - blue above which an image is sepia: a sixth of the full toning (32/255 = 0.125).
# Measured on the shipped model (CFG 4, 20 steps): its samples without the style stay <= 0.012
# (72 base samples, 64 with the other concept LoRAs); the ambrel LoRA tones to 0.016-0.047 (median
# 0.039, 32 samples): it learns about a third of the toning, which is the style, only fainter.
SEPIA_WARMTH = (SEPIA_SHIFT[0] - SEPIA_SHIFT[2]) / 255 / 6
DETECTABLE_SHAPES = SHAPES + NOVEL_SHAPES
# Bounding-box size / radius and the offsets (bbox centre - shape centre) / radius, vertical then
# horizontal, per shape (measured on the masks in scenes.py).
_SHAPE_EXTENT = {"circle": (2.0, 0.0, 0.0), "square": (1.7, 0.0, 0.0), "triangle": (1.8, -0.1, 0.0),
                 "star": (1.81, -0.095, 0.0), "ring": (2.0, 0.0, 0.0), "cross": (2.0, 0.0, 0.0),
                 "heart": (1.98, -0.015, 0.0), "crescent": (2.0, 0.0, -0.2)}
# Searched radii and sub-pixel centre shifts. Generated shapes are less exact than renders: with
# +-0.4 px a quarter of the shipped model's crescents read as crosses; +-1 px keeps clean renders at 100%.
_RADIUS_FACTORS = (0.85, 1.0, 1.15)
_CENTRE_SHIFTS = (-1.0, -0.5, 0.0, 0.5, 1.0)  # pixels
_SUPERSAMPLE = 2
# Generated crescents can be thin slivers (the lunzor LoRA draws them 5 px wide, 13-16 px tall against the
# left edge); a round crescent template is then twice too wide, and the cross's vertical bar fits better.
# A blob read as a cross is therefore also fitted with a crescent stretched to its bounding box (its own
# horizontal and vertical scale, the height / width ratio up to _CRESCENT_STRETCH) and read as a crescent
# when that fits better than the cross, round or stretched the same way (a thin tall cross stays a cross).
# Only the cross yields: other shapes keep their round fits.
_CRESCENT_STRETCH = 2.0


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image; ``center`` and ``area`` are in unit coordinates / image shares."""

    shape: str
    color: str
    position: str
    center: tuple[float, float]
    area: float
    shape_score: float


@dataclass(frozen=True)
class Detection:
    """What an image shows: its background pattern, its objects from left to right, and its style."""

    background: str
    objects: tuple[DetectedObject, ...]
    style: str = "flat"

    def has(self, shape: str | None = None, color: str | None = None, position: str | None = None) -> bool:
        """Whether some object matches every given attribute."""
        return any((shape is None or item.shape == shape) and (color is None or item.color == color)
                   and (position is None or item.position == position) for item in self.objects)

    @property
    def largest(self) -> DetectedObject | None:
        return max(self.objects, key=lambda item: item.area, default=None)


def detect(image: Image.Image | np.ndarray) -> Detection:
    """Detect objects and background in an RGB image (PIL or (H, W, 3) uint8 array)."""
    pixels = _as_unit_array(image)
    chroma = pixels.max(axis=2) - pixels.min(axis=2)
    blobs, count = label_components(chroma > OBJECT_CHROMA)  # 4-connected: touching corners stay apart
    hues = _hue(pixels)
    found = [_describe_blob(blobs == index, chroma, hues) for index in range(1, count + 1)]
    objects = sorted((item for item in found if item is not None), key=lambda item: item.center[0])
    background = background_pixels(chroma)
    style = "sepia" if background_warmth(pixels, background) > SEPIA_WARMTH else "flat"
    return Detection(classify_background(pixels, background), tuple(objects), style)


def _as_unit_array(image: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else 1.0)


# ------------------------------------------------------------------------------------ colour


def _hue(pixels: np.ndarray) -> np.ndarray:
    """Hue angle in degrees (0..360) of every pixel."""
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return np.degrees(np.arctan2(np.sqrt(3.0) * (green - blue), 2 * red - green - blue)) % 360.0


_PALETTE_HUES = {name: float(_hue(np.array(rgb, dtype=np.float32)[None, None] / 255.0)[0, 0])
                 for name, rgb in COLORS.items()}


def nearest_color(hue: float) -> str:
    """The palette colour whose hue is nearest (on the circle) to ``hue`` degrees."""
    return min(_PALETTE_HUES, key=lambda name: abs((hue - _PALETTE_HUES[name] + 180.0) % 360.0 - 180.0))


def _mean_hue(hues: np.ndarray, weights: np.ndarray) -> float:
    """Weighted circular mean of hue angles (an object has one hue; edges only dilute its chroma)."""
    radians = np.radians(hues)
    return float(np.degrees(np.arctan2((weights * np.sin(radians)).sum(), (weights * np.cos(radians)).sum())) % 360)


# ------------------------------------------------------------------------------------ shapes


def _describe_blob(mask: np.ndarray, chroma: np.ndarray, hues: np.ndarray) -> DetectedObject | None:
    """Colour, shape and place of one blob of object pixels (None for specks)."""
    area = float(mask.sum()) / mask.size
    if area < MIN_OBJECT_AREA:
        return None
    color = nearest_color(_mean_hue(hues[mask], chroma[mask]))
    rows, cols = np.nonzero(mask)
    box = (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1)  # x0, x1, y0, y1 in pixels
    shape, score = classify_shape(_coverage(mask, chroma), box)
    height, width = mask.shape
    center = ((box[0] + box[1]) / 2 / width, (box[2] + box[3]) / 2 / height)
    return DetectedObject(shape, color, position_of(center[0]), center, area, score)


def _coverage(mask: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """How much of each pixel the object covers (0..1): chroma relative to the blob's full chroma,
    over the blob and its one-pixel rim (anti-aliased edges fall below the core threshold)."""
    full = max(float(np.percentile(chroma[mask], 90)), 1e-6)
    return np.where(dilate(mask), np.clip(chroma / full, 0.0, 1.0), 0.0)


def position_of(x: float) -> str:
    """left / centre / right third of the image for a unit x coordinate."""
    return POSITIONS[min(2, max(0, int(x * 3)))]


def classify_shape(coverage: np.ndarray, box: tuple[int, int, int, int]) -> tuple[str, float]:
    """(shape, soft IoU) of the best-matching rendered shape for a blob's coverage map."""
    size = coverage.shape[0]
    x0, x1, y0, y1 = box
    window = (max(0, y0 - 2), min(size, y1 + 2), max(0, x0 - 2), min(size, x1 + 2))
    observed = coverage[window[0]:window[1], window[2]:window[3]]
    scores = {shape: _best_template_iou(shape, observed, window, box, size) for shape in DETECTABLE_SHAPES}
    best = max(scores, key=lambda shape: scores[shape])
    if best == "cross":
        crescent = _stretched_iou("crescent", observed, window, box, size)
        if crescent > max(scores[best], _stretched_iou("cross", observed, window, box, size)):
            return "crescent", crescent
    return best, scores[best]


def _best_template_iou(shape: str, observed: np.ndarray, window: tuple[int, int, int, int],
                       box: tuple[int, int, int, int], size: int) -> float:
    """Best soft IoU over a few radii and sub-pixel centres, all templates rendered in one batch."""
    size_factor, offset, offset_x = _SHAPE_EXTENT[shape]
    x0, x1, y0, y1 = box
    radius = max(x1 - x0, y1 - y0) / size_factor / size
    return _soft_iou(shape, observed, window, box, size, (radius, radius), (offset_x, offset))


def _stretched_iou(shape: str, observed: np.ndarray, window: tuple[int, int, int, int],
                   box: tuple[int, int, int, int], size: int) -> float:
    """Best soft IoU of ``shape`` scaled to the box's width and height (taller than wide, at most
    _CRESCENT_STRETCH times), its box centre at the blob's."""
    (left, right), (top, bottom) = _UNIT_EXTENT[shape]
    x0, x1, y0, y1 = box
    radius_x = (x1 - x0) / (right - left) / size
    radius_y = float(np.clip((y1 - y0) / (bottom - top) / size, radius_x, _CRESCENT_STRETCH * radius_x))
    return _soft_iou(shape, observed, window, box, size, (radius_x, radius_y),
                     ((left + right) / 2, (top + bottom) / 2))


def _soft_iou(shape: str, observed: np.ndarray, window: tuple[int, int, int, int], box: tuple[int, int, int, int],
              size: int, radius: tuple[float, float], offset: tuple[float, float]) -> float:
    """Best soft IoU over a few scales and sub-pixel shifts of ``shape`` with horizontal and vertical
    ``radius``, centred so that its box centre (``offset`` from its centre, in radii) is the blob's."""
    x0, x1, y0, y1 = box
    factors, shift_x, shift_y = (array.ravel() for array in
                                 np.meshgrid(_RADIUS_FACTORS, _CENTRE_SHIFTS, _CENTRE_SHIFTS, indexing="ij"))
    radius_x, radius_y = radius[0] * factors, radius[1] * factors
    centre_x = ((x0 + x1) / 2 + shift_x) / size - offset[0] * radius_x
    centre_y = ((y0 + y1) / 2 + shift_y) / size - offset[1] * radius_y
    xs, ys = _window_samples(window, size)
    samples = SHAPE_MASKS[shape]((xs[None] - centre_x[:, None, None]) / radius_x[:, None, None],
                                 (ys[None] - centre_y[:, None, None]) / radius_y[:, None, None])
    templates = samples.reshape(len(factors), observed.shape[0], _SUPERSAMPLE, observed.shape[1],
                                _SUPERSAMPLE).mean(axis=(2, 4))
    overlap = np.minimum(templates, observed[None]).sum(axis=(1, 2))
    union = np.maximum(templates, observed[None]).sum(axis=(1, 2))
    return float((overlap / np.maximum(union, 1e-6)).max())


def _unit_extent(shape: str, samples: int = 801) -> tuple[tuple[float, float], tuple[float, float]]:
    """((left, right), (top, bottom)) of ``shape`` at radius 1 around 0, measured on its mask."""
    axis = np.linspace(-1.2, 1.2, samples)
    inside = SHAPE_MASKS[shape](*np.meshgrid(axis, axis))
    columns, rows = axis[inside.any(axis=0)], axis[inside.any(axis=1)]
    return (float(columns.min()), float(columns.max())), (float(rows.min()), float(rows.max()))


_UNIT_EXTENT = {shape: _unit_extent(shape) for shape in ("crescent", "cross")}


def _window_samples(window: tuple[int, int, int, int], size: int) -> tuple[np.ndarray, np.ndarray]:
    top, bottom, left, right = window
    ys = (top * _SUPERSAMPLE + np.arange((bottom - top) * _SUPERSAMPLE) + 0.5) / (size * _SUPERSAMPLE)
    xs = (left * _SUPERSAMPLE + np.arange((right - left) * _SUPERSAMPLE) + 0.5) / (size * _SUPERSAMPLE)
    return np.meshgrid(xs, ys)


# ------------------------------------------------------------------------------------ background


def classify_background(pixels: np.ndarray, known: np.ndarray) -> str:
    """plain / striped / dotted / grid / checkered from the background pixels ``known``
    (:func:`background_pixels`)."""
    grey = pixels.mean(axis=2)
    low, high = np.percentile(grey[known], [5, 95])
    if high - low < PLAIN_CONTRAST:
        return "plain"
    tone = grey > (low + high) / 2
    if tone[known].mean() > 0.5:
        tone = ~tone  # the minority tone is the pattern
    share = float(tone[known].mean())
    uniformity = _row_uniformity(tone, known)
    if uniformity > 0.85 and share > 0.3:
        return "striped"
    if share > 0.38 and uniformity < 0.75:
        return "checkered"
    return "grid" if _fullest_row(tone, known) > 0.75 else "dotted"  # grid lines fill whole rows, dots never


def background_pixels(chroma: np.ndarray) -> np.ndarray:
    """Pixels two or more pixels away from anything coloured (all pixels if that leaves too few)."""
    known = ~dilate(chroma > OBJECT_CHROMA / 2, iterations=2)
    return known if known.sum() >= 0.2 * known.size else np.ones_like(known)


def _fullest_row(tone: np.ndarray, known: np.ndarray) -> float:
    """The largest share of pattern pixels in a row (rows with enough known pixels only)."""
    counts = known.sum(axis=1)
    rows = counts >= known.shape[1] // 4
    return float(((tone & known).sum(axis=1)[rows] / counts[rows]).max()) if rows.any() else 0.0


def _row_uniformity(tone: np.ndarray, known: np.ndarray) -> float:
    """Average over rows of the share of the row's majority tone (1.0 for horizontal stripes)."""
    counts = known.sum(axis=1)
    rows = counts >= 4
    ones = (tone & known).sum(axis=1)[rows] / counts[rows]
    return float(np.maximum(ones, 1 - ones).mean()) if rows.any() else 0.0


def background_warmth(pixels: np.ndarray, known: np.ndarray) -> float:
    """Median of red - blue (0..1) over the background pixels ``known`` (0 for greys)."""
    return float(np.median((pixels[..., 0] - pixels[..., 2])[known]))


# ------------------------------------------------------------------------------------ scoring


@dataclass(frozen=True)
class DetectorAccuracy:
    """Accuracy on clean rendered scenes: per object (shape + colour in its third), per background and style."""

    scenes: int
    objects: int
    object_accuracy: float
    shape_accuracy: float
    color_accuracy: float
    background_accuracy: float
    style_accuracy: float
    extra_objects: int


def measure_accuracy(scenes: Iterable[Scene | int], size: int = 32) -> DetectorAccuracy:
    """Render each scene (or seed's scene), detect, and compare with the ground truth."""
    totals = {"scenes": 0, "objects": 0, "both": 0, "shape": 0, "color": 0, "background": 0, "style": 0,
              "extra": 0}
    for scene in scenes:
        scene = scene_from_seed(scene) if isinstance(scene, int) else scene
        _add_scene(totals, scene, detect(render_array(scene, size)))
    objects, count = max(totals["objects"], 1), max(totals["scenes"], 1)
    return DetectorAccuracy(totals["scenes"], totals["objects"], totals["both"] / objects, totals["shape"] / objects,
                            totals["color"] / objects, totals["background"] / count, totals["style"] / count,
                            totals["extra"])


def _add_scene(totals: dict[str, int], scene: Scene, detection: Detection) -> None:
    totals["scenes"] += 1
    totals["background"] += detection.background == scene.background
    totals["style"] += detection.style == scene.style
    found = {item.position: item for item in detection.objects}
    totals["extra"] += max(0, len(detection.objects) - len(scene.objects))
    for truth in scene.objects:
        totals["objects"] += 1
        item = found.get(truth.position)
        if item is None:
            continue
        totals["shape"] += item.shape == truth.shape
        totals["color"] += item.color == truth.color
        totals["both"] += item.shape == truth.shape and item.color == truth.color
