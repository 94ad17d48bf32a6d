"""LoRA Merge (Zhong et al. 2024, baseline; docs/methods/merge.md).

    activate all LoRAs together, each at its strength
    for each step: one UNet call; CFG; scheduler step

Per adapted layer y = W·x + Σ_i w_i·(α_i/r_i)·B_i·A_i·x: the deltas are *summed* (the reference's
choice). ``combine="mean"`` divides each strength by N instead. ``fuse=True`` folds the weighted
deltas into the UNet weights once (no low-rank products per step); the weights are copied back from
a saved copy at the end (``run.patches``). The text encoder always runs unfused (it runs once per
generation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Sequence

from loracompose.errors import UserError
from loracompose.lora import LoadedLora
from loracompose.methods.base import ALL_FAMILIES, CompositionMethod
from loracompose.pipelines.values import Branch, Prediction, Step

if TYPE_CHECKING:
    from loracompose.pipelines.denoiser import Denoiser


@dataclass
class Merge(CompositionMethod):
    """All LoRAs active at once in a single UNet pass per step."""

    name: ClassVar[str] = "merge"
    families: ClassVar[frozenset[str]] = ALL_FAMILIES
    combine: str = field(default="sum", metadata={
        "choices": ("sum", "mean"), "help": "sum the LoRAs' deltas, or average them (strengths divided by N)"})
    fuse: bool = field(default=False, metadata={
        "flags": ("--fuse",),
        "help": "fold the weighted deltas into the UNet weights while generating (faster per step)"})

    def check(self, loras: Sequence[LoadedLora]) -> None:
        if self.combine not in ("sum", "mean"):
            raise UserError(f"merge combine={self.combine!r} is not known; use 'sum' or 'mean'")

    def merged_branch(self) -> Branch:
        divisor = len(self.loras) if self.combine == "mean" and self.loras else 1
        return self.branch(*self.loras, weights=[lora.weight / divisor for lora in self.loras])

    def start(self, run: Denoiser) -> None:
        if self.fuse and self.loras:
            weights = self.merged_branch().weights
            run.adapters.activate(weights, components=["unet"])
            run.patches.fuse(run.adapters.layers.get("unet", []), list(weights))

    def predict(self, run: Denoiser, step: Step, latents) -> Prediction:
        return run.predict(latents, step, [self.merged_branch()])[0]
