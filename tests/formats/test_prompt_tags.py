"""A1111 prompt tags: ``<lora:NAME:W>`` equals ``--lora DIR/NAME.safetensors:W`` pixel for pixel."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from loracompose.errors import UserError
from loracompose.formats.prompt_tags import LORA_DIR_VARIABLE, split_lora_tags
from loracompose.lora import LoraSpec


@pytest.fixture(scope="module")
def lora_dir(sd15_lora_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-dir")
    shutil.copy(sd15_lora_files[0], folder / "character.safetensors")
    (folder / "styles" / "ink").mkdir(parents=True)
    shutil.copy(sd15_lora_files[1], folder / "styles" / "ink" / "qwv-style.safetensors")
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    shutil.copy(sd15_lora_files[1], folder / "a" / "twin.safetensors")
    shutil.copy(sd15_lora_files[1], folder / "b" / "twin.safetensors")
    return folder


def _pixels(pipe, prompt, loras=(), **extra):
    result = pipe.generate(prompt, loras, steps=3, seed=4, output_type="np", **extra)
    return np.asarray(result.images), result


def test_tags_equal_lora_flags_pixel_for_pixel(sd15, lora_dir):
    tagged, tagged_result = _pixels(sd15, "a cat <lora:character:0.7>, in a garden <lyco:qwv-style>",
                                    lora_dir=lora_dir)
    flags, flag_result = _pixels(sd15, "a cat, in a garden",
                                 [LoraSpec(lora_dir / "character.safetensors", 0.7),
                                  LoraSpec(lora_dir / "styles" / "ink" / "qwv-style.safetensors", 1.0)])
    assert np.array_equal(tagged, flags)
    assert tagged_result.prompt == flag_result.prompt and "<" not in tagged_result.prompt
    assert [lora.weight for lora in tagged_result.loras] == [0.7, 1.0]
    assert not np.array_equal(tagged, _pixels(sd15, "a cat, in a garden")[0]), "the tags' LoRAs change the image"


def test_environment_variable_gives_the_folder(sd15, lora_dir, monkeypatch):
    monkeypatch.setenv(LORA_DIR_VARIABLE, str(lora_dir))
    prompt, specs = split_lora_tags("<lora:character:0.5> a dog")
    assert prompt == "a dog" and specs == [LoraSpec(lora_dir / "character.safetensors", 0.5)]


def test_text_encoder_and_unet_weights(sd15, lora_dir):
    """<lora:NAME:TE_W:UNET_W>: the UNet at UNET_W, the text encoder at TE_W. Oracle: the same LoRA with its
    text-encoder layers scaled by hand (TE_W / UNET_W) in a copy of the file, loaded at UNET_W."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = lora_dir / "character.safetensors"
    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) * (0.25 / 0.5 if key.startswith("text_encoder") and "lora_B" in key
                                                  else 1.0) for key in handle.keys()}  # noqa: SIM118
    scaled = lora_dir.parent / "scaled-character.safetensors"
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(scaled), metadata=metadata)
    tagged, _ = _pixels(sd15, "a cat <lora:character:0.25:0.5>", lora_dir=lora_dir)
    by_hand, _ = _pixels(sd15, "a cat", [LoraSpec(scaled, 0.5, name="character")])
    np.testing.assert_allclose(tagged, by_hand, atol=1e-5, rtol=0)
    same_weights, _ = _pixels(sd15, "a cat <lora:character:0.5>", lora_dir=lora_dir)
    assert not np.allclose(tagged, same_weights, atol=1e-4), "the text-encoder weight matters"


@pytest.mark.parametrize("prompt, message", [
    ("a <lora:twin:1>", r"LoRA name 'twin' matches several files in .* \(a/twin.safetensors, b/twin.safetensors\)"),
    ("a <lora:missing:1>", r"no LoRA named 'missing' in .* or its subfolders"),
    ("a <lora:character:strong>", r"weight 'strong' is not a number"),
    ("a <lora:character:1:2:3>", r"is malformed"),
])
def test_bad_tags_are_one_line_errors(lora_dir, prompt, message):
    with pytest.raises(UserError, match=message) as caught:
        split_lora_tags(prompt, lora_dir)
    assert "\n" not in str(caught.value)


def test_tag_without_folder_is_refused(monkeypatch):
    monkeypatch.delenv(LORA_DIR_VARIABLE, raising=False)
    with pytest.raises(UserError, match=r"needs a LoRA folder but no LoRA folder is set; pass --lora-dir"):
        split_lora_tags("a <lora:x:1>")
    assert split_lora_tags("no tags here", None) == ("no tags here", [])


def test_cli_lora_dir_tags_equal_lora_flags(tiny_sd15_dir, lora_dir, tmp_path, capsys):
    import json

    from PIL import Image

    from loracompose.cli.main import main

    common = ["generate", "--model", str(tiny_sd15_dir), "--method", "merge", "--steps", "2", "--seed", "3", "--quiet"]
    assert main([*common, "--prompt", "a cat <lora:character:0.6>", "--lora-dir", str(lora_dir),
                 "--out", str(tmp_path / "tags")]) == 0
    assert main([*common, "--prompt", "a cat", "--lora", f"{lora_dir / 'character.safetensors'}:0.6",
                 "--out", str(tmp_path / "flags")]) == 0
    capsys.readouterr()
    tags, flags = (np.asarray(Image.open(tmp_path / folder / "merge-3.png")) for folder in ("tags", "flags"))
    assert np.array_equal(tags, flags)
    records = [json.loads((tmp_path / folder / "merge-3.json").read_text()) for folder in ("tags", "flags")]
    assert records[0]["prompt"] == records[1]["prompt"] and records[0]["loras"] == records[1]["loras"]
    code = main([*common, "--prompt", "a cat <lora:nowhere:1>", "--lora-dir", str(lora_dir), "--out",
                 str(tmp_path / "x")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "no LoRA named 'nowhere'" in error and "\n" not in error
