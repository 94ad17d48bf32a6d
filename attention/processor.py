"""The attention processor every composition method installs: stock attention plus optional parts.

:class:`ComposeAttnProcessor` computes what diffusers' ``AttnProcessor2_0`` computes, on the kernel
picked by ``backend`` (``"sdpa"``, ``"xformers"`` or ``"flex"``), and adds only what it is given:

* ``store`` (:class:`~loracompose.attention.capture.AttentionStore`): attention maps (CLoRA,
  LoRA-Composer losses);
* ``token_masks`` (:class:`~loracompose.attention.lora_deltas.LoraTokenMasks`): token-masked LoRA
  deltas on cross-attention ``to_k``/``to_v`` (TARA);
* ``regions`` (:class:`~loracompose.attention.regions.RegionAttention`): concept injection on
  cross-attention and isolation on self-attention (LoRA-Composer).

The controllers hold the state and are shared by all processors of a method, which updates them
between steps. Per-call overrides can also come through ``cross_attention_kwargs`` under the names
declared in ``__call__`` (``lora_token_masks``, ``region_attention``); diffusers drops any name a
processor does not declare. Note that the UNet hands the same kwargs to every attention layer, so
layers still on a stock processor log "cross_attention_kwargs [...] are not expected by
AttnProcessor2_0 and will be ignored." on every call: prefer the controllers unless every layer runs
this processor.

Install with :func:`~loracompose.attention.layers.install_processors` (one instance per layer), which
binds each processor to its layer's level and to the UNet call's latent size.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch

from loracompose.errors import UserError

from .capture import AttentionStore
from .kernels import attention_kernel, dense_bias
from .layers import AttentionLayer, UNetCall
from .lora_deltas import LoraTokenMasks, adapter_projection, token_masked_projection
from .masks import LatentGrid
from .regions import Region, RegionAttention


# Kernels on which isolation runs as unmasked calls per query group (attention/regions.py); flex keeps
# its BlockMask, which skips the forbidden tiles itself.
GROUPED_ISOLATION_KERNELS = ("sdpa", "xformers")


class ComposeAttnProcessor:
    """Attention on a fused kernel with optional map capture, token-masked LoRA K/V and regions."""

    def __init__(self, backend: str = "sdpa", *, store: AttentionStore | None = None,
                 token_masks: LoraTokenMasks | None = None, regions: RegionAttention | None = None) -> None:
        self.kernel = attention_kernel(backend)
        self.store = store
        self.token_masks = token_masks
        self.regions = regions
        self.layer: AttentionLayer | None = None
        self.call: UNetCall | None = None

    def bind(self, layer: AttentionLayer, call: UNetCall) -> None:
        """Called by ``install_processors``: the layer this instance serves and the UNet call state."""
        self.layer, self.call = layer, call

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        lora_token_masks: Mapping[str, torch.Tensor] | None = None,
        region_attention: RegionAttention | None = None,
    ) -> torch.Tensor:
        """The stock processor's result plus the configured extras.

        ``lora_token_masks`` and ``region_attention`` override the controllers for this call only.
        """
        residual = hidden_states
        x, spatial_shape = _tokens_first(attn, hidden_states, temb)
        is_cross = encoder_hidden_states is not None
        context = _context(attn, x, encoder_hidden_states)
        bias = _stock_bias(attn, attention_mask, context.shape[1], x.shape[0])
        masks = lora_token_masks if lora_token_masks is not None else getattr(self.token_masks, "masks", None)
        regions = region_attention or self.regions
        if is_cross and regions is not None and _injects(regions):
            out = self._region_cross_attention(attn, x, context, encoder_hidden_states, masks, regions, bias)
        elif is_cross:
            out = self._attention(attn, x, context, masks, bias, isolation=None)
        else:
            out = self._attention(attn, x, context, None, bias, isolation=regions if _isolates(regions) else None)
        return _finish(attn, out, residual, spatial_shape)

    # -- plain path ------------------------------------------------------------------------------
    def _attention(self, attn, x, context, masks, bias, isolation: RegionAttention | None) -> torch.Tensor:
        query = _query(attn, x)
        key, value = _key_value(attn, context, masks=masks)
        codes = None
        if isolation is not None:
            grid, level = self._where()
            codes = isolation.codes(grid, level, x.device)
        grouped = bias is None and self.kernel.name in GROUPED_ISOLATION_KERNELS
        if isolation is not None and codes is not None and grouped:
            hidden = isolation.isolated_attention(self.kernel, query, key, value, scale=attn.scale, grid=grid,
                                                  level=level)
        else:
            mask = self._mask(bias, codes, isolation, query)
            hidden = self.kernel.attend(query, key, value, scale=attn.scale, mask=mask)
        if self.store is not None:
            capture_bias = None if bias is None and codes is None else dense_bias(bias, codes, torch.float32)
            self._record(query, key, attn.scale, capture_bias)
        return _project_out(attn, _merge_heads(hidden), adapter=None)

    def _mask(self, bias, codes, isolation, query) -> Any:
        if codes is not None and bias is None:
            grid, level = self._where()
            return isolation.isolation_mask(self.kernel, grid, level, query.dtype, query.device)
        return self.kernel.build_mask(bias=bias, region_codes=codes, dtype=query.dtype)

    # -- regions (LoRA-Composer) ----------------------------------------------------------------
    def _region_cross_attention(self, attn, x, context, raw_states, masks, regions: RegionAttention,
                                bias) -> torch.Tensor:
        if bias is not None:
            raise UserError("encoder_attention_mask cannot be combined with region prompts; drop the attention mask")
        grid, level = self._where()
        layout = regions.layout(grid, level, x.device)
        query = _query(attn, x)
        out = x.new_zeros(x.shape[0], x.shape[1], attn.out_dim)

        key, value = _key_value(attn, context, masks=masks)
        out = self._add_rows(attn, out, query, key, value, layout.background_rows, weights=None, adapter=None)
        self._record(query, key, attn.scale, None)

        for index, region in enumerate(regions.regions):
            build = functools.partial(_region_key_value, attn, x, raw_states, regions, region)
            key, value = regions.region_key_value(self._bound()[0].name, index, x, build)
            out = self._add_rows(attn, out, query, key, value, layout.region_rows[index],
                                 weights=layout.region_weights[index], adapter=region.adapter)
            self._record(query, key, attn.scale, None, source=index)
        return out

    def _add_rows(self, attn, out, query, key, value, rows, weights, adapter) -> torch.Tensor:
        """``out`` plus the attention output of the queries at ``rows`` (times ``weights``), scattered back."""
        if rows.numel() == 0:
            return out
        hidden = self.kernel.attend(query.index_select(2, rows), key, value, scale=attn.scale)
        projected = _project_out(attn, _merge_heads(hidden), adapter)
        if weights is not None:
            projected = projected * weights.to(projected.dtype)[None, :, None]
        return out.index_add_(1, rows, projected)

    # -- shared helpers --------------------------------------------------------------------------
    def _bound(self) -> tuple[AttentionLayer, UNetCall]:
        if self.layer is None or self.call is None:
            raise UserError("this ComposeAttnProcessor is not bound to a layer; install it with install_processors()")
        return self.layer, self.call

    def _where(self) -> tuple[LatentGrid, int]:
        layer, call = self._bound()
        return call.grid, layer.level

    def _record(self, query, key, scale, bias, source: str | int = "global") -> None:
        if self.store is None:
            return
        grid, level = self._where()
        layer, call = self._bound()
        size = grid.level_size(level)
        if size[0] * size[1] != query.shape[2]:
            raise UserError(f"layer {layer.name} has {query.shape[2]} queries, not the {size[0]}x{size[1]} "
                            f"expected at level {level} of a {grid.height}x{grid.width} latent; "
                            "capture maps on UNet layers only")
        self.store.record(layer.name, call.index, size, query, key, scale, bias, source)


def _region_key_value(attn, x: torch.Tensor, raw_states: torch.Tensor, regions: RegionAttention,
                      region: Region) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of ``region``'s prompt states through its adapter's projections."""
    states = _context(attn, x, regions.region_states(region, raw_states))
    return _key_value(attn, states, adapter=region.adapter)


