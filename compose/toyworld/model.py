"""The toy-world text-to-image model: standard diffusers parts that ``load_pipeline`` loads as SD1.5.

    pixels (3, 32, 32) in [-1, 1]  --fold 2x2-->  latents (12, 16, 16)  (``F.pixel_unshuffle``)
    UNet2DConditionModel on 16x16x12: channels 32/64/64, cross-attention at the two lower levels
    CLIPTextModel (2 layers, width 64) on the real 49408-token CLIP BPE tokenizer
    v-prediction on a cosine noise schedule; DDIM/DPM-Solver samplers read it from the config

Why an ``AutoencoderKL`` with a hand-set encoder and a trained decoder (and not "no VAE"):
``StableDiffusionPipeline`` always decodes through ``vae.decode`` and sizes latents by
``vae_scale_factor``, and loading a custom fold/unfold class would need ``trust_remote_code``. A
real ``AutoencoderKL`` can *encode* the 2x2 fold exactly: the stride-2 conv of its downsampler is a
space-to-depth when each output channel picks one input pixel; its residual blocks become
identities when their last conv is zero; its final GroupNorm + SiLU become an identity by giving
every group a constant +-B channel pair (the group's mean stays 0, its spread is B, known in
advance) and shifting by +20 before SiLU (SiLU(x + 20) = x + 20 within 1e-7). So ``vae.encode``
equals ``pixel_unshuffle`` within 1e-5 (measured 1.4e-6; tested) and the project's LoRA trainer, which encodes
images through the VAE, sees the same latents as base training. The *decoder* cannot be an exact
unfold: after nearest-neighbour upsampling a translation-invariant conv maps a constant latent to
a constant image, so it cannot place 4 different sub-pixels; it is therefore a small decoder
trained jointly with the UNet to invert the fold (see train.py).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from loracompose.assets.tiny import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, build_clip_tokenizer

FOLD = 2  # 2x2 pixels -> 12 latent channels
LATENT_CHANNELS = 3 * FOLD * FOLD
_GROUP_OFFSET = 1000.0  # the +-B constant pair per GroupNorm group
_SILU_SHIFT = 20.0  # SiLU(x + 20) - 20 == x within float32 rounding for |x| <= 2
_LOG_VARIANCE = -30.0  # the posterior's std is exp(-15): a deterministic encoder


@dataclass(frozen=True)
class ToyWorldArchitecture:
    """Sizes of the toy-world model (``base``: the issue's 1.7M UNet; ``tiny``: for tests)."""

    unet_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    decoder_channels: tuple[int, int] = (16, 32)
    image_size: int = 32


BASE = ToyWorldArchitecture()
# The fold encoder needs >= 12 channels in the first VAE stage and 4 groups of >= 8 in the second.
TINY = ToyWorldArchitecture(unet_channels=(8, 16, 16), layers_per_block=1, text_width=16, text_layers=1,
                            text_heads=2)
ARCHITECTURES = {"base": BASE, "tiny": TINY}


def fold(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels -> (B, 12, H/2, W/2) latents: what the VAE encoder computes."""
    return F.pixel_unshuffle(pixels, FOLD)


def unfold(latents: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`fold` (the decoder is trained to approximate it)."""
    return F.pixel_shuffle(latents, FOLD)


# ------------------------------------------------------------------------------------ components


def build_unet(arch: ToyWorldArchitecture) -> UNet2DConditionModel:
    """The UNet on 16x16x12 latents: plain convs at full latent size, cross-attention below."""
    levels = len(arch.unet_channels)
    return UNet2DConditionModel(
        sample_size=arch.image_size // FOLD,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=arch.unet_channels,
        layers_per_block=arch.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=arch.text_width,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_text_encoder(arch: ToyWorldArchitecture) -> CLIPTextModel:
    """A small CLIP text transformer over the full CLIP vocabulary (rare trigger words stay one token)."""
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=arch.text_width, intermediate_size=2 * arch.text_width,
        num_attention_heads=arch.text_heads, num_hidden_layers=arch.text_layers,
        max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=arch.text_width, hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_EOS_ID,
    )
    return CLIPTextModel(config)


def build_vae(arch: ToyWorldArchitecture) -> AutoencoderKL:
    """An ``AutoencoderKL`` whose encoder is the exact 2x2 fold and whose decoder is untrained."""
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=arch.decoder_channels, layers_per_block=1, norm_num_groups=4,
        sample_size=arch.image_size, scaling_factor=1.0, mid_block_add_attention=False,
    )
    set_fold_encoder(vae)
    return vae


def noise_scheduler() -> DDIMScheduler:
    """Cosine schedule, v-prediction, trailing timesteps so sampling starts from pure noise."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing", steps_offset=1,
    )


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (open_clip's vocabulary), built offline."""
    with tempfile.TemporaryDirectory(prefix="loracompose-tokenizer-") as scratch:
        return build_clip_tokenizer(scratch)


def build_pipeline(arch: ToyWorldArchitecture = BASE, *, seed: int = 0,
                   tokenizer: CLIPTokenizer | None = None) -> StableDiffusionPipeline:
    """A randomly initialised toy-world pipeline (seeded), ready for training or saving."""
    torch.manual_seed(seed)
    return StableDiffusionPipeline(
        unet=build_unet(arch), vae=build_vae(arch), text_encoder=build_text_encoder(arch),
        tokenizer=tokenizer or clip_tokenizer(), scheduler=noise_scheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


# ------------------------------------------------------------------------------------ the fold encoder


def _zero(*modules: torch.nn.Module) -> None:
    for module in modules:
        for parameter in module.parameters():
            parameter.data.zero_()


def _silence_resnets(resnets: torch.nn.ModuleList) -> None:
    """out = shortcut(x) + conv2(...): a zero conv2 leaves the (identity or 1x1) shortcut alone."""
    for resnet in resnets:
        _zero(resnet.get_submodule("conv2"))


@torch.no_grad()
def set_fold_encoder(vae: AutoencoderKL) -> None:
    """Set the encoder's weights so that ``vae.encode(x).latent_dist.mean == pixel_unshuffle(x, 2)``."""
    encoder = vae.encoder
    first, second = encoder.down_blocks
    if vae.config.block_out_channels[0] < LATENT_CHANNELS:
        raise ValueError(f"the fold encoder needs >= {LATENT_CHANNELS} channels in the first VAE stage")
    for module in (encoder.conv_in, first.downsamplers[0].conv, second.resnets[0].conv_shortcut,
                   encoder.conv_out, vae.quant_conv):
        _zero(module)
    _silence_resnets(first.resnets)
    _silence_resnets(second.resnets)
    _silence_resnets(encoder.mid_block.resnets)
    for channel in range(3):  # conv_in: copy RGB into the first three channels
        encoder.conv_in.weight[channel, channel, 1, 1] = 1.0
    down = first.downsamplers[0].conv  # pads (0, 1, 0, 1), 3x3 stride 2: tap (dy, dx) reads pixel (2i+dy, 2j+dx)
    for channel in range(3):
        for dy in range(FOLD):
            for dx in range(FOLD):
                down.weight[channel * 4 + dy * 2 + dx, channel, dy, dx] = 1.0
    _set_group_norm_identity(vae)
    vae.quant_conv.weight[:, :, 0, 0] = torch.eye(2 * LATENT_CHANNELS)


def _set_group_norm_identity(vae: AutoencoderKL) -> None:
    """Route the 12 latent channels through conv_norm_out + SiLU unchanged (see the module docstring).

    Each of the 4 groups of the last encoder stage holds 3 latent channels, their negatives (the
    group mean stays 0) and a +B/-B constant pair (the group's std is B/2 whatever the image).
    """
    encoder = vae.encoder
    shortcut = encoder.down_blocks[1].resnets[0].conv_shortcut
    width = shortcut.out_channels
    groups = encoder.conv_norm_out.num_groups
    per_group = width // groups
    if groups * 3 != LATENT_CHANNELS or per_group < 8:
        raise ValueError(f"the fold encoder needs 4 groups of >= 8 channels, got {groups} x {per_group}")
    norm = encoder.conv_norm_out
    norm.weight.data.fill_(0.0)
    norm.bias.data.fill_(0.0)
    constants_per_group = per_group - 6  # +B on half of them, -B on the other half (an even number)
    group_std = _GROUP_OFFSET * (constants_per_group / per_group) ** 0.5
    for group in range(groups):
        start = group * per_group
        for offset in range(3):
            latent = group * 3 + offset
            plus, minus = start + offset, start + 3 + offset
            shortcut.weight[plus, latent, 0, 0] = 1.0
            shortcut.weight[minus, latent, 0, 0] = -1.0
            norm.weight[plus] = group_std
            norm.bias[plus] = _SILU_SHIFT
            encoder.conv_out.weight[latent, plus, 1, 1] = 1.0
            encoder.conv_out.bias[latent] = -_SILU_SHIFT
        for index in range(constants_per_group):
            shortcut.bias[start + 6 + index] = _GROUP_OFFSET * (1 if index % 2 == 0 else -1)
    encoder.conv_out.bias[LATENT_CHANNELS:] = _LOG_VARIANCE
