"""Regions for LoRA-Composer (methods.md §8.2, §8.3): concept injection and self-attention isolation.

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
calls, 2R K/V projections of 77 tokens, R out-projections over the region's queries, and the
gather/scatter copies. Measured with ``benchmarks/bench_attention.py --quick --threads 1`` (CPU, fp32,
batch 2, two overlapping boxes with a LoRA each, on a CPU shared with other jobs, so about ±20%):
1.2-1.6x the stock layer on SD1.5/SDXL cross-attention shapes; most of the extra is the 2R text K/V
projections, which matter most at low resolution (not yet measured on GPU).

**Isolation (self-attention).** A query may attend to a key when either is background or both share a
region, so a query in region A gets exactly zero weight on keys only in region B. This needs a real
(queries x keys) mask: on ``sdpa``/``xformers`` an additive −inf mask (1, 1, L, L), stored with its
key dimension padded to a multiple of 8 (memory-efficient/cuDNN kernel alignment; L² bytes x dtype,
32 MiB in fp16 at 4096 tokens, built once per level and latent size and cached); on ``flex`` a
``BlockMask`` from per-token region bitmasks (fully masked 128x128 tiles skipped). Measured as
above: 0.9-1.4x the stock (unmasked) layer with ``sdpa`` on CPU; eager ``flex`` on CPU is 1.1-3.3x
and skipped at 4096 tokens (it materialises the scores), so use it compiled on CUDA only.
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
    region_weights: list[torch.Tensor]  # 1 / (number of regions covering the row): overlaps averaged


@dataclass
class Region:
    """One concept region.

    ``area``: a :class:`Box` or a 2-D user mask (any resolution, image aspect).
    ``encoder_hidden_states``: the region prompt's text states (batch|1, tokens, dim), CFG rows like the
    UNet batch; None uses the global prompt's states.
    ``adapter``: the LoRA whose attn2 ``to_k``/``to_v``/``to_out.0`` deltas this region uses (at that
    adapter's own scaling, whether or not it is active); None uses the layers as they are.
    """

    area: Box | torch.Tensor
    encoder_hidden_states: torch.Tensor | None = None
    adapter: str | None = None


class RegionAttention:
    """Regions shared by all processors of a generation, with per-level masks cached."""

    def __init__(self, regions: Sequence[Region] = (), *, inject_concepts: bool = True,
                 isolate_self_attention: bool = True) -> None:
        self.inject_concepts = inject_concepts
        self.isolate_self_attention = isolate_self_attention
        self.set_regions(regions)

    def set_regions(self, regions: Sequence[Region]) -> None:
        """Replace the regions (clears cached masks)."""
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
                region_weights=[1.0 / cover[r].float() for r in rows],
            )

        return self._cached(("layout", grid, level, str(device)), build)

    def codes(self, grid: LatentGrid, level: int, device: torch.device) -> torch.Tensor:
        """int64 (rows*columns,): bit r set when the cell is in region r, 0 for background."""
        def build() -> torch.Tensor:
            bits = torch.tensor([1 << r for r in range(len(self.regions))], dtype=torch.int64, device=device)
            return (self.members(grid, level, device).long() * bits[:, None]).sum(dim=0)

        return self._cached(("codes", grid, level, str(device)), build)

    def isolation_mask(self, kernel: Any, grid: LatentGrid, level: int, dtype: torch.dtype,
                       device: torch.device) -> Any:
        """The self-attention isolation mask for ``kernel`` at ``level`` (built once, then cached)."""
        def build() -> Any:
            return kernel.build_mask(region_codes=self.codes(grid, level, device), dtype=dtype)

        return self._cached(("isolation", kernel.name, grid, level, dtype, str(device)), build)

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
