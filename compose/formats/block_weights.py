"""Per-block LoRA strengths: diffusers' ``set_adapters`` dict form, and A1111 lora-block-weight vectors.

The dict form (``{"unet": {"down": 0.5, "mid": 1.0, "up": {"block_1": [0.2, 0.6, 1.0]}},
"text_encoder": 0.8}``) means what it means in diffusers: each attention block's layers at its value,
a ResNet beside the attention of the same index at that attention's value, everything else at 1.

An A1111 lora-block-weight vector (``lbw=``) lists one strength per block with attention, in the
order BASE (text encoders), IN.., MID, OUT.. of the original (sgm) UNet: 17 values for SD1.5 (BASE,
IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03..OUT11) or 12 for SDXL (BASE, IN04, IN05, IN07, IN08,
MID, OUT00..OUT05); the extension's full forms list every block (26 for SD1.5: BASE, IN00..IN11, MID,
OUT00..OUT11; 20 for SDXL: BASE, IN00..IN08, MID, OUT00..OUT08). It means what it means in the
sd-webui-lora-block-weight extension, for every layer a LoRA, LoCon, LoHa or LoKr touches: a layer
takes the strength of the sgm block it sits in (``conv_in`` is IN00, the mid block's ResNets are MID,
an upsampler is in the output block it closes), 0 for a block the vector does not list (SD1.5: IN00,
IN03, IN06, IN09-IN11, OUT00-OUT02; SDXL: IN00-IN03, IN06, OUT06-OUT08), and a layer outside the
blocks (time and label embeddings, ``conv_out``) keeps 1.
``lbw=NAME`` names one of the extension's default presets (:data:`LBW_PRESETS`, SD1.5 vectors; case as
in the extension). A vector must match the UNet's block layout: an SD1.5 vector on an SDXL model is
refused when the LoRA is loaded.

Either way the factors are baked into the loaded layers' deltas (so every method, not only Merge, sees
them); the LoRA's weight then scales them all.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from loracompose.errors import UserError

from .names import _sgm_names


def _sgm_blocks(count: int) -> tuple[str, ...]:
    """Every block of an sgm UNet with ``count`` input and output blocks, as the extension names them
    (its M00 is MID here)."""
    return ("BASE", *(f"IN{index:02d}" for index in range(count)), "MID",
            *(f"OUT{index:02d}" for index in range(count)))


SD15_LBW_BLOCKS = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
                   "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
SDXL_LBW_BLOCKS = ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
# vector length -> (layout, the blocks the vector lists, every block of that layout's UNet)
# (the extension's full 26- and 20-value vectors list every block)
LBW_LENGTHS = {17: ("SD1.5", SD15_LBW_BLOCKS, _sgm_blocks(12)), 26: ("SD1.5", _sgm_blocks(12), _sgm_blocks(12)),
               12: ("SDXL", SDXL_LBW_BLOCKS, _sgm_blocks(9)), 20: ("SDXL", _sgm_blocks(9), _sgm_blocks(9))}
# (ResNets, attentions) per down block, whether the mid block has attention, the same per up block: the
# layout a vector's blocks are for (diffusers' standard SD1.x/2.x and SDXL UNets).
_LAYOUTS = {"SD1.5": (((2, 2), (2, 2), (2, 2), (2, 0)), True, ((3, 0), (3, 3), (3, 3), (3, 3))),
            "SDXL": (((2, 0), (2, 2), (2, 2)), True, ((3, 3), (3, 3), (3, 0)))}

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
    """An lbw vector as the strength of every block of its layout's UNet (``{"BASE": 1.0, "IN00": 0.0,
    "IN01": 1.0, ..., "MID": 1.0, "OUT00": 0.0, ...}``, the blocks it does not list at 0, as the extension
    fills them); remembers what the user wrote and which layout it is for."""

    spelled: str = ""
    architecture: str = ""


def lbw_block_weights(text: str, source: str) -> dict[str, Any]:
    """An A1111 lora-block-weight vector (17 or 26 comma-separated numbers for SD1.5, 12 or 20 for SDXL, or
    a preset name from :data:`LBW_PRESETS`) as the strength of each block of the UNet
    (:class:`LbwBlockWeights`)."""
    values = _lbw_values(text.strip(), source)
    if len(values) not in LBW_LENGTHS:
        raise UserError(f"{source}: lbw={text!r} must be a preset name ({', '.join(LBW_PRESETS)}), 17 numbers "
                        "(SD1.5: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03..OUT11), 12 (SDXL: BASE, "
                        "IN04, IN05, IN07, IN08, MID, OUT00..OUT05), or every block: 26 (SD1.5: BASE, IN00..IN11, "
                        "MID, OUT00..OUT11) or 20 (SDXL: BASE, IN00..IN08, MID, OUT00..OUT08)")
    architecture, listed, every_block = LBW_LENGTHS[len(values)]
    result = LbwBlockWeights({**dict.fromkeys(every_block, 0.0), **dict(zip(listed, values))})
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
    found = _block_layout(unet)
    if found == _LAYOUTS[architecture]:
        return
    other = next((name for name, layout in _LAYOUTS.items() if layout == found), None)
    spelled = getattr(block_weights, "spelled", "")
    wanted = {"SD1.5": "12 or 20 numbers (SDXL)", "SDXL": "17 or 26 numbers or a preset name (SD1.5)"}
    fix = f"give {wanted[architecture]}" if other else "use the block_weights dict form"
    raise UserError(f"{source}: lbw={spelled} is an {architecture} vector, but this model's UNet has "
                    f"{'the ' + other if other else 'neither the SD1.5 nor the SDXL'} block layout; {fix}")


def _block_layout(unet: Any) -> tuple[tuple[tuple[int, int], ...], bool, tuple[tuple[int, int], ...]]:
    def count(block: Any, kind: str) -> int:
        return len(getattr(block, kind, None) or ())

    def side(blocks: Any) -> tuple[tuple[int, int], ...]:
        return tuple((count(block, "resnets"), count(block, "attentions")) for block in blocks)

    return side(unet.down_blocks), count(unet.mid_block, "attentions") > 0, side(unet.up_blocks)


def layer_factors(block_weights: Mapping[str, Any], component: str, modules: list[str], unet: Any,
                  source: str) -> dict[str, float]:
    """Each module's factor: the extension's rule for an lbw vector (:class:`LbwBlockWeights`), else
    the dict form as diffusers' ``set_adapters`` would scale it."""
    check_lbw_layout(block_weights, unet, source)
    if isinstance(block_weights, LbwBlockWeights):
        return _lbw_factors(block_weights, component, modules, unet, source)
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


