"""DeepCache-style feature caching on a diffusers ``UNet2DConditionModel`` (CMLoRA, docs/methods/cmlora.md).

A full UNet pass goes down through every block and back up. DeepCache (Ma et al. 2024) observes
that the deep part of that path changes slowly between neighbouring denoising steps, so it keeps
the hidden state that enters the last up block and, until the next refresh, runs only the shallow
path around it (cache layer 0, block 1 in DeepCache's terms)::

    full pass (refresh):   conv_in -> all down blocks -> mid -> all up blocks -> conv_out
                           deep <- the hidden state entering up_blocks[-1]
    shallow pass:          emb  <- time embedding (+ SDXL text_embeds/time_ids)
                           h    <- conv_in(x)
                           skips <- (h, outputs of down_blocks[0]'s resnet/attention pairs)
                                    # its downsampler only feeds the deeper blocks: skipped
                           h    <- up_blocks[-1](deep, skips, emb, text)
                           eps  <- conv_out(act(norm(h)))

The shallow pass follows ``UNet2DConditionModel.forward`` (diffusers 0.42) step by step, so at a
refresh step (same latents, timestep and conditioning as the full pass that filled the cache) it
returns exactly the full pass's output. It works for SD1.5 (cross-attention first down block and
last up block) and SDXL (plain ``DownBlock2D``/``UpBlock2D`` there, ``added_cond_kwargs``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch

from loracompose.errors import UserError

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


@dataclass
class DeepFeature:
    """One branch's cached deep feature: the hidden state entering the last up block, with the
    branch's rows [CFG half][image], and the step whose full pass produced it."""

    hidden: torch.Tensor
    step_index: int


def check_cacheable(unet: UNet2DConditionModel) -> None:
    """Raise UserError if this UNet's layout has no shallow path we can run."""
    config = unet.config
    if getattr(config, "addition_embed_type", None) == "image_hint":
        raise UserError("feature caching does not support UNets with image-hint conditioning; "
                        "turn caching off (interval 1)")
    if getattr(unet, "class_embedding", None) is not None:
        raise UserError("feature caching does not support class-conditioned UNets; turn caching off (interval 1)")
    if 1 + len(unet.down_blocks[0].resnets) != len(unet.up_blocks[-1].resnets):
        raise UserError(
            "feature caching needs the last up block to consume exactly conv_in + the first down block's "
            "outputs (a standard SD UNet); turn caching off (interval 1) for this model"
        )


@contextmanager
def capture_deep_features(unet: UNet2DConditionModel) -> Iterator[list[torch.Tensor]]:
    """Collect, for every UNet forward inside the block, the hidden state entering ``up_blocks[-1]``.

    A forward pre-hook reads the features off the stock forward, so full passes stay exactly
    diffusers' own code.
    """
    captured: list[torch.Tensor] = []

    def keep_hidden_state(_module, args, kwargs):
        captured.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    handle = unet.up_blocks[-1].register_forward_pre_hook(keep_hidden_state, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def shallow_unet_forward(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    deep_feature: torch.Tensor,
    *,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
    cross_attention_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """The UNet's noise prediction from the shallow path around a cached ``deep_feature``.

    Rows of ``sample``, ``encoder_hidden_states``, ``added_cond_kwargs`` and ``deep_feature`` match.
    """
    cross_attention_kwargs = dict(cross_attention_kwargs) if cross_attention_kwargs else None
    added_cond_kwargs = dict(added_cond_kwargs) if added_cond_kwargs else None
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = _time_embedding(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    sample = unet.conv_in(sample)
    skips = (sample, *_first_down_block_outputs(
        unet.down_blocks[0], sample, emb, encoder_hidden_states, cross_attention_kwargs
    ))
    sample = _last_up_block(unet.up_blocks[-1], deep_feature, skips, emb, encoder_hidden_states, cross_attention_kwargs)
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


def _time_embedding(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs) -> torch.Tensor:
    """Step 1 of the stock forward: timestep embedding plus additional (SDXL text/time) embedding."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug_emb if aug_emb is not None else emb
    return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb


def _first_down_block_outputs(
    block, hidden_states, emb, encoder_hidden_states, cross_attention_kwargs
) -> tuple[torch.Tensor, ...]:
    """The resnet(+attention) outputs of a down block, without its downsampler (which only feeds
    the cached deep path). Same calls as ``DownBlock2D``/``CrossAttnDownBlock2D.forward``."""
    attentions = getattr(block, "attentions", None) if getattr(block, "has_cross_attention", False) else None
    outputs: tuple[torch.Tensor, ...] = ()
    for index, resnet in enumerate(block.resnets):
        hidden_states = resnet(hidden_states, emb)
        if attentions is not None:
            hidden_states = attentions[index](
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                cross_attention_kwargs=cross_attention_kwargs,
                attention_mask=None,
                encoder_attention_mask=None,
                return_dict=False,
            )[0]
        outputs += (hidden_states,)
    return outputs


def _last_up_block(block, deep_feature, skips, emb, encoder_hidden_states, cross_attention_kwargs) -> torch.Tensor:
    """Step 5 of the stock forward for the final up block (it has no upsampler)."""
    if getattr(block, "has_cross_attention", False):
        return block(
            hidden_states=deep_feature,
            temb=emb,
            res_hidden_states_tuple=skips,
            encoder_hidden_states=encoder_hidden_states,
            cross_attention_kwargs=cross_attention_kwargs,
            upsample_size=None,
            attention_mask=None,
            encoder_attention_mask=None,
        )
    return block(hidden_states=deep_feature, temb=emb, res_hidden_states_tuple=skips, upsample_size=None)
