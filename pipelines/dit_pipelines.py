"""FLUX.1 and SD3/SD3.5 pipelines with multi-LoRA composition: diffusers' own pipelines and LoRA
loaders, driven by the same ``generate`` and the same denoising loop as SD1.5/SDXL.

What differs from the UNet families lives in a handful of hooks (see :class:`DiTComposeMixin`): the
flow-matching schedule (diffusers' ``calculate_shift`` / ``retrieve_timesteps``), the initial latents
(FLUX packs them into image tokens), the text conditioning (T5 sequence plus pooled CLIP vector), the
model call (:mod:`~loracompose.pipelines.denoiser_models`) and guidance:

* FLUX.1-dev is guidance-distilled: ``guidance_scale`` is an input of the model (its guidance
  embedding), every image is one row, and no CFG is applied. ``true_cfg_scale`` > 1 adds real CFG on
  top (two rows per image), as diffusers' ``FluxPipeline`` does.
* SD3 uses ordinary CFG: ``guidance_scale`` > 1 gives two rows per image, [uncond, cond].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from loracompose.errors import UserError
from loracompose.formats import load_lora_file
from loracompose.lora import ARCHITECTURE_NAMES, FLUX, SD3, LoadedLora
from loracompose.validation import finite_number

from .compose_pipeline import ComposeMixin
from .denoiser_models import FluxModel, SD3Model
from .values import Conditioning

FLOW_SCHEDULER = "euler"  # the flow-matching Euler sampler the DiTs are distilled / trained for


class DiTComposeMixin(ComposeMixin):
    """What FLUX and SD3 share on top of :class:`ComposeMixin`: the transformer as the denoiser,
    diffusers-format LoRAs through diffusers' loader, flow-matching sampling, (latent / scale + shift)."""

    if TYPE_CHECKING:  # what the diffusers pipeline class this mixin is combined with provides
        transformer: Any  # FluxTransformer2DModel / SD3Transformer2DModel
        default_sample_size: int

    default_scheduler = FLOW_SCHEDULER
    max_text_tokens = 512  # T5 tokens of the prompt (diffusers' default for the family)
    default_max_shift = 1.15  # calculate_shift's max_shift where the scheduler config has none

    @property
    def family_name(self) -> str:
        return ARCHITECTURE_NAMES[self.architecture]

    @property
    def denoiser_module(self) -> torch.nn.Module:
        return self.transformer

    @property
    def denoiser_name(self) -> str:
        return "transformer"

    @property
    def native_size(self) -> int:
        """The image side (pixels) the model was trained at: 1024 on the real FLUX.1 / SD3 checkpoints."""
        return int(self.default_sample_size * self.vae_scale_factor)

    # ------------------------------------------------------------------ LoRAs
    def _load_lora_file(self, lora: LoadedLora) -> None:
        """The one converter (loracompose.formats): diffusers/PEFT, ai-toolkit, kohya, ComfyUI/BFL, XLabs
        and OneTrainer files as exact PEFT LoRA layers on the transformer and text encoders."""
        if lora.block_weights is not None:
            raise UserError(f"LoRA {lora.path}: per-block weights are not supported on {self.family_name} yet; "
                            "give one strength")
        if lora.text_encoder_scale != 1.0 and lora.has_text_encoder:
            raise UserError(f"LoRA {lora.path}: a separate text-encoder strength is not supported on "
                            f"{self.family_name} yet; give one strength")
        load_lora_file(self, lora.path, lora.name)

    # ------------------------------------------------------------------ checks
    def _check_scheduler(self, name: str) -> str:
        if name != FLOW_SCHEDULER:
            raise UserError(f"scheduler {name} does not support {self.family_name} yet; use {FLOW_SCHEDULER} "
                            "(flow-matching Euler)")
        return name

    def _latent_side(self, pixels: int, label: str) -> int:
        """Latent rows/columns for an image side; the side must split into whole image tokens."""
        multiple = self.vae_scale_factor * self.token_patch
        if pixels % multiple:
            raise UserError(f"{label} {pixels} is not a multiple of {multiple} on {self.family_name}; "
                            f"use e.g. {max(multiple, pixels - pixels % multiple)}")
        return pixels // self.vae_scale_factor

    @property
    def token_patch(self) -> int:
        """Latent pixels per image-token side."""
        raise NotImplementedError

    # ------------------------------------------------------------------ sampling
    def _flow_schedule(self, scheduler: Any, steps: int, image_tokens: int, device: torch.device,
                       sigmas: Any = None, always_shift: bool = False) -> None:
        """Set the timesteps as diffusers' pipeline does: ``mu`` from the image-token count (used by
        schedulers with resolution-dependent shifting), ``sigmas`` if given."""
        config = scheduler.config
        kwargs = {}
        if always_shift or config.get("use_dynamic_shifting", False):
            kwargs["mu"] = calculate_shift(image_tokens, config.get("base_image_seq_len", 256),
                                           config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                           config.get("max_shift", self.default_max_shift))
        retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, **kwargs)

    def _fresh_scheduler(self) -> Any:
        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)

    def _text_length(self, tokenizer: Any) -> int:
        return min(self.max_text_tokens, int(tokenizer.model_max_length))

    def _generation_bytes(self, width: int, height: int, num_images: int, rows_per_image: int) -> int:
        """A rough lower bound of the peak activations: a dozen (tokens x width) tensors per row of one
        transformer call, or the VAE decoder's last levels, whichever is larger."""
        element = self.transformer.dtype.itemsize
        tokens = (height // self.vae_scale_factor // self.token_patch) * (width // self.vae_scale_factor //
                                                                            self.token_patch)
        config = self.transformer.config
        inner = int(config.num_attention_heads * config.attention_head_dim)
        transformer = 12 * rows_per_image * num_images * (tokens + self.max_text_tokens) * inner * element
        vae = 6 * num_images * height * width * int(self.vae.config.block_out_channels[0]) * self.vae.dtype.itemsize
        return max(transformer, vae)

    def _unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        return latents / config.scaling_factor + (config.shift_factor or 0.0)


