"""What a trained file records about its inputs: names and digests, never the training machine's paths.

LoRA and gate files travel (shared with others, shipped inside this package), so their metadata
names the base model by a display name and a digest of its weights, the LoRAs they were trained on
by name and a digest of their tensors, and the training images by count (and a digest of their
captions): never a folder path or a file name of the machine they were trained on.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

# An absolute POSIX, home or Windows path at the start of a token; a temp folder's name; an image file.
_MACHINE_SPECIFIC = re.compile(
    r"""(?:^|(?<=[\s"'=:(\[,]))(?:/|~/|[A-Za-z]:\\)[^\s"']+"""
    r"|\b(?:tmp\w*|temp|pytest-\d+|pytest-of-\w+)\b"
    r"|[^\s\"'/\\]+\.(?:png|jpe?g|webp|bmp|gif|tiff?)\b",
    re.IGNORECASE,
)


def model_fingerprint(pipe: Any) -> str:
    """Identity of the pipeline's base model: a hash of its class and a sample of its UNet, VAE and
    text encoder weights (the start of the first and last base parameter of each, as loaded: the
    dtype counts), so a moved folder keeps its identity and a different checkpoint at the same path does not."""
    digest = hashlib.sha256(type(pipe).__name__.encode())
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        # LoRA parameters come and go with loaded adapters; only the base weights identify the model.
        parameters = [p for n, p in module.named_parameters() if "lora_" not in n]
        for parameter in (parameters[0], parameters[-1]):
            digest.update(name.encode())
            digest.update(_tensor_bytes(parameter))
    return digest.hexdigest()[:16]


def _tensor_bytes(tensor: torch.Tensor, sample: int = 4096) -> bytes:
    """Shape and first ``sample`` values (a text encoder's first parameter alone holds ~40 M)."""
    values = tensor.detach().reshape(-1)[:sample].to("cpu", torch.float32).numpy().tobytes()
    return str(tuple(tensor.shape)).encode() + values


def model_name(model: str | Path) -> str:
    """A display name of a base model: a hub id as given; a local folder or file by its own name only."""
    text = str(model)
    path = Path(text).expanduser()
    return path.resolve().name if text and path.exists() else text


def portable_name(name: str) -> str:
    """``name`` with any local path in it replaced by the file or folder's own name, plus a digest
    of a file's bytes (``local-dir:/home/me/clip`` -> ``local-dir:clip``)."""
    prefix, _, rest = name.rpartition(":") if ":" in name and not Path(name).exists() else ("", "", name)
    path = Path(rest).expanduser()
    if not rest or not path.exists():
        return name
    from loracompose.outputs import file_sha256

    portable = f"{path.resolve().name}@{file_sha256(path)[:16]}" if path.is_file() else path.resolve().name
    return f"{prefix}:{portable}" if prefix else portable


def model_identity(model: str | Path, pipe: Any) -> dict[str, str]:
    """``{"name", "digest"}`` of the base model ``pipe`` was loaded from (``model``: as the user gave it)."""
    return {"name": model_name(model), "digest": model_fingerprint(pipe)}


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a safetensors file's tensors (names, dtypes, shapes, values), its metadata left out,
    so a file whose metadata is edited keeps its digest."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as handle:
        for key in sorted(handle.keys()):
            tensor = handle.get_tensor(key).contiguous()
            digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def lora_identity(name: str, path: str | Path) -> dict[str, str]:
    """``{"name", "weights_sha256"}`` of a LoRA a file was trained on."""
    return {"name": name, "weights_sha256": weights_sha256(path)}


def captions_sha256(captions: Sequence[str]) -> str:
    """One digest of the training captions, in order (the captions themselves stay with the data)."""
    return hashlib.sha256(json.dumps(list(captions)).encode()).hexdigest()


def machine_specific_strings(metadata: Mapping[str, str]) -> list[str]:
    """``key: match`` for every metadata value naming a path, a temp folder or an image file:
    what a shipped or shared file must not carry."""
    return [f"{key}: {match.group(0)}" for key, value in sorted(metadata.items())
            for match in _MACHINE_SPECIFIC.finditer(str(value))]
