"""Oracles shared by the test modules: stock diffusers pipelines and an independent UNet call count."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline


def plain_diffusers(model_dir: Path, sdxl: bool) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The stock diffusers pipeline of a model folder, with DPM-Solver++ (loracompose's default sampler)."""
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(model_dir, **extra)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    return pipe


class UNetCallCounter:
    """An independent count of UNet forwards and the rows they evaluate (and the adapters active at
    each call), via a forward pre-hook."""

    def __init__(self, unet: torch.nn.Module):
        self.calls, self.rows, self.active = 0, 0, []
        self.handle = unet.register_forward_pre_hook(self.count)

    def count(self, unet: torch.nn.Module, args: tuple) -> None:
        self.calls += 1
        self.rows += args[0].shape[0]
        probe = next((m for m in unet.modules() if hasattr(m, "lora_A") and len(m.lora_A)), None)
        self.active.append(tuple(probe.active_adapters) if probe is not None else ())

    def close(self) -> None:
        self.handle.remove()
