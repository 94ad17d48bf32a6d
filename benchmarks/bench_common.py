"""Pieces the benchmark scripts share (run them as ``python benchmarks/bench_*.py``: this folder is
then on ``sys.path``)."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import diffusers
import peft
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from loracompose.outputs import atomic_write_text
from loracompose.pipelines.compose_pipeline import quiet_loading
from loracompose.assets.tiny import tiny_sd15_pipeline

# A mid-size random UNet of SD1.5's architecture (cross-attention width = tiny text encoder's 32).
MID_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": (64, 128, 256),
    "layers_per_block": 1,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}
# Two layers per block and heads of width 32 (SD1.5: 40; width 8 makes CPU attention memory-bound):
# the mid model of bench_cmlora.py and bench_composer.py.
DEEP_MID_UNET_CONFIG: dict[str, Any] = {**MID_UNET_CONFIG, "layers_per_block": 2, "attention_head_dim": (2, 4, 8)}


# SD1.5's own UNet (runwayml/stable-diffusion-v1-5 unet/config.json; 860 M parameters), random weights.
SD15_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


def build_mid_sd15(out_dir: Path, *, size: int, seed: int = 0, unet_config: dict[str, Any] | None = None) -> Path:
    """Save the tiny SD1.5 pipeline with its UNet replaced by a random mid-size one (``unet_config``,
    default ``MID_UNET_CONFIG``) for ``size`` x ``size`` images."""
    base = tiny_sd15_pipeline(seed=seed)
    torch.manual_seed(seed)
    config = unet_config or MID_UNET_CONFIG
    unet = UNet2DConditionModel(**config, sample_size=size // base.vae_scale_factor).eval()
    components = {**base.components, "unet": unet}
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_sd15_unet_model(out_dir: Path, *, latent_size: int, seed: int = 0) -> Path:
    """Save the tiny SD1.5 pipeline with SD1.5's full-size UNet (random weights) and a one-layer text
    encoder of SD1.5's width (768), so the UNet, its attention shapes and the 77x768 text states are
    SD1.5's; the tiny VAE (factor 2) keeps decoding cheap: images are ``2 * latent_size`` pixels."""
    base = tiny_sd15_pipeline(seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG, sample_size=latent_size).eval()
    text_config = CLIPTextConfig(**{**base.text_encoder.config.to_dict(), "hidden_size": 768, "intermediate_size": 3072,
                                    "num_attention_heads": 12, "num_hidden_layers": 1, "projection_dim": 768})
    text_encoder = CLIPTextModel(text_config).eval()
    components = {**base.components, "unet": unet, "text_encoder": text_encoder}
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# ------------------------------------------------------------------------------------ the plain baseline


def stock_pipeline(model_dir: Path, loras: Sequence[Path] = (), *, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu") -> StableDiffusionPipeline:
    """Stock diffusers of a model folder with DPM-Solver++ (loracompose's default sampler), the
    progress bar off, and ``loras`` loaded as adapters ``lora0``, ``lora1``, ... (none active until
    ``set_adapters``): the plain run every ratio is taken against."""
    with quiet_loading():
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype, use_safetensors=True,
                                                       safety_checker=None, requires_safety_checker=False)
        for index, path in enumerate(loras):
            pipe.load_lora_weights(str(path), adapter_name=f"lora{index}")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ------------------------------------------------------------------------------------ timing


def race(runners: dict[str, Callable[[int], Any]], steps: int, repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Best wall time of each runner (called with a step count) over ``repeats`` rounds that run them
    in turn, after a one-step warm-up that loads LoRAs, so a burst of load from other jobs hits all of
    them alike; and each runner's last result."""
    results = {name: run(1) for name, run in runners.items()}
    best = dict.fromkeys(runners, math.inf)
    for _ in range(repeats):
        for name, run in runners.items():
            started = time.perf_counter()
            results[name] = run(steps)
            best[name] = min(best[name], time.perf_counter() - started)
    return best, results


Times = dict[str, list[float]]


def interleaved(runners: dict[str, Callable[[], None]], rounds: int) -> tuple[Times, Times]:
    """One warm-up round, then ``rounds`` rounds running every configuration once each: wall and
    process CPU seconds of every run."""
    for run in runners.values():
        run()
    wall: Times = {name: [] for name in runners}
    cpu: Times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
    return wall, cpu


# ------------------------------------------------------------------------------------ output


def machine_info(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Where the numbers were taken: platform, CPUs, torch threads, library versions, device and dtype."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


REPO = Path(__file__).resolve().parent.parent


def repo_relative(path: Path) -> str:
    """``path`` as a results file records it: relative to the repository when inside it (no machine's
    folder names in committed results), else as given."""
    resolved = Path(path).resolve()
    return resolved.relative_to(REPO).as_posix() if resolved.is_relative_to(REPO) else str(path)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` as indented JSON at ``path``, written atomically (its folder made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
