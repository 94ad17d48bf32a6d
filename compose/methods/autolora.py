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

Gate training (:func:`train_gates`; §10.3) on a set of LoRAs, base model and LoRAs frozen::

    per LoRA i: x0_i <- VAE latent of its showcase image (``<file stem>.png`` beside it, else one
                generated with LoRA i alone, saved in the work folder); c_i <- its caption
    for each step (every draw seeded by (seed, step)):
        (i, j) <- two different LoRAs;  activate both;  x0 ~ posterior(x0_i);  ε, t
        c <- "" with probability p_drop (0.3), else c_i   # text encoders: both LoRAs' deltas summed, as at inference
        L <- ‖ε − U(x_t, t, c)‖² + max(0, m − ‖ε − U(x_t, t, c_j)‖²)      # m = 0.5
        AdamW step on the gates
        every K steps and at the end: checkpoint (gates + AdamW state as safetensors)
    write the gates as safetensors

Departures from the released code: gates start open (the released init draws w_b, w_l, w_c at
random, so an untrained gate already changes the image); a constant learning rate (the reference
restarts a cosine schedule every 50 steps); no "global LoRA" term (not public); no timestep input
(none in the released gate either).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MethodType, SimpleNamespace
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from loracompose.errors import UserError
from loracompose.library import LibraryEntry, entry_from_lora, open_library
from loracompose.lora import LoadedLora, LoraSpec, with_trigger_words
from loracompose.methods.base import CompositionMethod, require_loras
from loracompose.outputs import atomic_write
from loracompose.training.trainer import (
    IMAGE_SUFFIXES,
    TrainingConditioning,
    check_resolution,
    check_work_dir,
    checkpoint_dirs,
    checkpoint_folder,
    encode_images,
    encode_prompt,
    generator,
    load_checkpoint,
    load_training_image,
    noise_target,
    resolve_training_dtype,
    save_checkpoint,
)
from loracompose.attention.lora_deltas import active_adapters, adapter_delta
from loracompose.pipelines.adapters import AdapterController
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


# ------------------------------------------------------------------------------------ gate training


@dataclass
class GateTrainingSettings:
    """``train-gates``: the LoRA set and how to train the gates.

    Args:
        model: base model (hub id, diffusers folder or single file, as ``load_pipeline``).
        loras: LoRA files and/or library folders (at least 2 LoRAs in all).
        out: the ``.safetensors`` gate file to write.
        variant: ``full``, ``no_base`` or ``no_cross`` (the gate formula's terms).
        margin, caption_dropout: the hinge margin on the other LoRA's caption and the caption drop rate.
        showcase_steps: denoising steps of a generated showcase image (LoRAs without a ``<stem>.png``).
        resolution: training size in pixels (default: the model's native size).
    """

    model: str
    loras: Sequence[Path]
    out: Path
    variant: str = "full"
    steps: int = 1000
    learning_rate: float = 1e-4
    margin: float = 0.5
    caption_dropout: float = 0.3
    showcase_steps: int = 30
    resolution: int | None = None
    seed: int = 0
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    work_dir: Path | None = None
    resume: bool = False
    device: str = "auto"
    dtype: str = "auto"
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.loras = [Path(path) for path in self.loras]
        self.out = Path(self.out)
        self.work_dir = checkpoint_folder(self.out, self.work_dir)


@dataclass(frozen=True)
class ResolvedGateSettings:
    """What a checkpoint must agree with to be resumed."""

    model: str
    loras: tuple[str, ...]
    variant: str
    learning_rate: float
    margin: float
    caption_dropout: float
    resolution: int
    seed: int
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class GateTrainingResult:
    path: Path
    steps: int
    history: list[dict[str, float]]
    gates: GateSet
    work_dir: Path
    resumed_from: int = 0
    train_seconds: float = 0.0


@dataclass
class GateTrainingData:
    """Everything a step needs: the pipeline, the LoRAs, their showcase latents and captions' conditioning."""

    pipe: Any
    loras: list[LoadedLora]
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    images: list[Any]  # TrainingImage per LoRA (SDXL time ids)
    captions: list[str]
    resolution: int
    noise_scheduler: Any
    adapters: AdapterController  # UNet and text encoders
    device: torch.device
    dtype: torch.dtype
    encoded: dict[tuple, TrainingConditioning] = field(default_factory=dict)

    def conditioning(self, caption: str, active: tuple[str, ...]) -> TrainingConditioning:
        """A caption encoded with the text-encoder deltas of the ``active`` LoRAs summed, as AutoLoRA
        runs them at inference (Merge on the text side); computed once per (caption, LoRA pair)."""
        key = (caption, tuple(sorted(active)))
        if key not in self.encoded:
            weights = {lora.name: lora.weight for lora in self.loras if lora.name in active}
            self.adapters.activate(weights, components=["text_encoder", "text_encoder_2"])
            self.encoded[key] = encode_prompt(self.pipe, caption, self.images, self.resolution, self.device)
        return self.encoded[key]


