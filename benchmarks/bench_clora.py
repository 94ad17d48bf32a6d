"""What CLoRA costs: wall time against plain diffusers and Composite, against its cost floor, and peak
memory, for N = 2..4 LoRAs, with the N + 1 branches batched in one UNet call or run one call each.

For each model (``tiny``: loracompose's tiny random SD1.5; ``mid``: the same pipeline with the random
SD1.5-layout UNet of bench_cmlora.py) it builds the folder and N random LoRAs with trigger words in a
temporary folder and times, in this process, best of the repeats, interleaved (``--clock cpu``, the
default, counts this process's CPU time with one torch thread, which other jobs on a shared CPU do
not inflate; ``--clock wall`` counts elapsed time):

* ``plain``: stock ``diffusers.StableDiffusionPipeline``, DPM-Solver++, no LoRA (1 call/step);
* ``composite``: ``generate`` with ``Composite(batched=...)`` (N branches per step);
* ``clora``: ``generate`` with ``CLoRA(batched=..., gate=...)`` (plus U optimisation passes:
  conditional rows of all branches forward with a graph, one backward each); ``gate="prediction"``:
  N + 1 branches' CFG rows per step; ``gate="layers"`` (the default): a map pass of the N + 1
  branches' conditional rows ending after the map layers, then one regional CFG pass (2 rows).

Cost floor: the UNet passes the algorithm needs and nothing else (no map capture, loss, masks,
fusion or delta masking), timed on the pipeline's own UNet with each row routed through its branch's
LoRA as ``generate`` does, random inputs: ``T * F(N+1) + U * FB(N+1)`` (prediction) or
``T * (M(N+1) + F_all) + U * FB(N+1)`` (layers), plus plain diffusers' non-UNet time (text encoders,
VAE, scheduler: its wall time minus ``T * F(base)``). ``F(b)`` is a no-grad CFG forward of b branches
(2b rows); ``M(b)`` a no-grad forward of their b conditional rows up to the last map layer; ``F_all``
a no-grad CFG forward (2 rows) with every LoRA active; ``FB(b)`` a forward of b conditional rows
with a graph plus a backward from the last map layer's output (the loss's deepest layer) to the
latents. Map layers as CLoRA picks them for the latent size. Composite's floor is ``T * F(N)`` plus
the same non-UNet time. Target: clora/floor <= 1.1.

Graph MB: what autograd keeps for one optimisation pass (saved tensors, weights excluded): the memory
CLoRA needs beyond Composite's.
Peak memory: the rise of the process's peak resident set over its resident set at the start of the
run (Linux ``/proc/self/clear_refs`` resets the peak), so each run is measured on its own.

    python benchmarks/bench_clora.py --quick
    python benchmarks/bench_clora.py --out bench_out/clora.json
"""

from __future__ import annotations

import argparse
import math
import os
import re
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

from loracompose import Composite, LoraSpec, load_pipeline  # noqa: E402
from loracompose.attention import LatentGrid, stop_after_layers  # noqa: E402
from loracompose.methods.clora import CLoRA, frozen_parameters, map_layers  # noqa: E402
from loracompose.pipelines.adapters import BASE_ROW, AdapterController  # noqa: E402
from loracompose.pipelines.compose_pipeline import quiet_loading  # noqa: E402
from loracompose.pipelines.stats import peak_rss_bytes  # noqa: E402
from loracompose.assets.tiny import build_tiny_lora, build_tiny_sd15  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine_info, stock_pipeline, write_json  # noqa: E402
from bench_cmlora import build_mid  # noqa: E402  (the same "mid" model as the CMLoRA benchmark)

PROMPT = "a photo of a cat and a dog in a garden"
TRIGGERS = ("zkx", "qwv", "plk", "vrn")
SEED = 0
GUIDANCE_SCALE = 7.5
SIZE = 64

MODEL_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "tiny": lambda out: build_tiny_sd15(out, seed=SEED),
    "mid": build_mid,
}


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    num_loras: tuple[int, ...]
    steps: dict[str, int]
    repeats: int
    floor_repeats: int
    clora: dict[str, Any]
    quick: bool


