"""Train the toy-world base model from scratch on generated scenes (resumable, seeded).

    every step s (all draws seeded by (seed, s), so a resumed run repeats the uninterrupted one):
        32 fresh scenes (seeds >= TRAIN_SEED_START; lower seeds are held out for evaluation)
        captions with details dropped at random; each caption emptied with p = caption_dropout (CFG)
        x0 = fold(pixels);  eps ~ N(0, I);  t ~ U{0..999};  x_t = add_noise(x0, eps, t)
        loss = mean_i  min(SNR_i, gamma) / (SNR_i + 1) * |v_i - UNet(x_t, t, TextEncoder(caption_i))|^2
                                                      (min-SNR weighting for v-prediction, gamma 5)
        + the decoder's loss |decode(x0 + small noise) - pixels|^2 on a few of the scenes
        AdamW on UNet + text encoder (linear warm-up), AdamW on the VAE decoder; EMA of UNet + text encoder
        every K steps and at the end: a checkpoint (weights, EMA, optimizer moments, state.json)
    at the end: export the EMA weights as a diffusers folder (``<run>/model``)

Checkpoints are safetensors only (``loracompose.training.checkpoints``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from loracompose.errors import UserError
from loracompose.outputs import staged_directory
from loracompose.training.checkpoints import (STATE_FILE, CheckpointSettings, checkpoint_dirs, load_optimizer,
                                              read_state, run_steps, save_optimizer, write_checkpoint)
from loracompose.training.seeds import derived_seed, generator
from .model import ARCHITECTURES, ToyWorldArchitecture, build_pipeline, fold
from .scenes import render_array, scene_from_seed, training_caption

TRAIN_SEED_START = 1_000_000  # scene seeds below this are never trained on
WEIGHTS_FILE, EMA_FILE = "weights.safetensors", "ema.safetensors"
OPTIMIZER_FILES = {"model": "optimizer-model.safetensors", "decoder": "optimizer-decoder.safetensors"}
MODEL_FOLDER = "model"
CHECKPOINTS_FOLDER = "checkpoints"


@dataclass
class ToyWorldTrainingSettings(CheckpointSettings):
    """One training run of the toy-world base model.

    Args:
        run_dir: folder of the run: ``checkpoints/step-NNNNNN`` (the default ``work_dir``) and, at the end, ``model/``.
        steps: optimisation steps in all (a resumed run continues up to this number).
        architecture: "base" (the 1.7M-parameter UNet) or "tiny" (tests).
        threads: torch CPU threads (None: leave torch's default).

    Checkpointing: :class:`~loracompose.training.checkpoints.CheckpointSettings`.
    """

    run_dir: Path
    steps: int = 20000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    decoder_learning_rate: float = 2e-3
    decoder_batch_size: int = 8
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    seed: int = 0
    architecture: str = "base"
    image_size: int = 32
    export: bool = True
    threads: int | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        super().__post_init__()

    def default_work_dir(self) -> Path:
        """``RUN_DIR/checkpoints``."""
        return self.run_dir / CHECKPOINTS_FOLDER

    def recipe(self) -> dict:
        """The settings a checkpoint must share to be resumed (not the run length or bookkeeping)."""
        skip = {"run_dir", "steps", "checkpoint_every", "keep_checkpoints", "work_dir", "resume", "export", "threads",
                "show_progress"}
        return json.loads(json.dumps({key: value for key, value in asdict(self).items() if key not in skip}))


@dataclass
class ToyWorldTrainingResult:
    """What a run did: steps done, losses, wall time of this call, where things are."""

    steps: int
    resumed_from: int
    history: list[dict[str, float]]
    train_seconds: float
    checkpoint: Path
    model_dir: Path | None


@dataclass
class ToyWorldTrainer:
    """The models, optimizers and EMA of a run; one :meth:`step` is one optimisation step."""

    pipe: StableDiffusionPipeline
    settings: ToyWorldTrainingSettings
    noise_scheduler: DDPMScheduler
    model_optimizer: torch.optim.Optimizer
    decoder_optimizer: torch.optim.Optimizer
    ema: dict[str, torch.Tensor] = field(default_factory=dict)

    # ---------------------------------------------------------------- parameters

    def model_parameters(self) -> dict[str, torch.nn.Parameter]:
        return model_parameters(self.pipe)

    def decoder_parameters(self) -> dict[str, torch.nn.Parameter]:
        return decoder_parameters(self.pipe)

    def all_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {**self.model_parameters(), **self.decoder_parameters()}

    # ---------------------------------------------------------------- one step

    def step(self, step: int) -> dict[str, float]:
        """One optimisation step of the UNet, text encoder and decoder; returns the losses."""
        pixels, captions = training_batch(self.settings, step)
        diffusion = self.diffusion_loss(pixels, captions, generator(self.settings.seed, "noise", step))
        self._set_learning_rate(step)
        self.model_optimizer.zero_grad(set_to_none=True)
        diffusion.backward()
        self.model_optimizer.step()
        decoder = self.decoder_loss(pixels[: self.settings.decoder_batch_size], step)
        self.decoder_optimizer.zero_grad(set_to_none=True)
        decoder.backward()
        self.decoder_optimizer.step()
        self.update_ema(step)
        return {"step": step + 1, "loss": float(diffusion.detach()), "decoder": float(decoder.detach())}

    def diffusion_loss(self, pixels: torch.Tensor, captions: list[str], rng: torch.Generator) -> torch.Tensor:
        """Min-SNR-weighted v-prediction loss (Hang et al. 2023, eq. 10 for v: min(SNR, gamma) / (SNR + 1))."""
        x0 = fold(pixels)
        noise = torch.randn(x0.shape, generator=rng)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(x0),), generator=rng)
        noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
        target = self.noise_scheduler.get_velocity(x0, noise, timesteps)
        embeds = self.pipe.text_encoder(tokenize(self.pipe.tokenizer, captions))[0]
        prediction = self.pipe.unet(noisy, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
        per_sample = (prediction - target).pow(2).mean(dim=(1, 2, 3))
        return (per_sample * min_snr_weights(self.noise_scheduler, timesteps, self.settings.snr_gamma)).mean()

    def decoder_loss(self, pixels: torch.Tensor, step: int) -> torch.Tensor:
        """The decoder learns to unfold latents, slightly noised as sampled latents are."""
        latents = fold(pixels)
        latents = latents + 0.03 * torch.randn(latents.shape, generator=generator(self.settings.seed, "decoder", step))
        decoded = self.pipe.vae.decode(latents, return_dict=False)[0]
        return torch.nn.functional.mse_loss(decoded, pixels)

    def _set_learning_rate(self, step: int) -> None:
        warmup = min(1.0, (step + 1) / max(1, self.settings.warmup_steps))
        for group in self.model_optimizer.param_groups:
            group["lr"] = self.settings.learning_rate * warmup

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        decay = min(self.settings.ema_decay, (1 + step) / (10 + step))
        for name, parameter in self.model_parameters().items():
            self.ema[name].mul_(decay).add_(parameter.detach(), alpha=1 - decay)


def model_parameters(pipe: StableDiffusionPipeline) -> dict[str, torch.nn.Parameter]:
    """The UNet's and text encoder's parameters under checkpoint names (``unet.*``, ``text_encoder.*``)."""
    return {**{f"unet.{k}": p for k, p in pipe.unet.named_parameters()},
            **{f"text_encoder.{k}": p for k, p in pipe.text_encoder.named_parameters()}}


def decoder_parameters(pipe: StableDiffusionPipeline) -> dict[str, torch.nn.Parameter]:
    """The VAE decoder's parameters (the fold encoder is fixed, see model.py)."""
    return {**{f"vae.decoder.{k}": p for k, p in pipe.vae.decoder.named_parameters()},
            **{f"vae.post_quant_conv.{k}": p for k, p in pipe.vae.post_quant_conv.named_parameters()}}


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR(t), gamma) / (SNR(t) + 1): the min-SNR weight for a v-prediction loss."""
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / (snr + 1)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to 77, exactly as the pipeline's ``encode_prompt`` makes them."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def training_batch(settings: ToyWorldTrainingSettings, step: int) -> tuple[torch.Tensor, list[str]]:
    """The scenes of ``step`` as (B, 3, H, W) pixels in [-1, 1] and their (possibly emptied) captions."""
    rng = np.random.default_rng(derived_seed(settings.seed, "scenes", step))
    seeds = rng.integers(TRAIN_SEED_START, 2**31 - 1, size=settings.batch_size)
    scenes = [scene_from_seed(int(seed)) for seed in seeds]
    captions = ["" if rng.random() < settings.caption_dropout else training_caption(scene, rng) for scene in scenes]
    images = np.stack([render_array(scene, settings.image_size) for scene in scenes])
    pixels = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1.0
    return pixels, captions


# ------------------------------------------------------------------------------------ building and checkpoints


def architecture(name: str, image_size: int = 32) -> ToyWorldArchitecture:
    if name not in ARCHITECTURES:
        raise UserError(f"architecture {name!r} is not known; use one of {', '.join(ARCHITECTURES)}")
    if image_size < 8 or image_size % 8:
        raise UserError(f"image size {image_size}: use a multiple of 8 pixels (the UNet halves 16x16 latents twice)")
    return ToyWorldArchitecture(**{**asdict(ARCHITECTURES[name]), "image_size": image_size})


def build_trainer(settings: ToyWorldTrainingSettings) -> ToyWorldTrainer:
    """A fresh trainer with seeded initial weights (the checkpoint, if any, is loaded separately)."""
    pipe = build_pipeline(architecture(settings.architecture, settings.image_size), seed=settings.seed)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.train()
    pipe.vae.encoder.requires_grad_(False)
    pipe.vae.quant_conv.requires_grad_(False)
    model_optimizer = torch.optim.AdamW(model_parameters(pipe).values(), lr=settings.learning_rate, weight_decay=0.01)
    decoder_optimizer = torch.optim.AdamW(decoder_parameters(pipe).values(), lr=settings.decoder_learning_rate,
                                          weight_decay=0.0)
    ema = {name: p.detach().clone() for name, p in model_parameters(pipe).items()}
    return ToyWorldTrainer(pipe, settings, DDPMScheduler.from_config(pipe.scheduler.config), model_optimizer,
                           decoder_optimizer, ema)


def save_checkpoint(trainer: ToyWorldTrainer, step: int, history: list, train_seconds: float) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically and keep only the newest few."""
    state = {"recipe": trainer.settings.recipe(), "train_seconds": train_seconds, "history": history[-2000:]}
    return write_checkpoint(trainer.settings, step, state, lambda folder: _write_checkpoint_files(trainer, folder))


