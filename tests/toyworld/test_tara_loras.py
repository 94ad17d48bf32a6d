"""The toy world's TARA LoRA recipe (loracompose.toyworld.tara_loras) on a tiny toy model (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loracompose import LoraSpec, UserError
from loracompose.lora import inspect_lora
from loracompose.methods.tara import TARA_CLASS_KEY, TARA_TOKEN_KEY
from loracompose.toyworld.concepts import CONCEPTS
from loracompose.toyworld.model import TINY, build_pipeline
from loracompose.toyworld.tara_loras import TaraLoraSettings, train_tara_loras, write_prior_images


def test_prior_images_are_seeded_scenes_without_concepts(tmp_path: Path) -> None:
    first, second = write_prior_images(tmp_path / "a", 6), write_prior_images(tmp_path / "b", 6)
    captions = [path.read_text() for path in sorted(first.glob("*.txt"))]
    assert len(captions) == 6 and len(list(first.glob("*.png"))) == 6
    assert captions == [path.read_text() for path in sorted(second.glob("*.txt"))]
    assert (first / "0003.png").read_bytes() == (second / "0003.png").read_bytes()
    assert not [text for text in captions for name in CONCEPTS if name in text]


def test_recipe_writes_tara_loras_with_their_prior_images(tmp_path: Path) -> None:
    build_pipeline(TINY, seed=0).save_pretrained(tmp_path / "toyworld", safe_serialization=True)
    settings = TaraLoraSettings(images=4, prior_images=3, steps=2, batch_size=2, show_progress=False)
    results = train_tara_loras(tmp_path / "toyworld", tmp_path / "loras", ["lunzor"], settings, tmp_path / "work")
    assert [result.path.name for result in results] == ["lunzor-tara.safetensors"]
    lora = inspect_lora(LoraSpec(results[0].path))
    assert (lora.metadata[TARA_TOKEN_KEY], lora.metadata[TARA_CLASS_KEY]) == ("lunzor", "circle")
    recipe = json.loads(lora.metadata["loracompose.training"])
    assert (recipe["images"], recipe["prior_images"], recipe["model"]["name"]) == (7, 3, "toyworld")
    with pytest.raises(UserError, match="object concepts"):
        train_tara_loras(tmp_path / "toyworld", tmp_path / "loras", ["checkered"], settings, tmp_path / "work")
