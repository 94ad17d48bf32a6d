"""Hostile and broken files the reliability catalogue feeds to every front end (built per test)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SPARSE_BYTES = 4 * 1024**4  # 4 TiB of tensor data promised: more memory than any machine here has


def poisoned_lora(source: Path, out: Path, value: float) -> Path:
    """A copy of a LoRA whose up (B) matrices are all ``value`` (Inf, NaN): a valid file, poison when fused."""
    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = {key: torch.full_like(tensor, value) if "lora_B" in key or "lora_up" in key else tensor
               for key, tensor in load_file(str(source)).items()}
    save_file(tensors, str(out), metadata=metadata)
    return out


def misshapen_lora(source: Path, out: Path) -> Path:
    """A copy of a LoRA whose down (A) matrices take 8 more input features than the model's layers have."""
    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = {key: torch.cat([tensor, tensor[:, :8]], dim=1) if "lora_A" in key else tensor
               for key, tensor in load_file(str(source)).items()}
    save_file(tensors, str(out), metadata=metadata)
    return out


def sparse_huge_lora(out: Path) -> Path | None:
    """A sparse file with a consistent header promising ``SPARSE_BYTES`` of LoRA tensor data (None where
    the file system cannot hold a file that large)."""
    rows = SPARSE_BYTES // 4 // 1024
    header = {"unet.a.to_q.lora_A.weight": {"dtype": "F32", "shape": [rows, 1024], "data_offsets": [0, SPARSE_BYTES]}}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    try:
        with open(out, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            handle.truncate(8 + len(encoded) + SPARSE_BYTES)
    except OSError:
        out.unlink(missing_ok=True)
        return None
    return out


def fifo(out: Path) -> Path:
    """A named pipe called ``*.safetensors``: reading it would block until someone writes."""
    os.mkfifo(out)
    return out
