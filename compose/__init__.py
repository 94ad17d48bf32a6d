"""loracompose: training-free multi-concept LoRA composition for Stable Diffusion (SD1.5, SDXL).

    from loracompose import load_pipeline, LoraSpec, Composite
    pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    result = pipe.generate("a girl in a park", [LoraSpec("girl.safetensors", 0.8)], Composite())
"""

import os

# Idle OpenMP threads sleep instead of spinning (read once, when torch loads; an explicit setting
# wins). With spinning workers, a CPU generation on a machine where another process holds a core ran
# ~50x slower here (196 s instead of 4 s for the 30-step demo).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from typing import TYPE_CHECKING

from loracompose.errors import UserError
from loracompose.lazy import lazy_exports

if TYPE_CHECKING:
    from loracompose.lora import LoadedLora, LoraSpec
    from loracompose.methods import (
        METHODS, AutoLoRA, CLoRA, CMLoRA, CMLoRASwitch, Composer, Composite, CompositionMethod, Merge, Switch, Tara,
    )
    from loracompose.pipelines import GenerationResult, GenerationStats, load_pipeline

# Everything but UserError is imported on first use, so `import loracompose` (and `loracompose --help`)
# loads no model stack.
__getattr__, __dir__ = lazy_exports(__name__, {
    "LoadedLora": "loracompose.lora", "LoraSpec": "loracompose.lora",
    **dict.fromkeys(["GenerationResult", "GenerationStats", "load_pipeline"], "loracompose.pipelines"),
    **dict.fromkeys(["METHODS", "AutoLoRA", "CLoRA", "CMLoRA", "CMLoRASwitch", "Composer", "Composite",
                     "CompositionMethod", "Merge", "Switch", "Tara"], "loracompose.methods"),
})

__version__ = "0.1.0"

__all__ = [
    "AutoLoRA", "CLoRA", "CMLoRA", "CMLoRASwitch", "METHODS", "Composer", "Composite", "CompositionMethod",
    "GenerationResult", "GenerationStats", "LoadedLora", "LoraSpec", "Merge", "Switch", "Tara", "UserError",
    "load_pipeline",
]
