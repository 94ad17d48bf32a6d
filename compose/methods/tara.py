"""TARA: Token-Aware LoRA (Peng et al., AAAI 2026; docs/methods/tara.md).

Inference — one UNet pass per step with every LoRA active, as Merge, except on cross-attention K/V::

    for each LoRA i:
        m_i <- 0/1 mask over the prompt's 77 tokens, 1 at LoRA i's trigger (rare) tokens
               (tokens.py: BPE sub-sequence match, multi-token words; SDXL: OR of both tokenizers)
        rows of the unconditional CFG half: m_i <- 0
    for each step: one UNet call where, on every cross-attention (attn2),
        k <- W_K·c + Σ_i m_i ⊙ w_i·(α_i/r_i)·B_i·A_i·c          (v alike)
    and every other adapted UNet layer (attn2 q/out, attn1 q/k/v/out, FFN, ...) adds
        Σ_i R_i ⊙ w_i·(α_i/r_i)·B_i·A_i·x       (R_i: LoRA i's region at the layer's resolution, as regional)
    (text-encoder deltas unmasked, as Merge).

``untokened`` sets R_i: ``"region"`` (default) the given ``boxes``/``masks`` (regional's parsing), else
auto's masks from a probe (3 steps of the base model from the initial latents, the
trigger tokens' maps; the generation restarts from those latents); a global LoRA (style,
background), a single LoRA, or no local one: the whole image. ``"global"``: R_i = 1 everywhere
(TARA as published). Where regions apply they need ``fuse=False`` and ``self_attention`` "keep" or "off".

``self_attention`` sets what the attn1 deltas do (they act on image tokens, so no token mask fits):
``"keep"`` (default, as TARA) on every row; ``"cond"`` on the conditional rows only, so the
unconditional half runs the base self-attention as it runs the base K/V; ``"off"`` nowhere.
``fuse=True`` folds every unmasked delta into the UNet weights for the generation (as Merge's
``fuse``), leaving only the cross-attention K/V products over the 77 text tokens to run per step.

On FLUX.1 and SD3 (joint attention, no separate cross-attention) the masks go on the text part of
the joint attention's K/V deltas (``attention/tara_dit.py``): the token positions come from the
tokenizers of the joint text stream (FLUX: T5; SD3: the 77 CLIP positions, both CLIPs OR'd, then
T5's); every other delta goes in its LoRA's region on the image-token grid as regional's delta mode
puts it (``untokened="region"``; regions from boxes/masks or auto's probe of the joint attention's
maps), or everywhere (``"global"``). ``self_attention`` must stay ``"keep"`` there.

Training: :mod:`loracompose.training.tara`.

Departures from the reference code (its pitfalls): masks are per batch row, so the
unconditional half gets no K/V deltas; deltas carry their α/r scaling at inference (PEFT's
``scaling``) as in training; multi-token words are explicit: every rare token is pulled to the
*mean* base key of the class word's tokens; deltas run through PEFT layers and attention processors.
With LoRAs not trained by TARA the method is a training-free approximation (their deltas were
trained on every token); with TARA-trained LoRAs it runs exactly the masked forward they were
trained with.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from loracompose.errors import UserError
from loracompose.kinds import is_local, lora_kind
from loracompose.lazy import LazyImport
from loracompose.lora import FLUX, SD3, LoadedLora
from loracompose.methods.auto import Auto, one_image_view, stacked_predictions
from loracompose.methods.base import ALL_FAMILIES, CompositionMethod, require_loras
from loracompose.methods.composer import Box
from loracompose.methods.regional import Regional, _joint_order, _token_grid
from loracompose.tokens import WordPositions, stream_trigger_positions, trigger_positions
from loracompose.pipelines.values import BASE_ROW, Prediction, Step

if TYPE_CHECKING:
    import torch
    from diffusers.models.attention_processor import Attention
    from peft.tuners.lora import LoraLayer

    from loracompose.attention import ComposeAttnProcessor, LoraTokenMasks
    from loracompose.attention.masks import LatentGrid
    from loracompose.attention.regional import RegionArea, RegionMasks, install_regional
    from loracompose.methods.regional import check_mask_aspect
    from loracompose.attention.lora_deltas import active_adapters, adapter_delta
    from loracompose.attention.tara_dit import install_tara_regions, install_text_kv_token_masks
    from loracompose.pipelines.denoiser import Denoiser
    from loracompose.pipelines.patches import PatchStack
else:  # imported on first use: the settings dataclass imports without the model stack
    torch = LazyImport("torch")
    Attention = LazyImport("diffusers.models.attention_processor", "Attention")
    LoraLayer = LazyImport("peft.tuners.lora", "LoraLayer")
    ComposeAttnProcessor = LazyImport("loracompose.attention", "ComposeAttnProcessor")
    LoraTokenMasks = LazyImport("loracompose.attention", "LoraTokenMasks")
    active_adapters = LazyImport("loracompose.attention.lora_deltas", "active_adapters")
    adapter_delta = LazyImport("loracompose.attention.lora_deltas", "adapter_delta")
    install_text_kv_token_masks = LazyImport("loracompose.attention.tara_dit", "install_text_kv_token_masks")
    install_tara_regions = LazyImport("loracompose.attention.tara_dit", "install_tara_regions")
    RegionMasks = LazyImport("loracompose.attention.regional", "RegionMasks")
    install_regional = LazyImport("loracompose.attention.regional", "install_regional")
    LatentGrid = LazyImport("loracompose.attention.masks", "LatentGrid")
    check_mask_aspect = LazyImport("loracompose.methods.regional", "check_mask_aspect")

TARA_TOKEN_KEY = "loracompose.tara_token"
TARA_CLASS_KEY = "loracompose.tara_class"
SELF_ATTENTION_MODES = ("keep", "cond", "off")
MISSING_TRIGGER_MODES = ("error", "warn")
UNTOKENED_MODES = ("region", "global")
GLOBAL_KIND_MODES = ("every_token", "trigger")
_REGIONAL_FIELDS = {f.name: f for f in fields(Regional)}  # the same --box/--mask flags as regional's


# ------------------------------------------------------------------------------------ inference


@dataclass
class Tara(CompositionMethod):
    """All LoRAs in one UNet pass; each LoRA's cross-attention K/V deltas only at its trigger tokens.

    Args:
        self_attention: attn1 deltas on every row (``"keep"``), conditional rows only (``"cond"``)
            or nowhere (``"off"``).
        missing_trigger: a LoRA none of whose trigger words is in the prompt raises (``"error"``) or
            warns and gets no K/V deltas (``"warn"``).
        fuse: fold the unmasked deltas into the UNet weights while generating and restore the
            weights exactly at the end (faster per step; holds a CPU copy of the folded weights).
        backend: attention kernel of the cross-attention processors (``"sdpa"``, ``"xformers"``, ``"flex"``).
    """

    name: ClassVar[str] = "tara"
    families: ClassVar[frozenset[str]] = ALL_FAMILIES
    self_attention: str = field(default="keep", metadata={"choices": SELF_ATTENTION_MODES})
    missing_trigger: str = field(default="error", metadata={"choices": MISSING_TRIGGER_MODES})
    fuse: bool = field(default=False, metadata={"flags": ("--fuse",)})
    backend: str = "sdpa"
    untokened: str = field(default="region", metadata={
        "choices": UNTOKENED_MODES,
        "help": "the deltas that have no token (all but cross-attention K/V): region = each local LoRA's inside "
                "its region (boxes/masks, else automatic masks from its trigger maps), global = everywhere"})
    boxes: tuple[Box, ...] | None = field(default=None, metadata=_REGIONAL_FIELDS["boxes"].metadata)
    masks: tuple[str, ...] | None = field(default=None, metadata=_REGIONAL_FIELDS["masks"].metadata)
    global_kinds: str = field(default="every_token", metadata={
        "choices": GLOBAL_KIND_MODES,
        "help": "cross-attention K/V deltas of a style or background LoRA (its kind as auto reads it): on every "
                "text token (every_token; a style is tied to no word) or only at its trigger words (trigger)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self._token_masks = LoraTokenMasks()
        self.positions: dict[str, WordPositions] = {}
        self._regions = Regional(boxes=self.boxes, masks=self.masks)  # parses and checks boxes and masks
        self.region_masks: RegionMasks | None = None  # the running generation's regions (None: none masked)
        self._auto: Auto | None = None  # finds the regions from trigger maps when none are given
        self._image_areas: Sequence[Sequence[RegionArea]] = []  # automatic regions, per image of the generation
        self._trigger_token_masks: dict[str, torch.Tensor] = {}
        self.every_token: list[str] = []  # LoRAs of a global kind whose K/V deltas act on every token
        self.region_source = "none"  # "given", "automatic" or "none" (every delta unmasked), for the record

    def check(self, loras: Sequence[LoadedLora]) -> None:
        require_loras(self.name, loras)
        _check_choice("tara self_attention", self.self_attention, SELF_ATTENTION_MODES)
        _check_choice("tara missing_trigger", self.missing_trigger, MISSING_TRIGGER_MODES)
        _check_choice("tara untokened", self.untokened, UNTOKENED_MODES)
        _check_choice("tara global_kinds", self.global_kinds, GLOBAL_KIND_MODES)
        if self.untokened == "global" and (self.boxes or self.masks):
            raise UserError("tara: boxes and masks place the untokened deltas; drop them or use untokened='region'")
        for lora in loras:
            if not lora.trigger_words:
                raise UserError(f"LoRA {lora.name} has no trigger words, so TARA cannot place it in the prompt; "
                                "give them with --trigger WORDS or LoraSpec(trigger_words=...)")
        if self.self_attention != "keep" and any(lora.architecture in (FLUX, SD3) for lora in loras):
            raise UserError(f"tara self_attention={self.self_attention!r} is for SD1.5/SDXL UNets; on FLUX/SD3 use "
                            "'keep' (joint attention has no separate self-attention)")
        if self.untokened == "region":
            self._regions.areas(loras)  # counts of boxes/masks against the LoRAs

    def _check_region_settings(self) -> None:
        """Settings that region masks cannot follow (on a DiT only ``fuse``: check() refuses the others)."""
        if self.self_attention == "cond":
            raise UserError("tara self_attention='cond' places the attn1 deltas by batch row, not by region; "
                            "pass untokened='global' with it")
        if self.fuse:
            raise UserError("tara fuse folds the untokened deltas into the weights, where a region mask cannot act; "
                            "pass untokened='global' with fuse")

    def start(self, run: Denoiser) -> None:
        self.region_masks, self._auto, self.region_source = None, None, "none"
        if _token_grid(run) is not None:
            self._start_dit(run)
            return
        prompt, tokenizers = prompt_and_tokenizers(run)
        areas = self._plan_regions(prompt, tokenizers) if self.untokened == "region" else None
        if areas is not None:
            self._check_region_settings()
        self._trigger_token_masks = self._every_token_for_global_kinds(self.trigger_masks(prompt, tokenizers))
        self._token_masks.masks = {name: cfg_row_masks(mask, run.batch_size, run.do_cfg)
                                   for name, mask in self._trigger_token_masks.items()}
        install_token_masked_cross_attention(run.patches, run.unet, self._token_masks, self.backend)
        if self.self_attention != "keep":
            rows = cfg_rows(run.batch_size, run.do_cfg) if self.self_attention == "cond" else None
            SelfAttentionRows(run.unet, rows, run.patches)
        if self.fuse:  # the unmasked deltas folded into the weights, restored from a saved copy at the end
            run.adapters.activate(self.branch(*self.loras).weights, components=["unet"])
            run.patches.fuse(unmasked_lora_layers(run.unet, self.self_attention), [lora.name for lora in self.loras])
        if areas is not None:
            self._install_regions(run, areas)

    def _plan_regions(self, prompt: str, tokenizers: Sequence[Any],
                      streams: Sequence[tuple[Sequence[Any], int]] | None = None) -> list[RegionArea] | None:
        """Each LoRA's region for the untokened deltas: the given boxes/masks, else placeholders that
        :meth:`prepare_latents` replaces by auto's masks from a base-model probe of the local LoRAs'
        trigger maps; None (nothing masked) when there is one LoRA or no local one. On a DiT ``streams``
        is its joint text sequence (:func:`joint_text_streams`), where the probe finds the triggers."""
        if self.boxes or self.masks:
            self.region_source = "given"
            return self._regions.areas(self.loras)
        # maps from the base model (auto's default; TARA's own merged maps put the lunzor left on the toy
        # world, docs/methods/tara.md); a style stays one whole-image delta, as in TARA
        auto = Auto(map_source="base", style_combine="weights")
        auto.bind(self.loras)
        auto.plan(prompt, tokenizers, streams)
        if auto.merges:  # one LoRA, or none local: nothing to keep apart (auto runs Merge there too)
            return None
        self._auto, self.region_source = auto, "automatic"
        return [None] * len(self.loras)

    def _install_regions(self, run: Denoiser, areas: list[RegionArea]) -> None:
        """Regional's masked deltas on every UNet LoRA layer but the cross-attention K/V."""
        skip = [projection for attention in attention_modules(run.unet, cross=True)
                for projection in (attention.to_k, attention.to_v)]  # token-masked by TARA's processors
        if self.self_attention == "off":  # no attn1 deltas at all (SelfAttentionRows)
            skip += [module for attention in attention_modules(run.unet, cross=False) for module in attention.modules()]
        self.region_masks = RegionMasks([lora.name for lora in self.loras], areas)
        install_regional(run.unet, self.region_masks, None, run.patches, skip)

    def prepare_latents(self, run: Denoiser, step: Step, latents: torch.Tensor) -> torch.Tensor:
        if step.index == 0 and self._auto is not None and self.region_masks is not None:
            self._image_areas = self._auto.probe_regions(run, latents)  # one list of regions per image
            self.region_masks.set_areas(self._image_areas[0])
        if step.index == 0 and self.region_masks is not None:
            tokens = _token_grid(run)  # a DiT's regions live on its image-token grid
            grid = LatentGrid(*tokens) if tokens else LatentGrid(int(latents.shape[-2]), int(latents.shape[-1]))
            for lora, area in zip(self.loras, self.region_masks.areas):
                if isinstance(area, torch.Tensor) and self.region_source == "given":
                    check_mask_aspect(area, grid, lora.name)
        return latents

    def _start_dit(self, run: Denoiser) -> None:
        """FLUX/SD3: token masks on the text rows of joint attention's K/V deltas; the other deltas in
        their LoRA's region on the image-token grid (``untokened="region"``) or everywhere, as Merge."""
        prompt, tokenizers = prompt_and_tokenizers(run)
        text_tokens = int(run.conditioning(self.branch(*self.loras)).embeds.shape[1])  # the branch predict runs
        streams = joint_text_streams(tokenizers, text_tokens)
        areas = self._plan_regions(prompt, tokenizers, streams) if self.untokened == "region" else None
        if areas is not None:
            self._check_region_settings()
        token_masks = self.trigger_masks(prompt, tokenizers,
                                         find=lambda _, text, words: stream_trigger_positions(streams, text, words))
        self._trigger_token_masks = self._every_token_for_global_kinds(token_masks)
        self._token_masks.masks = {name: cfg_row_masks(mask, run.batch_size, run.do_cfg)
                                   for name, mask in self._trigger_token_masks.items()}
        rows, columns = _token_grid(run) or (0, 0)
        if areas is not None:
            self.region_masks = RegionMasks([lora.name for lora in self.loras], areas)
            install_tara_regions(run.unet, self._token_masks, self.region_masks, (rows, columns), _joint_order(run),
                                 run.patches)
            return
        masked = install_text_kv_token_masks(run.unet, self._token_masks, rows * columns, _joint_order(run),
                                             run.patches)
        if self.fuse:
            run.adapters.activate(self.branch(*self.loras).weights, components=["unet"])
            masked_ids = {id(layer) for layer in masked}
            run.patches.fuse([layer for layer in run.unet.modules()
                              if isinstance(layer, LoraLayer) and id(layer) not in masked_ids],
                             [lora.name for lora in self.loras])

    def _every_token_for_global_kinds(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With ``global_kinds="every_token"``, a style or background LoRA's K/V deltas act on every text
        token, as Merge's: masked to its trigger word it lost the style entirely on the toy world (the
        token masks are for local concepts)."""
        self.every_token = [lora.name for lora in self.loras if self.global_kinds == "every_token"
                            and (kind := lora_kind(lora)[0]) is not None and not is_local(kind)]
        return {name: torch.ones_like(mask) if name in self.every_token else mask for name, mask in masks.items()}

    def trigger_masks(self, prompt: str, tokenizers: Sequence[Any],
                      find: Callable[[Sequence[Any], str, Sequence[str]], WordPositions] = trigger_positions,
                      ) -> dict[str, torch.Tensor]:
        """Each LoRA's (tokens,) 0/1 mask: 1 at its trigger words' tokens in the prompt, found by ``find``
        (on DiTs: over the joint text sequence, :func:`joint_text_streams`)."""
        self.positions = {lora.name: find(tokenizers, prompt, lora.trigger_words) for lora in self.loras}
        for lora in self.loras:
            if not self.positions[lora.name].found:
                self._report_missing(lora, prompt)
        return {name: found.mask() for name, found in self.positions.items()}

    def _report_missing(self, lora: LoadedLora, prompt: str) -> None:
        message = (f"TARA: no trigger word of LoRA {lora.name} ({', '.join(lora.trigger_words)}) is in the prompt "
                   f"{prompt[:120]!r} (within the {self.positions[lora.name].length} text tokens the model reads)")
        if self.missing_trigger == "error":
            raise UserError(message + "; put a trigger word in the prompt, or pass missing_trigger='warn' to run "
                            "the LoRA without cross-attention K/V deltas")
        warnings.warn(message + "; its cross-attention K/V deltas are off", UserWarning, stacklevel=2)

    def predict(self, run: Denoiser, step: Step, latents: torch.Tensor) -> Prediction:
        branch = self.branch(*self.loras)
        if len(self._image_areas) < 2 or self.region_masks is None:
            return run.predict(latents, step, [branch])[0]
        # automatic regions differ per image: one pass per image with its own regions (as auto does)
        view, full_rows = one_image_view(run), self._token_masks.masks
        self._token_masks.masks = {name: cfg_row_masks(mask, 1, run.do_cfg)
                                   for name, mask in self._trigger_token_masks.items()}
        try:
            predictions = []
            for image, areas in enumerate(self._image_areas):
                self.region_masks.set_areas(areas)
                predictions.append(view.predict(latents[image:image + 1], step, [branch])[0])
        finally:
            self._token_masks.masks = full_rows
        return stacked_predictions(predictions)

    def finish(self, run: Denoiser) -> None:
        self._token_masks.masks, self._image_areas = {}, []
        self._auto = None  # its probe's recorder is undone by run.patches, as are the region patches

    def settings(self) -> dict[str, Any]:
        settings = self._regions.settings()
        return {**super().settings(), "boxes": settings.get("boxes"), "masks": settings.get("masks"),
                "regions": self.region_source, "every_token": list(self.every_token)}


def _check_choice(label: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"{label}={value!r} is not known; use one of {', '.join(map(repr, choices))}")


def joint_text_streams(tokenizers: Sequence[Any], text_tokens: int) -> list[tuple[list[Any], int]]:
    """A DiT's joint text sequence of ``text_tokens`` tokens as (tokenizers side by side, tokens) streams
    for :func:`~loracompose.tokens.stream_trigger_positions`: FLUX one T5 stream; SD3 the 77 CLIP
    positions (CLIP-L and CLIP-G side by side in channels, so a position is a trigger's if either
    tokenizer puts it there), then T5's."""
    present = [tokenizer for tokenizer in tokenizers if tokenizer is not None]
    clip = [tokenizer for tokenizer in present if not _is_t5(tokenizer)]
    t5 = [tokenizer for tokenizer in present if _is_t5(tokenizer)]
    clip_tokens = int(clip[0].model_max_length) if clip else 0
    streams = [(clip, clip_tokens)] if clip else []
    if t5 and text_tokens > clip_tokens:
        streams.append((t5, text_tokens - clip_tokens))
    return streams


