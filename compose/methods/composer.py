"""LoRA-Composer: box-guided concept injection, concept isolation and latent refinement
(Yang et al., arXiv 2403.11627; docs/methods/composer.md).

Inputs: a global prompt p; per concept k a LoRA, a region prompt p_k and a box b_k. Local concepts
(objects, characters, clothing) get boxes; a background or style LoRA (category ``background`` or
``style``) covers the whole image. One base UNet, the LoRAs kept as PEFT adapters::

    B_k <- b_k at the map level: the attention level nearest 16 cells a side (SD1.5 at 512 px: 16x16)
    z   <- N(0, I)
    # latent re-initialisation, one conditional UNet call on z at t_0:
    for each placed concept k:
        (r, c) <- argmax over windows the size of B_k of Σ_tok (A_tok ∗ ones(B_k))
        z[b_k] <- z_0[window (r, c), scaled to latent cells]                       # z_0: the initial noise
    z <- (z - mean z) / std z · std z_0 + mean z_0;   z <- z · init_noise_sigma
    for step i = 0 .. T-1:
        if refining:
            A_k, S <- one conditional UNet call on z with grad, ending after the map layers: concept k's
                      token maps over the whole image against the keys its box attends to,
                      Gaussian-smoothed (3, σ 0.5); S the self-attention at the same level
            L <- Σ_k Σ_tok 8·relu(1 - topk_mean(A_tok ⊙ B_k ⊙ G_k))                # box attention
               + Σ_k Σ_tok 2·mean|max_rows(A_tok ⊙ B_k) - max_rows(B_k)|
                           + 2·mean|max_cols(A_tok ⊙ B_k) - max_cols(B_k)|         # fill
               + Σ_k 10·topk_mean(S[queries in B_k, keys outside B_k])             # region leakage
            if L ≠ 0: z <- z - φ_i · ∇_z L,   φ_i = 20 · s · sqrt(linspace(1, 0.5, T)[i])
                      (s = latent numbers per map cell / 64, SD1.5's)
            stop for good when i >= round(T/2), or i >= round(T/10) and L rose since the previous step
        ε <- one CFG UNet call in which every LoRA layer (attention q/k/v/out, FFN, projections,
             convolutions) adds LoRA k's delta only inside b_k (attention/regional.py), and
               cross-attention: queries in b_k attend p_k (encoded with LoRA k's text-encoder deltas)
                                through to_k/to_v with LoRA k's deltas; queries in no box attend p
               self-attention:  queries in b_k give no weight to keys in b_j, j ≠ k
        z <- scheduler step(ε)

Cost: T CFG calls + one conditional forward (to the map layers) and backward per refined step (at
most round(T/2) + 1) + one conditional forward for the re-initialisation; the call count does not
grow with N.

On FLUX.1 and SD3 (docs/methods/composer.md, "On FLUX and SD3") the regions lie on the image-token
grid, each group of boxes gets its own text segment in the joint attention and one boolean mask does
injection and isolation (attention/composer_dit.py); refinement and re-initialisation run the same code
on the joint attention's maps, FLUX's packed latents laid on their token grid.

Departures from the paper and from the public code, with the reasons (docs/methods/composer.md):

* The whole LoRA is injected, masked to its box, on every layer it adapts; the paper injects only the
  cross-attention K/V. A LoRA keeps much of its concept in self-attention, FFN, projection and
  convolution weights: with K/V alone the toy world's crescent was never drawn.
* A box without a region prompt attends the generation's prompt (through its LoRA's deltas); the
  paper takes region prompts from the user, and a bare trigger word as default is out of
  distribution for a text encoder trained on captions (toy world: both objects 3/32 against 32/32).
* Backgrounds and styles are not boxed: they apply everywhere (no loss, no isolation, no
  re-initialisation); a box over the whole image means the same.
* Constants the paper tuned for SD1.5 at 512 px are scaled: the map level (nearest 16 cells), the
  step size (by latent numbers per map cell) and the stop rule (shares of T: 25 and 5 of 50 steps).
* Overlapping boxes attend the joined region prompts with both LoRAs' deltas (the paper averages the
  outputs of separate region attentions).
* One base model with the LoRAs kept as adapters, their deltas with their α/r scaling and strength
  (PEFT ``scaling``); no pipeline copies, no ``forward`` patching of diffusers modules.
* Concept tokens are found per region (the LoRA's trigger words in its own region prompt, all of the
  region prompt's word tokens when it has none), never by concept index.
* Boxes follow one rounding rule at every level (attention/masks.py), relative (0..1) or
  :meth:`Box.from_pixels`. A box that covers no cell of the map level adds no loss term and is not
  re-initialised (it still gets its concept at finer levels).
* The smoothing kernel is the textbook Gaussian exp(-d²/2σ²) with reflect padding (the reference's
  copy of Attend-and-Excite uses exp(-(d/2σ)²)); G_k uses linspace(-1, 1) over the box's cells.
* Re-initialisation copies every window from the initial noise (not from a partly rewritten one)
  and scales windows by the true stride between the map level and the latent.
* With several images each image has its own losses, stop rule and re-initialisation, so image j
  equals a one-image run with seed + j.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, ContextManager, Iterator, Sequence

from loracompose.errors import UserError
from loracompose.kinds import is_global_kind
from loracompose.lazy import LazyImport
from loracompose.lora import FLUX, SD3, LoadedLora
from loracompose.methods.base import ALL_FAMILIES, CompositionMethod, frozen_parameters, require_loras
from loracompose.pipelines.values import BASE, Branch, Conditioning, Prediction, Step
from loracompose.tokens import stream_trigger_positions, trigger_positions

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from diffusers.models.attention_processor import Attention

    from loracompose.attention import (
        AttentionLayer,
        AttentionStore,
        Box,
        ComposeAttnProcessor,
        LatentGrid,
        Region,
        RegionAttention,
        attention_map_layers,
        check_adapters_loaded,
        checkpoint_outside_layers,
        deepest_attention_level,
        processors_for,
        select_layers,
        stop_after_layers,
    )
    from loracompose.attention.composer_dit import (JointCapture, JointLayout, JointRegions, concatenated_segments,
                                                    install_joint_regions, segment_codes)
    from loracompose.attention.joint_maps import default_map_blocks
    from loracompose.attention.regional import RegionalPatches, RegionMasks, code_members, install_regional
    from loracompose.attention.regional_dit import install_regional_dit
    from loracompose.pipelines.denoiser import BranchBatch, Denoiser
else:  # imported on first use: the settings dataclass imports without the model stack
    torch = LazyImport("torch")
    F = LazyImport("torch.nn.functional")
    Attention = LazyImport("diffusers.models.attention_processor", "Attention")
    (AttentionLayer, AttentionStore, Box, ComposeAttnProcessor, LatentGrid, Region, RegionAttention,
     attention_map_layers, check_adapters_loaded, checkpoint_outside_layers, deepest_attention_level,
     processors_for, select_layers, stop_after_layers) = (LazyImport("loracompose.attention", name) for name in (
        "AttentionLayer", "AttentionStore", "Box", "ComposeAttnProcessor", "LatentGrid", "Region", "RegionAttention",
        "attention_map_layers", "check_adapters_loaded", "checkpoint_outside_layers", "deepest_attention_level",
        "processors_for", "select_layers", "stop_after_layers"))
    RegionalPatches, RegionMasks, code_members, install_regional = (
        LazyImport("loracompose.attention.regional", name) for name in (
            "RegionalPatches", "RegionMasks", "code_members", "install_regional"))
    JointCapture, JointLayout, JointRegions, concatenated_segments, install_joint_regions, segment_codes = (
        LazyImport("loracompose.attention.composer_dit", name) for name in (
            "JointCapture", "JointLayout", "JointRegions", "concatenated_segments", "install_joint_regions",
            "segment_codes"))
    default_map_blocks = LazyImport("loracompose.attention.joint_maps", "default_map_blocks")
    install_regional_dit = LazyImport("loracompose.attention.regional_dit", "install_regional_dit")

log = logging.getLogger(__name__)

# The published loss weights, top-k share and smoothing (docs/methods/composer.md)
BOX_LOSS_WEIGHT = 8.0
FILL_LOSS_WEIGHT = 2.0
REGION_LOSS_WEIGHT = 10.0
TOP_K_RATIO = 0.2
SMOOTHING_KERNEL_SIZE = 3
SMOOTHING_SIGMA = 0.5
BOX_GAUSSIAN_SIGMA = 1.0
# The published refinement for SD1.5 at 512 px: φ = 20 decaying to 20·sqrt(0.5), steps 0-25 of 50, a
# rise of the loss ends it from step 5 on; maps at 16x16. Scaled to other models (module text).
STEP_SIZE = 20.0
FINAL_STEP_FRACTION = 0.5
REFINE_FRACTION = 0.5
PATIENCE_FRACTION = 0.1
MAP_SIZE = 16
SD15_NUMBERS_PER_MAP_CELL = 4 * 4 * 4  # 4 latent channels, 4x4 latent cells per 16x16 map cell


# ------------------------------------------------------------------------------------ boxes


def parse_box(text: str) -> Box:
    """A relative box from the CLI form ``"x0,y0,x1,y1"`` (0..1, x along the width, y down)."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 4:
        raise UserError(f"--box {text!r}: give four numbers x0,y0,x1,y1 between 0 and 1, e.g. --box 0,0,0.5,1")
    try:
        x0, y0, x1, y1 = (float(part) for part in parts)
    except ValueError:
        raise UserError(f"--box {text!r}: every coordinate must be a number; give x0,y0,x1,y1, "
                        "e.g. 0,0,0.5,1") from None
    if not all(0.0 <= value <= 1.0 for value in (x0, y0, x1, y1)):
        raise UserError(f"--box {text!r} is outside the image: coordinates are relative, between 0 and 1")
    if x1 <= x0 or y1 <= y0:
        raise UserError(f"--box {text!r} has zero area: give x0 < x1 and y0 < y1 (left, top, right, bottom)")
    return Box(x0, y0, x1, y1)