@dataclass
class Row:
    model: str
    num_loras: int
    gate: str
    batched: bool
    steps: int
    updates: int
    plain_seconds: float
    composite_seconds: float
    clora_seconds: float
    clora_floor_seconds: float
    composite_floor_seconds: float
    clora_unet_calls: int
    clora_graph_mb: float
    clora_peak_mb: float
    composite_peak_mb: float
    plain_peak_mb: float

    @property
    def clora_vs_plain(self) -> float:
        return self.clora_seconds / self.plain_seconds

    @property
    def clora_vs_composite(self) -> float:
        return self.clora_seconds / self.composite_seconds

    @property
    def clora_vs_floor(self) -> float:
        return self.clora_seconds / self.clora_floor_seconds

    @property
    def composite_vs_floor(self) -> float:
        return self.composite_seconds / self.composite_floor_seconds


# ------------------------------------------------------------------------------------ memory


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak_memory() -> int:
    """Reset the process's peak RSS where Linux allows it; the current RSS in bytes (0 if unknown)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") * 1024
    except (OSError, AttributeError):
        return 0


def peak_memory_rise(start: int) -> float:
    """MB the peak RSS rose above ``start`` since :func:`reset_peak_memory` (NaN if unknown)."""
    if not start:
        return math.nan
    try:
        return (_status_kib("VmHWM") * 1024 - start) / 2**20
    except (OSError, AttributeError):
        return math.nan


# ------------------------------------------------------------------------------------ timing


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def race(runners: dict[str, Callable[[int], Any]], steps: int, repeats: int,
         warm: bool = False) -> tuple[dict[str, float], dict[str, Any], dict[str, float]]:
    """Best time of each runner over ``repeats`` rounds that run them in turn (after a one-step
    warm-up that loads LoRAs, unless ``warm``), its last result and its peak memory rise (MB)."""
    results = {} if warm else {name: run(1) for name, run in runners.items()}
    best = {name: math.inf for name in runners}
    peaks = {name: 0.0 for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = reset_peak_memory()
            started = clock()
            results[name] = run(steps)
            best[name] = min(best[name], clock() - started)
            peaks[name] = max(peaks[name], peak_memory_rise(start))
    return best, results, peaks


def best_time(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm-up
    best = math.inf
    for _ in range(repeats):
        started = clock()
        run()
        best = min(best, clock() - started)
    return best


class FloorTimer:
    """The UNet passes CLoRA cannot avoid, on the pipeline's own UNet with its LoRAs routed per row as
    ``generate`` routes them (random inputs): F(branches) a no-grad CFG forward (2 rows per branch),
    FB(branches) a forward of the conditional rows with a graph plus a backward from the last map
    layer's output to the latents. ``branches`` are adapter names, "__base__" for the base model."""

    def __init__(self, pipe: Any, latent_size: int, repeats: int):
        self.unet = pipe.unet
        self.adapters = AdapterController({"unet": pipe.unet})
        self.latent_size, self.repeats = latent_size, repeats
        self.context_dim = pipe.unet.config.cross_attention_dim
        defaults = CLoRA()
        layers = map_layers(pipe.unet, LatentGrid(latent_size, latent_size), defaults.min_map_side,
                            defaults.map_layers_per_module)
        self.map_layer_names = [layer.name for layer in layers]
        self.last_map_layer = pipe.unet.get_submodule(layers[-1].name)

    def _inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = torch.randn(rows, self.unet.config.in_channels, self.latent_size, self.latent_size)
        return sample, torch.randn(rows, 77, self.context_dim)

    def _routed(self, row_adapters: Sequence[str]) -> Any:
        self.adapters.activate({})
        self.adapters.set_weights({name: 1.0 for name in row_adapters if name != BASE_ROW})
        return self.adapters.rows("unet", row_adapters)

    def forward(self, branches: Sequence[str]) -> float:
        sample, context = self._inputs(2 * len(branches))
        with torch.no_grad(), self._routed(list(branches) * 2):
            return best_time(lambda: self.unet(sample, torch.tensor(500), context), self.repeats)

    def map_forward(self, branches: Sequence[str]) -> float:
        """No-grad forward of one conditional row per branch, ending after the map layers."""
        sample, context = self._inputs(len(branches))

        def run() -> None:
            with stop_after_layers(self.unet, self.map_layer_names):
                self.unet(sample, torch.tensor(500), context)

        with torch.no_grad(), self._routed(list(branches)):
            return best_time(run, self.repeats)

    def all_loras_forward(self, names: Sequence[str]) -> float:
        """No-grad CFG forward (2 rows) with every LoRA in ``names`` active."""
        sample, context = self._inputs(2)
        self.adapters.activate({name: 1.0 for name in names})
        try:
            with torch.no_grad():
                return best_time(lambda: self.unet(sample, torch.tensor(500), context), self.repeats)
        finally:
            self.adapters.activate({})

    def forward_backward(self, branches: Sequence[str]) -> float:
        sample, context = self._inputs(len(branches))
        captured: list[torch.Tensor] = []
        hook = self.last_map_layer.register_forward_hook(lambda _m, _a, output: captured.append(output))

        def run() -> None:
            captured.clear()
            latents = sample.clone().requires_grad_(True)
            self.unet(latents, torch.tensor(500), context)
            torch.autograd.grad(captured[0].float().square().mean(), latents)

        try:
            with torch.enable_grad(), frozen_parameters(self.unet), self._routed(list(branches)):
                return best_time(run, self.repeats)
        finally:
            hook.remove()


