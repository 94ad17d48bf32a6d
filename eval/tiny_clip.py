"""A tiny random open_clip model for offline tests: 1.7M parameters, 32 px.

    clip = build_tiny_clip(tmp_dir)
    scorer = ClipScorer.load(clip.name, clip.weights, config=clip.config)

Its scores mean nothing; it exercises every code path of the CLIPScore harness on a CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from loracompose.outputs import atomic_write, atomic_write_text

TINY_CLIP_NAME = "loracompose-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


@dataclass(frozen=True)
class TinyClip:
    """Where a built tiny CLIP lives: its model name, config JSON and safetensors weights."""

    name: str
    config: Path
    weights: Path


def build_tiny_clip(out_dir: str | Path, *, seed: int = 0) -> TinyClip:
    """Write ``loracompose-tiny-clip.json`` and ``loracompose-tiny-clip.safetensors`` (seeded) into out_dir."""
    import open_clip

    from .clipscore import register_model_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = atomic_write_text(out_dir / f"{TINY_CLIP_NAME}.json", json.dumps(TINY_CLIP_CONFIG, indent=2) + "\n")
    register_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    weights = atomic_write(out_dir / f"{TINY_CLIP_NAME}.safetensors", lambda temp: save_file(state, str(temp)))
    return TinyClip(TINY_CLIP_NAME, config, weights)
