"""LoRA deltas on attention projections, computed from the PEFT layer's own parts.

PEFT wraps ``to_q/to_k/to_v/to_out.0`` in a ``LoraLayer`` with ``base_layer`` and per-adapter
``lora_A[name]``, ``lora_B[name]``, ``lora_dropout[name]`` and ``scaling[name]`` (alpha/r times the
weight set with ``set_adapters``). Two things need more than the layer's forward:

* **Token-masked deltas (TARA, docs/methods/tara.md).** On cross-attention ``to_k``/``to_v`` each LoRA's
  delta is multiplied by a 0/1 mask over the text tokens::

      k = base(x) + sum_i m_i ⊙ scaling_i · B_i(A_i(x))

  computed directly (not as a forward hook on the PEFT layer, which would have to run the unmasked
  deltas and subtract them again). Masks may differ per batch row, so the unconditional half can be
  masked differently (TARA's own (1, 77, 1) mask leaks into uncond: a pitfall there). Adapters without
  a mask add their delta unmasked, exactly as PEFT would.
* **One adapter's projection (LoRA-Composer regions, docs/methods/composer.md).** ``base(x) + scaling_a · B_a(A_a(x))``
  for one concept, whatever adapters are active.

Because these bypass the PEFT forward, PEFT's per-row ``adapter_names`` (mixed batches) do not reach
these two projections while a mask or a region adapter is in use. Merged (fused) adapters and LoRA
variants such as DoRA cannot be split from the base weight, so they raise :class:`UserError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence, cast

import torch
from peft.tuners.lora import LoraLayer

from loracompose.errors import UserError


@dataclass
class LoraTokenMasks:
    """Per-LoRA 0/1 masks over the text tokens, shared by the processors of all attn2 layers.

    ``masks[adapter]`` has shape (tokens,) or (batch, tokens) — one row per UNet batch row, e.g.
    zeros for the unconditional half. Methods replace ``masks`` between steps when needed.
    """

    masks: dict[str, torch.Tensor] = field(default_factory=dict)


def check_adapters_loaded(unet: torch.nn.Module, adapters: Sequence[str]) -> None:
    """UserError unless every adapter in ``adapters`` has LoRA weights on some layer of ``unet``."""
    loaded = {name for module in unet.modules() if isinstance(module, LoraLayer) for name in module.lora_A}
    missing = sorted(set(adapters) - loaded)
    if missing:
        raise UserError(f"LoRA(s) {missing} are not loaded on the UNet (loaded: {sorted(loaded)}); "
                        "use the adapter names given to load_lora_weights")


def token_mask(positions: Sequence[int], length: int = 77) -> torch.Tensor:
    """A (length,) 0/1 mask that is 1 at ``positions`` (e.g. a rare word's BPE positions)."""
    if any(not 0 <= p < length for p in positions):
        raise UserError(f"token positions {list(positions)} must lie in 0..{length - 1}; "
                        "check the prompt's token indices")
    mask = torch.zeros(length)
    mask[list(positions)] = 1.0
    return mask


def active_adapters(layer: torch.nn.Module) -> list[str]:
    """Adapters of a PEFT layer that its forward would add now (none for plain layers)."""
    if not isinstance(layer, LoraLayer) or layer.disable_adapters:
        return []
    return [name for name in layer.active_adapters if name in layer.lora_A]


def adapter_delta(layer: LoraLayer, x: torch.Tensor, adapter: str) -> torch.Tensor:
    """``scaling · B(A(dropout(x)))`` of one adapter, in the input's dtype."""
    _check_splittable(layer, adapter)
    lora_a = layer.lora_A[adapter]
    delta = layer.lora_B[adapter](lora_a(layer.lora_dropout[adapter](x.to(lora_a.weight.dtype))))
    return (delta * layer.scaling[adapter]).to(x.dtype)


def adapter_projection(layer: torch.nn.Module, x: torch.Tensor, adapter: str | None) -> torch.Tensor:
    """The base projection plus only ``adapter``'s delta; the layer's own forward when ``adapter`` is None.

    A LoRA with no weights on this projection has a zero delta here: the base projection alone (check
    adapter names once with :func:`check_adapters_loaded`; a misspelt name is not caught per layer).
    """
    if adapter is None or not isinstance(layer, LoraLayer):
        return layer(x)
    base = layer.get_base_layer()(x)
    if adapter not in layer.lora_A:
        return base
    return base + adapter_delta(layer, x, adapter)


def token_masked_projection(layer: torch.nn.Module, x: torch.Tensor, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``base(x) + sum_i m_i ⊙ delta_i(x)`` over active adapters; unmasked adapters add their full delta.

    ``x`` is (batch, tokens, features); each mask is (tokens,) or (batch|1, tokens).
    """
    adapters = active_adapters(layer)
    if not any(name in masks for name in adapters):
        return layer(x)
    result = cast(LoraLayer, layer).get_base_layer()(x)  # it has adapters
    for name in adapters:
        delta = adapter_delta(layer, x, name)
        if name in masks:
            delta = delta * _row_token_mask(masks[name], x, name)
        result = result + delta
    return result


def _row_token_mask(mask: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
    """The mask as (batch|1, tokens, 1) in ``x``'s dtype and device, after checking its shape."""
    batch, tokens = x.shape[0], x.shape[1]
    rows = mask.reshape(1, -1) if mask.ndim == 1 else mask
    if rows.ndim != 2 or rows.shape[1] != tokens or rows.shape[0] not in (1, batch):
        raise UserError(
            f"token mask for LoRA {adapter!r} has shape {tuple(mask.shape)}; give ({tokens},) or "
            f"({batch}, {tokens}) to match the text tokens and batch rows"
        )
    return rows.to(device=x.device, dtype=x.dtype)[..., None]


def _check_splittable(layer: LoraLayer, adapter: str) -> None:
    if layer.merged:
        raise UserError(f"LoRA {adapter!r} is fused into the UNet weights; unfuse_lora() before using token or "
                        "region masks")
    if adapter in getattr(layer, "lora_variant", {}):
        raise UserError(f"LoRA {adapter!r} is a variant (e.g. DoRA); token and region masks support plain LoRA only")
