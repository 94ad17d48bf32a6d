"""The one denoising loop: every method, SD1.5 and SDXL alike.

A method is anything with the five calls of :class:`SteppedMethod` (``loracompose.methods.base.
CompositionMethod`` is the base class of ours). It drives a :class:`~loracompose.pipelines.denoiser.
Denoiser` (``run``) for its UNet passes and registers every change it makes to the model on
``run.patches``, which the loop unwinds last, whatever failed.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from .denoiser import Denoiser
from .values import Prediction, Step


class SteppedMethod(Protocol):
    """What the loop calls on a composition method."""

    def start(self, run: Denoiser) -> None: ...

    def prepare_latents(self, run: Denoiser, step: Step, latents: torch.Tensor) -> torch.Tensor: ...

    def predict(self, run: Denoiser, step: Step, latents: torch.Tensor) -> Prediction: ...

    def end_step(self, run: Denoiser, step: Step, latents: torch.Tensor) -> None: ...

    def finish(self, run: Denoiser) -> None: ...


def denoise(run: Denoiser, method: SteppedMethod, latents: torch.Tensor,
            progress: Callable[[], None] | None = None) -> torch.Tensor:
    """Denoise ``latents`` with ``method``; ``finish`` and then the patch stack run however it ends."""
    with run.patches:
        try:
            method.start(run)
            for step in run.steps():
                latents = method.prepare_latents(run, step, latents)  # latent updates (CLoRA, Composer)
                with torch.no_grad():
                    prediction = method.predict(run, step, latents)  # UNet passes and how to combine them
                    latents = run.scheduler_step(prediction.guided(run.guidance_scale), step, latents)
                method.end_step(run, step, latents)  # caches, schedules, masks
                if progress is not None:
                    progress()
        finally:
            method.finish(run)
    return latents
