"""The offline tiny models, LoRA files and embedded default behave like the real thing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from loracompose.assets import embedded
from loracompose.assets.embedded import embedded_default
from loracompose.assets.tiny import (
    build_clip_tokenizer,
    build_tiny_lora,
    build_tiny_sd15,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
    write_kohya_lora,
)

PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
# Reloaded SDXL differs by ~2e-6: safetensors hands text_encoder_2.text_projection a weight buffer
# that is not 64-byte aligned, which moves the pooled embedding by one float32 ulp (2.4e-7).
RELOAD_ATOL = {"sd15": 1e-6, "sdxl": 1e-5}
TOKENIZER_SAMPLES = [
    "a photo of a cat",
    "zkx character wearing a red cloak, inkwash style",
    "<lora:x:0.5> (red cloak:1.2), [inkwash]",
    "Ünïcödé café 東京 😀 don't   stop",
    "word " * 100,
]


def generate(pipe: DiffusionPipeline, prompt: str = "zkx qwv a cat", steps: int = 2) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    result = pipe(prompt, num_inference_steps=steps, height=64, width=64, generator=generator, output_type="np")
    return result.images[0]


def load(kind: str, model_dir: Path) -> DiffusionPipeline:
    pipe = PIPELINES[kind].from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.mark.parametrize("text", TOKENIZER_SAMPLES)
def test_tokenizer_ids_equal_open_clip(tmp_path: Path, open_clip_tokenizer, text: str) -> None:
    tokenizer = build_clip_tokenizer(tmp_path)
    ids = tokenizer(text, truncation=True, max_length=77).input_ids
    reference = open_clip_tokenizer([text])[0].tolist()
    assert ids == reference[: len(ids)]
    assert set(reference[len(ids) :]) <= {0}


def test_saved_tokenizers_have_clip_special_ids(tiny_sd15_dir: Path, tiny_sdxl_dir: Path) -> None:
    sd15 = CLIPTokenizer.from_pretrained(tiny_sd15_dir / "tokenizer")
    sdxl_second = CLIPTokenizer.from_pretrained(tiny_sdxl_dir / "tokenizer_2")
    assert (sd15.pad_token_id, sd15.bos_token_id, sd15.eos_token_id) == (49407, 49406, 49407)
    assert sd15.model_max_length == 77 and len(sd15) == 49408
    assert sdxl_second.pad_token_id == 0
    assert sdxl_second("a cat", padding="max_length").input_ids[-1] == 0


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_saved_model_reproduces_the_in_memory_image(kind: str, tmp_path: Path) -> None:
    build = tiny_sd15_pipeline if kind == "sd15" else tiny_sdxl_pipeline
    in_memory = build(seed=0)
    before = generate(in_memory)
    in_memory.save_pretrained(tmp_path / kind, safe_serialization=True)
    after = generate(load(kind, tmp_path / kind))
    assert before.shape == (64, 64, 3)
    np.testing.assert_allclose(after, before, atol=RELOAD_ATOL[kind], rtol=0)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_built_model_is_deterministic_in_seed(kind: str, request: pytest.FixtureRequest) -> None:
    build = tiny_sd15_pipeline if kind == "sd15" else tiny_sdxl_pipeline
    saved = generate(load(kind, request.getfixturevalue(f"tiny_{kind}_dir")))
    np.testing.assert_allclose(generate(build(seed=0)), saved, atol=RELOAD_ATOL[kind], rtol=0)
    assert np.abs(generate(build(seed=1)) - saved).max() > 1e-2


def test_build_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_sd15(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("kind", "architecture", "base_version"),
    [("sd15", "stable-diffusion-v1/lora", "sd_v1"), ("sdxl", "stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0")],
)
def test_lora_metadata_round_trips(kind: str, architecture: str, base_version: str, request) -> None:
    character, style = request.getfixturevalue(f"{kind}_lora_files")
    with safe_open(character, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.trigger_phrase"] == "zkx"
    assert metadata["modelspec.title"] == "character"
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["ss_base_model_version"] == base_version
    assert metadata["loracompose.category"] == "character"
    assert (metadata["loracompose.rank"], metadata["loracompose.alpha"]) == ("4", "4")
    with safe_open(style, "pt") as handle:
        assert handle.metadata()["modelspec.trigger_phrase"] == "qwv"


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_lora_weight_one_changes_and_zero_keeps_the_image(kind: str, request: pytest.FixtureRequest) -> None:
    pipe = load(kind, request.getfixturevalue(f"tiny_{kind}_dir"))
    base = generate(pipe)
    pipe.load_lora_weights(request.getfixturevalue(f"{kind}_lora_files")[0], adapter_name="x")
    expected_components = {"unet", "text_encoder"} | ({"text_encoder_2"} if kind == "sdxl" else set())
    assert set(pipe.get_list_adapters()) == expected_components
    pipe.set_adapters(["x"], [1.0])
    assert np.abs(generate(pipe) - base).mean() > 1e-2
    pipe.set_adapters(["x"], [0.0])
    np.testing.assert_allclose(generate(pipe), base, atol=1e-6, rtol=0)


def test_different_seeds_give_different_loras(sd15_lora_files: list[Path]) -> None:
    first, second = (load_file(path) for path in sd15_lora_files)
    assert first.keys() == second.keys()
    assert all(not torch.equal(first[key], second[key]) for key in first)


def test_lora_alpha_is_honoured_on_load(tiny_sd15_dir: Path, tmp_path: Path) -> None:
    plain = build_tiny_lora(tiny_sd15_dir, tmp_path / "plain.safetensors", seed=7, rank=4)
    doubled = build_tiny_lora(tiny_sd15_dir, tmp_path / "doubled.safetensors", seed=7, rank=4, alpha=8)
    pipe = load("sd15", tiny_sd15_dir)
    pipe.load_lora_weights(plain, adapter_name="plain")
    pipe.load_lora_weights(doubled, adapter_name="doubled")
    pipe.set_adapters(["plain"], [2.0])
    plain_twice = generate(pipe)
    pipe.set_adapters(["doubled"], [1.0])
    np.testing.assert_allclose(generate(pipe), plain_twice, atol=1e-5, rtol=0)


def test_unet_only_lora_has_no_text_encoder_keys(tiny_sd15_dir: Path, tmp_path: Path) -> None:
    path = build_tiny_lora(tiny_sd15_dir, tmp_path / "unet.safetensors", seed=3, text_encoder=False)
    keys = load_file(path).keys()
    assert keys and all(key.startswith("unet.") for key in keys)


def test_kohya_file_loads_to_the_same_image(tiny_sd15_dir: Path, sd15_lora_files: list[Path], tmp_path: Path) -> None:
    diffusers_file = build_tiny_lora(tiny_sd15_dir, tmp_path / "a.safetensors", seed=5, alpha=2, init_scale=2.0)
    kohya_file = write_kohya_lora(diffusers_file, tmp_path / "kohya.safetensors")
    keys = load_file(kohya_file).keys()
    assert all(key.startswith(("lora_unet_", "lora_te_text_model_")) for key in keys)
    assert {key.rsplit(".", 1)[-1] for key in keys} == {"weight", "alpha"}
    pipe = load("sd15", tiny_sd15_dir)
    base = generate(pipe)
    pipe.load_lora_weights(diffusers_file, adapter_name="diffusers")
    from_diffusers = generate(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(kohya_file, adapter_name="kohya")
    np.testing.assert_allclose(generate(pipe), from_diffusers, atol=1e-5, rtol=0)
    assert np.abs(from_diffusers - base).mean() > 1e-2


def _mtimes(root: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in root.rglob("*")}


@pytest.fixture(scope="module")
def embedded_home(tmp_path_factory: pytest.TempPathFactory):
    """A fresh ``LORACOMPOSE_HOME`` shared by this module's tests of the random tiny SD1.5 variant."""
    with pytest.MonkeyPatch.context() as patch:
        home = tmp_path_factory.mktemp("embedded-home")
        patch.setenv("LORACOMPOSE_HOME", str(home))
        patch.setenv("LORACOMPOSE_EMBEDDED", "tiny-sd15")
        yield home


