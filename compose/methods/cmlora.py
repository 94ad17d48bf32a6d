"""CMLoRA: Cached Multi-LoRA composition (Zou et al., ICLR 2025; docs/methods/cmlora.md).

Composite with one dominant LoRA at a time, chosen by frequency, and a per-LoRA DeepCache::

    score_j <- high-frequency score of LoRA j (frequency.py), unless its class is set by hand
    H  <- LoRAs with score >= threshold (default: the mean score of the set), by score, high first
    Lo <- the others, by score                                   (ties keep the user's order)
    R  <- refresh steps: every 2nd step of [0, 0.375T), every 3rd of [0.375T, 0.875T),
          every 2nd of [0.875T, T), each segment from its first step   (or every c-th step)
    S  <- floor(phase_fraction * T)                                (reference: 120 of T = 220)
    for step i = 0..T-1:
        if i in R:                                  # the dominant LoRA rotates at refresh steps
            cycle <- Lo ++ H[1:] if i > S and Lo, H non-empty      # late: low frequencies lead
                     H otherwise                                   # early: high frequencies lead
            d <- cycle[(refreshes so far in this phase) mod |cycle|]
        for each LoRA j:
            if caching is off, j has no cache yet, or (i in R and j = d):
                (u_j, c_j), cache_j <- full UNet pass with only LoRA j (keep its deep feature)
            else:
                (u_j, c_j) <- shallow pass with only LoRA j around cache_j
        c_dom <- N - 0.5;  w_non <- N / (c_dom + N - 1);  w_dom <- c_dom * w_non     (then / N)
        eps <- sum_j w_j u_j + s (sum_j w_j c_j - sum_j w_j u_j),  w_j = w_dom if j = d else w_non
        scheduler step

Caching is on whenever the schedule skips a step (the default non-uniform one does); with
interval 1 every LoRA runs the full UNet every step: a weighted Composite at Composite's cost.
On FLUX.1 and SD3 the cache is the middle transformer blocks' residual and the shallow pass runs the
first and last block around it (``pipelines/dit_cache.py``); the rest is the same.
Unlike the released code: the profiled scores decide the classes (a LoRA's category is only the
fallback when it has neither score nor hand-set class: background -> low, as the reference does),
the phase step scales with T, and late-phase refreshes really refresh.

CMLoRA-Switch keeps one LoRA active at a time in the same frequency order::

    active(i) <- H[(i // tau) mod |H|]               for i <= S (or when Lo or H is empty: A)
                 Lo[((i - S - 1) // tau) mod |Lo|]   for i > S
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Collection, Mapping, Sequence

from loracompose.errors import UserError
from loracompose.lazy import LazyImport
from loracompose.lora import LoadedLora, LoraSpec, inspect_lora
from loracompose.methods.base import ALL_FAMILIES, CompositionMethod, require_loras
from loracompose.pipelines.values import Branch, Prediction, Step
from loracompose.validation import Limits, check_image_side

if TYPE_CHECKING:
    from loracompose.frequency import ProfileSettings
    import torch

    from loracompose.pipelines.denoiser import BranchBatch, Denoiser
    from loracompose.pipelines.unet_cache import check_cacheable
else:
    check_cacheable = LazyImport("loracompose.pipelines.unet_cache", "check_cacheable")

HIGH, LOW = "high", "low"
LOW_FREQUENCY_CATEGORIES = frozenset({"background"})
REFERENCE_PHASE_FRACTION = 120 / 220


# ------------------------------------------------------------------------------------ ordering


@dataclass(frozen=True)
class FrequencyOrder:
    """The LoRAs (indices in user order) split into high- and low-frequency, each best first,
    with where each LoRA's class came from ("hand", "score" or "category")."""

    high: tuple[int, ...]
    low: tuple[int, ...]
    sources: tuple[str, ...]

    @property
    def early_cycle(self) -> tuple[int, ...]:
        return self.high or self.low

    @property
    def late_cycle(self) -> tuple[int, ...]:
        """Low-frequency LoRAs first, then the high ones but the first (empty: no late phase)."""
        return self.low + self.high[1:] if self.high and self.low else ()


