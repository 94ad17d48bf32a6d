"""Cross-attention maps for CLoRA and LoRA-Composer (docs/methods/clora.md, composer.md), computed cheaply.

Only layers whose processor holds an :class:`AttentionStore` pay for maps, and there the layer output
still comes from the fused kernel; the store recomputes ``softmax(q kᵀ · scale)`` over all keys, keeps
only the chosen tokens' columns and averages over heads. Install it on
:func:`~loracompose.attention.layers.attention_map_layers` (5 layers at 1/32 resolution), never on
all layers (CLoRA's reference materialises 4096² self-attention on every layer: a pitfall).

The store holds the maps of the **latest UNet call** only: a processor recording during a new call
drops what earlier calls left. Read :meth:`AttentionStore.maps` after each call you need.

Rows (``rows``): ``"all"`` keeps every batch row; ``"cond"`` keeps the conditional half (the second
half of a CFG batch ``[uncond rows, cond rows]``) and computes nothing for the other;
``"cfg_mean"`` averages the two halves row by row. With several branches batched the rows stay in
branch order.

Gradients: with ``requires_grad=True`` the maps keep the graph (latent optimisation); otherwise they are
computed from detached tensors, so a latent that requires grad does not get a graph through them.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from loracompose.errors import UserError

Rows = Literal["all", "cond", "cfg_mean"]
GLOBAL = "global"  # maps against the layer's own keys; region maps are keyed by region index


class AttentionStore:
    """Collects head-averaged attention maps of chosen tokens from the layers it is installed on."""

    def __init__(self, token_indices: Sequence[int] | None = None, rows: Rows = "all", requires_grad: bool = False):
        if rows not in ("all", "cond", "cfg_mean"):
            raise UserError(f"attention map rows {rows!r} is unknown; use 'all', 'cond' or 'cfg_mean'")
        if token_indices is not None and (len(token_indices) == 0 or min(token_indices) < 0):
            raise UserError(f"token_indices {list(token_indices)} must be non-empty and non-negative (or None for all)")
        self.token_indices = None if token_indices is None else list(token_indices)
        self.rows: Rows = rows
        self.requires_grad = requires_grad
        self._call_index: int | None = None
        self._maps: dict[str | int, dict[str, torch.Tensor]] = {}

    def clear(self) -> None:
        """Forget all maps."""
        self._maps = {}
        self._call_index = None

    def record(self, layer_name: str, call_index: int, size: tuple[int, int], query: torch.Tensor,
               key: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
               source: str | int = GLOBAL) -> None:
        """Store the map of ``query`` (B, H, rows*cols, d) against ``key`` (B, H, tokens, d) for one layer.

        ``size`` is the layer's (rows, columns); ``bias`` an optional additive mask broadcastable to the
        scores; ``source`` tells global maps from per-region ones.
        """
        if call_index != self._call_index:
            self.clear()
            self._call_index = call_index
        with torch.set_grad_enabled(self.requires_grad and torch.is_grad_enabled()):
            maps = self._head_mean_probabilities(query, key, scale, bias)
        self._maps.setdefault(source, {})[layer_name] = maps.reshape(maps.shape[0], *size, maps.shape[-1])

    def _head_mean_probabilities(self, query, key, scale, bias) -> torch.Tensor:
        if not self.requires_grad:
            query, key = query.detach(), key.detach()
        query, key, bias = (self._select_rows(t) for t in (query, key, bias))
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias.float()
        probabilities = scores.softmax(dim=-1)
        if self.token_indices is not None:
            probabilities = probabilities[..., self._checked_indices(self.token_indices, key.shape[2])]
        maps = probabilities.mean(dim=1)
        if self.rows == "cfg_mean":
            uncond, cond = maps.chunk(2)
            maps = (uncond + cond) / 2
        return maps

    def _select_rows(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or self.rows == "all" or tensor.shape[0] == 1:
            return tensor
        if tensor.shape[0] % 2:
            raise UserError(f"attention map rows={self.rows!r} needs a CFG batch of even size, got {tensor.shape[0]}; "
                            "use rows='all' without classifier-free guidance")
        return tensor[tensor.shape[0] // 2:] if self.rows == "cond" else tensor

    @staticmethod
    def _checked_indices(indices: list[int], tokens: int) -> list[int]:
        if max(indices) >= tokens:
            raise UserError(f"token_indices {indices} exceed the {tokens} keys of this layer; "
                            f"use indices below {tokens}")
        return indices

    def layer_maps(self, source: str | int = GLOBAL) -> dict[str, torch.Tensor]:
        """{layer name: (batch, rows, columns, tokens)} from the latest call."""
        return dict(self._maps.get(source, {}))

    def maps(self, source: str | int = GLOBAL, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(batch, rows, columns, tokens) averaged over layers, each resized (bilinear) to ``size``.

        ``size`` defaults to the largest captured layer size, so equal-level layers are not resized.
        """
        per_layer = list(self._maps.get(source, {}).values())
        if not per_layer:
            raise UserError(f"no attention maps for {source!r}: install the store's processors and run the UNet first")
        target = size or max(((m.shape[1], m.shape[2]) for m in per_layer), key=lambda hw: hw[0] * hw[1])
        return torch.stack([_resized(m, target) for m in per_layer]).mean(dim=0)


def _resized(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[1:3]) == tuple(size):
        return maps
    channels_first = maps.permute(0, 3, 1, 2)
    resized = F.interpolate(channels_first, size=size, mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1)


class SummedTokenMaps:
    """Maps of chosen text tokens summed over denoiser calls, as the map recorders keep them
    (``TriggerMapRecorder`` on UNets, ``JointMapRecorder`` on DiTs): a column per chosen token."""

    model_word = "model"  # named in the error when nothing was recorded

    def __init__(self, tokens: Sequence[int]) -> None:
        self.columns = {token: column for column, token in enumerate(tokens)}
        self._sum: torch.Tensor | None = None

    def _add(self, maps: torch.Tensor) -> None:
        """Add one call's maps to the sum (a call of another shape starts it again)."""
        same = self._sum is not None and self._sum.shape == maps.shape
        self._sum = self._sum + maps if same and self._sum is not None else maps

    def maps(self) -> torch.Tensor:
        """(rows, map rows, map columns, chosen tokens): the maps summed since the last reset."""
        if self._sum is None:
            raise UserError(f"no attention maps were recorded: run the {self.model_word} while the recorder is "
                            "installed")
        return self._sum

    def token_columns(self, token_groups: Sequence[Sequence[int]]) -> list[list[int]]:
        """Token positions of the text sequence -> columns of :meth:`maps`."""
        return [[self.columns[token] for token in tokens] for tokens in token_groups]

    def reset(self) -> None:
        self._sum = None
