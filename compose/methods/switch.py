"""LoRA Switch (Zhong et al. 2024, baseline; docs/methods/switch.md).

    for step j = 0..T-1:
        active LoRA <- order[ floor(j / tau) mod N ]
        one UNet call with only that LoRA; CFG; scheduler step

The schedule is a pure function of the step index, so every LoRA gets exactly tau steps per turn
(the reference switches in a post-step callback and gives the first LoRA tau+1). The text encoder
runs under the active LoRA too (the reference encodes once with the first LoRA only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Sequence

from loracompose.errors import UserError
from loracompose.lora import LoadedLora
from loracompose.methods.base import ALL_FAMILIES, CompositionMethod, require_loras
from loracompose.pipelines.values import Prediction, Step

if TYPE_CHECKING:
    from loracompose.pipelines.denoiser import Denoiser


def active_index(step: int, num_loras: int, period: int) -> int:
    """Index of the LoRA active at ``step``: blocks of ``period`` steps, cycling in order."""
    return (step // period) % num_loras


def switch_schedule(num_steps: int, num_loras: int, period: int) -> list[int]:
    """Index of the active LoRA at every step."""
    return [active_index(step, num_loras, period) for step in range(num_steps)]


@dataclass
class Switch(CompositionMethod):
    """One LoRA active at a time, switching every ``period`` steps in the given order."""

    name: ClassVar[str] = "switch"
    families: ClassVar[frozenset[str]] = ALL_FAMILIES
    period: int = field(default=5, metadata={"help": "steps per LoRA turn"})

    def check(self, loras: Sequence[LoadedLora]) -> None:
        require_loras(self.name, loras)
        if self.period < 1:
            raise UserError(f"switch period {self.period} must be a positive number of steps (default 5)")

    def active_lora(self, step: Step) -> LoadedLora:
        return self.loras[active_index(step.index, len(self.loras), self.period)]

    def predict(self, run: Denoiser, step: Step, latents) -> Prediction:
        return run.predict(latents, step, [self.branch(self.active_lora(step))])[0]
