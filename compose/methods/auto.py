"""``auto``: the kind-aware default. Local concepts get regions found automatically, global ones the image.

    kind_k  <- each LoRA's kind (compose/kinds.py: override, category, library index)
    local   <- LoRAs of a local kind (object, character, clothing; an unknown kind counts as local)
               whose trigger words are in the prompt; every other LoRA is global
    if there is one LoRA, or no local one:  Merge, exactly
    probe   <- the first ``probe_steps`` steps, run on a copy of the scheduler from the initial latents
               (the model given by ``map_source``), recording each local LoRA's trigger-token maps
    masks   <- automatic masks from the summed maps (attention/auto_masks.py): per concept smoothed
               and min-max normalised, argmax over concepts, background below ``threshold``
    regions <- local LoRA: its mask; background LoRA: where no local concept is, ``background_margin``
               map cells away (``background_outside``); style LoRA: the whole image (``style_inside``)
    styles  <- with ``style_combine="noise"`` a style beside other LoRAs is not merged into their pass:
               eps = eps_main + outside * (eps_main+style - eps_main), eps_main+style the main pass
               with the style added on the whole image, outside where no local concept is; inside
               the local regions the style joins eps_main's weights from ``style_inside_from`` of
               the steps on (before, the objects form without it). With no local LoRA the effect is
               the style's own pass minus the base model's, added everywhere
    backgrounds <- with ``background_combine="noise"`` and local LoRAs, a background is not merged
               either: eps += outside_b * (eps_main+background - eps_main), outside_b where its
               region is; it never acts inside the local regions
    then the generation runs from the initial latents as regional LoRA (compose/methods/regional.py):
    each LoRA's deltas inside its region on every layer in one UNet pass per step (``mode="delta"``),
    or as a latent couple (``mode="latent"``). The masks stay fixed after the probe. With several
    images per call each image has its own masks and its own regional pass.

Choices, measured on the shipped toy world (tuning seeds 100-115; benchmarks/toyworld_auto.py):

* Maps from the base model (``map_source="base"``): on "a moxel on the left and a lunzor on the right"
  the trigger tokens' maps at the 8x8 level put the moxel left and the lunzor right in 8/8 seeds from
  step 0 for the base model and for each LoRA in its own branch, 6-7/8 with both merged (merged LoRAs
  pull both tokens onto the same blobs). The base model needs one branch for the same maps. The
  deepest (4x4) level localises nothing on this model (0/8), hence the level rule of auto_masks.py.
* Restart: masks from a probe, applied from step 0, keep the layout the prompt asked for.
* Background LoRAs outside the objects: applied everywhere, the checkered LoRA turns the objects'
  shapes into circles (moxel+checkered 44%, moxel+lunzor+checkered 0%); outside them, 88% and 56%.
* Threshold 0.5 (against 0.3): moxel+lunzor+checkered 56% -> 94%, the two objects 94% -> 100%.
* Styles in noise space (tuning seeds 100-115): merged in weights, the checkered and ambrel LoRAs cancel
  each other's effect (ambrel found 4/16 beside checkered, warmth a tenth of the alone value); with their
  effects added in noise space both are found 16/16. Next to objects the style's effect goes only where
  no object is (over the objects its pass, which lacks the object LoRA, smudged them).
* A style joins the objects half-way (``style_inside_from=0.5``): merged in weights with an object
  LoRA from the first step it cost the object its shape (moxel+lunzor+ambrel 14/32 on tuning seeds
  100-131, the crescent missing); kept out of the regions for good, 30/32; joining at step 10 of 20,
  28/32, and over the five sets with the style 132/160 against 115 (from step 0) and 122 (never).
* Backgrounds in a pass of their own (``background_combine="noise"``): merged in weights outside the
  lunzor's mask, the checkered LoRA still thinned the crescent (lunzor+checkered 25/32 on tuning
  seeds 100-131; the object's features attend to the changed background in self-attention); with
  the object pass free of it and its effect added outside the mask in noise space, 31/32 (latent
  couple 28/32; joining the object's region half-way as a style does, 27/32).
* Effects measured against the main pass (with the objects in place), not against the base model:
  a style's or background's pass alone beside the base model's drew their guesses at the unknown
  object word differently, and stray yellow rings and a weak style came out where no object is
  (moxel+checkered+ambrel 18/32 on tuning seeds); as the main pass plus that LoRA, 26/32;
  lunzor+ambrel 30 -> 32, moxel+checkered 31 -> 32, lunzor+checkered 31 -> 31 (docs/methods/auto.md);
  one pass fewer per step (no base-model pass).
* Background margin 0 (the setting exists for masks that cut objects short): a margin of 1 map cell kept
  the checkered LoRA off the tips of crescents reaching past the lunzor mask (lunzor+checkered 9/16 ->
  11/16 on tuning seeds), but with two objects it leaves a band across the image to the base model,
  which draws stripes there (moxel+lunzor+checkered 94% -> 44% on tuning seeds 100-115).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from loracompose.errors import UserError
from loracompose.kinds import BACKGROUND, STYLE, check_overrides, is_local, lora_kind
from loracompose.lazy import LazyImport
from loracompose.lora import LoadedLora
from loracompose.methods.base import ALL_FAMILIES, CompositionMethod
from loracompose.methods.merge import Merge
from loracompose.methods.regional import Regional
from loracompose.pipelines.values import BASE, Branch, Prediction, Step
from loracompose.tokens import stream_trigger_positions, trigger_positions

if TYPE_CHECKING:
    import torch

    from loracompose.attention.auto_masks import (AutoMasks, MaskSettings, TriggerMapRecorder, auto_mask_layers,
                                                 concept_scores, masks_from_scores)
    from loracompose.attention.joint_maps import JointMapRecorder
    from loracompose.attention.masks import LatentGrid
    from loracompose.attention.regional import RegionArea, code_members
    from loracompose.pipelines.denoiser import Denoiser
else:  # imported on first use: the settings dataclass imports without the model stack
    torch = LazyImport("torch")
    AutoMasks, MaskSettings, TriggerMapRecorder, auto_mask_layers, concept_scores, masks_from_scores = (
        LazyImport("loracompose.attention.auto_masks", name) for name in (
            "AutoMasks", "MaskSettings", "TriggerMapRecorder", "auto_mask_layers", "concept_scores",
            "masks_from_scores"))
    LatentGrid = LazyImport("loracompose.attention.masks", "LatentGrid")
    JointMapRecorder = LazyImport("loracompose.attention.joint_maps", "JointMapRecorder")
    code_members = LazyImport("loracompose.attention.regional", "code_members")

MAP_SOURCES = ("base", "own", "merged")
MODES = ("delta", "latent")
STYLE_COMBINES = ("noise", "weights")


@dataclass
class Auto(CompositionMethod):
    """Kind-aware composition: automatic regions for local concepts, the whole image for global ones."""

    name: ClassVar[str] = "auto"
    families: ClassVar[frozenset[str]] = ALL_FAMILIES
    kinds: dict[str, str] = field(default_factory=dict, metadata={
        "flags": ("--kind",),
        "help": "a LoRA's kind by name, overriding its metadata: NAME=object|character|clothing|style|background"})
    mode: str = field(default="delta", metadata={
        "help": "regional execution: delta (each LoRA's deltas masked on every layer, one UNet pass per step) "
                "or latent (latent couple: a branch per LoRA, noise predictions joined by the masks)"})
    map_source: str = field(default="base", metadata={
        "help": "where the trigger maps come from: base (the base model), own (each LoRA in its branch), merged"})
    probe_steps: int = field(default=3, metadata={"help": "steps whose trigger maps make the masks"})
    restart: bool = field(default=True, metadata={
        "help": "probe on a copy of the scheduler, then generate from the initial latents with the masks "
                "(off: the probe steps are the generation's first steps)"})
    threshold: float = field(default=0.5, metadata={
        "help": "a pixel is background when no concept's normalised trigger map reaches this (0..1)"})
    smoothing: float = field(default=1.0, metadata={"help": "Gaussian smoothing of the trigger maps, in map cells"})
    background_outside: bool = field(default=True, metadata={
        "help": "a background LoRA applies where no local concept is (off: everywhere, like a style)"})
    style_inside: bool = field(default=True, metadata={
        "help": "a style LoRA applies inside the local regions too (off: only where no local concept is)"})
    style_inside_from: float = field(default=0.5, metadata={
        "help": "with style_inside, the share of the steps after which a style joins the local regions "
                "(0: from the first step); before it the objects form without it"})
    min_map_side: int = field(default=8, metadata={
        "help": "maps come from the deepest level with at least this many cells a side"})
    background_margin: int = field(default=0, metadata={
        "help": "a background LoRA stays this many map cells away from every local region (0: right up to it)"})
    background_combine: str = field(default="noise", metadata={
        "choices": STYLE_COMBINES,
        "help": "noise: a background LoRA beside local LoRAs joins a second pass and its effect (that pass "
                "minus the main pass) is added where no local concept is; weights: its deltas join the one "
                "pass there"})
    style_combine: str = field(default="noise", metadata={
        "choices": STYLE_COMBINES,
        "help": "noise: each style LoRA runs in a pass of its own and its effect is added to the other LoRAs' "
                "prediction (beside local LoRAs: the main pass with the style minus the main pass, where no "
                "local concept is; otherwise: its pass minus the base model's); weights: its deltas join the "
                "one pass"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.decisions: dict[str, dict[str, Any]] = {}
        self.local: list[LoadedLora] = []
        self.global_: list[LoadedLora] = []
        self.styles: list[LoadedLora] = []  # style LoRAs added in noise space, each in a pass of its own
        self.backgrounds: list[LoadedLora] = []  # background LoRAs added in noise space, outside the local regions
        self.mask_history: list[tuple[int, AutoMasks]] = []
        self.mask_callback = None
        self._merge: Merge | None = None
        self._token_groups: list[list[int]] = []
        self._masks: torch.Tensor | None = None  # (images, local concepts, height, width)
        self._outside: torch.Tensor | None = None  # (images, height, width): where a background goes
        self._outside_exact: torch.Tensor | None = None  # (images, height, width): where no local concept is
        self._recorder: TriggerMapRecorder | JointMapRecorder | None = None
        self._regional: Regional | None = None
        self._view: Denoiser | None = None
        self._initial: torch.Tensor | None = None
        self._style_inside_now = self.style_inside  # whether the styles act inside the local regions this step

    # -- settings --------------------------------------------------------------------------
    def check(self, loras: Sequence[LoadedLora]) -> None:
        check_overrides(self.kinds, loras)
        if self.mode not in MODES:
            raise UserError(f"auto mode={self.mode!r} is not known; use one of {', '.join(MODES)}")
        if self.map_source not in MAP_SOURCES:
            raise UserError(f"auto map_source={self.map_source!r} is not known; use one of {', '.join(MAP_SOURCES)}")
        for label, combine in (("style_combine", self.style_combine), ("background_combine", self.background_combine)):
            if combine not in STYLE_COMBINES:
                raise UserError(f"auto {label}={combine!r} is not known; use one of {', '.join(STYLE_COMBINES)}")
        if not 0.0 <= float(self.style_inside_from) <= 1.0:
            raise UserError(f"auto style_inside_from={self.style_inside_from} must be between 0 and 1")
        for label, value, low in (("probe_steps", self.probe_steps, 1), ("min_map_side", self.min_map_side, 1),
                                  ("background_margin", self.background_margin, 0)):
            if int(value) != value or value < low:
                raise UserError(f"auto {label}={value} must be an integer >= {low}")
        MaskSettings(self.threshold, self.smoothing)

    @property
    def mask_settings(self) -> MaskSettings:
        return MaskSettings(self.threshold, self.smoothing)

    # -- kinds -----------------------------------------------------------------------------
    def plan(self, prompt: str, tokenizers: Sequence[Any] | None,
             streams: Sequence[tuple[Sequence[Any], int]] | None = None) -> None:
        """Split the LoRAs into local (with their trigger tokens) and global, recording why. On a DiT
        ``streams`` describes its joint text sequence (:func:`text_streams`); positions index it."""
        self.local, self.global_, self._token_groups, self.decisions = [], [], [], {}
        for lora in self.loras:
            kind, source = lora_kind(lora, self.kinds)
            local = kind is None or is_local(kind)
            positions = self._trigger_tokens(lora, prompt, tokenizers, streams) if local else []
            if positions:
                self.local.append(lora)
                self._token_groups.append(positions)
                placement = "region"
            else:
                self.global_.append(lora)
                placement = "whole image"
            self.decisions[lora.name] = {"kind": kind, "from": source, "placement": placement,
                                         "why": self._why(kind, lora, positions)}
        self.styles = self._separate_styles()
        self.backgrounds = self._separate_backgrounds()
        if self.local and not self.merges and self.background_outside:
            for lora in self.global_:
                if self.decisions[lora.name]["kind"] == BACKGROUND:
                    self.decisions[lora.name]["placement"] = "outside the local regions"
        for lora in self.styles:
            self.decisions[lora.name]["placement"] = "whole image, in a pass of its own"
        for lora in self.backgrounds:
            self.decisions[lora.name]["placement"] = "outside the local regions, in a pass of its own"

    def _separate_styles(self) -> list[LoadedLora]:
        """The style LoRAs whose effect is added in noise space (``style_combine="noise"``): with other
        LoRAs beside them, in delta mode or when no LoRA is local (latent mode keeps them in its couple)."""
        if self.style_combine != "noise" or len(self.loras) < 2 or (self.local and self.mode != "delta"):
            return []
        return [lora for lora in self.global_ if self.decisions[lora.name]["kind"] == STYLE]

    def _separate_backgrounds(self) -> list[LoadedLora]:
        """The background LoRAs whose effect is added in noise space outside the local regions
        (``background_combine="noise"``, ``background_outside``, delta mode, local LoRAs present)."""
        if self.background_combine != "noise" or not self.background_outside or not self.local or self.mode != "delta":
            return []
        return [lora for lora in self.global_ if self.decisions[lora.name]["kind"] == BACKGROUND]

    @property
    def separate(self) -> list[LoadedLora]:
        """The LoRAs that run in passes of their own: the styles, then the backgrounds."""
        return self.styles + self.backgrounds

    @staticmethod
    def _trigger_tokens(lora: LoadedLora, prompt: str, tokenizers: Sequence[Any] | None,
                        streams: Sequence[tuple[Sequence[Any], int]] | None = None) -> list[int]:
        if not lora.trigger_words or not tokenizers:
            return []
        if streams is not None:
            return stream_trigger_positions(streams, prompt, lora.trigger_words).positions
        return trigger_positions(tokenizers, prompt, lora.trigger_words).positions

    @staticmethod
    def _why(kind: str | None, lora: LoadedLora, positions: Sequence[int]) -> str:
        if kind is not None and not is_local(kind):
            return f"{kind} is a global kind"
        if positions:
            return "local kind, trigger words in the prompt" if kind else "kind unknown, trigger words in the prompt"
        if not lora.trigger_words:
            return "no trigger words to place it by"
        return f"trigger words {', '.join(lora.trigger_words)} are not in the prompt"

    @property
    def merges(self) -> bool:
        """Whether this generation runs as plain Merge (one LoRA, or no local LoRA and no style added
        in noise space)."""
        return len(self.loras) == 1 or not (self.local or self.styles)

    @property
    def core(self) -> list[LoadedLora]:
        """The LoRAs of the main pass: every LoRA but those added in noise space."""
        return [lora for lora in self.loras if lora not in self.separate]

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, run: Denoiser) -> None:
        self.mask_history, self._masks = [], None
        streams = text_streams(run, encoded=len(self.loras) > 1) if _token_grid(run) is not None else None
        self.plan(run.prompt or "", run.tokenizers, streams)
        if self.merges:
            self._merge = Merge()
            self._merge.bind(self.loras)
            self._merge.start(run)
            return
        self._merge = None

    def prepare_latents(self, run: Denoiser, step: Step, latents: torch.Tensor) -> torch.Tensor:
        if self._merge is None and self.local and step.index == 0:
            self._initial = latents
            if self.restart:
                self._probe(run, latents)
        return latents

    def predict(self, run: Denoiser, step: Step, latents: torch.Tensor) -> Prediction:
        if self._merge is not None:
            return self._merge.predict(run, step, latents)
        if not self.local:  # global LoRAs only: the others merged, each style's effect added
            core = [self.branch(*self.core)] if self.core else []
            *main, base = run.predict(latents, step, core + [self.branch(lora) for lora in self.styles] + [BASE])
            return _with_effects(main[0] if core else base, main[len(core):], base)
        if self._masks is None:  # no restart: the probe steps are the generation's own
            prediction = self._probe_prediction(run, step, latents)
            if step.index + 1 >= self.probe_steps:
                self._set_masks(run, step, latents)
            return prediction
        return self._regional_prediction(run, step, latents)

    def finish(self, run: Denoiser) -> None:
        if self._merge is not None:
            self._merge.finish(run)
        self._recorder = None  # its processors and hook are undone by run.patches
        if self._regional is not None:
            self._regional.finish(run)
            self._regional = None

    # -- probe and masks -------------------------------------------------------------------
    def probe_regions(self, run: Denoiser, latents: torch.Tensor) -> list[list[torch.Tensor | None]]:
        """For another method's use (TARA): after :meth:`plan`, probe from ``latents`` (the initial ones)
        on a copy of the scheduler and return, per image, each LoRA's region as regional takes them
        (local: its mask; global: None or, for a background, where no local concept is)."""
        self._probe(run, latents)
        return [self._areas(image) for image in range(latents.shape[0])]

    def _probe(self, run: Denoiser, latents: torch.Tensor) -> None:
        scheduler = copy.deepcopy(run.scheduler)
        probe = latents.clone()
        for index in range(min(self.probe_steps, len(run.timesteps))):
            step = Step(index, run.timesteps[index], len(run.timesteps))
            prediction = self._probe_prediction(run, step, probe)
            probe = scheduler.step(prediction.guided(run.guidance_scale), step.timestep, probe,
                                   **run.extra_step_kwargs, return_dict=False)[0]
        self._set_masks(run, Step(self.probe_steps - 1, run.timesteps[0], len(run.timesteps)), latents)

    def _probe_branches(self) -> list[Branch]:
        if self.map_source == "base":
            return [Branch()]
        if self.map_source == "merged":
            return [self.branch(*self.loras)]
        return [self.branch(lora) for lora in self.local]

    def _probe_prediction(self, run: Denoiser, step: Step, latents: torch.Tensor) -> Prediction:
        if self._recorder is None:
            self._start_recording(run, latents)
        branches = self._probe_branches()
        blocked = run.batching_blocked(branches) if len(branches) > 1 else None
        if blocked is not None:  # the recorder sums calls: one branch per call would add the branches' maps
            raise UserError(f"auto map_source='own' needs its branches in one UNet call ({blocked}); "
                            "use map_source='base'")
        return Prediction.mix(run.predict(latents, step, branches))

    def _start_recording(self, run: Denoiser, latents: torch.Tensor) -> None:
        self._stop_recording()
        tokens = sorted({token for group in self._token_groups for token in group})
        token_grid = _token_grid(run)
        if token_grid is not None:  # a DiT: every joint block sees the one token grid (docs/methods/auto.md)
            recorder = JointMapRecorder(run.unet, token_grid, tokens, conditional_rows=run.do_cfg)
            _undo_on_unwind(run, recorder.remove)
            self._recorder = recorder
            return
        grid = LatentGrid(int(latents.shape[-2]), int(latents.shape[-1]))
        layers = auto_mask_layers(run.unet, grid, self.min_map_side)
        self._recorder = TriggerMapRecorder(run.unet, layers, tokens, conditional_rows=run.do_cfg)
        _undo_on_unwind(run, self._recorder.remove)

    def _stop_recording(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def _concept_scores(self, maps: torch.Tensor, columns: list[list[int]], images: int) -> torch.Tensor:
        """(images, local concepts, rows, columns) raw scores; with ``map_source="own"`` the rows are
        [branch][image] and concept c is read from its own branch c."""
        if maps.shape[0] == images:
            return concept_scores(maps, columns)
        per_branch = maps.reshape(-1, images, *maps.shape[1:])
        return torch.stack([concept_scores(per_branch[c], [columns[c]])[:, 0] for c in range(len(columns))], dim=1)

    def _set_masks(self, run: Denoiser, step: Step, latents: torch.Tensor) -> None:
        if self._recorder is None:
            raise RuntimeError("auto: the probe recorded no attention maps")
        maps = self._recorder.maps()
        columns = self._recorder.token_columns(self._token_groups)
        self._stop_recording()
        found = masks_from_scores(self._concept_scores(maps, columns, latents.shape[0]), self.mask_settings,
                                  _mask_size(run, latents))
        if self.mask_callback is not None:
            found = self.mask_callback(step.index, found) or found
        self.mask_history.append((step.index, found))
        self._masks = found.masks().to(latents.device, latents.dtype)
        self._outside = found.outside(self.background_margin).to(latents.device, latents.dtype)
        self._outside_exact = found.outside(0).to(latents.device, latents.dtype)

    # -- regional ----------------------------------------------------------------------------
    def _regional_prediction(self, run: Denoiser, step: Step, latents: torch.Tensor) -> Prediction:
        images = latents.shape[0]
        inside_before = self._style_inside_now
        self._style_inside_now = self._styles_inside_at(step)
        if self._regional is None:
            self._view = run if images == 1 else one_image_view(run)
            self._regional = self._start_regional(self._view)
        elif self._style_inside_now != inside_before and images == 1:
            self._regional.set_masks(self._areas(0))
        regional, view = self._regional, self._view or run
        if images == 1:
            return self._regional_image(regional, run, step, latents, 0)
        predictions = []
        for image in range(images):  # each image has its own masks: one regional pass per image
            regional.set_masks(self._areas(image))
            predictions.append(self._regional_image(regional, view, step, latents[image:image + 1], image))
        return stacked_predictions(predictions)

    def _styles_inside_at(self, step: Step) -> bool:
        """Whether the style LoRAs act inside the local regions at ``step`` (``style_inside`` from
        ``style_inside_from`` of the steps on)."""
        return self.style_inside and step.index >= round(self.style_inside_from * step.num_steps)

    def _regional_image(self, regional: Regional, run: Denoiser, step: Step, latents: torch.Tensor,
                        image: int) -> Prediction:
        """One image: the regional pass; with separate styles and backgrounds, each one's effect (the
        regional pass with it added on the whole image, minus the regional pass) is added where no
        local concept is (a background ``background_margin`` cells away), and inside the local
        regions a style joins the main pass in weights (``style_inside``, from ``style_inside_from``
        of the steps)."""
        if not self.separate or not isinstance(regional, PassRegional):
            return regional.predict(run, step, latents)
        areas = self._areas(image)
        running = self.core + (self.styles if self._style_inside_now else [])
        main = regional.predict_running(run, step, latents, running, areas)
        prediction = main
        _, background_area, style_area = (placed[image] for placed in self._placed())
        for group, area in ((self.styles, style_area), (self.backgrounds, background_area)):
            for lora in group:
                added = [*running, lora] if lora not in running else running
                with_it = regional.predict_running(run, step, latents, added, self._areas(image, whole=lora))
                prediction = _with_effects(prediction, [with_it], main, mask_on_latents(area, latents))
        return prediction

    def _start_regional(self, run: Denoiser) -> Regional:
        """The regional method on these LoRAs, its regions the automatic masks (global LoRAs: the image)."""
        regional = PassRegional(mode=self.mode) if self.separate else Regional(mode=self.mode)
        regional.bind(self.loras)
        regional.start(run)
        regional.set_masks(self._areas(0))
        return regional

    def _areas(self, image: int, whole: LoadedLora | None = None) -> list[torch.Tensor | None]:
        """Each LoRA's region in image ``image``: its mask (local), the pixels no local concept owns
        (a background with ``background_outside``, at ``background_margin`` from them), the local
        regions (a style added in noise space: in the main pass it acts inside them), or None (the
        whole image; also for ``whole``)."""
        local = {lora.name: index for index, lora in enumerate(self.local)}
        masks, outside, exact = (placed[image] for placed in self._placed())

        def area(lora: LoadedLora) -> torch.Tensor | None:
            if lora.name in local:
                return masks[local[lora.name]]
            if lora is whole:
                return None
            if lora in self.styles:
                return 1 - exact
            kind = self.decisions[lora.name]["kind"]
            if kind == BACKGROUND and self.background_outside:
                return outside
            if kind == STYLE and not self._style_inside_now:
                return exact
            return None

        return [area(lora) for lora in self.loras]

    def _placed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The probe's result: the local masks, where a background goes, where no local concept is."""
        if self._masks is None or self._outside is None or self._outside_exact is None:
            raise RuntimeError("auto: the masks are not found yet (the probe runs first)")
        return self._masks, self._outside, self._outside_exact

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        if self.decisions:
            settings["decisions"] = self.decisions
        return settings


