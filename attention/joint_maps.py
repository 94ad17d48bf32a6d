"""Text-to-image attention maps from the joint attention of FLUX.1 and SD3 (docs/dit.md).

A DiT has no cross-attention: text and image tokens attend together in one softmax. The rows of the
image queries and the columns of the text keys form the block that plays the part of SD's
cross-attention probabilities: how much each image token looks at each word::

    q_img, k_txt, k_img <- the processor's queries and keys after their norms and rotary embedding
    scores              <- q_img · k_txtᵀ / sqrt(head dim)                       (image x text)
    normaliser "text"   <- logsumexp over the text keys                          (default)
    normaliser "joint"  <- logsumexp over text AND image keys (also q_img · k_imgᵀ, in chunks)
    maps                <- exp(scores[chosen tokens] - normaliser), mean over heads

**Which softmax.** The model's own softmax runs over text and image keys (``"joint"``). Its text
block then mixes two things: which word an image token looks at, and how much it looks at words at
all rather than at other image tokens, which varies over the image (background tokens look mostly at
the image). The ``"text"`` normaliser keeps only the first: each image token's distribution over the
words, what SD's cross-attention maps are and what ``auto``'s mask rule (per-concept min-max, argmax
over concepts) was tuned on. It is also cheaper: only the image x text block is computed, never the
image x image one. Within the joint softmax's text block, renormalising over the text keys gives
exactly the ``"text"`` maps (tests/attention/test_joint_maps.py checks both against a full explicit
attention).

**Cost.** Nothing of the attention itself changes: a :class:`JointMapProcessor` wraps the block's
own processor, which computes the output as before; forward hooks on the query/key projections hand
over their outputs, and the wrapper applies the norms and rotary embedding to the captured rows
only (elementwise per token, so the values equal the processor's). Scores are computed in chunks of
image queries (:data:`CHUNK_ELEMENTS` floats at most), so no (image x all tokens) matrix is held.

**Where the tokens are.** FLUX double-stream blocks: text in ``encoder_hidden_states``, image in
``hidden_states``; FLUX single-stream blocks: one sequence ``[text, image]``; SD3 joint blocks: image
in ``hidden_states``, text in ``encoder_hidden_states`` (the SD3.5 image-only ``attn2`` has no text and
is not a map block). Text token positions index the text stream as the model sees it (FLUX: T5's
tokens; SD3: 77 CLIP positions then T5's; :func:`loracompose.tokens.joint_trigger_positions`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Sequence

import torch

from loracompose.errors import UserError

from .capture import SummedTokenMaps

Normaliser = Literal["text", "joint"]
NORMALISERS = ("text", "joint")
CHUNK_ELEMENTS = 1 << 24  # scores held at once per chunk of image queries (64 MiB in float32)


# ------------------------------------------------------------------------------------ the maps


def text_to_image_maps(image_queries: torch.Tensor, text_keys: torch.Tensor, token_indices: Sequence[int], *,
                       image_keys: torch.Tensor | None = None, normaliser: Normaliser = "text",
                       chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """(batch, image tokens, chosen tokens): head-mean attention of image queries on chosen text keys.

    ``image_queries`` (B, H, N, d), ``text_keys`` (B, H, T, d), ``image_keys`` (B, H, N, d; needed for
    the ``"joint"`` normaliser). Scores use the attention's scale 1/sqrt(d), in float32.
    """
    if normaliser not in NORMALISERS:
        raise UserError(f"attention map normaliser {normaliser!r} is unknown; use 'text' or 'joint'")
    if normaliser == "joint" and image_keys is None:
        raise UserError("the joint normaliser needs the image keys too")
    indices = list(token_indices)
    if not indices or min(indices) < 0 or max(indices) >= text_keys.shape[2]:
        raise UserError(f"token positions {indices} must lie in 0..{text_keys.shape[2] - 1} (the text tokens)")
    batch, heads, queries, depth = image_queries.shape
    keys = text_keys.shape[2] + (image_keys.shape[2] if normaliser == "joint" and image_keys is not None else 0)
    chunk = max(1, chunk_elements // max(1, batch * heads * keys))
    scale = 1.0 / math.sqrt(depth)
    text_keys_t = text_keys.float().transpose(-1, -2)
    image_keys_t = image_keys.float().transpose(-1, -2) if normaliser == "joint" and image_keys is not None else None
    parts = []
    for start in range(0, queries, chunk):
        query = image_queries[:, :, start:start + chunk].float()
        scores = torch.matmul(query, text_keys_t) * scale
        log_total = scores.logsumexp(dim=-1, keepdim=True)
        if image_keys_t is not None:
            log_total = torch.logaddexp(log_total, (torch.matmul(query, image_keys_t) * scale).logsumexp(-1, True))
        parts.append((scores[..., indices] - log_total).exp().mean(dim=1))
    return torch.cat(parts, dim=1)


# ------------------------------------------------------------------------------------ blocks


def joint_map_blocks(transformer: torch.nn.Module) -> list[str]:
    """Names of the attention modules whose sequence holds text and image tokens, in forward order:
    ``transformer_blocks.N.attn`` (FLUX double-stream, SD3 joint), then FLUX's
    ``single_transformer_blocks.N.attn``."""
    names = [f"transformer_blocks.{index}.attn" for index in range(len(getattr(transformer, "transformer_blocks", [])))]
    singles = getattr(transformer, "single_transformer_blocks", None)
    if singles is not None:
        names += [f"single_transformer_blocks.{index}.attn" for index in range(len(singles))]
    if not names:
        raise UserError(f"{type(transformer).__name__} has no joint attention blocks; attention maps need "
                        "a FLUX.1 or SD3 transformer")
    return names


def default_map_blocks(transformer: torch.nn.Module) -> list[str]:
    """The blocks ``auto`` reads trigger maps from: the later half of the joint (FLUX double-stream,
    SD3 joint) blocks, e.g. FLUX.1 blocks 9-18 and SD3-medium blocks 12-23 (docs/methods/auto.md)."""
    joint = [name for name in joint_map_blocks(transformer) if name.startswith("transformer_blocks.")]
    return joint[len(joint) // 2:]


# ------------------------------------------------------------------------------------ capture


class _Projections:
    """Forward hooks on one attention module's query/key projections for one call: their outputs."""

    NAMES = ("to_q", "to_k", "add_k_proj")

    def __init__(self, attn: torch.nn.Module, keep_graph: bool = False) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.keep_graph = keep_graph
        self._hooks = [getattr(attn, name).register_forward_hook(self._keeper(name))
                       for name in self.NAMES if getattr(attn, name, None) is not None]

    def _keeper(self, name: str) -> Callable[..., None]:
        def keep(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
            self.outputs[name] = output if self.keep_graph else output.detach()
        return keep

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _heads(attn: Any, projected: torch.Tensor, norm: torch.nn.Module | None) -> torch.Tensor:
    """(B, S, H*d) projection -> (B, S, H, d), normed as the processor norms it (per token)."""
    heads = attn.heads
    split = projected.unflatten(-1, (heads, projected.shape[-1] // heads))
    if norm is None:
        return split
    return norm(split)


def _rotated(states: torch.Tensor, rotary: Any, positions: slice) -> torch.Tensor:
    """FLUX's rotary embedding on (B, S, H, d) states at ``positions`` of the joint sequence."""
    if rotary is None:
        return states
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = rotary
    return apply_rotary_emb(states, (cos[positions], sin[positions]), sequence_dim=1)


class JointMapProcessor:
    """Wraps a joint attention module's processor: the output is the wrapped processor's, and the
    text-to-image maps of the chosen tokens are handed to ``sink(block name, maps)`` after each call
    as (rows, image tokens, tokens), rows picked by ``rows`` ("all" or "cond": the second half).
    With ``requires_grad`` (and grad mode on) the maps keep the graph back to the block's inputs, for
    latent optimisation; otherwise they are computed from detached tensors."""

    def __init__(self, inner: Any, name: str, sink: Callable[[str, torch.Tensor], None], *,
                 token_indices: Sequence[int], image_tokens: Callable[[], int], rows: str = "all",
                 normaliser: Normaliser = "text", requires_grad: bool = False) -> None:
        self.inner = inner
        self.requires_grad = requires_grad
        self.name = name
        self.sink = sink
        self.token_indices = list(token_indices)
        self.image_tokens = image_tokens
        self.rows = rows
        self.normaliser = normaliser

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, **kwargs: Any) -> Any:
        keep_graph = self.requires_grad and torch.is_grad_enabled()
        projections = _Projections(attn, keep_graph)
        try:
            if image_rotary_emb is not None:
                output = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                    **kwargs)
            else:
                output = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        finally:
            projections.remove()
        with torch.set_grad_enabled(keep_graph):
            self.sink(self.name, self._maps(attn, projections.outputs, hidden_states, encoder_hidden_states,
                                            image_rotary_emb))
        return output

    def _maps(self, attn: Any, outputs: dict[str, torch.Tensor], hidden_states: torch.Tensor,
              encoder_hidden_states: torch.Tensor | None, rotary: Any) -> torch.Tensor:
        streams = joint_queries_and_keys(attn, outputs, hidden_states, encoder_hidden_states, rotary,
                                         self.image_tokens(), self.name)
        image_queries, image_keys, text_keys = (self._picked(t) for t in streams)
        return text_to_image_maps(image_queries, text_keys, self.token_indices, image_keys=image_keys,
                                  normaliser=self.normaliser)

    def _picked(self, states: torch.Tensor) -> torch.Tensor:
        if self.rows == "all" or states.shape[0] == 1:
            return states
        if states.shape[0] % 2:
            raise UserError(f"attention map rows={self.rows!r} needs a CFG batch of even size, got {states.shape[0]}")
        return states[states.shape[0] // 2:]


def joint_queries_and_keys(attn: Any, outputs: dict[str, torch.Tensor], hidden_states: torch.Tensor,
                           encoder_hidden_states: torch.Tensor | None, rotary: Any, image_tokens: int,
                           name: str = "this block") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image queries, image keys, text keys), each (B, H, tokens, d), from one call's captured
    ``to_q`` / ``to_k`` / ``add_k_proj`` outputs (:class:`_Projections`), normed and (FLUX) rotated as
    the block's processor does. ``image_tokens`` splits FLUX's single-stream ``[text, image]`` sequence."""
    if "to_q" not in outputs or "to_k" not in outputs:
        raise UserError(f"attention maps of {name} need its separate query/key projections; this block "
                        "runs fused ones (unfuse them with transformer.unfuse_qkv_projections())")
    query, key = outputs["to_q"], outputs["to_k"]
    norm_q, norm_k = getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)
    if encoder_hidden_states is not None:  # two streams: image in hidden_states, text in the other
        text = encoder_hidden_states.shape[1]
        first_image = text if rotary is not None else 0  # FLUX's rotary table runs [text, image]
        image = slice(first_image, first_image + hidden_states.shape[1])
        image_queries = _rotated(_heads(attn, query, norm_q), rotary, image)
        image_keys = _rotated(_heads(attn, key, norm_k), rotary, image)
        text_keys = _rotated(_heads(attn, outputs["add_k_proj"], getattr(attn, "norm_added_k", None)),
                             rotary, slice(0, text))
    else:  # FLUX single-stream: one sequence [text, image]
        text = hidden_states.shape[1] - image_tokens
        queries = _rotated(_heads(attn, query, norm_q), rotary, slice(None))
        keys = _rotated(_heads(attn, key, norm_k), rotary, slice(None))
        image_queries, image_keys, text_keys = queries[:, text:], keys[:, text:], keys[:, :text]
    return image_queries.transpose(1, 2), image_keys.transpose(1, 2), text_keys.transpose(1, 2)


class JointMapRecorder(SummedTokenMaps):
    """Sums text-to-image maps of chosen text tokens over transformer calls, averaged over blocks.

    Installed on the attention modules ``blocks`` (:func:`default_map_blocks` by default) of a FLUX or
    SD3 transformer whose image tokens form ``token_grid`` (rows, columns; row-major). Same interface
    as :class:`~loracompose.attention.auto_masks.TriggerMapRecorder`: :meth:`maps` is
    (rows, grid rows, grid columns, chosen tokens) summed since :meth:`reset`. ``requires_grad``: the
    maps keep the graph back to the transformer's inputs (run the call with grad mode on).
    """

    model_word = "transformer"

    def __init__(self, transformer: torch.nn.Module, token_grid: tuple[int, int], token_indices: Sequence[int], *,
                 blocks: Sequence[str] | None = None, conditional_rows: bool = False,
                 normaliser: Normaliser = "text", requires_grad: bool = False) -> None:
        if normaliser not in NORMALISERS:
            raise UserError(f"attention map normaliser {normaliser!r} is unknown; use 'text' or 'joint'")
        tokens = sorted(set(token_indices))
        if not tokens or tokens[0] < 0:
            raise UserError(f"token positions {list(token_indices)} must be non-empty and non-negative")
        super().__init__(tokens)
        self.token_grid = (int(token_grid[0]), int(token_grid[1]))
        self.blocks = list(blocks) if blocks is not None else default_map_blocks(transformer)
        known = set(joint_map_blocks(transformer))
        unknown = [name for name in self.blocks if name not in known]
        if unknown or not self.blocks:
            raise UserError(f"map blocks {unknown or self.blocks} are not joint attention blocks of this "
                            f"transformer; use names like {sorted(known)[0]!r}")
        self.transformer = transformer
        self._call: dict[str, torch.Tensor] = {}
        self._last: torch.Tensor | None = None
        self._previous: dict[str, Any] = {}
        for name in self.blocks:
            attn: Any = transformer.get_submodule(name)
            self._previous[name] = attn.processor
            attn.set_processor(JointMapProcessor(
                attn.processor, name, self._keep, token_indices=tokens, image_tokens=self._image_tokens,
                rows="cond" if conditional_rows else "all", normaliser=normaliser, requires_grad=requires_grad))
        self._hook = transformer.register_forward_hook(self._add_call)

    def _image_tokens(self) -> int:
        return self.token_grid[0] * self.token_grid[1]

    def _keep(self, name: str, maps: torch.Tensor) -> None:
        if maps.shape[1] != self._image_tokens():
            raise UserError(f"block {name} has {maps.shape[1]} image tokens, not the {self.token_grid} grid's "
                            f"{self._image_tokens()}")
        self._call[name] = maps

    def _add_call(self, _module: torch.nn.Module, _args: tuple, _output: object) -> None:
        if not self._call:
            return
        maps = torch.stack(list(self._call.values())).mean(dim=0)
        self._call = {}
        self._last = maps.reshape(maps.shape[0], *self.token_grid, maps.shape[-1])
        self._add(self._last)

    def end_call(self) -> None:
        """Close the current transformer call by hand: a call ended early (after its last map block)
        never reaches the forward hook that closes calls."""
        self._add_call(self.transformer, (), None)

    def last_call(self) -> torch.Tensor:
        """(rows, grid rows, grid columns, chosen tokens) of the latest transformer call."""
        if self._last is None:
            raise UserError("no attention maps were recorded: run the transformer while the recorder is installed")
        return self._last

    def remove(self) -> None:
        """Put the wrapped processors back and stop recording; safe to call twice."""
        if not self._previous:
            return
        self._hook.remove()
        for name, processor in self._previous.items():
            attn: Any = self.transformer.get_submodule(name)
            attn.set_processor(processor)
        self._previous = {}
