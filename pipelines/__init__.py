"""Our diffusers pipelines (SD1.5, SDXL, FLUX.1, SD3) and the one denoising loop.

The names below are imported on first use (PEP 562), so importing a light submodule such as
``loracompose.pipelines.values`` does not load diffusers.
"""

from typing import TYPE_CHECKING

from loracompose.lazy import lazy_exports

if TYPE_CHECKING:
    from .compose_pipeline import ComposeMixin, GenerationResult, LoraComposeSDPipeline, LoraComposeSDXLPipeline
    from .loading import load_pipeline
    from .denoiser import Denoiser
    from .dit_pipelines import LoraComposeFluxPipeline, LoraComposeSD3Pipeline
    from .loop import denoise
    from .stats import GenerationStats
    from .values import BASE, Branch, Conditioning, Prediction, Step

__all__ = [
    "BASE", "Branch", "ComposeMixin", "Conditioning", "Denoiser", "GenerationResult", "GenerationStats",
    "LoraComposeFluxPipeline", "LoraComposeSD3Pipeline", "LoraComposeSDPipeline", "LoraComposeSDXLPipeline",
    "Prediction", "Step", "denoise", "load_pipeline",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["ComposeMixin", "GenerationResult", "LoraComposeSDPipeline", "LoraComposeSDXLPipeline"],
                    f"{__name__}.compose_pipeline"),
    "load_pipeline": f"{__name__}.loading",
    **dict.fromkeys(["BASE", "Branch", "Conditioning", "Prediction", "Step"], f"{__name__}.values"),
    "Denoiser": f"{__name__}.denoiser",
    **dict.fromkeys(["LoraComposeFluxPipeline", "LoraComposeSD3Pipeline"], f"{__name__}.dit_pipelines"),
    "GenerationStats": f"{__name__}.stats",
    "denoise": f"{__name__}.loop",
})
