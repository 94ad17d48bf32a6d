"""Frequency profiling of a LoRA (CMLoRA, Zou et al. ICLR 2025; docs/methods/cmlora.md).

    image   <- generate with the LoRA alone (fixed seed, its trigger words), decoded RGB in [0, 1]
    g       <- mean of R, G, B
    A       <- log(|fftshift(FFT2(g))| + 1e-8)
    profile(r) <- mean of A over the pixels at integer radius r from the centre, r = 0 .. r_max
    profile <- profile / max(profile)
    score   <- mean(profile[r >= cutoff_fraction * r_max])

A higher score means more high-frequency content (edges, texture), a lower one smooth layout and
colour. The reference cuts at radius 72 on 512 x 512 images (r_max = 362); the cutoff here is that
same FRACTION of r_max, so small images keep a non-empty high band (a fixed 72 gives NaN below
~150 px, the reference's online-partition bug).

A score depends on the LoRA file, the base model and the profiling settings, and costs one image
generation, so :func:`profile_loras` caches it under ``$LORACOMPOSE_HOME/frequency-profiles`` in a
file named by the LoRA file's sha256 and a key of the base model and settings, and reuses it on the
next call. Nothing is written beside the user's LoRA files (a read-only or shared LoRA folder works,
and a moved or copied LoRA keeps its profile).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from loracompose.errors import UserError
from loracompose.lora import LoadedLora, LoraSpec, inspect_lora
from loracompose.outputs import atomic_write_text, file_sha256
from loracompose.provenance import model_fingerprint

REFERENCE_CUTOFF_FRACTION = 72 / math.hypot(256, 256)  # radius 72 of r_max 362 at 512 x 512
CACHE_FOLDER = "frequency-profiles"  # under loracompose_home()
LOG_FLOOR = 1e-8
SCORER_VERSION = 1  # part of the cache key: bump when the score's definition changes


@dataclass(frozen=True)
class ProfileSettings:
    """How a LoRA is profiled: the generation that makes its image, and the spectrum cutoff."""

    prompt: str = ""  # the LoRA's trigger words are appended
    seed: int = 222
    steps: int = 20
    size: int | None = None  # None: the model's native size (512 on SD1.5, as in the paper)
    guidance_scale: float = 7.5
    lora_scale: float = 1.0
    cutoff_fraction: float = REFERENCE_CUTOFF_FRACTION

    def check(self) -> None:
        if self.steps < 1 or (self.size is not None and (self.size < 8 or self.size % 8)):
            raise UserError(
                f"frequency profiling: steps={self.steps}, size={self.size}: use steps >= 1 and a size divisible by 8"
            )
        if not 0.0 <= self.cutoff_fraction < 1.0:
            raise UserError(f"frequency profiling cutoff fraction {self.cutoff_fraction} must lie in [0, 1)")


# ------------------------------------------------------------------------------------ scoring


def radial_log_spectrum(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(radii, profile): the radially averaged log-magnitude spectrum of an image's luminance,
    normalised by its max, at every integer radius some pixel falls on.

    ``image`` is H x W (grey) or H x W x C (RGB, values in [0, 1]); a pixel belongs to the radius
    its distance from the spectrum centre rounds down to.
    """
    grey = np.asarray(image, dtype=np.float64)
    grey = grey.mean(axis=-1) if grey.ndim == 3 else grey
    if grey.ndim != 2 or min(grey.shape) < 2:
        raise UserError(f"frequency profiling needs a 2-D image of at least 2 x 2 pixels, got shape {np.shape(image)}")
    log_magnitude = np.log(np.abs(np.fft.fftshift(np.fft.fft2(grey))) + LOG_FLOOR)
    height, width = grey.shape
    rows, cols = np.indices(grey.shape)
    radius = np.hypot(rows - height // 2, cols - width // 2).astype(np.int64).ravel()
    sums = np.bincount(radius, weights=log_magnitude.ravel())
    counts = np.bincount(radius)
    radii = np.nonzero(counts)[0]  # a radius no pixel falls on would be 0/0
    profile = sums[radii] / counts[radii]
    peak = profile.max()
    # The peak is the (positive) DC term for any real image; a flat zero image has none.
    return radii, profile / peak if peak > 0 else profile / max(np.abs(profile).max(), LOG_FLOOR)


def high_frequency_score(image: np.ndarray, cutoff_fraction: float = REFERENCE_CUTOFF_FRACTION) -> float:
    """Mean of the normalised radial profile at radii >= ``cutoff_fraction`` of the largest radius
    (never empty: the largest radius itself always qualifies)."""
    radii, profile = radial_log_spectrum(image)
    return float(profile[radii >= cutoff_fraction * radii[-1]].mean())


# ------------------------------------------------------------------------------------ profiling


def profile_loras(
    pipe: Any, loras: Sequence[LoraSpec | LoadedLora], settings: ProfileSettings = ProfileSettings()
) -> dict[str, float]:
    """High-frequency score of each LoRA (adapter name -> score) on this pipeline's base model,
    read from the profile cache when it holds one for this LoRA file, model and settings."""
    settings.check()
    if settings.size is None:
        settings = replace(settings, size=pipe.native_size)
    model = model_fingerprint(pipe)
    return {lora.name: _profile_one(pipe, lora, model, settings) for lora in (_loaded(spec) for spec in loras)}


def _profile_one(pipe: Any, lora: LoadedLora, model: str, settings: ProfileSettings) -> float:
    lora_hash = file_sha256(lora.path)
    cached = cache_path(lora_hash, profile_key(model, settings))
    stored = _read_json(cached)
    if _finite(stored.get("score")):
        return float(stored["score"])
    score = high_frequency_score(profiling_image(pipe, lora, settings), settings.cutoff_fraction)
    entry = {"score": score, "lora_sha256": lora_hash, "model": model, "settings": asdict(settings),
             "scorer": SCORER_VERSION}
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cached, json.dumps(entry, indent=2, sort_keys=True) + "\n")
    except OSError:
        pass  # an unwritable cache only costs a re-profile next time
    return score