def optimisation_graph_mb(pipe: Any, specs: Sequence[LoraSpec], batched: bool) -> float:
    """MB of tensors autograd keeps for one CLoRA optimisation pass (unique storages, weights excluded)."""
    weights = {parameter.untyped_storage().data_ptr() for parameter in pipe.unet.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        pipe.generate(PROMPT, specs, CLoRA(batched=batched, max_update_step=1, iterative_steps=()), seed=SEED, steps=1,
                      guidance_scale=GUIDANCE_SCALE, width=SIZE, height=SIZE, output_type="latent", show_progress=False)
    return sum(storages.values()) / 2**20


# ------------------------------------------------------------------------------------ runs


def plain_runner(model_dir: Path) -> Callable[[int], Any]:
    pipe = stock_pipeline(model_dir)
    return lambda steps: pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE, width=SIZE, height=SIZE,
                              generator=torch.Generator().manual_seed(SEED))


def generate_runner(pipe: Any, specs: Sequence[LoraSpec], make_method: Callable[[], Any]) -> Callable[[int], Any]:
    return lambda steps: pipe.generate(PROMPT, specs, make_method(), seed=SEED, steps=steps, guidance_scale=GUIDANCE_SCALE,
                                       width=SIZE, height=SIZE, show_progress=False)


def build_loras(model_dir: Path, out_dir: Path, count: int) -> list[Path]:
    return [
        build_tiny_lora(model_dir, out_dir / f"concept{k}.safetensors", seed=100 + k, trigger_words=[TRIGGERS[k]],
                        init_scale=2.0)
        for k in range(count)
    ]


def benchmark_model(name: str, settings: Settings, work_dir: Path) -> tuple[list[Row], dict[str, Any]]:
    steps = settings.steps[name]
    with quiet_loading():
        model_dir = MODEL_BUILDERS[name](work_dir / name)
        loras = build_loras(model_dir, work_dir / f"{name}-loras", max(settings.num_loras))
    pipe = load_pipeline(model_dir, device="cpu")
    latent_size = SIZE // pipe.vae_scale_factor
    plain = plain_runner(model_dir)
    rows: list[Row] = []
    plain_seconds, plain_peak, floors = math.inf, math.nan, {}
    for num_loras in settings.num_loras:
        specs = [LoraSpec(path) for path in loras[:num_loras]]
        for gate, batched in (("layers", True), ("layers", False), ("prediction", True), ("prediction", False)):
            runners = {"composite": generate_runner(pipe, specs, lambda: Composite(batched=batched)),
                       "clora": generate_runner(pipe, specs,
                                                lambda: CLoRA(batched=batched, gate=gate, **settings.clora))}
            if not rows:
                runners = {"plain": plain, **runners}  # plain diffusers has no N: timed with the first row only
            seconds, results, peaks = race(runners, steps, settings.repeats, warm=not batched)
            if "plain" in seconds:
                plain_seconds, plain_peak = seconds["plain"], peaks["plain"]
            if num_loras not in floors:
                floors[num_loras] = unet_floor(pipe, latent_size, [lora.name for lora in results["clora"].loras],
                                               settings.floor_repeats)
            floor = floors[num_loras]
            stats = results["clora"].stats
            non_unet = max(0.0, plain_seconds - steps * floor["plain_forward"])
            per_step = floor["clora_forward"] if gate == "prediction" else floor["map_forward"] + floor["all_forward"]
            clora_floor = non_unet + steps * per_step + stats.backward_passes * floor["clora_forward_backward"]
            composite_floor = non_unet + steps * floor["composite_forward"]
            rows.append(Row(name, num_loras, gate, batched, steps, stats.backward_passes, plain_seconds, seconds["composite"],
                            seconds["clora"], clora_floor, composite_floor, stats.unet_calls,
                            optimisation_graph_mb(pipe, specs, batched), peaks["clora"], peaks["composite"], plain_peak))
            print(f"  {name} N={num_loras} gate={gate} batched={batched}: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())
                  + f", floor {clora_floor:.2f} s", file=sys.stderr, flush=True)
    return rows, {"size": SIZE, "latent_size": latent_size, "unet_seconds": floors,
                  "unet_parameters": sum(p.numel() for p in pipe.unet.parameters())}