def side_by_side_boxes(count: int) -> tuple[Box, ...]:
    """``count`` full-height boxes splitting the image into equal columns, left to right."""
    return tuple(Box(index / count, 0.0, (index + 1) / count, 1.0) for index in range(count))


def as_box(value: Box | Sequence[float]) -> Box:
    """A :class:`Box` from a Box or four relative numbers (x0, y0, x1, y1)."""
    if isinstance(value, Box):
        return value
    numbers = tuple(value)
    if len(numbers) != 4:
        raise UserError(f"composer box {numbers!r}: give four relative numbers (x0, y0, x1, y1) or a Box")
    return Box(*(float(number) for number in numbers))


@dataclass(frozen=True)
class CellRect:
    """Rows ``[top, bottom)`` and columns ``[left, right)`` of a grid."""

    top: int
    left: int
    bottom: int
    right: int

    @classmethod
    def bounding(cls, mask: torch.Tensor) -> CellRect | None:
        """The smallest rectangle holding every True cell of a 2-D mask (None if there is none)."""
        rows, columns = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        if rows.numel() == 0:
            return None
        return cls(int(rows[0]), int(columns[0]), int(rows[-1]) + 1, int(columns[-1]) + 1)

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left


@dataclass(frozen=True)
class ConceptGeometry:
    """Where one concept's box falls for this generation's latent size."""

    map_mask: torch.Tensor  # bool (rows, columns) at the attention-map level
    latent_rect: CellRect
    top_k: int  # cells in the top-k statistics: round(ratio · |B|), 0 when the box misses the map level

    @property
    def map_rect(self) -> CellRect | None:
        return CellRect.bounding(self.map_mask)


# ------------------------------------------------------------------------------------ losses


def top_k_count(box_mask: torch.Tensor, ratio: float = TOP_K_RATIO) -> int:
    """round(ratio · |B|), at least 1 for a non-empty box (0 for an empty one)."""
    cells = int(box_mask.sum())
    return 0 if cells == 0 else max(1, round(ratio * cells))


def top_k_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest entries of ``values`` (all of them if there are fewer)."""
    flat = values.flatten()
    return torch.topk(flat, min(k, flat.numel())).values.mean()


def gaussian_kernel(size: int = SMOOTHING_KERNEL_SIZE, sigma: float = SMOOTHING_SIGMA) -> torch.Tensor:
    """A (size, size) float64 Gaussian exp(-d²/2σ²) normalised to sum 1."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    line = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = torch.outer(line, line)
    return kernel / kernel.sum()