def frequency_order(
    names: Sequence[str],
    scores: Mapping[str, float],
    classes: Mapping[str, str],
    categories: Sequence[str | None],
    threshold: float | None = None,
) -> FrequencyOrder:
    """Split LoRAs into high/low frequency: hand-set class, else score >= threshold (default: mean
    of the set's scores), else category (background -> low). Each class is sorted by score,
    highest first, LoRAs without a score after, ties in user order."""
    scored = [scores[name] for name in names if name in scores]
    threshold = threshold if threshold is not None else (sum(scored) / len(scored) if scored else 0.0)
    labels, sources = zip(
        *(_frequency_class(name, category, scores, classes, threshold) for name, category in zip(names, categories))
    )

    def by_score(index: int) -> tuple[bool, float, int]:
        name = names[index]
        return (name not in scores, -scores.get(name, 0.0), index)

    high = tuple(sorted((i for i, label in enumerate(labels) if label == HIGH), key=by_score))
    low = tuple(sorted((i for i, label in enumerate(labels) if label == LOW), key=by_score))
    return FrequencyOrder(high, low, tuple(sources))


def _frequency_class(
    name: str, category: str | None, scores: Mapping[str, float], classes: Mapping[str, str], threshold: float
) -> tuple[str, str]:
    """(class, where it came from) of one LoRA."""
    if name in classes:
        return classes[name], "hand"
    if name in scores:
        return (HIGH if scores[name] >= threshold else LOW), "score"
    return (LOW if (category or "").lower() in LOW_FREQUENCY_CATEGORIES else HIGH), "category"


def end_of_early_phase(num_steps: int, phase_fraction: float) -> int:
    """S: the last step of the early phase (steps i > S are late)."""
    return math.floor(phase_fraction * num_steps + 1e-9)


# ------------------------------------------------------------------------------------ schedule


def refresh_steps(
    num_steps: int,
    interval: int = 0,
    breakpoints: Sequence[float] = (0.375, 0.875),
    intervals: Sequence[int] = (2, 3, 2),
) -> list[int]:
    """Steps whose dominant LoRA runs a full pass. ``interval`` c >= 1: every c-th step from 0;
    0: the non-uniform schedule, ``intervals[k]`` apart in segment k between the ``breakpoints``
    (fractions of T, floored), each segment from its first step. Step 0 is always a refresh."""
    if interval >= 1:
        return list(range(0, num_steps, interval))
    edges = [0, *(math.floor(fraction * num_steps) for fraction in breakpoints), num_steps]
    return [step for k, every in enumerate(intervals) for step in range(edges[k], edges[k + 1], every)]


def dominant_schedule(
    num_steps: int, refresh: Collection[int], order: FrequencyOrder, last_early_step: int
) -> list[int]:
    """Index of the dominant LoRA at every step: it changes only at refresh steps, walking the
    early cycle up to ``last_early_step`` and the late cycle after it."""
    turns = {"early": 0, "late": 0}
    dominant, schedule = order.early_cycle[0], []
    for step in range(num_steps):
        if step in refresh:
            phase = "late" if step > last_early_step and order.late_cycle else "early"
            cycle = order.late_cycle if phase == "late" else order.early_cycle
            dominant = cycle[turns[phase] % len(cycle)]
            turns[phase] += 1
        schedule.append(dominant)
    return schedule


def dominant_weights(num_loras: int, dominant_factor: float | None = None) -> tuple[float, float]:
    """(w_dom, w_non) after the mean over N: convex, e.g. N=2: (0.6, 0.4), N=3: (0.556, 0.222)."""
    c_dom = dominant_factor if dominant_factor is not None else num_loras - 0.5
    w_non = num_loras / (c_dom + num_loras - 1)
    return c_dom * w_non / num_loras, w_non / num_loras


@dataclass(frozen=True)
class StepPlan:
    """What CMLoRA does at one step: which LoRA dominates, whether it is refreshed."""

    dominant: int
    refresh: bool


