"""CLoRA: contrastive test-time composition (Meral et al., ICCV 2025; docs/methods/clora.md).

Branch 0 is the base model on the user's prompt; branch p = 1..N is LoRA p on its own prompt::

    P_0 <- the prompt;  P_p <- the prompt + LoRA p's trigger words          (or given per LoRA)
    K[c][p] <- token positions in P_p of concept c's words                 (trigger + subject words)
    map layers <- the cross-attention layers of the deepest level with >= min_map_side cells a side
    for step i = 0..T-1:
        repeat updates(i) times:            # the 50-step schedule scaled to T: 1 + extra_iterations at
                                            # iterative_steps, 1 before max_update_step, 0 after
            A_p <- maps of branch p at z, conditional rows, mean over map layers and heads  (one call)
            V   <- min-max normalised maps A_p[:, :, k] for k in K[c][p], labelled c
            L   <- InfoNCE over V: cosine similarity / temperature; positives: same concept (any
                   branch), negatives: the other concepts
            z   <- z - eta * grad_z L        # eta = step_size * latent area / step_latent_side**2
        A_p <- maps of every branch at the updated z (no graph, the pass ends after the map layers)
        score_c <- concept c's mean token map in its own branch, smoothed, min-max normalised
        owner   <- argmax of the scores above mask_threshold, else the base  (upsampled: a partition)
        gate "layers":     one pass per image, every LoRA layer base(x) + sum_c [owner = c] delta_c(x),
                           cross-attention where c owns reading P_c (attention/regional.py)
        gate "prediction": every branch's CFG pass; eps <- sum_p [owner = p] eps_p  (the paper)
        z <- scheduler step(eps, z)

Before ``masks_from_step`` the masks cover the whole image. Unlike the released code: the scheduler
steps with the noise of the updated latent, graphs are built on optimised steps only, maps are read
from the conditional rows and only on the map layers (fused kernels elsewhere), H and W keep their
places on non-square images, token positions come from the tokenizer(s), UNet-only LoRAs work, and
overlapping masks are resolved to one owner per pixel instead of averaged. The optimisation passes
run the conditional rows only (the loss reads nothing else). With one concept (N = 1) there is
nothing to contrast: the loss is identically zero and no optimisation pass runs.

Where we depart from the paper, and why (measured on the toy world, docs/methods/clora.md): the map
level, the step size and the update schedule were fixed for SD1.5 at 512 px and 50 steps and are
scaled with the latent and the step count (the same values there); masks are scored on min-max
normalised, smoothed maps (a map's floor made the peak-relative rule claim the whole image); and the
masks gate every LoRA layer rather than only the noise mix (``gate="prediction"`` keeps the paper's).
SDXL's map modules stack 10 transformer blocks; ``map_layers_per_module=1`` reads the central one of
each (a cost choice). Defaults follow the reference code except where it contradicts the method:
``latent_update`` is on and ``iterative_steps`` is (0, 10, 20) with 20 extra iterations (paper and
example notebook). The reference's optional style LoRA and guidance rescale are not implemented.

On FLUX.1 and SD3 (docs/dit.md) the same loop and the same steps run on the joint attention: the maps
are its image-query x text-key block on the blocks ``auto`` reads (attention/joint_maps.py, with their
graph for the updates), token positions index the joint text stream (FLUX: T5's; SD3: 77 CLIP then
T5's), the gradient reaches whatever latents the loop holds (FLUX: packed tokens; SD3: (B, C, H, W)),
masks live on the image-token grid, and ``gate="layers"`` masks every transformer LoRA layer by the
tokens it sees (attention/regional_dit.py) with the generation's prompt as the one text stream.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence, cast

from loracompose.errors import UserError
from loracompose.kinds import BACKGROUND, STYLE, lora_kind
from loracompose.lazy import LazyImport
from loracompose.lora import LoadedLora, with_trigger_words
from loracompose.methods.base import ALL_FAMILIES, CompositionMethod, frozen_parameters, require_loras
from loracompose.tokens import stream_trigger_positions, trigger_positions
from loracompose.pipelines.values import Branch, Prediction, Step

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    from loracompose.attention import (
        AttentionLayer,
        AttentionStore,
        ComposeAttnProcessor,
        LatentGrid,
        attention_kernel,
        attention_map_layers,
        processors_for,
        stop_after_layers,
    )
    from loracompose.attention.auto_masks import auto_mask_layers, smooth
    from loracompose.attention.joint_maps import JointMapRecorder, default_map_blocks
    from loracompose.attention.regional import RegionMasks, install_regional
    from loracompose.attention.regional_dit import install_regional_dit
    from loracompose.methods.auto import mask_on_latents, one_image_view, text_streams
    from loracompose.pipelines.denoiser import Denoiser
    from loracompose.pipelines.patches import PatchStack
else:  # imported on first use: the settings dataclass imports without the model stack
    torch = LazyImport("torch")
    F = LazyImport("torch.nn.functional")
    AttentionStore, ComposeAttnProcessor, LatentGrid, attention_kernel, attention_map_layers, \
        processors_for, stop_after_layers = (LazyImport("loracompose.attention", name) for name in (
            "AttentionStore", "ComposeAttnProcessor", "LatentGrid", "attention_kernel", "attention_map_layers",
            "processors_for", "stop_after_layers"))
    auto_mask_layers, smooth = (LazyImport("loracompose.attention.auto_masks", name)
                                for name in ("auto_mask_layers", "smooth"))
    RegionMasks, install_regional = (LazyImport("loracompose.attention.regional", name)
                                     for name in ("RegionMasks", "install_regional"))
    JointMapRecorder, default_map_blocks = (LazyImport("loracompose.attention.joint_maps", name)
                                            for name in ("JointMapRecorder", "default_map_blocks"))
    install_regional_dit = LazyImport("loracompose.attention.regional_dit", "install_regional_dit")
    mask_on_latents, one_image_view, text_streams = (
        LazyImport("loracompose.methods.auto", name) for name in ("mask_on_latents", "one_image_view", "text_streams"))
    PatchStack = LazyImport("loracompose.pipelines.patches", "PatchStack")

BASE_NAME = "base"
MORPHOLOGY = ("dilate", "erode", "open", "close")
MASK_SCORES = ("minmax", "peak")
GATES = ("layers", "prediction")
_TINY = 1e-12  # guards divisions by a flat map's range or peak

TokenGroups = list[list[list[int]]]  # [concept][branch] -> token positions


# ------------------------------------------------------------------------------------ loss


def concept_vectors(maps: torch.Tensor, groups: TokenGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-max normalised, flattened token maps named by ``groups`` and their concept labels.

    ``maps`` is one image's (branches, rows, columns, tokens); returns ((M, rows * columns), (M,)).
    """
    entries = [(branch, token, concept) for concept, per_branch in enumerate(groups)
               for branch, tokens in enumerate(per_branch) for token in tokens]
    if not entries:
        return maps.new_zeros(0, maps.shape[1] * maps.shape[2]), torch.zeros(0, dtype=torch.long)
    branches, tokens, labels = (torch.tensor(column) for column in zip(*entries))
    vectors = maps.permute(0, 3, 1, 2)[branches, tokens].flatten(1)
    low = vectors.amin(dim=1, keepdim=True)
    high = vectors.amax(dim=1, keepdim=True)
    return (vectors - low) / (high - low).clamp_min(_TINY), labels.to(maps.device)


