"""Regional LoRA: each LoRA drawn inside its own region, on every layer it adapts.

Two forms, the same regions:

``mode="delta"`` (default) — one UNet pass per step, as Merge::

    every adapted UNet layer:  y = base(x) + Σ_k m_k ⊙ Δ_k(x)          (attention q/k/v/out, FFN,
                               m_k = region k at that layer's resolution  projections, convolutions)
    cross-attention:           queries covered by the regions S attend to S's prompt, encoded with
                               S's text-encoder deltas, through to_k/to_v with S's deltas;
                               queries in no region attend to the base prompt with the base weights

  So every position sees Merge of the LoRAs whose regions cover it (attention/regional.py): regions
  covering the whole image give Merge, empty ones the base model.

``mode="latent"`` — latent couple, N+1 branches per step (one batched UNet call)::

    ε = ε_base · [no region] + Σ_k ε_k · m_k / max(1, Σ_j m_j)      (guided predictions, latent masks)

  ε_base the base model on the prompt, ε_k LoRA k alone on its region prompt; overlaps are averaged.
  Branches whose weight is zero everywhere are not run.

Regions, one per LoRA: ``boxes`` (relative x0, y0, x1, y1, y down) or ``masks`` (grayscale image
files of the image's aspect ratio, any size; or 2-D tensors; a cell is in when half of it is white).
Either list may name every LoRA in order, or only the local ones (those whose category is not global).
A LoRA of a global kind (category ``style`` or ``background``, or a synonym: compose/kinds.py) not
given a region gets the whole image. With neither list, the local LoRAs stand side by side in equal
full-height columns, left to right in LoRA order (automatic masks from trigger-token attention are
the ``auto`` method). Front-ends: ``--box``/``--mask``/``--region-prompt`` (CLI, one per LoRA, repeated),
the web UI's mask canvas (one painted layer per LoRA) or boxes text, ``/generate``'s ``region_masks``.

On FLUX.1 and SD3 the regions lie on the image-token grid and ``delta`` mode masks every transformer
LoRA layer by the tokens it sees (attention/regional_dit.py; the text stream gets the deltas of every
LoRA drawn somewhere); region prompts there need ``mode="latent"`` (docs/methods/regional.md).

Region prompts: by default every region uses the generation's prompt (with its LoRAs' text-encoder
deltas); ``region_prompts`` gives one per LoRA (None or "" keeps the prompt); where regions overlap the
given prompts of the LoRAs there are joined with ", ", those of LoRAs with a region of their own
(not the whole image) taking precedence over a global LoRA's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from PIL import Image, UnidentifiedImageError

from loracompose.errors import UserError
from loracompose.kinds import is_global_kind
from loracompose.lazy import LazyImport
from loracompose.lora import FLUX, SD3, LoadedLora
from loracompose.methods.base import ALL_FAMILIES, CompositionMethod, require_loras
from loracompose.methods.composer import as_box, parse_box, side_by_side_boxes
from loracompose.pipelines.values import BASE, Branch, Prediction, Step

if TYPE_CHECKING:
    import torch

    from loracompose.attention.masks import Box, LatentGrid
    from loracompose.attention.regional import (RegionArea, RegionalPatches, RegionMasks, code_members,
                                                install_regional)
    from loracompose.attention.regional_dit import install_regional_dit
    from loracompose.pipelines.denoiser import Denoiser
else:  # imported on first use: the settings dataclass imports without the model stack
    torch = LazyImport("torch")
    from loracompose.methods.composer import Box  # the same object in both fields' types: --box is one flag

    LatentGrid = LazyImport("loracompose.attention.masks", "LatentGrid")
    RegionArea, RegionalPatches, RegionMasks, code_members, install_regional = (
        LazyImport("loracompose.attention.regional", name) for name in (
            "RegionArea", "RegionalPatches", "RegionMasks", "code_members", "install_regional"))
    install_regional_dit = LazyImport("loracompose.attention.regional_dit", "install_regional_dit")

log = logging.getLogger(__name__)

MODES = ("delta", "latent")
ASPECT_TOLERANCE = 0.02  # relative difference between a mask's and the image's height/width ratios


@dataclass
class Regional(CompositionMethod):
    """Each LoRA confined to its region (box or mask) on every layer, in one UNet pass per step
    (``mode="delta"``) or as a latent couple of N+1 branches (``mode="latent"``). See the module text."""

    name: ClassVar[str] = "regional"
    families: ClassVar[frozenset[str]] = ALL_FAMILIES
    boxes: tuple[Box, ...] | None = field(default=None, metadata={
        "flags": ("--box",), "parse": lambda text: parse_box(text), "metavar": "X0,Y0,X1,Y1",
        "help": "one box per LoRA (or per local LoRA), relative x0,y0,x1,y1 with y down, e.g. 0,0,0.5,1; "
                "default: local LoRAs side by side, global ones (style, background) the whole image"})
    masks: tuple[str, ...] | None = field(default=None, metadata={
        "flags": ("--mask",), "metavar": "PATH",
        "help": "one grayscale mask image per LoRA (or per local LoRA), white = its region; any size with "
                "the image's aspect ratio (the Python API also takes 2-D tensors and PIL images)"})
    region_prompts: tuple[str | None, ...] | None = field(default=None, metadata={
        "flags": ("--region-prompt",),
        "help": "one prompt per LoRA for its region ('' = the whole prompt)"})
    mode: str = field(default="delta", metadata={
        "help": "delta: masked LoRA deltas in one UNet pass per step; latent: latent couple, N+1 branches"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise UserError(f"regional mode={self.mode!r} is not known; use one of {', '.join(MODES)}")
        if self.boxes and self.masks:
            raise UserError("regional: give either boxes or masks, not both")
        self._given: list[RegionArea] | None = None
        if self.boxes:
            self._given = [_region_box(box) for box in self.boxes]
        elif self.masks:
            self._given = [load_mask(mask) for mask in self.masks]
        if self.region_prompts is not None:
            self.region_prompts = tuple(self.region_prompts)
        self.region_masks: RegionMasks | None = None
        self._patches: RegionalPatches | None = None
        self._run: Denoiser | None = None
        self._checked_grid: LatentGrid | None = None
        self.latent_grid: LatentGrid | None = None  # the latest generation's latent size (for views)

    # -- settings --------------------------------------------------------------------------------
    def check(self, loras: Sequence[LoadedLora]) -> None:
        require_loras(self.name, loras)
        if self.region_prompts is not None and len(self.region_prompts) != len(loras):
            raise UserError(f"regional: {len(self.region_prompts)} region prompts for {len(loras)} LoRAs; give one "
                            "per LoRA ('' for the whole prompt)")
        if self.mode == "delta" and any(self.region_prompt(k) for k in range(len(loras))) and \
                any(lora.architecture in (FLUX, SD3) for lora in loras):
            raise UserError("regional: region prompts on FLUX/SD3 need mode='latent' (--regional-mode latent); in "
                            "delta mode every region shares the one text stream of joint attention")
        self.areas(loras)

    def areas(self, loras: Sequence[LoadedLora]) -> list[RegionArea]:
        """Each LoRA's region (None: the whole image), by the rules in the module text."""
        local = [index for index, lora in enumerate(loras) if not is_global_kind(lora.category)]
        what = "boxes" if self.boxes else "masks"
        if self._given is None:
            boxes = iter(side_by_side_boxes(len(local)))
            return [next(boxes) if index in local else None for index in range(len(loras))]
        if len(self._given) == len(loras):
            return list(self._given)
        if len(self._given) == len(local):
            given = iter(self._given)
            return [next(given) if index in local else None for index in range(len(loras))]
        if len(self._given) > len(loras):
            raise UserError(f"regional: {len(self._given)} {what} for {len(loras)} LoRAs; give at most one per LoRA")
        raise UserError(f"regional: {len(self._given)} {what} for {len(loras)} LoRAs ({len(local)} local); give one "
                        f"per LoRA, or one per local LoRA (global ones, style or background, get the whole image)")

    def set_masks(self, areas: Sequence[RegionArea]) -> None:
        """Replace every LoRA's region during a generation (automatic masks): Boxes, 2-D tensors or None."""
        if self.region_masks is None:
            raise UserError("regional: set_masks is for a running generation; give boxes or masks to the constructor")
        self.region_masks.set_areas(list(areas))
        self._checked_grid = None

    # -- prompts and branches -------------------------------------------------------------------
    def region_prompt(self, index: int) -> str | None:
        """LoRA ``index``'s region prompt, None for the generation's prompt."""
        if self.region_prompts is None:
            return None
        return (self.region_prompts[index] or "").strip() or None

    def group_branch(self, members: Sequence[int]) -> Branch:
        """The branch whose conditioning a position covered by the regions ``members`` attends to."""
        areas = self.region_masks.areas if self.region_masks is not None else self.areas(self.loras)
        local = [k for k in members if areas[k] is not None]
        speakers = local if any(self.region_prompt(k) for k in local) else members  # an object's words over a style's
        prompts = list(dict.fromkeys(p for p in (self.region_prompt(k) for k in speakers) if p))
        loras = [self.loras[k] for k in members]
        return Branch.of({lora.name: lora.weight for lora in loras}, prompt=", ".join(prompts) if prompts else None)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, run: Denoiser) -> None:
        self._run = run
        self.region_masks = RegionMasks([lora.name for lora in self.loras], self.areas(self.loras))
        self._checked_grid = None
        tokens = _token_grid(run)
        if self.mode == "delta" and tokens is not None:  # a DiT: masks on its token grid
            install_regional_dit(run.unet, self.region_masks, tokens, _joint_order(run), run.patches)
        elif self.mode == "delta":
            self._patches = install_regional(run.unet, self.region_masks, self._group_states, run.patches)

    @property
    def running_masks(self) -> RegionMasks:
        """The regions of the running generation (from ``start`` on)."""
        if self.region_masks is None:
            raise RuntimeError("regional: the generation has not started")
        return self.region_masks

    def _group_states(self, code: int) -> torch.Tensor:
        if self._run is None:
            raise RuntimeError("regional: the generation has not started")
        members = code_members(code, len(self.loras))
        return self._run.conditioning(self.group_branch(members) if members else BASE).embeds

    def predict(self, run: Denoiser, step: Step, latents: torch.Tensor) -> Prediction:
        tokens = _token_grid(run)
        grid = LatentGrid(*tokens) if tokens is not None else LatentGrid(int(latents.shape[-2]), int(latents.shape[-1]))
        self._check_grid(grid)
        self.latent_grid = grid
        if self.mode == "latent":
            return self._latent_couple(run, step, latents, grid)
        if tokens is None:
            for code in self.running_masks.all_codes(grid):  # encode every group's prompt outside the UNet call
                self._group_states(code)
        present = [lora for lora, used in zip(self.loras, self.running_masks.nonempty(grid)) if used]
        return run.predict(latents, step, [self.branch(*present)])[0]

    def _latent_couple(self, run: Denoiser, step: Step, latents: torch.Tensor, grid: LatentGrid) -> Prediction:
        members = self.running_masks.members(grid, 0, latents.device).to(latents.dtype)
        cover = members.sum(dim=0)
        weighted = [(Branch.of({lora.name: lora.weight}, prompt=self.region_prompt(k)),
                     _on_latents(members[k] / cover.clamp(min=1), grid, latents)) for k, lora in enumerate(self.loras)]
        weighted.insert(0, (BASE, _on_latents((cover == 0).to(latents.dtype), grid, latents)))
        weighted = [(branch, weight) for branch, weight in weighted if bool(weight.any())]
        predictions = run.predict(latents, step, [branch for branch, _ in weighted])
        weights: list[Any] = [weight for _, weight in weighted]  # latent masks: mix multiplies elementwise
        return Prediction.mix(predictions, weights)

    def _check_grid(self, grid: LatentGrid) -> None:
        if self._checked_grid == grid:
            return
        for lora, area in zip(self.loras, self.running_masks.areas):
            if isinstance(area, torch.Tensor):
                check_mask_aspect(area, grid, lora.name)
            if area is not None and not bool(grid.region_mask(area, 0).any()):
                log.warning("regional: the region of LoRA %s covers no latent cell at this image size; it is not "
                            "drawn", lora.name)
        self._checked_grid = grid

    def finish(self, run: Denoiser) -> None:
        self._patches = None  # restored by run.patches
        self._run = None

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        if self.masks:
            settings["masks"] = [mask if isinstance(mask, (str, Path)) else _describe_mask(mask) for mask in self.masks]
            settings["masks"] = [str(mask) if isinstance(mask, Path) else mask for mask in settings["masks"]]
        if self.boxes:
            settings["boxes"] = [list(_region_box(box).as_tuple()) for box in self.boxes]
        return settings


