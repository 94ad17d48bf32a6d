"""Regional LoRA on DiTs (FLUX.1, SD3/SD3.5): masked deltas on every adapted layer of the transformer.

Every PEFT ``LoraLayer`` of the transformer computes ``base(x) + Σ_k m_k ⊙ Δ_k(x)``, with ``m_k`` per
token of the layer's output (:mod:`loracompose.attention.dit_layers` says which tokens a layer sees):

* image tokens: LoRA k's region on the image-token grid (FLUX: one token per 2x2 latent pixels);
* text tokens (the context stream of joint blocks, the text part of FLUX's single-stream sequence):
  1 when LoRA k's region is non-empty, else 0. The text stream is one sequence that every image token
  attends to, so it carries the deltas of every LoRA drawn somewhere (the union rule). LoRA-Composer's
  per-region text segments give per-token text masks instead (``text_members``, attention/composer_dit.py);
* layers without tokens (timestep/pooled embeddings, adaptive-norm modulations): the whole delta
  when the region is non-empty.

So regions covering the whole image give Merge, empty ones the base model. Regions are binary on the
token grid by the rounding rule of :mod:`loracompose.attention.masks`; one pass of the transformer
per step. The patches are registered on a :class:`~loracompose.pipelines.patches.PatchStack`.
"""

from __future__ import annotations

from types import MethodType
from typing import Any, Callable

import torch
from peft.tuners.lora import LoraLayer

from loracompose.errors import UserError
from loracompose.pipelines.patches import PatchStack

from .dit_layers import StreamRole, image_rows, stream_role, text_rows
from .lora_deltas import active_adapters, adapter_delta
from .masks import LatentGrid
from .regional import RegionMasks


class DiTRegionalPatches:
    """Masked LoRA deltas on every LoRA layer of a DiT transformer, for regions on its token grid.

    Args:
        transformer: the DiT (``run.unet``).
        masks: one region per adapter.
        grid: the image-token grid (``run.model.token_grid``) as a :class:`LatentGrid`.
        joint_order: the order of the streams in a joint sequence (``run.model.joint_order``).
        stack: the run's patch stack, which undoes the patches.
        text_members: bool (regions, text tokens): which text tokens each region's LoRA acts on
            (LoRA-Composer's per-region text segments); None: the union rule.
    """

    def __init__(self, transformer: torch.nn.Module, masks: RegionMasks, grid: LatentGrid,
                 joint_order: tuple[str, ...], stack: PatchStack, text_members: torch.Tensor | None = None) -> None:
        self.masks = masks
        self.grid = grid
        self.joint_order = tuple(joint_order)
        self.text_members = text_members
        for name, module in transformer.named_modules():
            if isinstance(module, LoraLayer):
                stack.forward(module, MethodType(self._masked_forward(name), module))

    @property
    def image_tokens(self) -> int:
        return self.grid.height * self.grid.width

    def _masked_forward(self, layer_name: str) -> Callable[..., torch.Tensor]:
        role = stream_role(layer_name)

        def masked_forward(layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if kwargs.pop("adapter_names", None) is not None:
                raise UserError("regional LoRA layers do not take per-row adapters; run regional as one branch")
            result = layer.get_base_layer()(x, *args, **kwargs)
            for name in active_adapters(layer):
                region = self.masks.index.get(name)
                state = "full" if region is None else self.masks.coverage(self.grid, 0)[region]
                if state == "empty":
                    continue
                delta = adapter_delta(layer, x, name)
                union_text = role == "text" and self.text_members is None
                if region is None or state == "full" or result.ndim == 2 or union_text:
                    result = result + delta
                else:
                    result = result + delta * self._weight(region, role, result, layer_name)
            return result

        return masked_forward

    def _weight(self, region: int, role: StreamRole, output: torch.Tensor, layer_name: str) -> torch.Tensor:
        """Region ``region``'s 0/1 weights shaped to broadcast over ``output`` (tokens or a conv map)."""
        key = ("dit", region, role, tuple(output.shape[1:]), output.dtype, str(output.device))
        # kept in the masks' own cache, which set_areas clears (auto sets each image's masks in turn)
        return self.masks._cached(key, lambda: self._build_weight(region, role, output, layer_name))

    def _build_weight(self, region: int, role: StreamRole, output: torch.Tensor, layer_name: str) -> torch.Tensor:
        image = self.masks.weights(self.grid, 0, output.dtype, output.device)[region]
        if output.ndim == 4:  # SD3's patchify convolution: (batch, channels, token rows, token columns)
            if tuple(output.shape[-2:]) != (self.grid.height, self.grid.width):
                raise UserError(f"DiT layer {layer_name} gives a {output.shape[-2]}x{output.shape[-1]} map, not the "
                                f"{self.grid.height}x{self.grid.width} token grid; regional LoRA cannot place it")
            return image.view(1, 1, self.grid.height, self.grid.width)
        if output.ndim != 3:
            raise UserError(f"LoRA layer {layer_name} gave a {output.ndim}-D output; regional LoRA handles token "
                            "sequences, convolutions and vectors")
        tokens = int(output.shape[1])
        weight = output.new_zeros(tokens)
        text = text_rows(role, tokens, self.image_tokens, self.joint_order, layer_name)
        weight[text] = self._text_weight(region, text, layer_name)
        if role != "text":  # text layers (composer's per-token text masks) have no image rows
            weight[image_rows(role, tokens, self.image_tokens, self.joint_order)] = image
        return weight.view(1, tokens, 1)

    def _text_weight(self, region: int, text: slice, layer_name: str) -> torch.Tensor | float:
        members = self.text_members
        if members is None or text.stop == text.start:
            return 1.0  # the union rule (or no text rows)
        if text.stop - text.start != members.shape[1]:
            raise UserError(f"DiT layer {layer_name} has {text.stop - text.start} text tokens where the region "
                            f"text masks have {members.shape[1]}; run the method through pipe.generate")
        return members[region].float()


def install_regional_dit(transformer: torch.nn.Module, masks: RegionMasks, token_grid: tuple[int, int],
                         joint_order: tuple[str, ...], stack: PatchStack,
                         text_members: torch.Tensor | None = None) -> DiTRegionalPatches:
    """Install masked LoRA deltas on every LoRA layer of ``transformer`` (see the module text); the
    run's ``stack`` undoes them. ``text_members``: per-region text-token masks instead of the union rule."""
    return DiTRegionalPatches(transformer, masks, LatentGrid(*token_grid), joint_order, stack, text_members)