def _is_t5(tokenizer: Any) -> bool:
    return "T5" in type(tokenizer).__name__


def cfg_rows(batch_size: int, do_cfg: bool) -> torch.Tensor:
    """(rows,) 1 on the conditional rows of a UNet batch laid out [uncond x B, cond x B], 0 on the others."""
    cond = torch.ones(batch_size)
    return torch.cat([torch.zeros(batch_size), cond]) if do_cfg else cond


def cfg_row_masks(token_mask: torch.Tensor, batch_size: int, do_cfg: bool) -> torch.Tensor:
    """(rows, tokens): the token mask on the conditional rows, zeros on the unconditional ones.

    The reference's (1, 77, 1) mask broadcasts over [uncond, cond], so its unconditional half also
    gets the K/V deltas; one mask row per batch row keeps them out of it.
    """
    return cfg_rows(batch_size, do_cfg)[:, None] * token_mask[None, :]


def prompt_and_tokenizers(run: Denoiser) -> tuple[str, list[Any]]:
    """The generation's final prompt (after trigger appending) and the pipeline's tokenizer(s)."""
    if not isinstance(run.prompt, str) or not run.tokenizers:
        raise UserError("TARA needs the prompt and the tokenizer(s) of the generation; run it through "
                        "pipe.generate(...) of a loracompose pipeline")
    return run.prompt, list(run.tokenizers)