def _token_grid(run: Denoiser) -> tuple[int, int] | None:
    """The image-token grid of a DiT's model call; None on a UNet."""
    grid = getattr(run.model, "token_grid", None)
    return None if grid is None else (int(grid[0]), int(grid[1]))


def _joint_order(run: Denoiser) -> tuple[str, ...]:
    """The order of the text and image streams in a DiT's joint sequence."""
    model: Any = run.model  # DenoiserModel declares no layout; the DiT model calls have one
    return tuple(model.joint_order)


def _on_latents(weights: torch.Tensor, grid: LatentGrid, latents: torch.Tensor) -> torch.Tensor:
    """(cells,) weights of ``grid`` shaped to multiply predictions like ``latents``: (1, 1, H, W) maps,
    each token's weight spread over its latent patch (SD3), or (1, tokens, 1) for FLUX's packed tokens."""
    if latents.ndim == 3:
        return weights.view(1, -1, 1)
    weights = weights.view(1, 1, grid.height, grid.width)
    rows, columns = int(latents.shape[-2]) // grid.height, int(latents.shape[-1]) // grid.width
    if rows > 1 or columns > 1:
        weights = weights.repeat_interleave(rows, dim=-2).repeat_interleave(columns, dim=-1)
    return weights


# ------------------------------------------------------------------------------------ regions


