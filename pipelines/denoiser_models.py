"""How the Denoiser runs a family's denoiser network on prepared rows: the model-call abstraction.

The :class:`~loracompose.pipelines.denoiser.Denoiser` batches branches into rows and counts calls; it
does not know whether the network is a UNet or a DiT transformer. A :class:`DenoiserModel` does: it
turns the loop's latents into model input (``model_input``) and runs one forward on rows with their
:class:`~loracompose.pipelines.values.Conditioning` (``__call__``).

* :class:`UNetModel`: SD1.5 / SDXL, latents (B, C, H, W), the scheduler scales the input, the text
  embeddings go to cross-attention, SDXL's pooled embedding and time ids in ``added_cond_kwargs``.
* :class:`FluxModel`: FLUX.1, latents packed as image tokens (B, H/2 * W/2, 4C); the timestep is
  divided by 1000, the distilled guidance scale is an input of the model (FLUX.1-dev), text and image
  token positions (``txt_ids``, ``img_ids``) are fixed for the generation.
* :class:`SD3Model`: SD3 / SD3.5, latents (B, C, H, W), patchified inside the transformer.

For DiTs, ``conditioning.embeds`` is the text-token sequence of the joint attention and
``conditioning.added["pooled_projections"]`` the pooled text vector. ``token_grid`` is the image-token
grid (rows, columns) in the order the transformer flattens it (row-major), and ``joint_order`` the
order of the two streams in the joint attention's sequence (FLUX: text then image; SD3: image then
text), for methods that map attention tokens back to image regions and prompt words.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch

from .values import Conditioning


class DenoiserModel(Protocol):
    """One family's denoiser network as the Denoiser calls it."""

    module: torch.nn.Module

    def model_input(self, latents: torch.Tensor, timestep: torch.Tensor, copies: int) -> torch.Tensor:
        """``copies`` copies of the latents stacked on rows, as the model takes them."""
        ...

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning,
                 attention_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
        """One forward on rows (``sample`` rows match the conditioning's); the model output rows."""
        ...


def _stack(latents: torch.Tensor, copies: int) -> torch.Tensor:
    return torch.cat([latents] * copies) if copies > 1 else latents


class UNetModel:
    """SD1.5 / SDXL: a ``UNet2DConditionModel``."""

    def __init__(self, unet: torch.nn.Module, scheduler: Any):
        self.module = unet
        self.scheduler = scheduler

    def model_input(self, latents: torch.Tensor, timestep: torch.Tensor, copies: int) -> torch.Tensor:
        return self.scheduler.scale_model_input(_stack(latents, copies), timestep)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning,
                 attention_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
        return self.module(
            sample,
            timestep,
            encoder_hidden_states=conditioning.embeds,
            added_cond_kwargs=conditioning.added or None,
            cross_attention_kwargs=dict(attention_kwargs) if attention_kwargs else None,
            return_dict=False,
        )[0]


class FluxModel:
    """FLUX.1: a ``FluxTransformer2DModel`` on packed latents.

    Args:
        transformer: the model.
        image_ids: (tokens, 3) positions of the image tokens (diffusers' ``_prepare_latent_image_ids``).
        text_ids: (text tokens, 3) positions of the text tokens (zeros; as many as a call's text tokens).
        guidance_scale: the distilled guidance scale, fed to the model's guidance embedding (FLUX.1-dev);
            ignored by a model without one (FLUX.1-schnell).
        token_grid: image tokens as (rows, columns).
    """

    def __init__(self, transformer: torch.nn.Module, image_ids: torch.Tensor, text_ids: torch.Tensor,
                 guidance_scale: float, token_grid: tuple[int, int]):
        self.module = transformer
        self.image_ids = image_ids
        self.text_ids = text_ids
        self.guidance_scale = float(guidance_scale)
        self.token_grid = token_grid
        self.joint_order = ("text", "image")

    def model_input(self, latents: torch.Tensor, timestep: torch.Tensor, copies: int) -> torch.Tensor:
        return _stack(latents, copies)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning,
                 attention_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
        rows = sample.shape[0]
        guidance = None
        config: Any = self.module.config
        if config.guidance_embeds:
            guidance = torch.full([1], self.guidance_scale, device=sample.device, dtype=torch.float32).expand(rows)
        return self.module(
            hidden_states=sample,
            timestep=timestep.expand(rows).to(sample.dtype) / 1000,
            guidance=guidance,
            pooled_projections=conditioning.added["pooled_projections"],
            encoder_hidden_states=conditioning.embeds,
            txt_ids=self._text_ids(int(conditioning.embeds.shape[1])),
            img_ids=self.image_ids,
            joint_attention_kwargs=dict(attention_kwargs) if attention_kwargs else None,
            return_dict=False,
        )[0]

    def _text_ids(self, tokens: int) -> torch.Tensor:
        """The text tokens' positions: zeros, as many as the conditioning has (a method may lengthen the
        text sequence, e.g. LoRA-Composer's region prompts side by side)."""
        if tokens == self.text_ids.shape[0]:
            return self.text_ids
        return self.text_ids.new_zeros(tokens, self.text_ids.shape[1])


class SD3Model:
    """SD3 / SD3.5: an ``SD3Transformer2DModel`` (MMDiT) on (B, C, H, W) latents."""

    def __init__(self, transformer: torch.nn.Module, token_grid: tuple[int, int]):
        self.module = transformer
        self.token_grid = token_grid
        self.joint_order = ("image", "text")

    def model_input(self, latents: torch.Tensor, timestep: torch.Tensor, copies: int) -> torch.Tensor:
        return _stack(latents, copies)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning,
                 attention_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
        return self.module(
            hidden_states=sample,
            timestep=timestep.expand(sample.shape[0]),
            encoder_hidden_states=conditioning.embeds,
            pooled_projections=conditioning.added["pooled_projections"],
            joint_attention_kwargs=dict(attention_kwargs) if attention_kwargs else None,
            return_dict=False,
        )[0]
