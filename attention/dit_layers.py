"""Which tokens a LoRA layer of a DiT (FLUX.1, SD3/SD3.5) transformer sees, from its module name.

On a UNet every adapted layer sees image positions. A DiT's layers see one of four things:

* ``"image"``: image tokens only, (batch, image tokens, channels), or SD3's patchify convolution
  ``pos_embed.proj`` (batch, channels, token rows, token columns): ``x_embedder``, the image stream's
  ``attn.to_q/k/v/to_out``, ``ff``, SD3.5's image-only ``attn2``, ``proj_out``;
* ``"text"``: text tokens only: ``context_embedder``, the context stream of a joint block
  (``attn.add_q_proj/add_k_proj/add_v_proj``, ``attn.to_add_out``, ``ff_context``);
* ``"joint"``: FLUX's single-stream blocks (``single_transformer_blocks.N``), on the concatenated
  sequence in the model's ``joint_order`` (FLUX: text tokens first, then the image tokens);
* ``"vector"``: (batch, features) layers with no tokens: timestep/guidance/pooled-text embeddings and
  the adaptive-norm modulations (``norm1.linear``, ``norm1_context.linear``, ``norm.linear``, ``norm_out``).

``"vector"`` is told by the output's shape at call time; the other three by name.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from peft.tuners.lora import LoraLayer

from loracompose.errors import UserError

StreamRole = Literal["image", "text", "joint", "vector"]

_TEXT = re.compile(r"(^|\.)(add_q_proj|add_k_proj|add_v_proj|to_add_out|ff_context|context_embedder|norm1_context)"
                   r"(\.|$)")
_JOINT = re.compile(r"^single_transformer_blocks\.\d+\.")
# The text part of joint attention's keys and values: what TARA masks by token on DiTs.
_TEXT_KV = re.compile(r"(^|\.)attn\.(add_k_proj|add_v_proj)$")
_JOINT_KV = re.compile(r"^single_transformer_blocks\.\d+\.attn\.(to_k|to_v)$")


def stream_role(name: str) -> StreamRole:
    """The tokens the layer ``name`` (its module path in the transformer) sees when its output has a token axis."""
    if _TEXT.search(name):
        return "text"
    if _JOINT.match(name):
        return "joint"
    return "image"


def lora_layers(transformer: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    """(name, layer) of every PEFT LoRA layer of the transformer."""
    return [(name, module) for name, module in transformer.named_modules() if isinstance(module, LoraLayer)]


def text_key_value_layers(transformer: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    """The LoRA layers whose outputs hold keys/values of text tokens: joint blocks' ``add_k_proj`` /
    ``add_v_proj`` (FLUX double blocks, SD3) and FLUX single blocks' ``to_k`` / ``to_v`` (text rows only)."""
    return [(name, layer) for name, layer in lora_layers(transformer)
            if _TEXT_KV.search(name) or _JOINT_KV.match(name)]


def text_rows(role: StreamRole, tokens: int, image_tokens: int, joint_order: tuple[str, ...],
              layer_name: str) -> slice:
    """The token axis slice of the text rows of a layer output with ``tokens`` tokens (empty for image layers)."""
    if role == "text":
        return slice(0, tokens)
    if role == "image":
        if tokens != image_tokens:
            raise UserError(f"DiT layer {layer_name} has {tokens} tokens where {image_tokens} image tokens were "
                            "expected; regional LoRA cannot place its delta")
        return slice(0, 0)
    text = tokens - image_tokens
    if text <= 0:
        raise UserError(f"DiT layer {layer_name} has {tokens} tokens, no more than the {image_tokens} image tokens; "
                        "it is not a joint text+image sequence")
    return slice(0, text) if joint_order[0] == "text" else slice(image_tokens, tokens)


def image_rows(role: StreamRole, tokens: int, image_tokens: int, joint_order: tuple[str, ...]) -> slice:
    """The token axis slice of the image rows (empty for text layers)."""
    if role == "text":
        return slice(0, 0)
    if role == "image":
        return slice(0, tokens)
    return slice(tokens - image_tokens, tokens) if joint_order[0] == "text" else slice(0, image_tokens)
