"""A LoRA file's UNet low-rank factors, as the weight-encoding retriever reads them: per adapted layer
A (r, d_in) and α/r·B (d_out, r), from diffusers/PEFT files directly or other formats via diffusers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open

from loracompose.errors import UserError, first_line
from loracompose.validation import regular_file


@dataclass(frozen=True)
class AdaptedLayer:
    """One UNet layer a LoRA adapts: its module name, sizes, and kind (which projection ``P`` it shares)."""

    name: str
    in_features: int
    out_features: int

    @property
    def kind(self) -> str:
        """Layers of the same role and width share a projection, e.g. ``attn2.to_k:320``."""
        words = [part for part in self.name.split(".") if not part.isdigit()]
        return f"{'.'.join(words[-2:])}:{self.out_features}".replace(".", "_")


LoraFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, d_in), s·B (d_out, r))


def read_unet_factors(path: Path) -> LoraFactors:
    """The UNet low-rank factors of a LoRA file, with B scaled by alpha/r.

    diffusers/PEFT files (``unet.<module>.lora_A.weight``) are read directly; other formats (kohya,
    old diffusers) go through diffusers' own conversion. Conv factors are flattened to matrices
    (A: (r, d_in·k·k), B: (d_out, r)).
    """
    check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            keys = list(handle.keys())
            direct = _is_peft_unet(keys)
            state = {key.removeprefix("unet."): handle.get_tensor(key) for key in keys if key.startswith("unet.")} \
                if direct else None
    except (SafetensorError, OSError) as error:
        raise UserError(f"LoRA file {path} cannot be read ({first_line(error)}); remove or replace it") from None
    if state is None:
        state, alphas = _converted_unet_state(path)
    else:
        alphas = _metadata_alphas(metadata)
    return _factors(state, alphas)


def _is_peft_unet(keys: Sequence[str]) -> bool:
    unet = [key for key in keys if key.startswith("unet.")]
    return bool(unet) and all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in unet)


def _converted_unet_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """UNet LoRA tensors in PEFT naming without the ``unet.`` prefix, and alpha per module, via diffusers."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    from loracompose.pipelines.compose_pipeline import quiet_loading

    try:
        with quiet_loading():
            state, network_alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path),
                                                                                      return_lora_metadata=True)
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as error:
        raise UserError(f"LoRA file {path} cannot be read as a LoRA ({first_line(error)}); "
                        "remove or replace it") from None
    unet = convert_unet_state_dict_to_peft({key.removeprefix("unet."): value for key, value in state.items()
                                            if key.startswith("unet.")})
    if not network_alphas:
        return unet, _metadata_alphas(metadata or {})
    named = {key.removeprefix("unet.").removesuffix(".alpha"): value for key, value in network_alphas.items()
             if key.startswith("unet.")}
    converted = convert_unet_state_dict_to_peft(named)
    return unet, {key.removesuffix(".lora_A.weight"): float(value) for key, value in converted.items()}


def _metadata_alphas(metadata: Mapping[str, Any]) -> dict[str, float]:
    """Alpha for every module (``"*"``) from diffusers' adapter metadata or loracompose's key; none: alpha = r."""
    adapter = metadata.get("lora_adapter_metadata")
    if isinstance(adapter, str):
        try:
            adapter = json.loads(adapter)
        except json.JSONDecodeError:
            adapter = None
    if isinstance(adapter, Mapping) and "unet.lora_alpha" in adapter:
        return {"*": float(adapter["unet.lora_alpha"])}
    if "unet.lora_alpha" in metadata:
        return {"*": float(metadata["unet.lora_alpha"])}
    stored = metadata.get("loracompose.alpha")
    return {"*": float(stored)} if stored else {}


def _factors(unet: Mapping[str, torch.Tensor], alphas: Mapping[str, float]) -> LoraFactors:
    factors: LoraFactors = {}
    for key, down in unet.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        up = unet.get(f"{module}.lora_B.weight")
        if up is None:
            continue
        rank = down.shape[0]
        scale = alphas.get(module, alphas.get("*", rank)) / rank
        factors[module] = (down.reshape(rank, -1).float(), up.reshape(up.shape[0], rank).float() * scale)
    return factors


def check_safetensors_file(path: Path) -> None:
    """Refuse anything but an existing ``.safetensors`` file (pickled formats can run code)."""
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path} is not a .safetensors file; only safetensors are loaded "
                        "(pickled formats can run code)")
    if not path.exists():
        raise UserError(f"file not found: {path}; check the path")
    regular_file(path, "file")  # a FIFO would block the reader forever


def layer_schema(factor_sets: Sequence[LoraFactors]) -> tuple[AdaptedLayer, ...]:
    """The union of adapted layers over LoRAs, sorted by name; a layer's shape must agree across files."""
    shapes: dict[str, tuple[int, int]] = {}
    for factors in factor_sets:
        for name, (down, up) in factors.items():
            shape = (down.shape[1], up.shape[0])
            if shapes.setdefault(name, shape) != shape:
                raise UserError(f"LoRA layer {name} has shape {shape} in one file and {shapes[name]} in another; "
                                "the library mixes base models: keep one base model per library")
    if not shapes:
        raise UserError("no LoRA in the library adapts the UNet; the retriever needs UNet LoRA layers")
    return tuple(AdaptedLayer(name, *shapes[name]) for name in sorted(shapes))


@dataclass
class StackedFactors:
    """Factors of several LoRAs per schema layer, ranks zero-padded: A (N, r_max, d_in), B (N, d_out, r_max).

    Zero rows of A and columns of B add nothing to q·Aᵀ·Bᵀ, so padding changes no token.
    """

    down: list[torch.Tensor]
    up: list[torch.Tensor]

    @property
    def count(self) -> int:
        return int(self.down[0].shape[0])

    def select(self, indices: Sequence[int]) -> StackedFactors:
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        return StackedFactors([a[rows] for a in self.down], [b[rows] for b in self.up])

    def to(self, device: torch.device) -> StackedFactors:
        return StackedFactors([a.to(device) for a in self.down], [b.to(device) for b in self.up])


def stack_factors(factor_sets: Sequence[LoraFactors], layers: Sequence[AdaptedLayer]) -> StackedFactors:
    downs, ups = [], []
    for layer in layers:
        present = [factors[layer.name] for factors in factor_sets if layer.name in factors]
        rank = max((down.shape[0] for down, _ in present), default=1)
        down = torch.zeros(len(factor_sets), rank, layer.in_features)
        up = torch.zeros(len(factor_sets), layer.out_features, rank)
        for index, factors in enumerate(factor_sets):
            if layer.name in factors:
                a, b = factors[layer.name]
                down[index, :a.shape[0]] = a
                up[index, :, :b.shape[1]] = b
        downs.append(down)
        ups.append(up)
    return StackedFactors(downs, ups)
