"""Every composition method takes every loaded format (LoHa, LoKr, DoRA become exact LoRA layers), and a
generation with a converted file equals the base model with the hand-computed delta added to its weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lora_files import kohya_lora, lokr, loha, write

from loracompose import LoraSpec, load_pipeline
from loracompose.methods import METHODS, Merge

PROMPT = "a photo, trgloha, trglokr, trgdora"


@pytest.fixture(scope="module")
def format_files(sd15, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    folder = tmp_path_factory.mktemp("format-files")
    built = {"loha": loha(sd15, "sd15", seed=5), "lokr": lokr(sd15, "sd15", seed=8, style="w2-decomposed"),
             "dora": kohya_lora(sd15, "sd15", seed=12, conv=True, dora="out")}
    return {name: (write(folder / f"{name}.safetensors", tensors, {"modelspec.trigger_phrase": f"trg{name}"}), deltas)
            for name, (tensors, deltas) in built.items()}


def _image(pipe, loras, method, **extra) -> np.ndarray:
    result = pipe.generate(PROMPT, loras, method, steps=2, seed=0, output_type="np", append_triggers=False, **extra)
    return np.asarray(result.images)


@pytest.mark.parametrize("name", ["loha", "lokr", "dora"])
def test_merge_equals_base_model_with_hand_delta(sd15, tiny_sd15_dir, format_files, name):
    path, deltas = format_files[name]
    ours = _image(sd15, [LoraSpec(path)], Merge())
    patched = load_pipeline(tiny_sd15_dir)
    with torch.no_grad():
        for (component, module), delta in deltas.items():
            getattr(patched, component).get_submodule(module).weight += delta
    reference = _image(patched, [], Merge())
    np.testing.assert_allclose(ours, reference, atol=2e-4, rtol=0)
    assert np.abs(ours - _image(sd15, [], Merge())).max() > 1e-2, "the file changes the image"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_accepts_every_format(sd15, format_files, method):
    loras = [LoraSpec(path, weight=0.8) for path, _ in format_files.values()]
    image = _image(sd15, loras, METHODS[method]())
    assert np.isfinite(image).all()
    assert np.abs(image - _image(sd15, [], Merge())).max() > 1e-3, "the LoRAs change the image"
