"""Our diffusers pipelines: stock SD1.5 / SDXL pipelines plus ``generate`` (LoRAs + a method).

``generate`` walks the usual steps (check inputs, load LoRAs, encode prompts per branch, prepare
latents, the one denoising loop, decode) and leaves ``__call__`` as plain diffusers.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import warnings
from contextlib import contextmanager
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor
from transformers.utils import logging as transformers_logging

from loracompose.errors import UserError, first_line
from loracompose.formats import load_lora_file
from loracompose.lora import (
    SD15,
    SDXL,
    LoadedLora,
    LoraSpec,
    check_architecture,
    inspect_loras,
    with_trigger_words,
)
from loracompose.tokens import pipeline_tokenizers
from loracompose.validation import (
    Limits,
    check_generation_numbers,
    check_memory,
    check_request_size,
    estimate_generation_bytes,
)

from .adapters import AdapterController
from .denoiser import Denoiser
from .denoiser_models import UNetModel
from .loop import denoise
from .patches import assert_unchanged, fingerprint, quick_fingerprint
from .stats import GenerationStats, MemoryMeter
from .values import Branch, Conditioning
from .schedulers import DEFAULT_SCHEDULER, make_scheduler

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from loracompose.methods.base import CompositionMethod

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
VERIFY_CLEAN_VARIABLE = "LORACOMPOSE_VERIFY_CLEAN"
_LOCK_GUARD = threading.Lock()


@dataclass
class GenerationResult:
    """Images of one ``generate`` call with what ran and what it cost."""

    images: list[Any]
    stats: GenerationStats
    prompt: str
    negative_prompt: str | None
    seeds: list[int]
    loras: list[LoadedLora]
    method: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    latents: torch.Tensor | None = None


class ComposeMixin:
    """Multi-LoRA composition on top of a diffusers Stable Diffusion pipeline."""

    if TYPE_CHECKING:  # what the diffusers pipeline class this mixin is combined with provides
        unet: UNet2DConditionModel
        vae: AutoencoderKL
        scheduler: Any
        image_processor: Any
        vae_scale_factor: int
        _execution_device: torch.device

        def delete_adapters(self, adapter_names: str | list[str]) -> None: ...
        def get_list_adapters(self) -> dict[str, list[str]]: ...
        def to(self, *args: Any, **kwargs: Any) -> Any: ...
        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any: ...
        @classmethod
        def from_single_file(cls, *args: Any, **kwargs: Any) -> Any: ...

    architecture: str = ""
    # The text encoders a branch's LoRAs reach (adapter-controller components besides the denoiser).
    text_components: tuple[str, ...] = TEXT_COMPONENTS
    default_guidance_scale: float = 7.5
    default_scheduler: str = DEFAULT_SCHEDULER
    # Check after every generation that the model is as it was before. True: every weight summed
    # twice (a debug aid); "quick": structure and a strided sample of the LoRA layers' base weights
    # (the UI's shared pipeline, every request); None: full when LORACOMPOSE_VERIFY_CLEAN=1 (the tests).
    verify_clean: bool | str | None = None
    # The largest request one generate call may make (loracompose.validation.Limits); set per pipeline.
    limits: Limits = Limits()

    # ------------------------------------------------------------------ LoRA management
    def _lock(self) -> threading.RLock:
        with _LOCK_GUARD:
            if not hasattr(self, "_loracompose_lock"):
                self._loracompose_lock = threading.RLock()
            return self._loracompose_lock

    def exclusive(self) -> threading.RLock:
        """Hold the pipeline (a context manager): no generation runs, so no LoRA is active, inside it."""
        return self._lock()

    def prepare_loras(self, specs: Sequence[LoraSpec | LoadedLora]) -> list[LoadedLora]:
        """Check the files, then load each one as a PEFT adapter (once; reloaded if the file changed)."""
        loras = inspect_loras([_as_spec(spec) for spec in specs])
        for lora in loras:
            check_architecture(lora, self.architecture)
            self._load_adapter(lora)
        return loras

    def _load_adapter(self, lora: LoadedLora) -> None:
        loaded: dict[str, tuple] = self.__dict__.setdefault("_loracompose_loaded", {})
        stat = lora.path.stat()
        identity = (str(lora.path.resolve()), stat.st_mtime_ns, stat.st_size, lora.text_encoder_scale,
                    repr(lora.block_weights))
        if loaded.get(lora.name) == identity:
            return
        if lora.name in loaded:
            self.delete_adapters(lora.name)
            del loaded[lora.name]
        try:
            with quiet_loading():
                self._load_lora_file(lora)
        except UserError:
            raise  # the converter's one-line reason, raised before any layer is touched
        except (ValueError, RuntimeError, KeyError) as error:
            if lora.name in self._adapter_names():
                self.delete_adapters(lora.name)
            message = first_line(error)
            raise UserError(
                f"LoRA file {lora.path} does not fit this {self.architecture.upper()} model ({message}); "
                "use a LoRA trained for this base model"
            ) from None
        if lora.name not in self._adapter_names():
            raise UserError(
                f"LoRA file {lora.path} matched no layer of this {self.architecture.upper()} model; "
                "use a LoRA trained for this base model"
            )
        loaded[lora.name] = identity

    def _load_lora_file(self, lora: LoadedLora) -> None:
        """Load one checked LoRA file as the PEFT adapter ``lora.name`` (every format, exact PEFT layers)."""
        load_lora_file(self, lora.path, lora.name, text_encoder_scale=lora.text_encoder_scale,
                       block_weights=lora.block_weights)

    def _adapter_names(self) -> set[str]:
        return {name for names in self.get_list_adapters().values() for name in names}

    @property
    def denoiser_module(self) -> torch.nn.Module:
        """The denoiser network: the UNet here, the transformer on DiTs."""
        return self.unet

    @property
    def denoiser_name(self) -> str:
        """What the denoiser network is called in reports ("UNet", "transformer")."""
        return "UNet"

    def _adapter_controller(self) -> AdapterController:
        # The denoiser is the "unet" component whatever the family: methods address its LoRA layers so.
        modules = {"unet": self.denoiser_module,
                   **{name: getattr(self, name, None) for name in self.text_components}}
        return AdapterController(modules)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompt: str,
        loras: Sequence[LoraSpec | LoadedLora] = (),
        method: CompositionMethod | None = None,
        *,
        negative_prompt: str | None = None,
        seed: int = 0,
        steps: int = 30,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        scheduler: str | None = None,
        append_triggers: bool = True,
        text_encoder_loras: bool = True,
        max_batch_rows: int | None = None,
        output_type: str = "pil",
        show_progress: bool = True,
        lora_dir: str | Path | None = None,
        true_cfg_scale: float = 1.0,
    ) -> GenerationResult:
        """Generate images with several LoRAs composed by ``method`` (default: Merge).

        Args:
            prompt: the prompt; each LoRA's trigger words missing from it are appended
                (``append_triggers``), as the composition papers do.
            loras: LoRA specs (file, strength, optional name/triggers/category) in order.
            method: a composition method object (``Merge()``, ``Switch(period=5)``, ``Composite()``...).
            guidance_scale: the CFG scale (default 7.5; SD3: 7.0); on FLUX the distilled guidance the
                model is conditioned on (default 3.5), with no CFG halves.
            scheduler: a name of :data:`~loracompose.pipelines.schedulers.SCHEDULERS` (default DPM-Solver++;
                FLUX/SD3: their flow-matching Euler, the only one they take).
            seed: image k uses seed ``seed + k``, so it equals a one-image run with that seed.
            text_encoder_loras: apply each branch's LoRAs to the text encoder(s) as well.
            max_batch_rows: cap on rows per UNet call; branches beyond it run one call each.
            output_type: "pil", "np" or "latent".
            lora_dir: the folder ``<lora:NAME:WEIGHT>`` prompt tags pick ``NAME.safetensors`` from (default:
                ``$LORACOMPOSE_LORA_DIR``); each tag is removed from the prompt and added to ``loras``.
            true_cfg_scale: FLUX only: real CFG on top of the distilled guidance when above 1 (two rows
                per image, the negative prompt or "" as the unconditional one).
        """
        from loracompose.formats.prompt_tags import with_prompt_loras
        from loracompose.methods.merge import Merge

        if isinstance(prompt, str):
            prompt, loras = with_prompt_loras(prompt, loras, lora_dir)
        method = method if method is not None else Merge()
        self._check_generate_args(prompt, output_type)
        check_method_family(method, self.architecture)
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        scheduler = self._check_scheduler(scheduler if scheduler is not None else self.default_scheduler)
        true_cfg_scale = self._check_true_cfg(true_cfg_scale)
        numbers = check_generation_numbers(steps=steps, guidance_scale=guidance_scale, num_images=num_images,
                                           seed=seed, width=width, height=height, max_batch_rows=max_batch_rows,
                                           limits=self.limits)
        steps, guidance_scale = numbers.steps, numbers.guidance_scale
        num_images, seed = numbers.num_images, numbers.seed
        height, width = numbers.height or self.native_size, numbers.width or self.native_size
        max_batch_rows = numbers.max_batch_rows
        check_request_size(width, height, num_images, steps, self.limits)
        if self.limits.check_memory:
            rows_per_image = 2 if self._cfg(guidance_scale, true_cfg_scale)[1] else 1
            needed = self._generation_bytes(width, height, num_images, rows_per_image)
            check_memory(needed, self._execution_device, f"{num_images} image(s) of {width}x{height}",
                         "ask for fewer or smaller images")
        with self._lock():
            started = time.perf_counter()
            device = self._execution_device
            meter = MemoryMeter(device)
            loaded = self.prepare_loras(loras)
            method.bind(loaded)
            method.prepare(self, loaded)
            full_prompt = with_trigger_words(prompt, loaded) if append_triggers else prompt
            adapters = self._adapter_controller()
            before = self._model_state() if self._verifies_clean() else None
            try:
                latents, stats = self._denoise(
                    method, adapters, prompt, full_prompt, negative_prompt, seed, steps, guidance_scale,
                    height, width, num_images, scheduler, text_encoder_loras, max_batch_rows, device,
                    show_progress, true_cfg_scale=true_cfg_scale,
                )
            finally:  # also when the loop never started (its patch stack resets the adapters itself)
                adapters.activate({})
            if before is not None:
                assert_unchanged(before, self._model_state())
            images = self._decode(self._image_latents(latents, height, width), output_type)
            stats.wall_seconds = time.perf_counter() - started
            stats.peak_memory_bytes, stats.peak_memory_source = meter.peak()
        settings = dict(steps=steps, guidance_scale=guidance_scale, width=width, height=height,
                        num_images=num_images, scheduler=scheduler, text_encoder_loras=text_encoder_loras)
        if true_cfg_scale != 1.0:
            settings["true_cfg_scale"] = true_cfg_scale
        return GenerationResult(
            images=images, stats=stats, prompt=full_prompt, negative_prompt=negative_prompt,
            seeds=[seed + k for k in range(num_images)], loras=loaded, method=method.settings(),
            settings=settings, latents=latents,
        )

    def _verifies_clean(self) -> bool | str:
        if os.environ.get(VERIFY_CLEAN_VARIABLE) == "1":
            return True
        return self.verify_clean or False

    def _model_state(self) -> dict[str, Any]:
        """What a generation must leave as it found it (see :func:`~loracompose.pipelines.patches.fingerprint`)."""
        if self._verifies_clean() == "quick":
            return quick_fingerprint({"unet": self.denoiser_module})
        text_encoders = {name: getattr(self, name, None) for name in self.text_components}
        return {**fingerprint({"unet": self.denoiser_module}), **fingerprint(text_encoders, structure=False)}

    def _denoise(self, method, adapters, base_prompt, prompt, negative_prompt, seed, steps, guidance_scale, height,
                 width, num_images, scheduler_name, text_encoder_loras, max_batch_rows, device, show_progress,
                 *, true_cfg_scale=1.0):
        cfg_scale, do_cfg = self._cfg(guidance_scale, true_cfg_scale)
        generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(num_images)]
        scheduler, latents, model = self._start_sampling(scheduler_name, steps, generators, height, width,
                                                         guidance_scale, device)

        def encode(branch: Branch) -> Conditioning:
            adapters.activate(branch.weights if text_encoder_loras else {}, components=list(self.text_components))
            branch_prompt = branch.prompt if branch.prompt is not None else prompt
            return self._encode_conditioning(branch_prompt, negative_prompt, num_images, do_cfg, height, width, device)

        run = Denoiser(
            unet=self.denoiser_module, scheduler=scheduler, timesteps=scheduler.timesteps, encode=encode,
            adapters=adapters, guidance_scale=cfg_scale, do_cfg=do_cfg, batch_size=num_images,
            extra_step_kwargs=_extra_step_kwargs(scheduler, generators), max_batch_rows=max_batch_rows,
            prompt=prompt, base_prompt=base_prompt,
            tokenizers=self._text_tokenizers(), model=model,
        )
        self.set_progress_bar_config(disable=not show_progress)
        with self.progress_bar(total=steps) as bar:
            latents = denoise(run, method, latents, progress=bar.update)
        return latents, run.stats

    # ------------------------------------------------------------------ family hooks (DiTs override them)
    def _cfg(self, guidance_scale: float, true_cfg_scale: float) -> tuple[float, bool]:
        """The CFG scale the loop applies and whether rows come in CFG halves."""
        return guidance_scale, guidance_scale > 1.0

    def _check_scheduler(self, name: str) -> str:
        return name

    def _check_true_cfg(self, true_cfg_scale: float) -> float:
        if true_cfg_scale != 1.0:
            raise UserError(f"true_cfg_scale={true_cfg_scale} is for FLUX; on {self.architecture.upper()} "
                            "guidance_scale is the CFG scale")
        return 1.0

    def _start_sampling(self, scheduler_name: str, steps: int, generators: list[torch.Generator], height: int,
                        width: int, guidance_scale: float, device: torch.device) -> tuple[Any, torch.Tensor, Any]:
        """A fresh scheduler with its timesteps set, the initial latents and the denoiser model call."""
        scheduler = make_scheduler(scheduler_name, self.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        scale = self.vae_scale_factor
        shape = (len(generators), self.unet.config.in_channels, height // scale, width // scale)
        latents = randn_tensor(shape, generator=generators, device=device, dtype=self.unet.dtype)
        return scheduler, latents * scheduler.init_noise_sigma, UNetModel(self.unet, scheduler)

    def _text_tokenizers(self) -> list[Any]:
        """The tokenizers of the text sequence the denoiser attends to (``Denoiser.tokenizers``)."""
        return pipeline_tokenizers(self)

    def _generation_bytes(self, width: int, height: int, num_images: int, rows_per_image: int) -> int:
        return estimate_generation_bytes(self, width, height, num_images, rows_per_image)

    def _image_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The loop's latents as (B, C, H, W) VAE latents (FLUX unpacks its image tokens)."""
        return latents

    # ------------------------------------------------------------------ checks and decoding
    def _check_generate_args(self, prompt, output_type) -> None:
        if not isinstance(prompt, str):
            raise UserError("prompt must be a string")
        if output_type not in ("pil", "np", "latent"):
            raise UserError(f"output_type={output_type!r}: use 'pil', 'np' or 'latent'")

    @property
    def native_size(self) -> int:
        """The image size (pixels, square) the model was trained at: 512 on SD1.5, 1024 on SDXL."""
        return int(self.unet.config.sample_size * self.vae_scale_factor)

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return list(latents)
        with torch.no_grad():
            image = self.vae.decode(self._unscale_latents(latents).to(self.vae.dtype), return_dict=False)[0]
        processed = self.image_processor.postprocess(image, output_type=output_type)
        return list(processed)

    def _unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.vae.config.scaling_factor

    def _encode_conditioning(self, prompt, negative_prompt, num_images, do_cfg, height, width, device) -> Conditioning:
        raise NotImplementedError


