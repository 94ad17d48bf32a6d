"""Pieces the benchmark scripts share (run them as ``python benchmarks/bench_*.py``: this folder is
then on ``sys.path``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from loracompose.tiny import tiny_sd15_pipeline

# A mid-size random UNet of SD1.5's architecture (cross-attention width = tiny text encoder's 32).
MID_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": (64, 128, 256),
    "layers_per_block": 1,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}
# Two layers per block and heads of width 32 (SD1.5: 40; width 8 makes CPU attention memory-bound):
# the mid model of bench_cmlora.py and bench_composer.py.
DEEP_MID_UNET_CONFIG: dict[str, Any] = {**MID_UNET_CONFIG, "layers_per_block": 2, "attention_head_dim": (2, 4, 8)}


# SD1.5's own UNet (runwayml/stable-diffusion-v1-5 unet/config.json; 860 M parameters), random weights.
SD15_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


def build_mid_sd15(out_dir: Path, *, size: int, seed: int = 0, unet_config: dict[str, Any] | None = None) -> Path:
    """Save the tiny SD1.5 pipeline with its UNet replaced by a random mid-size one (``unet_config``,
    default ``MID_UNET_CONFIG``) for ``size`` x ``size`` images."""
    base = tiny_sd15_pipeline(seed=seed)
    torch.manual_seed(seed)
    config = unet_config or MID_UNET_CONFIG
    unet = UNet2DConditionModel(**config, sample_size=size // base.vae_scale_factor).eval()
    components = {**base.components, "unet": unet}
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_sd15_unet_model(out_dir: Path, *, latent_size: int, seed: int = 0) -> Path:
    """Save the tiny SD1.5 pipeline with SD1.5's full-size UNet (random weights) and a one-layer text
    encoder of SD1.5's width (768), so the UNet, its attention shapes and the 77x768 text states are
    SD1.5's; the tiny VAE (factor 2) keeps decoding cheap: images are ``2 * latent_size`` pixels."""
    base = tiny_sd15_pipeline(seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG, sample_size=latent_size).eval()
    text_config = CLIPTextConfig(**{**base.text_encoder.config.to_dict(), "hidden_size": 768, "intermediate_size": 3072,
                                    "num_attention_heads": 12, "num_hidden_layers": 1, "projection_dim": 768})
    text_encoder = CLIPTextModel(text_config).eval()
    components = {**base.components, "unet": unet, "text_encoder": text_encoder}
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
