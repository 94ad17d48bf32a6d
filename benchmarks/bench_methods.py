"""Time each composition method against plain diffusers, for N = 1..4 LoRAs, in one process.

For every model (``tiny``: the tiny random SD1.5 of :mod:`loracompose.tiny`; ``mid``: the same
pipeline with a larger random SD1.5-architecture UNet) it builds the model folder and random LoRAs
in a temporary folder, then times:

* ``plain``: ``diffusers.StableDiffusionPipeline.from_pretrained`` with DPM-Solver++, no LoRA;
* ``no-lora``: ``loracompose`` ``generate`` with no LoRA (the loop's own overhead; the other
  configurations' LoRAs are loaded but inactive by the time it is timed);
* ``merge``, ``merge-fuse``, ``switch``, ``composite-batched``, ``composite-seq``, ``cmlora``
  (default cache schedule) and ``tara`` with N LoRAs,
  through ``loracompose.load_pipeline`` and ``generate``.

Every configuration is run once to warm up (this also loads its LoRAs), then all of them are timed
round-robin ``--repeats`` times, so that load from other processes on a shared machine hits every
configuration alike. Median wall time and median process CPU time (all threads; steadier than
wall time when other processes share the CPUs) are reported, each with its ratio to ``plain`` on
the same model. UNet calls/rows and peak memory come from ``GenerationStats`` (counted by a hook for
``plain``). On CPU the peak is the process's peak RSS: a high-water mark over the whole process,
not a per-configuration figure. Idle OpenMP threads wait passively (``OMP_WAIT_POLICY``).

    python benchmarks/bench_methods.py --quick
    python benchmarks/bench_methods.py --out bench_out/methods.json --markdown
    python benchmarks/bench_methods.py --device cuda --dtype fp16 --models tiny,mid
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

PROCESS_STARTED = time.perf_counter()  # the total includes the (slow) imports below

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Idle OpenMP workers sleep instead of spin-waiting (read when torch loads). On a shared 2-core
# machine spinning workers made a 0.4 s tiny generation take 2-10 s; passive waiting keeps it ~0.5 s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402

from loracompose import CMLoRA, Composite, CompositionMethod, LoraSpec, Merge, Switch, Tara, load_pipeline  # noqa: E402
from loracompose.pipelines.compose_pipeline import quiet_loading  # noqa: E402
from loracompose.pipelines.loading import resolve_device, resolve_dtype  # noqa: E402
from loracompose.pipelines.stats import MemoryMeter  # noqa: E402
from loracompose.assets.tiny import build_tiny_lora, build_tiny_sd15  # noqa: E402

from bench_common import build_mid_sd15, machine_info, stock_pipeline, write_json  # noqa: E402

PROMPT = "a photo of a cat in a garden"
SEED = 0
GUIDANCE_SCALE = 7.5
LORA_RANK = 4
DEFAULT_STEPS = 6
DEFAULT_REPEATS = 3
QUICK_STEPS = 3
QUICK_REPEATS = 1
MIB = 2**20
# The tiny VAE downsamples 2x, so 64 px is a 32x32 latent: the attention length of SD1.5 at 256 px.
# 128 px (SD1.5's 512 px attention length) costs ~10x more per UNet call: too slow for a 5-minute CPU run.
DEFAULT_MID_SIZE = 64


# --- what is benchmarked -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSetup:
    """A benchmark model: how to build its diffusers folder and the image size it runs at."""

    name: str
    size: int
    build: Callable[[Path], Path]
    description: str


@dataclass(frozen=True)
class MethodCase:
    """A composition method under test, built fresh for each generation."""

    label: str
    make: Callable[[], CompositionMethod]


METHOD_CASES: tuple[MethodCase, ...] = (
    MethodCase("merge", lambda: Merge()),
    MethodCase("merge-fuse", lambda: Merge(fuse=True)),
    MethodCase("switch", lambda: Switch()),
    MethodCase("composite-batched", lambda: Composite(batched=True)),
    MethodCase("composite-seq", lambda: Composite(batched=False)),
    MethodCase("cmlora", lambda: CMLoRA()),  # no profile: classes from categories, default cache schedule
    MethodCase("tara", lambda: Tara()),
)


def model_setups(mid_size: int = DEFAULT_MID_SIZE) -> dict[str, ModelSetup]:
    """The models this benchmark knows, by name; ``mid_size`` is the mid model's image side in pixels."""
    tiny = ModelSetup("tiny", 64, lambda out: build_tiny_sd15(out, seed=SEED), "tiny random SD1.5 (loracompose.tiny)")
    mid = ModelSetup(
        "mid", mid_size, lambda out: build_mid_sd15(out, size=mid_size),
        "tiny SD1.5 with a random UNet: block_out_channels (64, 128, 256), 1 layer per block, 8 heads",
    )
    return {setup.name: setup for setup in (tiny, mid)}


