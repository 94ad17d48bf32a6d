"""LoRA Composite (Zhong et al. 2024, baseline; docs/methods/composite.md).

    for each step:
        for each LoRA i: (u_i, c_i) <- UNet with only LoRA i          # one batched call, 2N rows
        eps <- sum_i m_i·u_i + s·(sum_i m_i·c_i - sum_i m_i·u_i)      # m_i = 1/N by default
        scheduler step

Each LoRA runs at its own strength. The N branches run as ONE UNet call with per-row adapters
(PEFT mixed batch); the Denoiser falls back to one call per LoRA when that is impossible (fused
LoRAs, a row cap) and records which ran in ``stats.execution``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Sequence

from loracompose.lora import LoadedLora
from loracompose.methods.base import ALL_FAMILIES, CompositionMethod, require_loras
from loracompose.pipelines.values import Prediction, Step
from loracompose.validation import check_mixing_weights

if TYPE_CHECKING:
    from loracompose.pipelines.denoiser import Denoiser


@dataclass
class Composite(CompositionMethod):
    """Average of the per-LoRA guided noise predictions."""

    name: ClassVar[str] = "composite"
    families: ClassVar[frozenset[str]] = ALL_FAMILIES
    mixing_weights: tuple[float, ...] | None = field(default=None, metadata={
        "flags": ("--mixing-weights",), "help": "one mixing weight per LoRA (normalised to sum 1; default: equal)"})
    batched: bool = field(default=True, metadata={
        "flag_values": {"--sequential": False}, "help": "run the LoRAs' branches as one batched UNet call"})

    def check(self, loras: Sequence[LoadedLora]) -> None:
        require_loras(self.name, loras)
        if self.mixing_weights is not None:  # finite, non-negative, a positive sum, one per LoRA
            check_mixing_weights(self.mixing_weights, "composite mixing weights", len(loras))

    def normalised_mixing_weights(self) -> list[float]:
        weights = self.mixing_weights or [1.0] * len(self.loras)
        total = float(sum(weights))
        return [w / total for w in weights]

    def predict(self, run: Denoiser, step: Step, latents) -> Prediction:
        branches = [self.branch(lora) for lora in self.loras]
        predictions = run.predict(latents, step, branches, batch=self.batched)
        return Prediction.mix(predictions, self.normalised_mixing_weights())
