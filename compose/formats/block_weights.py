"""Per-block LoRA strengths: diffusers' ``set_adapters`` dict form, and A1111 lora-block-weight vectors.

The dict form (``{"unet": {"down": 0.5, "mid": 1.0, "up": {"block_1": [0.2, 0.6, 1.0]}},
"text_encoder": 0.8}``) means what it means in diffusers: each attention block's layers at its value,
a ResNet beside the attention of the same index at that attention's value, everything else at 1. The
factors are baked into the loaded layers (so every method, not only Merge, sees them); the LoRA's
weight then scales them all.

An A1111 lora-block-weight vector (``lbw=``) lists one strength per block with attention, in the
order BASE (text encoders), IN.., MID, OUT.. of the original UNet: 17 values for SD1.5 (BASE, IN01,
IN02, IN04, IN05, IN07, IN08, MID, OUT03..OUT11) or 12 for SDXL (BASE, IN04, IN05, IN07, IN08, MID,
OUT00..OUT05). It is turned into the dict form for the standard SD1.5 / SDXL UNets.
"""

from __future__ import annotations

from typing import Any, Mapping

from loracompose.errors import UserError

# For each architecture's vector: the dict-form slot of every value after BASE.
_SD15_SLOTS = [("down", 0), ("down", 0), ("down", 1), ("down", 1), ("down", 2), ("down", 2), ("mid", None),
               *[("up", block) for block in (1, 2, 3) for _ in range(3)]]
_SDXL_SLOTS = [("down", 1), ("down", 1), ("down", 2), ("down", 2), ("mid", None),
               *[("up", block) for block in (0, 1) for _ in range(3)]]
LBW_LENGTHS = {17: ("SD1.5", _SD15_SLOTS, ("text_encoder",)),
               12: ("SDXL", _SDXL_SLOTS, ("text_encoder", "text_encoder_2"))}


def lbw_block_weights(text: str, source: str) -> dict[str, Any]:
    """An A1111 lora-block-weight vector (comma-separated numbers) as diffusers' dict form."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in LBW_LENGTHS:
        raise UserError(f"{source}: lbw={text!r} must be 17 numbers (SD1.5: BASE, IN01, IN02, IN04, IN05, IN07, "
                        "IN08, MID, OUT03..OUT11) or 12 (SDXL: BASE, IN04, IN05, IN07, IN08, MID, OUT00..OUT05)")
    _, slots, text_encoders = LBW_LENGTHS[len(values)]
    unet: dict[str, Any] = {"down": {}, "up": {}}
    for (side, block), value in zip(slots, values[1:]):
        if side == "mid":
            unet["mid"] = value
        else:
            unet[side].setdefault(f"block_{block}", []).append(value)
    return {"unet": unet, **dict.fromkeys(text_encoders, values[0])}


def layer_factors(block_weights: Mapping[str, Any], component: str, modules: list[str], unet: Any,
                  source: str) -> dict[str, float]:
    """Each module's factor under the dict form, as diffusers' ``set_adapters`` would scale it."""
    value = block_weights.get(component, 1.0)
    if component != "unet":
        if isinstance(value, Mapping):
            raise UserError(f"{source}: the {component} block weight must be one number")
        return dict.fromkeys(modules, float(value))
    if not isinstance(value, Mapping):
        return dict.fromkeys(modules, float(value))
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    try:
        expanded = _maybe_expand_lora_scales(unet, [dict(value)])[0]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{source}: block weights {dict(value)} do not fit this UNet ({error})") from None
    return {module: float(_module_weight(expanded, module)) for module in modules}


def _module_weight(expanded: Mapping[str, float], module: str) -> float:
    """diffusers' rule: the first block whose name the module's contains; a ResNet takes the attention of
    its block and index; anything else 1."""
    for layer, weight in expanded.items():
        if layer in module:
            return weight
    parts = module.split(".")
    if len(parts) > 3:
        return expanded.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0)
    return 1.0