def build_loras(model_dir: Path, out_dir: Path, count: int) -> list[Path]:
    """``count`` random LoRAs (UNet and text encoder, rank ``LORA_RANK``) for the model at ``model_dir``."""
    return [
        build_tiny_lora(
            model_dir, out_dir / f"concept{index}.safetensors", seed=100 + index,
            trigger_words=[f"concept{index}"], rank=LORA_RANK,
        )
        for index in range(count)
    ]


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings:
    """Settings shared by every timed generation."""

    steps: int
    repeats: int
    guidance_scale: float
    device: str
    dtype: str
    max_loras: int
    models: tuple[str, ...]
    mid_size: int
    quick: bool


@dataclass
class RunCost:
    """What one generation cost (the fields of ``GenerationStats`` this benchmark reports)."""

    unet_calls: int
    unet_rows: int
    peak_memory_bytes: int
    peak_memory_source: str
    execution: str


@dataclass
class Measurement:
    """One timed configuration: median wall and CPU times over the repeats, and what the last run cost."""

    model: str
    method: str
    num_loras: int
    wall_seconds: float
    run_seconds: list[float]
    cpu_seconds: float
    run_cpu_seconds: list[float]
    unet_calls: int
    unet_rows: int
    peak_memory_bytes: int
    peak_memory_source: str
    execution: str
    wall_ratio: float = float("nan")
    cpu_ratio: float = float("nan")


@dataclass
class Configuration:
    """A (model, method, N) under test: ``run_once`` does one generation and reports its cost."""

    model: str
    method: str
    num_loras: int
    run_once: Callable[[], RunCost]
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    last_cost: RunCost | None = None

    def measurement(self) -> Measurement:
        assert self.last_cost is not None, "run the configuration before measuring it"
        return Measurement(
            self.model, self.method, self.num_loras, statistics.median(self.seconds), list(self.seconds),
            statistics.median(self.cpu_seconds), list(self.cpu_seconds), **asdict(self.last_cost),
        )


