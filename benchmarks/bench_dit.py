"""Time per denoising step of every method that runs on FLUX.1 / SD3, beside plain diffusers, on mid-size
random DiTs built from config, in one process.

Models (random weights, the tiny pipelines' text encoders and one-level VAE, so the transformer is
nearly all the cost; 64 x 64 px images are 64 x 64 latents, 1024 image tokens on both):

* ``flux``: FLUX.1's layout with 2 double-stream and 3 single-stream blocks, hidden 512 (8 heads of 64),
  guidance embedding, RoPE axes (16, 24, 24);
* ``sd3``: SD3's layout with 4 joint blocks, hidden 512 (8 heads of 64), patch 2.

Each gets three random rank-4 LoRAs on the transformer's attention (and the CLIP encoders). Timed:

* ``plain``: ``diffusers.FluxPipeline`` / ``StableDiffusion3Pipeline.from_pretrained`` of the same folder, no LoRA;
* ``plain-loras``: the same with the three LoRAs through ``load_lora_weights`` + ``set_adapters`` (what
  ``merge`` does);
* every registered method whose ``families`` include the model's, through ``load_pipeline`` and
  ``generate`` with default settings (``cmlora`` without profiling: classes from categories), except
  ``cmlora-switch`` (Switch's calls in another order; ``--methods`` names it to time it too).

Every configuration runs a 1-step warm-up (which loads its LoRAs; a method that refuses its default
settings here is listed, not timed), then all are timed round-robin, best of ``--repeats``: wall time
and this process's CPU time (steadier on a shared machine; one thread), each per step and as a ratio
to ``plain`` (latent output: no VAE decode). Transformer calls and rows per step come from
``GenerationStats`` (a forward hook counts them for ``plain``). Run on one CPU thread:

    OMP_NUM_THREADS=1 python benchmarks/bench_dit.py            # writes benchmarks/results/dit-cpu.json
    python benchmarks/bench_dit.py --device cuda --dtype bf16 --out benchmarks/results/dit-gpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from loracompose import LoraSpec, load_pipeline
from loracompose.assets.tiny import build_tiny_flux, build_tiny_lora, build_tiny_sd3
from loracompose.errors import UserError, first_line
from loracompose.methods import METHODS
from loracompose.pipelines.compose_pipeline import quiet_loading

from bench_common import REPO, machine_info, repo_relative, write_json

PROMPT = "a cat in a garden"
# Short trigger words: the tiny T5 tokenizer spells unknown words letter by letter into a 32-token sequence.
TRIGGERS = ("zkx", "qwv", "bgk")
SEED = 0
SIZE = 64  # pixels = latent side (one-level VAE): 32 x 32 = 1024 image tokens on both models
NUM_LORAS = 3
DEFAULT_OUT = REPO / "benchmarks" / "results" / "dit-cpu.json"

MID_TRANSFORMERS: dict[str, dict[str, Any]] = {
    "flux": {"num_layers": 2, "num_single_layers": 3, "attention_head_dim": 64, "num_attention_heads": 8,
             "axes_dims_rope": [16, 24, 24]},
    "sd3": {"num_layers": 4, "attention_head_dim": 64, "num_attention_heads": 8, "caption_projection_dim": 512,
            "patch_size": 2, "sample_size": 64},
}
BUILDERS = {"flux": build_tiny_flux, "sd3": build_tiny_sd3}
STOCK = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
# Settings that keep a method's run to the composition itself (no profiling generations before it).
METHOD_SETTINGS: dict[str, dict[str, Any]] = {"cmlora": {"profile": False}, "cmlora-switch": {"profile": False}}
NOT_BY_DEFAULT = {"cmlora-switch"}
Runner = Callable[[int], dict[str, int]]


def build_model(family: str, folder: Path) -> tuple[Path, list[Path]]:
    """The mid-size model folder and its LoRAs (categories character, clothing, background)."""
    model = BUILDERS[family](folder / "model", seed=SEED, transformer=MID_TRANSFORMERS[family])
    categories = ("character", "clothing", "background")
    loras = [build_tiny_lora(model, folder / f"concept{index}.safetensors", seed=100 + index,
                             trigger_words=[TRIGGERS[index]], category=categories[index])
             for index in range(NUM_LORAS)]
    return model, loras


def stock_runner(family: str, model: Path, loras: list[Path], device: str, dtype: torch.dtype
                 ) -> tuple[Callable[[int], dict[str, int]], Any]:
    """A plain diffusers run of ``steps`` steps (LoRAs active through set_adapters when given): its
    transformer calls and rows, counted by a forward hook."""
    with quiet_loading():
        pipe = STOCK[family].from_pretrained(model, torch_dtype=dtype)
        for index, path in enumerate(loras):
            pipe.load_lora_weights(str(path), adapter_name=f"lora{index}")
    if loras:
        pipe.set_adapters([f"lora{index}" for index in range(len(loras))], [1.0] * len(loras))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    counts = {"calls": 0, "rows": 0}

    def count(_module, _args, kwargs):
        counts["calls"] += 1
        counts["rows"] += kwargs["hidden_states"].shape[0]

    pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)

    def run(steps: int) -> dict[str, int]:
        counts.update(calls=0, rows=0)
        pipe(PROMPT, num_inference_steps=steps, height=SIZE, width=SIZE, output_type="latent",
             generator=torch.Generator().manual_seed(SEED), max_sequence_length=32)
        return {"unet_calls": counts["calls"], "unet_rows": counts["rows"], "partial_unet_calls": 0,
                "partial_unet_rows": 0}

    return run, pipe


def method_runner(pipe: Any, name: str, loras: list[Path]) -> Callable[[int], dict[str, int]]:
    specs = [LoraSpec(path) for path in loras]

    def run(steps: int) -> dict[str, int]:
        method = METHODS[name](**METHOD_SETTINGS.get(name, {}))
        result = pipe.generate(PROMPT, specs, method, steps=steps, seed=SEED, width=SIZE, height=SIZE,
                               output_type="latent", show_progress=False)
        return {key: getattr(result.stats, key) for key in
                ("unet_calls", "unet_rows", "partial_unet_calls", "partial_unet_rows")}

    return run


def bench_family(family: str, steps: int, repeats: int, device: str, dtype: torch.dtype,
                 only: set[str] | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        model, loras = build_model(family, Path(folder))
        plain, plain_pipe = stock_runner(family, model, [], device, dtype)
        plain_loras, plain_loras_pipe = stock_runner(family, model, loras, device, dtype)
        runners: dict[str, Runner] = {"plain": plain, "plain-loras": plain_loras}
        pipe = load_pipeline(model, device=device, dtype=dtype)
        for name, method in METHODS.items():
            wanted = name in only if only is not None else name not in NOT_BY_DEFAULT
            if pipe.architecture in method.families and wanted:
                runners[name] = method_runner(pipe, name, loras)
        parameters = sum(p.numel() for p in pipe.transformer.parameters())
        wall, cpu, results, skipped = time_runners(runners, steps, repeats)
        del plain_pipe, plain_loras_pipe
    rows = []
    for name, seconds in wall.items():
        cost = results[name]
        rows.append({
            "method": name, "seconds_per_step": seconds / steps, "ratio_to_plain": seconds / wall["plain"],
            "cpu_seconds_per_step": cpu[name] / steps, "cpu_ratio_to_plain": cpu[name] / cpu["plain"],
            **{f"{key}_per_step": cost[key] / steps for key in cost}, **cost,
        })
    return {"family": family, "transformer_config": MID_TRANSFORMERS[family],
            "transformer_parameters": parameters, "image_tokens": (SIZE // 2) ** 2, "rows": rows,
            "skipped": skipped}


def time_runners(runners: dict[str, Runner], steps: int, repeats: int
                 ) -> tuple[dict[str, float], dict[str, float], dict[str, dict[str, int]], dict[str, str]]:
    """A 1-step warm-up of each runner (those raising UserError are left out, with the reason), then
    ``repeats`` round-robin rounds of ``steps`` steps: best wall and CPU seconds, last costs, skipped."""
    skipped: dict[str, str] = {}
    for name, run in list(runners.items()):
        try:
            run(1)
        except UserError as error:
            skipped[name] = first_line(error)
            del runners[name]
    wall = dict.fromkeys(runners, float("inf"))
    cpu = dict.fromkeys(runners, float("inf"))
    results: dict[str, dict[str, int]] = {}
    for _ in range(repeats):
        for name, run in runners.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            results[name] = run(steps)
            wall[name] = min(wall[name], time.perf_counter() - started)
            cpu[name] = min(cpu[name], time.process_time() - started_cpu)
    return wall, cpu, results, skipped


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['family']}: {report['transformer_parameters'] / 1e6:.1f} M transformer parameters, "
          f"{report['image_tokens']} image tokens")
    print(f"{'method':<16}{'s/step':>9}{'x plain':>9}{'cpu s/step':>12}{'x plain':>9}{'calls/step':>12}"
          f"{'rows/step':>11}{'partial calls':>15}{'partial rows':>14}")
    for row in report["rows"]:
        print(f"{row['method']:<16}{row['seconds_per_step']:>9.3f}{row['ratio_to_plain']:>9.2f}"
              f"{row['cpu_seconds_per_step']:>12.3f}{row['cpu_ratio_to_plain']:>9.2f}"
              f"{row['unet_calls_per_step']:>12.2f}{row['unet_rows_per_step']:>11.2f}"
              f"{row['partial_unet_calls_per_step']:>15.2f}{row['partial_unet_rows_per_step']:>14.2f}")
    for name, reason in report["skipped"].items():
        print(f"{name:<16}not timed: {reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="flux,sd3")
    parser.add_argument("--methods", help="comma-separated method names (default: every one that runs on DiTs)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (4: CMLoRA's schedule has one "
                        "shallow-only step)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    only = set(args.methods.split(",")) if args.methods else None
    started = time.perf_counter()
    reports = []
    for family in args.families.split(","):
        report = bench_family(family, args.steps, args.repeats, args.device, dtype, only)
        print_table(report)
        reports.append(report)
    payload = {"benchmark": repo_relative(Path(__file__)), "steps": args.steps, "repeats": args.repeats,
               "size": SIZE, "num_loras": NUM_LORAS, "prompt": PROMPT, "seed": SEED,
               "machine": machine_info(args.device, dtype), "models": reports,
               "total_seconds": time.perf_counter() - started}
    write_json(args.out, payload)
    print(f"\nwrote {repo_relative(args.out)} ({payload['total_seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
