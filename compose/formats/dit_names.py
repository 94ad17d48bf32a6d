"""FLUX.1 and SD3 layer names: the original (BFL / Stability reference) layouts on diffusers' transformers.

diffusers names a FLUX or SD3 transformer's layers its own way (``transformer_blocks.0.attn.to_q``);
LoRA files made with kohya-ss, ComfyUI, XLabs or against the original checkpoints use the reference
implementation's names (``double_blocks.0.img_attn.qkv``, ``single_blocks.0.linear1``,
``joint_blocks.0.x_block.attn.qkv``), where one layer often stands for several diffusers layers:

* a fused projection: ``img_attn.qkv`` is diffusers' ``to_q``, ``to_k`` and ``to_v`` stacked by rows,
  and a FLUX single block's ``linear1`` is ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp``. A LoRA on the
  fused layer, ``delta W = s * up @ down``, is exactly a LoRA on each part: the rows of ``up`` that
  belong to it, with the same ``down`` and scale;
* the final (and SD3's last context) modulation, whose output halves are (shift, scale) in the
  reference code and (scale, shift) in diffusers' ``AdaLayerNormContinuous``: the halves of ``up``
  are swapped.

:func:`original_layers` lists, for a given model, each reference name with the diffusers layers and
rows it becomes. The sizes come from the model's own layers, so the table holds for FLUX.1, its
smaller variants and the tiny test models alike. The table is written here rather than taken from
diffusers' LoRA converters (``_convert_kohya_flux_lora_to_diffusers`` and friends in
``diffusers.loaders.lora_conversion_utils``), which serve the same mapping but fix FLUX.1's sizes
(19 double and 38 single blocks, 3072 / 12288 rows in ``linear1``: any other width fails an assert),
fold alpha into the tensors, drop keys with only a log message (``diff_b``, norm ``diff``, T5 and DoRA
weights; in 0.42 also a kohya file's embedder and final layers, written without the ``transformer.``
prefix the loader keeps) and have no SD3 counterpart; the names and the scale/shift swap follow their
single-file checkpoint converters
(``convert_flux_transformer_checkpoint_to_diffusers``, ``convert_sd3_transformer_checkpoint_to_diffusers``).
The tests check the result against diffusers' own loading where diffusers loads a format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, cast

import torch
from torch import nn

UNET, FLUX, SD3 = "unet", "flux", "sd3"
DIT = "dit"  # a file's "transformer." / "lora_transformer_" keys: FLUX or SD3, not a UNet
FAMILY_NAMES = {UNET: "Stable Diffusion (an SD1.x/SD2/SDXL UNet)", FLUX: "FLUX", SD3: "SD3",
                DIT: "a diffusion transformer (FLUX or SD3)"}

_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_CONTEXT_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")

# Reference name (inside a block) -> diffusers layer(s), in row order of the reference layer.
_FLUX_DOUBLE = {
    "img_attn.qkv": _QKV, "img_attn.proj": ("attn.to_out.0",), "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",), "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": _CONTEXT_QKV, "txt_attn.proj": ("attn.to_add_out",), "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",), "txt_mod.lin": ("norm1_context.linear",),
    # XLabs' LoRA attention processors sit on the same projections.
    "processor.qkv_lora1": _QKV, "processor.proj_lora1": ("attn.to_out.0",),
    "processor.qkv_lora2": _CONTEXT_QKV, "processor.proj_lora2": ("attn.to_add_out",),
}
_FLUX_SINGLE = {
    "linear1": (*_QKV, "proj_mlp"), "linear2": ("proj_out",), "modulation.lin": ("norm.linear",),
    "processor.qkv_lora": _QKV, "processor.proj_lora": ("proj_out",),  # XLabs
}
_FLUX_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_SD3_JOINT = {
    "x_block.attn.qkv": _QKV, "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",), "x_block.mlp.fc2": ("ff.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.attn.qkv": _CONTEXT_QKV, "context_block.attn.proj": ("attn.to_add_out",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",), "context_block.mlp.fc2": ("ff_context.net.2",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
}
_SD3_TOP = {
    "x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}

# Flattened (kohya-style) name starts that only one model family's LoRAs have.
_FAMILY_MARKERS = (
    (SD3, ("joint_blocks_", "x_embedder_proj", "t_embedder_", "y_embedder_", "pos_embed_")),
    (FLUX, ("double_blocks_", "single_blocks_", "single_transformer_blocks_", "x_embedder", "img_in",
            "txt_in", "time_in_", "vector_in_", "guidance_in_", "time_text_embed_guidance_embedder_")),
    (UNET, ("down_blocks_", "up_blocks_", "mid_block_", "input_blocks_", "output_blocks_", "middle_block_",
            "conv_in", "conv_out", "time_embedding_", "add_embedding_")),
)


@dataclass(frozen=True)
class RowSplit:
    """A reference layer that is several diffusers layers (or one with its rows reordered).

    ``parts`` lists each diffusers layer with the reference layer's row ranges that, concatenated,
    are that layer's rows; ``rows`` is the reference layer's row count.
    """

    parts: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]
    rows: int

    @property
    def is_rename(self) -> bool:
        """One diffusers layer, rows in order: the reference name is only another spelling."""
        return len(self.parts) == 1 and self.parts[0][1] == ((0, self.rows),)

    def fused_weight(self, layers: Mapping[str, nn.Module]) -> torch.Tensor:
        """The reference layer's weight, assembled from the diffusers layers' weights."""
        first = _weight(layers, self.parts[0][0])
        fused = torch.empty((self.rows, *first.shape[1:]), dtype=first.dtype, device=first.device)
        for module, ranges in self.parts:
            weight, offset = _weight(layers, module).detach(), 0
            for start, stop in ranges:
                fused[start:stop] = weight[offset:offset + stop - start]
                offset += stop - start
        return fused

    def split_rows(self, up: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each diffusers layer's rows of a tensor shaped like the reference layer's (its LoRA ``up``)."""
        return {module: torch.cat([up[start:stop] for start, stop in ranges]).contiguous()
                for module, ranges in self.parts}