def train_gates(settings: GateTrainingSettings) -> GateTrainingResult:
    """Train AutoLoRA gates on a LoRA set with the denoising loss and write them as safetensors."""
    _check_gate_settings(settings)
    check_work_dir(settings)
    data, resolved = gate_training_data(settings)
    channels = lora_layer_channels(data.pipe.unet, [lora.name for lora in data.loras])
    gates = GateSet(channels, settings.variant).to(data.device)
    holder = SimpleNamespace(trainable=gates.named_tensors())
    optimizer = torch.optim.AdamW(gates.parameters(), lr=settings.learning_rate)
    start, history = 0, []
    if settings.resume:
        state = load_checkpoint(holder, optimizer, resolved, checkpoint_dirs(settings.work_dir)[-1])
        start, history = int(state["step"]), list(state["history"])
    fusion = GatedFusion(data.pipe.unet, lambda layer, _adapters, base, deltas: gates.gate(layer).gates(base, deltas))
    try:
        seconds = _gate_loop(gates, optimizer, holder, data, settings, resolved, start, history)
    finally:
        fusion.restore()
        data.adapters.activate({})
    metadata = {"loracompose.training": json.dumps({**resolved.to_json(), "steps": settings.steps}),
                "loracompose.architecture": data.pipe.architecture}
    save_gates(gates, settings.out, metadata)
    return GateTrainingResult(settings.out, settings.steps, history, gates, settings.work_dir, start, seconds)


def _check_gate_settings(settings: GateTrainingSettings) -> None:
    check_variant(settings.variant)
    if settings.out.suffix.lower() != ".safetensors":
        raise UserError(f"--out {settings.out}: name the gate file .safetensors")
    for label, value in (("--steps", settings.steps), ("--checkpoint-every", settings.checkpoint_every),
                         ("--showcase-steps", settings.showcase_steps)):
        if int(value) < 1:
            raise UserError(f"{label} {value}: use a positive integer")
    if settings.learning_rate <= 0 or settings.margin < 0 or not 0 <= settings.caption_dropout < 1:
        raise UserError("--lr must be positive, --margin non-negative and --caption-dropout in [0, 1)")


def gate_training_data(settings: GateTrainingSettings) -> tuple[GateTrainingData, ResolvedGateSettings]:
    """Load the model and LoRAs, find or make each LoRA's showcase image, cache latents and text."""
    from diffusers import DDPMScheduler

    from loracompose.pipelines import load_pipeline
    from loracompose.pipelines.compose_pipeline import quiet_loading
    from loracompose.pipelines.loading import resolve_device

    device = resolve_device(settings.device)
    dtype = resolve_training_dtype(settings.dtype, device)
    with quiet_loading():
        pipe = load_pipeline(settings.model, device=device, dtype=dtype)
    loras = pipe.prepare_loras(lora_set(settings.loras, pipe.architecture))
    if len(loras) < 2:
        raise UserError(f"--lora: gate training needs at least 2 LoRAs (got {len(loras)}); give more files or "
                        "a library")
    pipe.unet.requires_grad_(False)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
    resolution = int(settings.resolution or pipe.native_size)
    check_resolution(pipe, resolution)
    captions = [lora_caption(lora) for lora in loras]
    images = [load_training_image(showcase_image(pipe, lora, caption, settings, resolution), resolution)
              for lora, caption in zip(loras, captions)]
    mean, std = encode_images(pipe, images, device)
    adapters = AdapterController({"unet": pipe.unet, "text_encoder": getattr(pipe, "text_encoder", None),
                                  "text_encoder_2": getattr(pipe, "text_encoder_2", None)})
    resolved = ResolvedGateSettings(str(settings.model), tuple(str(lora.path) for lora in loras), settings.variant,
                                    settings.learning_rate, settings.margin, settings.caption_dropout, resolution,
                                    settings.seed, str(dtype).removeprefix("torch."))
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    data = GateTrainingData(pipe, loras, mean, std, images, captions, resolution, noise_scheduler, adapters, device,
                            dtype)
    return data, resolved


