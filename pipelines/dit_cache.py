"""Block caching on a diffusion transformer (FLUX.1, SD3/SD3.5) for CMLoRA (docs/methods/cmlora.md).

On a UNet, CMLoRA's cache (:mod:`~loracompose.pipelines.unet_cache`) keeps the deep feature entering the
last up block and recomputes only the shallow path around it; the skip connections carry the fresh
shallow features past the cache. A DiT has no skip connections: it is one stack of blocks, FLUX's
double-stream blocks then its single-stream ones, SD3's joint blocks, each taking and returning the
image stream and the text stream. Its equivalent of the deep path is the middle of that stack, and
what is cached is the middle's *contribution*, its residual on both streams (as Delta-DiT and
first-block caching do), so the fresh first block still reaches the output::

    full pass:     blocks 0 .. L-1 as in diffusers
                   residual <- (input of block L-1) - (output of block 0), image and text stream
    shallow pass:  embedders, block 0, then (its output + residual) into block L-1, norm_out, proj_out

The shallow pass runs the transformer's own ``forward`` with the middle blocks' forwards replaced for
the call (block 1 adds the residual, the others pass their input through), so at a refresh step (same
input, timestep and conditioning as the full pass that filled the cache) it returns the full pass's
output up to float rounding of ``a + (b - a)``. With fewer than three blocks the middle is empty and
the shallow pass is the full pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass
class BlockResidual:
    """One branch's cached middle-block residual, rows [CFG half][image], per stream, and the step
    whose full pass produced it."""

    image: torch.Tensor
    text: torch.Tensor
    step_index: int


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's blocks in the order its forward runs them (FLUX: double, then single)."""
    double: Any = transformer.transformer_blocks
    single: Any = getattr(transformer, "single_transformer_blocks", ())
    return [*double, *single]


def middle_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks a shallow pass skips: all but the first and the last."""
    return transformer_blocks(transformer)[1:-1]


def _stream(kwargs: dict, args: tuple, name: str, position: int) -> torch.Tensor:
    return kwargs[name] if name in kwargs else args[position]


@contextmanager
def capture_block_residuals(transformer: torch.nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Collect, for every transformer forward inside the block, the middle blocks' residual as
    (image, text): the last block's inputs minus the first block's outputs (hooks on the stock forward)."""
    blocks = transformer_blocks(transformer)
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    first_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep_first_output(_module, _args, _kwargs, output):
        text, image = output
        first_outputs.append((image, text))

    def keep_residual(_module, args, kwargs):
        image = _stream(kwargs, args, "hidden_states", 0)
        text = _stream(kwargs, args, "encoder_hidden_states", 1)
        first_image, first_text = first_outputs.pop()
        captured.append((image - first_image, text - first_text))

    handles = [blocks[0].register_forward_hook(keep_first_output, with_kwargs=True),
               blocks[-1].register_forward_pre_hook(keep_residual, with_kwargs=True)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def skipping_middle_blocks(transformer: torch.nn.Module, image: torch.Tensor, text: torch.Tensor) -> Iterator[None]:
    """Inside the block, a transformer forward skips its middle blocks and adds the given residual
    (rows matching the call's) to the first block's output instead. Each block returns
    ``(text, image)``, as diffusers' FLUX and SD3 blocks do."""
    middle = middle_blocks(transformer)

    def add_residual(*args, **kwargs):
        return (_stream(kwargs, args, "encoder_hidden_states", 1) + text,
                _stream(kwargs, args, "hidden_states", 0) + image)

    def pass_through(*args, **kwargs):
        return _stream(kwargs, args, "encoder_hidden_states", 1), _stream(kwargs, args, "hidden_states", 0)

    for index, block in enumerate(middle):
        block.forward = add_residual if index == 0 else pass_through  # instance attribute: shadows the class's
    try:
        yield
    finally:
        for block in middle:
            del block.forward
