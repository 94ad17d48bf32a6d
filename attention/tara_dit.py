"""TARA on DiTs (FLUX.1, SD3/SD3.5): token masks on the text part of joint attention's K/V deltas.

A DiT has no separate cross-attention: text and image tokens attend to each other in one joint
attention. The text tokens' keys and values come from ``attn.add_k_proj`` / ``attn.add_v_proj`` of
every joint block (FLUX's double-stream blocks, SD3's blocks) and from the text rows of ``attn.to_k``
/ ``attn.to_v`` in FLUX's single-stream blocks. On those layers::

    k = W_K·c + Σ_i m_i ⊙ Δ_i(c)          (v alike; rows of image tokens: + Σ_i Δ_i, unmasked)

``m_i`` (batch rows, text tokens) is 1 at LoRA i's trigger tokens on the conditional rows. Every
other LoRA layer (the image stream, the rest of the text stream, modulations) adds its deltas
unmasked, as Merge. The patches are registered on the run's
:class:`~loracompose.pipelines.patches.PatchStack`.
"""

from __future__ import annotations

from types import MethodType
from typing import Any, Callable

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from loracompose.errors import UserError
from loracompose.pipelines.patches import PatchStack

from .dit_layers import StreamRole, stream_role, text_key_value_layers, text_rows
from .lora_deltas import LoraTokenMasks, active_adapters, adapter_delta


def fit_tokens(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """A (rows, length) token mask cut or zero-padded to ``tokens`` (the encoded sequence's length)."""
    if mask.shape[-1] >= tokens:
        return mask[..., :tokens]
    return F.pad(mask, (0, tokens - mask.shape[-1]))


def install_text_kv_token_masks(transformer: torch.nn.Module, token_masks: LoraTokenMasks, image_tokens: int,
                                joint_order: tuple[str, ...], stack: PatchStack) -> list[LoraLayer]:
    """Token-masked deltas on the text rows of every K/V LoRA layer of ``transformer`` (module text);
    returns the patched layers. ``token_masks.masks[adapter]`` is (batch rows, text tokens); an adapter
    without a mask adds its whole delta."""
    layers = text_key_value_layers(transformer)
    for name, layer in layers:
        stack.forward(layer, MethodType(_masked_kv_forward(name, token_masks, image_tokens, tuple(joint_order)),
                                        layer))
    return [layer for _, layer in layers]


def _masked_kv_forward(layer_name: str, token_masks: LoraTokenMasks, image_tokens: int,
                       joint_order: tuple[str, ...]) -> Callable[..., torch.Tensor]:
    role = stream_role(layer_name)

    def masked_forward(layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise UserError("TARA's token-masked layers do not take per-row adapters; run TARA as one branch")
        result = layer.get_base_layer()(x, *args, **kwargs)
        for name in active_adapters(layer):
            delta = adapter_delta(layer, x, name)
            mask = token_masks.masks.get(name)
            if mask is None:
                result = result + delta
                continue
            result = result + delta * _row_token_weights(mask, x, role, image_tokens, joint_order, layer_name)
        return result

    return masked_forward


def _row_token_weights(mask: torch.Tensor, x: torch.Tensor, role: StreamRole, image_tokens: int,
                       joint_order: tuple[str, ...], layer_name: str) -> torch.Tensor:
    """(rows, tokens, 1) weights: the token mask on the text rows, 1 on image rows (single-stream blocks)."""
    rows, tokens = int(x.shape[0]), int(x.shape[1])
    if mask.ndim == 1:
        mask = mask[None].expand(rows, -1)
    if mask.shape[0] != rows:
        raise UserError(f"TARA token masks have {mask.shape[0]} rows for a batch of {rows} at {layer_name}; run "
                        "TARA through pipe.generate")
    text = text_rows(role, tokens, image_tokens, joint_order, layer_name)
    weights = x.new_ones(rows, tokens)
    weights[:, text] = fit_tokens(mask.to(device=x.device, dtype=x.dtype), text.stop - text.start)
    return weights[..., None]
