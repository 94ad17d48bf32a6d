"""kohya names of real SD1.5 and SDXL LoRAs resolve to the right layers of the full-size UNets (built on
the meta device: names and shapes only). The expected layers are written out by hand from the sgm layout
(input_blocks / middle_block / output_blocks) and kohya's naming."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from loracompose.formats.names import ModuleIndex

SD15_UNET = dict(cross_attention_dim=768)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)

SD15_NAMES = {
    "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "mid_block_attentions_0_proj_in": "mid_block.attentions.0.proj_in",
    "up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2",
    "up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0":
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks_3_resnets_1_conv2": "down_blocks.3.resnets.1.conv2",
    # sgm spellings of SD1.5 layers (LyCORIS / ComfyUI-saved files)
    "input_blocks_1_1_transformer_blocks_0_attn1_to_k": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "input_blocks_11_0_out_layers_3": "down_blocks.3.resnets.1.conv2",
    "output_blocks_11_1_proj_out": "up_blocks.3.attentions.2.proj_out",
    "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "input_blocks_9_0_op": "down_blocks.2.downsamplers.0.conv",
}
SDXL_NAMES = {
    "input_blocks_4_1_transformer_blocks_1_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
    "input_blocks_8_1_transformer_blocks_9_attn2_to_k": "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
    "middle_block_1_transformer_blocks_9_attn1_to_out_0": "mid_block.attentions.0.transformer_blocks.9.attn1.to_out.0",
    "output_blocks_0_1_transformer_blocks_9_ff_net_0_proj":
        "up_blocks.0.attentions.0.transformer_blocks.9.ff.net.0.proj",
    "output_blocks_5_1_proj_in": "up_blocks.1.attentions.2.proj_in",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_7_0_emb_layers_1": "down_blocks.2.resnets.0.time_emb_proj",
    "middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
    "label_emb_0_0": "add_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "out_2": "conv_out",
}


@pytest.mark.parametrize("config, names", [(SD15_UNET, SD15_NAMES), (SDXL_UNET, SDXL_NAMES)], ids=["sd15", "sdxl"])
def test_kohya_names_resolve_on_full_size_unets(config, names):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    index = ModuleIndex.of(unet)
    resolved = {kohya: index.resolve(kohya) for kohya in names}
    assert resolved == names
    assert index.resolve("input_blocks_99_1_proj_in") is None