def info_nce(vectors: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over labelled vectors, averaged over ordered positive pairs (a, b), a != b::

        l(a, b) = -log( exp(s_ab / t) / (exp(s_ab / t) + sum_{n: label n != label a} exp(s_an / t)) )

    with s the cosine similarity (pytorch-metric-learning's NTXentLoss, as the reference uses).
    Zero when there is no positive pair or no negative at all.
    """
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    if not positive.any() or same.all():
        return vectors.sum() * 0.0
    unit = F.normalize(vectors, dim=1)
    logits = unit @ unit.T / temperature
    negatives = torch.logsumexp(logits.masked_fill(same, float("-inf")), dim=1, keepdim=True)
    pair_losses = torch.logaddexp(logits, negatives) - logits
    return pair_losses[positive].mean()


def contrastive_loss(maps: torch.Tensor, groups: TokenGroups, temperature: float = 0.5) -> torch.Tensor:
    """CLoRA's loss on one image's maps (branches, rows, columns, tokens)."""
    vectors, labels = concept_vectors(maps, groups)
    return info_nce(vectors, labels, temperature)


# ------------------------------------------------------------------------------------ masks


@dataclass(frozen=True)
class ConceptMasks:
    """Which branch owns each latent pixel at one step: 0 = base, p = LoRA p (user order, from 1).

    ``owner`` is (images, height, width) at latent resolution (on a DiT: the image-token grid);
    ``names[p]`` names branch p.
    """

    step: int
    owner: torch.Tensor
    names: tuple[str, ...]

    def one_hot(self) -> torch.Tensor:
        """(images, branches, height, width) 0/1 float masks; they sum to one at every pixel."""
        return F.one_hot(self.owner.long(), len(self.names)).permute(0, 3, 1, 2).float()

    def mask(self, name: str) -> torch.Tensor:
        """Bool (images, height, width) mask of the branch called ``name``."""
        return self.owner == self.names.index(name)


def relative_attention(maps: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """(images, rows, columns): max over ``tokens`` of each token's map over its own peak.

    ``maps`` is (images, rows, columns, tokens); a pixel is above threshold alpha for some token
    exactly when this is above alpha (the reference's per-token ``A_k > alpha * max A_k``, OR-ed).
    """
    selected = maps[..., list(tokens)]
    peak = selected.amax(dim=(1, 2), keepdim=True).clamp_min(_TINY)
    return (selected / peak).amax(dim=-1)


def minmax_attention(maps: torch.Tensor, tokens: Sequence[int], smoothing: float = 0.0) -> torch.Tensor:
    """(images, rows, columns): the mean map of ``tokens`` (one word's pieces), Gaussian-smoothed by
    ``smoothing`` map cells, min-max normalised to 0..1.

    Unlike :func:`relative_attention` a map's floor counts: a token that attends a little everywhere
    and a bit more in one place claims that place, not the whole image.
    """
    mean = smooth(maps[..., list(tokens)].mean(dim=-1), smoothing)
    low = mean.amin(dim=(1, 2), keepdim=True)
    high = mean.amax(dim=(1, 2), keepdim=True)
    return (mean - low) / (high - low).clamp_min(_TINY)


def concept_score(maps: torch.Tensor, tokens: Sequence[int], scores: str = "minmax",
                  smoothing: float = 0.0) -> torch.Tensor:
    """One concept's mask score (images, rows, columns): ``"minmax"`` or ``"peak"`` (the reference's)."""
    return minmax_attention(maps, tokens, smoothing) if scores == "minmax" else relative_attention(maps, tokens)


def apply_morphology(claims: torch.Tensor, operations: Sequence[str]) -> torch.Tensor:
    """3x3 binary morphology on (..., rows, columns) bool masks, in order."""
    def dilate(mask: torch.Tensor) -> torch.Tensor:
        flat = mask.float().reshape(-1, 1, *mask.shape[-2:])
        return (F.max_pool2d(flat, 3, stride=1, padding=1) > 0).reshape(mask.shape)

    def erode(mask: torch.Tensor) -> torch.Tensor:
        return ~dilate(~mask)

    steps: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "dilate": dilate, "erode": erode,
        "open": lambda m: dilate(erode(m)), "close": lambda m: erode(dilate(m)),
    }
    for operation in operations:
        claims = steps[operation](claims)
    return claims


def owner_map(scores: torch.Tensor, threshold: float, morphology: Sequence[str] = ()) -> torch.Tensor:
    """(images, rows, columns) owner from per-concept scores (images, concepts, rows, columns).

    A concept claims pixels whose score exceeds ``threshold`` (after morphology); a pixel claimed by
    several goes to the highest score (ties: the first concept); unclaimed pixels go to the base (0).
    """
    claims = apply_morphology(scores > threshold, morphology)
    ranked = scores.masked_fill(~claims, float("-inf"))
    return torch.where(claims.any(dim=1), ranked.argmax(dim=1) + 1, torch.zeros_like(ranked[:, 0], dtype=torch.long))


def upsample_owner(owner: torch.Tensor, level: int, latent_size: tuple[int, int]) -> torch.Tensor:
    """Owner at map resolution (cell = 2**level latent pixels a side) -> latent (height, width).

    Nearest-neighbour by cell geometry (masks.py): the last cell is cropped when the latent is not a
    multiple of the cell, and rows stay rows.
    """
    stride = 2**level
    height, width = latent_size
    return owner.repeat_interleave(stride, dim=-2).repeat_interleave(stride, dim=-1)[..., :height, :width]


def concept_masks(
    maps: torch.Tensor,
    mask_tokens: Sequence[Sequence[int]],
    *,
    threshold: float,
    level: int,
    latent_size: tuple[int, int],
    morphology: Sequence[str] = (),
    scores: str = "peak",
    smoothing: float = 0.0,
    claims: Sequence[bool] | None = None,
) -> torch.Tensor:
    """Owner map (images, height, width) from the LoRA branches' maps.

    ``maps`` is (branches, images, rows, columns, tokens) with the base first; LoRA branch p's mask
    reads its own map at ``mask_tokens[p - 1]``, scored by :func:`concept_score`. Concepts whose
    ``claims`` entry is False own no pixel.
    """
    per_concept = [concept_score(maps[p + 1], tokens, scores, smoothing) for p, tokens in enumerate(mask_tokens)]
    scores_map = torch.stack(per_concept, dim=1)
    if claims is not None:
        allowed = torch.tensor(list(claims), dtype=torch.bool, device=scores_map.device).view(1, -1, 1, 1)
        scores_map = scores_map.masked_fill(~allowed, float("-inf"))
    return upsample_owner(owner_map(scores_map, threshold, morphology), level, latent_size)


# ------------------------------------------------------------------------------------ fusion


def fuse(predictions: Sequence[Prediction], masks: ConceptMasks,
         place: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Prediction:
    """Each CFG half of the branches' noise, taken where the branch owns the pixel.

    ``place`` shapes one branch's (images, rows, columns) 0/1 mask to multiply the predictions; by
    default the masks are at latent resolution: (images, 1, height, width)."""
    one_hot = masks.one_hot().to(device=predictions[0].cond.device, dtype=predictions[0].cond.dtype)
    weights = [(place or (lambda mask: mask[:, None]))(one_hot[:, p]) for p in range(one_hot.shape[1])]

    def blend(halves: Sequence[torch.Tensor | None]) -> torch.Tensor:
        return torch.stack([weights[p] * half for p, half in enumerate(halves) if half is not None]).sum(0)

    uncond = None if predictions[0].uncond is None else blend([p.uncond for p in predictions])
    return Prediction(cond=blend([p.cond for p in predictions]), uncond=uncond)


# ------------------------------------------------------------------------------------ map capture


def map_layers(unet: torch.nn.Module, grid: LatentGrid, min_side: int,
               layers_per_module: int | None) -> list[AttentionLayer]:
    """The cross-attention layers CLoRA reads: those of :func:`attention_map_layers` at the deepest
    level whose maps have at least ``min_side`` cells a side for this latent (else the finest level):
    the 1/32 level of SD1.5 and SDXL at their native sizes, the 8x8 level of the toy world."""
    level = auto_mask_layers(unet, grid, min_side)[0].level
    return attention_map_layers(unet, layers_per_module, level=level)


class MapRecorder:
    """Cross-attention maps of every UNet call made while recording, on the given attn2 layers (one level).

    One :class:`AttentionStore` serves the layers; a UNet forward hook copies its maps (all 77 tokens,
    mean over layers and heads) after each call, so batched and one-call-per-branch runs both yield
    rows in [branch][image] order. The processors and the hook are registered on ``patches``.
    """

    def __init__(self, unet: torch.nn.Module, layers: Sequence[AttentionLayer], backend: str,
                 patches: PatchStack) -> None:
        self.level = layers[0].level
        self.store = AttentionStore(token_indices=None)
        self._calls: list[torch.Tensor] | None = None
        patches.processors(unet, processors_for(layers, lambda _: ComposeAttnProcessor(backend, store=self.store)))
        patches.hook(unet.register_forward_hook(self._copy_maps))
        self.layer_names = [layer.name for layer in layers]

    def _copy_maps(self, _module: torch.nn.Module, _args: tuple, _output: Any) -> None:
        if self._calls is not None:
            self._calls.append(self.store.maps())

    @contextmanager
    def recording(self, *, conditional_half: bool, requires_grad: bool) -> Iterator[list[torch.Tensor]]:
        """Collect the maps of the calls in the block: of the conditional half of CFG rows
        (``conditional_half``) or of all rows; with a graph when ``requires_grad``."""
        self.store.rows = "cond" if conditional_half else "all"
        self.store.requires_grad = requires_grad
        self._calls = []
        try:
            yield self._calls
        finally:
            self._calls = None

    def stopped_call(self) -> torch.Tensor:
        """The maps of a call that ended after the map layers (its forward hook never ran)."""
        return self.store.maps()

    @staticmethod
    def per_branch(calls: Sequence[torch.Tensor], num_branches: int) -> torch.Tensor:
        """(branches, images, rows, columns, tokens) from the recorded calls."""
        rows = torch.cat(list(calls))
        return rows.reshape(num_branches, rows.shape[0] // num_branches, *rows.shape[1:])


class JointBranchMaps:
    """:class:`MapRecorder`'s part on a DiT (FLUX.1, SD3): text-to-image maps of the joint attention
    (attention/joint_maps.py) of every transformer call made while recording, on the blocks ``auto``
    reads, for the chosen text positions only (a column each, in sorted order; :meth:`columns`).

    Maps lie on the image-token grid (``level`` 0). Each recording installs a
    :class:`JointMapRecorder` with its rows and graph setting and removes it when done.
    """

    level = 0

    def __init__(self, transformer: torch.nn.Module, token_grid: tuple[int, int], tokens: Sequence[int]) -> None:
        self.transformer = transformer
        self.token_grid = token_grid
        self.tokens = sorted(set(tokens))
        self.layer_names = default_map_blocks(transformer)
        self._recorder: JointMapRecorder | None = None

    def columns(self, groups: TokenGroups) -> TokenGroups:
        """Token positions [concept][branch] -> the maps' columns."""
        index = {token: column for column, token in enumerate(self.tokens)}
        return [[[index[token] for token in tokens] for tokens in per_branch] for per_branch in groups]

    @contextmanager
    def recording(self, *, conditional_half: bool, requires_grad: bool) -> Iterator[list[torch.Tensor]]:
        """As :meth:`MapRecorder.recording`: each call's maps, conditional half or all rows."""
        recorder = JointMapRecorder(self.transformer, self.token_grid, self.tokens, blocks=self.layer_names,
                                    conditional_rows=conditional_half, requires_grad=requires_grad)
        calls: list[torch.Tensor] = []

        def keep(_module: torch.nn.Module, _args: tuple, _output: Any) -> None:  # after the recorder's hook
            calls.append(recorder.last_call())
            recorder.reset()

        hook = self.transformer.register_forward_hook(keep)
        self._recorder = recorder
        try:
            yield calls
        finally:
            hook.remove()
            recorder.remove()
            self._recorder = None

    def stopped_call(self) -> torch.Tensor:
        """The maps of a call that ended after the last map block (no forward hook ran)."""
        if self._recorder is None:
            raise RuntimeError("clora: no recording is running")
        self._recorder.end_call()
        return self._recorder.last_call()


# ------------------------------------------------------------------------------------ the method


@dataclass
class CLoRA(CompositionMethod):
    """Base + one branch per LoRA; contrastive latent updates on their attention maps; mask fusion.

    Attributes:
        latent_update: optimise the latent (reference ``latent_update``).
        step_size: eta in z <- z - eta * grad L (reference 20, constant) on a latent of ``step_latent_side``
            pixels a side; scaled by the latent's area on other sizes.
        step_latent_side: the latent side ``step_size`` is given for (64: SD1.5 at 512 px; 0: no scaling).
        max_update_step: latent updates at steps i < this (reference ``max_iter_to_alter``).
        iterative_steps: steps that get ``extra_iterations`` more updates (reference
            ``iterative_steps`` / ``iterative_steps_steps``).
        extra_iterations: the extra updates at each of ``iterative_steps``.
        temperature: InfoNCE temperature.
        mask_threshold: alpha: a pixel is claimed where the concept's score exceeds it.
        mask_scores: ``"minmax"`` (the concept's mean token map, min-max normalised) or ``"peak"``
            (each token map over its own peak, the reference's ``mask_threshold_alpha`` rule).
        masks_from_step: before this step the branches are averaged (reference ``apply_mask_after``).
        mask_smoothing: Gaussian smoothing of each concept's map before ``"minmax"`` scoring, in map cells.
        gate: ``"layers"``: each LoRA's deltas confined to its concept's mask on every layer it adapts,
            in one pass (regional LoRA with these masks); ``"prediction"``: the paper's fusion, each
            branch's noise taken where its concept owns the pixel.
        mask_morphology: 3x3 operations on each concept's mask, in order: dilate, erode, open, close.
        prompts: one prompt per LoRA ("" keeps the default: the prompt + that LoRA's trigger words).
        subjects: per LoRA, words naming its concept besides the trigger words, comma-separated
            (e.g. ("cat", "dog")); "" for none.
        concept_token_indices: explicit token positions [LoRA c][branch p] (p = 0 base, then LoRAs),
            replacing the ones found from words.
        min_map_side: maps come from the deepest cross-attention level with at least this many
            cells a side (SD1.5 and SDXL at native size: the 1/32 level, as the paper reads). On
            FLUX/SD3 every block sees the one token grid: this, ``map_layers_per_module`` and
            ``backend`` are ignored.
        map_layers_per_module: map layers kept per module of that level (SDXL stacks 10; None: all).
        schedule_steps: the run length ``max_update_step`` and ``iterative_steps`` are given for; they
            are scaled to the run's number of steps (0: used as given).
        batched: run the N + 1 branches as one UNet call with per-row adapters.
        stop_after_maps: end each optimisation pass after its last map layer (batched only): the
            loss reads nothing later, so the high-resolution up blocks are skipped; same gradient.
        backend: attention kernel of the map layers ("sdpa", "xformers"; "flex" has no CPU backward).

    After a generation: ``mask_history`` holds one :class:`ConceptMasks` per step,
    ``loss_history`` (step, loss) per update, ``branch_prompts`` and ``token_groups`` what ran. Set
    ``mask_callback`` to a function of a :class:`ConceptMasks` to watch each step's masks; if it
    returns masks, those are used instead.
    """

    name: ClassVar[str] = "clora"
    families: ClassVar[frozenset[str]] = ALL_FAMILIES
    latent_update: bool = field(default=True, metadata={"flag_values": {"--clora-no-update": False}})
    step_size: float = 20.0
    step_latent_side: int = 64
    max_update_step: int = 30
    iterative_steps: tuple[int, ...] = (0, 10, 20)
    extra_iterations: int = 20
    temperature: float = 0.5
    mask_threshold: float = 0.5
    mask_scores: str = field(default="minmax", metadata={"choices": MASK_SCORES})
    mask_smoothing: float = 1.0
    gate: str = field(default="layers", metadata={"choices": GATES})
    masks_from_step: int = 0
    mask_morphology: tuple[str, ...] = ()
    prompts: tuple[str, ...] = field(default=(), metadata={"flags": ("--clora-lora-prompt",)})
    subjects: tuple[str, ...] = field(default=(), metadata={"flags": ("--clora-subject",), "metavar": "WORDS"})
    concept_token_indices: tuple[tuple[tuple[int, ...], ...], ...] | None = None
    min_map_side: int = 8
    map_layers_per_module: int | None = 1
    schedule_steps: int = 50
    batched: bool = field(default=True, metadata={"flag_values": {"--sequential": False}})
    stop_after_maps: bool = True
    backend: str = "sdpa"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mask_callback: Callable[[ConceptMasks], ConceptMasks | None] | None = None
        self.mask_history: list[ConceptMasks] = []
        self.loss_history: list[tuple[int, float]] = []
        self.branch_prompts: list[str] = []
        self.token_groups: TokenGroups = []
        self.kinds: list[str | None] = []
        self.branches: list[Branch] = []
        self._map_groups: TokenGroups = []  # token_groups as columns of the recorded maps
        self._recorder: MapRecorder | JointBranchMaps | None = None

    # -- settings --------------------------------------------------------------------------
    def check(self, loras: Sequence[LoadedLora]) -> None:
        require_loras(self.name, loras)
        self._check_numbers()
        self._check_per_lora("prompts", self.prompts, len(loras))
        self._check_per_lora("subjects", self.subjects, len(loras))
        unknown = [op for op in self.mask_morphology if op not in MORPHOLOGY]
        if unknown:
            raise UserError(f"clora mask_morphology {unknown[0]!r} is unknown; use any of {', '.join(MORPHOLOGY)}")
        if self.gate not in GATES:
            raise UserError(f"clora gate={self.gate!r} is unknown; use one of {', '.join(GATES)}")
        if not (math.isfinite(self.mask_smoothing) and self.mask_smoothing >= 0):
            raise UserError(f"clora mask_smoothing={self.mask_smoothing} must be a number >= 0 (map cells)")
        if self.mask_scores not in MASK_SCORES:
            raise UserError(f"clora mask_scores={self.mask_scores!r} is unknown; use one of {', '.join(MASK_SCORES)}")
        if int(self.min_map_side) != self.min_map_side or self.min_map_side < 1:
            raise UserError(f"clora min_map_side={self.min_map_side} must be an integer >= 1 (default 8)")
        if self.map_layers_per_module is not None and self.map_layers_per_module < 1:
            raise UserError(f"clora map_layers_per_module={self.map_layers_per_module} must be at least 1 "
                            "(or None for all)")
        attention_kernel(self.backend)
        if self.concept_token_indices is not None:
            self._check_token_index_shape(len(loras))

    def _check_numbers(self) -> None:
        if not (math.isfinite(self.step_size) and self.step_size >= 0):
            raise UserError(f"clora step_size={self.step_size} must be a finite number >= 0 (default 20)")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UserError(f"clora temperature={self.temperature} must be positive (default 0.5)")
        if not 0.0 <= self.mask_threshold < 1.0:
            raise UserError(f"clora mask_threshold={self.mask_threshold} must lie in [0, 1) (default 0.3)")
        counts = [("max_update_step", self.max_update_step), ("extra_iterations", self.extra_iterations),
                  ("masks_from_step", self.masks_from_step), ("schedule_steps", self.schedule_steps),
                  ("step_latent_side", self.step_latent_side),
                  *(("iterative_steps", s) for s in self.iterative_steps)]
        for label, value in counts:
            if int(value) != value or value < 0:
                raise UserError(f"clora {label}={value} must be a non-negative integer")

    def _check_per_lora(self, label: str, values: Sequence[str], num_loras: int) -> None:
        if values and len(values) != num_loras:
            raise UserError(f"clora {label}: got {len(values)} for {num_loras} LoRAs; give one per LoRA "
                            "(\"\" for the default)")

    def _check_token_index_shape(self, num_loras: int) -> None:
        indices = self.concept_token_indices or ()
        if len(indices) != num_loras or any(len(per_branch) != num_loras + 1 for per_branch in indices):
            raise UserError(f"clora concept_token_indices must hold {num_loras} lists (one per LoRA) of "
                            f"{num_loras + 1} position lists (base prompt, then each LoRA's prompt)")

    def updates_at(self, step: int, num_steps: int | None = None) -> int:
        """How many latent updates step ``step`` of a ``num_steps`` run gets (before the N = 1 rule).

        The schedule is given for ``schedule_steps`` steps; step i of a run of T steps stands where
        i * schedule_steps / T stands in it (as given when ``num_steps`` is None or equal).
        """
        scale = 1.0 if not (num_steps and self.schedule_steps) else num_steps / self.schedule_steps
        if not self.latent_update or step >= self.max_update_step * scale:
            return 0
        iterative = {round(s * scale) for s in self.iterative_steps}
        return 1 + (self.extra_iterations if step in iterative else 0)

    # -- prompts and tokens ----------------------------------------------------------------
    def prompts_for(self, base_prompt: str) -> list[str]:
        """[base prompt, then each LoRA's prompt]: the given one, else the base + its trigger words."""
        given = self.prompts or ("",) * len(self.loras)
        own = [prompt or with_trigger_words(base_prompt, [lora]) for lora, prompt in zip(self.loras, given)]
        return [base_prompt, *own]

    def concept_words(self, lora_index: int) -> list[str]:
        """The words naming LoRA ``lora_index``'s concept: its trigger words and its subject words."""
        subject = self.subjects[lora_index] if self.subjects else ""
        return [*self.loras[lora_index].trigger_words, *(w.strip() for w in subject.split(",") if w.strip())]

    def find_token_groups(self, tokenizers: Sequence[Any] | None, prompts: Sequence[str],
                          streams: Sequence[tuple[Sequence[Any], int]] | None = None) -> TokenGroups:
        """K[c][p]: positions of concept c's words in prompt p (tokens.py), or the explicit override.
        On a DiT ``streams`` describes its joint text sequence (auto's ``text_streams``); positions index it."""
        if self.concept_token_indices is not None:
            return [[sorted(set(tokens)) for tokens in per_branch] for per_branch in self.concept_token_indices]
        if not tokenizers:
            raise UserError("clora needs the pipeline's tokenizer(s) to find concept tokens; run it through "
                            "pipe.generate(...) or pass concept_token_indices")
        groups = []
        for index, lora in enumerate(self.loras):
            words = self.concept_words(index)
            if not words:
                raise UserError(f"clora: LoRA {lora.name} has no trigger words; name its concept with subjects=(...), "
                                "one comma-separated entry per LoRA")
            if streams is not None:
                groups.append([stream_trigger_positions(streams, prompt, words).positions for prompt in prompts])
            else:
                groups.append([trigger_positions(tokenizers, prompt, words).positions for prompt in prompts])
        return groups

    def _check_token_groups(self, groups: TokenGroups, prompts: Sequence[str], num_tokens: int) -> None:
        for index, lora in enumerate(self.loras):
            if not groups[index][index + 1]:
                words = ", ".join(self.concept_words(index))
                raise UserError(f"clora: no word of LoRA {lora.name}'s concept ({words}) "
                                f"is in its prompt {prompts[index + 1][:100]!r}; put one there or set prompts/subjects")
        for branch, prompt in enumerate(prompts):
            seen: dict[int, str] = {}
            for index, lora in enumerate(self.loras):
                for token in groups[index][branch]:
                    if not 0 <= token < num_tokens:
                        raise UserError(f"clora concept token {token} of LoRA {lora.name} is outside "
                                        f"0..{num_tokens - 1}")
                    if token in seen:
                        raise UserError(f"clora: LoRAs {seen[token]} and {lora.name} share token {token} of prompt "
                                        f"{prompt[:100]!r}; give their concepts distinct words")
                    seen[token] = lora.name

    @property
    def contrasts(self) -> bool:
        """Whether the loss can be non-zero: at least two concepts have token maps."""
        return sum(1 for per_branch in self.token_groups if any(per_branch)) >= 2

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, run: Denoiser) -> None:
        self.mask_history, self.loss_history = [], []
        self.branch_prompts = self.prompts_for(run.base_prompt if run.base_prompt is not None else "")
        streams = text_streams(run) if _token_grid(run) is not None else None
        self.token_groups = self.find_token_groups(run.tokenizers, self.branch_prompts, streams)
        if streams is not None:
            num_tokens = sum(length for _, length in streams) or 1
        else:
            num_tokens = int(run.tokenizers[0].model_max_length) if run.tokenizers else 77
        self._check_token_groups(self.token_groups, self.branch_prompts, num_tokens)
        self.branches = [Branch.of({}, self.branch_prompts[0])] + [
            replace(self.branch(lora), prompt=prompt) for lora, prompt in zip(self.loras, self.branch_prompts[1:])
        ]
        self._recorder = None
        self._map_groups = self.token_groups
        self.kinds = [lora_kind(lora)[0] for lora in self.loras]

    @property
    def claims(self) -> list[bool]:
        """Which LoRAs claim pixels by their maps: all with ``gate="prediction"``; with ``"layers"`` the
        local ones (a background takes the pixels no concept owns, a style the whole image)."""
        if self.gate != "layers":
            return [True] * len(self.loras)
        return [kind not in (STYLE, BACKGROUND) for kind in self.kinds]

    def _recorder_for(self, run: Denoiser, latents: torch.Tensor) -> MapRecorder | JointBranchMaps:
        """The map recorder, installed on the first step (its level depends on the latent size); on a
        DiT the joint attention's maps of the concept tokens, on the image-token grid."""
        token_grid = _token_grid(run)
        if self._recorder is None and token_grid is not None:
            tokens = {token for per_branch in self.token_groups for tokens in per_branch for token in tokens}
            recorder = JointBranchMaps(run.unet, token_grid, sorted(tokens) or [0])
            self._map_groups = recorder.columns(self.token_groups)
            self._recorder = recorder
        if self._recorder is None:
            grid = LatentGrid(int(latents.shape[-2]), int(latents.shape[-1]))
            layers = map_layers(run.unet, grid, self.min_map_side, self.map_layers_per_module)
            self._recorder = MapRecorder(run.unet, layers, self.backend, run.patches)
        return self._recorder

    def prepare_latents(self, run: Denoiser, step: Step, latents: torch.Tensor) -> torch.Tensor:
        self._recorder_for(run, latents)
        updates = self.updates_at(step.index, step.num_steps) if self.contrasts else 0
        if not updates:
            return latents
        with frozen_parameters(run.unet), torch.enable_grad():
            for _ in range(updates):
                latents = self.update_latents(run, step, latents)
        return latents

    def update_latents(self, run: Denoiser, step: Step, latents: torch.Tensor) -> torch.Tensor:
        """One contrastive step z <- z - step_size * grad_z L (one forward of the conditional rows of all
        branches with a graph, one backward pass)."""
        latents = latents.detach().requires_grad_(True)
        loss = self.loss(run, step, latents)
        (gradient,) = torch.autograd.grad(loss, latents)
        run.stats.backward_passes += 1
        self.loss_history.append((step.index, float(loss.detach())))
        return (latents - self.scaled_step_size(latents) * gradient).detach()

    def scaled_step_size(self, latents: torch.Tensor) -> float:
        """``step_size`` times the latent's area over ``step_latent_side``² (1 for SD1.5 at 512 px).

        The same change of the picture spreads over more latent pixels on a larger latent, so each
        pixel's gradient shrinks with the area; the step grows with it to move the picture alike.
        FLUX's packed latents (images, tokens, channels) hold 2x2 latent pixels per token.
        """
        if not self.step_latent_side:
            return self.step_size
        area = latents.shape[1] * 4 if latents.ndim == 3 else latents.shape[-2] * latents.shape[-1]
        return self.step_size * area / self.step_latent_side**2

    def loss(self, run: Denoiser, step: Step, latents: torch.Tensor) -> torch.Tensor:
        """The contrastive loss at ``latents``, summed over images (each image's latent gets its own gradient)."""
        maps = self.branch_maps(run, step, latents, requires_grad=True)
        losses = [contrastive_loss(maps[:, image], self._map_groups, self.temperature)
                  for image in range(maps.shape[1])]
        return torch.stack(losses).sum()

    def branch_maps(self, run: Denoiser, step: Step, latents: torch.Tensor, *, requires_grad: bool) -> torch.Tensor:
        """(branches, images, rows, columns, tokens): every branch's maps at ``latents`` from its conditional
        rows, the pass ending after the map layers where it can."""
        one_call = run.batching_blocked(self.branches, self.batched, halves=1) is None
        recorder = self._recorder_for(run, latents)
        with recorder.recording(conditional_half=False, requires_grad=requires_grad) as calls:
            if one_call and self.stop_after_maps:  # the loss reads only the map layers
                with stop_after_layers(run.unet, recorder.layer_names) as early:
                    run.branch_passes(latents, step, self.branches, conditional_only=True, batch=self.batched)
                if early.stopped:
                    calls.append(recorder.stopped_call())
            else:
                run.branch_passes(latents, step, self.branches, conditional_only=True, batch=self.batched)
        return MapRecorder.per_branch(calls, len(self.branches))

    def predict(self, run: Denoiser, step: Step, latents: torch.Tensor) -> Prediction:
        if self.gate == "layers":
            return self.gated_prediction(run, step, latents)
        recorder = self._recorder_for(run, latents)
        with recorder.recording(conditional_half=run.do_cfg, requires_grad=False) as calls:
            predictions = run.predict(latents, step, self.branches, batch=self.batched)
        masks = self.masks(MapRecorder.per_branch(calls, len(self.branches)), step, *self._mask_grid(run, latents))
        if step.index < self.masks_from_step:
            return Prediction.mix(predictions)
        if _token_grid(run) is None:
            return fuse(predictions, masks)
        return fuse(predictions, masks, lambda mask: torch.cat([mask_on_latents(image, latents) for image in mask]))

    def _mask_grid(self, run: Denoiser, latents: torch.Tensor) -> tuple[int, tuple[int, int]]:
        """(map level, mask size): the maps' level and the latent's size on a UNet; on a DiT the
        image-token grid, where its maps are."""
        token_grid = _token_grid(run)
        if token_grid is not None:
            return 0, token_grid
        return self._recorder_for(run, latents).level, (int(latents.shape[-2]), int(latents.shape[-1]))

    def gated_prediction(self, run: Denoiser, step: Step, latents: torch.Tensor) -> Prediction:
        """One pass per image in which every LoRA's deltas act inside its concept's mask only, on every
        layer it adapts (attention/regional.py); its cross-attention there reads its branch's prompt."""
        with torch.no_grad():
            maps = self.branch_maps(run, step, latents, requires_grad=False)
        masks = self.masks(maps, step, *self._mask_grid(run, latents))
        view = run if latents.shape[0] == 1 else one_image_view(run)
        predictions = [self._regional_pass(view, step, latents[image:image + 1], masks.owner[image])
                       for image in range(latents.shape[0])]
        unconds = [p.uncond for p in predictions if p.uncond is not None]
        uncond = torch.cat(unconds) if unconds else None
        return Prediction(cond=torch.cat([p.cond for p in predictions]), uncond=uncond)

    def _regional_pass(self, run: Denoiser, step: Step, latents: torch.Tensor, owner: torch.Tensor) -> Prediction:
        """Regional LoRA on one image: LoRA p's region is where ``owner`` is p + 1 (the whole image before
        ``masks_from_step``); pixels of no concept see the base model on the base prompt."""
        whole = step.index < self.masks_from_step
        areas = [None if whole else self._area(index, owner) for index in range(len(self.loras))]
        present = [lora for lora, area in zip(self.loras, areas) if area is None or bool(area.any())]
        if not present:
            return run.predict(latents, step, [self.branches[0]])[0]
        undo = self._install_gate(run, RegionMasks([lora.name for lora in self.loras], areas), latents)
        try:
            return run.predict(latents, step, [self.branch(*present)])[0]
        finally:
            undo()

    def _install_gate(self, run: Denoiser, regions: RegionMasks, latents: torch.Tensor) -> Callable[[], None]:
        """Mask every LoRA layer by ``regions`` for one pass; returns the undo. On a UNet the
        cross-attention of a region reads its branch's prompt; on a DiT the one text stream is the
        pass's prompt (attention/regional_dit.py)."""
        token_grid = _token_grid(run)
        if token_grid is not None:
            stack, model = PatchStack(), cast(Any, run.model)  # the DiT model calls know their stream order
            install_regional_dit(run.unet, regions, token_grid, tuple(model.joint_order), stack)
            return stack.unwind

        def states(code: int) -> torch.Tensor:
            members = [index for index in range(len(self.loras)) if code >> index & 1]
            local = [index for index in members if self.claims[index]] or members
            branch = self.branches[local[0] + 1] if len(local) == 1 else self.branches[0]
            return run.conditioning(branch).embeds

        for code in regions.all_codes(LatentGrid(int(latents.shape[-2]), int(latents.shape[-1]))):
            states(code)  # encode outside the UNet call
        return install_regional(run.unet, regions, states).restore

    def _area(self, index: int, owner: torch.Tensor) -> torch.Tensor | None:
        """LoRA ``index``'s region: its concept's pixels; a background LoRA's: where no concept is; a
        style LoRA's, or a LoRA alone: the whole image (None). ``gate="prediction"``: its concept's pixels."""
        kind = self.kinds[index]
        if len(self.loras) == 1 and self.gate == "layers":  # nothing to keep apart; a mask could only cut it
            return None
        if kind == STYLE and self.gate == "layers":
            return None
        if kind == BACKGROUND and self.gate == "layers":
            return (owner == 0).float()
        return (owner == index + 1).float()

    def masks(self, maps: torch.Tensor, step: Step, level: int, latent_size: tuple[int, int]) -> ConceptMasks:
        """This step's masks from maps at ``level`` (after ``mask_callback``), recorded in ``mask_history``."""
        owner = concept_masks(
            maps, [self._map_groups[c][c + 1] for c in range(len(self.loras))], threshold=self.mask_threshold,
            level=level, latent_size=latent_size, morphology=self.mask_morphology,
            scores=self.mask_scores, smoothing=self.mask_smoothing, claims=self.claims,
        )
        masks = ConceptMasks(step.index, owner, (BASE_NAME, *(lora.name for lora in self.loras)))
        if self.mask_callback is not None:
            masks = self._checked_override(self.mask_callback(masks), masks)
        self.mask_history.append(ConceptMasks(masks.step, masks.owner.detach().cpu(), masks.names))
        return masks

    @staticmethod
    def _checked_override(override: ConceptMasks | None, computed: ConceptMasks) -> ConceptMasks:
        if override is None:
            return computed
        owner = override.owner
        if tuple(owner.shape) != tuple(computed.owner.shape) or owner.min() < 0 or owner.max() >= len(computed.names):
            raise UserError(f"clora mask_callback returned an owner map of shape {tuple(owner.shape)} with values "
                            f"{int(owner.min())}..{int(owner.max())}; return shape {tuple(computed.owner.shape)} "
                            f"with values 0..{len(computed.names) - 1}")
        return ConceptMasks(computed.step, owner.to(computed.owner.device), computed.names)

    def finish(self, run: Denoiser) -> None:
        self._recorder = None

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        if self.branch_prompts:
            settings["branch_prompts"] = list(self.branch_prompts)
            settings["token_groups"] = self.token_groups
        return settings


def _token_grid(run: Denoiser) -> tuple[int, int] | None:
    """The image-token grid of a DiT's model call (rows, columns); None on a UNet."""
    grid = getattr(run.model, "token_grid", None)
    return None if grid is None else (int(grid[0]), int(grid[1]))