def _region_box(value: Any) -> Box:
    if isinstance(value, str):
        return parse_box(value)
    if isinstance(value, Box):
        return value
    try:
        numbers = [float(number) for number in value]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 4:
        raise UserError(f"regional box {value!r}: give four relative numbers x0,y0,x1,y1 (0..1, y down)")
    return as_box(numbers)


def load_mask(value: Any) -> torch.Tensor:
    """A region mask as a float (height, width) tensor in 0..1: from an image file (grayscale; colour
    is converted), a PIL image, or a 2-D tensor (bool or 0..1)."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 2 or min(value.shape) == 0:
            raise UserError(f"regional mask tensor has shape {tuple(value.shape)}; give a 2-D (height, width) mask")
        return value.float()
    if isinstance(value, Image.Image):
        return _image_mask(value)
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise UserError(f"mask file not found: {path}; give a grayscale image (white = the LoRA's region)")
        try:
            with Image.open(path) as image:
                return _image_mask(image)
        except (UnidentifiedImageError, OSError):
            raise UserError(f"mask {path} is not an image PIL can read; give a PNG or JPEG "
                            "(white = the region)") from None
    raise UserError(f"regional mask {value!r}: give an image file path, a PIL image or a 2-D tensor")


def _image_mask(image: Image.Image) -> torch.Tensor:
    gray = image.convert("L")
    return torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).view(gray.height, gray.width).float() / 255


def check_mask_aspect(mask: torch.Tensor, grid: LatentGrid, lora: str) -> None:
    """UserError unless the mask has the image's aspect ratio (it is stretched onto the image)."""
    height, width = mask.shape
    wanted = grid.height / grid.width
    if abs(height / width - wanted) > ASPECT_TOLERANCE * wanted:
        raise UserError(f"the mask of LoRA {lora} is {width}x{height} (width x height, {_ratio(width, height)}) "
                        f"but the image's aspect is {_ratio(grid.width, grid.height)}; give a mask with the image's "
                        "aspect ratio")


def _ratio(width: int, height: int) -> str:
    common = math.gcd(width, height)
    return f"{width // common}:{height // common}"


def _describe_mask(mask: Any) -> str:
    if isinstance(mask, torch.Tensor):
        return f"tensor {tuple(mask.shape)}"
    return f"{type(mask).__name__}"
