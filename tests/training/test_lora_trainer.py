"""The shared LoRA trainer (loracompose.training.trainer): per-image captions, and training on the toy world's model."""

from __future__ import annotations

from pathlib import Path

import torch

from PIL import Image

from loracompose.cli.main import main
from loracompose.lora import LoraSpec, inspect_lora
from loracompose.pipelines import load_pipeline
from loracompose.toyworld.concepts import CONCEPTS
from loracompose.toyworld.loras import write_concept_images
from loracompose.toyworld.model import TINY, build_pipeline
from loracompose.toyworld.scenes import make_scene
from loracompose.training.trainer import (PLAIN_DEFAULTS, LoraTrainingSettings, PlainObjective, build_training_model,
                                          train_lora)


def test_project_lora_trainer_runs_on_the_toyworld_model(tmp_path: Path) -> None:
    """The toy world's concept LoRAs train with this trainer; it encodes images through the fold VAE."""

    build_pipeline(TINY, seed=0).save_pretrained(tmp_path / "model", safe_serialization=True)
    (tmp_path / "images").mkdir()
    for seed in range(2):
        make_scene(seed)[0].save(tmp_path / "images" / f"{seed}.png")
    settings = LoraTrainingSettings(model=str(tmp_path / "model"), images=tmp_path / "images",
                                    out=tmp_path / "glyph.safetensors", prompt="a zqx glyph", steps=1, device="cpu",
                                    probe_timesteps=0, show_progress=False, trigger_words=("zqx",))
    train_lora(settings)
    pipe = load_pipeline(tmp_path / "model", device="cpu")
    result = pipe.generate("a zqx glyph", [LoraSpec(str(tmp_path / "glyph.safetensors"))], steps=2, show_progress=False)
    assert result.images[0].size == (32, 32)


def test_concept_images_and_train_lora_cli_with_caption_files(tmp_path: Path, capsys) -> None:

    build_pipeline(TINY, seed=0).save_pretrained(tmp_path / "model", safe_serialization=True)
    images = write_concept_images(CONCEPTS["moxel"], tmp_path / "moxel-images", 3)
    assert sorted(path.name for path in images.iterdir()) == ["0000.png", "0000.txt", "0001.png", "0001.txt",
                                                               "0002.png", "0002.txt"]
    assert "moxel" in (images / "0001.txt").read_text()
    out = tmp_path / "moxel.safetensors"
    assert main(["train-lora", "--model", str(tmp_path / "model"), "--images", str(images), "--out", str(out),
                 "--steps", "2", "--batch-size", "2", "--trigger", "moxel", "--category", "object", "--quiet",
                 "--probe-timesteps", "0", "--device", "cpu"]) == 0
    lora = inspect_lora(LoraSpec(out))
    assert lora.trigger_words == ("moxel",) and lora.category == "object"
    assert "train-lora: 2 steps" in capsys.readouterr().err
    # Without captions or a prompt there is nothing to train towards: a one-line error, exit 2.
    bare = tmp_path / "bare"
    bare.mkdir()
    make_scene(0)[0].save(bare / "a.png")
    assert main(["train-lora", "--model", str(tmp_path / "model"), "--images", str(bare), "--out",
                 str(tmp_path / "x.safetensors"), "--quiet"]) == 2
    assert "a.png has no caption" in capsys.readouterr().err


def test_caption_files_give_each_image_its_own_text_states(tmp_path, tiny_sd15_dir) -> None:
    """Per-image captions (NAME.txt) are encoded exactly as generate encodes a prompt, one per image;
    images without one take --prompt."""

    images = tmp_path / "images"
    images.mkdir()
    for name, text in (("a", "a zkx dog"), ("b", None), ("c", "a qwv cat")):
        Image.new("RGB", (64, 64), (40, 90, 200)).save(images / f"{name}.png")
        if text:
            (images / f"{name}.txt").write_text(text + "\n")
    settings = LoraTrainingSettings(model=str(tiny_sd15_dir), images=images, out=tmp_path / "l.safetensors",
                                    prompt="a photo", device="cpu", show_progress=False)
    model, resolved, _ = build_training_model(settings, PLAIN_DEFAULTS, PlainObjective())
    assert resolved.captions == ("a zkx dog", "a photo", "a qwv cat")
    pipe = load_pipeline(tiny_sd15_dir, device="cpu")
    expected = [pipe.encode_prompt(text, "cpu", 1, False)[0][0] for text in resolved.captions]
    states = model.conditioning.states([2, 0, 1, 0])
    for row, index in enumerate([2, 0, 1, 0]):
        torch.testing.assert_close(states[row], expected[index])
