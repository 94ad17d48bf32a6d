"""Trigger words, display name and base-model family from kohya / modelspec metadata."""

from __future__ import annotations

import json

import pytest
import torch
from lora_files import write

from loracompose.errors import UserError
from loracompose.lora import LoraSpec, inspect_lora, trigger_words_from_metadata

TAGS = json.dumps({"10_zkx woman": {"zkx": 10, "woman": 10, "smile": 4},
                   "5_zkx outdoors": {"zkx": 5, "outdoors": 5, "woman": 2}})


def test_triggers_from_tag_frequency_sum_over_folders_top_first():
    # zkx 15, woman 12, outdoors 5, smile 4: the top tag only.
    assert trigger_words_from_metadata({"ss_tag_frequency": TAGS}) == ("zkx",)
    tied = json.dumps({"1_a": {"qwv": 3, "zkx": 1}, "2_b": {"zkx": 2, "tree": 1}})
    assert trigger_words_from_metadata({"ss_tag_frequency": tied}) == ("qwv", "zkx")  # 3 and 3, file order


def test_explicit_trigger_keys_win_over_tags():
    assert trigger_words_from_metadata({"ss_tag_frequency": TAGS, "ss_trigger_words": "abc, def"}) == ("abc", "def")
    assert trigger_words_from_metadata({"ss_tag_frequency": TAGS, "ss_trigger_words": "abc",
                                        "modelspec.trigger_phrase": "xyz"}) == ("xyz",)


def _file(tmp_path, metadata: dict[str, str], name: str = "lora.safetensors"):
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    return write(tmp_path / name, {f"{key}.lora_down.weight": torch.zeros(4, 64),
                                   f"{key}.lora_up.weight": torch.zeros(64, 4)}, metadata)


def test_display_name_is_ss_output_name(tmp_path):
    lora = inspect_lora(LoraSpec(_file(tmp_path, {"ss_output_name": "Zkx Girl v2", "ss_tag_frequency": TAGS})))
    assert lora.display_name == "Zkx Girl v2" and lora.name == "lora" and lora.trigger_words == ("zkx",)
    assert inspect_lora(LoraSpec(_file(tmp_path, {}, "plain.safetensors"))).display_name == "plain"


@pytest.mark.parametrize("metadata, family", [
    ({"ss_base_model_version": "sd_v2"}, r"SD2\.x \(ss_base_model_version 'sd_v2'\)"),
    ({"modelspec.architecture": "flux-1-dev/lora"}, r"FLUX \(modelspec.architecture 'flux-1-dev/lora'\)"),
    ({"modelspec.architecture": "stable-diffusion-v3-medium/lora"}, r"SD3 \(modelspec.architecture '.*'\)"),
    ({"ss_base_model_version": "sdxl_base_v1-0"}, r"SDXL \(ss_base_model_version 'sdxl_base_v1-0'\)"),
])
def test_other_family_refused_before_loading_naming_both(sd15, tmp_path, metadata, family):
    path = _file(tmp_path, metadata)
    with pytest.raises(UserError, match=rf"LoRA file .*lora.safetensors is made for {family} but the model is "
                                         r"SD1\.5") as caught:
        sd15.prepare_loras([LoraSpec(path)])
    assert "\n" not in str(caught.value)
    assert "lora" not in sd15.get_list_adapters().get("unet", [])
