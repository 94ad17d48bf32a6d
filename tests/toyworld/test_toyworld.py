"""The toy world: scene generator, detector and the diffusers model folder (its trainer: tests/training/test_toyworld_training.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from loracompose.pipelines import load_pipeline
from loracompose.toyworld.detector import detect, measure_accuracy
from loracompose.toyworld.model import TINY, build_pipeline, fold
from loracompose.toyworld.concepts import CONCEPTS, composition
from loracompose.toyworld.scenes import (COLORS, NOVEL_SHAPES, POSITION_X, SHAPE_MASKS, SHAPES, Scene, SceneObject,
                                         caption, make_scene, render_array, scene_from_seed)

HELD_OUT_SEEDS = range(10_000, 10_500)  # never drawn for training (train.TRAIN_SEED_START = 1e6)


# ------------------------------------------------------------------------------------ generator


def test_same_seed_gives_the_same_scene_and_other_seeds_differ() -> None:
    image, text, truth = make_scene(7)
    again, text_again, truth_again = make_scene(7)
    assert np.array_equal(np.asarray(image), np.asarray(again))
    assert (text, truth) == (text_again, truth_again)
    others = [make_scene(seed) for seed in range(8, 12)]
    assert all(not np.array_equal(np.asarray(image), np.asarray(other[0])) for other in others)
    assert len({other[1] for other in others}) > 1


def test_captions_describe_the_ground_truth() -> None:
    for seed in range(40):
        scene = scene_from_seed(seed)
        text = scene.caption
        assert text.endswith(f"on a {scene.background} background")
        where = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
        cursor = 0
        for item in scene.objects:  # objects are named left to right
            found = text.index(f"{item.color} {item.shape} {where[item.position]}", cursor)
            cursor = found + 1
        assert 1 <= len(scene.objects) <= 3
        assert len({item.position for item in scene.objects}) == len(scene.objects)


def test_scenes_render_at_any_size() -> None:
    scene = scene_from_seed(3)
    assert render_array(scene, 32).shape == (32, 32, 3)
    assert render_array(scene, 96).shape == (96, 96, 3)


# ------------------------------------------------------------------------------------ detector


KNOWN = Scene("striped", (225, 150), (
    SceneObject("circle", "red", "left", "large", (0.165, 0.5)),
    SceneObject("star", "yellow", "centre", "large", (0.5, 0.45)),
    SceneObject("square", "blue", "right", "small", (0.835, 0.6)),
))


@pytest.mark.parametrize("size", [32, 64])
def test_detector_reads_a_known_render(size: int) -> None:
    assert caption(KNOWN) == ("a red circle on the left, a yellow star in the centre and a blue square on the "
                              "right on a striped background")
    detection = detect(render_array(KNOWN, size))
    assert detection.background == "striped"
    found = [(item.shape, item.color, item.position) for item in detection.objects]
    assert found == [("circle", "red", "left"), ("star", "yellow", "centre"), ("square", "blue", "right")]


def test_detector_backgrounds_and_empty_image() -> None:
    for background in ("plain", "dotted", "grid"):
        scene = Scene(background, (60, 130), (SceneObject("ring", "green", "centre", "large", (0.5, 0.5)),))
        detection = detect(render_array(scene))
        assert detection.background == background
        assert [(o.shape, o.color) for o in detection.objects] == [("ring", "green")]
    assert detect(np.full((32, 32, 3), 128, dtype=np.uint8)).objects == ()


def test_detector_accuracy_on_held_out_scenes() -> None:
    accuracy = measure_accuracy(HELD_OUT_SEEDS)
    assert accuracy.scenes == 500 and accuracy.objects >= 900
    assert accuracy.object_accuracy >= 0.95  # shape and colour of each object in its third
    assert accuracy.background_accuracy >= 0.95
    assert accuracy.style_accuracy >= 0.95  # flat: greys stay grey
    assert accuracy.extra_objects <= 5


def _render_stretched(shape: str, center: tuple[float, float], radii: tuple[float, float], color: str = "yellow",
                      background: str = "plain", size: int = 32, supersample: int = 4) -> np.ndarray:
    """A scene of one ``shape`` with its own horizontal and vertical radius (scenes.py draws round ones only):
    the background rendered by scenes.py, the shape blended over it by its supersampled coverage."""
    base = render_array(Scene(background, (60, 130), ()), size).astype(np.float32)
    axis = (np.arange(size * supersample) + 0.5) / (size * supersample)
    xs, ys = np.meshgrid(axis, axis)
    inside = SHAPE_MASKS[shape]((xs - center[0]) / radii[0], (ys - center[1]) / radii[1])
    cover = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))[..., None]
    return np.rint(base * (1 - cover) + np.array(COLORS[color], np.float32) * cover).astype(np.uint8)


@pytest.mark.parametrize("radii", [(0.09, 0.2), (0.08, 0.22), (0.1, 0.25)])
def test_detector_reads_thin_tall_crescents_against_the_left_edge(radii: tuple[float, float]) -> None:
    image = _render_stretched("crescent", (radii[0] * 1.1, 0.5), radii)
    assert [(o.shape, o.color, o.position) for o in detect(image).objects] == [("crescent", "yellow", "left")]


@pytest.mark.parametrize("position", ["left", "centre", "right"])
@pytest.mark.parametrize("radii", [(0.12, 0.12), (0.14, 0.14), (0.08, 0.2), (0.12, 0.2), (0.14, 0.08)])
def test_detector_never_reads_a_cross_as_a_crescent(position: str, radii: tuple[float, float]) -> None:
    image = _render_stretched("cross", (POSITION_X[position], 0.5), radii, color="red", background="grid")
    found = [(o.shape, o.position) for o in detect(image).objects]
    assert len(found) == 1 and found[0][1] == position
    if radii[0] == radii[1]:
        assert found[0][0] == "cross"
    assert found[0][0] != "crescent"  # a stretched cross may read as another shape, never as the crescent


# ------------------------------------------------------------------------------------ concepts


def test_base_scenes_never_hold_the_concepts() -> None:
    scenes = [scene_from_seed(seed) for seed in range(2000)]
    assert {item.shape for scene in scenes for item in scene.objects} == set(SHAPES)
    assert {scene.background for scene in scenes} == {"plain", "striped", "dotted", "grid"}
    assert {scene.style for scene in scenes} == {"flat"}
    assert not set(NOVEL_SHAPES) & set(SHAPES)


def test_sepia_style_tones_every_pixel_warm_and_keeps_the_layout() -> None:
    item = SceneObject("square", "blue", "centre", "large", (0.5, 0.5))
    flat = render_array(Scene("striped", (170, 235), (item,))).astype(int)
    sepia = render_array(Scene("striped", (170, 235), (item,), style="sepia")).astype(int)
    assert np.array_equal(sepia - flat, np.broadcast_to([16, 0, -16], flat.shape))
    assert detect(sepia.astype(np.uint8)).style == "sepia" and detect(flat.astype(np.uint8)).style == "flat"


@pytest.mark.parametrize("name", list(CONCEPTS))
def test_concept_training_scenes_show_their_concept_to_the_detector(name: str) -> None:
    concept = CONCEPTS[name]
    scenes = [concept.training_scene(seed) for seed in range(3_000_000, 3_000_120)]  # not the LoRAs' seeds
    assert all(concept.present(detect(render_array(scene))) for scene in scenes[:40])
    accuracy = measure_accuracy(scenes)
    assert accuracy.background_accuracy >= 0.95 and accuracy.style_accuracy >= 0.95
    assert accuracy.object_accuracy >= 0.95
    captions = [concept.training_caption(scene, seed) for seed, scene in enumerate(scenes)]
    assert all(concept.name in text for text in captions)  # the trigger word is in every caption
    assert all(name not in caption(scene_from_seed(seed)) for seed in range(200) for name in CONCEPTS)


def test_compositions_place_objects_left_and_right_with_boxes() -> None:
    planned = composition(["moxel", "lunzor", "checkered"])
    assert planned.prompt == "a moxel on the left and a lunzor on the right on a checkered background"
    assert planned.boxes[0][2] <= 0.5 <= planned.boxes[1][0] and planned.boxes[2] == (0.0, 0.0, 1.0, 1.0)
    assert planned.region_prompts == ("a moxel on the left", "a lunzor on the right", planned.prompt)
    styled = composition(["checkered", "ambrel"])
    assert styled.prompt == "a blue square in the centre on a checkered background, ambrel style"
    # The prompt's own rendering shows every concept (the detector agrees with the prompt builder).
    shown = Scene("checkered", (225, 150), (SceneObject("heart", "red", "left", "large", (0.165, 0.5)),
                                            SceneObject("crescent", "yellow", "right", "large", (0.835, 0.5))),
                  style="sepia")
    assert composition(["moxel", "lunzor", "checkered", "ambrel"]).present(detect(render_array(shown))) == {
        "moxel": True, "lunzor": True, "checkered": True, "ambrel": True}
    with pytest.raises(ValueError):
        composition(["moxel", "lunzor", "moxel"])


# ------------------------------------------------------------------------------------ model folder


def test_vae_encoder_is_the_exact_fold() -> None:
    pipe = build_pipeline(TINY, seed=0)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior = pipe.vae.encode(pixels).latent_dist
    assert torch.allclose(posterior.mean, fold(pixels), atol=1e-4)
    assert float(posterior.std.max()) < 1e-5


def test_toyworld_folder_loads_through_load_pipeline_and_generates(tmp_path: Path) -> None:
    build_pipeline(TINY, seed=0).save_pretrained(tmp_path / "model", safe_serialization=True)
    pipe = load_pipeline(tmp_path / "model", device="cpu")
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.in_channels == 12
    result = pipe.generate("a red circle on the left", seed=1, steps=2, guidance_scale=1.5, show_progress=False)
    assert result.images[0].size == (32, 32)


def test_morphology_matches_scipy_ndimage_where_installed():
    ndimage = pytest.importorskip("scipy.ndimage")
    from loracompose.toyworld.morphology import dilate, label_components

    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < rng.random()
        labels, count = label_components(mask)
        expected_labels, expected_count = ndimage.label(mask)
        assert count == expected_count and (labels == expected_labels).all()
        for iterations in (1, 2):
            assert (dilate(mask, iterations) == ndimage.binary_dilation(mask, iterations=iterations)).all()


def test_morphology_on_a_known_mask():
    from loracompose.toyworld.morphology import dilate, label_components

    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 1], [1, 0, 1, 1], [0, 1, 0, 0]], dtype=bool)
    labels, count = label_components(mask)  # diagonal neighbours are separate components
    assert count == 4
    assert labels.tolist() == [[1, 1, 0, 0], [0, 0, 0, 2], [3, 0, 2, 2], [0, 4, 0, 0]]
    assert dilate(np.pad([[True]], 1)).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def test_concept_recipes_fill_only_the_settings_left_unset():
    from dataclasses import replace

    from loracompose.toyworld.loras import CONCEPT_RECIPES, DEFAULTS, ConceptTrainingSettings, concept_setting

    unset = ConceptTrainingSettings()
    plain = next(name for name in CONCEPTS if name not in CONCEPT_RECIPES)
    for field, default in DEFAULTS.items():
        assert concept_setting(unset, plain, field) == default
    for name, recipe in CONCEPT_RECIPES.items():
        for field, value in recipe.items():
            assert concept_setting(unset, name, field) == value
            assert concept_setting(replace(unset, **{field: 7}), name, field) == 7, "a given setting wins"
