"""TARA: Token-Aware LoRA (Peng et al., AAAI 2026; docs/methods/tara.md).

Inference — one UNet pass per step with every LoRA active, as Merge, except on cross-attention K/V::

    for each LoRA i:
        m_i <- 0/1 mask over the prompt's 77 tokens, 1 at LoRA i's trigger (rare) tokens
               (tokens.py: BPE sub-sequence match, multi-token words; SDXL: OR of both tokenizers)
        rows of the unconditional CFG half: m_i <- 0
    for each step: one UNet call where, on every cross-attention (attn2),
        k <- W_K·c + Σ_i m_i ⊙ w_i·(α_i/r_i)·B_i·A_i·c          (v alike)
    and every other adapted projection (attn2 q/out, attn1 q/k/v/out, text encoders) adds
        Σ_i w_i·(α_i/r_i)·B_i·A_i·x                               (unmasked, as Merge)

``self_attention`` sets what the attn1 deltas do (they act on image tokens, so no token mask fits):
``"keep"`` (default, as TARA) on every row; ``"cond"`` on the conditional rows only, so the
unconditional half runs the base self-attention as it runs the base K/V; ``"off"`` nowhere.
``fuse=True`` folds every unmasked delta into the UNet weights for the generation (as Merge's
``fuse``), leaving only the cross-attention K/V products over the 77 text tokens to run per step.

Training (:func:`train_tara`; the DreamBooth loop itself is :mod:`loracompose.training`)::

    prompt <- "a photo of <rare> <class>";  c <- frozen text encoder(s)(prompt)
    m <- mask of <rare>'s tokens;  R, C <- token positions of <rare> and <class>
    LoRA (rank r, alpha α) on to_q/k/v/out.0 of every attention; attn2 K/V deltas multiplied by m
    for each step:
        L_ε     <- ‖ε − UNet(x_t, t, c)‖²                               (DreamBooth, no prior loss)
        L_align <- mean_l mean_{j∈R} mean_d |(W_K^l + Δ_K^l)·c_j − mean_{k∈C} W_K^l·c_k|
        AdamW step on L_ε + λ·L_align
        focus   <- mean_l mean_{j∉R} (|Δ_K^l·c_j| + |Δ_V^l·c_j|)       (logged, not optimised)

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
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Sequence

import torch
from diffusers.models.attention_processor import Attention
from peft.tuners.lora import LoraLayer

from loracompose.errors import UserError
from loracompose.lora import SD15, SDXL, LoadedLora
from loracompose.methods.base import CompositionMethod, require_loras
from loracompose.tokens import WordPositions, trigger_positions
from loracompose.training.trainer import LoraTrainingSettings, TrainingDefaults, TrainingModel, TrainingResult, train_lora
from loracompose.attention import ComposeAttnProcessor, LoraTokenMasks
from loracompose.attention.lora_deltas import active_adapters, adapter_delta
from loracompose.pipelines.adapters import BASE_ROW
from loracompose.pipelines.loop import Denoiser, Prediction, Step

TARA_TOKEN_KEY = "loracompose.tara_token"
TARA_CLASS_KEY = "loracompose.tara_class"
SELF_ATTENTION_MODES = ("keep", "cond", "off")
MISSING_TRIGGER_MODES = ("error", "warn")
DEFAULT_PROMPT_TEMPLATE = "a photo of {token} {class_word}"

# methods.md §9.3. SDXL: no alpha in the reference (scale 1), 5e-5 constant, fp16 + 8-bit Adam there;
# here bf16 + AdamW (bitsandbytes is not a dependency). Resolution: the model's native size.
TARA_DEFAULTS: dict[str, TrainingDefaults] = {
    SD15: TrainingDefaults(rank=8, alpha=32.0, learning_rate=1e-4, steps=1000, batch_size=1),
    SDXL: TrainingDefaults(rank=4, alpha=None, learning_rate=5e-5, steps=1000, batch_size=1),
}
TARA_ALIGN_WEIGHT = 1.0


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
    self_attention: str = "keep"
    missing_trigger: str = "error"
    fuse: bool = False
    backend: str = "sdpa"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._token_masks = LoraTokenMasks()
        self._processors: TokenMaskedCrossAttention | None = None
        self._self_attention: SelfAttentionRows | None = None
        self._fused: FusedUnmaskedDeltas | None = None
        self.positions: dict[str, WordPositions] = {}

    def check(self, loras: Sequence[LoadedLora]) -> None:
        require_loras(self.name, loras)
        _check_choice("tara self_attention", self.self_attention, SELF_ATTENTION_MODES)
        _check_choice("tara missing_trigger", self.missing_trigger, MISSING_TRIGGER_MODES)
        for lora in loras:
            if not lora.trigger_words:
                raise UserError(f"LoRA {lora.name} has no trigger words, so TARA cannot place it in the prompt; "
                                "give them with --trigger WORDS or LoraSpec(trigger_words=...)")

    def start(self, run: Denoiser) -> None:
        prompt, tokenizers = prompt_and_tokenizers(run)
        token_masks = self.trigger_masks(prompt, tokenizers)
        self._token_masks.masks = {name: cfg_row_masks(mask, run.batch_size, run.do_cfg)
                                   for name, mask in token_masks.items()}
        self._processors = TokenMaskedCrossAttention(run.unet, self._token_masks, self.backend)
        if self.self_attention != "keep":
            rows = cfg_rows(run.batch_size, run.do_cfg) if self.self_attention == "cond" else None
            self._self_attention = SelfAttentionRows(run.unet, rows)
        if self.fuse:
            run.adapters.activate(self.branch(*self.loras).weights, components=["unet"])
            self._fused = FusedUnmaskedDeltas(run.unet, [lora.name for lora in self.loras], self.self_attention)

    def trigger_masks(self, prompt: str, tokenizers: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Each LoRA's (tokens,) 0/1 mask: 1 at its trigger words' tokens in the prompt."""
        self.positions = {lora.name: trigger_positions(tokenizers, prompt, lora.trigger_words) for lora in self.loras}
        for lora in self.loras:
            if not self.positions[lora.name].found:
                self._report_missing(lora, prompt)
        return {name: found.mask() for name, found in self.positions.items()}

    def _report_missing(self, lora: LoadedLora, prompt: str) -> None:
        message = (f"TARA: no trigger word of LoRA {lora.name} ({', '.join(lora.trigger_words)}) is in the prompt "
                   f"{prompt[:120]!r} (within its first 77 tokens)")
        if self.missing_trigger == "error":
            raise UserError(message + "; put a trigger word in the prompt, or pass missing_trigger='warn' to run "
                            "the LoRA without cross-attention K/V deltas")
        warnings.warn(message + "; its cross-attention K/V deltas are off", UserWarning, stacklevel=2)

    def predict(self, run: Denoiser, step: Step, latents: torch.Tensor) -> Prediction:
        return run.predict(latents, step, [self.branch(*self.loras)])[0]

    def finish(self, run: Denoiser) -> None:
        if self._fused is not None:
            self._fused.restore()
            self._fused = None
        if self._processors is not None:
            self._processors.restore()
            self._processors = None
        if self._self_attention is not None:
            self._self_attention.remove()
            self._self_attention = None
        self._token_masks.masks = {}


