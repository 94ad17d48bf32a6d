"""The LoRA library: specs, metadata, triggers and every bad-file error."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from loracompose import LoraSpec, UserError, load_pipeline
from loracompose.lora import inspect_lora, inspect_loras, trigger_words_from_metadata, with_trigger_words


@pytest.fixture(scope="module")
def sd15_pipe(tiny_sd15_dir):
    return load_pipeline(tiny_sd15_dir)


def test_parse_path_and_weight(tmp_path):
    assert LoraSpec.parse("a/b.safetensors:0.75") == LoraSpec("a/b.safetensors", 0.75)
    assert LoraSpec.parse("a/b.safetensors") == LoraSpec("a/b.safetensors", 1.0)
    assert LoraSpec.parse("C:/x/b.safetensors:-0.5").weight == -0.5
    with pytest.raises(UserError, match="not a number"):
        LoraSpec.parse("b.safetensors:strong")


def test_triggers_from_metadata_and_overrides(sd15_lora_files):
    lora = inspect_lora(LoraSpec(sd15_lora_files[0]))
    assert lora.trigger_words == ("zkx",)
    assert lora.category == "character"
    assert lora.architecture == "sd15"
    override = inspect_lora(LoraSpec(sd15_lora_files[0], trigger_words=("my word",), category="object"))
    assert override.trigger_words == ("my word",) and override.category == "object"


def test_trigger_metadata_formats():
    assert trigger_words_from_metadata({"ss_trigger_words": '["a b", "c"]'}) == ("a b", "c")
    assert trigger_words_from_metadata({"modelspec.trigger_phrase": "x, y "}) == ("x", "y")
    assert trigger_words_from_metadata({"ss_tag_frequency": "{}"}) == ()


def test_trigger_words_appended_only_when_missing(sd15_lora_files):
    loras = inspect_loras([LoraSpec(p) for p in sd15_lora_files])
    assert with_trigger_words("a zkx cat", loras) == "a zkx cat, qwv"
    assert with_trigger_words("zkxy", loras) == "zkxy, zkx, qwv"
    assert with_trigger_words("ZKX and qwv", loras) == "ZKX and qwv"


def bad_file_cases(tmp_path, sd15_lora_files):
    good = sd15_lora_files[0]
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-500])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    pickled = tmp_path / "model.ckpt"
    torch.save({"x": torch.zeros(1)}, pickled)
    no_lora = tmp_path / "weights.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(no_lora))
    return {
        "missing": (tmp_path / "nope.safetensors", "not found"),
        "folder": (tmp_path, "is a folder"),
        "pickled": (pickled, "not a .safetensors file"),
        "truncated": (truncated, "truncated"),
        "garbage": (garbage, "truncated or not a valid safetensors"),
        "not a lora": (no_lora, "no LoRA tensors"),
    }


@pytest.mark.parametrize("case", ["missing", "folder", "pickled", "truncated", "garbage", "not a lora"])
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, sd15_lora_files, sd15_pipe, case):
    path, expected = bad_file_cases(tmp_path, sd15_lora_files)[case]
    with pytest.raises(UserError) as error:
        sd15_pipe.prepare_loras([LoraSpec(path)])
    message = str(error.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_sdxl_lora_on_sd15_is_refused(sd15_pipe, sdxl_lora_files):
    with pytest.raises(UserError, match=r"made for SDXL \(.*\) but the model is SD1.5"):
        sd15_pipe.prepare_loras([LoraSpec(sdxl_lora_files[0])])


def test_sd15_lora_on_sdxl_is_refused(tiny_sdxl_dir, sd15_lora_files):
    with pytest.raises(UserError, match=r"made for SD1.5 \(.*\) but the model is SDXL"):
        load_pipeline(tiny_sdxl_dir).prepare_loras([LoraSpec(sd15_lora_files[0])])


def test_lora_without_metadata_for_other_architecture_is_refused(tmp_path, sd15_pipe, sdxl_lora_files):
    """Shapes, not metadata, must catch a mismatch when the file does not declare its base."""
    from safetensors import safe_open

    stripped = tmp_path / "anonymous.safetensors"
    with safe_open(str(sdxl_lora_files[0]), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if key.startswith("unet.")}
    tensors = {key: value for key, value in tensors.items() if "transformer_blocks.1." not in key}
    save_file(tensors, str(stripped))
    with pytest.raises(UserError, match="does not fit layer|matched no layer"):
        sd15_pipe.prepare_loras([LoraSpec(stripped)])


def test_duplicate_names_are_refused(tmp_path, sd15_pipe, sd15_lora_files):
    copy_dir = tmp_path / "other"
    copy_dir.mkdir()
    copy = copy_dir / sd15_lora_files[0].name
    shutil.copy(sd15_lora_files[0], copy)
    with pytest.raises(UserError, match="two LoRAs are named"):
        sd15_pipe.prepare_loras([LoraSpec(sd15_lora_files[0]), LoraSpec(copy)])


def test_changed_file_is_reloaded(tmp_path, sd15_pipe, sd15_lora_files):
    path = tmp_path / "swap.safetensors"
    shutil.copy(sd15_lora_files[0], path)
    kwargs = dict(steps=2, output_type="latent", show_progress=False, append_triggers=False)
    first = sd15_pipe.generate("a cat", [LoraSpec(path)], **kwargs).latents
    shutil.copy(sd15_lora_files[1], path)
    second = sd15_pipe.generate("a cat", [LoraSpec(path)], **kwargs).latents
    reference = sd15_pipe.generate("a cat", [LoraSpec(sd15_lora_files[1])], **kwargs).latents
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, reference, atol=1e-6, rtol=0)


def test_kohya_file_gives_same_output_as_diffusers_file(tmp_path, sd15_pipe, sd15_lora_files):
    from loracompose.assets.tiny import write_kohya_lora

    kohya = write_kohya_lora(sd15_lora_files[0], tmp_path / "kohya_style.safetensors")
    kwargs = dict(steps=2, output_type="latent", show_progress=False, append_triggers=False, seed=1)
    ours = sd15_pipe.generate("a cat", [LoraSpec(kohya, 0.8)], **kwargs).latents
    reference = sd15_pipe.generate("a cat", [LoraSpec(sd15_lora_files[0], 0.8)], **kwargs).latents
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("keys, family", [
    (["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
      "transformer.transformer_blocks.1.attn.add_k_proj.lora_A.weight"], "flux"),
    (["transformer.x_embedder.lora_A.weight"], "flux"),
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "flux"),
    (["transformer.transformer_blocks.1.attn.add_k_proj.lora_A.weight"], None),  # FLUX double or SD3 joint block
    (["transformer.transformer_blocks.20.attn.add_k_proj.lora_A.weight"], "sd3"),  # FLUX.1 has 19 double blocks
    (["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"], "sd3"),
    (["unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.lora_A.weight"], "sdxl"),
    (["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"], None),
])
def test_architecture_from_dit_keys(keys, family):
    from loracompose.lora import architecture_from_file

    assert architecture_from_file({}, keys) == family
