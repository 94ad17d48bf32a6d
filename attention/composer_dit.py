"""LoRA-Composer on DiTs (FLUX.1, SD3/SD3.5): region prompts as text segments of the joint attention.

A DiT has no cross-attention to restrict: text and image tokens attend in one softmax. Concept
injection and isolation become one boolean mask over that joint sequence. The text stream is the
concatenation of one *segment* per group code present on the image-token grid (the codes of
:class:`~loracompose.attention.regional.RegionMasks`: bit k set where LoRA k's region covers a token;
a global LoRA's bit is set everywhere), each segment the prompt of that group encoded as a branch::

    text   = [segment c_1 | segment c_2 | ...]                  one per code present, each T tokens
    image query with code c  -> text keys of segment c            (its concept's words)
                             -> image keys: every one, or with isolation those sharing a placed
                                region or outside every placed region (the SD rule, kernels.py)
    text query of segment c  -> text keys of segment c, image keys with code c

and every LoRA layer of the text stream adds LoRA k's delta only on the segments whose code holds
bit k (:class:`~loracompose.attention.regional_dit.DiTRegionalPatches` with ``text_members``), so a
box's words are read through its own LoRA's K/V deltas, as LoRA-Composer's concept injection does.
One segment covering every token with no placed region is plain joint attention (no mask).

**Maps for refinement and re-initialisation.** With a :class:`JointCapture` set on the controller,
the processors of the chosen blocks also record, from their own query/key projections (normed and,
on FLUX, rotated as the processor does: :func:`~loracompose.attention.joint_maps.joint_queries_and_keys`),
each concept's map (every image query against its segment's text keys, softmax over that segment:
what SD's region cross-attention gives) and the image x image attention (softmax over the image keys,
with the isolation mask), into :class:`~loracompose.attention.capture.AttentionStore` s, with the graph
back to the latent when grad is on.

FLUX's stock processor (double- and single-stream blocks) takes the mask as ``attention_mask``;
SD3's ``JointAttnProcessor2_0`` ignores masks, so SD3 joint blocks (and SD3.5's image-only ``attn2``,
which gets the image x image part) run :func:`sd3_joint_attention`, the same computation with the
mask given to torch's SDPA. Processors are registered on the run's patch stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from loracompose.errors import UserError
from loracompose.pipelines.patches import PatchStack

from .capture import AttentionStore
from .joint_maps import _Projections, joint_map_blocks, joint_queries_and_keys
from .kernels import allowed_by_regions


@dataclass(frozen=True)
class JointLayout:
    """The joint sequence of one generation: the text segments' codes and the image tokens' codes.

    ``segment_codes``: one group code per text segment, in order; ``segment_tokens``: tokens per
    segment; ``image_codes`` (image tokens,) int64 in the transformer's (row-major) order;
    ``placed_bits``: the bits of regions with a box of their own (isolation reads only those);
    ``joint_order``: ``("text", "image")`` (FLUX) or ``("image", "text")`` (SD3).
    """

    segment_codes: tuple[int, ...]
    segment_tokens: int
    image_codes: torch.Tensor
    placed_bits: int
    joint_order: tuple[str, ...]
    isolate: bool
    grid: tuple[int, int] | None = None  # the image-token grid (rows, columns), for maps

    @property
    def text_codes(self) -> torch.Tensor:
        """(segments x tokens,) the group code of every text token."""
        codes = torch.tensor(self.segment_codes, dtype=torch.int64, device=self.image_codes.device)
        return codes.repeat_interleave(self.segment_tokens)

    def text_members(self, regions: int) -> torch.Tensor:
        """Bool (regions, text tokens): whether region k's LoRA acts on each text token."""
        bits = torch.tensor([1 << k for k in range(regions)], dtype=torch.int64, device=self.image_codes.device)
        return (self.text_codes[None, :] & bits[:, None]) != 0

    def image_mask(self) -> torch.Tensor:
        """Bool (image tokens, image tokens): which image keys each image query may see."""
        placed = self.image_codes & self.placed_bits
        if not self.isolate:
            return torch.ones(placed.shape[0], placed.shape[0], dtype=torch.bool, device=placed.device)
        return allowed_by_regions(placed, placed)

    def joint_mask(self) -> torch.Tensor:
        """Bool (tokens, tokens) over the joint sequence in ``joint_order`` (module text)."""
        text, image = self.text_codes, self.image_codes
        blocks = {("text", "text"): text[:, None] == text[None, :],
                  ("text", "image"): text[:, None] == image[None, :],
                  ("image", "text"): image[:, None] == text[None, :],
                  ("image", "image"): self.image_mask()}
        first, second = self.joint_order
        return torch.cat([torch.cat([blocks[(query, first)], blocks[(query, second)]], dim=1)
                          for query in (first, second)])