def _check_choice(label: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"{label}={value!r} is not known; use one of {', '.join(map(repr, choices))}")


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


class FusedUnmaskedDeltas:
    """The unmasked deltas of ``adapters`` merged into the UNet weights; :meth:`restore` puts the
    original weights back exactly (from a CPU copy: merge + unmerge alone would round them)."""

    def __init__(self, unet: torch.nn.Module, adapters: Sequence[str], self_attention: str) -> None:
        self.saved: list[tuple[LoraLayer, torch.Tensor]] = []
        for layer in unmasked_lora_layers(unet, self_attention):
            present = [name for name in adapters if name in layer.lora_A]
            if present:
                self.saved.append((layer, layer.get_base_layer().weight.detach().to("cpu", copy=True)))
                layer.merge(adapter_names=present)

    def restore(self) -> None:
        for layer, weight in self.saved:
            while layer.merged:
                layer.unmerge()
            with torch.no_grad():
                layer.get_base_layer().weight.copy_(weight)
        self.saved = []


class TokenMaskedCrossAttention:
    """Token-masked K/V processors on every cross-attention layer; :meth:`restore` puts the old ones back.

    Swaps processors module by module (``Attention.set_processor``): ``install_processors`` walks
    the whole UNet's processor tree five times per install and restore, which on the tiny models
    costs a quarter of a UNet call per generation. Token masks need no layer binding.
    """

    def __init__(self, unet: torch.nn.Module, token_masks: LoraTokenMasks, backend: str) -> None:
        self.previous = {module: module.processor for module in attention_modules(unet, cross=True)}
        for module in self.previous:
            module.set_processor(ComposeAttnProcessor(backend, token_masks=token_masks))

    def restore(self) -> None:
        for module, processor in self.previous.items():
            module.set_processor(processor)
        self.previous = {}


