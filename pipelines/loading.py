"""``load_pipeline``: a hub id, a local diffusers folder or a single-file checkpoint -> our pipeline.

SD1.5-family, SDXL, FLUX.1 and SD3 are told apart from ``model_index.json`` (folders, hub ids: its
``_class_name``) or from the checkpoint's keys (single files). Other families are refused in one line.
Weights load from safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError, safe_open

from loracompose.errors import UserError, first_line
from loracompose.validation import regular_file, check_device

from .compose_pipeline import ComposeMixin, LoraComposeSDPipeline, LoraComposeSDXLPipeline, quiet_loading

# A key only SDXL base checkpoints have (the second text encoder), as diffusers' own detection uses.
SDXL_CHECKPOINT_KEY = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (CUDA if present) or the named device; a UserError if it does not exist here."""
    return check_device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise UserError(f"dtype {dtype!r} is not known; use fp32, fp16 or bf16")
    return names[dtype]


# Key fragments of single-file DiT checkpoints (BFL's FLUX names, Stability's SD3 MMDiT names).
FLUX_CHECKPOINT_KEY = "double_blocks."
SD3_CHECKPOINT_KEY = "joint_blocks."
SUPPORTED_FAMILIES = "SD1.5/SD2, SDXL, FLUX.1 and SD3/SD3.5"


def pipeline_class_for_index(model_index: dict, source: str = "model") -> type[ComposeMixin]:
    """Our pipeline class for a ``model_index.json``, by its diffusers ``_class_name``."""
    class_name = str(model_index.get("_class_name", ""))
    if class_name in ("FluxPipeline", "StableDiffusion3Pipeline"):
        from .dit_pipelines import LoraComposeFluxPipeline, LoraComposeSD3Pipeline

        return LoraComposeFluxPipeline if class_name == "FluxPipeline" else LoraComposeSD3Pipeline
    if class_name and "StableDiffusion" not in class_name and "LatentConsistency" not in class_name:
        raise UserError(f"{source} is a {class_name}, a model family loracompose does not run; "
                        f"use a {SUPPORTED_FAMILIES} model")
    return LoraComposeSDXLPipeline if "XL" in class_name else LoraComposeSDPipeline