def _token_grid(run: Denoiser) -> tuple[int, int] | None:
    """The image-token grid of a DiT's model call (rows, columns); None on a UNet."""
    grid = getattr(run.model, "token_grid", None)
    return None if grid is None else (int(grid[0]), int(grid[1]))


def _mask_size(run: Denoiser, latents: torch.Tensor) -> tuple[int, int]:
    """Where automatic masks live: the latent (UNets) or the image-token grid (DiTs: regional's masks
    are per token, and FLUX's latents are packed tokens)."""
    return _token_grid(run) or (int(latents.shape[-2]), int(latents.shape[-1]))


def mask_on_latents(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """A (rows, columns) mask shaped to multiply predictions like ``latents``: (1, 1, H, W) latent maps
    (a DiT token's value spread over its latent patch: SD3), or (1, tokens, 1) for FLUX's packed tokens."""
    if latents.ndim == 3:
        return mask.reshape(1, -1, 1)
    rows, columns = int(latents.shape[-2]) // mask.shape[-2], int(latents.shape[-1]) // mask.shape[-1]
    if rows > 1 or columns > 1:
        mask = mask.repeat_interleave(rows, dim=-2).repeat_interleave(columns, dim=-1)
    return mask.view(1, 1, *latents.shape[-2:])


def text_streams(run: Denoiser, encoded: bool = True) -> list[tuple[list[Any], int]]:
    """A DiT's joint text sequence as (tokenizers side by side, tokens) streams: FLUX one T5 stream;
    SD3 the CLIP-L/CLIP-G stream (their length, 77) then T5's. With ``encoded`` the total length is the
    encoded prompt's (the pipeline caps T5's length), read from the base model's conditioning; without
    it (one LoRA: auto is Merge, the positions only explain the decision) T5's own maximum."""
    tokenizers = list(run.tokenizers or [])
    if not tokenizers:
        return []
    clip = int(tokenizers[0].model_max_length) if len(tokenizers) > 1 else 0
    total = int(run.conditioning(BASE).embeds.shape[1]) if encoded else clip + int(tokenizers[-1].model_max_length)
    if len(tokenizers) <= 1:
        return [(tokenizers, total)]
    return [(tokenizers[:-1], clip), (tokenizers[-1:], total - clip)]


def _undo_on_unwind(run: Denoiser, undo: Any) -> None:
    """Register an idempotent undo on the run's patch stack, where the loop has one."""
    patches = getattr(run, "patches", None)
    if patches is not None:
        patches.on_unwind(undo)


def _with_effects(main: Prediction, separate: Sequence[Prediction], base: Prediction,
                  where: torch.Tensor | float = 1.0) -> Prediction:
    """``main`` plus each separate prediction's difference to the base model's (times ``where``, a
    latent mask or 1), per CFG half."""
    def half(pick: Any) -> torch.Tensor:
        effect = sum((pick(p) - pick(base) for p in separate), torch.zeros_like(pick(main)))
        return pick(main) + where * effect

    if main.uncond is None or base.uncond is None:
        return Prediction(cond=half(lambda p: p.cond))
    return Prediction(cond=half(lambda p: p.cond), uncond=half(lambda p: p.uncond))


class PassRegional(Regional):
    """Regional (delta mode) whose UNet passes may run a subset of its LoRAs: in such a pass the
    cross-attention groups see only the running LoRAs (their text-encoder deltas and K/V deltas), each
    subset with its own K/V cache, so a pass of no LoRA is the base model and a pass of one
    whole-image LoRA is that LoRA merged alone."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.running: frozenset[str] | None = None
        self._key_values: dict[frozenset[str], dict[tuple, Any]] = {}

    def _group_states(self, code: int) -> torch.Tensor:
        if self._run is None:
            raise RuntimeError("regional: the generation has not started")
        members = [k for k in code_members(code, len(self.loras))
                   if self.running is None or self.loras[k].name in self.running]
        return self._run.conditioning(self.group_branch(members) if members else BASE).embeds

    def predict_running(self, run: Denoiser, step: Step, latents: torch.Tensor, loras: Sequence[LoadedLora],
                        areas: Sequence[RegionArea]) -> Prediction:
        """One UNet pass with only ``loras`` running, each inside its region of ``areas``."""
        self.set_masks(areas)
        self.running = frozenset(lora.name for lora in loras)
        if self._patches is not None:
            self._patches.key_values = self._key_values.setdefault(self.running, {})
        grid = LatentGrid(*_mask_size(run, latents))
        self._check_grid(grid)
        if _token_grid(run) is None:  # UNets: encode every group's prompt outside the UNet call
            for code in self.running_masks.all_codes(grid):
                self._group_states(code)
        used = self.running_masks.nonempty(grid)
        present = [lora for lora, nonempty in zip(self.loras, used) if nonempty and lora.name in self.running]
        return run.predict(latents, step, [self.branch(*present)])[0]


def stacked_predictions(predictions: Sequence[Prediction]) -> Prediction:
    """One-image predictions as one prediction of all the images, in order."""
    unconds = [p.uncond for p in predictions if p.uncond is not None]
    uncond = torch.cat(unconds) if len(unconds) == len(predictions) else None
    return Prediction(cond=torch.cat([p.cond for p in predictions]), uncond=uncond)


def one_image_view(run: Denoiser) -> Denoiser:
    """``run`` seen as a run of one image: the first image's conditioning rows (every image of a
    generation shares the prompt, so its rows are the same), the same UNet, counters and patches."""
    view = copy.copy(run)
    view.batch_size = 1
    images = run.batch_size

    def conditioning(branch: Branch) -> Any:
        full = run.conditioning(branch)
        rows = [half * images for half in range(run.num_halves)]
        return type(full)(full.embeds[rows], {key: value[rows] for key, value in full.added.items()})

    view.conditioning = conditioning  # type: ignore[method-assign]  # this view's own rows
    return view
