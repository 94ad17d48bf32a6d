"""A LoRA file's UNet low-rank factors, as the weight-encoding retriever reads them: per adapted layer
A (r, d_in) and α/r·B (d_out, r), from diffusers/PEFT files directly or other formats via the converter."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from loracompose.errors import UserError
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


def read_unet_factors(path: Path, unet: nn.Module | None = None) -> LoraFactors:
    """The UNet low-rank factors of a LoRA file, with B scaled by its layer's scale.

    diffusers/PEFT LoRA files (``unet.<module>.lora_A.weight``) are read directly; every other format
    the converter loads (kohya and sgm names, LoCon, LoHa, LoKr, old diffusers) goes through
    :mod:`loracompose.formats` and gives its exact low-rank factors (LoHa's Khatri-Rao, LoKr's Kronecker
    factors). Layer names are resolved against ``unet`` when given, else against meta-device skeletons
    of the known base models (:mod:`loracompose.formats.skeletons`). Conv factors are flattened to
    matrices (A: (r, d_in·k·k), B: (d_out, r)). Text-encoder weights are ignored.
    """
    from loracompose.formats.convert import read_lora_tensors

    check_safetensors_file(path)
    tensors, metadata = read_lora_tensors(path)
    if _is_peft_unet(list(tensors)):
        state = {key.removeprefix("unet."): value for key, value in tensors.items() if key.startswith("unet.")}
        return _factors(state, _metadata_alphas(metadata))
    converted = _converted_unet(path, _unet_tensors(path, tensors), metadata, unet)
    return {module: (delta.down.reshape(delta.rank, -1).float(),
                     delta.up.reshape(delta.up.shape[0], delta.rank).float() * delta.scale)
            for module, delta in converted.items()}


def _is_peft_unet(keys: Sequence[str]) -> bool:
    unet = [key for key in keys if key.startswith("unet.")]
    return bool(unet) and all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in unet)


def _unet_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's UNet tensors (and keys no format knows, which the converter names in its refusal)."""
    from loracompose.formats.keys import parse_key

    kept = {}
    for key, tensor in tensors.items():
        parsed = parse_key(key)
        if parsed is not None and parsed.component != "unet":
            continue
        if parsed is not None and parsed.part == "magnitude":
            raise UserError(f"LoRA file {path} is a DoRA LoRA, whose weight change depends on the base model's "
                            "weights, which the retriever does not read; leave DoRA files out of the library")
        kept[key] = tensor
    if not kept:
        raise UserError(f"LoRA file {path} adapts no UNet layer; the retriever needs UNet LoRA layers")
    return kept


def _converted_unet(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                    unet: nn.Module | None) -> dict[str, Any]:
    """The converter's factors per UNet module, against ``unet`` or the first base-model skeleton they fit."""
    from loracompose.formats.convert import convert_lora
    from loracompose.formats.skeletons import skeleton_configs, unet_skeleton

    candidates = [unet] if unet is not None else [unet_skeleton(name) for name in skeleton_configs()]
    refusals = []
    for candidate in candidates:
        try:
            return convert_lora(path, tensors, metadata, {"unet": candidate}).layers.get("unet", {})
        except UserError as error:
            refusals.append(str(error))
    if len(set(refusals)) == 1:  # the same reason on every model: the file's format, not its base model
        raise UserError(refusals[0])
    raise UserError(f"LoRA file {path} fits no base model the retriever knows (SD1.5, SD2.x, SDXL, loracompose's "
                    "tiny models); use LoRAs made for one of them")


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