def load_pipeline(
    model: str | Path,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    config: str | Path | None = None,
) -> ComposeMixin:
    """Load an SD1.5/SDXL, FLUX.1 or SD3 model as a loracompose pipeline.

    Args:
        model: a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), a local diffusers folder,
            or a single-file ``.safetensors`` checkpoint.
        device: "auto" (CUDA if present), "cpu", "cuda", ...
        dtype: "auto" (on CUDA fp16, bf16 for FLUX/SD3; fp32 on CPU), "fp32", "fp16", "bf16" or a
            torch dtype.
        config: for single-file checkpoints offline, a diffusers folder (or hub id) of the same
            architecture whose configs describe the checkpoint.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)

    def dtype_for(cls: type[ComposeMixin]) -> torch.dtype:
        return auto_dtype(cls, torch_device) if dtype in (None, "auto") else torch_dtype

    path = Path(str(model)).expanduser()
    if path.exists() and not path.is_dir():
        regular_file(path, "model file")  # a FIFO would block the reader forever
    if path.is_dir():
        pipe = _load_folder(path, dtype_for)
    elif path.is_file():
        pipe = _load_single_file(path, dtype_for, config)
    elif _looks_like_local_path(str(model)):
        raise UserError(f"model {model} not found; pass a diffusers folder, a .safetensors checkpoint or a hub id")
    else:
        pipe = _load_hub(str(model), dtype_for)
    return pipe.to(torch_device)


def auto_dtype(cls: type[ComposeMixin], device: torch.device) -> torch.dtype:
    """``dtype="auto"`` for a pipeline class: fp32 on CPU; on CUDA fp16, but bf16 for the DiTs, whose
    activations overflow fp16 (FLUX.1 and SD3 are released and run in bf16)."""
    from .dit_pipelines import DiTComposeMixin

    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if issubclass(cls, DiTComposeMixin) else torch.float16


def _looks_like_local_path(text: str) -> bool:
    return (text.startswith((".", "/", "~")) or text.endswith((".safetensors", *PICKLED_SUFFIXES))
            or text.count("/") != 1)


DtypeFor = Callable[[type[ComposeMixin]], torch.dtype]


def _load_folder(path: Path, dtype: DtypeFor) -> ComposeMixin:
    index_file = path / "model_index.json"
    if not index_file.exists():
        raise UserError(f"model folder {path} has no model_index.json; pass a diffusers pipeline folder")
    cls = pipeline_class_for_index(json.loads(index_file.read_text()), f"model folder {path}")
    return _from_pretrained(cls, str(path), dtype)


def _load_hub(model_id: str, dtype: DtypeFor) -> ComposeMixin:
    try:
        index = DiffusionPipeline.load_config(model_id)
    except Exception as error:  # hub client errors have many types; all mean "not reachable here"
        raise UserError(
            f"model {model_id!r} is not a local folder or file and could not be fetched from the hub "
            f"({type(error).__name__}); download it first or pass a local path"
        ) from None
    return _from_pretrained(pipeline_class_for_index(index, f"model {model_id}"), model_id, dtype)


def _from_pretrained(cls: type[ComposeMixin], source: str, dtype: DtypeFor) -> ComposeMixin:
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls is LoraComposeSDPipeline else {}
    try:
        with quiet_loading():
            return cls.from_pretrained(source, torch_dtype=dtype(cls), use_safetensors=True, **extra)
    except (OSError, ValueError) as error:
        raise UserError(f"could not load model {source}: {first_line(error)}") from None


def _single_file_class(keys: set[str]) -> type[ComposeMixin]:
    """Our pipeline class for a single-file checkpoint, from its keys."""
    if any(key.startswith(FLUX_CHECKPOINT_KEY) or f".{FLUX_CHECKPOINT_KEY}" in key for key in keys):
        from .dit_pipelines import LoraComposeFluxPipeline

        return LoraComposeFluxPipeline
    if any(key.startswith(SD3_CHECKPOINT_KEY) or f".{SD3_CHECKPOINT_KEY}" in key for key in keys):
        from .dit_pipelines import LoraComposeSD3Pipeline

        return LoraComposeSD3Pipeline
    return LoraComposeSDXLPipeline if SDXL_CHECKPOINT_KEY in keys else LoraComposeSDPipeline


def _load_single_file(path: Path, dtype: DtypeFor, config: str | Path | None) -> ComposeMixin:
    if path.suffix.lower() in PICKLED_SUFFIXES:
        raise UserError(f"checkpoint {path} is a pickled file; only .safetensors checkpoints are loaded "
                        "(pickles can run code)")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"checkpoint {path} is not a .safetensors file; pass a diffusers folder or a "
                        ".safetensors checkpoint")
    regular_file(path, "checkpoint")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
    except (SafetensorError, OSError) as error:
        raise UserError(f"checkpoint {path} is truncated or not a safetensors file ({first_line(error)})") from None
    if keys and all("lora" in key.lower() or key.endswith(".alpha") for key in keys):
        raise UserError(f"{path} is a LoRA file, not a model checkpoint; pass it with --lora and give the base "
                        "model with --model")
    cls = _single_file_class(keys)
    extra = {"config": str(config)} if config else {}
    try:
        with quiet_loading():
            return cls.from_single_file(str(path), torch_dtype=dtype(cls), **extra)
    except Exception as error:  # diffusers raises many types here (missing config offline, bad keys)
        hint = "" if config else "; offline, pass --config with a diffusers folder of the same architecture"
        raise UserError(f"could not load checkpoint {path}: {first_line(error)}{hint}") from None