class SelfAttentionRows:
    """Self-attention (attn1) LoRA deltas on some batch rows only (``rows`` 0/1), or on none (None).

    A forward pre-hook routes every row of each attn1 LoRA layer to PEFT's ``"__base__"`` (base
    projection only); a forward hook then adds ``rows ⊙ delta_i`` of each active adapter.
    """

    def __init__(self, unet: torch.nn.Module, rows: torch.Tensor | None) -> None:
        self.rows = rows
        self.handles: list[Any] = []
        for attention in attention_modules(unet, cross=False):
            for module in attention.modules():
                if isinstance(module, LoraLayer):
                    self.handles.append(module.register_forward_pre_hook(self._base_only, with_kwargs=True))
                    if rows is not None:
                        self.handles.append(module.register_forward_hook(self._add_row_deltas))

    @staticmethod
    def _base_only(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs["adapter_names"] = [BASE_ROW] * len(args[0])
        return args, kwargs

    def _add_row_deltas(self, module: LoraLayer, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if self.rows.shape[0] != x.shape[0]:
            raise UserError(f"TARA self-attention rows ({self.rows.shape[0]}) do not match the batch ({x.shape[0]}); "
                            "run TARA through pipe.generate")
        rows = self.rows.to(device=x.device, dtype=output.dtype).view(-1, *([1] * (x.ndim - 1)))
        for adapter in active_adapters(module):
            output = output + rows * adapter_delta(module, x, adapter).to(output.dtype)
        return output

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


# ------------------------------------------------------------------------------------ training


@dataclass
class TaraObjective:
    """TARA's additions to DreamBooth LoRA training: token-masked K/V deltas and key alignment."""

    token: str
    class_word: str
    align_weight: float = TARA_ALIGN_WEIGHT
    backend: str = "sdpa"
    name: ClassVar[str] = "tara"

    def __post_init__(self) -> None:
        self.rare_positions: list[int] = []
        self.class_positions: list[int] = []
        self._layers: list[Attention] = []
        self._processors: TokenMaskedCrossAttention | None = None

    def settings(self) -> dict[str, Any]:
        return {"objective": self.name, "token": self.token, "class_word": self.class_word,
                "align_weight": self.align_weight}

    def prepare(self, model: TrainingModel) -> None:
        """Find the rare and class tokens in the training prompt; mask the attn2 K/V deltas with the
        same processors inference uses (every training row is conditional)."""
        self.rare_positions, self.class_positions = rare_and_class_positions(
            model.tokenizers, model.prompt, self.token, self.class_word)
        mask = torch.zeros(model.conditioning.embeds.shape[1])
        mask[self.rare_positions] = 1.0
        self._layers = attention_modules(model.unet, cross=True)
        self._processors = TokenMaskedCrossAttention(model.unet, LoraTokenMasks({model.adapter: mask}), self.backend)

    def losses(self, model: TrainingModel) -> dict[str, torch.Tensor]:
        """λ·L_align (the ε-loss is the trainer's)."""
        align = key_alignment_loss(self._layers, model.conditioning.embeds, self.rare_positions,
                                   self.class_positions, model.adapter)
        return {"align": self.align_weight * align}

    def metrics(self, model: TrainingModel) -> dict[str, float]:
        """The focus L1 on the K/V deltas the mask removes (logged, not optimised)."""
        with torch.no_grad():
            return {"focus": float(unmasked_kv_delta(self._layers, model.conditioning.embeds,
                                                     self.rare_positions, model.adapter))}

    def metadata(self) -> dict[str, str]:
        return {TARA_TOKEN_KEY: self.token, TARA_CLASS_KEY: self.class_word,
                "loracompose.tara_align_weight": repr(float(self.align_weight)), "loracompose.method": self.name}

    def close(self) -> None:
        if self._processors is not None:
            self._processors.restore()
            self._processors = None


def rare_and_class_positions(tokenizers: Sequence[Any], prompt: str, token: str,
                             class_word: str) -> tuple[list[int], list[int]]:
    """Token positions of the rare word and the class word in the training prompt (both required, disjoint)."""
    rare = trigger_positions(tokenizers, prompt, [token]).positions
    classes = trigger_positions(tokenizers, prompt, [class_word]).positions
    if not rare:
        raise UserError(f"the rare token {token!r} is not in the training prompt {prompt!r}; put it in the prompt")
    if not classes:
        raise UserError(f"the class word {class_word!r} is not in the training prompt {prompt!r}; put it in the prompt")
    if set(rare) & set(classes):
        raise UserError(f"the rare token {token!r} and the class word {class_word!r} share tokens; pick a rare "
                        "token that is not part of the class word")
    return rare, classes


def _attention_context(attn: torch.nn.Module, context: torch.Tensor) -> torch.Tensor:
    """What attn2's to_k/to_v see: the text states, normalised if the layer does so."""
    return attn.norm_encoder_hidden_states(context) if getattr(attn, "norm_cross", None) else context


def _base(layer: torch.nn.Module) -> torch.nn.Module:
    return layer.get_base_layer() if isinstance(layer, LoraLayer) else layer


def key_alignment_loss(layers: Sequence[torch.nn.Module], context: torch.Tensor, rare_positions: Sequence[int],
                       class_positions: Sequence[int], adapter: str) -> torch.Tensor:
    """L_align = mean_l mean_{j∈rare} mean_d |(W_K^l + Δ_K^l)·c_j − mean_{k∈class} W_K^l·c_k|.

    Several class tokens are pooled to their mean base key explicitly, and every rare token (a rare
    word may be several BPE tokens) is pulled to that one key: nothing broadcasts by accident.
    """
    per_layer = []
    for attn in layers:
        states = _attention_context(attn, context)
        rare_states = states[:, list(rare_positions)]
        rare_keys = _base(attn.to_k)(rare_states) + adapter_delta(attn.to_k, rare_states, adapter)
        with torch.no_grad():
            class_key = _base(attn.to_k)(states[:, list(class_positions)]).mean(dim=1, keepdim=True)
        per_layer.append((rare_keys.float() - class_key.float()).abs().mean())
    return torch.stack(per_layer).mean()


def unmasked_kv_delta(layers: Sequence[torch.nn.Module], context: torch.Tensor, rare_positions: Sequence[int],
                      adapter: str) -> torch.Tensor:
    """mean_l mean_{j∉rare} (|Δ_K^l·c_j| + |Δ_V^l·c_j|): the K/V deltas the token mask removes."""
    others = [j for j in range(context.shape[1]) if j not in set(rare_positions)]
    per_layer = []
    for attn in layers:
        states = _attention_context(attn, context)[:, others]
        per_layer.append(adapter_delta(attn.to_k, states, adapter).abs().mean()
                         + adapter_delta(attn.to_v, states, adapter).abs().mean())
    return torch.stack(per_layer).mean()


@dataclass
class TaraTrainingSettings:
    """``train-tara``: a DreamBooth folder, its rare token and class word, and the training settings.

    ``training`` fields left as None take TARA's defaults for the model's architecture
    (:data:`TARA_DEFAULTS`); its ``prompt`` defaults to ``"a photo of <token> <class_word>"``.
    """

    token: str
    class_word: str
    training: LoraTrainingSettings
    align_weight: float = TARA_ALIGN_WEIGHT
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE


def train_tara(settings: TaraTrainingSettings) -> TrainingResult:
    """Train a TARA LoRA and write it as a diffusers-format safetensors file (trigger = the token)."""
    token, class_word = settings.token.strip(), settings.class_word.strip()
    if not token or not class_word:
        raise UserError("train-tara needs a rare token (--token) and a class word (--class-word); e.g. --token sks "
                        "--class-word dog")
    training = replace(
        settings.training,
        prompt=settings.training.prompt or settings.prompt_template.format(token=token, class_word=class_word),
        trigger_words=(token,),
        use_caption_files=False,  # the token masks are found in the one training prompt
    )
    objective = TaraObjective(token, class_word, settings.align_weight)
    return train_lora(training, objective, TARA_DEFAULTS)


def is_tara_trained(lora: LoadedLora) -> bool:
    """Whether the LoRA file says it was trained with TARA (then the masked forward is exact)."""
    return bool(lora.metadata.get(TARA_TOKEN_KEY))
