"""AutoLoRA gate training: the gates of :mod:`loracompose.methods.autolora_gates` learned on a LoRA set,
base model and LoRAs frozen::

    per LoRA i: x0_i <- VAE latent of its showcase image (``<file stem>.png`` beside it, else one
                generated with LoRA i alone, saved in the work folder); c_i <- its caption
    for each step (every draw seeded by (seed, step)):
        (i, j) <- two different LoRAs;  activate both;  x0 ~ posterior(x0_i);  ε, t
        c <- "" with probability p_drop (0.3), else c_i   # text encoders: both LoRAs' deltas summed, as at inference
        L <- ‖ε − U(x_t, t, c)‖² + max(0, m − ‖ε − U(x_t, t, c_j)‖²)      # m = 0.5
        AdamW step on the gates
        every K steps and at the end: checkpoint (gates + AdamW state as safetensors)
    write the gates as safetensors

A constant learning rate (the reference restarts a cosine schedule every 50 steps); no "global LoRA"
term (not public).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from loracompose.errors import UserError
from loracompose.library import LibraryEntry, entry_from_lora, open_library
from loracompose.lora import LoadedLora, LoraSpec, with_trigger_words
from loracompose.methods.autolora import GatedFusion
from loracompose.methods.autolora_gates import GateSet, check_variant, lora_layer_channels, save_gates
from loracompose.outputs import atomic_write
from loracompose.provenance import lora_identity, model_identity
from loracompose.pipelines.adapters import AdapterController
from loracompose.pipelines.patches import PatchStack
from loracompose.training.checkpoints import CheckpointRecipe, CheckpointSettings, TrainingRun, resume_state, \
    run_steps, save_checkpoint
from loracompose.training.seeds import generator
from loracompose.training.trainer import (
    IMAGE_SUFFIXES,
    TrainingConditioning,
    check_resolution,
    encode_images,
    encode_prompt,
    load_training_image,
    noise_target,
    resolve_training_dtype,
)


@dataclass
class GateTrainingSettings(CheckpointSettings):
    """``train-gates``: the LoRA set and how to train the gates.

    Args:
        model: base model (hub id, diffusers folder or single file, as ``load_pipeline``).
        loras: LoRA files and/or library folders (at least 2 LoRAs in all).
        out: the ``.safetensors`` gate file to write.
        variant: ``full``, ``no_base`` or ``no_cross`` (the gate formula's terms).
        margin, caption_dropout: the hinge margin on the other LoRA's caption and the caption drop rate.
        showcase_steps: denoising steps of a generated showcase image (LoRAs without a ``<stem>.png``).
        resolution: training size in pixels (default: the model's native size).

    Checkpointing: :class:`~loracompose.training.checkpoints.CheckpointSettings`.
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
    device: str = "auto"
    dtype: str = "auto"
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.loras = [Path(path) for path in self.loras]
        self.out = Path(self.out)
        super().__post_init__()


@dataclass(frozen=True)
class ResolvedGateSettings(CheckpointRecipe):
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


@dataclass(kw_only=True)
class GateTrainingResult(TrainingRun):
    """The run and the trained gates."""

    gates: GateSet


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
    settings.check_checkpointing()
    data, resolved = gate_training_data(settings)
    channels = lora_layer_channels(data.pipe.unet, [lora.name for lora in data.loras])
    gates = GateSet(channels, settings.variant).to(data.device)
    optimizer = torch.optim.AdamW(gates.parameters(), lr=settings.learning_rate)
    start, history, _ = resume_state(gates.named_tensors(), optimizer, resolved, settings)
    patches = PatchStack()
    try:
        GatedFusion(data.pipe.unet, lambda layer, _adapters, base, deltas: gates.gate(layer).gates(base, deltas),
                    patches)
        seconds = run_steps(
            settings, start, settings.steps, history, lambda step: gate_step(gates, optimizer, data, settings, step),
            lambda done, _seconds: save_checkpoint(gates.named_tensors(), optimizer, resolved, settings, done, history),
            desc="train gates", show_progress=settings.show_progress)
    finally:
        patches.unwind()
        data.adapters.activate({})
    # The file travels: the base model and LoRAs by name and digest, not the paths they were trained from.
    recipe = {**resolved.to_json(), "model": model_identity(settings.model, data.pipe),
              "loras": [lora_identity(lora.name, lora.path) for lora in data.loras], "steps": settings.steps}
    metadata = {"loracompose.training": json.dumps(recipe), "loracompose.architecture": data.pipe.architecture}
    save_gates(gates, settings.out, metadata)
    return GateTrainingResult(path=settings.out, steps=settings.steps, history=history, gates=gates,
                              work_dir=settings.folder, resumed_from=start, train_seconds=seconds)


def _check_gate_settings(settings: GateTrainingSettings) -> None:
    check_variant(settings.variant)
    if settings.out.suffix.lower() != ".safetensors":
        raise UserError(f"--out {settings.out}: name the gate file .safetensors")
    for label, value in (("--steps", settings.steps), ("--showcase-steps", settings.showcase_steps)):
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
    if getattr(pipe, "unet", None) is None:  # FLUX.1 / SD3: AutoLoRA runs there with open gates or given ones
        from loracompose.lora import ARCHITECTURE_NAMES

        raise UserError(f"--model {settings.model}: gate training runs on SD1.5 and SDXL models only; on "
                        f"{ARCHITECTURE_NAMES.get(pipe.architecture, pipe.architecture)} run autolora with open gates "
                        "(its default) or gates trained elsewhere")
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
    made = settings.folder / "showcase" / f"{lora.name}.png"
    if not made.is_file():
        from loracompose.methods.merge import Merge

        result = pipe.generate(caption, [lora], Merge(), seed=settings.seed, steps=settings.showcase_steps,
                               width=resolution, height=resolution, show_progress=False)
        made.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(made, lambda temp: result.images[0].save(temp, format="PNG"))
    return made


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
    target = noise_target(data.noise_scheduler, x0, noise, timestep)
    return F.mse_loss(prediction.float(), target.float())
