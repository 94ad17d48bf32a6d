"""Per-block LoRA strengths: diffusers' ``set_adapters`` dict form, and A1111 lora-block-weight vectors.

The dict form (``{"unet": {"down": 0.5, "mid": 1.0, "up": {"block_1": [0.2, 0.6, 1.0]}},
"text_encoder": 0.8}``) means what it means in diffusers: each attention block's layers at its value,
a ResNet beside the attention of the same index at that attention's value, everything else at 1. The
factors are baked into the loaded layers (so every method, not only Merge, sees them); the LoRA's
weight then scales them all.

An A1111 lora-block-weight vector (``lbw=``) lists one strength per block with attention, in the
order BASE (text encoders), IN.., MID, OUT.. of the original UNet: 17 values for SD1.5 (BASE, IN01,
IN02, IN04, IN05, IN07, IN08, MID, OUT03..OUT11) or 12 for SDXL (BASE, IN04, IN05, IN07, IN08, MID,
OUT00..OUT05). It is turned into the dict form for the standard SD1.5 / SDXL UNets. ``lbw=NAME`` names
one of the extension's default presets (:data:`LBW_PRESETS`, SD1.5 vectors; case as in the extension).
A vector must match the UNet's block layout: an SD1.5 vector on an SDXL model is refused when the LoRA
is loaded.
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
# Attentions per down block, whether the mid block has one, attentions per up block: the layout a vector's
# blocks are for (diffusers' standard SD1.x/2.x and SDXL UNets).
_LAYOUTS = {"SD1.5": ((2, 2, 2, 0), True, (0, 3, 3, 3)), "SDXL": ((0, 2, 2), True, (3, 3, 0))}

SD15_LBW_BLOCKS = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
                   "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
# The default presets of A1111's sd-webui-lora-block-weight extension (all SD1.5 vectors; it ships no SDXL
# ones): the blocks at 1, every other block at 0; ALL0.5 is every block at 0.5.
_PRESET_BLOCKS = {
    "NONE": (),
    "ALL": SD15_LBW_BLOCKS,
    "INS": ("BASE", "IN01", "IN02", "IN04"),
    "IND": ("BASE", "IN05", "IN07", "IN08"),
    "INALL": ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08"),
    "MIDD": ("BASE", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06"),
    "OUTD": ("BASE", "OUT03", "OUT04", "OUT05", "OUT06"),
    "OUTS": ("BASE", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"),
    "OUTALL": ("BASE", *SD15_LBW_BLOCKS[8:]),
}
LBW_PRESETS: dict[str, tuple[float, ...]] = {
    **{name: tuple(float(block in on) for block in SD15_LBW_BLOCKS) for name, on in _PRESET_BLOCKS.items()},
    "ALL0.5": (0.5,) * len(SD15_LBW_BLOCKS),
}
"""Preset name -> its 17-value SD1.5 vector (BASE, IN01, ..., MID, OUT03..OUT11)."""


class LbwBlockWeights(dict):
    """The dict form made from an lbw vector; remembers what the user wrote and which layout it is for."""

    spelled: str = ""
    architecture: str = ""


def lbw_block_weights(text: str, source: str) -> dict[str, Any]:
    """An A1111 lora-block-weight vector (17 or 12 comma-separated numbers, or a preset name from
    :data:`LBW_PRESETS`) as diffusers' dict form."""
    values = _lbw_values(text.strip(), source)
    if len(values) not in LBW_LENGTHS:
        raise UserError(f"{source}: lbw={text!r} must be a preset name ({', '.join(LBW_PRESETS)}), 17 numbers "
                        "(SD1.5: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03..OUT11) or 12 (SDXL: BASE, "
                        "IN04, IN05, IN07, IN08, MID, OUT00..OUT05)")
    architecture, slots, text_encoders = LBW_LENGTHS[len(values)]
    unet: dict[str, Any] = {"down": {}, "up": {}}
    for (side, block), value in zip(slots, values[1:]):
        if side == "mid":
            unet["mid"] = value
        else:
            unet[side].setdefault(f"block_{block}", []).append(value)
    result = LbwBlockWeights({"unet": unet, **dict.fromkeys(text_encoders, values[0])})
    result.spelled, result.architecture = text.strip(), architecture
    return result


def _lbw_values(text: str, source: str) -> tuple[float, ...]:
    """The numbers of a preset name or a comma-separated vector; () when they are neither."""
    if text in LBW_PRESETS:
        return LBW_PRESETS[text]
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 1 and any(part in ("R", "U") or part.startswith("X") for part in parts):
        raise UserError(f"{source}: lbw={text!r}: the extension's random (R, U) and inherited (X) values are not "
                        "supported; write numbers")
    if text.upper() in LBW_PRESETS:
        raise UserError(f"{source}: lbw={text!r}: preset names are upper case, as in the extension; write "
                        f"lbw={text.upper()}")
    try:
        return tuple(float(part) for part in parts)
    except ValueError:
        return ()


def check_lbw_layout(block_weights: Mapping[str, Any], unet: Any, source: str) -> None:
    """Refuse an lbw vector made for another block layout than ``unet``'s (17 values on SDXL, ...)."""
    architecture = getattr(block_weights, "architecture", "")
    if not architecture or unet is None:
        return
    found = _attention_layout(unet)
    if found == _LAYOUTS[architecture]:
        return
    other = next((name for name, layout in _LAYOUTS.items() if layout == found), None)
    spelled = getattr(block_weights, "spelled", "")
    wanted = {"SD1.5": "12 numbers (SDXL)", "SDXL": "17 numbers or a preset name (SD1.5)"}
    fix = f"give {wanted[architecture]}" if other else "use the block_weights dict form"
    raise UserError(f"{source}: lbw={spelled} is an {architecture} vector, but this model's UNet has "
                    f"{'the ' + other if other else 'neither the SD1.5 nor the SDXL'} block layout; {fix}")


def _attention_layout(unet: Any) -> tuple[tuple[int, ...], bool, tuple[int, ...]]:
    def attentions(block: Any) -> int:
        return len(getattr(block, "attentions", None) or ())

    return (tuple(attentions(block) for block in unet.down_blocks), attentions(unet.mid_block) > 0,
            tuple(attentions(block) for block in unet.up_blocks))


def layer_factors(block_weights: Mapping[str, Any], component: str, modules: list[str], unet: Any,
                  source: str) -> dict[str, float]:
    """Each module's factor under the dict form, as diffusers' ``set_adapters`` would scale it."""
    check_lbw_layout(block_weights, unet, source)
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