class LoraComposeSDPipeline(ComposeMixin, StableDiffusionPipeline):
    """Stable Diffusion 1.x/2.x pipeline with multi-LoRA composition."""

    architecture = SD15

    def _encode_conditioning(self, prompt, negative_prompt, num_images, do_cfg, height, width, device) -> Conditioning:
        with torch.no_grad():
            positive, negative = self.encode_prompt(prompt, device, num_images, do_cfg, negative_prompt=negative_prompt)
        return Conditioning(torch.cat([negative, positive]) if do_cfg else positive)


class LoraComposeSDXLPipeline(ComposeMixin, StableDiffusionXLPipeline):
    """Stable Diffusion XL pipeline with multi-LoRA composition."""

    architecture = SDXL

    def _encode_conditioning(self, prompt, negative_prompt, num_images, do_cfg, height, width, device) -> Conditioning:
        with torch.no_grad():
            positive, negative, pooled, negative_pooled = self.encode_prompt(
                prompt, device=device, num_images_per_prompt=num_images,
                do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt,
            )
        projection_dim = (
            int(pooled.shape[-1]) if self.text_encoder_2 is None else self.text_encoder_2.config.projection_dim
        )
        time_ids = self._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=positive.dtype, text_encoder_projection_dim=projection_dim
        ).to(device).repeat(num_images, 1)
        if not do_cfg:
            return Conditioning(positive, {"text_embeds": pooled, "time_ids": time_ids})
        return Conditioning(
            torch.cat([negative, positive]),
            {"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": torch.cat([time_ids, time_ids])},
        )

    def _decode(self, latents: torch.Tensor, output_type: str):
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting and output_type != "latent":
            self.upcast_vae()
            try:
                return super()._decode(latents, output_type)
            finally:
                self.vae.to(dtype=torch.float16)
        return super()._decode(latents, output_type)

    def _unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            return latents * std / config.scaling_factor + mean
        return latents / config.scaling_factor


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence loading chatter: per-adapter load reports of diffusers/transformers/PEFT (harmless,
    very long: each new adapter is reported as "missing" the other adapters' keys)
    and the component-loading progress bars."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_method_family(method: Any, architecture: str) -> None:
    """Refuse a method not ported to this model family, in one line."""
    families = getattr(method, "families", None)
    if families is not None and architecture not in families:
        from loracompose.lora import ARCHITECTURE_NAMES

        why = getattr(method, "not_ported_why", "")
        raise UserError(f"method {method.name} does not support {ARCHITECTURE_NAMES.get(architecture, architecture)} "
                        f"yet; use {', '.join(methods_for_family(architecture))}" + (f" ({why})" if why else ""))


def methods_for_family(architecture: str) -> list[str]:
    """The registered methods that run on a model family (architecture id), in registry order."""
    from loracompose.methods import METHODS

    return [name for name, cls in METHODS.items() if architecture in getattr(cls, "families", (architecture,))]


def _as_spec(spec: LoraSpec | LoadedLora) -> LoraSpec:
    if isinstance(spec, LoraSpec):
        return spec
    return LoraSpec(spec.path, spec.weight, spec.name, spec.trigger_words, spec.category)


def _extra_step_kwargs(scheduler, generators) -> dict[str, Any]:
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators[0] if len(generators) == 1 else None
    return kwargs