def cmlora_plan(
    num_steps: int, order: FrequencyOrder, refresh: Collection[int], last_early_step: int
) -> list[StepPlan]:
    """The dominant LoRA and refresh flag of every step."""
    refresh = set(refresh)
    dominants = dominant_schedule(num_steps, refresh, order, last_early_step)
    return [StepPlan(dominant, step in refresh) for step, dominant in enumerate(dominants)]


def switch_active_schedule(
    num_steps: int, order: FrequencyOrder, period: int, last_early_step: int
) -> list[int]:
    """CMLoRA-Switch: index of the active LoRA at every step (blocks of ``period`` steps)."""
    late_cycle = order.low if order.high else ()
    schedule = []
    for step in range(num_steps):
        if step > last_early_step and late_cycle:
            schedule.append(late_cycle[((step - last_early_step - 1) // period) % len(late_cycle)])
        else:
            schedule.append(order.early_cycle[(step // period) % len(order.early_cycle)])
    return schedule


# ------------------------------------------------------------------------------------ methods


@dataclass
class FrequencyOrdered(CompositionMethod):
    """Settings and ordering shared by CMLoRA and CMLoRA-Switch.

    Attributes:
        frequency_scores: adapter name -> high-frequency score (from :meth:`profile_frequencies`).
        frequency_classes: adapter name -> "high" or "low", overriding the score.
        frequency_threshold: scores at or above it are high; default: the mean of the set's scores.
        phase_fraction: the late phase starts after step floor(phase_fraction * T).
        profile: before generating, profile the LoRAs that have neither a score nor a class (one
            image per LoRA and base model, cached); False: such LoRAs fall back to their category.
        profile_size: profiling image size (default: the model's native size, 512 on SD1.5).
        profile_steps: profiling denoising steps.
    """

    families: ClassVar[frozenset[str]] = ALL_FAMILIES

    frequency_scores: dict[str, float] | None = None
    frequency_classes: dict[str, str] | None = field(default=None, metadata={
        "flags": ("--cmlora-class",), "choices": ("high", "low"), "metavar": "NAME=high|low",
        "help": "a LoRA's frequency class set by hand instead of profiling it"})
    frequency_threshold: float | None = field(default=None, metadata={"flags": ("--cmlora-threshold",)})
    phase_fraction: float = field(default=REFERENCE_PHASE_FRACTION, metadata={"flags": ("--cmlora-phase-fraction",)})
    profile: bool = True
    profile_size: int | None = field(default=None, metadata={"flags": ("--cmlora-profile-size",)})
    profile_steps: int = field(default=20, metadata={"flags": ("--cmlora-profile-steps",)})

    def check(self, loras: Sequence[LoadedLora]) -> None:
        require_loras(self.name, loras)
        names = [lora.name for lora in loras]
        for label, mapping in (("frequency score", self.frequency_scores), ("frequency class", self.frequency_classes)):
            unknown = sorted(set(mapping or {}) - set(names))
            if unknown:
                raise UserError(
                    f"{self.name}: {label} given for {unknown[0]!r}, which is not one of the LoRAs {names}; "
                    "use their adapter names"
                )
        for name, value in (self.frequency_classes or {}).items():
            if value not in (HIGH, LOW):
                raise UserError(f"{self.name}: frequency class of {name!r} is {value!r}; use 'high' or 'low'")
        for name, score in (self.frequency_scores or {}).items():
            if not isinstance(score, (int, float)) or not math.isfinite(score):
                raise UserError(f"{self.name}: frequency score of {name!r} is {score}; profile the LoRA again")
        if not 0.0 <= self.phase_fraction <= 1.0:
            raise UserError(
                f"{self.name}: phase fraction {self.phase_fraction} must lie in [0, 1] "
                f"(default {REFERENCE_PHASE_FRACTION:.3f})"
            )
        if self.profile:
            from loracompose.frequency import ProfileSettings

            ProfileSettings(size=self.profile_size, steps=self.profile_steps).check()

    def bind(self, loras: Sequence[LoadedLora]) -> None:
        super().bind(loras)
        self.order = self._frequency_order()

    def prepare(self, pipe: Any, loras: Sequence[LoadedLora]) -> None:
        """Profile the LoRAs without score or class (if ``profile``), then order them again."""
        if self.profile and loras:
            from loracompose.frequency import ProfileSettings

            if self.profile_size is not None:  # refused before the profiling run, naming its own flag
                check_image_side(self.profile_size, "--cmlora-profile-size", getattr(pipe, "limits", Limits()))
            self.profile_frequencies(pipe, loras, ProfileSettings(size=self.profile_size, steps=self.profile_steps))
            self.order = self._frequency_order()

    def _frequency_order(self) -> FrequencyOrder:
        return frequency_order(
            [lora.name for lora in self.loras], self.frequency_scores or {}, self.frequency_classes or {},
            [lora.category for lora in self.loras], self.frequency_threshold,
        )

    def profile_frequencies(
        self, pipe: Any, loras: Sequence[LoraSpec | LoadedLora], settings: ProfileSettings | None = None
    ) -> None:
        """Fill in the frequency scores of the LoRAs that have neither a score nor a hand-set class
        (one generation per LoRA and base model, then read from the LoRA's sidecar); ``settings``
        default to ``ProfileSettings()``."""
        from loracompose.frequency import ProfileSettings, profile_loras

        settings = settings or ProfileSettings()
        loaded = [spec if isinstance(spec, LoadedLora) else inspect_lora(spec) for spec in loras]
        known = set(self.frequency_scores or {}) | set(self.frequency_classes or {})
        missing = [lora for lora in loaded if lora.name not in known]
        if missing:
            self.frequency_scores = {**(self.frequency_scores or {}), **profile_loras(pipe, missing, settings)}

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        order = getattr(self, "order", None)
        if order is not None:
            names = [lora.name for lora in self.loras]
            settings["frequency_order"] = {
                HIGH: [names[i] for i in order.high],
                LOW: [names[i] for i in order.low],
                "class_sources": dict(zip(names, order.sources)),
            }
        return settings


@dataclass
class CMLoRA(FrequencyOrdered):
    """Frequency-ordered weighted Composite with per-LoRA feature caching.

    Attributes:
        cache_interval: 0 = the non-uniform refresh schedule (default), c >= 1 = every c-th step
            (1 = every step: no caching).
        refresh_breakpoints / refresh_intervals: the non-uniform schedule (fractions of T / steps).
        dominant_factor: c_dom, the dominant LoRA's weight relative to the others (default N - 0.5).
        batched: run all LoRAs' full (and all shallow) passes as one UNet call each.
    """

    name: ClassVar[str] = "cmlora"
    cache_interval: int = 0
    refresh_breakpoints: tuple[float, float] = (0.375, 0.875)
    refresh_intervals: tuple[int, int, int] = (2, 3, 2)
    dominant_factor: float | None = None
    batched: bool = field(default=True, metadata={"flag_values": {"--sequential": False}})

    def check(self, loras: Sequence[LoadedLora]) -> None:
        super().check(loras)
        if int(self.cache_interval) != self.cache_interval or self.cache_interval < 0:
            raise UserError(
                f"cmlora cache interval {self.cache_interval}: use 0 (non-uniform schedule), 1 (no caching) or c >= 2"
            )
        first, second = self.refresh_breakpoints
        if not 0.0 <= first <= second <= 1.0:
            raise UserError(
                f"cmlora refresh breakpoints {tuple(self.refresh_breakpoints)}: give two fractions 0 <= a <= b <= 1 "
                "(default 0.375, 0.875)"
            )
        if len(self.refresh_intervals) != 3 or min(self.refresh_intervals) < 1:
            raise UserError(
                f"cmlora refresh intervals {tuple(self.refresh_intervals)}: give three step counts >= 1 "
                "(default 2, 3, 2)"
            )
        if self.dominant_factor is not None and self.dominant_factor <= 0:
            raise UserError(f"cmlora dominant factor {self.dominant_factor} must be positive (default N - 0.5)")

    def start(self, run: Denoiser) -> None:
        num_steps = len(run.timesteps)
        refresh = refresh_steps(num_steps, self.cache_interval, self.refresh_breakpoints, self.refresh_intervals)
        last_early_step = end_of_early_phase(num_steps, self.phase_fraction)
        self.plan = cmlora_plan(num_steps, self.order, refresh, last_early_step)
        self.caching = len(refresh) < num_steps
        self.caches: dict[int, Any] = {}  # per LoRA: a DeepFeature (UNet) or a BlockResidual (DiT)
        if self.caching and not is_transformer(run):
            check_cacheable(run.unet)

    def mixing_weights(self, dominant: int) -> list[float]:
        w_dom, w_non = dominant_weights(len(self.loras), self.dominant_factor)
        return [w_dom if index == dominant else w_non for index in range(len(self.loras))]

    def needs_full_pass(self, index: int, plan: StepPlan) -> bool:
        return not self.caching or index not in self.caches or (plan.refresh and index == plan.dominant)

    def dominant_lora(self, step: Step) -> LoadedLora:
        return self.loras[self.plan[step.index].dominant]

    def predict(self, run: Denoiser, step: Step, latents) -> Prediction:
        plan = self.plan[step.index]
        full = [i for i in range(len(self.loras)) if self.needs_full_pass(i, plan)]
        shallow = [i for i in range(len(self.loras)) if i not in full]
        predictions = {**self._full_passes(run, step, latents, full),
                       **self._shallow_passes(run, step, latents, shallow)}
        return Prediction.mix([predictions[i] for i in range(len(self.loras))], self.mixing_weights(plan.dominant))

    def _full_passes(self, run: Denoiser, step: Step, latents, indices: list[int]) -> dict[int, Prediction]:
        """Full UNet passes of these LoRAs; with caching on, their deep features become their caches."""
        if not indices:
            return {}
        branches = self._branches(indices)
        if not self.caching:
            return dict(zip(indices, run.predict(latents, step, branches, batch=self.batched)))
        outputs, features = predict_keeping_deep_features(run, latents, step, branches, batch=self.batched)
        self.caches.update(zip(indices, features))
        return dict(zip(indices, outputs))

    def _shallow_passes(self, run: Denoiser, step: Step, latents, indices: list[int]) -> dict[int, Prediction]:
        """Shallow passes of these LoRAs, each around its own cached deep feature."""
        if not indices:
            return {}
        caches = [self.caches[i] for i in indices]
        outputs = predict_shallow(run, latents, step, self._branches(indices), caches, batch=self.batched)
        return dict(zip(indices, outputs))

    def finish(self, run: Denoiser) -> None:
        self.caches = {}

    def _branches(self, indices: Sequence[int]) -> list[Branch]:
        return [self.branch(self.loras[i]) for i in indices]


def predict_keeping_deep_features(
    run: Denoiser, latents: torch.Tensor, step: Step, branches: Sequence[Branch], *, batch: bool = True
) -> tuple[list[Prediction], list[Any]]:
    """Full passes as ``run.predict`` (counted in ``unet_calls``), plus each branch's cache for later
    :func:`predict_shallow`: on a UNet its deep feature (the hidden state entering the last up block,
    a ``DeepFeature``), on a DiT its middle blocks' residual (a ``BlockResidual``)."""
    if is_transformer(run):
        return _full_passes_keeping_residuals(run, latents, step, branches, batch)
    from loracompose.pipelines.unet_cache import DeepFeature, capture_deep_features

    features: dict[int, torch.Tensor] = {}

    def full_pass(rows: BranchBatch) -> torch.Tensor:
        with capture_deep_features(run.unet) as captured:
            noise = run.unet_pass(rows)
        features.update(zip(rows.branches, rows.split(captured[0])))
        return noise

    predictions = run.predict(latents, step, branches, batch=batch, unet_pass=full_pass)
    return predictions, [DeepFeature(features[index], step.index) for index in range(len(branches))]


def predict_shallow(
    run: Denoiser, latents: torch.Tensor, step: Step, branches: Sequence[Branch], caches: Sequence[Any],
    *, batch: bool = True,
) -> list[Prediction]:
    """Predictions of each branch from the shallow path around its cache (UNet: the shallow UNet path
    around the deep feature; DiT: the first and last blocks around the middle's residual), counted in
    ``partial_unet_calls``, batched as ``run.predict``."""
    if is_transformer(run):
        return _shallow_transformer_passes(run, latents, step, branches, caches, batch)
    from loracompose.pipelines.unet_cache import shallow_unet_forward

    def shallow_pass(rows: BranchBatch) -> torch.Tensor:
        _count_partial(run, rows)
        return shallow_unet_forward(
            run.unet, rows.sample, rows.timestep, rows.conditioning.embeds,
            rows.rows([caches[index].hidden for index in rows.branches]),
            added_cond_kwargs=rows.conditioning.added or None, cross_attention_kwargs=rows.cross_attention_kwargs,
        )

    return run.predict(latents, step, branches, batch=batch, unet_pass=shallow_pass)


def is_transformer(run: Denoiser) -> bool:
    """Whether the run's denoiser network is a DiT (FLUX.1, SD3): its model call has a joint order."""
    return hasattr(run.model, "joint_order")


def _count_partial(run: Denoiser, rows: BranchBatch) -> None:
    run.stats.partial_unet_calls += 1
    run.stats.partial_unet_rows += rows.sample.shape[0]


def _full_passes_keeping_residuals(
    run: Denoiser, latents: torch.Tensor, step: Step, branches: Sequence[Branch], batch: bool
) -> tuple[list[Prediction], list[Any]]:
    from loracompose.pipelines.dit_cache import BlockResidual, capture_block_residuals

    residuals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def full_pass(rows: BranchBatch) -> torch.Tensor:
        with capture_block_residuals(run.unet) as captured:
            noise = run.unet_pass(rows)
        image, text = captured[0]
        residuals.update(zip(rows.branches, zip(rows.split(image), rows.split(text))))
        return noise

    predictions = run.predict(latents, step, branches, batch=batch, unet_pass=full_pass)
    return predictions, [BlockResidual(*residuals[index], step.index) for index in range(len(branches))]


def _shallow_transformer_passes(
    run: Denoiser, latents: torch.Tensor, step: Step, branches: Sequence[Branch], caches: Sequence[Any], batch: bool
) -> list[Prediction]:
    from loracompose.pipelines.dit_cache import skipping_middle_blocks

    def shallow_pass(rows: BranchBatch) -> torch.Tensor:
        _count_partial(run, rows)
        image = rows.rows([caches[index].image for index in rows.branches])
        text = rows.rows([caches[index].text for index in rows.branches])
        with skipping_middle_blocks(run.unet, image, text):
            return run.model(rows.sample, rows.timestep, rows.conditioning, rows.cross_attention_kwargs)

    return run.predict(latents, step, branches, batch=batch, unet_pass=shallow_pass)


@dataclass
class CMLoRASwitch(FrequencyOrdered):
    """Switch in CMLoRA's frequency order: high-frequency LoRAs take turns early, low ones late."""

    name: ClassVar[str] = "cmlora-switch"
    period: int = field(default=5, metadata={"flags": ("--switch-period",), "help": "steps per LoRA turn"})

    def check(self, loras: Sequence[LoadedLora]) -> None:
        super().check(loras)
        if self.period < 1:
            raise UserError(f"cmlora-switch period {self.period} must be a positive number of steps (default 5)")

    def start(self, run: Denoiser) -> None:
        num_steps = len(run.timesteps)
        last_early_step = end_of_early_phase(num_steps, self.phase_fraction)
        self.schedule = switch_active_schedule(num_steps, self.order, self.period, last_early_step)

    def active_lora(self, step: Step) -> LoadedLora:
        return self.loras[self.schedule[step.index]]

    def predict(self, run: Denoiser, step: Step, latents) -> Prediction:
        return run.predict(latents, step, [self.branch(self.active_lora(step))])[0]
