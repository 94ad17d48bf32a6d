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

from loracompose.errors import UserError  # noqa: E402
from loracompose.lora import LoadedLora, LoraSpec  # noqa: E402
from loracompose.pipelines import GenerationResult, GenerationStats, load_pipeline  # noqa: E402
from loracompose.methods import (  # noqa: E402
    METHODS, AutoLoRA, CLoRA, CMLoRA, CMLoRASwitch, Composer, Composite, CompositionMethod, Merge, Switch, Tara,
)

__version__ = "0.1.0"

__all__ = [
    "AutoLoRA", "CLoRA", "CMLoRA", "CMLoRASwitch", "METHODS", "Composer", "Composite", "CompositionMethod", "GenerationResult", "GenerationStats", "LoadedLora",
    "LoraSpec", "Merge", "Switch", "Tara", "UserError", "load_pipeline",
]
