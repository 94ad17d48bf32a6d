"""Which model module a LoRA key names.

LoRA files spell module names three ways: dotted diffusers/PEFT names (``unet.down_blocks.1...to_q``),
kohya's flattened names (``lora_unet_down_blocks_1_..._to_q``, dots replaced by underscores) and, for
SDXL kohya files, the original Stability ("sgm") UNet layout (``input_blocks_4_1_...``,
``middle_block_1_...``, ``output_blocks_...``). kohya's text-encoder names also assume the
``text_model.`` level that transformers 5's ``CLIPTextModel`` no longer has.

Rather than rewriting each spelling by rules, :class:`ModuleIndex` lists the adaptable modules of the
model itself (``nn.Linear`` / ``nn.Conv2d``), flattens their names, and adds the aliases: the name with
and without ``text_model.``, the sgm name of every UNet module (from the UNet's config) and the
reference names of FLUX and SD3 transformer layers (:mod:`.dit_names`; a fused reference layer resolves
to its row split). A key then resolves by flattening its module part and looking it up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from torch import nn

from .dit_names import RowSplit, original_layers

_AMBIGUOUS = "\0ambiguous"
# diffusers ResnetBlock2D layer -> the sgm ResBlock layer it came from.
_SGM_RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_SGM_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def flat(name: str) -> str:
    """kohya's spelling of a dotted module name: every dot an underscore."""
    return name.replace(".", "_")


def adaptable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` of every Linear/Conv2d of ``model``; a PEFT-wrapped layer counts once, by its own name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            wrapped.append(name)
            base = module.get_base_layer()
            if isinstance(base, (nn.Linear, nn.Conv2d)):
                yield name, base
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            yield name, module


@dataclass
class ModuleIndex:
    """The adaptable layers of one model component, found by any spelling of their names."""

    layers: dict[str, nn.Module]
    _by_flat_name: dict[str, str] = field(default_factory=dict, repr=False)
    # FLUX/SD3 reference layers that are several diffusers layers (fused qkv) or reordered rows
    _splits: dict[str, RowSplit] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, model: nn.Module) -> ModuleIndex:
        index = cls(dict(adaptable_modules(model)))
        sgm = _sgm_names(getattr(model, "config", None))
        for name in index.layers:
            index._add(name, name)
            index._add(name.removeprefix("text_model.") if name.startswith("text_model.") else "text_model." + name,
                       name)
            if sgm is not None and (alias := sgm(name)) is not None:
                index._add(alias, name)
        for spelling, split in original_layers(model, index.layers).items():
            if split.is_rename:
                index._add(spelling, split.parts[0][0])
            else:
                index._splits[flat(spelling)] = split
        return index

    def _add(self, spelling: str, name: str) -> None:
        key = flat(spelling)
        known = self._by_flat_name.get(key)
        self._by_flat_name[key] = name if known in (None, name) else _AMBIGUOUS

    def resolve(self, spelling: str) -> str | None:
        """The dotted module name for a dotted or flattened spelling; None if no (single) layer has it."""
        name = self._by_flat_name.get(flat(spelling))
        return None if name in (None, _AMBIGUOUS) else name

    def resolve_split(self, spelling: str) -> RowSplit | None:
        """The diffusers layers and rows a fused FLUX/SD3 reference layer (``img_attn.qkv``) stands for."""
        return self._splits.get(flat(spelling))


def _sgm_names(config: Mapping[str, Any] | None):
    """A function from a diffusers UNet module name to its sgm name, or None for a model that is no UNet."""
    if config is None or "down_block_types" not in config or "up_block_types" not in config:
        return None
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    per_block = config["layers_per_block"]
    down_layers = list(per_block) if isinstance(per_block, (list, tuple)) else [per_block] * len(down_types)
    up_layers = list(reversed(down_layers))
    prefixes: dict[str, str] = {}
    position = 1
    for block, layers in enumerate(down_layers):
        for layer in range(layers):
            prefixes[f"down_blocks.{block}.resnets.{layer}"] = f"input_blocks.{position}.0"
            prefixes[f"down_blocks.{block}.attentions.{layer}"] = f"input_blocks.{position}.1"
            position += 1
        if block < len(down_types) - 1:
            prefixes[f"down_blocks.{block}.downsamplers.0.conv"] = f"input_blocks.{position}.0.op"
            position += 1
    prefixes |= {"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                 "mid_block.resnets.1": "middle_block.2"}
    position = 0
    for block, (kind, layers) in enumerate(zip(up_types, up_layers)):
        for layer in range(layers + 1):
            prefixes[f"up_blocks.{block}.resnets.{layer}"] = f"output_blocks.{position}.0"
            prefixes[f"up_blocks.{block}.attentions.{layer}"] = f"output_blocks.{position}.1"
            position += 1
        if block < len(up_types) - 1:
            slot = 2 if "CrossAttn" in kind else 1
            prefixes[f"up_blocks.{block}.upsamplers.0.conv"] = f"output_blocks.{position - 1}.{slot}.conv"

    def sgm_name(name: str) -> str | None:
        if name in _SGM_TOP_LEVEL:
            return _SGM_TOP_LEVEL[name]
        for prefix, sgm_prefix in prefixes.items():
            if name == prefix:
                return sgm_prefix
            if name.startswith(prefix + "."):
                rest = name[len(prefix) + 1:]
                if ".resnets." in prefix:
                    rest = _SGM_RESNET_LAYERS.get(rest, rest)
                return f"{sgm_prefix}.{rest}"
        return None

    return sgm_name
