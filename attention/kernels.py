"""Fused attention kernels behind one setting: ``backend = "sdpa" | "xformers" | "flex"``.

All kernels take and return BHSD tensors (batch, heads, tokens, head_dim) and honour ``scale``.
Masks are built by the kernel that uses them (:meth:`AttentionKernel.build_mask`) from two parts:
an additive ``bias`` broadcastable to (batch, heads, queries, keys) (diffusers' own attention mask),
and ``region_codes``: one int64 per token, bit ``r`` set when the token is inside region ``r``
(0 = background). A query may attend to a key when either is background or they share a region
(self-attention isolation, LoRA-Composer).

* ``sdpa`` (default, torch only): ``F.scaled_dot_product_attention``. With a mask it stays on the
  memory-efficient or cuDNN kernel (never flash); the dense bias is stored with its key dimension
  padded to a multiple of 8 and sliced, the alignment those kernels need.
* ``xformers``: ``memory_efficient_attention`` (cutlass op with a dense bias, aligned the same way).
* ``flex``: FlexAttention with a ``BlockMask`` for region isolation, so 128x128 tiles fully outside
  the allowed set are skipped. Compiled on CUDA; on CPU it runs torch's unfused eager path (which
  materialises scores, warns once, and has no backward).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from loracompose.errors import UserError

Backend = Literal["sdpa", "xformers", "flex"]
BACKENDS: tuple[str, ...] = ("sdpa", "xformers", "flex")
KEY_ALIGNMENT = 8


def available_backends() -> list[str]:
    """Backends usable in this environment (xformers only when installed)."""
    return [name for name in BACKENDS if name != "xformers" or importlib.util.find_spec("xformers") is not None]


def attention_kernel(backend: str = "sdpa") -> AttentionKernel:
    """The kernel for ``backend``; UserError if it is unknown or not installed."""
    if backend == "sdpa":
        return SdpaKernel()
    if backend == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise UserError("attention backend 'xformers' needs the xformers package: pip install "
                            "'loracompose[xformers]', or use backend='sdpa'")
        return XformersKernel()
    if backend == "flex":
        return FlexKernel()
    raise UserError(f"attention backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")


def allowed_by_regions(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    """Bool (queries, keys): background on either side, or a region shared by query and key."""
    q, k = query_codes[:, None], key_codes[None, :]
    return (q == 0) | (k == 0) | ((q & k) != 0)


def aligned_bias(bias: torch.Tensor) -> torch.Tensor:
    """``bias`` in storage whose last dim is padded to a multiple of 8, returned as the unpadded view."""
    keys = bias.shape[-1]
    padded = math.ceil(keys / KEY_ALIGNMENT) * KEY_ALIGNMENT
    storage = bias.new_zeros(*bias.shape[:-1], padded)
    storage[..., :keys] = bias
    return storage[..., :keys]


class AttentionKernel:
    """A fused attention kernel; subclasses implement :meth:`attend` and may specialise masks."""

    name: str = ""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
               mask: Any = None) -> torch.Tensor:
        """softmax(q kᵀ · scale + mask) v on BHSD tensors; ``mask`` comes from :meth:`build_mask`."""
        raise NotImplementedError

    def build_mask(self, *, bias: torch.Tensor | None = None, region_codes: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> Any:
        """The kernel's mask object for an additive ``bias`` and/or self-attention ``region_codes``."""
        if bias is None and region_codes is None:
            return None
        dense = dense_bias(bias, region_codes, dtype)
        return None if dense is None else aligned_bias(dense)


def dense_bias(bias: torch.Tensor | None, region_codes: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor | None:
    """Additive bias (…, queries, keys): ``bias`` plus −inf where region isolation forbids a key."""
    total = None if bias is None else bias.to(dtype)
    if region_codes is not None:
        allowed = allowed_by_regions(region_codes, region_codes)
        isolation = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        isolation.masked_fill_(~allowed, float("-inf"))
        total = isolation[None, None] if total is None else total + isolation
    return total


def _in_dtype(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype == dtype:
        return mask
    return aligned_bias(mask.to(dtype))


class SdpaKernel(AttentionKernel):
    """``torch.nn.functional.scaled_dot_product_attention``."""

    name = "sdpa"

    def attend(self, q, k, v, *, scale, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_in_dtype(mask, q.dtype), scale=scale)


class XformersKernel(AttentionKernel):
    """``xformers.ops.memory_efficient_attention`` (BMHK layout inside, BHSD outside)."""

    name = "xformers"

    def attend(self, q, k, v, *, scale, mask=None):
        import xformers.ops as xops

        batch, heads, queries, _ = q.shape
        if mask is not None:
            mask = _in_dtype(mask, q.dtype).expand(batch, heads, queries, k.shape[2])
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=mask, scale=scale
        )
        return out.transpose(1, 2)


@dataclass
class FlexMask:
    """What FlexAttention needs for one mask: a block mask and/or a score modifier."""

    block_mask: Any = None
    score_mod: Callable | None = None


class FlexKernel(AttentionKernel):
    """``torch.nn.attention.flex_attention`` (compiled on CUDA, eager elsewhere)."""

    name = "flex"

    def __init__(self) -> None:
        from torch.nn.attention.flex_attention import flex_attention

        self._eager = flex_attention
        self._compiled: Callable | None = None

    def _function(self, device: torch.device) -> Callable:
        if device.type != "cuda":
            return self._eager
        if self._compiled is None:
            self._compiled = torch.compile(self._eager)
        return self._compiled

    def attend(self, q, k, v, *, scale, mask=None):
        if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            raise UserError("attention backend 'flex' has no backward on CPU (torch limitation); "
                            "use backend='sdpa' for latent optimisation on CPU")
        mask = mask or FlexMask()
        return self._function(q.device)(q, k, v, score_mod=mask.score_mod, block_mask=mask.block_mask, scale=scale)

    def build_mask(self, *, bias=None, region_codes=None, dtype=torch.float32):
        if bias is None and region_codes is None:
            return None
        return FlexMask(
            block_mask=None if region_codes is None else _isolation_block_mask(region_codes),
            score_mod=None if bias is None else _bias_score_mod(bias.to(dtype)),
        )


def _isolation_block_mask(codes: torch.Tensor) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    def shares_region_or_background(batch, head, query, key):
        q, k = codes[query], codes[key]
        return (q == 0) | (k == 0) | ((q & k) != 0)

    length = codes.shape[0]
    return create_block_mask(shares_region_or_background, None, None, length, length, device=codes.device)


def _bias_score_mod(bias: torch.Tensor) -> Callable:
    expanded = bias if bias.ndim == 4 else bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))

    def add_bias(score, batch, head, query, key):
        b = batch if expanded.shape[0] > 1 else 0
        h = head if expanded.shape[1] > 1 else 0
        q = query if expanded.shape[2] > 1 else 0
        return score + expanded[b, h, q, key]

    return add_bias
