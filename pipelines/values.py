"""The values a composition method and the engine exchange: branches, predictions, conditioning, steps.

Importing this module does not import torch: the tensors inside the values come from the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    import torch

BASE_ROW = "__base__"  # PEFT's adapter name for "no adapter on this row"


@dataclass(frozen=True)
class Branch:
    """A set of LoRAs (adapter name -> strength) under which the model is run, and optionally its own
    prompt (None: the generation's prompt; CLoRA gives every branch its own)."""

    loras: tuple[tuple[str, float], ...] = ()
    prompt: str | None = None

    @classmethod
    def of(cls, weights: Mapping[str, float], prompt: str | None = None) -> Branch:
        return cls(tuple(sorted((name, float(weight)) for name, weight in weights.items())), prompt)

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.loras)

    @property
    def single_adapter(self) -> str | None:
        """The one adapter of a one-LoRA branch, BASE_ROW for the base model, None otherwise."""
        if not self.loras:
            return BASE_ROW
        return self.loras[0][0] if len(self.loras) == 1 else None


BASE = Branch()


@dataclass
class Prediction:
    """Noise prediction of one branch, split into its CFG halves (uncond is None without CFG)."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None

    def guided(self, guidance_scale: float) -> torch.Tensor:
        if self.uncond is None:
            return self.cond
        return self.uncond + guidance_scale * (self.cond - self.uncond)

    @staticmethod
    def mix(predictions: Sequence[Prediction], weights: Sequence[float] | None = None) -> Prediction:
        """Weighted average of predictions (equal weights by default). CFG is linear, so mixing
        before or after guidance is the same."""
        if weights is None:
            weights = [1.0 / len(predictions)] * len(predictions)
        cond = _weighted_sum([p.cond for p in predictions], weights)
        if predictions[0].uncond is None:
            return Prediction(cond=cond)
        return Prediction(cond=cond, uncond=_weighted_sum([p.cfg_uncond() for p in predictions], weights))

    def cfg_uncond(self) -> torch.Tensor:
        """The unconditional half, which a prediction made with CFG has."""
        if self.uncond is None:
            raise ValueError("a prediction without CFG was mixed with predictions made with CFG")
        return self.uncond


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """weights[0] * tensors[0] + weights[1] * tensors[1] + ..., added in that order."""
    total = weights[0] * tensors[0]
    for weight, tensor in zip(weights[1:], tensors[1:]):
        total = total + weight * tensor
    return total


@dataclass
class Conditioning:
    """Text conditioning of one branch, rows laid out [uncond x B, cond x B] (cond only without CFG)."""

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds, time_ids

    def halves(self, num_halves: int) -> list[Conditioning]:
        return [
            Conditioning(chunk, {key: value.chunk(num_halves)[index] for key, value in self.added.items()})
            for index, chunk in enumerate(self.embeds.chunk(num_halves))
        ]

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        import torch

        return Conditioning(
            torch.cat([part.embeds for part in parts]),
            {key: torch.cat([part.added[key] for part in parts]) for key in parts[0].added},
        )


@dataclass(frozen=True)
class Step:
    """One denoising step: its index, the scheduler's timestep and the number of steps."""

    index: int
    timestep: torch.Tensor
    num_steps: int