# --- timing --------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(configuration: Configuration, device: torch.device) -> None:
    """One timed generation of the configuration, appended to its wall and process CPU times.

    CPU time (all threads) is the steadier cost figure on a shared machine, where other processes
    stretch wall times; wall time is what a user waits for."""
    synchronize(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    configuration.last_cost = configuration.run_once()
    synchronize(device)
    configuration.seconds.append(time.perf_counter() - started)
    configuration.cpu_seconds.append(time.process_time() - cpu_started)


def time_interleaved(configurations: Sequence[Configuration], repeats: int, device: torch.device) -> None:
    """Warm every configuration up once (loading its LoRAs), then time them round-robin ``repeats``
    times, so that load from other processes drifting over the run hits every configuration alike."""
    for configuration in configurations:
        configuration.last_cost = configuration.run_once()
    for repeat in range(repeats):
        for configuration in configurations:
            timed_run(configuration, device)
        print(f"  {configurations[0].model}: repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)


# --- plain diffusers -----------------------------------------------------------------------------


class UNetCallCounter:
    """Counts forward calls and rows of a UNet through a forward pre-hook."""

    def __init__(self, unet: torch.nn.Module):
        self.calls = 0
        self.rows = 0
        self.handle = unet.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.calls += 1
        self.rows += int(sample.shape[0])

    def reset(self) -> None:
        self.calls = self.rows = 0


def plain_runner(pipe: StableDiffusionPipeline, setup: ModelSetup, settings: RunSettings,
                 device: torch.device) -> Callable[[], RunCost]:
    """A callable running one plain diffusers generation and reporting its cost."""
    counter = UNetCallCounter(pipe.unet)

    def run_once() -> RunCost:
        counter.reset()
        meter = MemoryMeter(device)
        pipe(
            PROMPT, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
            width=setup.size, height=setup.size, generator=torch.Generator("cpu").manual_seed(SEED),
        )
        peak, source = meter.peak()
        return RunCost(counter.calls, counter.rows, peak, source, "plain")

    return run_once


# --- loracompose methods -------------------------------------------------------------------------


def compose_runner(pipe: Any, setup: ModelSetup, loras: Sequence[Path], case: MethodCase,
                   settings: RunSettings) -> Callable[[], RunCost]:
    """A callable running one ``generate`` with these LoRAs and method, reporting its stats."""
    specs = [LoraSpec(path) for path in loras]

    def run_once() -> RunCost:
        stats = pipe.generate(
            PROMPT, specs, case.make(), seed=SEED, steps=settings.steps, guidance_scale=settings.guidance_scale,
            width=setup.size, height=setup.size, show_progress=False,
        ).stats
        return RunCost(stats.unet_calls, stats.unet_rows, stats.peak_memory_bytes, stats.peak_memory_source,
                       stats.execution)

    return run_once


def configurations(setup: ModelSetup, plain: Callable[[], RunCost], compose_pipe: Any, loras: Sequence[Path],
                   settings: RunSettings) -> list[Configuration]:
    """Plain diffusers, ``generate`` without LoRA, then every method for N = 1..max_loras."""
    no_lora = MethodCase("no-lora", lambda: Merge())
    result = [
        Configuration(setup.name, "plain", 0, plain),
        Configuration(setup.name, no_lora.label, 0, compose_runner(compose_pipe, setup, [], no_lora, settings)),
    ]
    for num_loras in range(1, settings.max_loras + 1):
        for case in METHOD_CASES:
            runner = compose_runner(compose_pipe, setup, loras[:num_loras], case, settings)
            result.append(Configuration(setup.name, case.label, num_loras, runner))
    return result


# --- one model -----------------------------------------------------------------------------------


def benchmark_model(setup: ModelSetup, settings: RunSettings, device: torch.device, dtype: torch.dtype,
                    work_dir: Path) -> tuple[list[Measurement], dict[str, Any]]:
    """Build one model and its LoRAs, time plain diffusers and every method; ratios are to plain."""
    started = time.perf_counter()
    with quiet_loading():
        model_dir = setup.build(work_dir / setup.name)
        loras = build_loras(model_dir, work_dir / f"{setup.name}-loras", settings.max_loras)
    info = model_info(setup, model_dir, time.perf_counter() - started)
    print(f"{setup.name}: built in {info['build_seconds']:.1f} s ({info['unet_parameters'] / 1e6:.2f} M UNet "
          f"parameters, {setup.size}x{setup.size} px)", file=sys.stderr, flush=True)
    plain_pipe = stock_pipeline(model_dir, dtype=dtype, device=device)
    compose_pipe = load_pipeline(model_dir, device=settings.device, dtype=settings.dtype)
    plain = plain_runner(plain_pipe, setup, settings, device)
    runs = configurations(setup, plain, compose_pipe, loras, settings)
    time_interleaved(runs, settings.repeats, device)
    rows = [run.measurement() for run in runs]
    for row in rows:
        row.wall_ratio = row.wall_seconds / rows[0].wall_seconds
        row.cpu_ratio = row.cpu_seconds / rows[0].cpu_seconds
    del plain_pipe, compose_pipe, runs
    free_memory(device)
    info["seconds"] = time.perf_counter() - started
    return rows, info


def free_memory(device: torch.device) -> None:
    """Return a finished model's memory before the next one loads."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def model_info(setup: ModelSetup, model_dir: Path, build_seconds: float) -> dict[str, Any]:
    """Description, size and UNet parameter count of a built model."""
    config = UNet2DConditionModel.load_config(model_dir, subfolder="unet")
    unet = UNet2DConditionModel.from_config(config)
    return {
        "description": setup.description, "width": setup.size, "height": setup.size,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "unet_block_out_channels": list(config["block_out_channels"]), "build_seconds": build_seconds,
    }


# --- output --------------------------------------------------------------------------------------


COLUMNS: tuple[tuple[str, int], ...] = (
    ("model", 5), ("method", 17), ("N", 2), ("wall s", 8), ("x plain", 7), ("CPU s", 7), ("CPU x plain", 11),
    ("UNet calls", 10), ("UNet rows", 9), ("peak MiB", 8), ("execution", 10),
)
NUMERIC_COLUMNS = {"N", "wall s", "x plain", "CPU s", "CPU x plain", "UNet calls", "UNet rows", "peak MiB"}


def table_cells(row: Measurement) -> list[str]:
    """The printed cells of one row, in ``COLUMNS`` order."""
    return [
        row.model, row.method, str(row.num_loras), f"{row.wall_seconds:.3f}", f"{row.wall_ratio:.2f}",
        f"{row.cpu_seconds:.2f}", f"{row.cpu_ratio:.2f}", str(row.unet_calls), str(row.unet_rows), f"{row.peak_memory_bytes / MIB:.0f}", row.execution,
    ]


def format_table(rows: Sequence[Measurement]) -> str:
    """A fixed-width text table: text columns left-aligned, numbers right-aligned."""

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if name in NUMERIC_COLUMNS else cell.ljust(width)
            for cell, (name, width) in zip(cells, COLUMNS)
        ).rstrip()

    header = line([name for name, _ in COLUMNS])
    return "\n".join([header, "-" * len(header), *(line(table_cells(row)) for row in rows)])


def format_markdown(rows: Sequence[Measurement]) -> str:
    """The same table in GitHub Markdown."""
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---:" if name in NUMERIC_COLUMNS else ":---" for name, _ in COLUMNS) + "|"
    body = ["| " + " | ".join(table_cells(row)) + " |" for row in rows]
    return "\n".join([header, rule, *body])


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps, {QUICK_REPEATS} repeats, tiny model only (under 90 s on 2 CPU cores)")
    parser.add_argument("--steps", type=int, help=f"denoising steps (default {DEFAULT_STEPS}; quick {QUICK_STEPS})")
    parser.add_argument("--repeats", type=int, help=f"timed runs per configuration after one warm-up "
                                                     f"(default {DEFAULT_REPEATS}; quick {QUICK_REPEATS})")
    parser.add_argument("--models", help="comma-separated models: tiny, mid (default tiny,mid; quick tiny)")
    parser.add_argument("--max-loras", type=int, default=4, help="largest N of LoRAs (default 4)")
    parser.add_argument("--mid-size", type=int, default=DEFAULT_MID_SIZE,
                        help=f"mid model image side in pixels, a multiple of 8 (default {DEFAULT_MID_SIZE})")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file (atomically)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown too")
    return parser.parse_args(argv)


def run_settings(args: argparse.Namespace, known_models: Sequence[str]) -> RunSettings:
    """Resolve quick-mode defaults and check the arguments."""
    models = tuple(name.strip() for name in (args.models or ("tiny" if args.quick else "tiny,mid")).split(","))
    unknown = [name for name in models if name not in known_models]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(known_models)}")
    settings = RunSettings(
        steps=args.steps if args.steps is not None else (QUICK_STEPS if args.quick else DEFAULT_STEPS),
        repeats=args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else DEFAULT_REPEATS),
        guidance_scale=GUIDANCE_SCALE, device=args.device, dtype=args.dtype,
        max_loras=args.max_loras, models=models, mid_size=args.mid_size, quick=args.quick,
    )
    if settings.steps < 1 or settings.repeats < 1 or settings.max_loras < 1:
        raise SystemExit("--steps, --repeats and --max-loras must be at least 1")
    if settings.mid_size < 8 or settings.mid_size % 8:
        raise SystemExit(f"--mid-size {settings.mid_size}: use a positive multiple of 8 pixels")
    return settings


def run_all(settings: RunSettings, device: torch.device, dtype: torch.dtype) -> tuple[list[Measurement], dict[str, Any]]:
    """Benchmark every requested model in turn, in one scratch folder."""
    setups = model_setups(settings.mid_size)
    rows: list[Measurement] = []
    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="loracompose-bench-") as scratch:
        for name in settings.models:
            model_rows, models[name] = benchmark_model(setups[name], settings, device, dtype, Path(scratch))
            rows += model_rows
    return rows, models


def report(rows: Sequence[Measurement], settings: RunSettings, device: torch.device, dtype: torch.dtype,
           total: float, markdown: bool) -> None:
    """Print the table (and its Markdown form) with a one-line summary of the run."""
    print(format_table(rows))
    if markdown:
        print("\n" + format_markdown(rows))
    print(f"\ntotal {total:.1f} s ({settings.steps} steps, median of {settings.repeats} runs after 1 warm-up, "
          f"{device}, {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table; write JSON with ``--out``."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = run_settings(args, list(model_setups()))
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if device.type == "cpu" and dtype == torch.float16:
        raise SystemExit("--dtype fp16 is for GPUs; use fp32 (or bf16) on CPU")
    rows, models = run_all(settings, device, dtype)
    total = time.perf_counter() - PROCESS_STARTED
    report(rows, settings, device, dtype, total, args.markdown)
    if args.out:
        payload = {"machine": machine_info(device, dtype), "settings": asdict(settings), "models": models,
                   "total_seconds": total, "rows": [asdict(row) for row in rows]}
        write_json(args.out, payload)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