def _injects(regions: RegionAttention | None) -> bool:
    return regions is not None and regions.inject_concepts and bool(regions.regions)


def _isolates(regions: RegionAttention | None) -> bool:
    return regions is not None and regions.isolate_self_attention and bool(regions.regions)


def _tokens_first(attn, hidden_states: torch.Tensor, temb: torch.Tensor | None):
    """The stock processor's input steps: spatial norm, (B, C, H, W) -> (B, HW, C), group norm."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    spatial_shape = None
    if hidden_states.ndim == 4:
        spatial_shape = hidden_states.shape
        batch, channels, height, width = spatial_shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, spatial_shape


def _finish(attn, out: torch.Tensor, residual: torch.Tensor, spatial_shape) -> torch.Tensor:
    """The stock processor's output steps: back to (B, C, H, W), residual, rescale."""
    if spatial_shape is not None:
        out = out.transpose(-1, -2).reshape(spatial_shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _context(attn, x: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
    if encoder_hidden_states is None:
        return x
    return attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states


def _stock_bias(attn, attention_mask, key_length: int, batch: int) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    bias = attn.prepare_attention_mask(attention_mask, key_length, batch)
    return bias.view(batch, attn.heads, -1, bias.shape[-1])


def _split_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = tensor.shape
    return tensor.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _merge_heads(tensor: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = tensor.shape
    return tensor.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def _query(attn, x: torch.Tensor) -> torch.Tensor:
    query = _split_heads(attn.to_q(x), attn.heads)
    return attn.norm_q(query) if attn.norm_q is not None else query


def _key_value(attn, context: torch.Tensor, *, masks: Mapping[str, torch.Tensor] | None = None,
               adapter: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads-split K and V: stock, token-masked LoRA deltas (``masks``) or one ``adapter``'s projection."""
    if adapter is not None:
        key, value = adapter_projection(attn.to_k, context, adapter), adapter_projection(attn.to_v, context, adapter)
    elif masks:
        key = token_masked_projection(attn.to_k, context, masks)
        value = token_masked_projection(attn.to_v, context, masks)
    else:
        key, value = attn.to_k(context), attn.to_v(context)
    key, value = _split_heads(key, attn.heads), _split_heads(value, attn.heads)
    return (attn.norm_k(key) if attn.norm_k is not None else key), value


def _project_out(attn, hidden: torch.Tensor, adapter: str | None) -> torch.Tensor:
    return attn.to_out[1](adapter_projection(attn.to_out[0], hidden, adapter))
