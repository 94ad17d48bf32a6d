"""Our diffusers pipelines (SD1.5, SDXL) and the one denoising loop."""

from .compose_pipeline import ComposeMixin, GenerationResult, LoraComposeSDPipeline, LoraComposeSDXLPipeline
from .loading import load_pipeline
from .loop import BASE, Branch, Conditioning, Denoiser, GenerationStats, Prediction, Step, denoise

__all__ = [
    "BASE", "Branch", "ComposeMixin", "Conditioning", "Denoiser", "GenerationResult", "GenerationStats",
    "LoraComposeSDPipeline", "LoraComposeSDXLPipeline", "Prediction", "Step", "denoise", "load_pipeline",
]
