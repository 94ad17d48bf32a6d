"""TARA training: a DreamBooth LoRA with token-masked cross-attention K/V deltas and key alignment.

Inference is :mod:`loracompose.methods.tara`; the DreamBooth loop itself is :mod:`loracompose.training.trainer`::

    caption_i <- image i's caption file, else the prompt "a photo of <rare> <class>"
    c_i <- frozen text encoder(s)(caption_i)
    m_i <- mask of <rare>'s tokens in caption_i;  R_i <- their positions
    class context of image i: caption_i itself if it holds <class>, else caption_i with <rare>
        replaced by <class>;  k_i <- mean over <class>'s tokens there of W_K^l·(its text state)
    LoRA (rank r, alpha α) on to_q/k/v/out.0 of every attention; attn2 K/V deltas multiplied by m_i
    for each step, batch B:
        L_ε     <- ‖ε − UNet(x_t, t, c_B)‖²  with the masks m_B                  (DreamBooth, no prior loss)
        L_align <- mean_l mean_{i∈B} mean_{j∈R_i} mean_d |(W_K^l + Δ_K^l)·c_{i,j} − k_i^l|
        AdamW step on L_ε + λ·L_align
        focus   <- mean_l mean_{i∈B} mean_{j∉R_i} (|Δ_K^l·c_{i,j}| + |Δ_V^l·c_{i,j}|)   (logged, not optimised)

Every rare token (a rare word may be several BPE tokens) is pulled to the *mean* base key of the class
word's tokens; the K/V deltas are masked by the same processors inference installs. Masks and
alignment targets are found per caption, so the deltas learn the rare word wherever captions put it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Sequence

import torch
from diffusers.models.attention_processor import Attention
from peft.tuners.lora import LoraLayer

from loracompose.attention import LoraTokenMasks
from loracompose.attention.lora_deltas import adapter_delta, token_mask
from loracompose.errors import UserError
from loracompose.lora import SD15, SDXL
from loracompose.methods.tara import TARA_CLASS_KEY, TARA_TOKEN_KEY, attention_modules, \
    install_token_masked_cross_attention
from loracompose.pipelines.patches import PatchStack
from loracompose.tokens import trigger_positions
from loracompose.training.trainer import (LoraTrainingSettings, TrainingDefaults, TrainingModel, TrainingResult,
                                          train_lora)

DEFAULT_PROMPT_TEMPLATE = "a photo of {token} {class_word}"

# The reference recipe. SDXL: no alpha there (scale 1), 5e-5 constant, fp16 + 8-bit Adam there;
# here bf16 + AdamW (bitsandbytes is not a dependency). Resolution: the model's native size.
TARA_DEFAULTS: dict[str, TrainingDefaults] = {
    SD15: TrainingDefaults(rank=8, alpha=32.0, learning_rate=1e-4, steps=1000, batch_size=1),
    SDXL: TrainingDefaults(rank=4, alpha=None, learning_rate=5e-5, steps=1000, batch_size=1),
}
TARA_ALIGN_WEIGHT = 1.0


@dataclass(frozen=True)
class CaptionTokens:
    """Where TARA looks in one training caption: the rare word's token positions, and the caption
    (the training caption itself, or it with the rare word replaced by the class word) whose
    class-word tokens give the key-alignment target."""

    rare: tuple[int, ...]
    class_caption: str
    classes: tuple[int, ...]


def caption_tokens(tokenizers: Sequence[Any], caption: str, token: str, class_word: str) -> CaptionTokens:
    """The rare word's positions in ``caption`` and the class word's, in the caption if it holds the
    class word (the paper's "a photo of sks dog"), else in the caption with the rare word replaced by
    the class word (the class word's key in the same sentence)."""
    rare = trigger_positions(tokenizers, caption, [token]).positions
    if not rare:
        raise UserError(f"the rare token {token!r} is not in the training prompt or caption {caption!r}; put it "
                        "in the prompt or in that image's caption file")
    classes = trigger_positions(tokenizers, caption, [class_word]).positions
    if classes:
        if set(rare) & set(classes):
            raise UserError(f"the rare token {token!r} and the class word {class_word!r} share tokens; pick a rare "
                            "token that is not part of the class word")
        return CaptionTokens(tuple(rare), caption, tuple(classes))
    stand_in = re.sub(rf"(?<![\w]){re.escape(token)}(?![\w])", class_word, caption, flags=re.IGNORECASE)
    classes = trigger_positions(tokenizers, stand_in, [class_word]).positions
    if stand_in == caption or not classes:
        raise UserError(f"the rare token {token!r} is not a word of its own within the first tokens of the caption "
                        f"{caption!r}, so the class word {class_word!r} cannot stand in for it; write it as a "
                        "separate word")
    return CaptionTokens(tuple(rare), stand_in, tuple(classes))


@dataclass
class TaraObjective:
    """TARA's additions to DreamBooth LoRA training: token-masked K/V deltas and key alignment,
    both found per training caption."""

    token: str
    class_word: str
    align_weight: float = TARA_ALIGN_WEIGHT
    backend: str = "sdpa"
    name: ClassVar[str] = "tara"

    def __post_init__(self) -> None:
        self.caption_tokens: list[CaptionTokens] = []  # per distinct caption (row of the text states)
        self._rare_masks = torch.zeros(0)  # (captions, tokens)
        self._class_keys: list[torch.Tensor] = []  # per attn2 layer: (captions, key width), no grad
        self._layers: list[Attention] = []
        self._token_masks = LoraTokenMasks()
        self._patches = PatchStack()

    def settings(self) -> dict[str, Any]:
        return {"objective": self.name, "token": self.token, "class_word": self.class_word,
                "align_weight": self.align_weight}

    def prepare(self, model: TrainingModel) -> None:
        """Find the rare and class tokens of every caption, the class keys, and mask the attn2 K/V
        deltas with the processors inference uses (every training row is conditional)."""
        captions, instance = caption_per_row(model)
        self.caption_tokens = [self._tokens(model, caption, needs_token)
                               for caption, needs_token in zip(captions, instance, strict=True)]
        length = model.conditioning.embeds.shape[1]
        self._rare_masks = torch.stack([token_mask(found.rare, length) for found in self.caption_tokens]
                                       ).to(model.device)
        self._layers = attention_modules(model.unet, cross=True)
        self._class_keys = self._encode_class_keys(model, captions)
        install_token_masked_cross_attention(self._patches, model.unet, self._token_masks, self.backend)

    def _tokens(self, model: TrainingModel, caption: str, needs_token: bool) -> CaptionTokens:
        """A regularisation image's caption without the rare word gets no mask and no alignment."""
        if not needs_token and not trigger_positions(model.tokenizers, caption, [self.token]).found:
            return CaptionTokens((), caption, ())
        return caption_tokens(model.tokenizers, caption, self.token, self.class_word)

    def _encode_class_keys(self, model: TrainingModel, captions: Sequence[str]) -> list[torch.Tensor]:
        states = model.conditioning.embeds.clone()
        stand_ins = [row for row, found in enumerate(self.caption_tokens) if found.class_caption != captions[row]]
        if stand_ins:
            states[stand_ins] = text_states(model.pipe, [self.caption_tokens[row].class_caption for row in stand_ins],
                                            model.device).to(states.dtype)
        length = states.shape[1]
        class_masks = torch.stack([token_mask(found.classes, length) for found in self.caption_tokens]).to(model.device)
        return class_keys(self._layers, states, class_masks)

    def start_batch(self, model: TrainingModel, indices: Sequence[int]) -> None:
        """The batch's token masks: row b masks to the rare word's tokens in image b's caption."""
        self._token_masks.masks = {model.adapter: self._rare_masks[model.conditioning.rows(indices)]}

    def losses(self, model: TrainingModel, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """λ·L_align over the batch's captions (the ε-loss is the trainer's)."""
        rows = model.conditioning.rows(indices)
        align = key_alignment_loss(self._layers, model.conditioning.embeds[rows], self._rare_masks[rows],
                                   [keys[rows] for keys in self._class_keys], model.adapter)
        return {"align": self.align_weight * align}

    def metrics(self, model: TrainingModel, indices: Sequence[int]) -> dict[str, float]:
        """The focus L1 on the K/V deltas the mask removes (logged, not optimised)."""
        rows = model.conditioning.rows(indices)
        with torch.no_grad():
            return {"focus": float(unmasked_kv_delta(self._layers, model.conditioning.embeds[rows],
                                                     self._rare_masks[rows], model.adapter))}

    def metadata(self) -> dict[str, str]:
        return {TARA_TOKEN_KEY: self.token, TARA_CLASS_KEY: self.class_word,
                "loracompose.tara_align_weight": repr(float(self.align_weight)), "loracompose.method": self.name}

    def close(self) -> None:
        self._token_masks.masks = {}
        self._patches.unwind()


def caption_per_row(model: TrainingModel) -> tuple[list[str], list[bool]]:
    """The caption of each row of the cached text states (one row per distinct caption), and
    whether a training image (not only regularisation images) has it."""
    rows = model.conditioning.rows(range(model.num_images))
    captions = [""] * int(model.conditioning.embeds.shape[0])
    instance = [False] * len(captions)
    for image, row in enumerate(rows):
        captions[row] = model.captions[image]
        instance[row] |= image < model.num_images - model.prior_images
    return captions, instance


def text_states(pipe: Any, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """(prompts, tokens, width) text states as ``generate`` computes them, on the text encoders'
    own device (the trainer moves them off the GPU), returned on ``device``."""
    encoder = pipe.text_encoder if pipe.text_encoder is not None else pipe.text_encoder_2
    on = encoder.device
    with torch.no_grad():
        if pipe.architecture == SDXL:
            states = [pipe.encode_prompt(prompt, device=on, num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)[0] for prompt in prompts]
        else:
            states = [pipe.encode_prompt(prompt, on, 1, False)[0] for prompt in prompts]
    return torch.cat(states).to(device)


def _attention_context(attn: Attention, context: torch.Tensor) -> torch.Tensor:
    """What attn2's to_k/to_v see: the text states, normalised if the layer does so."""
    return attn.norm_encoder_hidden_states(context) if getattr(attn, "norm_cross", None) else context


def _base(layer: torch.nn.Module) -> torch.nn.Module:
    return layer.get_base_layer() if isinstance(layer, LoraLayer) else layer


def _row_means(mask: torch.Tensor) -> torch.Tensor:
    """(rows, tokens) weights that average each row over its masked tokens."""
    return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


def class_keys(layers: Sequence[Attention], context: torch.Tensor, class_mask: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, (rows, key width): the mean base key W_K^l·c over each row's class-word tokens."""
    weights = _row_means(class_mask)
    with torch.no_grad():
        return [torch.einsum("bt,btd->bd", weights.to(torch.float32),
                             _base(attn.to_k)(_attention_context(attn, context)).float()) for attn in layers]


def key_alignment_loss(layers: Sequence[Attention], context: torch.Tensor, rare_mask: torch.Tensor,
                       class_keys: Sequence[torch.Tensor], adapter: str) -> torch.Tensor:
    """L_align = mean_l mean_rows mean_{j∈rare} mean_d |(W_K^l + Δ_K^l)·c_j − k^l|.

    ``context`` (rows, tokens, width); ``rare_mask`` (rows, tokens) 1 at each row's rare tokens;
    ``class_keys[l]`` (rows, key width) each row's target, the mean base key of its class-word
    tokens (:func:`class_keys`). Every rare token of a row is pulled to that one key. Rows without
    rare tokens (regularisation captions) are left out of the mean.
    """
    weights = _row_means(rare_mask).float()
    rows = (rare_mask.sum(dim=1) > 0).sum().clamp(min=1)
    per_layer = []
    for attn, target in zip(layers, class_keys, strict=True):
        states = _attention_context(attn, context)
        keys = _base(attn.to_k)(states) + adapter_delta(attn.to_k, states, adapter)
        distance = (keys.float() - target[:, None, :].float()).abs().mean(dim=-1)
        per_layer.append((distance * weights).sum() / rows)
    return torch.stack(per_layer).mean()


def unmasked_kv_delta(layers: Sequence[Attention], context: torch.Tensor, rare_mask: torch.Tensor,
                      adapter: str) -> torch.Tensor:
    """mean_l mean_rows mean_{j∉rare} (|Δ_K^l·c_j| + |Δ_V^l·c_j|): the K/V deltas the token mask removes."""
    weights = _row_means(1.0 - rare_mask).float()
    per_layer = []
    for attn in layers:
        states = _attention_context(attn, context)
        size = (adapter_delta(attn.to_k, states, adapter).abs().mean(dim=-1)
                + adapter_delta(attn.to_v, states, adapter).abs().mean(dim=-1))
        per_layer.append((size.float() * weights).sum(dim=1).mean())
    return torch.stack(per_layer).mean()


@dataclass
class TaraTrainingSettings:
    """``train-tara``: a DreamBooth folder, its rare token and class word, and the training settings.

    ``training`` fields left as None take TARA's defaults for the model's architecture
    (:data:`TARA_DEFAULTS`). Each image is trained on its caption file (``name.txt``) where it has
    one, else on ``training.prompt``, which defaults to ``"a photo of <token> <class_word>"``; every
    caption must hold the token (see :func:`caption_tokens` for the class word).
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
    )
    objective = TaraObjective(token, class_word, settings.align_weight)
    return train_lora(training, objective, TARA_DEFAULTS)
