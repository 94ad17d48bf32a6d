"""TARA on DiTs (FLUX.1, SD3/SD3.5): token masks on the text part of joint attention's K/V deltas.

A DiT has no separate cross-attention: text and image tokens attend to each other in one joint
attention. The text tokens' keys and values come from ``attn.add_k_proj`` / ``attn.add_v_proj`` of
every joint block (FLUX's double-stream blocks, SD3's blocks) and from the text rows of ``attn.to_k``
/ ``attn.to_v`` in FLUX's single-stream blocks. On those layers::

    k = W_K·c + Σ_i m_i ⊙ Δ_i(c)          (v alike; rows of image tokens: + Σ_i Δ_i, unmasked)

``m_i`` (batch rows, text tokens) is 1 at LoRA i's trigger tokens on the conditional rows. Every
other LoRA layer (the image stream, the rest of the text stream, modulations) adds its deltas
unmasked, as Merge (:func:`install_text_kv_token_masks`), or, with TARA's ``untokened="region"``,
masked to LoRA i's region as regional LoRA masks them (:func:`install_tara_regions`, on
:class:`~loracompose.attention.regional_dit.DiTRegionalPatches`); the image rows of FLUX's
single-stream K/V then get the region too. The patches are registered on the run's
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
from .masks import LatentGrid
from .regional import RegionMasks
from .regional_dit import DiTRegionalPatches


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


def _weighted_deltas_forward(weight: Callable[[str, torch.Tensor, torch.Tensor], Any]) -> Callable[..., torch.Tensor]:
    """A LoRA layer's forward: its base output plus each active adapter's delta times
    ``weight(adapter, x, output so far)`` (a tensor or number; None: the whole delta)."""
    def weighted_forward(layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise UserError("TARA's token-masked layers do not take per-row adapters; run TARA as one branch")
        result = layer.get_base_layer()(x, *args, **kwargs)
        for name in active_adapters(layer):
            delta, factor = adapter_delta(layer, x, name), weight(name, x, result)
            result = result + (delta if factor is None else delta * factor)
        return result

    return weighted_forward


def _masked_kv_forward(layer_name: str, token_masks: LoraTokenMasks, image_tokens: int,
                       joint_order: tuple[str, ...]) -> Callable[..., torch.Tensor]:
    role = stream_role(layer_name)

    def weight(name: str, x: torch.Tensor, _result: torch.Tensor) -> torch.Tensor | None:
        mask = token_masks.masks.get(name)
        return None if mask is None else _row_token_weights(mask, x, role, image_tokens, joint_order, layer_name)

    return _weighted_deltas_forward(weight)


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


class TaraRegionPatches(DiTRegionalPatches):
    """TARA's deltas with ``untokened="region"`` on a DiT: regional LoRA's masked deltas on every LoRA
    layer (each LoRA's region on the image tokens, the union rule on the text tokens), except the text
    K/V layers, where each delta is weighted by the LoRA's token mask on the text rows and by its region
    on the image rows (FLUX's single-stream K/V). A LoRA whose region is empty keeps only its deltas
    at its trigger tokens (and its text-encoder deltas, which no region touches)."""

    def __init__(self, transformer: torch.nn.Module, token_masks: LoraTokenMasks, masks: RegionMasks,
                 grid: LatentGrid, joint_order: tuple[str, ...], stack: PatchStack) -> None:
        self.token_masks = token_masks
        self.key_value_names = {name for name, _ in text_key_value_layers(transformer)}
        super().__init__(transformer, masks, grid, joint_order, stack)

    def _masked_forward(self, layer_name: str) -> Callable[..., torch.Tensor]:
        if layer_name not in self.key_value_names:
            return super()._masked_forward(layer_name)
        role = stream_role(layer_name)

        def weight(name: str, x: torch.Tensor, result: torch.Tensor) -> Any:
            return self._token_weight(name, x, role, layer_name) * self._region_weight(name, role, result, layer_name)

        return _weighted_deltas_forward(weight)

    def _token_weight(self, adapter: str, x: torch.Tensor, role: StreamRole, layer_name: str) -> torch.Tensor | float:
        mask = self.token_masks.masks.get(adapter)
        if mask is None:
            return 1.0
        return _row_token_weights(mask, x, role, self.image_tokens, self.joint_order, layer_name)

    def _region_weight(self, adapter: str, role: StreamRole, output: torch.Tensor,
                       layer_name: str) -> torch.Tensor | float:
        """1 on the text rows, the adapter's region on the image rows (regional's weights)."""
        region = self.masks.index.get(adapter)
        if region is None or role == "text" or self.masks.coverage(self.grid, 0)[region] == "full":
            return 1.0
        return self._weight(region, role, output, layer_name)


def install_tara_regions(transformer: torch.nn.Module, token_masks: LoraTokenMasks, masks: RegionMasks,
                         token_grid: tuple[int, int], joint_order: tuple[str, ...],
                         stack: PatchStack) -> TaraRegionPatches:
    """Token-masked text K/V deltas and every other delta in its LoRA's region, on every LoRA layer of
    ``transformer`` (:class:`TaraRegionPatches`); the run's ``stack`` undoes them."""
    return TaraRegionPatches(transformer, token_masks, masks, LatentGrid(*token_grid), joint_order, stack)
