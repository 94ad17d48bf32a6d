"""The :class:`Denoiser`: what a composition method drives at each step of the loop.

A method never sees the scheduler or the prompt encoder. It asks the Denoiser for noise predictions of
*branches* (a branch is a set of LoRAs at strengths, applied to the text encoder and the UNet alike)
and combines them. The Denoiser runs several branches as one UNet call with per-row adapters where it
can, else one call per branch (:meth:`Denoiser.branch_passes`, the one place that decides), and counts
every call. A method that needs another kind of UNet pass (a partial one, one that keeps features)
passes its own ``unet_pass``; it gets a :class:`BranchBatch` and the same batching for free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .adapters import AdapterController
from .denoiser_models import DenoiserModel, UNetModel
from .patches import PatchStack
from .stats import GenerationStats
from .values import Branch, Conditioning, Prediction, Step

EXECUTION_ORDER = ("batched", "sequential", "single")


@dataclass
class BranchBatch:
    """The rows of one UNet call over some of the branches asked for, laid out [CFG half][branch][image].

    ``branches`` are the indices (into the branches asked for) this call covers: all of them when
    batched, one when each branch runs alone. ``sample`` is the scaled model input.
    """

    sample: torch.Tensor
    timestep: torch.Tensor
    conditioning: Conditioning
    branches: list[int]
    num_halves: int
    cross_attention_kwargs: Mapping[str, Any] | None = None

    def rows(self, per_branch: Sequence[torch.Tensor]) -> torch.Tensor:
        """This call's rows from one tensor per covered branch, each with rows [half][image]."""
        halves = [rows.chunk(self.num_halves) for rows in per_branch]
        return torch.cat([halves[b][h] for h in range(self.num_halves) for b in range(len(per_branch))])

    def split(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of :meth:`rows`: per covered branch, its rows [half][image]."""
        halves = [half.chunk(len(self.branches)) for half in rows.chunk(self.num_halves)]
        return [torch.cat([half[b] for half in halves]) for b in range(len(self.branches))]


UNetPass = Callable[[BranchBatch], torch.Tensor]


class Denoiser:
    """Denoiser-model passes for branches, with batching, conditioning and counting; owner of the model
    patches of one generation (:attr:`patches`).

    ``unet`` is the denoiser network whatever the family (a UNet on SD1.5/SDXL, the transformer on
    FLUX/SD3): methods reach its attention modules there. ``model`` says how to call it on rows
    (:mod:`~loracompose.pipelines.denoiser_models`; default: a UNet). The stats' ``unet_calls`` and
    ``unet_rows`` count calls and rows of that network (``model_calls`` / ``model_rows`` alias them).
    """

    def __init__(
        self,
        *,
        unet: torch.nn.Module,
        scheduler: Any,
        timesteps: torch.Tensor,
        encode: Callable[[Branch], Conditioning],
        adapters: AdapterController,
        guidance_scale: float,
        do_cfg: bool,
        batch_size: int,
        extra_step_kwargs: Mapping[str, Any],
        max_batch_rows: int | None = None,
        allow_batching: bool = True,
        stats: GenerationStats | None = None,
        prompt: str | None = None,
        base_prompt: str | None = None,
        tokenizers: Sequence[Any] | None = None,
        model: DenoiserModel | None = None,
    ):
        self.unet = unet
        self.model = model if model is not None else UNetModel(unet, scheduler)
        self.scheduler = scheduler
        self.timesteps = timesteps
        self.adapters = adapters
        self.guidance_scale = guidance_scale
        self.do_cfg = do_cfg
        self.batch_size = batch_size
        self.extra_step_kwargs = dict(extra_step_kwargs)
        self.max_batch_rows = max_batch_rows
        self.allow_batching = allow_batching
        self.stats = stats or GenerationStats()
        self.prompt = prompt  # the prompt as encoded (after trigger words were appended)
        self.base_prompt = base_prompt if base_prompt is not None else prompt  # the user's prompt as given
        # SD1.5: one, SDXL: two; DiTs: those of the text-token sequence (FLUX: T5; SD3: CLIP-L, CLIP-G, T5)
        self.tokenizers = None if tokenizers is None else list(tokenizers)
        self.patches = PatchStack()
        self.patches.on_unwind(lambda: adapters.activate({}))  # unwound last: no LoRA left active
        self._encode = encode
        self._conditioning: dict[Branch, Conditioning] = {}
        self._executions: set[str] = set()

    # ----------------------------------------------------------------- steps and scheduler
    @property
    def num_halves(self) -> int:
        return 2 if self.do_cfg else 1

    def steps(self) -> Iterator[Step]:
        for index, timestep in enumerate(self.timesteps):
            yield Step(index, timestep, len(self.timesteps))

    def scheduler_step(self, noise: torch.Tensor, step: Step, latents: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(noise, step.timestep, latents, **self.extra_step_kwargs, return_dict=False)[0]

    def model_input(self, latents: torch.Tensor, step: Step, copies: int) -> torch.Tensor:
        return self.model.model_input(latents, step.timestep, copies)

    # ----------------------------------------------------------------- conditioning
    def conditioning(self, branch: Branch) -> Conditioning:
        """Prompt embeddings under the branch's LoRAs (text encoder side), computed once per branch."""
        if branch not in self._conditioning:
            self._conditioning[branch] = self._encode(branch)
            self.stats.text_encoder_calls += 1
        return self._conditioning[branch]

    # ----------------------------------------------------------------- UNet passes
    def predict(
        self,
        latents: torch.Tensor,
        step: Step,
        branches: Sequence[Branch],
        *,
        cross_attention_kwargs: Mapping[str, Any] | None = None,
        batch: bool = True,
        unet_pass: UNetPass | None = None,
    ) -> list[Prediction]:
        """Noise predictions of each branch at this step (see :meth:`branch_passes`)."""
        noise = self.branch_passes(latents, step, branches, cross_attention_kwargs=cross_attention_kwargs,
                                   batch=batch, unet_pass=unet_pass)
        return [self.prediction(rows) for rows in noise]

    def branch_passes(
        self,
        latents: torch.Tensor,
        step: Step,
        branches: Sequence[Branch],
        *,
        conditional_only: bool = False,
        cross_attention_kwargs: Mapping[str, Any] | None = None,
        batch: bool = True,
        unet_pass: UNetPass | None = None,
    ) -> list[torch.Tensor]:
        """Each branch's UNet output rows [CFG half][image] at this step: one call with per-row
        adapters when every branch has at most one LoRA (and ``batch``), else one call per branch.

        ``conditional_only``: the conditional rows alone (for objectives that read nothing else), at
        half the rows. ``unet_pass`` runs each call (default :meth:`unet_pass`, a full forward).
        Differentiable with respect to ``latents`` when grad is enabled.
        """
        halves = 1 if conditional_only else self.num_halves
        run = unet_pass or self.unet_pass
        reason = self.batching_blocked(branches, batch, halves=halves)
        if reason is None:
            self._note_execution("batched", "")
            batch_rows, row_adapters = self._batched_rows(latents, step, branches, halves, cross_attention_kwargs)
            with self.adapters.rows("unet", row_adapters):
                return batch_rows.split(run(batch_rows))
        self._note_execution("sequential" if len(branches) > 1 else "single", reason if len(branches) > 1 else "")
        outputs = []
        for index, branch in enumerate(branches):
            self.adapters.activate(branch.weights, components=["unet"])
            conditioning = self._halves(branch, 1)[0] if halves == 1 else self.conditioning(branch)
            outputs.append(run(BranchBatch(self.model_input(latents, step, halves), step.timestep, conditioning,
                                           [index], halves, cross_attention_kwargs)))
        return outputs

    def _batched_rows(self, latents: torch.Tensor, step: Step, branches: Sequence[Branch], halves: int,
                      cross_attention_kwargs: Mapping[str, Any] | None) -> tuple[BranchBatch, list[str]]:
        """The branches' strengths set on the UNet; one call's rows [half][branch][image] and each row's adapter."""
        strengths = {name: weight for branch in branches for name, weight in branch.loras}
        self.adapters.set_weights(strengths, components=["unet"])
        per_branch = [self._halves(branch, halves) for branch in branches]
        conditioning = Conditioning.cat([per_branch[b][h] for h in range(halves) for b in range(len(branches))])
        adapters = [_batched_adapter(branch) for branch in branches]
        row_adapters = [adapter for _ in range(halves) for adapter in adapters for _ in range(self.batch_size)]
        rows = BranchBatch(self.model_input(latents, step, halves * len(branches)), step.timestep, conditioning,
                           list(range(len(branches))), halves, cross_attention_kwargs)
        return rows, row_adapters

    def _halves(self, branch: Branch, halves: int) -> list[Conditioning]:
        """The branch's conditioning per CFG half: both, or the conditional one alone (``halves`` 1)."""
        return self.conditioning(branch).halves(self.num_halves)[-halves:]

    def prediction(self, rows: torch.Tensor) -> Prediction:
        """One branch's rows [CFG half][image] as a :class:`Prediction`."""
        if not self.do_cfg:
            return Prediction(cond=rows)
        uncond, cond = rows.chunk(2)
        return Prediction(cond=cond, uncond=uncond)

    def batching_blocked(
        self, branches: Sequence[Branch], batch: bool = True, *, halves: int | None = None
    ) -> str | None:
        """Why these branches cannot share one call, or None if they can (``halves``: CFG halves per
        branch in that call, default all)."""
        if len(branches) < 2:
            return "one branch"
        if not (batch and self.allow_batching):
            return "batching turned off in the settings"
        if any(branch.single_adapter is None for branch in branches):
            return "a branch has several LoRAs (per-row adapters take one each)"
        strengths: dict[str, float] = {}
        for name, weight in (pair for branch in branches for pair in branch.loras):
            if strengths.setdefault(name, weight) != weight:
                return f"LoRA {name} runs at two strengths in one step"
        if self.adapters.any_merged():
            return "LoRAs are fused into the weights"
        rows = len(branches) * (halves or self.num_halves) * self.batch_size
        if self.max_batch_rows is not None and rows > self.max_batch_rows:
            return f"{rows} rows exceed the memory cap of {self.max_batch_rows}"
        return None

    def unet_pass(self, batch: BranchBatch) -> torch.Tensor:
        """The default pass of :meth:`branch_passes`: one full UNet forward on the batch's rows."""
        return self.run_unet(batch.sample, batch.timestep, batch.conditioning,
                             cross_attention_kwargs=batch.cross_attention_kwargs)

    def run_unet(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        conditioning: Conditioning,
        *,
        cross_attention_kwargs: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """One denoiser-model forward on prepared rows (from :meth:`model_input`, rows matching the
        conditioning); ``cross_attention_kwargs`` reach the attention processors (DiTs: as
        ``joint_attention_kwargs``)."""
        self.stats.unet_calls += 1
        self.stats.unet_rows += latents.shape[0]
        return self.model(latents, timestep, conditioning, cross_attention_kwargs)

    def _note_execution(self, kind: str, note: str) -> None:
        self._executions.add(kind)
        self.stats.execution = "+".join(k for k in EXECUTION_ORDER if k in self._executions)
        if note:
            self.stats.execution_note = note


def _batched_adapter(branch: Branch) -> str:
    """The one adapter (or BASE_ROW) that runs a branch's rows in a batched call."""
    adapter = branch.single_adapter
    if adapter is None:  # batching_blocked keeps such branches out of batched calls
        raise RuntimeError(f"a branch with several LoRAs ({branch.weights}) cannot share a batched call")
    return adapter