@dataclass
class JointCapture:
    """What the map blocks record during one transformer call (see the module text).

    ``concepts``: per concept (its store source), the text segment its map reads; ``call``: the call's
    index for the stores (a new index clears them); ``self_store`` None: no image x image maps.
    """

    blocks: frozenset[str]
    cross_store: AttentionStore
    concepts: list[int]
    call: int
    self_store: AttentionStore | None = None


class JointRegions:
    """The masks every processor of a generation reads, built once per layout, dtype and device, and
    the map capture of the running call (``capture``, None outside map passes).

    ``layout`` None (or a mask that allows everything) gives plain attention.
    """

    def __init__(self, layout: JointLayout | None = None) -> None:
        self.capture: JointCapture | None = None
        self.set_layout(layout)

    def set_layout(self, layout: JointLayout | None) -> None:
        self.layout = layout
        self._cache: dict[tuple, torch.Tensor | None] = {}

    def mask(self, part: str, tokens: int, device: torch.device) -> torch.Tensor | None:
        """The (1, 1, tokens, tokens) bool mask of ``part`` (``"joint"`` or ``"image"``), None when
        every key is allowed."""
        key = (part, tokens, str(device))
        if key not in self._cache:
            self._cache[key] = self._build(part, tokens, device)
        return self._cache[key]

    def _build(self, part: str, tokens: int, device: torch.device) -> torch.Tensor | None:
        if self.layout is None:
            return None
        allowed = self.layout.joint_mask() if part == "joint" else self.layout.image_mask()
        if allowed.shape[0] != tokens:
            raise UserError(f"composer's joint attention mask covers {allowed.shape[0]} tokens but a block got "
                            f"{tokens}; run composer through pipe.generate")
        return None if bool(allowed.all()) else allowed.to(device)[None, None]

    def image_bias(self, device: torch.device) -> torch.Tensor | None:
        """The isolation mask on image x image scores as an additive bias (0 / -inf), None without one."""
        allowed = self.mask("image", 0 if self.layout is None else int(self.layout.image_codes.shape[0]), device)
        if allowed is None:
            return None
        return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))

    def record(self, name: str, attn: Any, outputs: dict[str, torch.Tensor], hidden_states: torch.Tensor,
               encoder_hidden_states: torch.Tensor | None, rotary: Any) -> None:
        """Store the maps of block ``name`` from its captured projections (module text)."""
        capture, layout = self.capture, self.layout
        if capture is None or layout is None:
            return
        image_tokens = int(layout.image_codes.shape[0])
        queries, image_keys, text_keys = joint_queries_and_keys(attn, outputs, hidden_states, encoder_hidden_states,
                                                                rotary, image_tokens, name)
        size = self.grid_size
        scale = 1.0 / queries.shape[-1] ** 0.5
        tokens = layout.segment_tokens
        for source, segment in enumerate(capture.concepts):
            keys = text_keys[:, :, segment * tokens:(segment + 1) * tokens]
            capture.cross_store.record(name, capture.call, size, queries, keys, scale, source=source)
        if capture.self_store is not None:
            capture.self_store.record(name, capture.call, size, queries, image_keys, scale,
                                      bias=self.image_bias(queries.device))

    @property
    def grid_size(self) -> tuple[int, int]:
        if self.layout is None or self.layout.grid is None:
            raise UserError("composer's map capture needs the image-token grid; run it through pipe.generate")
        return self.layout.grid


