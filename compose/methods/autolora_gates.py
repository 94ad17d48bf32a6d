"""AutoLoRA's learned gates: one :class:`LayerGate` per adapted UNet layer (a :class:`GateSet`), and
their safetensors gate files. The method itself is :mod:`loracompose.methods.autolora`; training is
:mod:`loracompose.training.gates`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence, cast

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from loracompose.errors import UserError, first_line
from loracompose.outputs import atomic_write
from loracompose.validation import check_finite_tensors, regular_file

log = logging.getLogger(__name__)

GATE_FORMAT = "loracompose.autolora-gates/1"
GATE_VARIANTS = ("full", "no_base", "no_cross")
GATE_PARAMETERS = ("w_base", "w_lora", "w_cross", "bias", "w_out")
OPEN_GATE_OUT = 2.0  # w_out·σ(0) = 2·0.5 = 1 exactly: open gates reproduce the plain sum bit for bit


class LayerGate(torch.nn.Module):
    """The gate of one adapted layer: ``g = w_out ⊙ σ(w_b⊙LN(h) + w_l⊙LN(Δ) + w_c⊙(LN(h)⊙LN(Δ)) + b)``.

    Computed as ``w_out ⊙ σ(offset + slope⊙LN(Δ))`` with ``offset = w_b⊙LN(h) + b`` and
    ``slope = w_l + w_c⊙LN(h)`` taken once per layer call, so each further LoRA costs a layer norm
    and three element-wise ops.
    """

    def __init__(self, channels: int, variant: str = "full") -> None:
        super().__init__()
        check_variant(variant)
        self.variant = variant
        self.w_base = torch.nn.Parameter(torch.zeros(channels))
        self.w_lora = torch.nn.Parameter(torch.zeros(channels))
        self.w_cross = torch.nn.Parameter(torch.zeros(channels))
        self.bias = torch.nn.Parameter(torch.zeros(channels))
        self.w_out = torch.nn.Parameter(torch.full((channels,), OPEN_GATE_OUT))

    def base_terms(self, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset, slope) from the channels-last base output ``h``."""
        if self.variant == "no_cross":
            return self.bias, self.w_lora
        base_hat = F.layer_norm(base.float(), base.shape[-1:])
        offset = torch.addcmul(self.bias, self.w_base, base_hat) if self.variant == "full" else self.bias
        return offset, torch.addcmul(self.w_lora, self.w_cross, base_hat)

    def gates(self, base: torch.Tensor, deltas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The gate of each channels-last delta, in the delta's dtype."""
        offset, slope = self.base_terms(base)
        gates = []
        for delta in deltas:
            delta_hat = F.layer_norm(delta.float(), delta.shape[-1:])
            gates.append((self.w_out * torch.sigmoid(torch.addcmul(offset, slope, delta_hat))).to(delta.dtype))
        return gates

    def forward(self, base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.gates(base, [delta])[0]


def check_variant(variant: str) -> None:
    if variant not in GATE_VARIANTS:
        raise UserError(f"gate variant {variant!r} is not known; use one of {', '.join(GATE_VARIANTS)}")


class GateSet(torch.nn.Module):
    """One :class:`LayerGate` per adapted layer, addressed by the layer's module name in the UNet."""

    def __init__(self, channels: Mapping[str, int], variant: str = "full") -> None:
        super().__init__()
        check_variant(variant)
        self.variant = variant
        self.layer_names = sorted(channels)
        # ModuleDict keys may not contain dots; the file keeps the real module names.
        self.gates = torch.nn.ModuleDict({_module_key(name): LayerGate(channels[name], variant)
                                          for name in self.layer_names})

    def gate(self, layer: str) -> LayerGate:
        return cast(LayerGate, self.gates[_module_key(layer)])  # ModuleDict is typed as holding any Module

    def named_tensors(self) -> dict[str, torch.nn.Parameter]:
        """``<layer>.<parameter>`` -> parameter, the names the gate file uses."""
        return {f"{name}.{parameter}": getattr(self.gate(name), parameter)
                for name in self.layer_names for parameter in GATE_PARAMETERS}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor], source: str) -> int:
        """Copy the gates ``tensors`` holds for this set's layers; returns how many layers matched."""
        matched = 0
        with torch.no_grad():
            for name in self.layer_names:
                keys = [f"{name}.{parameter}" for parameter in GATE_PARAMETERS]
                if not all(key in tensors for key in keys):
                    continue
                for key, parameter in zip(keys, GATE_PARAMETERS):
                    target = getattr(self.gate(name), parameter)
                    if tensors[key].shape != target.shape:
                        raise UserError(f"gate file {source}: {key} has shape {tuple(tensors[key].shape)}, the model's "
                                        f"layer needs {tuple(target.shape)}; use gates trained for this base model")
                    target.copy_(tensors[key])
                matched += 1
        return matched


def _module_key(name: str) -> str:
    return name.replace(".", "::")


def lora_layer_channels(unet: torch.nn.Module, adapters: Sequence[str] | None = None) -> dict[str, int]:
    """Output channels of every UNet LoRA layer (holding one of ``adapters``, if given), by module name."""
    channels = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and (adapters is None or any(a in module.lora_A for a in adapters)):
            base = module.get_base_layer()
            channels[name] = int(getattr(base, "out_features", None) or base.out_channels)
    return channels


def save_gates(gates: GateSet, path: Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write the gates as safetensors (atomically), with their variant in the metadata."""
    tensors = {key: value.detach().float().cpu().contiguous() for key, value in gates.named_tensors().items()}
    info = {"format": GATE_FORMAT, "loracompose.gate_variant": gates.variant, **(metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=info))


def load_gates(path: str | Path, channels: Mapping[str, int]) -> GateSet:
    """Gates for the layers in ``channels`` from a gate file; layers it lacks keep open gates."""
    path = Path(path)
    tensors, metadata = read_gate_file(path)
    gates = GateSet(channels, metadata.get("loracompose.gate_variant", "full"))
    matched = gates.load_tensors(tensors, str(path))
    if channels and not matched:
        raise UserError(f"gate file {path} has no gate for any LoRA layer of this model; use gates trained for "
                        "this base model")
    if matched < len(channels):
        log.warning("gate file %s covers %d of %d LoRA layers; the others keep open gates", path, matched,
                    len(channels))
    return gates


def read_gate_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"gates {path}: only .safetensors gate files are loaded (pickled formats can run code)")
    if not path.exists():
        raise UserError(f"gate file not found: {path}; train one with train-gates or leave gates unset (= Merge)")
    regular_file(path, "gate file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"gate file {path} is damaged ({first_line(error)}); train it again") from None
    if metadata.get("format") != GATE_FORMAT:
        raise UserError(f"{path} is not a loracompose gate file (format {metadata.get('format')!r}); "
                        "train one with train-gates")
    check_finite_tensors(tensors, f"gate file {path}")
    return tensors, metadata