def lora_set(paths: Sequence[Path], architecture: str) -> list[LoraSpec]:
    """LoRA specs from files and library folders (folders: their entries for this base model)."""
    specs: list[LoraSpec] = []
    for path in paths:
        if path.is_dir():
            library = open_library(path)
            specs.extend(library.specs(library.for_architecture(architecture)))
        else:
            specs.append(LoraSpec(path))
    return specs


def lora_caption(lora: LoadedLora) -> str:
    """The LoRA's description (else its name), with its trigger words."""
    stat = lora.path.stat()
    entry: LibraryEntry = entry_from_lora(lora.path.name, lora, stat.st_size, stat.st_mtime_ns)
    return with_trigger_words(entry.description or entry.name, [lora])


def showcase_image(pipe: Any, lora: LoadedLora, caption: str, settings: GateTrainingSettings, resolution: int) -> Path:
    """``<stem>.png`` (or another image suffix, or ``<stem>.preview.png``) beside the LoRA, else one
    generated with the LoRA alone and kept in the work folder (so a resumed run uses the same one)."""
    for stem in (lora.path.stem, f"{lora.path.stem}.preview"):
        for suffix in IMAGE_SUFFIXES:
            candidate = lora.path.with_name(stem + suffix)
            if candidate.is_file():
                return candidate
    made = settings.work_dir / "showcase" / f"{lora.name}.png"
    if not made.is_file():
        from loracompose.methods.merge import Merge

        result = pipe.generate(caption, [lora], Merge(), seed=settings.seed, steps=settings.showcase_steps,
                               width=resolution, height=resolution, show_progress=False)
        made.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(made, lambda temp: result.images[0].save(temp, format="PNG"))
    return made


def _gate_loop(gates: GateSet, optimizer: torch.optim.Optimizer, holder: Any, data: GateTrainingData,
               settings: GateTrainingSettings, resolved: ResolvedGateSettings, start: int, history: list) -> float:
    bar = tqdm(total=settings.steps, initial=start, desc="train gates", disable=not settings.show_progress, unit="step")
    seconds = 0.0
    for step in range(start, settings.steps):
        started = time.perf_counter()
        history.append(gate_step(gates, optimizer, data, settings, step))
        seconds += time.perf_counter() - started
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in history[-1].items() if k != "step"}, refresh=False)
        done = step + 1
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            save_checkpoint(holder, optimizer, resolved, settings.work_dir, done, history, {},
                            settings.keep_checkpoints)
    bar.close()
    return seconds


def gate_step(gates: GateSet, optimizer: torch.optim.Optimizer, data: GateTrainingData,
              settings: GateTrainingSettings, step: int) -> dict[str, float]:
    """One step: LoRA i's image under LoRAs {i, j}: the ε-loss with i's caption plus a hinge on j's."""
    rng = generator(settings.seed, "gates-step", step)
    first, second = torch.randperm(len(data.loras), generator=rng)[:2].tolist()
    drop = float(torch.rand((), generator=rng)) < settings.caption_dropout
    shape = (1, *data.latent_mean.shape[1:])
    sample, noise = torch.randn(shape, generator=rng), torch.randn(shape, generator=rng)
    timestep = torch.randint(0, data.noise_scheduler.config.num_train_timesteps, (1,), generator=rng).to(data.device)
    x0 = data.latent_mean[[first]] + data.latent_std[[first]] * sample.to(data.device)
    noise = noise.to(data.device)
    pair = (data.loras[first].name, data.loras[second].name)
    own_caption = data.conditioning("" if drop else data.captions[first], pair)
    other_caption = data.conditioning(data.captions[second], pair)
    data.adapters.activate({lora.name: lora.weight for lora in data.loras if lora.name in pair}, components=["unet"])
    own = denoising_error(data, x0, noise, timestep, own_caption, first)
    other = denoising_error(data, x0, noise, timestep, other_caption, first)
    hinge = torch.relu(settings.margin - other)
    loss = own + hinge
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"step": step + 1, "loss": float(loss.detach()), "mse": float(own.detach()), "hinge": float(hinge.detach()),
            "dropped": float(drop)}


def denoising_error(data: GateTrainingData, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor,
                    conditioning: TrainingConditioning, image: int) -> torch.Tensor:
    """‖target − UNet(x_t, t, c)‖² (mean over elements) under the active LoRAs and gates."""
    noisy = data.noise_scheduler.add_noise(x0, noise, timestep)
    prediction = data.pipe.unet(noisy.to(data.dtype), timestep, encoder_hidden_states=conditioning.embeds,
                                added_cond_kwargs=conditioning.added([image]), return_dict=False)[0]
    target = noise_target(SimpleNamespace(noise_scheduler=data.noise_scheduler), x0, noise, timestep)
    return F.mse_loss(prediction.float(), target.float())
