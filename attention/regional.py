"""Regional LoRA: each LoRA confined to its region on every UNet layer it adapts, in one UNet pass.

Every PEFT ``LoraLayer`` of the UNet computes, instead of ``base(x) + Σ_k Δ_k(x)``::

    base(x) + Σ_k m_k ⊙ Δ_k(x)          Δ_k = scaling_k · B_k(A_k(x)), PEFT's own delta

with ``m_k`` LoRA k's region at the resolution of that layer's output: per token for linear layers on
``(batch, rows·columns, channels)`` hidden states (attention q/k/v/out, FFN, linear projections), per
pixel for convolutions (``(batch, channels, rows, columns)``, the output's size, so strided and
upsampling convolutions line up). A layer without positions (the time embedding, SDXL's added
embeddings: ``(batch, features)``) adds a LoRA's delta whole when its region is non-empty.

Cross-attention sees per position the prompt of the LoRAs there: the queries are grouped by the set
``S`` of regions they lie in, and each group attends to the states of ``S``'s prompt (encoded with the
text-encoder deltas of ``S``'s LoRAs) through ``to_k``/``to_v`` with ``S``'s deltas; queries in no region
attend to the base prompt through the base projections. So at every position the model is Merge of
the LoRAs whose regions cover it: whole-image regions are Merge exactly, empty ones the base model.

Masks are binary at every level, by the one rounding rule of :mod:`loracompose.attention.masks` (a
cell is in when half of it is covered): boxes get exact coverage per level, mask tensors are
area-averaged. Each level's masks and query groups are computed once per latent size and cached.

Everything this changes on a UNet is registered on a :class:`~loracompose.pipelines.patches.PatchStack`
(:func:`install_regional`): the run's, which the loop unwinds, or one of the patches' own (``restore``).
"""

from __future__ import annotations

from types import MethodType
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from peft.tuners.lora import LoraLayer

from loracompose.errors import UserError
from loracompose.pipelines.patches import PatchStack

from .layers import UNetCall, attention_layers
from .lora_deltas import active_adapters, adapter_delta
from .masks import Box, LatentGrid
from .processor import _context, _finish, _merge_heads, _split_heads, _tokens_first
from .regions import MAX_REGIONS

RegionArea = Box | torch.Tensor | None  # None: the whole image
# Group code (bit r set: region r covers the position; 0: no region) -> encoder states, rows like the UNet batch.
GroupStates = Callable[[int], torch.Tensor]


def code_members(code: int, count: int) -> list[int]:
    """The region indices whose bit is set in ``code``."""
    return [index for index in range(count) if code >> index & 1]