class LoraComposeFluxPipeline(DiTComposeMixin, FluxPipeline):
    """FLUX.1 pipeline with multi-LoRA composition (distilled guidance; optional true CFG)."""

    architecture = FLUX
    text_components = ("text_encoder", "text_encoder_2")
    default_guidance_scale = 3.5

    @property
    def token_patch(self) -> int:
        return 2  # FLUX packs 2x2 latent pixels into one token

    def _cfg(self, guidance_scale: float, true_cfg_scale: float) -> tuple[float, bool]:
        return true_cfg_scale, true_cfg_scale > 1.0

    def _check_true_cfg(self, true_cfg_scale: float) -> float:
        return finite_number(true_cfg_scale, "true_cfg_scale", low=0.0)

    def _text_tokenizers(self) -> list[Any]:
        return [self.tokenizer_2]  # the joint attention's text tokens are T5's; CLIP gives the pooled vector

    def _start_sampling(self, scheduler_name, steps, generators, height, width, guidance_scale, device):
        rows, columns = self._latent_side(height, "height"), self._latent_side(width, "width")
        channels = self.transformer.config.in_channels // 4
        dtype = self.transformer.dtype
        latents = randn_tensor((len(generators), channels, rows, columns), generator=generators, device=device,
                               dtype=dtype)
        latents = self._pack_latents(latents, len(generators), channels, rows, columns)
        image_ids = self._prepare_latent_image_ids(len(generators), rows // 2, columns // 2, device, dtype)
        text_ids = torch.zeros(self._text_length(self.tokenizer_2), 3, device=device, dtype=dtype)
        scheduler = self._fresh_scheduler()
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        self._flow_schedule(scheduler, steps, latents.shape[1], device, sigmas=sigmas, always_shift=True)
        scheduler.set_begin_index(0)
        model = FluxModel(self.transformer, image_ids, text_ids, guidance_scale, (rows // 2, columns // 2))
        return scheduler, latents, model

    def _encode_conditioning(self, prompt, negative_prompt, num_images, do_cfg, height, width, device) -> Conditioning:
        length = self._text_length(self.tokenizer_2)

        def encode(text: str) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, pooled, _ = self.encode_prompt(prompt=text, prompt_2=None, device=device,
                                                   num_images_per_prompt=num_images, max_sequence_length=length)
            return embeds, pooled

        with torch.no_grad():
            embeds, pooled = encode(prompt)
            if not do_cfg:
                return Conditioning(embeds, {"pooled_projections": pooled})
            negative, negative_pooled = encode(negative_prompt or "")
        return Conditioning(torch.cat([negative, embeds]),
                            {"pooled_projections": torch.cat([negative_pooled, pooled])})

    def _image_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self._unpack_latents(latents, height, width, self.vae_scale_factor)


class LoraComposeSD3Pipeline(DiTComposeMixin, StableDiffusion3Pipeline):
    """SD3 / SD3.5 pipeline with multi-LoRA composition (ordinary CFG)."""

    architecture = SD3
    text_components = ("text_encoder", "text_encoder_2", "text_encoder_3")
    default_guidance_scale = 7.0
    max_text_tokens = 256
    default_max_shift = 1.16

    @property
    def token_patch(self) -> int:
        return int(self.transformer.config.patch_size)

    def _text_tokenizers(self) -> list[Any]:
        # the text sequence: 77 CLIP tokens (CLIP-L and CLIP-G side by side in channels), then T5's
        return [self.tokenizer, self.tokenizer_2, self.tokenizer_3]

    def _start_sampling(self, scheduler_name, steps, generators, height, width, guidance_scale, device):
        rows, columns = self._latent_side(height, "height"), self._latent_side(width, "width")
        shape = (len(generators), self.transformer.config.in_channels, rows, columns)
        latents = randn_tensor(shape, generator=generators, device=device, dtype=self.transformer.dtype)
        patch = self.token_patch
        scheduler = self._fresh_scheduler()
        self._flow_schedule(scheduler, steps, (rows // patch) * (columns // patch), device)
        return scheduler, latents, SD3Model(self.transformer, (rows // patch, columns // patch))

    def _encode_conditioning(self, prompt, negative_prompt, num_images, do_cfg, height, width, device) -> Conditioning:
        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = self.encode_prompt(
                prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=num_images,
                do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt,
                max_sequence_length=self._text_length(self.tokenizer_3),
            )
        if not do_cfg:
            return Conditioning(embeds, {"pooled_projections": pooled})
        return Conditioning(torch.cat([negative, embeds]),
                            {"pooled_projections": torch.cat([negative_pooled, pooled])})