def attention_modules(unet: torch.nn.Module, cross: bool) -> list[Attention]:
    """The cross- (attn2) or self-attention (attn1) modules of a UNet, in one walk over its modules."""
    return [module for module in unet.modules()
            if isinstance(module, Attention) and bool(getattr(module, "is_cross_attention", False)) == cross]


def unmasked_lora_layers(unet: torch.nn.Module, self_attention: str) -> list[LoraLayer]:
    """The UNet LoRA layers whose deltas TARA leaves unmasked: all but the cross-attention K/V, and
    but self-attention's unless ``self_attention="keep"``."""
    kept = [a for attention in attention_modules(unet, cross=True) for a in (attention.to_k, attention.to_v)]
    if self_attention != "keep":
        kept += [module for attention in attention_modules(unet, cross=False) for module in attention.modules()]
    kept_ids = {id(module) for module in kept}
    return [layer for layer in unet.modules() if isinstance(layer, LoraLayer) and id(layer) not in kept_ids]


def install_token_masked_cross_attention(patches: PatchStack, unet: torch.nn.Module, token_masks: LoraTokenMasks,
                                         backend: str) -> None:
    """Token-masked K/V processors on every cross-attention layer, registered on ``patches``.

    Swaps processors module by module (``Attention.set_processor``): ``install_processors`` walks
    the whole UNet's processor tree five times per install and restore, which on the tiny models
    costs a quarter of a UNet call per generation. Token masks need no layer binding.
    """
    patches.module_processors(attention_modules(unet, cross=True),
                              lambda _: ComposeAttnProcessor(backend, token_masks=token_masks))


