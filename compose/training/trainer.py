"""LoRA training, DreamBooth style: a UNet LoRA learned from a folder of images and their captions.

    images  <- every picture in the folder, short side resized to the resolution, centre-cropped
    caption <- the image's caption file (``name.txt`` beside ``name.png``, as kohya's scripts read
               them) where there is one, else the instance prompt
    prior   <- optional regularisation images with their caption files (DreamBooth's prior
               preservation, kohya's reg images), drawn into the batches like the others (weight 1)
    x0 dist <- VAE posterior (mean, std) of each image, computed once
    c_i     <- frozen text encoder(s)(caption of image i), computed once per distinct caption
    LoRA (rank r, alpha α) on the targets (default: to_q/k/v/out.0 of every UNet attention); the rest frozen
    objective.prepare(model)                        # extra parts, e.g. TARA's token-masked K/V (tara.py)
    for step = start .. S-1:                        # every random draw seeded by (seed, step)
        B <- the step's images;  objective.start_batch(model, B)   # e.g. TARA's masks of B's captions
        x0 ~ posterior of B's images;  ε ~ N(0, I);  t ~ U{0 .. T-1}
        loss <- ‖target(x0, ε, t) − UNet(add_noise(x0, ε, t), t, c_i)‖² + Σ objective.losses(model, B)
        AdamW step on the LoRA weights
        every K steps and at the end: checkpoint (LoRA and AdamW state as safetensors, state.json)
    write the LoRA as a diffusers-format .safetensors file with its metadata

A plain LoRA uses :class:`PlainObjective` (nothing added). Resuming is exact: the images of each epoch
are ordered by a generator seeded with (seed, epoch) and every draw of step s comes from one seeded
with (seed, s), so a resumed run draws what the uninterrupted run would have; a checkpoint holds the
LoRA weights, the optimizer's moments (flattened into safetensors, with its hyperparameters in the
file's metadata) and the step. Nothing is pickled.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from diffusers import DDPMScheduler, UNet2DConditionModel

from loracompose.errors import UserError
from loracompose.lora import SD15, SDXL
from loracompose.outputs import atomic_write
from loracompose.provenance import captions_sha256, model_identity
from loracompose.tokens import pipeline_tokenizers
from loracompose.training.checkpoints import CheckpointRecipe, CheckpointSettings, TrainingRun, resume_state, \
    run_steps, save_checkpoint
from loracompose.training.seeds import derived_seed, generator, seeded_global_rng

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIX = ".txt"
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_NAME = "trained"
_ARCHITECTURE_TAGS = {  # modelspec.architecture, ss_base_model_version: what loracompose.lora reads back
    SD15: ("stable-diffusion-v1/lora", "sd_v1"),
    SDXL: ("stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0"),
}


# ------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class TrainingDefaults:
    """Per-architecture defaults of a training recipe (settings left as None take these)."""

    rank: int
    alpha: float | None  # None: alpha = rank (scale 1)
    learning_rate: float
    steps: int
    batch_size: int


# DreamBooth LoRA (diffusers' train_dreambooth_lora scripts): rank 4, alpha = rank, 1e-4.
PLAIN_DEFAULTS: dict[str, TrainingDefaults] = {
    SD15: TrainingDefaults(rank=4, alpha=None, learning_rate=1e-4, steps=500, batch_size=1),
    SDXL: TrainingDefaults(rank=4, alpha=None, learning_rate=1e-4, steps=500, batch_size=1),
}


@dataclass
class LoraTrainingSettings(CheckpointSettings):
    """What to train on and how. None means: the recipe's default for the model's architecture.

    Args:
        model: hub id, diffusers folder or single-file checkpoint (as ``load_pipeline``).
        images: folder of training images (png, jpg, webp, bmp).
        out: the ``.safetensors`` LoRA file to write.
        prompt: the instance prompt: the caption of every image without a caption file.
        use_caption_files: read ``name.txt`` beside ``name.png`` as that image's caption (TARA
            finds its token masks in each image's own caption).
        resolution: training size in pixels (default: the model's native size).
        probe_timesteps: timesteps per image of the fixed-draw probe loss taken before the first
            and after the last step (0: no probe).
        dtype: base weights' dtype: "auto" (bf16 on CUDA, fp32 on CPU), "fp32" or "bf16"; LoRA
            weights always train in fp32.
        prior_images: a folder of regularisation images (each with its caption file) trained with
            the same loss, so the LoRA learns to leave scenes without the concept as they are.
        targets: the UNet projections that get a LoRA, as PEFT matches module-name suffixes
            (default :data:`UNET_LORA_TARGETS`, every attention's; ``("attn2.to_k", "attn2.to_v")``:
            the cross-attention keys and values only).

    Checkpointing (``checkpoint_every``, ``keep_checkpoints``, ``work_dir``, ``resume``): :class:`CheckpointSettings`.
    """

    model: str
    images: Path
    out: Path
    prompt: str = ""
    use_caption_files: bool = True
    prior_images: Path | None = None
    steps: int | None = None
    rank: int | None = None
    alpha: float | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    resolution: int | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    config: str | None = None
    gradient_checkpointing: bool = False
    targets: tuple[str, ...] | None = None
    trigger_words: tuple[str, ...] = ()
    title: str | None = None
    category: str | None = None
    probe_timesteps: int = 8
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.images, self.out = Path(self.images), Path(self.out)
        self.prior_images = Path(self.prior_images) if self.prior_images else None
        super().__post_init__()


@dataclass(frozen=True)
class ResolvedSettings(CheckpointRecipe):
    """The settings with every default filled in: what a checkpoint must agree with to be resumed."""

    model: str
    images: tuple[str, ...]
    prompt: str
    captions: tuple[str, ...]  # per image, in ``images`` order
    prior_images: int  # the last ``prior_images`` of ``images`` are regularisation images
    rank: int
    alpha: float
    learning_rate: float
    batch_size: int
    resolution: int
    seed: int
    dtype: str
    targets: tuple[str, ...]
    objective: Mapping[str, Any]


class TrainingObjective(Protocol):
    """The extra parts of a training recipe on top of the ε-loss (TARA's are in tara.py).

    ``indices`` are the images of the UNet batch (``model.captions[i]`` is image i's caption):
    ``start_batch`` runs before the batch's UNet call, ``losses`` and ``metrics`` after it.
    """

    @property
    def name(self) -> str: ...  # a class constant in the objectives

    def settings(self) -> dict[str, Any]: ...
    def prepare(self, model: TrainingModel) -> None: ...
    def start_batch(self, model: TrainingModel, indices: Sequence[int]) -> None: ...
    def losses(self, model: TrainingModel, indices: Sequence[int]) -> dict[str, torch.Tensor]: ...
    def metrics(self, model: TrainingModel, indices: Sequence[int]) -> dict[str, float]: ...
    def metadata(self) -> dict[str, str]: ...
    def close(self) -> None: ...


class PlainObjective:
    """A plain DreamBooth LoRA: the ε-loss alone."""

    name = "plain"

    def settings(self) -> dict[str, Any]:
        return {"objective": self.name}

    def prepare(self, model: TrainingModel) -> None:
        pass

    def start_batch(self, model: TrainingModel, indices: Sequence[int]) -> None:
        pass

    def losses(self, model: TrainingModel, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return {}

    def metrics(self, model: TrainingModel, indices: Sequence[int]) -> dict[str, float]:
        return {}

    def metadata(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        pass


@dataclass(kw_only=True)
class TrainingResult(TrainingRun):
    """A trained LoRA: the run, its probe losses and the LoRA weights (PEFT naming, CPU)."""

    probe_losses: dict[int, dict[str, float]]
    lora_state: dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------ images


@dataclass(frozen=True)
class TrainingImage:
    """One training image: pixels in [-1, 1] (3, H, W), its original size and crop corner (SDXL ids)."""

    pixels: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def image_files(folder: Path, option: str = "--images") -> list[Path]:
    """The images of a training folder (given by ``option``), sorted by name."""
    if not folder.exists():
        raise UserError(f"{option} {folder}: folder not found; give the folder of training images")
    if not folder.is_dir():
        raise UserError(f"{option} {folder} is a file; give the folder that holds the training images")
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not files:
        raise UserError(f"{option} {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files; add training images")
    return files


def image_captions(files: Sequence[Path], prompt: str, use_caption_files: bool,
                   option: str = "--prompt") -> tuple[str, ...]:
    """Each image's caption: its ``.txt`` file beside it when there is one, else ``prompt``."""
    captions = []
    for path in files:
        sidecar = path.with_suffix(CAPTION_SUFFIX)
        caption = ""
        if use_caption_files and sidecar.is_file():
            caption = " ".join(sidecar.read_text(encoding="utf-8", errors="replace").split())
        caption = caption or prompt
        if not caption:
            fix = "give --prompt or write" if option == "--prompt" else f"{option} images need"
            raise UserError(f"training image {path.name} has no caption: {fix} {sidecar.name} beside it")
        captions.append(caption)
    return tuple(captions)


def load_training_image(path: Path, resolution: int) -> TrainingImage:
    """Resize the short side to ``resolution``, centre-crop a square, scale to [-1, 1]."""
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"training image {path} cannot be read ({error}); remove or replace it") from None
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return TrainingImage(pixels, (height, width), (top, left))


# ------------------------------------------------------------------------------------ the model


@dataclass
class TrainingConditioning:
    """Frozen text conditioning: (captions, tokens, width) states of the distinct captions, which
    caption each image has, and SDXL's pooled states (per caption) and time ids (per image)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None  # (images, 6)
    caption_of_image: tuple[int, ...] | None = None  # None: one caption for every image

    def states(self, indices: Sequence[int]) -> torch.Tensor:
        """The text states of the images at ``indices`` (batch, tokens, width)."""
        return self.embeds[self.rows(indices)]

    def added(self, indices: Sequence[int]) -> dict[str, torch.Tensor] | None:
        if self.pooled is None or self.time_ids is None:  # SDXL has both, SD1.5 neither
            return None
        return {"text_embeds": self.pooled[self.rows(indices)], "time_ids": self.time_ids[list(indices)]}

    def rows(self, indices: Sequence[int]) -> list[int]:
        """Which row of ``embeds`` (which distinct caption) each image at ``indices`` has."""
        if self.caption_of_image is None:
            return [0] * len(indices)
        return [self.caption_of_image[index] for index in indices]


@dataclass
class TrainingModel:
    """Everything a training step needs: the pipeline's parts, the LoRA adapter, cached latents and text."""

    pipe: Any
    unet: UNet2DConditionModel
    adapter: str
    prompt: str
    captions: tuple[str, ...]  # per image
    tokenizers: list[Any]
    prior_images: int  # the last ``prior_images`` images are regularisation images
    conditioning: TrainingConditioning
    latent_mean: torch.Tensor  # (images, C, h, w)
    latent_std: torch.Tensor
    noise_scheduler: Any
    device: torch.device
    dtype: torch.dtype
    architecture: str
    trainable: dict[str, torch.nn.Parameter] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return int(self.latent_mean.shape[0])


def resolve_training_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on CUDA by default; fp16 is refused (it needs loss scaling, not done here)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype in ("fp16", "float16"):
        raise UserError("--dtype fp16: training in fp16 needs loss scaling, which this trainer does not do; "
                        "use bf16 (default on CUDA) or fp32")
    if dtype not in names:
        raise UserError(f"--dtype {dtype!r} is not known; use auto, fp32 or bf16")
    return names[dtype]


def check_resolution(pipe: Any, resolution: int) -> None:
    """The resolution must map to a latent the UNet can halve at every down block."""
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if resolution < multiple or resolution % multiple:
        raise UserError(f"--resolution {resolution}: use a positive multiple of {multiple} pixels for this model")


def encode_images(pipe: Any, images: Sequence[TrainingImage],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std of each image, already in the UNet's latent scale."""
    vae = pipe.vae
    means, stds = [], []
    with torch.no_grad():
        for image in images:
            dist = vae.encode(image.pixels[None].to(device, vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    mean, std = torch.cat(means), torch.cat(stds)
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        shift = torch.tensor(config.latents_mean, device=device).view(1, -1, 1, 1)
        spread = torch.tensor(config.latents_std, device=device).view(1, -1, 1, 1)
        return (mean - shift) * config.scaling_factor / spread, std * config.scaling_factor / spread
    return mean * config.scaling_factor, std * config.scaling_factor


def encode_captions(pipe: Any, captions: Sequence[str], images: Sequence[TrainingImage], resolution: int,
                    device: torch.device) -> TrainingConditioning:
    """Per-image captions encoded once per distinct caption (``captions[i]`` belongs to ``images[i]``)."""
    distinct = sorted(set(captions))
    if len(distinct) == 1:
        return encode_prompt(pipe, distinct[0], images, resolution, device)
    encoded = [encode_prompt(pipe, caption, images, resolution, device) for caption in distinct]
    pooled = None if encoded[0].pooled is None else torch.cat([item.pooled for item in encoded
                                                               if item.pooled is not None])
    return TrainingConditioning(torch.cat([item.embeds for item in encoded]), pooled, encoded[0].time_ids,
                                tuple(distinct.index(caption) for caption in captions))


def encode_prompt(pipe: Any, prompt: str, images: Sequence[TrainingImage], resolution: int,
                  device: torch.device) -> TrainingConditioning:
    """The prompt's text states exactly as ``generate`` computes them (SDXL: pooled + time ids per image)."""
    with torch.no_grad():
        if pipe.architecture != SDXL:
            embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
            return TrainingConditioning(embeds)
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    projection = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
    time_ids = torch.cat([
        pipe._get_add_time_ids(image.original_size, image.crop_top_left, (resolution, resolution),
                               dtype=embeds.dtype, text_encoder_projection_dim=projection)
        for image in images
    ]).to(device)
    return TrainingConditioning(embeds, pooled, time_ids)


def offload_frozen_encoders(pipe: Any, device: torch.device) -> None:
    """Latents and text states are cached, so the VAE and text encoders leave the GPU during training."""
    if device.type != "cuda":
        return
    for name in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to("cpu")
    torch.cuda.empty_cache()


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float, seed: int,
             targets: Sequence[str] = UNET_LORA_TARGETS) -> dict[str, torch.nn.Parameter]:
    """Freeze the UNet, add a LoRA on the ``targets`` projections (B = 0, A Gaussian), return its weights."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    try:
        with seeded_global_rng(derived_seed(seed, "init", 0)):
            unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    except ValueError:  # PEFT: no module matches the targets
        trainable = {}
    else:
        trainable = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    for parameter in trainable.values():
        parameter.data = parameter.data.float()
    if not trainable:
        raise UserError(f"--targets {' '.join(targets)}: no UNet layer matches; name attention projections such as "
                        f"{' '.join(UNET_LORA_TARGETS)} (or attn2.to_k attn2.to_v) of an SD1.5 or SDXL UNet")
    return trainable


def build_training_model(settings: LoraTrainingSettings, defaults: Mapping[str, TrainingDefaults],
                         objective: TrainingObjective) -> tuple[TrainingModel, ResolvedSettings, list[Path]]:
    """Load the model, resolve the defaults, cache latents and text, add the LoRA."""
    from loracompose.pipelines import load_pipeline
    from loracompose.pipelines.compose_pipeline import quiet_loading
    from loracompose.pipelines.loading import resolve_device

    prior = image_files(settings.prior_images, "--prior-images") if settings.prior_images else []
    files = image_files(settings.images) + prior
    device = resolve_device(settings.device)
    dtype = resolve_training_dtype(settings.dtype, device)
    with quiet_loading():
        pipe = load_pipeline(settings.model, device=device, dtype=dtype, config=settings.config)
    resolved = resolve_settings(settings, defaults[pipe.architecture], pipe, files, dtype, objective, len(prior))
    check_resolution(pipe, resolved.resolution)
    images = [load_training_image(path, resolved.resolution) for path in files]
    mean, std = encode_images(pipe, images, device)
    conditioning = encode_captions(pipe, resolved.captions, images, resolved.resolution, device)
    offload_frozen_encoders(pipe, device)
    trainable = add_lora(pipe.unet, resolved.rank, resolved.alpha, resolved.seed, resolved.targets)
    model = TrainingModel(
        pipe=pipe, unet=pipe.unet, adapter=ADAPTER_NAME, prompt=resolved.prompt, captions=resolved.captions,
        tokenizers=pipeline_tokenizers(pipe), prior_images=resolved.prior_images,
        conditioning=conditioning, latent_mean=mean, latent_std=std,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config), device=device, dtype=dtype,
        architecture=pipe.architecture, trainable=trainable,
    )
    return model, resolved, files


def resolve_settings(settings: LoraTrainingSettings, defaults: TrainingDefaults, pipe: Any, files: Sequence[Path],
                     dtype: torch.dtype, objective: TrainingObjective, prior_images: int = 0) -> ResolvedSettings:
    """Fill the None settings from the recipe's defaults and check them (the last ``prior_images``
    files are regularisation images: they need caption files)."""
    prompt = settings.prompt.strip()
    instance = len(files) - prior_images
    resolved = ResolvedSettings(
        model=str(settings.model), images=tuple(path.name for path in files), prompt=prompt,
        captions=(image_captions(files[:instance], prompt, settings.use_caption_files)
                  + image_captions(files[instance:], "", True, "--prior-images")),
        prior_images=prior_images,
        rank=int(settings.rank or defaults.rank),
        alpha=float(settings.alpha or defaults.alpha or settings.rank or defaults.rank),
        learning_rate=float(settings.learning_rate or defaults.learning_rate),
        batch_size=int(settings.batch_size or defaults.batch_size),
        resolution=int(settings.resolution or pipe.native_size), seed=int(settings.seed),
        dtype=str(dtype).removeprefix("torch."), targets=tuple(settings.targets or UNET_LORA_TARGETS),
        objective=objective.settings(),
    )
    for label, value in (("--rank", resolved.rank), ("--batch-size", resolved.batch_size)):
        if value < 1:
            raise UserError(f"{label} {value}: use a positive integer")
    if resolved.learning_rate <= 0 or resolved.alpha <= 0:
        raise UserError("--lr and --alpha must be positive numbers")
    return resolved


# ------------------------------------------------------------------------------------ one step


def batch_indices(step: int, batch_size: int, num_images: int, seed: int) -> list[int]:
    """The images of ``step``: a fresh seeded permutation of the folder every epoch."""
    indices = []
    for sample in range(step * batch_size, (step + 1) * batch_size):
        epoch, position = divmod(sample, num_images)
        order = torch.randperm(num_images, generator=generator(seed, "epoch", epoch))
        indices.append(int(order[position]))
    return indices


def noise_target(noise_scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts: ε, v or x0, by the (diffusers) scheduler's prediction type."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise UserError(f"the model's scheduler predicts {kind!r}; training supports epsilon, v_prediction and sample")


def denoising_loss(model: TrainingModel, indices: Sequence[int], noise: torch.Tensor, timesteps: torch.Tensor,
                   x0: torch.Tensor) -> torch.Tensor:
    """‖target − UNet(x_t, t, c)‖² averaged over every element, for the images at ``indices``."""
    noisy = model.noise_scheduler.add_noise(x0, noise, timesteps)
    prediction = model.unet(noisy.to(model.dtype), timesteps, encoder_hidden_states=model.conditioning.states(indices),
                            added_cond_kwargs=model.conditioning.added(indices), return_dict=False)[0]
    target = noise_target(model.noise_scheduler, x0, noise, timesteps)
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


def step_draws(model: TrainingModel, indices: Sequence[int], rng: torch.Generator) -> tuple[torch.Tensor, ...]:
    """x0 sampled from the posteriors, ε and t for one step, drawn on the CPU (device-independent)."""
    shape = (len(indices), *model.latent_mean.shape[1:])
    sample = torch.randn(shape, generator=rng).to(model.device)
    noise = torch.randn(shape, generator=rng).to(model.device)
    timesteps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (len(indices),), generator=rng)
    x0 = model.latent_mean[list(indices)] + model.latent_std[list(indices)] * sample
    return x0, noise, timesteps.to(model.device)


def training_step(model: TrainingModel, objective: TrainingObjective, optimizer: torch.optim.Optimizer,
                  step: int, resolved: ResolvedSettings) -> dict[str, float]:
    """One optimisation step; returns its loss terms and the objective's metrics."""
    indices = batch_indices(step, resolved.batch_size, model.num_images, resolved.seed)
    x0, noise, timesteps = step_draws(model, indices, generator(resolved.seed, "step", step))
    objective.start_batch(model, indices)
    terms = {"mse": denoising_loss(model, indices, noise, timesteps, x0), **objective.losses(model, indices)}
    loss = torch.stack([term.float() for term in terms.values()]).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    values = {name: float(term.detach()) for name, term in terms.items()}
    return {"step": step + 1, "loss": float(loss.detach()), **values, **objective.metrics(model, indices)}


def probe_loss(model: TrainingModel, objective: TrainingObjective, seed: int, count: int) -> dict[str, float]:
    """The objective on fixed draws: every image at ``count`` evenly spaced timesteps, posterior
    means and seeded noise, so values taken at different steps compare."""
    total = model.noise_scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0, total - 1, count).round().long().to(model.device)
    rng = generator(seed, "probe", 0)
    losses = []
    with torch.no_grad():
        for index in range(model.num_images):
            x0 = model.latent_mean[[index]].expand(count, -1, -1, -1)
            noise = torch.randn(x0.shape, generator=rng).to(model.device)
            objective.start_batch(model, [index] * count)
            losses.append(denoising_loss(model, [index] * count, noise, timesteps, x0))
        every_image = list(range(model.num_images))
        extra = {name: float(term) for name, term in objective.losses(model, every_image).items()}
    mse = float(torch.stack(losses).mean())
    return {"loss": mse + sum(extra.values()), "mse": mse, **extra}


# ------------------------------------------------------------------------------------ the LoRA file


def lora_file_contents(model: TrainingModel,
                       resolved: ResolvedSettings) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the LoRA exactly as diffusers' ``save_lora_weights`` writes them."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model.unet, adapter_name=model.adapter)
    config = {"r": resolved.rank, "lora_alpha": resolved.alpha, "target_modules": sorted(resolved.targets)}
    pipeline_class = StableDiffusionXLPipeline if model.architecture == SDXL else StableDiffusionPipeline
    with tempfile.TemporaryDirectory(prefix="loracompose-lora-") as scratch:
        pipeline_class.save_lora_weights(scratch, unet_lora_layers=state, unet_lora_adapter_metadata=config,
                                         safe_serialization=True, weight_name="lora.safetensors")
        saved = Path(scratch) / "lora.safetensors"
        with safe_open(str(saved), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(saved), metadata


def lora_metadata(settings: LoraTrainingSettings, resolved: ResolvedSettings, architecture: str, steps: int,
                  objective: TrainingObjective, base_model: Mapping[str, str]) -> dict[str, str]:
    """Trigger words, architecture, rank/alpha and the training recipe, as loracompose reads them
    (``base_model``: :func:`~loracompose.provenance.model_identity`)."""
    model_spec, base_version = _ARCHITECTURE_TAGS[architecture]
    return {
        "modelspec.trigger_phrase": ", ".join(settings.trigger_words),
        "modelspec.title": settings.title or settings.out.stem,
        **({"loracompose.category": settings.category} if settings.category else {}),
        "modelspec.architecture": model_spec,
        "ss_base_model_version": base_version,
        "loracompose.rank": str(resolved.rank),
        "loracompose.alpha": repr(resolved.alpha),
        "loracompose.training": json.dumps(published_recipe(resolved, base_model, steps)),
        **objective.metadata(),
    }


def published_recipe(resolved: ResolvedSettings, base_model: Mapping[str, str], steps: int) -> dict[str, Any]:
    """The recipe as the LoRA file records it: the base model by name and digest, the images by count
    and a digest of their captions (a LoRA file travels; the training machine's paths stay home)."""
    recipe = {key: value for key, value in resolved.to_json().items() if key not in ("images", "captions")}
    return {**recipe, "model": dict(base_model), "images": len(resolved.images),
            "captions_sha256": captions_sha256(resolved.captions), "steps": steps}


def write_lora_file(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write the LoRA atomically (temp file beside it, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda temp: save_file(dict(tensors), str(temp), metadata=dict(metadata)))


# ------------------------------------------------------------------------------------ the loop


def train_lora(settings: LoraTrainingSettings, objective: TrainingObjective | None = None,
               defaults: Mapping[str, TrainingDefaults] = PLAIN_DEFAULTS) -> TrainingResult:
    """Train a UNet LoRA on ``settings.images`` and write it to ``settings.out`` (see the module docstring)."""
    objective = objective or PlainObjective()
    check_output_path(settings.out)
    settings.check_checkpointing()
    model, resolved, _ = build_training_model(settings, defaults, objective)
    total = int(settings.steps or defaults[model.architecture].steps)
    if total < 1:
        raise UserError(f"--steps {total}: use a positive integer")
    objective.prepare(model)
    try:
        return run_training(model, objective, resolved, settings, total)
    finally:
        objective.close()


def check_output_path(out: Path) -> None:
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"--out {out}: name the LoRA file .safetensors")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the .safetensors file to write")


def run_training(model: TrainingModel, objective: TrainingObjective, resolved: ResolvedSettings,
                 settings: LoraTrainingSettings, total: int) -> TrainingResult:
    """The optimisation loop with progress, checkpoints and resuming; writes the LoRA file."""
    optimizer = torch.optim.AdamW(model.trainable.values(), lr=resolved.learning_rate)
    start, history, state = resume_state(model.trainable, optimizer, resolved, settings)
    probes = {int(step): losses for step, losses in state.get("probe_losses", {}).items()}
    if start == 0 and settings.probe_timesteps > 0:
        probes[0] = probe_loss(model, objective, resolved.seed, settings.probe_timesteps)
    model.unet.train()
    if settings.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()

    def checkpoint(done: int, _seconds: float) -> None:
        if done == total and settings.probe_timesteps > 0:
            model.unet.eval()
            probes[done] = probe_loss(model, objective, resolved.seed, settings.probe_timesteps)
        save_checkpoint(model.trainable, optimizer, resolved, settings, done, history,
                        {"probe_losses": {str(step): losses for step, losses in probes.items()}})

    train_seconds = run_steps(settings, start, total, history,
                              lambda step: training_step(model, objective, optimizer, step, resolved), checkpoint,
                              desc="train", show_progress=settings.show_progress)
    model.unet.eval()
    tensors, metadata = lora_file_contents(model, resolved)
    metadata |= lora_metadata(settings, resolved, model.architecture, total, objective,
                              model_identity(settings.model, model.pipe))
    write_lora_file(settings.out, tensors, metadata)
    return TrainingResult(path=settings.out, steps=total, history=history, probe_losses=probes,
                          lora_state=peft_state(model), work_dir=settings.folder, resumed_from=start,
                          train_seconds=train_seconds)


def peft_state(model: TrainingModel) -> dict[str, torch.Tensor]:
    """The LoRA weights in PEFT's saved naming (``...to_q.lora_A.weight``), on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {key: value.detach().cpu().clone()
            for key, value in get_peft_model_state_dict(model.unet, adapter_name=model.adapter).items()}