def _optimizers(trainer: ToyWorldTrainer) -> list[tuple[str, torch.optim.Optimizer, list[str]]]:
    return [("model", trainer.model_optimizer, list(trainer.model_parameters())),
            ("decoder", trainer.decoder_optimizer, list(trainer.decoder_parameters()))]


def _write_checkpoint_files(trainer: ToyWorldTrainer, folder: Path) -> None:
    save_file({k: p.detach().contiguous() for k, p in trainer.all_parameters().items()}, folder / WEIGHTS_FILE)
    save_file({k: v.contiguous() for k, v in trainer.ema.items()}, folder / EMA_FILE)
    for key, optimizer, names in _optimizers(trainer):
        save_optimizer(optimizer, names, folder / OPTIMIZER_FILES[key])


def load_checkpoint(trainer: ToyWorldTrainer, checkpoint: Path) -> dict:
    """Restore weights, EMA and optimizer moments; the checkpoint's recipe must match the settings."""
    state = read_state(checkpoint, trainer.settings.recipe(), key="recipe", folder_option="--run-dir")
    load_weights(trainer.pipe, checkpoint / WEIGHTS_FILE)
    trainer.ema = {k: v.clone() for k, v in load_file(checkpoint / EMA_FILE).items()}
    for key, optimizer, names in _optimizers(trainer):
        load_optimizer(optimizer, names, checkpoint / OPTIMIZER_FILES[key])
    return state


