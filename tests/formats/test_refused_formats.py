"""Formats the converter recognises and refuses, each in a file with the key names real files carry:
one line naming the file, the format and the key that shows it, nothing loaded; through the CLI, exit
status 2 and no traceback.

Oracle: the message written out in full per case, and the key each format is known by.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lora_files import write

from loracompose.errors import UserError
from loracompose.formats import load_lora_file
from loracompose.formats.keys import refused_format

_TO_Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
_TO_OUT = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
_KOHYA_LORA = {f"{_TO_Q}.lora_down.weight": torch.zeros(4, 64), f"{_TO_Q}.lora_up.weight": torch.zeros(64, 4),
               f"{_TO_Q}.alpha": torch.tensor(4.0)}

# case -> (the file's tensors, the format's name in the message, the key the message shows (the first refused
# key in the file's sorted order), every key of that format in the file)
REFUSED = {
    "(IA)^3 (LyCORIS IA3)": (
        {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2.weight": torch.ones(1, 64),
         "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2.on_input": torch.tensor(True),
         "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k.weight": torch.ones(64, 1),
         "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k.on_input": torch.tensor(False)},
        "(IA)^3", "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k.on_input",
        {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k.on_input",
         "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2.on_input"}),
    "norm-layer weights (LyCORIS train_norm)": (
        {**_KOHYA_LORA, "lora_unet_down_blocks_1_attentions_0_norm.w_norm": torch.zeros(64),
         "lora_unet_down_blocks_1_attentions_0_norm.b_norm": torch.zeros(64)},
        "LyCORIS norm-layer weights", "lora_unet_down_blocks_1_attentions_0_norm.b_norm",
        {"lora_unet_down_blocks_1_attentions_0_norm.b_norm", "lora_unet_down_blocks_1_attentions_0_norm.w_norm"}),
    "kohya LoRA bias terms": (
        {**_KOHYA_LORA, f"{_TO_Q}.lora_up.bias": torch.zeros(64)},
        "LoRA bias terms", f"{_TO_Q}.lora_up.bias", {f"{_TO_Q}.lora_up.bias"}),
    "PEFT LoRA bias terms (lora_bias=True)": (
        {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64),
         "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4),
         "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.bias": torch.zeros(64)},
        "LoRA bias terms", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.bias",
        {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.bias"}),
    "embedded textual inversion (kohya bundle_emb)": (
        {**_KOHYA_LORA, "bundle_emb.zkx.string_to_param.*": torch.zeros(2, 32)},
        "embedded textual inversion (bundle_emb)", "bundle_emb.zkx.string_to_param.*",
        {"bundle_emb.zkx.string_to_param.*"}),
    "OFT with oft_diag (LyCORIS)": (
        {f"{_TO_Q}.oft_diag": torch.zeros(4, 16, 16), f"{_TO_Q}.alpha": torch.tensor(0.0)},
        "OFT", f"{_TO_Q}.oft_diag", {f"{_TO_Q}.oft_diag"}),
    "full weight difference diff / diff_b (LyCORIS full)": (
        {f"{_TO_OUT}.diff": torch.zeros(64, 64), f"{_TO_OUT}.diff_b": torch.zeros(64)},
        "full weight difference ('diff', LyCORIS full)", f"{_TO_OUT}.diff", {f"{_TO_OUT}.diff", f"{_TO_OUT}.diff_b"}),
}


def _message(path, format_name: str, key: str) -> str:
    return (f"LoRA file {path} is in the {format_name} format (key {key!r}), which loracompose does not load; "
            "use a LoRA, LoCon, LoHa, LoKr or DoRA file")


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_format_is_one_line_naming_file_and_format(base_pipes, tmp_path, case):
    tensors, format_name, shown_key, format_keys = REFUSED[case]
    assert {key for key in tensors if refused_format(key) == format_name} == format_keys
    path = write(tmp_path / "refused.safetensors", tensors)
    pipe = copy.deepcopy(base_pipes["sd15"])
    with pytest.raises(UserError) as caught:
        load_lora_file(pipe, path, "file")
    assert str(caught.value) == _message(path, format_name, shown_key)
    assert not pipe.get_list_adapters().get("unet") and not pipe.get_list_adapters().get("text_encoder")


def test_cli_refuses_lora_bias_terms_in_one_line(tiny_sd15_dir, tmp_path, capsys):
    from loracompose.cli.main import main

    tensors, format_name, shown_key, _ = REFUSED["kohya LoRA bias terms"]
    path = write(tmp_path / "biased.safetensors", tensors)
    code = main(["generate", "--model", str(tiny_sd15_dir), "--prompt", "a cat", "--lora", f"{path}:0.8",
                 "--method", "merge", "--steps", "1", "--quiet", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == f"loracompose: error: {_message(path, format_name, shown_key)}\n"
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing written"
