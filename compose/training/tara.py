"""TARA training: a DreamBooth LoRA with token-masked cross-attention K/V deltas and key alignment.

Inference is :mod:`loracompose.methods.tara`; the DreamBooth loop itself is :mod:`loracompose.training.trainer`::

    prompt <- "a photo of <rare> <class>";  c <- frozen text encoder(s)(prompt)
    m <- mask of <rare>'s tokens;  R, C <- token positions of <rare> and <class>
    LoRA (rank r, alpha α) on to_q/k/v/out.0 of every attention; attn2 K/V deltas multiplied by m
    for each step:
        L_ε     <- ‖ε − UNet(x_t, t, c)‖²                               (DreamBooth, no prior loss)
        L_align <- mean_l mean_{j∈R} mean_d |(W_K^l + Δ_K^l)·c_j − mean_{k∈C} W_K^l·c_k|
        AdamW step on L_ε + λ·L_align
        focus   <- mean_l mean_{j∉R} (|Δ_K^l·c_j| + |Δ_V^l·c_j|)       (logged, not optimised)

Every rare token (a rare word may be several BPE tokens) is pulled to the *mean* base key of the class
word's tokens; the K/V deltas are masked by the same processors inference installs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Sequence

import torch
from diffusers.models.attention_processor import Attention
from peft.tuners.lora import LoraLayer

from loracompose.attention import LoraTokenMasks
from loracompose.attention.lora_deltas import adapter_delta
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
        self._patches = PatchStack()

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
        install_token_masked_cross_attention(self._patches, model.unet, LoraTokenMasks({model.adapter: mask}),
                                             self.backend)

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
        self._patches.unwind()


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


def _attention_context(attn: Attention, context: torch.Tensor) -> torch.Tensor:
    """What attn2's to_k/to_v see: the text states, normalised if the layer does so."""
    return attn.norm_encoder_hidden_states(context) if getattr(attn, "norm_cross", None) else context


def _base(layer: torch.nn.Module) -> torch.nn.Module:
    return layer.get_base_layer() if isinstance(layer, LoraLayer) else layer


def key_alignment_loss(layers: Sequence[Attention], context: torch.Tensor, rare_positions: Sequence[int],
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


def unmasked_kv_delta(layers: Sequence[Attention], context: torch.Tensor, rare_positions: Sequence[int],
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
