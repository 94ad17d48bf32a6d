"""The one denoising loop, and the :class:`Denoiser` a composition method drives each step.

The loop is the same for SD1.5 and SDXL and for every method::

    method.start(run)
    for step in run.steps():
        latents    = method.prepare_latents(run, step, latents)   # latent updates (CLoRA, Composer)
        prediction = method.predict(run, step, latents)          # UNet passes and how to combine them
        latents    = run.scheduler_step(prediction.guided(s), step, latents)
        method.end_step(run, step, latents)                      # caches, schedules, masks
    method.finish(run)

A method never sees the scheduler or the prompt encoder. It asks the :class:`Denoiser` for noise
predictions of *branches* (a branch is a set of LoRAs at strengths, applied to the text encoder and
the UNet alike) and combines them. The Denoiser batches several branches into one UNet call with
per-row adapters where it can, and counts every call.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .adapters import BASE_ROW, AdapterController
from .unet_cache import DeepFeature, capture_deep_features, shallow_unet_forward


@dataclass(frozen=True)
class Branch:
    """A set of LoRAs (adapter name -> strength) under which the model is run, and optionally its own
    prompt (None: the generation's prompt; CLoRA gives every branch its own)."""

    loras: tuple[tuple[str, float], ...] = ()
    prompt: str | None = None

    @classmethod
    def of(cls, weights: Mapping[str, float], prompt: str | None = None) -> "Branch":
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
    def mix(predictions: Sequence["Prediction"], weights: Sequence[float] | None = None) -> "Prediction":
        """Weighted average of predictions (equal weights by default). CFG is linear, so mixing
        before or after guidance is the same."""
        if weights is None:
            weights = [1.0 / len(predictions)] * len(predictions)
        cond = sum(w * p.cond for w, p in zip(weights, predictions))
        uncond = None if predictions[0].uncond is None else sum(w * p.uncond for w, p in zip(weights, predictions))
        return Prediction(cond=cond, uncond=uncond)


@dataclass
class Conditioning:
    """Text conditioning of one branch, rows laid out [uncond x B, cond x B] (cond only without CFG)."""

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds, time_ids

    def halves(self, num_halves: int) -> list["Conditioning"]:
        return [
            Conditioning(chunk, {key: value.chunk(num_halves)[index] for key, value in self.added.items()})
            for index, chunk in enumerate(self.embeds.chunk(num_halves))
        ]

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        return Conditioning(
            torch.cat([part.embeds for part in parts]),
            {key: torch.cat([part.added[key] for part in parts]) for key in parts[0].added},
        )


@dataclass(frozen=True)
class Step:
    index: int
    timestep: torch.Tensor
    num_steps: int


@dataclass
class GenerationStats:
    """What a generation cost. ``unet_calls`` counts UNet forward calls, ``unet_rows`` the samples
    they evaluated; partial passes (feature caching) and backward passes are counted apart."""

    unet_calls: int = 0
    unet_rows: int = 0
    partial_unet_calls: int = 0
    partial_unet_rows: int = 0
    backward_passes: int = 0
    text_encoder_calls: int = 0
    execution: str = "single"
    execution_note: str = ""
    wall_seconds: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MemoryMeter:
    """Peak memory of a run: CUDA allocator peak on GPU, else the process's peak RSS (which is a
    high-water mark over the process's life, not this run alone)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device

    def peak(self) -> tuple[int, str]:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated"
        return peak_rss_bytes(), "process_peak_rss"


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes.

    On Linux the memory map's own high-water mark (``VmHWM``): ``ru_maxrss`` also keeps the peak of the
    parent's memory when a subprocess was started with vfork + exec, so a small child of a large
    parent would read the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class Denoiser:
    """What a method drives: UNet passes for branches, with batching, conditioning and counting."""

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
    ):
        self.unet = unet
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
        self.tokenizers = None if tokenizers is None else list(tokenizers)  # SD1.5: one, SDXL: two
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
    ) -> list[Prediction]:
        """Noise predictions of each branch at this step: one batched call with per-row adapters
        when every branch has at most one LoRA (and ``batch``), else one call per branch."""
        reason = self.batching_blocked(branches, batch)
        if reason is None:
            self._note_execution("batched", "")
            return self._predict_batched(latents, step, branches, cross_attention_kwargs)
        self._note_execution("sequential" if len(branches) > 1 else "single", reason if len(branches) > 1 else "")
        return [self._predict_one(latents, step, branch, cross_attention_kwargs) for branch in branches]

    def predict_conditional(
        self,
        latents: torch.Tensor,
        step: Step,
        branches: Sequence[Branch],
        *,
        cross_attention_kwargs: Mapping[str, Any] | None = None,
        batch: bool = True,
    ) -> list[torch.Tensor]:
        """Noise predictions of the branches' conditional rows only (no unconditional CFG rows), batched
        like :meth:`predict`: for objectives that read the conditional half alone (CLoRA's loss), at
        half the rows. Differentiable with respect to ``latents`` when grad is enabled."""
        reason = self.batching_blocked(branches, batch, halves=1)
        if reason is None:
            self._note_execution("batched", "")
            conditioning, row_adapters = self._batched_rows(branches, conditional_only=True)
            with self.adapters.rows("unet", row_adapters):
                noise = self.run_unet(self.model_input(latents, step, len(branches)), step.timestep, conditioning,
                                      cross_attention_kwargs=cross_attention_kwargs)
            return list(noise.chunk(len(branches)))
        self._note_execution("sequential" if len(branches) > 1 else "single", reason if len(branches) > 1 else "")
        outputs = []
        for branch in branches:
            conditioning = self._single_branch_conditioning(branch).halves(self.num_halves)[-1]
            outputs.append(self.run_unet(self.model_input(latents, step, 1), step.timestep, conditioning,
                                         cross_attention_kwargs=cross_attention_kwargs))
        return outputs

    def batching_blocked(self, branches: Sequence[Branch], batch: bool = True, *, halves: int | None = None) -> str | None:
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

    def run_unet(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        conditioning: Conditioning,
        *,
        cross_attention_kwargs: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """One UNet forward on prepared rows (already scaled, rows matching the conditioning)."""
        self.stats.unet_calls += 1
        self.stats.unet_rows += latents.shape[0]
        return self.unet(
            latents,
            timestep,
            encoder_hidden_states=conditioning.embeds,
            added_cond_kwargs=conditioning.added or None,
            cross_attention_kwargs=dict(cross_attention_kwargs) if cross_attention_kwargs else None,
            return_dict=False,
        )[0]

    def model_input(self, latents: torch.Tensor, step: Step, copies: int) -> torch.Tensor:
        rows = torch.cat([latents] * copies) if copies > 1 else latents
        return self.scheduler.scale_model_input(rows, step.timestep)

    def _predict_one(self, latents, step, branch, cross_attention_kwargs) -> Prediction:
        conditioning = self._single_branch_conditioning(branch)
        noise = self.run_unet(
            self.model_input(latents, step, self.num_halves), step.timestep, conditioning,
            cross_attention_kwargs=cross_attention_kwargs,
        )
        return self._split(noise, 1)[0]

    def _single_branch_conditioning(self, branch: Branch) -> Conditioning:
        """Activate the branch's LoRAs on the UNet; its conditioning rows."""
        self.adapters.activate(branch.weights, components=["unet"])
        return self.conditioning(branch)

    def _batched_rows(self, branches: Sequence[Branch], conditional_only: bool = False) -> tuple[Conditioning, list[str]]:
        """Set the branches' strengths on the UNet; the conditioning and the adapter of every row,
        rows laid out [half][branch][image] (only the conditional half with ``conditional_only``)."""
        strengths = {name: weight for branch in branches for name, weight in branch.loras}
        self.adapters.set_weights(strengths, components=["unet"])
        halves = [cond.halves(self.num_halves) for cond in (self.conditioning(b) for b in branches)]
        used = range(self.num_halves - 1, self.num_halves) if conditional_only else range(self.num_halves)
        conditioning = Conditioning.cat([halves[b][h] for h in used for b in range(len(branches))])
        row_adapters = [b.single_adapter for _ in used for b in branches for _ in range(self.batch_size)]
        return conditioning, row_adapters

    def _predict_batched(self, latents, step, branches, cross_attention_kwargs) -> list[Prediction]:
        conditioning, row_adapters = self._batched_rows(branches)
        with self.adapters.rows("unet", row_adapters):
            noise = self.run_unet(
                self.model_input(latents, step, self.num_halves * len(branches)), step.timestep, conditioning,
                cross_attention_kwargs=cross_attention_kwargs,
            )
        return self._split(noise, len(branches))

    def _split(self, noise: torch.Tensor, num_branches: int) -> list[Prediction]:
        """Rows [half][branch][image] -> one Prediction per branch."""
        per_half = noise.chunk(self.num_halves)
        per_branch = [half.chunk(num_branches) for half in per_half]
        if self.do_cfg:
            return [Prediction(cond=per_branch[1][b], uncond=per_branch[0][b]) for b in range(num_branches)]
        return [Prediction(cond=per_branch[0][b]) for b in range(num_branches)]

    # ----------------------------------------------------------------- cached passes (CMLoRA)
    def predict_full_with_cache(
        self,
        latents: torch.Tensor,
        step: Step,
        branches: Sequence[Branch],
        *,
        cross_attention_kwargs: Mapping[str, Any] | None = None,
        batch: bool = True,
    ) -> tuple[list[Prediction], list[DeepFeature]]:
        """Full UNet passes as :meth:`predict` (counted in ``unet_calls``), plus each branch's deep
        feature (the hidden state entering the last up block) for later :meth:`predict_shallow`."""
        with capture_deep_features(self.unet) as captured:
            predictions = self.predict(latents, step, branches, cross_attention_kwargs=cross_attention_kwargs, batch=batch)
        per_branch = captured if len(captured) == len(branches) else self._rows_per_branch(captured[0], len(branches))
        return predictions, [DeepFeature(hidden, step.index) for hidden in per_branch]

    def predict_shallow(
        self,
        latents: torch.Tensor,
        step: Step,
        branches: Sequence[Branch],
        caches: Sequence[DeepFeature],
        *,
        cross_attention_kwargs: Mapping[str, Any] | None = None,
        batch: bool = True,
    ) -> list[Prediction]:
        """Noise predictions of each branch from the shallow UNet path around its cached deep
        feature (counted in ``partial_unet_calls``); batched like :meth:`predict`."""
        reason = self.batching_blocked(branches, batch)
        if reason is None:
            self._note_execution("batched", "")
            conditioning, row_adapters = self._batched_rows(branches)
            deep = self._branch_rows([cache.hidden for cache in caches])
            with self.adapters.rows("unet", row_adapters):
                noise = self.run_unet_shallow(
                    self.model_input(latents, step, self.num_halves * len(branches)), step.timestep, conditioning,
                    deep, cross_attention_kwargs=cross_attention_kwargs,
                )
            return self._split(noise, len(branches))
        self._note_execution("sequential" if len(branches) > 1 else "single", reason if len(branches) > 1 else "")
        predictions = []
        for branch, cache in zip(branches, caches):
            conditioning = self._single_branch_conditioning(branch)
            noise = self.run_unet_shallow(
                self.model_input(latents, step, self.num_halves), step.timestep, conditioning, cache.hidden,
                cross_attention_kwargs=cross_attention_kwargs,
            )
            predictions.append(self._split(noise, 1)[0])
        return predictions

    def run_unet_shallow(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        conditioning: Conditioning,
        deep_feature: torch.Tensor,
        *,
        cross_attention_kwargs: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """One shallow UNet pass on prepared rows around a cached deep feature with matching rows."""
        self.stats.partial_unet_calls += 1
        self.stats.partial_unet_rows += latents.shape[0]
        return shallow_unet_forward(
            self.unet, latents, timestep, conditioning.embeds, deep_feature,
            added_cond_kwargs=conditioning.added or None, cross_attention_kwargs=cross_attention_kwargs,
        )

    def _rows_per_branch(self, rows: torch.Tensor, num_branches: int) -> list[torch.Tensor]:
        """Rows [half][branch][image] -> per branch, rows [half][image]."""
        halves = [half.chunk(num_branches) for half in rows.chunk(self.num_halves)]
        return [torch.cat([half[b] for half in halves]) for b in range(num_branches)]

    def _branch_rows(self, per_branch: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`_rows_per_branch`."""
        halves = [rows.chunk(self.num_halves) for rows in per_branch]
        return torch.cat([halves[b][h] for h in range(self.num_halves) for b in range(len(per_branch))])

    def _note_execution(self, kind: str, note: str) -> None:
        self._executions.add(kind)
        order = ["batched", "sequential", "single"]
        self.stats.execution = "+".join(k for k in order if k in self._executions)
        if note:
            self.stats.execution_note = note


def denoise(run: Denoiser, method: Any, latents: torch.Tensor, progress: Callable[[], None] | None = None) -> torch.Tensor:
    """The denoising loop: every method, SD1.5 and SDXL alike."""
    method.start(run)
    try:
        for step in run.steps():
            latents = method.prepare_latents(run, step, latents)
            with torch.no_grad():
                prediction = method.predict(run, step, latents)
                latents = run.scheduler_step(prediction.guided(run.guidance_scale), step, latents)
            method.end_step(run, step, latents)
            if progress is not None:
                progress()
    finally:
        method.finish(run)
    return latents
