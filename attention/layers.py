"""Finding attention layers of a UNet, and installing processors on some of them.

A layer is named by its module path, e.g. ``down_blocks.2.attentions.0.transformer_blocks.0.attn2``
(diffusers' processor key is that name + ``.processor``). Its **resolution level** comes from the name
and ``unet.config.block_out_channels``: ``down_blocks.i`` runs at level ``i``, ``up_blocks.j`` at
level ``L - 1 - j`` and ``mid_block`` at ``L - 1``, with ``L`` the number of blocks and level 0 the
latent resolution (SD1.5: level 2 = 1/32 of the image = 16x16 at 512 px).

:func:`install_processors` replaces the processors of the named layers only (diffusers'
``set_attn_processor(dict)`` needs every key, so the dict is merged with the current processors) and
returns a :class:`ProcessorHandle` whose ``restore()`` puts the previous processors back. The handle
also registers a UNet forward pre-hook that records the latent size of each call in a
:class:`UNetCall`, which processors read to reshape maps and place region masks.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import torch
import torch.utils.checkpoint

from loracompose.errors import UserError

from .masks import LatentGrid

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

AttentionKind = Literal["self", "cross", "all"]
BlockKind = Literal["down", "mid", "up"]

_DOWN = re.compile(r"^down_blocks\.(\d+)\.")
_UP = re.compile(r"^up_blocks\.(\d+)\.")
_STACK = re.compile(r"^(.*)\.transformer_blocks\.(\d+)\.attn[12]$")
_PROCESSOR_SUFFIX = ".processor"


@dataclass(frozen=True)
class AttentionLayer:
    """One ``Attention`` module of a UNet: its name, kind and resolution level."""

    name: str
    is_cross: bool
    block: BlockKind
    level: int

    @property
    def processor_key(self) -> str:
        """The key of this layer in ``unet.attn_processors``."""
        return self.name + _PROCESSOR_SUFFIX


def resolution_level(name: str, num_levels: int) -> tuple[BlockKind, int]:
    """(block kind, level) of the attention layer ``name`` in a UNet with ``num_levels`` blocks."""
    if down := _DOWN.match(name):
        return "down", int(down.group(1))
    if up := _UP.match(name):
        return "up", num_levels - 1 - int(up.group(1))
    if name.startswith("mid_block."):
        return "mid", num_levels - 1
    raise UserError(f"attention layer {name!r} is not in down_blocks, mid_block or up_blocks; name a UNet layer")


def attention_layers(unet: UNet2DConditionModel) -> list[AttentionLayer]:
    """All attention layers of ``unet``, in ``unet.attn_processors`` order."""
    num_levels = len(unet.config.block_out_channels)
    layers = []
    for key in unet.attn_processors:
        name = key.removesuffix(_PROCESSOR_SUFFIX)
        block, level = resolution_level(name, num_levels)
        is_cross = bool(getattr(unet.get_submodule(name), "is_cross_attention", False))
        layers.append(AttentionLayer(name=name, is_cross=is_cross, block=block, level=level))
    return layers


def select_layers(
    unet: UNet2DConditionModel,
    kind: AttentionKind = "all",
    levels: Iterable[int] | None = None,
    blocks: Iterable[BlockKind] = ("down", "mid", "up"),
) -> list[AttentionLayer]:
    """Attention layers of ``kind`` (self = attn1, cross = attn2) at ``levels`` (all if None) in ``blocks``."""
    if kind not in ("self", "cross", "all"):
        raise UserError(f"attention kind {kind!r} is unknown; use 'self', 'cross' or 'all'")
    wanted_levels = None if levels is None else set(levels)
    wanted_blocks = set(blocks)
    return [
        layer
        for layer in attention_layers(unet)
        if (kind == "all" or layer.is_cross == (kind == "cross"))
        and (wanted_levels is None or layer.level in wanted_levels)
        and layer.block in wanted_blocks
    ]


def deepest_attention_level(unet: UNet2DConditionModel, blocks: Iterable[BlockKind] = ("down", "up")) -> int:
    """The lowest-resolution level that has attention layers in ``blocks`` (SD1.5, SDXL: 2; 2-block UNets: 1)."""
    levels = [layer.level for layer in select_layers(unet, "all", blocks=blocks)]
    if not levels:
        raise UserError(f"the UNet has no attention layers in {sorted(blocks)} blocks; use a UNet with cross-attention")
    return max(levels)


def attention_map_layers(unet: UNet2DConditionModel, layers_per_module: int | None = 1,
                         level: int | None = None) -> list[AttentionLayer]:
    """The cross-attention layers CLoRA and LoRA-Composer read maps from (docs/methods/clora.md, composer.md).

    These are the attn2 layers of the down and up blocks at the deepest level with attention, the mid
    block excluded: SD1.5 gives ``down_blocks.2.attentions.{0,1}`` and ``up_blocks.1.attentions.{0,1,2}``
    (5 layers, 16x16 at 512 px). SDXL's matching modules (``down_blocks.2.attentions.{0,1}``,
    ``up_blocks.0.attentions.{0,1,2}``) stack 10 transformer blocks each (50 layers, 60 with the mid
    block); by default one block per module is kept, the central one (index 4 of 0..9), so SDXL also
    yields 5 layers and the map cost stays that of SD1.5. ``layers_per_module`` keeps that many evenly
    spaced blocks per module (None: all). The choice of SDXL subset is a cost decision, not a measured
    quality optimum. ``level`` reads another level instead of the deepest (same per-module subset).
    """
    if layers_per_module is not None and layers_per_module < 1:
        raise UserError(f"layers_per_module={layers_per_module} must be at least 1 (or None for all)")
    level = deepest_attention_level(unet) if level is None else level
    layers = select_layers(unet, "cross", levels=[level], blocks=("down", "up"))
    return [layer for layer in layers if _keeps(layer, layers, layers_per_module)]


def _keeps(layer: AttentionLayer, layers: Sequence[AttentionLayer], per_module: int | None) -> bool:
    module, index = _stack_position(layer.name)
    depth = sum(1 for other in layers if _stack_position(other.name)[0] == module)
    if per_module is None or per_module >= depth:
        return True
    centred = {int((slot + 0.5) * depth / per_module - 0.5) for slot in range(per_module)}
    return index in centred


def _stack_position(name: str) -> tuple[str, int]:
    match = _STACK.match(name)
    return (match.group(1), int(match.group(2))) if match else (name, 0)


def processors_for(layers: Iterable[AttentionLayer], make: Callable[[AttentionLayer], Any]) -> dict[str, Any]:
    """{layer name: make(layer)}: one processor instance per layer, ready for :func:`install_processors`."""
    return {layer.name: make(layer) for layer in layers}


class UNetCall:
    """The latent size and a running index of the UNet call in progress (set by a forward pre-hook)."""

    def __init__(self) -> None:
        self.index = 0
        self.latent_size: tuple[int, int] | None = None

    def record(self, sample: torch.Tensor) -> None:
        self.index += 1
        self.latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))

    @property
    def grid(self) -> LatentGrid:
        """The latent grid of the current call."""
        if self.latent_size is None:
            raise UserError("no UNet call seen yet: install processors with install_processors() and run the UNet")
        return LatentGrid(*self.latent_size)


class ProcessorHandle:
    """Installed processors; ``restore()`` (or leaving the ``with`` block) puts the previous ones back."""

    def __init__(self, unet: UNet2DConditionModel, previous: dict[str, Any], call: UNetCall) -> None:
        self.unet = unet
        self.call = call
        self._previous: dict[str, Any] | None = previous
        self._hook = unet.register_forward_pre_hook(self._record_call, with_kwargs=True)

    def _record_call(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.call.record(args[0] if args else kwargs["sample"])

    def restore(self) -> None:
        """Put back the processors that were installed before; safe to call twice."""
        if self._previous is None:
            return
        self._hook.remove()
        # set_attn_processor pops keys from the dict it is given, so hand it a copy.
        self.unet.set_attn_processor(dict(self._previous))
        self._previous = None

    def __enter__(self) -> ProcessorHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def install_processors(unet: UNet2DConditionModel, processors: Mapping[str, Any]) -> ProcessorHandle:
    """Install ``processors`` ({layer name: processor}) on those layers only; the others keep theirs.

    Names may be given with or without the ``.processor`` suffix. A processor with a
    ``bind(layer, call)`` method is told its :class:`AttentionLayer` and the shared :class:`UNetCall`;
    such a processor belongs to one layer, so give each layer its own instance.
    """
    layers = {layer.name: layer for layer in attention_layers(unet)}
    previous = unet.attn_processors
    merged = dict(previous)
    bound: set[int] = set()
    call = UNetCall()
    for name, processor in processors.items():
        layer = layers.get(name.removesuffix(_PROCESSOR_SUFFIX))
        if layer is None:
            example = next(iter(layers), "none")
            raise UserError(f"no attention layer named {name!r} in this UNet; names look like {example!r}")
        if hasattr(processor, "bind"):
            if id(processor) in bound:
                raise UserError(f"processor for {name!r} is already installed on another layer; make one per layer")
            bound.add(id(processor))
            processor.bind(layer, call)
        merged[layer.processor_key] = processor
    unet.set_attn_processor(merged)
    return ProcessorHandle(unet, previous, call)


class _LayersDone(Exception):
    """Ends a UNet call from inside once the layers a pass needs have run (see :func:`stop_after_layers`)."""


@dataclass
class EarlyStop:
    """Whether the UNet call inside :func:`stop_after_layers` ended early (its output was never made)."""

    stopped: bool = False


@contextmanager
def stop_after_layers(unet: UNet2DConditionModel, layer_names: Sequence[str]) -> Iterator[EarlyStop]:
    """End the (single) UNet call inside the block as soon as every named layer has run once.

    For passes whose result is read off those layers (attention maps for a loss): the rest of the
    UNet, often its costliest high-resolution blocks, is skipped and adds nothing to the autograd
    graph; gradients of anything computed from those layers are unchanged. The call returns nothing
    (the exception ending it is caught here): check ``stopped`` and read the layers' captures instead.
    """
    state, pending = EarlyStop(), set(layer_names)

    def mark_done(name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, _output: Any) -> None:
            pending.discard(name)
            if not pending:
                raise _LayersDone
        return hook

    handles = [unet.get_submodule(name).register_forward_hook(mark_done(name)) for name in pending]
    try:
        yield state
    except _LayersDone:
        state.stopped = True
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def checkpoint_outside_layers(unet: UNet2DConditionModel, layer_names: Sequence[str]) -> Iterator[None]:
    """Gradient checkpointing, inside the block, on every UNet unit (resnet, transformer block) that
    holds none of the named layers.

    For a pass whose loss reads those layers' captures and whose gradient goes back to the input
    (LoRA-Composer's refinement): the units in between keep only their inputs for the backward and run
    their forward again during it (non-reentrant ``torch.utils.checkpoint``), so the pass's activation
    memory is little more than the named layers' own; the units holding the named layers run once,
    as before, so what they capture is recorded once and an early stop raised there (see
    :func:`stop_after_layers`) never leaves a checkpointed unit half-run. Nothing changes while
    gradients are off (diffusers checkpoints only under grad). The recomputation in the backward
    replays the units' own forward and needs nothing from this block, so the backward may run after
    it; it must run before the UNet is called again (the processors' per-call state is replayed).
    """
    keep = {unet.get_submodule(".".join(parts[:depth]))
            for parts in (name.split(".") for name in layer_names) for depth in range(1, len(parts) + 1)}
    # A unit that checkpoints units of its own runs as it is: those are checkpointed one by one.
    keep |= {module for module in unet.modules()
             if any(hasattr(inner, "gradient_checkpointing") for inner in module.modules() if inner is not module)}

    def run_unit(unit: torch.nn.Module, *args: Any) -> Any:
        if unit in keep:
            return unit(*args)
        return torch.utils.checkpoint.checkpoint(unit.__call__, *args, use_reentrant=False)

    was_checkpointing = unet.is_gradient_checkpointing
    unet.enable_gradient_checkpointing(run_unit)
    try:
        yield
    finally:
        if was_checkpointing:
            unet.enable_gradient_checkpointing()  # diffusers' own function
        else:
            unet.disable_gradient_checkpointing()