class SelfAttentionRows:
    """Self-attention (attn1) LoRA deltas on some batch rows only (``rows`` 0/1), or on none (None).

    A forward pre-hook routes every row of each attn1 LoRA layer to PEFT's ``"__base__"`` (base
    projection only); a forward hook then adds ``rows ⊙ delta_i`` of each active adapter. The hooks
    are registered on ``patches``.
    """

    def __init__(self, unet: torch.nn.Module, rows: torch.Tensor | None, patches: PatchStack) -> None:
        self.rows = rows
        for attention in attention_modules(unet, cross=False):
            for module in attention.modules():
                if isinstance(module, LoraLayer):
                    patches.hook(module.register_forward_pre_hook(self._base_only, with_kwargs=True))
                    if rows is not None:
                        patches.hook(module.register_forward_hook(self._add_row_deltas))

    @staticmethod
    def _base_only(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs["adapter_names"] = [BASE_ROW] * len(args[0])
        return args, kwargs

    def _add_row_deltas(self, module: LoraLayer, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x, rows = args[0], self.rows
        if rows is None:  # this hook is registered only when rows are given
            return output
        if rows.shape[0] != x.shape[0]:
            raise UserError(f"TARA self-attention rows ({rows.shape[0]}) do not match the batch ({x.shape[0]}); "
                            "run TARA through pipe.generate")
        rows = rows.to(device=x.device, dtype=output.dtype).view(-1, *([1] * (x.ndim - 1)))
        for adapter in active_adapters(module):
            output = output + rows * adapter_delta(module, x, adapter).to(output.dtype)
        return output


def is_tara_trained(lora: LoadedLora) -> bool:
    """Whether the LoRA file says it was trained with TARA (then the masked forward is exact)."""
    return bool(lora.metadata.get(TARA_TOKEN_KEY))
