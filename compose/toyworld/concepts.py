"""The toy world's concept LoRAs: what each teaches, its training scenes, and how to check it.

Four concepts the base model never saw, one per kind a user composes:

    moxel      object      a red heart, named by the rare word "moxel"
    lunzor     object      a yellow crescent, named by the rare word "lunzor"
    checkered  background  a checkerboard background ("on a checkered background")
    ambrel     style       sepia toning: the whole image warmer (", ambrel style")

Each concept's training scenes are ordinary toy-world scenes with the concept in them (objects of
the base world around it, so a LoRA keeps them), captioned the way the base model was trained.
A concept is present in an image when the detector sees it (:meth:`Concept.present`).
Composition prompts put object concepts on the left and right thirds, in the order given, so
LoRA-Composer boxes follow from the prompt (:func:`composition`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from .detector import Detection
from .scenes import (BACKGROUND_TONES, BACKGROUNDS, POSITION_X, SHAPE_WORDS, Scene, SceneObject, caption,
                     object_phrase, scene_from_seed)

OBJECT, BACKGROUND, STYLE = "object", "background", "style"
GLYPH_COLORS = {"heart": "red", "crescent": "yellow"}


@dataclass(frozen=True)
class Concept:
    """One concept LoRA of the toy world."""

    name: str  # the LoRA's file stem and its trigger word
    kind: str  # object, background or style
    value: str  # the shape, background or style it adds
    description: str

    @property
    def trigger_words(self) -> tuple[str, ...]:
        return (self.name,)

    def present(self, detection: Detection) -> bool:
        """Whether the detector sees this concept in an image."""
        if self.kind == OBJECT:
            return detection.has(shape=self.value)
        if self.kind == BACKGROUND:
            return detection.background == self.value
        return detection.style == self.value

    def training_scene(self, seed: int) -> Scene:
        """A base-world scene of ``seed`` changed to show this concept."""
        scene = scene_from_seed(seed, max_objects=2)
        if self.kind == BACKGROUND:
            return replace(scene, background=self.value)
        if self.kind == STYLE:
            return replace(scene, style=self.value)
        rng = np.random.default_rng([seed, 0xC0])
        index = int(rng.integers(len(scene.objects)))
        objects = list(scene.objects)
        objects[index] = replace(objects[index], shape=self.value, color=GLYPH_COLORS[self.value])
        return replace(scene, objects=tuple(objects))

    def training_caption(self, scene: Scene, seed: int) -> str:
        """The scene's caption with details dropped at random; the concept's own words always stay."""
        rng = np.random.default_rng([seed, 0xCA])
        return caption(scene, with_position=bool(rng.random() < 0.7),
                       with_background=self.kind == BACKGROUND or bool(rng.random() < 0.6))


CONCEPTS: dict[str, Concept] = {concept.name: concept for concept in (
    Concept("moxel", OBJECT, "heart", "a red heart"),
    Concept("lunzor", OBJECT, "crescent", "a yellow crescent"),
    Concept("checkered", BACKGROUND, "checkered", "a checkerboard background"),
    Concept("ambrel", STYLE, "sepia", "sepia style: the whole image toned warm"),
)}
assert all(SHAPE_WORDS[concept.value] == concept.name for concept in CONCEPTS.values() if concept.kind == OBJECT)

# The base-world object a composition without object concepts shows (so a style has something to draw).
FILLER_OBJECT = SceneObject("square", "blue", "centre", "large", (0.5, 0.5))
OBJECT_SLOTS = ("left", "right")
# LoRA-Composer boxes (relative x0, y0, x1, y1): an object's third, or the whole image.
SLOT_BOXES = {"left": (0.0, 0.15, 0.4, 0.85), "right": (0.6, 0.15, 1.0, 0.85)}
WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class Composition:
    """A prompt that asks for several concepts, and a box and region prompt per concept (in the
    given order): an object's own phrase ("a moxel on the left"), the whole prompt for a background
    or style (its box is the whole image). The toy text encoder only saw whole captions, so a bare
    trigger word as a region prompt is out of its distribution."""

    concepts: tuple[Concept, ...]
    prompt: str
    boxes: tuple[tuple[float, float, float, float], ...]
    region_prompts: tuple[str, ...]

    def present(self, detection: Detection) -> dict[str, bool]:
        return {concept.name: concept.present(detection) for concept in self.concepts}


def composition(names: Sequence[str]) -> Composition:
    """The prompt and boxes for composing the named concepts, e.g. ("moxel", "checkered") ->
    "a moxel on the left on a checkered background"."""
    concepts = tuple(CONCEPTS[name] for name in names)
    objects = [concept for concept in concepts if concept.kind == OBJECT]
    if len(objects) > len(OBJECT_SLOTS):
        raise ValueError(f"at most {len(OBJECT_SLOTS)} object concepts fit one composition")
    placed = tuple(SceneObject(concept.value, GLYPH_COLORS[concept.value], slot, "large", (POSITION_X[slot], 0.5))
                   for concept, slot in zip(objects, OBJECT_SLOTS)) or (FILLER_OBJECT,)
    background = next((concept.value for concept in concepts if concept.kind == BACKGROUND), BACKGROUNDS[0])
    style = next((concept.value for concept in concepts if concept.kind == STYLE), "flat")
    scene = Scene(background, BACKGROUND_TONES[0], placed, style=style)
    text = caption(scene, with_background=background != BACKGROUNDS[0])
    placed_by_name = dict(zip((concept.name for concept in objects), placed))
    boxes = tuple(SLOT_BOXES[placed_by_name[c.name].position] if c.kind == OBJECT else WHOLE_IMAGE for c in concepts)
    region_prompts = tuple(object_phrase(placed_by_name[c.name]) if c.kind == OBJECT else text for c in concepts)
    return Composition(concepts, text, boxes, region_prompts)