def test_embedded_default_builds_once(embedded_home: Path) -> None:
    first = embedded_default()
    assert first.model_dir == embedded_home / "embedded" / "tiny-sd15-v1" / "model"
    assert (first.model_dir / "model_index.json").is_file()
    assert [lora.category for lora in first.loras] == ["character", "clothing", "style"]
    for lora in first.loras:
        with safe_open(lora.path, "pt") as handle:
            assert handle.metadata()["modelspec.trigger_phrase"] == ", ".join(lora.trigger_words)
        assert all(word in first.prompt for word in lora.trigger_words)
    built = _mtimes(first.model_dir.parent)
    assert embedded_default() == first
    assert _mtimes(first.model_dir.parent) == built
    assert sorted(os.listdir(embedded_home / "embedded")) == ["tiny-sd15-v1", "tiny-sd15-v1.lock"]


def test_embedded_loras_each_change_the_image(embedded_home: Path) -> None:
    default = embedded_default()
    pipe = load("sd15", default.model_dir)
    base = generate(pipe, default.prompt)
    for lora in default.loras:
        pipe.load_lora_weights(lora.path, adapter_name=lora.name)
        assert np.abs(generate(pipe, default.prompt) - base).mean() > 2e-2, lora.name
        pipe.unload_lora_weights()


def test_embedded_publish_keeps_the_copy_that_won_the_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_build", lambda root: (root / "loser.txt").write_text("late"))
    root = tmp_path / "tiny-sd15-v1"
    root.mkdir()
    (root / "winner.txt").write_text("first")
    embedded._build_and_publish(root)
    assert os.listdir(tmp_path) == ["tiny-sd15-v1"]
    assert os.listdir(root) == ["winner.txt"]