def unet_floor(pipe: Any, latent_size: int, names: Sequence[str], repeats: int) -> dict[str, float]:
    """Best wall seconds of the UNet passes the floors are made of, for these LoRAs."""
    timer = FloorTimer(pipe, latent_size, repeats)
    return {"plain_forward": timer.forward([BASE_ROW]), "composite_forward": timer.forward(names),
            "clora_forward": timer.forward([BASE_ROW, *names]),
            "clora_forward_backward": timer.forward_backward([BASE_ROW, *names]),
            "map_forward": timer.map_forward([BASE_ROW, *names]), "all_forward": timer.all_loras_forward(names)}


# ------------------------------------------------------------------------------------ output


COLUMNS = ("model", "N", "gate", "batched", "T", "updates", "plain s", "composite s", "clora s", "clora/plain",
           "clora/composite", "floor s", "clora/floor", "composite/its floor", "graph MB", "peak MB clora",
           "peak MB composite")


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|:---|" + "---:|" * (len(COLUMNS) - 1)]
    for r in rows:
        cells = [
            r.model, r.num_loras, r.gate, "yes" if r.batched else "no", r.steps, r.updates, f"{r.plain_seconds:.2f}",
            f"{r.composite_seconds:.2f}", f"{r.clora_seconds:.2f}", f"{r.clora_vs_plain:.1f}",
            f"{r.clora_vs_composite:.2f}", f"{r.clora_floor_seconds:.2f}", f"{r.clora_vs_floor:.2f}",
            f"{r.composite_vs_floor:.2f}", f"{r.clora_graph_mb:.1f}", f"{r.clora_peak_mb:.0f}", f"{r.composite_peak_mb:.0f}",
        ]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny model only, 4 steps, 2 extra iterations at step 0, 1 repeat (< 3 min on a busy CPU)")
    parser.add_argument("--models", default=None, help="comma-separated: tiny, mid (default: tiny,mid; --quick: tiny)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: this process's CPU time (steady on a shared CPU, with 1 thread); wall: elapsed time")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steadier timings on a shared CPU)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (atomically)")
    return parser.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    default_models = "tiny" if args.quick else "tiny,mid"
    models = tuple(name.strip() for name in (args.models or default_models).split(",") if name.strip())
    unknown = sorted(set(models) - set(MODEL_BUILDERS))
    if unknown:
        raise SystemExit(f"--models: unknown model {unknown[0]!r}; use {', '.join(MODEL_BUILDERS)}")
    if args.quick:
        return Settings(models, (2, 3, 4), {"tiny": 4, "mid": 4}, 1, 3,
                        {"iterative_steps": (0,), "extra_iterations": 2}, True)
    return Settings(models, (2, 3, 4), {"tiny": 30, "mid": 10}, 2, 5, {}, False)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = make_settings(args)
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows, models = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-clora-") as work:
        for name in settings.models:
            model_rows, models[name] = benchmark_model(name, settings, Path(work))
            rows.extend(model_rows)
    table = markdown_table(rows)
    print(table)
    print(f"\nTimes: {args.clock} clock, {args.threads} torch thread(s). CLoRA settings: defaults"
          f"{' + ' + str(settings.clora) if settings.clora else ''}; total {time.perf_counter() - started:.0f} s wall")
    if args.out:
        payload = {"settings": asdict(settings), "clock": args.clock,
                   "rows": [{**asdict(row), "clora_vs_plain": row.clora_vs_plain,
                             "clora_vs_composite": row.clora_vs_composite, "clora_vs_floor": row.clora_vs_floor,
                             "composite_vs_floor": row.composite_vs_floor} for row in rows],
                   "models": models, "table_markdown": table,
                   "machine": {**machine_info(), "process_peak_rss_mb": peak_rss_bytes() / 2**20},
                   "seconds": time.perf_counter() - started}
        write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
