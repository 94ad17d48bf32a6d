"""The method protocol: what the one denoising loop asks a composition method each step.

A method is a small strategy object. ``generate`` calls, once per generation:

* ``bind(loras)`` with the checked LoRAs in the user's order;
* ``prepare(pipe, loras)``: work on the pipeline before generating (CMLoRA profiles its LoRAs);

then the loop (``loracompose.pipelines.loop.denoise``) calls:

* ``start(run)`` before the first step: install attention processors, build caches;
* ``prepare_latents(run, step, latents)``: optional latent update before the step (with gradients
  if the method asks for them: CLoRA, LoRA-Composer);
* ``predict(run, step, latents)``: which branches (LoRA sets at strengths) to run and how to combine
  their noise predictions into one :class:`Prediction` (the loop applies CFG);
* ``end_step(run, step, latents)``: bookkeeping between steps (schedules, caches, masks);
* ``finish(run)``: free per-generation state; runs whenever ``start`` was called, even if it or a
  step failed (so it must cope with a half-done ``start``).

``run`` is a :class:`~loracompose.pipelines.denoiser.Denoiser`: ``run.predict(latents, step, branches)``
returns one Prediction per branch (one batched UNet call where possible), ``run.stats`` counts calls.
Every change a method makes to the model goes through ``run.patches``
(:class:`~loracompose.pipelines.patches.PatchStack`: processors, hooks, replaced forwards, fused
weights), which the loop undoes after ``finish`` however the generation ended; methods never
restore the model by hand.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

from loracompose.errors import UserError
from loracompose.lora import FLUX, SD3, SD15, SDXL, LoadedLora
from loracompose.pipelines.values import Branch, Prediction, Step

if TYPE_CHECKING:
    import torch

    from loracompose.pipelines.denoiser import Denoiser


# Every family the engine runs: the UNet families and the DiTs (FLUX.1, SD3/SD3.5).
ALL_FAMILIES = frozenset({SD15, SDXL, FLUX, SD3})


@dataclass
class CompositionMethod:
    """Base class of all methods; subclasses are dataclasses whose fields are their settings."""

    name: ClassVar[str] = ""
    # The model families (loracompose.lora architecture ids) the method runs on; generate refuses others.
    families: ClassVar[frozenset[str]] = frozenset({SD15, SDXL})
    # Why the method does not run on the other families yet (the refusal's last words), if it says.
    not_ported_why: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.loras: list[LoadedLora] = []

    # -- lifecycle -------------------------------------------------------------------------
    def bind(self, loras: Sequence[LoadedLora]) -> None:
        """Receive the generation's LoRAs (user order). Validate settings against them here."""
        self.loras = list(loras)
        self.check(self.loras)

    def check(self, loras: Sequence[LoadedLora]) -> None:
        """Raise UserError if the settings do not fit these LoRAs."""

    def prepare(self, pipe: Any, loras: Sequence[LoadedLora]) -> None:
        """Work on the pipeline before the generation (after :meth:`bind`), e.g. profiling the LoRAs.
        It may run generations of its own on ``pipe``."""

    def start(self, run: Denoiser) -> None:
        """Before the first step: register model patches on ``run.patches``, build caches."""

    def prepare_latents(self, run: Denoiser, step: Step, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def predict(self, run: Denoiser, step: Step, latents: torch.Tensor) -> Prediction:
        raise NotImplementedError

    def end_step(self, run: Denoiser, step: Step, latents: torch.Tensor) -> None:
        pass

    def finish(self, run: Denoiser) -> None:
        """After the last step (or a failure): free per-generation state. Patches are undone by the loop."""

    # -- helpers ---------------------------------------------------------------------------
    def branch(self, *loras: LoadedLora, weights: Sequence[float] | None = None) -> Branch:
        """A branch running these LoRAs at their strengths (or the given ones)."""
        weights = weights if weights is not None else [lora.weight for lora in loras]
        return Branch.of({lora.name: weight for lora, weight in zip(loras, weights)})

    def settings(self) -> dict[str, Any]:
        """The method's settings, for sidecars and reports."""
        return {"name": self.name, **{f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def require_loras(method: str, loras: Sequence[LoadedLora], minimum: int = 1) -> None:
    if len(loras) < minimum:
        raise UserError(f"method {method} needs at least {minimum} LoRA(s); pass them with --lora PATH[:WEIGHT]")


@contextmanager
def frozen_parameters(module: torch.nn.Module) -> Iterator[None]:
    """The module's parameters stop requiring grad inside the block: gradients reach the latents
    only, and autograd keeps nothing for weight gradients."""
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