class JointRegionProcessor:
    """A joint block's processor with :class:`JointRegions`' mask: FLUX's stock processor given the
    mask, or :func:`sd3_joint_attention` on SD3 (``family`` ``"flux"`` or ``"sd3"``)."""

    def __init__(self, inner: Any, regions: JointRegions, family: str, name: str = "") -> None:
        self.inner = inner
        self.regions = regions
        self.family = family
        self.name = name

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, **kwargs: Any) -> Any:
        if attention_mask is not None:
            raise UserError("composer builds the joint attention mask itself; do not pass attention_mask")
        text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        tokens = hidden_states.shape[1] + text
        joint = self.family == "flux" or encoder_hidden_states is not None  # FLUX single blocks: [text, image]
        mask = self.regions.mask("joint" if joint else "image", tokens, hidden_states.device)
        capture = self.regions.capture
        if capture is None or self.name not in capture.blocks:
            return self._attend(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)
        projections = _Projections(attn, keep_graph=torch.is_grad_enabled())
        try:
            output = self._attend(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)
        finally:
            projections.remove()
        self.regions.record(self.name, attn, projections.outputs, hidden_states, encoder_hidden_states,
                            image_rotary_emb)
        return output

    def _attend(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                mask: torch.Tensor | None, image_rotary_emb: Any) -> Any:
        if self.family == "flux":
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask=mask,
                              image_rotary_emb=image_rotary_emb)
        return sd3_joint_attention(attn, hidden_states, encoder_hidden_states, mask)


def sd3_joint_attention(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                        mask: torch.Tensor | None) -> Any:
    """diffusers' ``JointAttnProcessor2_0`` (SD3/SD3.5 joint blocks, image-only ``attn2``) with a
    boolean ``mask`` over the [image, text] sequence handed to torch's SDPA."""
    batch, image_tokens = hidden_states.shape[0], hidden_states.shape[1]

    def heads(states: torch.Tensor) -> torch.Tensor:
        return states.view(batch, -1, attn.heads, states.shape[-1] // attn.heads).transpose(1, 2)

    query = _normed(attn.norm_q, heads(attn.to_q(hidden_states)))
    key = _normed(attn.norm_k, heads(attn.to_k(hidden_states)))
    value = heads(attn.to_v(hidden_states))
    if encoder_hidden_states is not None:
        text_query = _normed(attn.norm_added_q, heads(attn.add_q_proj(encoder_hidden_states)))
        text_key = _normed(attn.norm_added_k, heads(attn.add_k_proj(encoder_hidden_states)))
        query = torch.cat([query, text_query], dim=2)
        key = torch.cat([key, text_key], dim=2)
        value = torch.cat([value, heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
    image, text = out[:, :image_tokens], out[:, image_tokens:]
    image = attn.to_out[1](attn.to_out[0](image))
    if encoder_hidden_states is None:
        return image
    return image, (text if attn.context_pre_only else attn.to_add_out(text))


def _normed(norm: torch.nn.Module | None, states: torch.Tensor) -> torch.Tensor:
    return states if norm is None else norm(states)


def joint_attention_modules(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The attention modules of the transformer's blocks by name: the joint ones (FLUX double and
    single blocks', SD3 joint blocks' ``attn``: :func:`joint_map_blocks`) and SD3.5's image-only ``attn2``."""
    blocks = getattr(transformer, "transformer_blocks", [])
    names = joint_map_blocks(transformer)
    names += [f"transformer_blocks.{index}.attn2" for index, block in enumerate(blocks)
              if getattr(block, "attn2", None) is not None]
    return {name: transformer.get_submodule(name) for name in names}


def install_joint_regions(transformer: torch.nn.Module, regions: JointRegions, stack: PatchStack) -> None:
    """A :class:`JointRegionProcessor` on every block attention module; the run's ``stack`` restores
    the previous processors."""
    family = "flux" if hasattr(transformer, "single_transformer_blocks") else "sd3"
    named = joint_attention_modules(transformer)
    names = {id(module): name for name, module in named.items()}
    stack.module_processors(named.values(), lambda module: JointRegionProcessor(module.processor, regions, family,
                                                                                names[id(module)]))


def segment_codes(image_codes: torch.Tensor) -> tuple[int, ...]:
    """The group codes present on the image-token grid, ascending: one text segment each."""
    return tuple(int(code) for code in torch.unique(image_codes).tolist())


def concatenated_segments(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """The segments' text states (rows, T, dim) joined along the tokens (they must share rows and T)."""
    lengths = {tuple(state.shape[:2]) for state in states}
    if len(lengths) != 1:
        raise UserError(f"composer's region prompts encode to different shapes {sorted(lengths)}; every prompt "
                        "must give the same rows and text length")
    return torch.cat(list(states), dim=1)