@torch.no_grad()
def load_weights(pipe: StableDiffusionPipeline, path: Path) -> None:
    """Copy ``unet.*``, ``text_encoder.*`` and ``vae.*`` tensors of a safetensors file into ``pipe``."""
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
    parameters = {f"{prefix}.{k}": p for prefix, module in modules.items() for k, p in module.named_parameters()}
    for name, tensor in load_file(path).items():
        parameters[name].copy_(tensor)


def export_model(checkpoint: str | Path, out_dir: str | Path, *, use_ema: bool = True) -> Path:
    """Save a checkpoint as a diffusers folder that ``load_pipeline`` loads (EMA weights by default)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    recipe = state["recipe"]
    pipe = build_pipeline(architecture(recipe["architecture"], recipe["image_size"]), seed=recipe["seed"])
    load_weights(pipe, checkpoint / WEIGHTS_FILE)
    if use_ema:
        load_weights(pipe, checkpoint / EMA_FILE)
    with staged_directory(out_dir, replace=True) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
    return out_dir


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = checkpoint_dirs(Path(run_dir) / CHECKPOINTS_FOLDER)
    return found[-1] if found else None


# ------------------------------------------------------------------------------------ the loop


def train_toyworld(settings: ToyWorldTrainingSettings) -> ToyWorldTrainingResult:
    """Train (or resume) the toy-world base model; see the module docstring for the recipe."""
    _check_settings(settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    trainer = build_trainer(settings)
    start, history, earlier = 0, [], 0.0
    if settings.resume:
        state = load_checkpoint(trainer, settings.resume_checkpoint())
        start, history, earlier = int(state["step"]), list(state["history"]), float(state["train_seconds"])
    saved = [settings.latest_checkpoint()]

    def checkpoint(done: int, seconds: float) -> None:
        saved.append(save_checkpoint(trainer, done, history, earlier + seconds))

    seconds = earlier + run_steps(settings, start, settings.steps, history, trainer.step, checkpoint, desc="toyworld",
                                  show_progress=settings.show_progress)
    last_checkpoint = saved[-1]
    if last_checkpoint is None:  # run_steps writes one at the end, and a resumed run starts from one
        raise RuntimeError(f"toy-world training wrote no checkpoint in {settings.folder}")
    model_dir = export_model(last_checkpoint, settings.run_dir / MODEL_FOLDER) if settings.export else None
    return ToyWorldTrainingResult(max(start, settings.steps), start, history, seconds, last_checkpoint, model_dir)


def _check_settings(settings: ToyWorldTrainingSettings) -> None:
    for label, value in (("steps", settings.steps), ("batch size", settings.batch_size)):
        if value < 1:
            raise UserError(f"{label} {value}: use a positive integer")
    if not 0 <= settings.caption_dropout < 1:
        raise UserError(f"caption dropout {settings.caption_dropout}: use a probability in [0, 1)")
    architecture(settings.architecture, settings.image_size)
    settings.check_checkpointing(folder_option="--run-dir")