def model_family(model: nn.Module) -> str | None:
    """FLUX or SD3 for diffusers' transformers, UNET for a UNet, None for anything else (a text encoder)."""
    if hasattr(model, "single_transformer_blocks"):
        return FLUX
    if hasattr(model, "transformer_blocks") and hasattr(model, "pos_embed"):
        return SD3
    if hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):
        return UNET
    return None


def spelling_family(flat_spelling: str) -> str | None:
    """The model family only whose layers a (flattened) layer name can belong to; None when ambiguous."""
    return next((family for family, starts in _FAMILY_MARKERS if flat_spelling.startswith(starts)), None)


def fits_family(file_family: str | None, family: str | None) -> bool:
    """Whether layer names of ``file_family`` (from :func:`spelling_family`, or DIT) can be a model's of
    ``family``; unknown on either side fits."""
    if file_family is None or family is None or file_family == family:
        return True
    return file_family == DIT and family in (FLUX, SD3)


def original_layers(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, RowSplit]:
    """Each reference layer name of a FLUX or SD3 ``model`` whose diffusers layers it has, with its split.

    ``layers`` are the model's adaptable layers by diffusers name.
    """
    family = model_family(model)
    if family == FLUX:
        table = _block_table(model, "double_blocks", "transformer_blocks", _FLUX_DOUBLE)
        table |= _block_table(model, "single_blocks", "single_transformer_blocks", _FLUX_SINGLE)
        table |= {name: (target,) for name, target in _FLUX_TOP.items()}
    elif family == SD3:
        table = _block_table(model, "joint_blocks", "transformer_blocks", _SD3_JOINT)
        table |= {name: (target,) for name, target in _SD3_TOP.items()}
    else:
        return {}
    splits = {}
    for name, targets in table.items():
        if all(target in layers for target in targets):
            splits[name] = _split(model, layers, targets)
    return splits


def _block_table(model: nn.Module, reference: str, diffusers: str,
                 per_block: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    count = len(getattr(model, diffusers))
    return {f"{reference}.{index}.{name}": tuple(f"{diffusers}.{index}.{target}" for target in targets)
            for index in range(count) for name, targets in per_block.items()}


def _weight(layers: Mapping[str, nn.Module], name: str) -> torch.Tensor:
    return cast(torch.Tensor, layers[name].weight)


def _split(model: nn.Module, layers: Mapping[str, nn.Module], targets: tuple[str, ...]) -> RowSplit:
    parts, start = [], 0
    for target in targets:
        rows = int(_weight(layers, target).shape[0])
        ranges: tuple[tuple[int, int], ...]
        if _swaps_scale_shift(model, target):
            half = rows // 2
            ranges = ((start + half, start + rows), (start, start + half))
        else:
            ranges = ((start, start + rows),)
        parts.append((target, ranges))
        start += rows
    return RowSplit(tuple(parts), start)


def _swaps_scale_shift(model: nn.Module, target: str) -> bool:
    """diffusers' AdaLayerNormContinuous reads its projection as (scale, shift); the reference code as
    (shift, scale)."""
    from diffusers.models.normalization import AdaLayerNormContinuous

    parent = target.rpartition(".")[0]
    return isinstance(model.get_submodule(parent), AdaLayerNormContinuous) if parent else False
