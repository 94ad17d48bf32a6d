"""Automatic region masks from where each concept's trigger tokens attend (FreeFuse / LoRAShop style).

The user names concepts by trigger words only; where each concept goes is read off the model::

    maps    <- cross-attention probabilities of the prompt's tokens, conditional rows only, mean over
               heads and over the map layers, summed over the probe steps
    score_c <- mean of maps over concept c's trigger tokens               (images, rows, columns)
    score_c <- score_c smoothed by a Gaussian of ``smoothing`` map cells  (optional)
    score_c <- (score_c - min) / (max - min)                              per concept and image
    owner   <- argmax_c score_c where max_c score_c >= threshold, else background (0)
    mask_c  <- [owner == c + 1] resized (nearest, cell geometry) to the latent

Per-concept normalisation makes a concept whose token attends weakly everywhere comparable to one
that attends strongly in one place; the threshold leaves pixels no concept claims to the background.

**Map layers.** The cross-attention layers of the down and up blocks at one resolution level (mid
block excluded): the deepest level whose maps have at least :data:`MIN_MAP_SIDE` cells on their
shorter side, else the finest level with cross-attention. SD1.5 and SDXL at their native sizes get
their usual 1/32 level (16x16 and 32x32 maps). On the toy world (16x16 latent) the deepest level is
4x4 and its trigger maps do not localise at all (0/8 seeds put the moxel left of the lunzor, against
8/8 at the 8x8 level), which is what the minimum side is for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from loracompose.errors import UserError

from .capture import AttentionStore, SummedTokenMaps
from .layers import AttentionLayer, ProcessorHandle, install_processors, processors_for, select_layers
from .masks import LatentGrid
from .processor import ComposeAttnProcessor

MIN_MAP_SIDE = 8
BACKGROUND = 0
_TINY = 1e-12


# ------------------------------------------------------------------------------------ layers


def auto_mask_layers(unet: torch.nn.Module, grid: LatentGrid, min_side: int = MIN_MAP_SIDE) -> list[AttentionLayer]:
    """The down/up cross-attention layers of the level automatic masks read (see the module doc)."""
    layers = select_layers(unet, "cross", blocks=("down", "up"))
    if not layers:
        raise UserError("the UNet has no cross-attention layers in its down or up blocks; automatic masks need them")
    levels = sorted({layer.level for layer in layers})
    wide_enough = [level for level in levels if min(grid.level_size(level)) >= min_side]
    level = max(wide_enough) if wide_enough else min(levels)
    return [layer for layer in layers if layer.level == level]


# ------------------------------------------------------------------------------------ maps -> masks


def concept_scores(maps: torch.Tensor, token_groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """(images, concepts, rows, columns): each concept's mean map over its tokens.

    ``maps`` is (images, rows, columns, tokens); ``token_groups[c]`` indexes its last axis.
    """
    if not token_groups or any(len(tokens) == 0 for tokens in token_groups):
        raise UserError("every concept needs at least one token position for an automatic mask")
    return torch.stack([maps[..., list(tokens)].mean(dim=-1) for tokens in token_groups], dim=1)


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """Min-max each concept's map of each image to [0, 1] (a flat map becomes all zeros)."""
    low = scores.amin(dim=(-2, -1), keepdim=True)
    high = scores.amax(dim=(-2, -1), keepdim=True)
    return (scores - low) / (high - low).clamp_min(_TINY)


def smooth(scores: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (..., rows, columns) maps by ``sigma`` cells (edges replicated); 0: unchanged."""
    if sigma <= 0:
        return scores
    radius = max(1, math.ceil(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=scores.dtype, device=scores.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    flat = scores.reshape(-1, 1, *scores.shape[-2:])
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return flat.reshape(scores.shape)


def assign_owner(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """(images, rows, columns) owner: 1 + the concept with the highest score, or 0 (background)
    where no concept reaches ``threshold``. Ties go to the first concept."""
    best, index = scores.max(dim=1)
    return torch.where(best >= threshold, index + 1, torch.full_like(index, BACKGROUND))


def owner_to_latent(owner: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Owner at map resolution -> latent (height, width): each map cell covers its latent cells
    (cell geometry of masks.py: stride = latent / map, rounded up, the last cell cropped)."""
    height, width = latent_size
    stride_rows = math.ceil(height / owner.shape[-2])
    stride_cols = math.ceil(width / owner.shape[-1])
    upsampled = owner.repeat_interleave(stride_rows, dim=-2).repeat_interleave(stride_cols, dim=-1)
    return upsampled[..., :height, :width]


def owner_masks(owner: torch.Tensor, num_concepts: int) -> torch.Tensor:
    """(images, concepts, height, width) 0/1 float masks of the concepts (background excluded)."""
    return torch.stack([(owner == concept + 1).float() for concept in range(num_concepts)], dim=1)


@dataclass(frozen=True)
class MaskSettings:
    """How trigger maps become masks: the background threshold (on per-concept normalised scores)
    and the Gaussian smoothing of the scores, in map cells (0: none)."""

    threshold: float = 0.5
    smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"automatic mask threshold={self.threshold} must lie in [0, 1]")
        if not (math.isfinite(self.smoothing) and self.smoothing >= 0):
            raise UserError(f"automatic mask smoothing={self.smoothing} must be a number >= 0 (map cells)")


