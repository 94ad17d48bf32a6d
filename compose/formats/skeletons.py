"""UNet layer names and shapes without a model: meta-device UNets of the base models LoRAs are made for.

The converter resolves a file's layer names against a model's modules (:class:`.names.ModuleIndex`).
Readers that have no pipeline (the weight retriever reading a LoRA library) convert against these
skeletons instead: parameters on the meta device carry names and shapes only, so building one costs
no memory. A file is matched to the first skeleton all its UNet layers fit.
"""

from __future__ import annotations

from functools import cache

from torch import nn

_SD15 = {"cross_attention_dim": 768}
_SD2 = {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True}
_SDXL = {
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


def skeleton_configs() -> dict[str, dict]:
    """UNet configs by base model: SD1.5, SD2.x, SDXL and loracompose's tiny SD1.5 / SDXL test models."""
    from loracompose.assets.tiny import TINY_SD15_UNET, TINY_SDXL_UNET

    return {"sd15": _SD15, "sd2": _SD2, "sdxl": _SDXL, "tiny-sd15": TINY_SD15_UNET, "tiny-sdxl": TINY_SDXL_UNET}


@cache
def unet_skeleton(name: str) -> nn.Module:
    """The meta-device UNet of one base model in :func:`skeleton_configs` (built once per process)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**skeleton_configs()[name])
