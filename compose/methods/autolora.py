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
a safetensors file (``gates=``); layers the file lacks keep open gates. With no file given, a base model
that a shipped gate file was trained for gets that file: the embedded toy world's gates
(``toyworld/weights/gates.safetensors``) when the model's weights fingerprint
(:func:`~loracompose.provenance.model_fingerprint`) equals the one the file records; any other model
gets open gates. ``gates="open"`` asks for open gates on every model.

Gate training: :mod:`loracompose.training.gates`.

Departures from the released code: gates start open (the released init draws w_b, w_l, w_c at
random, so an untrained gate already changes the image); a constant learning rate (the reference
restarts a cosine schedule every 50 steps); no "global LoRA" term (not public); no timestep input
(none in the released gate either).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from loracompose.errors import UserError
from loracompose.lazy import LazyImport, lazy_exports
from loracompose.lora import LoadedLora
from loracompose.methods.base import ALL_FAMILIES, CompositionMethod, require_loras
from loracompose.pipelines.values import Prediction, Step

if TYPE_CHECKING:
    import torch
    from peft.tuners.lora import LoraLayer

    from loracompose.attention.lora_deltas import active_adapters, adapter_delta
    from loracompose.methods.autolora_gates import GateSet, _module_key, load_gates, lora_layer_channels, read_gate_file
    from loracompose.pipelines.denoiser import Denoiser
    from loracompose.pipelines.patches import PatchStack
else:  # imported on first use: the settings dataclass imports without the model stack
    torch = LazyImport("torch")
    LoraLayer = LazyImport("peft.tuners.lora", "LoraLayer")
    active_adapters = LazyImport("loracompose.attention.lora_deltas", "active_adapters")
    adapter_delta = LazyImport("loracompose.attention.lora_deltas", "adapter_delta")
    GateSet, _module_key, load_gates, lora_layer_channels, read_gate_file = (
        LazyImport("loracompose.methods.autolora_gates", name)
        for name in ("GateSet", "_module_key", "load_gates", "lora_layer_channels", "read_gate_file"))

# The gates and gate files live in autolora_gates (torch modules); the rest of its names stay importable here.
__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(
    ["GATE_FORMAT", "GATE_VARIANTS", "GATE_PARAMETERS", "OPEN_GATE_OUT", "LayerGate", "check_variant", "save_gates"],
    "loracompose.methods.autolora_gates"))

# ------------------------------------------------------------------------------------ gated layers


# (layer name, adapters, h, [Δ_i]) -> [g_i], all channels last
GateFunction = Callable[[str, Sequence[str], "torch.Tensor", Sequence["torch.Tensor"]], Sequence["torch.Tensor"]]


class GatedFusion:
    """Every UNet LoRA layer's forward replaced by ``h + Σ_i g_i ⊙ Δ_i`` with the gates from ``gate``,
    registered on ``patches`` (a generation's ``run.patches``); without one the fusion keeps its own
    and :meth:`restore` puts PEFT's forward back. Gates see channels last (conv outputs are moved)."""

    def __init__(self, unet: torch.nn.Module, gate: GateFunction, patches: PatchStack | None = None) -> None:
        from loracompose.pipelines.patches import PatchStack

        self.gate = gate
        target = patches if patches is not None else PatchStack()
        self._own_patches = target if patches is None else None
        for name, module in unet.named_modules():
            if isinstance(module, LoraLayer):
                target.forward(module, MethodType(self._forward_for(name), module))

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
        """Put PEFT's forwards back (a fusion made without a generation's patch stack)."""
        if self._own_patches is None:
            raise RuntimeError("this GatedFusion is on a generation's patch stack, which undoes it")
        self._own_patches.unwind()


# ------------------------------------------------------------------------------------ the method

OPEN_GATES = "open"  # the ``gates`` value for open gates (= Merge) even where shipped gates would apply


def shipped_gates(pipe: Any) -> Path | None:
    """The shipped gate file trained for ``pipe``'s base model, or None.

    Today that is the embedded toy world's file, recognised by the model fingerprint in its training
    record (a copy of the toy world elsewhere keeps it; another model, or the toy world in another
    dtype, does not match).
    """
    from loracompose.assets.embedded import PACKAGED_TOYWORLD
    from loracompose.provenance import model_fingerprint

    path = PACKAGED_TOYWORLD / "gates.safetensors"
    trained_for = _gate_file_model_digest(path) if path.is_file() else None
    return path if trained_for is not None and trained_for == model_fingerprint(pipe) else None


def _gate_file_model_digest(path: Path) -> str | None:
    """The base-model digest a gate file's training record names (None when it records none)."""
    import json

    _, metadata = read_gate_file(path)
    try:
        return json.loads(metadata["loracompose.training"])["model"]["digest"]
    except (KeyError, TypeError, ValueError):
        return None



@dataclass
class AutoLoRA(CompositionMethod):
    """All LoRAs in one UNet pass; each LoRA's delta on each adapted layer scaled by a learned gate.

    Args:
        gates: a gate file from :func:`~loracompose.training.gates.train_gates` (safetensors); None: the
            shipped gates of the base model where there are some (the embedded toy world's), else open
            gates, which is Merge; ``"open"``: open gates on every model.
    """

    name: ClassVar[str] = "autolora"
    families: ClassVar[frozenset[str]] = ALL_FAMILIES
    gates: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.gate_set: GateSet | None = None
        self.gate_file: Path | None = None  # the file this generation's gates came from (None: open gates)

    def check(self, loras: Sequence[LoadedLora]) -> None:
        require_loras(self.name, loras)
        if self.gates not in (None, OPEN_GATES):
            read_gate_file(Path(self.gates))

    def prepare(self, pipe: Any, loras: Sequence[LoadedLora]) -> None:
        if self.gates == OPEN_GATES:
            self.gate_file = None
        elif self.gates is not None:
            self.gate_file = Path(self.gates)
        else:
            self.gate_file = shipped_gates(pipe)

    def settings(self) -> dict[str, Any]:
        """As every method's, with the shipped gate file a default run used in place of None."""
        settings = super().settings()
        if self.gates is None and self.gate_file is not None:
            settings["gates"] = str(self.gate_file)
        return settings

    def start(self, run: Denoiser) -> None:
        channels = lora_layer_channels(run.unet, [lora.name for lora in self.loras])
        self.gate_set = load_gates(self.gate_file, channels) if self.gate_file else GateSet(channels)
        self.gate_set.to(_unet_device(run.unet))
        GatedFusion(run.unet, self.layer_gates, run.patches)

    def layer_gates(self, layer: str, adapters: Sequence[str], base: torch.Tensor,
                    deltas: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """The gate of each LoRA's delta on ``layer`` (open on layers without a gate)."""
        if self.gate_set is None or _module_key(layer) not in self.gate_set.gates:
            return [torch.ones((), dtype=delta.dtype, device=delta.device) for delta in deltas]
        return self.gate_set.gate(layer).gates(base, deltas)

    def predict(self, run: Denoiser, step: Step, latents: torch.Tensor) -> Prediction:
        return run.predict(latents, step, [self.branch(*self.loras)])[0]


def _unet_device(unet: torch.nn.Module) -> torch.device:
    return next(unet.parameters()).device
