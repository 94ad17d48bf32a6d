"""Regions for LoRA-Composer (docs/methods/composer.md): concept injection and self-attention isolation.

A :class:`RegionAttention` controller holds the regions of one generation and is shared by the
processors of every attention layer; each layer asks it for the region masks at its own level.

**Concept injection (cross-attention).** Queries inside region ``r`` attend to region ``r``'s prompt
states through that concept's K/V projections (base + the region's LoRA delta), and the result goes
through the concept's out-projection; queries outside every region use the global prompt and the
stock projections; a query in several regions gets the mean of their outputs.

*Kernel choice: region batching with unmasked attention.* For each region the queries inside it are
gathered (``index_select``) and attended with one plain fused call against that region's 77 keys;
background queries go through one call against the global keys; results are scattered back
(``index_add``). No mask is ever built, so SDPA keeps its fastest kernel (flash on GPU in fp16), the
attention work is sum(region areas) + background area instead of R x the image, and per-region
projections are needed anyway (each concept has its own K/V/out deltas, which a single masked call
over concatenated keys could not express for the out-projection). Extra cost: R+1 small attention
calls, R out-projections over the region's queries (with the LoRA delta), and the gather/scatter
copies. The 2R K/V projections of the region prompts (77 tokens each) depend on nothing that changes
during a generation, so with ``reuse_region_key_values`` (LoRA-Composer sets it) they are computed
once per layer and kept (2R x 77 x width per layer: about 1 MiB per region and layer on SD1.5 in
fp32).

**Isolation (self-attention).** A query may attend to a key when either is background or both share a
region, so a query in region A gets exactly zero weight on keys only in region B.

*Kernel choice: query groups with unmasked attention* (``sdpa``, ``xformers``). Queries are grouped
by the set of regions they lie in (background; each region alone; each overlap), and each group
attends, in one plain fused call, to the keys it may see, gathered (every key for background
queries). That is the masked softmax exactly, but no mask is built, SDPA keeps its fastest kernel
(flash on GPU), and the work shrinks to Σ_groups |queries| x |allowed keys| (about L²/N for N
full-height strips instead of L²). Extra cost: one call per group (N regions give at most 2N
groups for strips) and the gather/scatter copies. Groups are built once per level and latent size
and cached. A diffusers ``attention_mask`` given on self-attention, or the ``flex`` backend, uses a
real (queries x keys) mask instead: on ``sdpa``/``xformers`` an additive −inf mask padded to a
multiple of 8 keys (memory-efficient/cuDNN alignment), on ``flex`` a ``BlockMask`` from per-token
region bitmasks (fully masked 128x128 tiles skipped; eager on CPU, which materialises the scores,
so use it compiled on CUDA only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from loracompose.errors import UserError

from .masks import Box, LatentGrid

MAX_REGIONS = 62  # one bit per region in an int64 code, sign bit unused


@dataclass(frozen=True)
class RegionLayout:
    """Where the regions fall at one level, as row indices into the flattened (rows*columns) queries."""

    background_rows: torch.Tensor
    region_rows: list[torch.Tensor]
    region_weights: list[torch.Tensor | None]  # 1 / (regions covering the row), None where no row overlaps


@dataclass(frozen=True)
class IsolationGroup:
    """Queries that lie in the same set of regions, and the keys isolation lets them see."""

    query_rows: torch.Tensor
    key_rows: torch.Tensor | None  # None: every key (background queries)


@dataclass
class Region:
    """One concept region.

    ``area``: a :class:`Box` or a 2-D user mask (any resolution, image aspect).
    ``encoder_hidden_states``: the region prompt's text states (batch|1, tokens, dim), CFG rows like the
    UNet batch; None uses the global prompt's states.
    ``adapter``: the LoRA whose attn2 ``to_k``/``to_v``/``to_out.0`` deltas this region uses (at that
    adapter's own scaling, whether or not it is active; the base projection where it has no weights);
    None uses the layers as they are.
    """

    area: Box | torch.Tensor
    encoder_hidden_states: torch.Tensor | None = None
    adapter: str | None = None


class RegionAttention:
    """Regions shared by all processors of a generation, with per-level masks cached.

    ``reuse_region_key_values``: compute each region's cross-attention K/V once per layer and batch
    size and reuse them on every later call. Region prompts are fixed for a generation, so their K/V
    are too, as long as the LoRA weights and scalings do not change and the region states need no
    gradient; call :meth:`set_regions` (which clears the cache) after changing either.
    """

    def __init__(self, regions: Sequence[Region] = (), *, inject_concepts: bool = True,
                 isolate_self_attention: bool = True, reuse_region_key_values: bool = False) -> None:
        self.inject_concepts = inject_concepts
        self.isolate_self_attention = isolate_self_attention
        self.reuse_region_key_values = reuse_region_key_values
        self.set_regions(regions)

    def set_regions(self, regions: Sequence[Region]) -> None:
        """Replace the regions (clears cached masks and K/V)."""
        if len(regions) > MAX_REGIONS:
            raise UserError(f"{len(regions)} regions given; at most {MAX_REGIONS} are supported")
        self.regions = list(regions)
        self._cache: dict[tuple, Any] = {}

    def _cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def members(self, grid: LatentGrid, level: int, device: torch.device) -> torch.Tensor:
        """Bool (regions, rows*columns) at ``level``: which flattened cells each region covers."""
        def build() -> torch.Tensor:
            masks = [grid.region_mask(region.area, level).flatten() for region in self.regions]
            return torch.stack(masks).to(device)

        return self._cached(("members", grid, level, str(device)), build)

    def layout(self, grid: LatentGrid, level: int, device: torch.device) -> RegionLayout:
        """Row indices of the background and of each region at ``level`` (cached: no per-call nonzero())."""
        def build() -> RegionLayout:
            members = self.members(grid, level, device)
            cover = members.sum(dim=0)
            rows = [member.nonzero().squeeze(1) for member in members]
            return RegionLayout(
                background_rows=(cover == 0).nonzero().squeeze(1),
                region_rows=rows,
                region_weights=[None if bool((cover[r] == 1).all()) else 1.0 / cover[r].float() for r in rows],
            )

        return self._cached(("layout", grid, level, str(device)), build)

    def codes(self, grid: LatentGrid, level: int, device: torch.device) -> torch.Tensor:
        """int64 (rows*columns,): bit r set when the cell is in region r, 0 for background."""
        def build() -> torch.Tensor:
            bits = torch.tensor([1 << r for r in range(len(self.regions))], dtype=torch.int64, device=device)
            return (self.members(grid, level, device).long() * bits[:, None]).sum(dim=0)

        return self._cached(("codes", grid, level, str(device)), build)

    def isolation_groups(self, grid: LatentGrid, level: int, device: torch.device) -> list[IsolationGroup]:
        """Self-attention queries at ``level`` grouped by their region code, each with its allowed keys."""
        def build() -> list[IsolationGroup]:
            codes = self.codes(grid, level, device)
            groups = []
            for code in torch.unique(codes).tolist():
                query_rows = (codes == code).nonzero().squeeze(1)
                key_rows = None if code == 0 else ((codes == 0) | ((codes & code) != 0)).nonzero().squeeze(1)
                groups.append(IsolationGroup(query_rows, key_rows))
            return groups

        return self._cached(("groups", grid, level, str(device)), build)

    def isolation_mask(self, kernel: Any, grid: LatentGrid, level: int, dtype: torch.dtype,
                       device: torch.device) -> Any:
        """The self-attention isolation mask for ``kernel`` at ``level`` (built once, then cached)."""
        def build() -> Any:
            return kernel.build_mask(region_codes=self.codes(grid, level, device), dtype=dtype)

        return self._cached(("isolation", kernel.name, grid, level, dtype, str(device)), build)

    def isolated_attention(self, kernel: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                           scale: float, grid: LatentGrid, level: int) -> torch.Tensor:
        """Self-attention with isolation on ``kernel`` (BHSD in and out), one unmasked call per query group."""
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        for group in self.isolation_groups(grid, level, query.device):
            keys, values = key, value
            if group.key_rows is not None:
                keys, values = key.index_select(2, group.key_rows), value.index_select(2, group.key_rows)
            hidden = kernel.attend(query.index_select(2, group.query_rows), keys, values, scale=scale)
            out.index_copy_(2, group.query_rows, hidden)
        return out

    def region_key_value(self, layer: str, index: int, queries: torch.Tensor,
                         build: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Region ``index``'s K/V on ``layer`` for the batch of ``queries``: ``build()``, reused on later
        calls with the same batch size, dtype and device when ``reuse_region_key_values`` is set."""
        if not self.reuse_region_key_values:
            return build()
        return self._cached(("key_value", layer, index, queries.shape[0], queries.dtype, str(queries.device)), build)

    def region_states(self, region: Region, global_states: torch.Tensor) -> torch.Tensor:
        """The region's text states expanded to the batch of ``global_states``."""
        states = region.encoder_hidden_states
        if states is None:
            return global_states
        batch = global_states.shape[0]
        if states.ndim != 3 or states.shape[0] not in (1, batch) or states.shape[2] != global_states.shape[2]:
            raise UserError(
                f"region prompt states have shape {tuple(states.shape)}; give (1 or {batch}, tokens, "
                f"{global_states.shape[2]}) like the UNet's encoder_hidden_states"
            )
        return states.to(global_states).expand(batch, -1, -1)
