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
generation, so :func:`profile_loras` stores it in a JSON sidecar beside the LoRA file
(``<file>.loracompose.json``) keyed by all three, and reuses it on the next call.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from loracompose.errors import UserError
from loracompose.lora import LoadedLora, LoraSpec, inspect_lora
from loracompose.outputs import atomic_write_text, file_sha256

REFERENCE_CUTOFF_FRACTION = 72 / math.hypot(256, 256)  # radius 72 of r_max 362 at 512 x 512
SIDECAR_SUFFIX = ".loracompose.json"
SIDECAR_SECTION = "frequency_profiles"
LOG_FLOOR = 1e-8
SCORER_VERSION = 1  # part of the sidecar key: bump when the score's definition changes


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
    read from the LoRA's sidecar when it holds one for this model and these settings."""
    settings.check()
    if settings.size is None:
        settings = replace(settings, size=pipe.native_size)
    model = model_fingerprint(pipe)
    return {lora.name: _profile_one(pipe, lora, model, settings) for lora in (_loaded(spec) for spec in loras)}


def _profile_one(pipe: Any, lora: LoadedLora, model: str, settings: ProfileSettings) -> float:
    key = profile_key(model, settings)
    lora_hash = file_sha256(lora.path)
    stored = _profiles(read_sidecar(lora.path)).get(key)
    if isinstance(stored, dict) and stored.get("lora_sha256") == lora_hash and _finite(stored.get("score")):
        return float(stored["score"])
    score = high_frequency_score(profiling_image(pipe, lora, settings), settings.cutoff_fraction)
    _store(lora.path, key, {"score": score, "lora_sha256": lora_hash, "model": model, "settings": asdict(settings)})
    return score


def profiling_image(pipe: Any, lora: LoadedLora, settings: ProfileSettings) -> np.ndarray:
    """The LoRA's profiling image: generated with that LoRA alone through the normal pipeline."""
    from loracompose.methods.merge import Merge

    spec = LoraSpec(lora.path, settings.lora_scale, lora.name, lora.trigger_words, lora.category)
    result = pipe.generate(
        settings.prompt, [spec], Merge(), seed=settings.seed, steps=settings.steps, guidance_scale=settings.guidance_scale,
        width=settings.size, height=settings.size, output_type="np", show_progress=False,
    )
    return np.asarray(result.images[0])


def _loaded(spec: LoraSpec | LoadedLora) -> LoadedLora:
    return spec if isinstance(spec, LoadedLora) else inspect_lora(spec)


# ------------------------------------------------------------------------------------ sidecar


def sidecar_path(lora_file: Path) -> Path:
    return Path(lora_file).with_name(Path(lora_file).name + SIDECAR_SUFFIX)


def read_sidecar(lora_file: Path) -> dict[str, Any]:
    """The LoRA's sidecar contents ({} when missing or unreadable: it is only a cache)."""
    try:
        data = json.loads(sidecar_path(lora_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _profiles(sidecar: dict[str, Any]) -> dict[str, Any]:
    section = sidecar.get(SIDECAR_SECTION)
    return section if isinstance(section, dict) else {}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _store(lora_file: Path, key: str, entry: dict[str, Any]) -> None:
    data = read_sidecar(lora_file)
    data[SIDECAR_SECTION] = {**_profiles(data), key: entry}
    try:
        atomic_write_text(sidecar_path(lora_file), json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only LoRA folder only costs a re-profile next time


def profile_key(model: str, settings: ProfileSettings) -> str:
    """Sidecar key of a (base model, profiling settings) pair."""
    text = json.dumps({"model": model, "settings": asdict(settings), "scorer": SCORER_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fingerprint(pipe: Any) -> str:
    """Identity of the pipeline's base model: a hash of its class and a sample of its UNet, VAE and
    text encoder weights (the start of the first and last base parameter of each), so a moved
    folder keeps its profiles and a different checkpoint at the same path does not."""
    digest = hashlib.sha256(type(pipe).__name__.encode())
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        # LoRA parameters come and go with loaded adapters; only the base weights identify the model.
        parameters = [p for n, p in module.named_parameters() if "lora_" not in n]
        for parameter in (parameters[0], parameters[-1]):
            digest.update(name.encode())
            digest.update(_tensor_bytes(parameter))
    return digest.hexdigest()[:16]


def _tensor_bytes(tensor: torch.Tensor, sample: int = 4096) -> bytes:
    """Shape and first ``sample`` values (a text encoder's first parameter alone holds ~40 M)."""
    values = tensor.detach().reshape(-1)[:sample].to("cpu", torch.float32).numpy().tobytes()
    return str(tuple(tensor.shape)).encode() + values