def _lbw_factors(block_weights: LbwBlockWeights, component: str, modules: list[str], unet: Any,
                 source: str) -> dict[str, float]:
    """The extension's rule: a text encoder's layers take BASE; a UNet layer the strength of the sgm
    block it is in (0 where the vector lists none), a layer outside the blocks 1."""
    if component.startswith("text_encoder"):
        return dict.fromkeys(modules, float(block_weights["BASE"]))
    if component != "unet" or unet is None:
        raise UserError(f"{source}: lbw= vectors are for SD1.5/SDXL UNets, not a {component}; give one strength")
    sgm_name = _sgm_names(unet.config)
    return {module: _sgm_block_strength(block_weights, sgm_name(module) if sgm_name else None)
            for module in modules}


_SGM_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.")
_BLOCK_PREFIX = {"input_blocks": "IN", "output_blocks": "OUT"}


def _sgm_block_strength(block_weights: Mapping[str, float], sgm_name: str | None) -> float:
    found = _SGM_BLOCK.match(sgm_name or "")
    if found is None:
        return 1.0  # time_embed, label_emb, out: in no block
    if found[1] == "middle_block":
        return float(block_weights["MID"])
    return float(block_weights[f"{_BLOCK_PREFIX[found[1]]}{int(found[2]):02d}"])


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
