"""Region masks at latent resolution and at every UNet level's resolution.

Sizes are always ``(height, width)`` (rows, columns); boxes are ``(x0, y0, x1, y1)`` like PIL.

**Geometry.** The latent is the image divided by the VAE factor (8). UNet level ``l`` is the latent
downsampled ``l`` times by a stride-2 convolution, so it has ``ceil(h / 2**l)`` rows and
``ceil(w / 2**l)`` columns, and its cell ``(i, j)`` covers latent rows ``[i * 2**l, (i + 1) * 2**l)``
and columns likewise, clipped to the latent (the last cell is partial when the size is not a multiple).
Up blocks are upsampled back to the same sizes (diffusers forwards the skip sizes), so a level has
one size on the down and the up path.

**The one rounding rule.** A cell belongs to a region when at least half of its area is inside it
(:data:`COVERAGE_THRESHOLD`). Boxes get their exact coverage per cell (so every level is computed from
the box itself, not from a coarser mask); user masks are area-averaged to the latent, then pooled per
level, then thresholded. Small boxes can therefore vanish at coarse levels; that is intended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loracompose.errors import UserError

VAE_SCALE_FACTOR = 8
COVERAGE_THRESHOLD = 0.5


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in relative image coordinates (0..1), ``x`` to the right, ``y`` down."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.x0 < self.x1 <= 1.0 and 0.0 <= self.y0 < self.y1 <= 1.0):
            raise UserError(
                f"box {self.as_tuple()} is not inside the image: give (x0, y0, x1, y1) with "
                "0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (relative) or use Box.from_pixels"
            )

    @classmethod
    def from_pixels(cls, x0: float, y0: float, x1: float, y1: float, *, image_width: int, image_height: int) -> Box:
        """A box given in image pixels (``x`` along the width, ``y`` along the height)."""
        if image_width <= 0 or image_height <= 0:
            raise UserError(f"image size {image_width}x{image_height} for a pixel box must be positive")
        return cls(x0 / image_width, y0 / image_height, x1 / image_width, y1 / image_height)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True)
class LatentGrid:
    """The latent's size (rows, columns) and the sizes of the UNet levels derived from it."""

    height: int
    width: int

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise UserError(f"latent size {self.height}x{self.width} must be positive")

    @classmethod
    def for_image(cls, image_height: int, image_width: int, vae_scale_factor: int = VAE_SCALE_FACTOR) -> LatentGrid:
        """The grid of an image of ``image_height`` x ``image_width`` pixels."""
        if image_height % vae_scale_factor or image_width % vae_scale_factor or min(image_height, image_width) <= 0:
            raise UserError(
                f"image size {image_height}x{image_width} (height x width) must be positive multiples of "
                f"{vae_scale_factor}; round it, e.g. to {_round_to(image_height, vae_scale_factor)}x"
                f"{_round_to(image_width, vae_scale_factor)}"
            )
        return cls(image_height // vae_scale_factor, image_width // vae_scale_factor)

    def level_size(self, level: int) -> tuple[int, int]:
        """(rows, columns) of UNet level ``level`` (0 = latent resolution)."""
        stride = 2**level
        return math.ceil(self.height / stride), math.ceil(self.width / stride)

    def box_mask(self, box: Box, level: int = 0) -> torch.Tensor:
        """Bool mask (rows, columns) of ``box`` at ``level``."""
        stride = 2**level
        rows = _axis_coverage(box.y0 * self.height, box.y1 * self.height, self.height, stride)
        cols = _axis_coverage(box.x0 * self.width, box.x1 * self.width, self.width, stride)
        return torch.outer(rows, cols) >= COVERAGE_THRESHOLD

    def user_mask(self, mask: torch.Tensor, level: int = 0) -> torch.Tensor:
        """Bool mask (rows, columns) at ``level`` of a user mask of any resolution (values 0..1 or bool).

        The user mask must have the image's aspect ratio; it is stretched onto the latent.
        """
        if mask.ndim != 2 or min(mask.shape) == 0:
            raise UserError(f"region mask has shape {tuple(mask.shape)}; give a 2-D (height, width) mask")
        coverage = F.interpolate(mask.float()[None, None], size=(self.height, self.width), mode="area")
        stride = 2**level
        if stride > 1:
            coverage = F.avg_pool2d(coverage, stride, stride, ceil_mode=True)
        return coverage[0, 0] >= COVERAGE_THRESHOLD

    def region_mask(self, region: Box | torch.Tensor, level: int = 0) -> torch.Tensor:
        """Bool mask at ``level`` of a box or a user mask."""
        if isinstance(region, Box):
            return self.box_mask(region, level)
        if isinstance(region, torch.Tensor):
            return self.user_mask(region, level)
        raise UserError(f"region {region!r} is neither a Box nor a 2-D mask tensor; pass one of those")

    def pyramid(self, region: Box | torch.Tensor, num_levels: int) -> list[torch.Tensor]:
        """Bool masks of ``region`` at levels ``0 .. num_levels - 1``."""
        return [self.region_mask(region, level) for level in range(num_levels)]


def _axis_coverage(start: float, end: float, length: int, stride: int) -> torch.Tensor:
    """Fraction of each cell (``stride`` latent units, last one clipped) inside ``[start, end)``."""
    cells = math.ceil(length / stride)
    lows = torch.arange(cells, dtype=torch.float64) * stride
    highs = torch.clamp(lows + stride, max=length)
    overlap = torch.clamp(torch.minimum(highs, torch.tensor(end)) - torch.maximum(lows, torch.tensor(start)), min=0)
    return overlap / (highs - lows)


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)