def smooth_maps(maps: torch.Tensor, size: int = SMOOTHING_KERNEL_SIZE, sigma: float = SMOOTHING_SIGMA) -> torch.Tensor:
    """Each (..., rows, columns, tokens) map convolved with :func:`gaussian_kernel`, same size out
    (reflect padding; replicate on a side of one cell, where reflection is undefined)."""
    leading, (rows, columns, tokens) = maps.shape[:-3], maps.shape[-3:]
    planes = maps.reshape(-1, rows, columns, tokens).permute(0, 3, 1, 2).reshape(-1, 1, rows, columns)
    pad = size // 2
    mode = "reflect" if min(rows, columns) > pad else "replicate"
    padded = F.pad(planes, (pad, pad, pad, pad), mode=mode)
    kernel = gaussian_kernel(size, sigma).to(planes)[None, None]
    smoothed = F.conv2d(padded, kernel).reshape(-1, tokens, rows, columns).permute(0, 2, 3, 1)
    return smoothed.reshape(*leading, rows, columns, tokens)


def box_gaussian(box_mask: torch.Tensor, sigma: float = BOX_GAUSSIAN_SIGMA) -> torch.Tensor:
    """G: exp(-(x² + y²)/2σ²) with x, y spanning [-1, 1] over the box's cells (0 for a one-cell side),
    zero outside the box's bounding rectangle."""
    gaussian = torch.zeros(box_mask.shape, dtype=torch.float32, device=box_mask.device)
    rect = CellRect.bounding(box_mask)
    if rect is None:
        return gaussian
    y = _centred_axis(rect.height, box_mask.device)
    x = _centred_axis(rect.width, box_mask.device)
    squared = y[:, None] ** 2 + x[None, :] ** 2
    gaussian[rect.top:rect.bottom, rect.left:rect.right] = torch.exp(-squared / (2 * sigma**2))
    return gaussian


def _centred_axis(cells: int, device: torch.device) -> torch.Tensor:
    if cells == 1:
        return torch.zeros(1, device=device)
    return torch.linspace(-1.0, 1.0, cells, device=device)


def box_attention_loss(maps: torch.Tensor, box_mask: torch.Tensor, top_k: int,
                       weight: float = BOX_LOSS_WEIGHT) -> torch.Tensor:
    """Σ_tok weight · max(0, 1 - mean(top-k(A_tok ⊙ B ⊙ G))) for maps (rows, columns, tokens)."""
    inside = maps * (box_mask.to(maps) * box_gaussian(box_mask).to(maps))[..., None]
    per_token = [torch.relu(1 - top_k_mean(inside[..., t], top_k)) for t in range(maps.shape[-1])]
    return weight * torch.stack(per_token).sum()


def fill_loss(maps: torch.Tensor, box_mask: torch.Tensor, weight: float = FILL_LOSS_WEIGHT) -> torch.Tensor:
    """Σ_tok weight·mean|p_x - proj_x(B)| + weight·mean|p_y - proj_y(B)|, p_x = max over rows of
    A_tok ⊙ B (one value per column), p_y = max over columns (one per row)."""
    box = box_mask.to(maps)
    inside = maps * box[..., None]
    along_x = (inside.amax(dim=0) - box.amax(dim=0)[:, None]).abs().mean(dim=0)
    along_y = (inside.amax(dim=1) - box.amax(dim=1)[:, None]).abs().mean(dim=0)
    return weight * (along_x + along_y).sum()


def region_leakage_loss(self_attention: torch.Tensor, box_cells: torch.Tensor, top_k: int,
                        weight: float = REGION_LOSS_WEIGHT) -> torch.Tensor:
    """weight · mean(top-k(S[queries in B, keys outside B])), clipped at 0; S is (cells, cells),
    ``box_cells`` the flattened bool box mask. Zero when the box covers every cell."""
    leaking = self_attention[box_cells][:, ~box_cells]
    if leaking.numel() == 0:
        return self_attention.sum() * 0
    return weight * torch.clamp(top_k_mean(leaking, top_k), min=0)


# ------------------------------------------------------------------------------------ steps


