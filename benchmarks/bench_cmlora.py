"""What CMLoRA's per-LoRA cache saves: wall time against plain diffusers and Composite, and the
UNet-equivalent cost, for N = 2..5 LoRAs at CMLoRA's default settings (non-uniform refresh schedule).

For each model (``tiny``: loracompose's tiny random SD1.5; ``mid``: the same pipeline with a random
SD1.5-layout UNet, block_out_channels (64, 128, 256), 2 layers per block) it builds the folder and
random LoRAs in a temporary folder and times, in this process:

* ``plain``: stock ``diffusers.StableDiffusionPipeline`` with DPM-Solver++, no LoRA (1 call/step);
* ``composite``: ``generate`` with ``Composite()`` (N branches, one batched call per step);
* ``cmlora``: ``generate`` with ``CMLoRA()`` (full passes for refreshed LoRAs, shallow for the rest).

rho is the shallow/full wall-time ratio of one UNet pass (2 x 3 rows, random inputs, best of
several), measured per model. Wall times are the best of the repeats (other jobs on a shared CPU
only ever add time). The UNet-equivalent cost of CMLoRA relative to Composite is
``(full rows + rho * partial rows) / Composite's rows``. The same cost is also given with the MAC
ratio of the real SD1.5 (512 px) and SDXL (1024 px) UNets, counted on meta tensors (no weights,
no compute) with ``torch.utils.flop_counter``; target: <= 0.5 at N = 3.

The mid model runs at 64 px (a 32 x 32 latent with the tiny 2x VAE): at that length the ratio of
full-resolution attention to convolution cost is close to SD1.5's at 512 px; at a 64 x 64 latent
a 64-channel UNet is dominated by attention, which the shallow path keeps, and costs ~10x more.

    python benchmarks/bench_cmlora.py --quick
    python benchmarks/bench_cmlora.py --out bench_out/cmlora.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP workers must not spin on a shared CPU

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench_common import DEEP_MID_UNET_CONFIG, build_mid_sd15, machine_info, race, stock_pipeline, write_json  # noqa: E402
from loracompose import CMLoRA, Composite, LoraSpec, load_pipeline  # noqa: E402
from loracompose.methods.cmlora import refresh_steps  # noqa: E402
from loracompose.pipelines.compose_pipeline import quiet_loading  # noqa: E402
from loracompose.pipelines.unet_cache import capture_deep_features, shallow_unet_forward  # noqa: E402
from loracompose.assets.tiny import build_tiny_lora, build_tiny_sd15  # noqa: E402

PROMPT = "a photo of a cat in a garden"
SEED = 0
GUIDANCE_SCALE = 7.5
RHO_ROWS = 6  # one CFG pair per LoRA at N = 3


# The real UNets, for MAC counts only (built on the meta device: no memory, no weights).
REAL_UNETS: dict[str, tuple[dict[str, Any], int, int, dict[str, tuple[int, ...]]]] = {
    "sd15": (dict(
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ), 64, 768, {}),
    "sdxl": (dict(
        block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ), 128, 2048, {"text_embeds": (1, 1280), "time_ids": (1, 6)}),
}


@dataclass(frozen=True)
class Settings:
    num_loras: dict[str, tuple[int, ...]]
    steps: dict[str, int]
    repeats: dict[str, int]
    rho_repeats: int
    models: tuple[str, ...]
    quick: bool


@dataclass
class Row:
    model: str
    num_loras: int
    steps: int
    plain_seconds: float
    composite_seconds: float
    cmlora_seconds: float
    composite_rows: int
    full_rows: int
    partial_rows: int
    rho: float
    cost_vs_composite: float
    cost_sd15_macs: float
    cost_sdxl_macs: float

    @property
    def cmlora_vs_plain(self) -> float:
        return self.cmlora_seconds / self.plain_seconds

    @property
    def cmlora_vs_composite(self) -> float:
        return self.cmlora_seconds / self.composite_seconds


# ------------------------------------------------------------------------------------ models


def build_mid(out_dir: Path) -> Path:
    return build_mid_sd15(out_dir, size=64, seed=SEED, unet_config=DEEP_MID_UNET_CONFIG)  # a 32x32 latent


MODEL_BUILDERS: dict[str, tuple[Callable[[Path], Path], int]] = {
    "tiny": (lambda out: build_tiny_sd15(out, seed=SEED), 64),
    "mid": (build_mid, 64),
}


def build_loras(model_dir: Path, out_dir: Path, count: int) -> list[Path]:
    return [
        build_tiny_lora(model_dir, out_dir / f"concept{k}.safetensors", seed=100 + k, init_scale=2.0)
        for k in range(count)
    ]


# ------------------------------------------------------------------------------------ rho


def timed(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def measured_rho(unet: torch.nn.Module, latent_size: int, context_dim: int, repeats: int) -> dict[str, float]:
    """Shallow/full wall-time ratio of one UNet pass on random inputs: the two alternate and the
    best of each counts (on a shared CPU other jobs only ever add time)."""
    sample = torch.randn(RHO_ROWS, unet.config.in_channels, latent_size, latent_size)
    context = torch.randn(RHO_ROWS, 77, context_dim)
    timestep = torch.tensor(500)
    with torch.no_grad():
        with capture_deep_features(unet) as captured:
            unet(sample, timestep, context)
        passes = {"full": lambda: unet(sample, timestep, context),
                  "shallow": lambda: shallow_unet_forward(unet, sample, timestep, context, captured[0])}
        for run in passes.values():
            run()  # warm-up
        best = {name: math.inf for name in passes}
        for _ in range(repeats):
            for name, run in passes.items():
                best[name] = min(best[name], timed(run))
    return {"full_seconds": best["full"], "shallow_seconds": best["shallow"], "rho": best["shallow"] / best["full"]}


def mac_rho(name: str) -> dict[str, float]:
    """Shallow/full MAC ratio of a real UNet architecture (one row, counted on meta tensors)."""
    config, latent_size, context_dim, added_shapes = REAL_UNETS[name]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).eval()
        sample = torch.randn(1, 4, latent_size, latent_size)
        context = torch.randn(1, 77, context_dim)
        added = {key: torch.randn(*shape) for key, shape in added_shapes.items()} or None
        timestep = torch.tensor([500.0])
    with torch.no_grad(), capture_deep_features(unet) as captured:
        with FlopCounterMode(display=False) as full:
            unet(sample, timestep, context, added_cond_kwargs=added)
        with FlopCounterMode(display=False) as shallow:
            shallow_unet_forward(unet, sample, timestep, context, captured[0], added_cond_kwargs=added)
    return {"full_gmacs": full.get_total_flops() / 2e9, "shallow_gmacs": shallow.get_total_flops() / 2e9,
            "rho": shallow.get_total_flops() / full.get_total_flops()}


# ------------------------------------------------------------------------------------ timing


def plain_runner(model_dir: Path, size: int) -> Callable[[int], Any]:
    """Stock diffusers, DPM-Solver++, no LoRA: one UNet call per step."""
    pipe = stock_pipeline(model_dir)
    return lambda steps: pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE, width=size, height=size,
                              generator=torch.Generator().manual_seed(SEED))


def generate_runner(pipe: Any, specs: Sequence[LoraSpec], make_method: Callable[[], Any], size: int) -> Callable[[int], Any]:
    return lambda steps: pipe.generate(PROMPT, specs, make_method(), seed=SEED, steps=steps, guidance_scale=GUIDANCE_SCALE,
                                       width=size, height=size, show_progress=False)


def benchmark_model(name: str, settings: Settings, work_dir: Path, mac_rhos: dict[str, float]) -> tuple[list[Row], dict]:
    build, size = MODEL_BUILDERS[name]
    steps, repeats = settings.steps[name], settings.repeats[name]
    with quiet_loading():
        model_dir = build(work_dir / name)
        loras = build_loras(model_dir, work_dir / f"{name}-loras", max(settings.num_loras[name]))
    pipe = load_pipeline(model_dir, device="cpu")
    latent_size = size // pipe.vae_scale_factor
    base_unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()
    rho = measured_rho(base_unet, latent_size, pipe.text_encoder.config.hidden_size, settings.rho_repeats)
    plain = {"plain": plain_runner(model_dir, size)}
    print(f"{name}: rho {rho['rho']:.3f}", file=sys.stderr, flush=True)
    rows, plain_seconds = [], math.inf
    for num_loras in settings.num_loras[name]:
        specs = [LoraSpec(path) for path in loras[:num_loras]]
        runners = {**plain, "composite": generate_runner(pipe, specs, Composite, size),
                   "cmlora": generate_runner(pipe, specs, CMLoRA, size)}
        seconds, results = race(runners, steps, repeats)
        plain_seconds = seconds["plain"] = min(plain_seconds, seconds.get("plain", math.inf))
        plain = {}  # plain diffusers has no N: timed alongside the first N only
        composite_rows = results["composite"].stats.unet_rows
        stats = results["cmlora"].stats

        def cost(ratio: float) -> float:
            return (stats.unet_rows + ratio * stats.partial_unet_rows) / composite_rows

        rows.append(Row(name, num_loras, steps, seconds["plain"], seconds["composite"], seconds["cmlora"], composite_rows,
                        stats.unet_rows, stats.partial_unet_rows, rho["rho"], cost(rho["rho"]), cost(mac_rhos["sd15"]),
                        cost(mac_rhos["sdxl"])))
        print(f"  N={num_loras}: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()), file=sys.stderr, flush=True)
    return rows, {"unet_parameters": sum(p.numel() for p in base_unet.parameters()), "size": size,
                  "latent_size": latent_size, "rho_measurement": rho}


# ------------------------------------------------------------------------------------ output


COLUMNS = ("model", "N", "T", "plain s", "composite s", "cmlora s", "cmlora/plain", "cmlora/composite",
           "full rows", "partial rows", "rho", "cost/composite", "cost SD1.5 rho", "cost SDXL rho")


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|:---|" + "---:|" * (len(COLUMNS) - 1)]
    for r in rows:
        cells = [
            r.model, r.num_loras, r.steps, f"{r.plain_seconds:.2f}", f"{r.composite_seconds:.2f}",
            f"{r.cmlora_seconds:.2f}", f"{r.cmlora_vs_plain:.2f}", f"{r.cmlora_vs_composite:.2f}", r.full_rows,
            r.partial_rows, f"{r.rho:.3f}", f"{r.cost_vs_composite:.3f}", f"{r.cost_sd15_macs:.3f}",
            f"{r.cost_sdxl_macs:.3f}",
        ]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def projection_table(mac: dict[str, dict[str, float]], steps: Sequence[int] = (20, 30, 50, 220)) -> str:
    """UNet-equivalent cost / Composite's from the default schedule alone (step 0: N full passes;
    other refresh steps: 1 full + N-1 shallow; the rest: N shallow), with the real UNets' MAC rho."""
    lines = ["| T | N | full | shallow | SD1.5 cost | SDXL cost |", "|---:|---:|---:|---:|---:|---:|"]
    for num_steps in steps:
        refreshes = len(refresh_steps(num_steps))
        for num_loras in (2, 3, 4, 5):
            full = num_loras + refreshes - 1
            shallow = num_loras * num_steps - full
            costs = [(full + mac[name]["rho"] * shallow) / (num_loras * num_steps) for name in ("sd15", "sdxl")]
            lines.append(f"| {num_steps} | {num_loras} | {full} | {shallow} | {costs[0]:.3f} | {costs[1]:.3f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps, one repeat, N=2..5 on tiny and N=3 on mid (< 90 s on an idle CPU)")
    parser.add_argument("--models", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (atomically)")
    return parser.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    models = tuple(name.strip() for name in args.models.split(",") if name.strip())
    unknown = sorted(set(models) - set(MODEL_BUILDERS))
    if unknown:
        raise SystemExit(f"--models: unknown model {unknown[0]!r}; use {', '.join(MODEL_BUILDERS)}")
    all_n = (2, 3, 4, 5)
    if args.quick:
        return Settings({"tiny": all_n, "mid": (3,)}, {"tiny": 6, "mid": 4}, {"tiny": 1, "mid": 1}, 2, models, True)
    return Settings({"tiny": all_n, "mid": all_n}, {"tiny": 30, "mid": 20}, {"tiny": 2, "mid": 1}, 5, models, False)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = make_settings(args)
    started = time.perf_counter()
    mac = {name: mac_rho(name) for name in REAL_UNETS}
    mac_rhos = {name: values["rho"] for name, values in mac.items()}
    rows, models = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-cmlora-") as work:
        for name in settings.models:
            model_rows, models[name] = benchmark_model(name, settings, Path(work), mac_rhos)
            rows.extend(model_rows)
    table = markdown_table(rows)
    print(table)
    macs = ", ".join(
        f"{name} {m['rho']:.3f} ({m['shallow_gmacs']:.0f}/{m['full_gmacs']:.0f} GMAC per row)" for name, m in mac.items()
    )
    print(f"\nMAC rho (shallow/full, real UNets): {macs}\n")
    print(projection_table(mac))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.out:
        payload = {"settings": asdict(settings), "rows": [asdict(row) for row in rows], "models": models, "mac_rho": mac,
                   "projection_markdown": projection_table(mac), "machine": machine_info(),
                   "seconds": time.perf_counter() - started}
        write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
