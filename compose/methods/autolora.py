"""AutoLoRA gated fusion (Li et al. 2025; docs/methods/autolora.md), ported from FLUX to SD1.5 / SDXL.

Inference — one UNet pass per step with every LoRA active, as Merge, but on every adapted UNet layer::

    h   <- W·x                                    # the base output
    Δ_i <- w_i·(α_i/r_i)·B_i·A_i·x                # LoRA i's delta, as PEFT computes it
    ĥ   <- LN(h);  Δ̂_i <- LN(Δ_i)                 # layer norm over channels, no affine
    g_i <- w_out ⊙ σ(w_b⊙ĥ + w_l⊙Δ̂_i + w_c⊙(ĥ⊙Δ̂_i) + b)   # per token, per output channel
    y   <- h + Σ_i g_i ⊙ Δ_i

One gate (w_b, w_l, w_c, b, w_out: one value per output channel each) per adapted layer, shared by all
LoRAs. Variants: ``no_base`` drops w_b, ``no_cross`` keeps w_l alone. Untrained gates are *open*:
w_b = w_l = w_c = b = 0 and w_out = 2, so g_i = 2·σ(0) = 1 exactly and the method equals Merge bit for
bit. Text encoders run their deltas summed (as Merge): they run once per generation. Gates load from
a safetensors file (``gates=``); layers the file lacks keep open gates.

Gate training: :mod:`loracompose.training.gates`.

Departures from the released code: gates start open (the released init draws w_b, w_l, w_c at
random, so an untrained gate already changes the image); a constant learning rate (the reference
restarts a cosine schedule every 50 steps); no "global LoRA" term (not public); no timestep input
(none in the released gate either).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from loracompose.errors import UserError
from loracompose.lora import LoadedLora
from loracompose.methods.base import CompositionMethod, require_loras
from loracompose.outputs import atomic_write
from loracompose.attention.lora_deltas import active_adapters, adapter_delta
from loracompose.pipelines.loop import Denoiser, Prediction, Step

log = logging.getLogger(__name__)

GATE_FORMAT = "loracompose.autolora-gates/1"
GATE_VARIANTS = ("full", "no_base", "no_cross")
GATE_PARAMETERS = ("w_base", "w_lora", "w_cross", "bias", "w_out")
OPEN_GATE_OUT = 2.0  # w_out·σ(0) = 2·0.5 = 1 exactly: open gates reproduce the plain sum bit for bit


# ------------------------------------------------------------------------------------ the gate


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
        return self.gates[_module_key(layer)]

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
    if not path.is_file():
        raise UserError(f"gate file not found: {path}; train one with train-gates or leave gates unset (= Merge)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"gate file {path} is damaged ({str(error).splitlines()[0][:200]}); train it again") from None
    if metadata.get("format") != GATE_FORMAT:
        raise UserError(f"{path} is not a loracompose gate file (format {metadata.get('format')!r}); "
                        "train one with train-gates")
    return tensors, metadata


# ------------------------------------------------------------------------------------ gated layers


# (layer name, adapters, h, [Δ_i]) -> [g_i], all channels last
GateFunction = Callable[[str, Sequence[str], torch.Tensor, Sequence[torch.Tensor]], Sequence[torch.Tensor]]


class GatedFusion:
    """Every UNet LoRA layer's forward replaced by ``h + Σ_i g_i ⊙ Δ_i`` with the gates from ``gate``;
    :meth:`restore` puts PEFT's forward back. Gates see channels last (conv outputs are moved)."""

    def __init__(self, unet: torch.nn.Module, gate: GateFunction) -> None:
        self.gate = gate
        self.layers: list[LoraLayer] = []
        for name, module in unet.named_modules():
            if isinstance(module, LoraLayer):
                module.forward = MethodType(self._forward_for(name), module)
                self.layers.append(module)

    def _forward_for(self, layer_name: str) -> Callable[..., torch.Tensor]:
        gate = self.gate

        def gated_forward(layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if kwargs.pop("adapter_names", None) is not None:
                raise UserError("AutoLoRA's gated layers do not take per-row adapters; run it as one branch")
            adapters = active_adapters(layer)
            base = layer.get_base_layer()(x, *args, **kwargs)
            if not adapters:
                return base
            deltas = [adapter_delta(layer, x, adapter) for adapter in adapters]
            if base.ndim == 4:  # conv: (B, C, H, W)
                gates = gate(layer_name, adapters, base.movedim(1, -1), [d.movedim(1, -1) for d in deltas])
                gates = [g.movedim(-1, 1) for g in gates]
            else:
                gates = gate(layer_name, adapters, base, deltas)
            output = base
            for weight, delta in zip(gates, deltas):
                output = torch.addcmul(output, weight, delta)  # weight 1 adds delta exactly, as PEFT does
            return output

        return gated_forward

    def restore(self) -> None:
        for layer in self.layers:
            if "forward" in layer.__dict__:
                del layer.forward
        self.layers = []


# ------------------------------------------------------------------------------------ the method


@dataclass
class AutoLoRA(CompositionMethod):
    """All LoRAs in one UNet pass; each LoRA's delta on each adapted layer scaled by a learned gate.

    Args:
        gates: a gate file from :func:`train_gates` (safetensors); None: open gates, which is Merge.
    """

    name: ClassVar[str] = "autolora"
    gates: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.gate_set: GateSet | None = None
        self._fusion: GatedFusion | None = None

    def check(self, loras: Sequence[LoadedLora]) -> None:
        require_loras(self.name, loras)
        if self.gates is not None:
            read_gate_file(Path(self.gates))

    def start(self, run: Denoiser) -> None:
        channels = lora_layer_channels(run.unet, [lora.name for lora in self.loras])
        self.gate_set = load_gates(self.gates, channels) if self.gates else GateSet(channels)
        self.gate_set.to(_unet_device(run.unet))
        self._fusion = GatedFusion(run.unet, self.layer_gates)

    def layer_gates(self, layer: str, adapters: Sequence[str], base: torch.Tensor,
                    deltas: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """The gate of each LoRA's delta on ``layer`` (open on layers without a gate)."""
        if self.gate_set is None or _module_key(layer) not in self.gate_set.gates:
            return [torch.ones((), dtype=delta.dtype, device=delta.device) for delta in deltas]
        return self.gate_set.gate(layer).gates(base, deltas)

    def predict(self, run: Denoiser, step: Step, latents: torch.Tensor) -> Prediction:
        return run.predict(latents, step, [self.branch(*self.loras)])[0]

    def finish(self, run: Denoiser) -> None:
        if self._fusion is not None:
            self._fusion.restore()
            self._fusion = None


def _unet_device(unet: torch.nn.Module) -> torch.device:
    return next(unet.parameters()).device
