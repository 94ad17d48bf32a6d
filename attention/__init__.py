"""Attention processors, kernels and masks for multi-LoRA composition.

Typical use by a method (CLoRA-style map capture on the 1/32-resolution cross-attention layers)::

    store = AttentionStore(token_indices=[2, 5], rows="cond", requires_grad=True)
    layers = attention_map_layers(unet)
    handle = install_processors(unet, processors_for(layers, lambda _: ComposeAttnProcessor(backend, store=store)))
    ...  # UNet calls; store.maps() -> (batch, rows, columns, tokens) of the latest call
    handle.restore()
"""

from .capture import AttentionStore
from .kernels import BACKENDS, AttentionKernel, attention_kernel, available_backends
from .layers import (
    AttentionLayer,
    ProcessorHandle,
    UNetCall,
    attention_layers,
    attention_map_layers,
    checkpoint_outside_layers,
    deepest_attention_level,
    install_processors,
    processors_for,
    resolution_level,
    select_layers,
    stop_after_layers,
)
from .lora_deltas import (
    LoraTokenMasks,
    adapter_delta,
    adapter_projection,
    check_adapters_loaded,
    token_mask,
    token_masked_projection,
)
from .masks import COVERAGE_THRESHOLD, Box, LatentGrid
from .processor import ComposeAttnProcessor
from .regions import Region, RegionAttention

__all__ = [
    "AttentionKernel",
    "AttentionLayer",
    "AttentionStore",
    "BACKENDS",
    "Box",
    "COVERAGE_THRESHOLD",
    "ComposeAttnProcessor",
    "LatentGrid",
    "LoraTokenMasks",
    "ProcessorHandle",
    "Region",
    "RegionAttention",
    "UNetCall",
    "adapter_delta",
    "adapter_projection",
    "attention_kernel",
    "attention_layers",
    "attention_map_layers",
    "available_backends",
    "check_adapters_loaded",
    "checkpoint_outside_layers",
    "deepest_attention_level",
    "install_processors",
    "processors_for",
    "resolution_level",
    "select_layers",
    "stop_after_layers",
    "token_mask",
    "token_masked_projection",
]