@dataclass(frozen=True)
class RefinementSchedule:
    """Step sizes φ_i = step_size · sqrt(linspace(1, final_fraction, T)[i]) and the stop rule:
    refinement ends for good after step i when i >= last_step, or when i >= patience_step and the
    loss rose since the previous step (so at most last_step + 1 refined steps)."""

    num_steps: int
    step_size: float = 20.0
    final_fraction: float = 0.5
    last_step: int = 25
    patience_step: int = 5

    def step_size_at(self, index: int) -> float:
        fraction = 1.0 if self.num_steps == 1 else 1.0 + (self.final_fraction - 1.0) * index / (self.num_steps - 1)
        return self.step_size * math.sqrt(fraction)

    def stops_after(self, index: int, loss: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """Per image: whether refinement ends after step ``index`` with this loss."""
        if index >= self.last_step:
            return torch.ones_like(loss, dtype=torch.bool)
        if previous is None or index < self.patience_step:
            return torch.zeros_like(loss, dtype=torch.bool)
        return loss > previous


@dataclass(frozen=True)
class RefinedStep:
    """One refined step, per image: the loss, whether the latent moved, and the step size."""

    index: int
    losses: tuple[float, ...]
    updated: tuple[bool, ...]
    step_size: float


# ------------------------------------------------------------------------------------ re-initialisation


def best_window(score_map: torch.Tensor, height: int, width: int) -> tuple[int, int]:
    """(row, column) of the top-left cell of the ``height`` x ``width`` window with the largest sum
    of ``score_map`` (rows, columns); the first one in row-major order on ties."""
    ones = torch.ones(1, 1, height, width, dtype=score_map.dtype, device=score_map.device)
    sums = F.conv2d(score_map[None, None], ones)[0, 0]
    index = int(torch.argmax(sums.flatten()))
    return divmod(index, sums.shape[1])


def reinitialised_noise(noise: torch.Tensor, copies: Sequence[tuple[CellRect, tuple[int, int]]]) -> torch.Tensor:
    """``noise`` (channels, rows, columns) with each target rectangle replaced by the same-sized
    window of the original noise starting at (row, column), then shifted and scaled back to the
    original mean and standard deviation."""
    result = noise.clone()
    for target, (row, column) in copies:
        row = min(row, noise.shape[-2] - target.height)
        column = min(column, noise.shape[-1] - target.width)
        result[:, target.top:target.bottom, target.left:target.right] = \
            noise[:, row:row + target.height, column:column + target.width]
    return (result - result.mean()) / result.std() * noise.std() + noise.mean()


# ------------------------------------------------------------------------------------ the method


@dataclass
class ConceptMaps:
    """What the losses read from one conditional UNet call."""

    cross: list[torch.Tensor]  # per placed concept: (images, rows, columns, its tokens), smoothed
    self_attention: torch.Tensor | None  # (images, cells, cells), or None when not captured
    latents: torch.Tensor  # the latent the call ran on (with grad while refining)


@dataclass
class Composer(CompositionMethod):
    """Each concept's whole LoRA injected inside its box on every layer it adapts, one UNet pass per
    step, with concept isolation in self-attention and test-time latent refinement and
    re-initialisation (see the module text).

    Args:
        boxes: one box per LoRA, or one per local LoRA (object, character, clothing...), in the LoRAs'
            order: a :class:`Box` (relative 0..1, or ``Box.from_pixels``) or four relative numbers
            (x0, y0, x1, y1). Boxes may overlap; a box covering the whole image makes the LoRA global.
            None or empty: the local LoRAs side by side in equal full-height columns, left to right;
            global ones (category style or background) on the whole image.
        region_prompts: one per LoRA (None or "": the generation's prompt); None: the prompt for all.
        isolate: concept isolation in self-attention.
        refine: test-time latent refinement with the three losses.
        refine_with_globals: refine also when a background or style LoRA is in the set (off: its latent
            updates washed out the toy world's style).
        reinitialise: copy the best window of the initial noise into each box.
        box_weight, fill_weight, region_weight, top_k_ratio: the losses' weights and top-k share.
        step_size: φ at SD1.5's geometry (64 latent numbers per attention-map cell); scaled by the
            model's latent numbers per map cell.
        final_step_fraction: φ decays as sqrt(linspace(1, final_step_fraction, T)).
        refine_fraction, patience_fraction: the stop rule as shares of the steps (the paper's steps 25
            and 5 of 50).
        map_size: the side, in cells, of the attention maps the losses read (the paper's 16x16): the
            attention level nearest to it.
        checkpoint_refinement: gradient checkpointing on the refinement pass's units outside the map
            blocks (attention.checkpoint_outside_layers): their activations are recomputed in the
            backward instead of kept, for one more forward of those units per refined step.
        backend: attention kernel of self-attention (``"sdpa"``; ``"flex"`` has no CPU backward).
    """

    name: ClassVar[str] = "composer"
    families: ClassVar[frozenset[str]] = ALL_FAMILIES
    boxes: tuple[Box, ...] | None = field(default=None, metadata={
        "flags": ("--box",), "parse": lambda text: parse_box(text), "metavar": "X0,Y0,X1,Y1",
        "help": "one box per LoRA (or per local LoRA) in the LoRAs' order, relative x0,y0,x1,y1 (0..1, y down); "
                "default: local LoRAs side by side in equal columns, backgrounds and styles the whole image"})
    region_prompts: tuple[str | None, ...] | None = field(default=None, metadata={
        "flags": ("--region-prompt",),
        "help": "one region prompt per LoRA ('' = the whole prompt, the default)"})
    isolate: bool = field(default=True, metadata={"flag_values": {"--composer-no-isolate": False}})
    refine: bool = field(default=True, metadata={"flag_values": {"--composer-no-refine": False}})
    refine_with_globals: bool = False
    reinitialise: bool = field(default=True, metadata={"flag_values": {"--composer-no-reinit": False}})
    box_weight: float = BOX_LOSS_WEIGHT
    fill_weight: float = FILL_LOSS_WEIGHT
    region_weight: float = REGION_LOSS_WEIGHT
    top_k_ratio: float = TOP_K_RATIO
    step_size: float = STEP_SIZE
    final_step_fraction: float = FINAL_STEP_FRACTION
    refine_fraction: float = REFINE_FRACTION
    patience_fraction: float = PATIENCE_FRACTION
    map_size: int = MAP_SIZE
    checkpoint_refinement: bool = field(default=True, metadata={"flag_values": {"--composer-no-checkpointing": False}})
    backend: str = "sdpa"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.automatic_boxes = not self.boxes
        self._given_boxes = tuple(as_box(box) for box in self.boxes or ())
        self.boxes = self._given_boxes
        if self.region_prompts is not None:
            self.region_prompts = tuple(self.region_prompts)
        self.areas: list[Box | None] = []
        self.region_masks: RegionMasks | None = None
        self.processors: dict[str, ComposeAttnProcessor] = {}
        self.refinement_trace: list[RefinedStep] = []
        self.token_positions: list[list[int]] = []
        self._run: Denoiser | None = None
        self._regional: RegionalPatches | None = None
        self._self_processors: list[ComposeAttnProcessor] = []
        self._cross_store = AttentionStore(requires_grad=True)
        self._self_store = AttentionStore(requires_grad=True)
        self._capturing_cross = False
        self._concepts: list[ConceptGeometry] = []
        self._map_level = 0
        self._cross_map_layers: list[str] = []
        self._self_map_layers: list[str] = []
        self._refining = torch.zeros(0, dtype=torch.bool)
        self._previous_loss: torch.Tensor | None = None
        self._joint: JointRegions | None = None  # DiTs: the joint attention's masks
        self._token_grid: tuple[int, int] | None = None  # DiTs: the image-token grid (rows, columns)
        self._map_calls = 0  # DiTs: index of the latest map pass (a new one clears the map stores)
        self._packs_tokens = False  # FLUX: the loop's latents are packed tokens (see _on_grid)
        self.segment_codes: tuple[int, ...] = ()  # DiTs: the group code of each text segment

    # -- settings --------------------------------------------------------------------------------
    def bind(self, loras: Sequence[LoadedLora]) -> None:
        require_loras(self.name, loras)
        self.areas = self._layout(loras)
        whole = Box(0.0, 0.0, 1.0, 1.0)
        self.boxes = tuple(whole if area is None else area for area in self.areas)
        super().bind(loras)

    def _layout(self, loras: Sequence[LoadedLora]) -> list[Box | None]:
        """Each LoRA's box, None for the whole image (a global LoRA)."""
        local = [index for index, lora in enumerate(loras) if not is_global_kind(lora.category)]
        given = list(self._given_boxes)
        if self.automatic_boxes:
            given = list(side_by_side_boxes(len(local)))
        if len(given) == len(local) and len(given) != len(loras):
            placed = iter(given)
            given = [next(placed) if index in local else Box(0.0, 0.0, 1.0, 1.0) for index in range(len(loras))]
        if len(given) > len(loras):
            raise UserError(f"composer: {len(given)} boxes for {len(loras)} LoRAs; give exactly one --box per --lora")
        if len(given) < len(loras):
            raise UserError(f"composer: {len(loras)} LoRAs but only {len(given)} boxes; give one --box x0,y0,x1,y1 per "
                            f"--lora in the same order, or one per local LoRA ({len(local)} here)")
        return [None if box.as_tuple() == (0.0, 0.0, 1.0, 1.0) else box for box in given]

    def check(self, loras: Sequence[LoadedLora]) -> None:
        if self.region_prompts is not None and len(self.region_prompts) != len(loras):
            raise UserError(f"composer: {len(self.region_prompts)} region prompts for {len(loras)} LoRAs; give one "
                            "per LoRA (empty for the whole prompt)")
        self._check_numbers()
        if any(lora.architecture in (FLUX, SD3) for lora in loras):
            self._check_dit_settings()

    def _check_dit_settings(self) -> None:
        """Settings that choose among a UNet's parts, which FLUX/SD3 do not have."""
        if self.backend != "sdpa":
            raise UserError(f"composer backend={self.backend!r} picks a UNet self-attention kernel; on FLUX/SD3 the "
                            "masked joint attention runs on torch SDPA, leave backend='sdpa'")
        if self.map_size != MAP_SIZE:
            raise UserError(f"composer map_size={self.map_size} picks a UNet attention level; FLUX/SD3 read their "
                            f"one image-token grid, leave map_size at {MAP_SIZE}")

    def _check_numbers(self) -> None:
        if min(self.box_weight, self.fill_weight, self.region_weight, self.step_size) < 0:
            raise UserError("composer loss weights and step_size must be non-negative")
        if not 0 < self.top_k_ratio <= 1:
            raise UserError(f"composer top_k_ratio={self.top_k_ratio}: give a share in (0, 1]")
        if self.final_step_fraction < 0:
            raise UserError(f"composer final_step_fraction={self.final_step_fraction} must be non-negative")
        if not (0 <= self.refine_fraction <= 1 and 0 <= self.patience_fraction <= 1):
            raise UserError("composer refine_fraction and patience_fraction are shares of the steps, between 0 and 1")
        if self.map_size < 1:
            raise UserError(f"composer map_size={self.map_size}: give the attention-map side in cells, at least 1")

    def _given_region_prompt(self, index: int) -> str:
        if self.region_prompts is None:
            return ""
        return (self.region_prompts[index] or "").strip()

    def region_prompt(self, index: int) -> str | None:
        """Concept ``index``'s region prompt: the one given, else None (the generation's prompt)."""
        return self._given_region_prompt(index) or None

    def group_branch(self, members: Sequence[int]) -> Branch:
        """The branch whose prompt the positions covered by the concepts ``members`` attend to: the
        placed concepts' region prompts (joined) with every member's LoRA on the text encoder(s)."""
        placed = [k for k in members if self.areas[k] is not None]
        prompts = list(dict.fromkeys(p for p in (self.region_prompt(k) for k in placed or members) if p))
        weights = {self.loras[k].name: self.loras[k].weight for k in members}
        return Branch.of(weights, prompt=", ".join(prompts) if prompts else None)

    def region_branch(self, index: int) -> Branch:
        """The branch whose prompt concept ``index``'s box attends to (with the global LoRAs there)."""
        return self.group_branch(code_members(self._concept_code(index), len(self.loras)))

    def _concept_code(self, index: int) -> int:
        """The region code of positions in concept ``index``'s box and in no other box."""
        global_bits = sum(1 << k for k, area in enumerate(self.areas) if area is None)
        return (1 << index) | global_bits

    @property
    def placed(self) -> list[int]:
        """Indices of the concepts with a box of their own (losses, isolation, re-initialisation)."""
        return [k for k, area in enumerate(self.areas) if area is not None]

    @property
    def refines(self) -> bool:
        """Whether this generation refines the latent: ``refine``, a placed concept to refine for, and no
        global LoRA unless ``refine_with_globals`` (measured: refinement's latent updates wash out a
        style; toy world, moxel + sepia style, style kept 7/16 with it, 14/16 without)."""
        has_global = len(self.placed) < len(self.loras)
        return self.refine and bool(self.placed) and (self.refine_with_globals or not has_global)

    @property
    def placed_boxes(self) -> list[Box]:
        """The boxes of :attr:`placed`, in that order."""
        return [area for area in self.areas if area is not None]

    def _patches(self) -> RegionalPatches:
        if self._regional is None or self._run is None:
            raise UserError("composer: no generation is running; call it through pipe.generate(...)")
        return self._regional

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, run: Denoiser) -> None:
        self._run = run
        names = [lora.name for lora in self.loras]
        check_adapters_loaded(run.unet, names)
        # Every LoRA is active on the UNet; the regional patches confine each one's deltas to its box.
        run.adapters.activate({lora.name: lora.weight for lora in self.loras}, components=["unet"])
        self.region_masks = RegionMasks(names, list(self.areas))
        token_grid = getattr(run.model, "token_grid", None)
        if token_grid is not None:
            self._start_dit(run, (int(token_grid[0]), int(token_grid[1])))
            return
        self._regional = install_regional(run.unet, self.region_masks, self._group_states, run.patches)
        self.token_positions = [self._concept_tokens(run, k) for k in self.placed]
        isolation = RegionAttention([Region(box) for box in self.placed_boxes], inject_concepts=False,
                                    isolate_self_attention=self.isolate)
        self.processors = processors_for(select_layers(run.unet, "self"),
                                         lambda _: ComposeAttnProcessor(self.backend, regions=isolation))
        run.patches.processors(run.unet, self.processors)
        self.refinement_trace = []

    def _start_dit(self, run: Denoiser, token_grid: tuple[int, int]) -> None:
        """FLUX/SD3: one text segment per group of regions, the joint attention masked per region and
        every LoRA layer masked per token (attention/composer_dit.py)."""
        if self.region_masks is None:
            raise RuntimeError("composer: the region masks are made before the DiT patches")
        grid = LatentGrid(*token_grid)
        self._check_grid(grid)
        codes = self.region_masks.codes(grid, 0)
        self.segment_codes = segment_codes(codes)
        tokens = int(self._group_states(self.segment_codes[0]).shape[1])
        model: Any = run.model  # the DiT model calls declare their stream order
        layout = JointLayout(self.segment_codes, tokens, codes, sum(1 << k for k in self.placed),
                             tuple(model.joint_order), self.isolate, token_grid)
        self._token_grid = token_grid
        install_regional_dit(run.unet, self.region_masks, token_grid, layout.joint_order, run.patches,
                             text_members=layout.text_members(len(self.loras)))
        self._joint = JointRegions(layout)
        install_joint_regions(run.unet, self._joint, run.patches)
        self.token_positions = [self._dit_concept_tokens(run, k) for k in self.placed]
        self.refinement_trace = []

    def _segments_pass(self, batch: BranchBatch) -> torch.Tensor:
        """One transformer call whose text stream is every group's segment side by side (the pooled
        text vector stays the generation's, with every LoRA's text-encoder deltas)."""
        run = self._running()
        return run.run_unet(batch.sample, batch.timestep, self._segments_conditioning(batch.conditioning),
                            cross_attention_kwargs=batch.cross_attention_kwargs)

    def _segments_conditioning(self, conditioning: Conditioning) -> Conditioning:
        """``conditioning`` (rows like the generation's, or its conditional half) with the segments' text."""
        rows = int(conditioning.embeds.shape[0])
        states = [self._group_states(code)[-rows:] for code in self.segment_codes]  # [-rows:]: conditional half
        return Conditioning(concatenated_segments(states), conditioning.added)

    def _concept_segment(self, index: int) -> int:
        """The text segment concept ``index``'s map reads: its own group's (box ``index`` and no other),
        else the group holding it that covers most of its box (a box that others cover entirely)."""
        code = self._concept_code(index)
        if code in self.segment_codes:
            return self.segment_codes.index(code)
        if self.region_masks is None or self._token_grid is None:
            raise UserError("composer: no generation is running; call it through pipe.generate(...)")
        codes = self.region_masks.codes(LatentGrid(*self._token_grid), 0)
        inside = codes[(codes >> index & 1) == 1]
        return self.segment_codes.index(int(torch.mode(inside).values))

    def _dit_concept_tokens(self, run: Denoiser, index: int) -> list[int]:
        """Concept ``index``'s tokens within its text segment (joint text stream positions)."""
        from loracompose.methods.tara import joint_text_streams  # tara imports this module's neighbours

        tokenizers = getattr(run, "tokenizers", None)
        if not tokenizers:
            raise UserError("composer needs the pipeline's tokenizer(s) to find concept tokens; run it through "
                            "pipe.generate(...)")
        code = self.segment_codes[self._concept_segment(index)]
        prompt = self.group_branch(code_members(code, len(self.loras))).prompt or getattr(run, "prompt", None) or ""
        tokens = int(self._group_states(code).shape[1])
        return stream_concept_positions(joint_text_streams(tokenizers, tokens), prompt,
                                        self.loras[index].trigger_words)

    def _running(self) -> Denoiser:
        if self._run is None:
            raise UserError("composer: no generation is running; call it through pipe.generate(...)")
        return self._run

    def _group_states(self, code: int) -> torch.Tensor:
        members = code_members(code, len(self.loras))
        if self._run is None:
            raise UserError("composer: group prompts are encoded during a generation only")
        return self._run.conditioning(self.group_branch(members) if members else BASE).embeds

    def _concept_tokens(self, run: Denoiser, index: int) -> list[int]:
        tokenizers = getattr(run, "tokenizers", None)
        if not tokenizers:
            raise UserError("composer needs the pipeline's tokenizer(s) to find concept tokens; run it through "
                            "pipe.generate(...)")
        prompt = self.region_branch(index).prompt or getattr(run, "prompt", None) or ""
        return concept_token_positions(tokenizers, prompt, self.loras[index].trigger_words)

    def _install_maps(self, run: Denoiser, grid: LatentGrid) -> None:
        """Pick the map level for this latent size and hook map capture onto its layers."""
        self._map_level = map_level(run.unet, grid, self.map_size)
        cross = map_layers(run.unet, self._map_level)
        self._cross_map_layers = [layer.name for layer in cross]
        self._self_map_layers = [self_attention_of(layer.name) for layer in cross]
        for processor_name in self._self_map_layers:
            self._self_processors.append(self.processors[processor_name])
        for name in self._cross_map_layers:
            module = run.unet.get_submodule(name)
            run.patches.hook(module.register_forward_pre_hook(self._cross_capture_hook(name), with_kwargs=True))

    def _cross_capture_hook(self, layer_name: str) -> Any:
        def capture(attn: Attention, args: tuple, kwargs: dict) -> None:
            if self._capturing_cross:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._record_concept_maps(layer_name, attn, hidden)

        return capture

    def _record_concept_maps(self, layer_name: str, attn: Attention, hidden: torch.Tensor) -> None:
        """Each placed concept's map on one cross-attention layer: every query against the keys its box
        attends to (its region prompt through its LoRA's to_k)."""
        patches = self._patches()
        if hidden.ndim != 3:
            raise UserError(f"composer reads maps from token-first cross-attention; layer {layer_name} got "
                            f"{hidden.ndim}-D hidden states")
        grid = patches.grid
        level = patches.masks.level_for_tokens(grid, int(hidden.shape[1]))
        if level is None:
            raise UserError(f"layer {layer_name} has {hidden.shape[1]} queries, no feature-map size of this latent")
        query = attn.to_q(hidden)
        query = query.view(query.shape[0], query.shape[1], attn.heads, -1).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        processor = attn.processor
        for slot, index in enumerate(self.placed):
            key, _ = processor._key_value(attn, hidden, self._concept_code(index))
            self._cross_store.record(layer_name, patches.call.index, grid.level_size(level), query, key, attn.scale,
                                     source=slot)

    def prepare_latents(self, run: Denoiser, step: Step, latents: torch.Tensor) -> torch.Tensor:
        grid_latents = self._on_grid(latents)  # FLUX's packed tokens as a (features, rows, columns) grid
        if step.index == 0:
            if self._joint is None:
                grid = LatentGrid(int(latents.shape[-2]), int(latents.shape[-1]))
                self._check_grid(grid)
                for code in self._patches().masks.all_codes(grid):  # every group's prompt before the UNet runs
                    self._group_states(code)
                self._install_maps(run, grid)
            else:
                self._install_dit_maps(run, grid_latents)
            self._concepts = self._geometry(grid_latents)
            self._refining = torch.full((latents.shape[0],), self.refines, dtype=torch.bool)
            self._previous_loss = None
            if self.reinitialise and self.placed:
                grid_latents = self._reinitialise(run, step, grid_latents)
        if bool(self._refining.any()):
            grid_latents = self._refine(run, step, grid_latents)
        return self._packed(grid_latents)

    def _on_grid(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as (batch, channels, rows, columns): FLUX's packed (batch, tokens, features) tokens
        laid on their grid, features as channels; others as they are."""
        self._packs_tokens = latents.ndim == 3 and self._token_grid is not None
        if not self._packs_tokens or self._token_grid is None:
            return latents
        return latents.transpose(1, 2).reshape(latents.shape[0], latents.shape[2], *self._token_grid)

    def _packed(self, grid_latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`_on_grid` (differentiable)."""
        return grid_latents.flatten(2).transpose(1, 2) if self._packs_tokens else grid_latents

    def _install_dit_maps(self, run: Denoiser, grid_latents: torch.Tensor) -> None:
        """The map blocks (auto's: the later half of the joint blocks) and the map level: the image-token
        grid is the latent grid halved ``level`` times (SD3: patch 2, level 1; FLUX's packed grid: 0)."""
        if self._token_grid is None:
            raise UserError("composer: no generation is running; call it through pipe.generate(...)")
        self._cross_map_layers, self._self_map_layers = default_map_blocks(run.unet), []
        ratio = int(grid_latents.shape[-2]) // self._token_grid[0]
        self._map_level = ratio.bit_length() - 1
        if 2**self._map_level != ratio or grid_latents.shape[-1] // self._token_grid[1] != ratio:
            raise UserError(f"composer: a {grid_latents.shape[-2]}x{grid_latents.shape[-1]} latent does not split "
                            f"into the {self._token_grid[0]}x{self._token_grid[1]} image tokens by a power of two")

    def _check_grid(self, grid: LatentGrid) -> None:
        for lora, area in zip(self.loras, self.areas):
            if area is not None and not bool(grid.box_mask(area, 0).any()):
                raise UserError(f"composer box {area.as_tuple()} of LoRA {lora.name} covers no latent cell at this "
                                "image size; make it larger")

    def predict(self, run: Denoiser, step: Step, latents: torch.Tensor) -> Prediction:
        if self._joint is not None:
            return run.predict(latents, step, [self.branch(*self.loras)], unet_pass=self._segments_pass)[0]
        return run.predict(latents, step, [self.branch(*self.loras)])[0]

    def finish(self, run: Denoiser) -> None:
        for processor in self._self_processors:
            processor.store = None
        self._self_processors = []
        self._capturing_cross = False
        self._cross_store.clear()
        self._self_store.clear()
        self._regional = None  # restored by run.patches
        self._joint = None
        self._token_grid = None
        self._run = None

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        if self.segment_codes:  # FLUX/SD3: the group code of each text segment
            settings["text_segments"] = list(self.segment_codes)
        return settings

    # -- geometry --------------------------------------------------------------------------------
    def _geometry(self, latents: torch.Tensor) -> list[ConceptGeometry]:
        grid = LatentGrid(int(latents.shape[-2]), int(latents.shape[-1]))
        concepts = []
        for box in self.placed_boxes:
            latent_rect = CellRect.bounding(grid.box_mask(box, 0))
            if latent_rect is None:  # _check_grid refused it already
                raise UserError(f"composer box {box.as_tuple()} covers no latent cell at this image size")
            map_mask = grid.box_mask(box, self._map_level).to(latents.device)
            concepts.append(ConceptGeometry(map_mask, latent_rect, top_k_count(map_mask, self.top_k_ratio)))
        return concepts

    # -- maps ------------------------------------------------------------------------------------
    @contextmanager
    def _capturing(self, self_attention: bool) -> Iterator[None]:
        """Map capture on the map-level layers for one call (the CFG calls capture nothing)."""
        if self._joint is not None:
            with self._capturing_joint(self_attention):
                yield
            return
        self._capturing_cross = True
        for processor in self._self_processors:
            processor.store = self._self_store if self_attention else None
        try:
            yield
        finally:
            self._capturing_cross = False
            for processor in self._self_processors:
                processor.store = None

    @contextmanager
    def _capturing_joint(self, self_attention: bool) -> Iterator[None]:
        """DiTs: the map blocks' processors record into the stores for one call."""
        joint = self._joint
        if joint is None:
            raise UserError("composer: no generation is running; call it through pipe.generate(...)")
        self._map_calls += 1
        joint.capture = JointCapture(frozenset(self._cross_map_layers), self._cross_store,
                                     [self._concept_segment(k) for k in self.placed], self._map_calls,
                                     self._self_store if self_attention else None)
        try:
            yield
        finally:
            joint.capture = None

    def concept_maps(self, run: Denoiser, sample: torch.Tensor, timestep: torch.Tensor, *,
                     latents: torch.Tensor | None = None, self_attention: bool = True) -> ConceptMaps:
        """One conditional UNet call on ``sample`` (the model input made from ``latents``, default:
        the sample itself) with the placed concepts' maps read out."""
        conditioning = run.conditioning(self.branch(*self.loras)).halves(run.num_halves)[-1]
        # Only the map layers are read: the call ends after them (the finer up blocks never run).
        layers = self._cross_map_layers + (self._self_map_layers if self_attention else [])
        if self._joint is not None:
            conditioning = self._segments_conditioning(conditioning)
        with self._capturing(self_attention), stop_after_layers(run.unet, layers):
            run.run_unet(sample, timestep, conditioning)
        cross = [smooth_maps(self._cross_store.maps(source=slot)[..., tokens])
                 for slot, tokens in enumerate(self.token_positions)]
        attention = None
        if self_attention:
            maps = self._self_store.maps()
            attention = maps.reshape(maps.shape[0], maps.shape[1] * maps.shape[2], maps.shape[3])
        return ConceptMaps(cross, attention, sample if latents is None else latents)

    # -- refinement ------------------------------------------------------------------------------
    def refinement_losses(self, maps: ConceptMaps) -> torch.Tensor:
        """L per image: Σ over placed concepts of the box, fill and region-leakage losses."""
        per_image = []
        for image in range(maps.latents.shape[0]):
            terms = [self._concept_loss(maps, image, slot) for slot, concept in enumerate(self._concepts)
                     if concept.top_k]
            per_image.append(torch.stack(terms).sum() if terms else maps.latents.new_zeros((), dtype=torch.float32))
        return torch.stack(per_image)

    def _concept_loss(self, maps: ConceptMaps, image: int, slot: int) -> torch.Tensor:
        concept = self._concepts[slot]
        token_maps = maps.cross[slot][image]
        loss = box_attention_loss(token_maps, concept.map_mask, concept.top_k, self.box_weight)
        loss = loss + fill_loss(token_maps, concept.map_mask, self.fill_weight)
        if maps.self_attention is not None:
            loss = loss + region_leakage_loss(maps.self_attention[image], concept.map_mask.flatten(), concept.top_k,
                                              self.region_weight)
        return loss

    def schedule(self, num_steps: int, latent_shape: Sequence[int] | None = None) -> RefinementSchedule:
        """The step sizes and stop rule for ``num_steps`` steps on a latent of ``latent_shape``
        (channels, rows, columns; None: SD1.5's geometry, no scaling)."""
        scale = 1.0 if latent_shape is None else step_scale(latent_shape, self._map_level)
        return RefinementSchedule(num_steps, self.step_size * scale, self.final_step_fraction,
                                  round(self.refine_fraction * num_steps), round(self.patience_fraction * num_steps))

    def _refine(self, run: Denoiser, step: Step, latents: torch.Tensor) -> torch.Tensor:
        schedule = self.schedule(step.num_steps, latents.shape[1:])
        latent = latents.detach().requires_grad_(True)
        step_size = schedule.step_size_at(step.index)
        # The backward runs with the weights frozen as in the forward: checkpointed units replay it there.
        with frozen_parameters(run.unet):
            with torch.enable_grad(), self._checkpointing(run.unet):
                # scale_model_input is differentiable (identity or a division), so ∇ is taken w.r.t. z itself
                maps = self.concept_maps(run, run.model_input(self._packed(latent), step, 1), step.timestep,
                                         latents=latent)
                losses = self.refinement_losses(maps)
            updated = self._refining & (losses.detach().cpu() != 0)
            if bool(updated.any()) and losses.requires_grad:
                (gradient,) = torch.autograd.grad((losses * updated.to(losses)).sum(), latent)
                run.stats.backward_passes += 1
                latents = latents - step_size * gradient * updated.to(gradient).view(-1, *[1] * (latents.ndim - 1))
        values = losses.detach().float().cpu()
        trace = RefinedStep(step.index, tuple(values.tolist()), tuple(updated.tolist()), step_size)
        self.refinement_trace.append(trace)
        self._refining = self._refining & ~schedule.stops_after(step.index, values, self._previous_loss)
        self._previous_loss = values
        return latents.detach()

    def _checkpointing(self, unet: torch.nn.Module) -> ContextManager[None]:
        if not self.checkpoint_refinement:
            return nullcontext()
        return checkpoint_outside_layers(unet, self._cross_map_layers + self._self_map_layers)

    # -- re-initialisation -----------------------------------------------------------------------
    def _reinitialise(self, run: Denoiser, step: Step, latents: torch.Tensor) -> torch.Tensor:
        sigma = float(getattr(run.scheduler, "init_noise_sigma", 1.0))  # flow matching starts from N(0, I)
        noise = latents / sigma
        with torch.no_grad():
            maps = self.concept_maps(run, self._packed(noise), step.timestep, self_attention=False)
        stride = 2**self._map_level
        images = []
        for image in range(noise.shape[0]):
            copies = []
            for concept, concept_maps in zip(self._concepts, maps.cross):
                rect = concept.map_rect
                if rect is not None:
                    row, column = best_window(concept_maps[image].sum(dim=-1), rect.height, rect.width)
                    copies.append((concept.latent_rect, (row * stride, column * stride)))
            images.append(reinitialised_noise(noise[image], copies))
        return torch.stack(images) * sigma


def self_attention_of(cross_attention_name: str) -> str:
    """attn1 of the transformer block whose attn2 is ``cross_attention_name``."""
    return cross_attention_name.removesuffix("attn2") + "attn1"


def map_level(unet: torch.nn.Module, grid: LatentGrid, map_size: int = MAP_SIZE) -> int:
    """The level (with cross-attention in the down and up blocks) whose feature map is nearest
    ``map_size`` cells on its longer side (ties: the coarser level)."""
    levels = sorted({layer.level for layer in select_layers(unet, "cross", blocks=("down", "up"))})
    if not levels:
        raise UserError("composer needs a UNet with cross-attention in its down and up blocks")
    return min(reversed(levels), key=lambda level: abs(max(grid.level_size(level)) - map_size))


def map_layers(unet: torch.nn.Module, level: int) -> list[AttentionLayer]:
    """The cross-attention layers the losses read at ``level``: the standard map layers at the deepest
    level (one transformer block per module on SDXL), every down and up layer at a finer one."""
    if level == deepest_attention_level(unet):
        return attention_map_layers(unet)
    return select_layers(unet, "cross", levels=[level], blocks=("down", "up"))


def step_scale(latent_shape: Sequence[int], level: int) -> float:
    """Latent numbers per attention-map cell over SD1.5's (4 channels x 4 x 4 = 64): the gradient of a
    map loss spreads over that many numbers, so φ grows with it to move the maps alike."""
    channels = int(latent_shape[0])
    return channels * 4**level / SD15_NUMBERS_PER_MAP_CELL


def concept_token_positions(tokenizers: Sequence[Any], region_prompt: str, trigger_words: Sequence[str]) -> list[int]:
    """The concept's tokens in its region prompt: its trigger words' positions when they occur there,
    else every word token of the region prompt (never the start or end token)."""
    if trigger_words:
        found = trigger_positions(tokenizers, region_prompt, trigger_words).positions
        if found:
            return found
    tokenizer = tokenizers[0]
    words = len(tokenizer(region_prompt, add_special_tokens=False).input_ids)
    last = min(words, int(tokenizer.model_max_length) - 2)
    if last == 0:
        raise UserError(f"composer region prompt {region_prompt!r} has no tokens; give it words")
    return list(range(1, last + 1))


def stream_concept_positions(streams: Sequence[tuple[Sequence[Any], int]], region_prompt: str,
                             trigger_words: Sequence[str]) -> list[int]:
    """On a DiT, the concept's tokens in its text segment (positions of the joint text stream, streams as
    :func:`~loracompose.tokens.stream_trigger_positions` takes them): its trigger words' positions when
    they occur in the prompt, else every word token of the prompt in each stream (never a start or end
    token)."""
    if trigger_words:
        found = stream_trigger_positions(streams, region_prompt, trigger_words).positions
        if found:
            return list(found)
    positions: list[int] = []
    offset = 0
    for tokenizers, length in streams:
        tokenizer = tokenizers[0]
        words = len(tokenizer(region_prompt, add_special_tokens=False).input_ids)
        bos = getattr(tokenizer, "bos_token_id", None)
        first = 1 if bos is not None and tokenizer(region_prompt).input_ids[:1] == [bos] else 0
        positions.extend(offset + position for position in range(first, min(first + words, length - 1)))
        offset += length
    if not positions:
        raise UserError(f"composer region prompt {region_prompt!r} has no tokens; give it words")
    return positions
