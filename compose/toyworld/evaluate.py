"""Judge a toy-world model's samples with the detector (the issue's acceptance numbers).

* single-object prompts ("a red circle"), every shape x colour, a few seeds each: colour right and
  shape right, judged on the largest detected object;
* two-object prompts ("a red circle on the left and a blue square on the right"): both objects
  present (shape and colour, anywhere in the image);
* each concept LoRA alone, prompted with its trigger word: its concept present; the same prompt on
  the base model without the LoRA as the baseline (the base never learnt the concept).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .detector import detect
from .scenes import COLORS, SHAPES, SceneObject, object_phrase


@dataclass(frozen=True)
class SampleEvaluation:
    """Rates over the judged samples at one guidance scale."""

    guidance_scale: float
    single_samples: int
    color_right: float
    shape_right: float
    both_right: float
    pair_samples: int
    pair_both_present: float


def single_object_prompts() -> list[tuple[str, str, str]]:
    """(shape, colour, prompt) for every shape-colour pair, e.g. ("circle", "red", "a red circle")."""
    return [(shape, color, object_phrase(SceneObject(shape, color, "centre", "large", (0.5, 0.5)), with_position=False))
            for shape, color in itertools.product(SHAPES, COLORS)]


def two_object_prompts(count: int, seed: int = 0) -> list[tuple[SceneObject, SceneObject, str]]:
    """``count`` random left/right pairs of distinct (shape, colour) objects with their prompt."""
    rng = np.random.default_rng([seed, 0x2B])
    pairs: list[tuple[SceneObject, SceneObject, str]] = []
    while len(pairs) < count:
        left, right = (SceneObject(SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))],
                                   where, "large", (0.0, 0.0)) for where in ("left", "right"))
        if (left.shape, left.color) != (right.shape, right.color):
            pairs.append((left, right, f"{object_phrase(left)} and {object_phrase(right)}"))
    return pairs


def evaluate_samples(pipe: Any, guidance_scale: float, *, seeds: int = 4, pairs: int = 24, steps: int = 20,
                     single_prompts: Sequence[tuple[str, str, str]] | None = None) -> SampleEvaluation:
    """Generate with ``pipe`` (a loaded toy-world pipeline) and score the images with the detector."""
    singles = single_prompts if single_prompts is not None else single_object_prompts()
    color = shape = both = total = 0
    for wanted_shape, wanted_color, prompt in singles:
        for image in _images(pipe, prompt, guidance_scale, seeds, steps):
            largest = detect(image).largest
            color += largest is not None and largest.color == wanted_color
            shape += largest is not None and largest.shape == wanted_shape
            both += largest is not None and (largest.shape, largest.color) == (wanted_shape, wanted_color)
            total += 1
    present = pair_total = 0
    for left, right, prompt in two_object_prompts(pairs):
        for image in _images(pipe, prompt, guidance_scale, 1, steps):
            detection = detect(image)
            present += detection.has(left.shape, left.color) and detection.has(right.shape, right.color)
            pair_total += 1
    return SampleEvaluation(guidance_scale, total, _rate(color, total), _rate(shape, total), _rate(both, total),
                            pair_total, _rate(present, pair_total))


def _rate(hits: int, count: int) -> float:
    return hits / max(count, 1)


def _images(pipe: Any, prompt: str, guidance_scale: float, count: int, steps: int, loras: Sequence[Any] = ()) -> list:
    """``count`` samples of ``prompt`` (seeded from 0), with ``loras`` merged; the prompt is used as given."""
    result = pipe.generate(prompt, list(loras), seed=0, num_images=count, steps=steps, guidance_scale=guidance_scale,
                           append_triggers=False, show_progress=False)
    return result.images


def evaluate_model(model_dir: str | Path, guidance_scales: Sequence[float] = (1.5, 2.5), **options: Any
                   ) -> list[SampleEvaluation]:
    """Load a toy-world diffusers folder and evaluate it at each guidance scale."""
    from loracompose.pipelines import load_pipeline

    pipe = load_pipeline(model_dir, device="cpu", dtype="fp32")
    return [evaluate_samples(pipe, scale, **options) for scale in guidance_scales]


@dataclass(frozen=True)
class ConceptEvaluation:
    """One concept LoRA alone: presence with the LoRA and, as a baseline, without it (same prompt)."""

    concept: str
    prompt: str
    samples: int
    present_with_lora: float
    present_without_lora: float


def evaluate_concept_loras(pipe: Any, lora_dir: str | Path, guidance_scale: float, *, seeds: int = 8,
                           steps: int = 20, names: Sequence[str] | None = None) -> list[ConceptEvaluation]:
    """Each concept LoRA of ``lora_dir`` (``NAME.safetensors``) alone on its own composition prompt."""
    from loracompose.lora import LoraSpec

    from .concepts import CONCEPTS, composition

    rows = []
    for name in names or list(CONCEPTS):
        concept, prompt = CONCEPTS[name], composition([name]).prompt
        spec = LoraSpec(Path(lora_dir) / f"{name}.safetensors")
        with_lora = _images(pipe, prompt, guidance_scale, seeds, steps, loras=[spec])
        without = _images(pipe, prompt, guidance_scale, seeds, steps)
        rows.append(ConceptEvaluation(name, prompt, seeds, _presence(concept, with_lora), _presence(concept, without)))
    return rows


def _presence(concept: Any, images: Sequence[Any]) -> float:
    return _rate(sum(concept.present(detect(image)) for image in images), len(images))