def masks_from_maps(maps: torch.Tensor, token_groups: Sequence[Sequence[int]], settings: MaskSettings,
                    latent_size: tuple[int, int]) -> AutoMasks:
    """Automatic masks of the concepts from (images, rows, columns, tokens) maps (module doc)."""
    return masks_from_scores(concept_scores(maps, token_groups), settings, latent_size)


def masks_from_scores(scores: torch.Tensor, settings: MaskSettings, latent_size: tuple[int, int]) -> AutoMasks:
    """Automatic masks from raw concept scores (images, concepts, rows, columns): normalised, smoothed,
    assigned."""
    scores = normalise(smooth(scores, settings.smoothing))
    owner = assign_owner(scores, settings.threshold)
    return AutoMasks(scores=scores, owner=owner, latent_owner=owner_to_latent(owner, latent_size))


@dataclass(frozen=True)
class AutoMasks:
    """One estimate of the automatic masks.

    ``scores`` (images, concepts, rows, columns) are the normalised trigger maps, ``owner`` the
    assignment at map resolution (0 background, c + 1 concept c), ``latent_owner`` the same at the
    latent's resolution.
    """

    scores: torch.Tensor
    owner: torch.Tensor
    latent_owner: torch.Tensor

    @property
    def num_concepts(self) -> int:
        return int(self.scores.shape[1])

    def masks(self) -> torch.Tensor:
        """(images, concepts, height, width) 0/1 float masks at latent resolution."""
        return owner_masks(self.latent_owner, self.num_concepts)

    def outside(self, margin: int = 0) -> torch.Tensor:
        """(images, height, width) 0/1 float mask of the latent cells farther than ``margin`` map cells
        (chessboard distance) from every concept: where a background goes."""
        claimed = (self.owner != BACKGROUND).float().unsqueeze(1)
        if margin > 0:
            claimed = F.max_pool2d(claimed, 2 * margin + 1, stride=1, padding=margin)
        height, width = self.latent_owner.shape[-2:]
        latent = owner_to_latent(claimed[:, 0], (int(height), int(width)))
        return 1.0 - latent


# ------------------------------------------------------------------------------------ capture


class TriggerMapRecorder(SummedTokenMaps):
    """Sums the conditional rows' cross-attention maps of chosen tokens over UNet calls.

    Installed on :func:`auto_mask_layers`; each UNet call's maps (mean over the layers and heads)
    are added to a running sum that :meth:`maps` returns, until :meth:`reset`. With several branches
    batched in one call, rows stay in [branch][image] order (see :class:`AttentionStore`).
    """

    model_word = "UNet"

    def __init__(self, unet: torch.nn.Module, layers: Sequence[AttentionLayer], token_indices: Sequence[int],
                 *, conditional_rows: bool, backend: str = "sdpa") -> None:
        tokens = sorted(set(token_indices))
        super().__init__(tokens)
        self.store = AttentionStore(token_indices=tokens, rows="cond" if conditional_rows else "all")
        self._handle: ProcessorHandle = install_processors(
            unet, processors_for(layers, lambda _: ComposeAttnProcessor(backend, store=self.store)))
        self._hook = unet.register_forward_hook(self._add_call)

    def _add_call(self, _module: torch.nn.Module, _args: tuple, _output: object) -> None:
        self._add(self.store.maps())

    def last_call(self) -> torch.Tensor:
        """(rows, map rows, map columns, chosen tokens) of the latest UNet call."""
        return self.store.maps()

    def remove(self) -> None:
        """Put the previous processors back and stop recording; safe to call twice."""
        self._hook.remove()
        self._handle.restore()