class RegionMasks:
    """One region per adapter (a :class:`Box`, a 2-D mask tensor of any size, or None for the whole
    image) and their binary masks at every level of a latent grid, cached per grid and device."""

    def __init__(self, adapters: Sequence[str], areas: Sequence[RegionArea]) -> None:
        if len(adapters) != len(areas):
            raise UserError(f"{len(areas)} regions for {len(adapters)} LoRAs; give one region per LoRA")
        if len(adapters) > MAX_REGIONS:
            raise UserError(f"{len(adapters)} regions given; at most {MAX_REGIONS} are supported")
        self.adapters = list(adapters)
        self.index = {name: position for position, name in enumerate(self.adapters)}
        self.set_areas(areas)

    def set_areas(self, areas: Sequence[RegionArea]) -> None:
        """Replace the regions (same adapters, same order); clears the cached masks."""
        if len(areas) != len(self.adapters):
            raise UserError(f"{len(areas)} regions for {len(self.adapters)} LoRAs; give one region per LoRA")
        for area in areas:
            if area is not None and not isinstance(area, (Box, torch.Tensor)):
                raise UserError(f"region {area!r} is neither a Box, a 2-D mask tensor nor None (whole image)")
        self.areas = list(areas)
        self._cache: dict[tuple, Any] = {}

    def _cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def members(self, grid: LatentGrid, level: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool (regions, rows·columns): which cells of ``level`` each region covers."""
        def build() -> torch.Tensor:
            rows, columns = grid.level_size(level)
            masks = [torch.ones(rows * columns, dtype=torch.bool) if area is None
                     else grid.region_mask(area, level).flatten() for area in self.areas]
            return torch.stack(masks).to(device) if masks else torch.zeros(0, rows * columns, dtype=torch.bool)

        return self._cached(("members", grid, level, str(device)), build)

    def weights(self, grid: LatentGrid, level: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The masks as 0/1 numbers (regions, rows·columns)."""
        return self._cached(("weights", grid, level, dtype, str(device)),
                            lambda: self.members(grid, level, device).to(dtype))

    def coverage(self, grid: LatentGrid, level: int, device: torch.device | str = "cpu") -> list[str]:
        """Per region at ``level``: ``"empty"``, ``"full"`` or ``"part"`` (empty and full skip the masking)."""
        def build() -> list[str]:
            members = self.members(grid, level, "cpu")
            return ["empty" if not bool(m.any()) else "full" if bool(m.all()) else "part" for m in members]

        return self._cached(("coverage", grid, level), build)

    def nonempty(self, grid: LatentGrid) -> list[bool]:
        """Per region: whether it covers any latent cell."""
        return [state != "empty" for state in self.coverage(grid, 0)]

    def level_for_size(self, grid: LatentGrid, rows: int, columns: int) -> int:
        """The level whose feature map is ``rows`` x ``columns``."""
        for level in range(self.num_levels(grid)):
            if grid.level_size(level) == (rows, columns):
                return level
        raise UserError(f"a {rows}x{columns} feature map is no level of a {grid.height}x{grid.width} latent; "
                        "regional LoRA runs on UNet layers only")

    def level_for_tokens(self, grid: LatentGrid, tokens: int) -> int | None:
        """The level with ``tokens`` cells, or None."""
        for level in range(self.num_levels(grid)):
            rows, columns = grid.level_size(level)
            if rows * columns == tokens:
                return level
        return None

    @staticmethod
    def num_levels(grid: LatentGrid) -> int:
        levels = 1
        while grid.level_size(levels - 1) != (1, 1):
            levels += 1
        return levels

    def codes(self, grid: LatentGrid, level: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 (rows·columns,): bit r set where region r covers the cell, 0 outside every region."""
        def build() -> torch.Tensor:
            members = self.members(grid, level, device).long()
            bits = torch.tensor([1 << r for r in range(len(self.areas))], dtype=torch.int64, device=members.device)
            return (members * bits[:, None]).sum(dim=0)

        return self._cached(("codes", grid, level, str(device)), build)

    def groups(self, grid: LatentGrid, level: int, device: torch.device) -> list[tuple[int, torch.Tensor]]:
        """(code, query rows) per group of cells at ``level`` sharing a code."""
        def build() -> list[tuple[int, torch.Tensor]]:
            codes = self.codes(grid, level, device)
            return [(int(code), (codes == code).nonzero().squeeze(1)) for code in torch.unique(codes).tolist()]

        return self._cached(("groups", grid, level, str(device)), build)

    def all_codes(self, grid: LatentGrid) -> list[int]:
        """Every code present at some level of ``grid`` (the groups cross-attention will ask for)."""
        return sorted({code for level in range(self.num_levels(grid))
                       for code in self.codes(grid, level).unique().tolist()})


class RegionalPatches:
    """What regional LoRA changes on a UNet: every LoRA layer's forward (masked deltas) and, given
    ``states``, every cross-attention processor (per-group prompts), each registered on ``stack``.

    ``states(code)`` returns the encoder states for the group of regions in ``code`` (0: no region);
    without ``states`` cross-attention keeps its processors and its ``to_k``/``to_v`` take the masked
    deltas' rule for layers without positions (whole delta for a non-empty region).

    ``stack``: a run's :class:`PatchStack` (``run.patches``), which undoes the patches when the run
    unwinds it; None gives the patches a stack of their own, undone by :meth:`restore`. ``skip``: LoRA
    layers left as they are (another method computes their deltas, e.g. TARA's token-masked K/V).
    """

    def __init__(self, unet: torch.nn.Module, masks: RegionMasks, states: GroupStates | None = None,
                 stack: PatchStack | None = None, skip: Sequence[torch.nn.Module] = ()) -> None:
        self.unet = unet
        self._skip = {id(layer) for layer in skip}
        self.masks = masks
        self.states = states
        self.call = UNetCall()
        self.key_values: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._own_stack = stack is None
        self.stack = PatchStack() if stack is None else stack
        try:
            self._install()
        except BaseException:
            if self._own_stack:
                self.stack.unwind()
            raise

    def _install(self) -> None:
        self.stack.on_unwind(self.clear_key_values)
        self.stack.hook(self.unet.register_forward_pre_hook(self._record_call, with_kwargs=True))
        text_side: set[int] = set(self._skip)
        if self.states is not None:
            text_side |= {id(projection) for module in self.unet.modules()
                          if isinstance(module, Attention) and getattr(module, "is_cross_attention", False)
                          for projection in (module.to_k, module.to_v)}
        for name, module in self.unet.named_modules():
            if isinstance(module, LoraLayer) and id(module) not in text_side:
                self.stack.forward(module, MethodType(_masked_forward(self, name), module))
        states = self.states
        if states is not None:
            layers = [layer for layer in attention_layers(self.unet) if layer.is_cross]
            self.stack.processors(self.unet, {layer.name: RegionalCrossAttnProcessor(self, states)
                                              for layer in layers})

    def _record_call(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.call.record(args[0] if args else kwargs["sample"])

    @property
    def grid(self) -> LatentGrid:
        return self.call.grid

    def clear_key_values(self) -> None:
        """Forget cached cross-attention K/V (after changing LoRA strengths or group states)."""
        self.key_values = {}

    def restore(self) -> None:
        """Undo the patches installed on a stack of their own (safe to call twice); patches on a
        run's stack are undone by the run."""
        if not self._own_stack:
            raise RuntimeError("these regional patches are on a run's patch stack; the run unwinds them")
        self.stack.unwind()


def install_regional(unet: torch.nn.Module, masks: RegionMasks, states: GroupStates | None = None,
                     stack: PatchStack | None = None, skip: Sequence[torch.nn.Module] = ()) -> RegionalPatches:
    """Install masked LoRA deltas (and, with ``states``, per-group cross-attention) on ``unet``.

    The adapters active on the UNet at call time are the ones applied; an active adapter that has no
    region in ``masks`` adds its whole delta. With ``stack`` (a run's ``run.patches``) the run undoes
    the patches; without, call ``restore()`` on the result when done. ``skip``: LoRA layers left alone.
    """
    return RegionalPatches(unet, masks, states, stack, skip)


def _masked_forward(patches: RegionalPatches, layer_name: str) -> Callable[..., torch.Tensor]:
    def masked_forward(layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise UserError("regional LoRA layers do not take per-row adapters; run regional as one branch")
        result = layer.get_base_layer()(x, *args, **kwargs)
        adapters = active_adapters(layer)
        if not adapters:
            return result
        masks = patches.masks
        for name in adapters:
            region = masks.index.get(name)
            if region is None:
                result = result + adapter_delta(layer, x, name)
                continue
            weight = _output_mask(masks, patches.grid, result, region, layer_name)
            if weight is None:
                continue
            delta = adapter_delta(layer, x, name)
            result = result + (delta if isinstance(weight, str) else delta * weight)
        return result

    return masked_forward


def _output_mask(masks: RegionMasks, grid: LatentGrid, output: torch.Tensor, region: int,
                 layer_name: str) -> torch.Tensor | str | None:
    """Region ``region``'s mask shaped to broadcast over ``output``; ``"full"`` for no masking, None to
    skip the delta."""
    if output.ndim == 2:  # (batch, features): no positions
        return "full" if masks.nonempty(grid)[region] else None
    level = _output_level(masks, grid, output, layer_name)
    state = masks.coverage(grid, level)[region]
    if state != "part":
        return "full" if state == "full" else None
    weight = masks.weights(grid, level, output.dtype, output.device)[region]
    if output.ndim == 4:
        return weight.view(1, 1, *output.shape[-2:])
    return weight.view(1, -1, 1)


def _output_level(masks: RegionMasks, grid: LatentGrid, output: torch.Tensor, layer_name: str) -> int:
    """The level of ``grid`` whose feature map ``output`` (convolution or token layout) is on."""
    if output.ndim == 4:
        return masks.level_for_size(grid, int(output.shape[-2]), int(output.shape[-1]))
    if output.ndim != 3:
        raise UserError(f"LoRA layer {layer_name} gave a {output.ndim}-D output; regional LoRA handles linear and "
                        "2-D convolution layers")
    level = masks.level_for_tokens(grid, int(output.shape[1]))
    if level is None:
        raise UserError(f"LoRA layer {layer_name} got {output.shape[1]} tokens, which is no feature-map size "
                        f"of this {grid.height}x{grid.width} latent; regional LoRA cannot place its delta")
    return level


def group_projection(layer: torch.nn.Module, x: torch.Tensor, adapters: Sequence[str]) -> torch.Tensor:
    """``base(x) + Σ Δ_a(x)`` over the active adapters in ``adapters`` (PEFT's order, so a group of
    every active adapter is PEFT's own sum)."""
    if not isinstance(layer, LoraLayer):
        return layer(x)
    result = layer.get_base_layer()(x)
    for name in active_adapters(layer):
        if name in adapters:
            result = result + adapter_delta(layer, x, name)
    return result


class RegionalCrossAttnProcessor:
    """Cross-attention whose queries attend, per group of regions, to that group's prompt states
    through ``to_k``/``to_v`` with the group's deltas (the stock computation for a single group)."""

    def __init__(self, patches: RegionalPatches, states: GroupStates) -> None:
        self.patches = patches
        self.states = states
        self.layer_name = ""

    def bind(self, layer: Any, call: UNetCall) -> None:
        self.layer_name = layer.name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 temb: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise UserError(f"layer {self.layer_name} is cross-attention but got no encoder states")
        if attention_mask is not None:
            raise UserError("an encoder attention mask cannot be combined with regional prompts; drop the mask")
        residual = hidden_states
        x, spatial_shape = _tokens_first(attn, hidden_states, temb)
        query = _split_heads(attn.to_q(x), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        hidden = self._attend_groups(attn, x, query)
        out = attn.to_out[1](attn.to_out[0](_merge_heads(hidden).to(query.dtype)))
        return _finish(attn, out, residual, spatial_shape)

    def _attend_groups(self, attn: Attention, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Attention output per query, each group of queries on its own group's keys and values."""
        grid, masks = self.patches.grid, self.patches.masks
        level = masks.level_for_tokens(grid, x.shape[1])
        if level is None:
            raise UserError(f"layer {self.layer_name} has {x.shape[1]} queries, no feature-map size of this "
                            f"{grid.height}x{grid.width} latent")
        (code, rows), *rest = masks.groups(grid, level, x.device)
        if not rest:  # one group covers every query
            return self._attend(attn, query, *self._key_value(attn, x, code))
        part = self._attend(attn, query.index_select(2, rows), *self._key_value(attn, x, code))
        hidden = part.new_empty(*query.shape[:-1], part.shape[-1])
        hidden.index_copy_(2, rows, part)
        for code, rows in rest:
            part = self._attend(attn, query.index_select(2, rows), *self._key_value(attn, x, code))
            hidden.index_copy_(2, rows, part)
        return hidden

    @staticmethod
    def _attend(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        default = query.shape[-1] ** -0.5
        scale = None if abs(attn.scale - default) < 1e-12 else attn.scale
        return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=scale)

    def _key_value(self, attn: Attention, x: torch.Tensor, code: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.layer_name, code, x.shape[0], x.dtype, str(x.device))
        cached = self.patches.key_values.get(key)
        if cached is None:
            states = _batch_rows(self.states(code), x.shape[0]).to(device=x.device, dtype=x.dtype)
            context = _context(attn, x, states)
            adapters = [self.patches.masks.adapters[r] for r in code_members(code, len(self.patches.masks.adapters))]
            k = _split_heads(group_projection(attn.to_k, context, adapters), attn.heads)
            v = _split_heads(group_projection(attn.to_v, context, adapters), attn.heads)
            cached = (attn.norm_k(k) if attn.norm_k is not None else k, v)
            self.patches.key_values[key] = cached
        return cached


def _batch_rows(states: torch.Tensor, batch: int) -> torch.Tensor:
    """Group states for a UNet batch of ``batch`` rows: as they are, or their conditional half for a
    call on the conditional rows only."""
    if states.shape[0] == batch:
        return states
    if states.shape[0] == 2 * batch:
        return states.chunk(2)[1]
    if states.shape[0] == 1:
        return states.expand(batch, -1, -1)
    raise UserError(f"group prompt states have {states.shape[0]} rows for a UNet batch of {batch}; "
                    "give rows like the UNet's encoder_hidden_states")