def profiling_image(pipe: Any, lora: LoadedLora, settings: ProfileSettings) -> np.ndarray:
    """The LoRA's profiling image: generated with that LoRA alone through the normal pipeline."""
    from loracompose.methods.merge import Merge

    spec = LoraSpec(lora.path, settings.lora_scale, lora.name, lora.trigger_words, lora.category)
    result = pipe.generate(
        settings.prompt, [spec], Merge(), seed=settings.seed, steps=settings.steps,
        guidance_scale=settings.guidance_scale, width=settings.size, height=settings.size, output_type="np",
        show_progress=False,
    )
    return np.asarray(result.images[0])


def _loaded(spec: LoraSpec | LoadedLora) -> LoadedLora:
    return spec if isinstance(spec, LoadedLora) else inspect_lora(spec)


# ------------------------------------------------------------------------------------ the cache


def cache_folder() -> Path:
    """Where profiles are cached: ``<loracompose_home()>/frequency-profiles``."""
    from loracompose.assets.embedded import loracompose_home

    return loracompose_home() / CACHE_FOLDER


def cache_path(lora_sha256: str, key: str) -> Path:
    """The cache file of one LoRA file's contents (its sha256) under one (model, settings) key."""
    return cache_folder() / f"{lora_sha256}-{key}.json"


def cached_profiles(lora_file: Path) -> list[dict[str, Any]]:
    """Every cached profile of this LoRA file's contents (any model and settings), in key order."""
    files = sorted(cache_folder().glob(f"{file_sha256(lora_file)}-*.json"))
    return [entry for entry in map(_read_json, files) if entry]


def _read_json(path: Path) -> dict[str, Any]:
    """A cache file's contents ({} when missing or unreadable: it is only a cache)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def profile_key(model: str, settings: ProfileSettings) -> str:
    """Cache key of a (base model, profiling settings) pair."""
    text = json.dumps({"model": model, "settings": asdict(settings), "scorer": SCORER_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
