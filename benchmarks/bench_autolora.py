"""AutoLoRA's costs: retrieval latency over libraries of 10/100/1000 LoRAs, and gated fusion's wall time
against plain diffusers for N = 2..4 LoRAs.

Retrieval (one process, tiny random SD1.5 of :mod:`loracompose.tiny`): each library is a folder of
synthetic LoRA files written directly with safetensors (the tiny UNet's 48 adapted layers, rank 4,
random fp16 factors, a name, trigger word, category and description in the metadata), cheap to make
at any size. Per size it times:

* ``index cold`` / ``index warm``: :func:`open_library` on the new folder (every header read, index
  written) and again unchanged (stat calls only);
* ``tier 1 first`` / ``tier 1 query``: :func:`rank_loras` with the pipeline's text encoder, first with an
  empty cache (every metadata text embedded), then the median warm query (prompt embedding + cosine +
  category-limited selection);
* ``tier 2 first`` / ``tier 2 query``: the same with a weight retriever of the reference's size (768
  wide, 2 layers, 12 heads, MLP 3072; untrained weights: the cost does not depend on them), first
  reading and encoding every LoRA file, then warm;
* ``select``: ranking alone over cached embeddings (cosine, trigger boost, sort, limits).

The tiny text encoder is far cheaper than CLIP-L (SD1.5) or CLIP-L + bigG (SDXL): there, the prompt
embedding adds a fixed ~10-50 ms per query on a CPU and embedding the library's texts scales with N.

Gated fusion, tiny SD1.5 at 64 px, DPM-Solver++, CFG 7.5, interleaved rounds (best of rounds: other
processes only ever add time; process CPU time beside wall time): ``plain`` (stock diffusers, no
LoRA), ``diffusers+N`` (stock, N LoRAs active), ``merge`` (``generate`` + Merge) and ``autolora``
(``generate`` + AutoLoRA with random gates loaded from a file: the full gate formula on every layer).

    python benchmarks/bench_autolora.py --quick
    python benchmarks/bench_autolora.py --out bench_out/autolora.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

PROCESS_STARTED = time.perf_counter()

from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP workers sleep (read when torch loads)

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from loracompose import LoraSpec, Merge, load_pipeline  # noqa: E402
from loracompose.methods.autolora import AutoLoRA  # noqa: E402
from loracompose.methods.autolora_gates import GateSet, lora_layer_channels, save_gates  # noqa: E402
from loracompose.library import open_library  # noqa: E402
from loracompose.pipelines.compose_pipeline import quiet_loading  # noqa: E402
from loracompose.retrieval import (  # noqa: E402
    EmbeddingCache,
    PipelineTextEmbedder,
    RetrieverConfig,
    WeightRetriever,
    cosine_scores,
    layer_schema,
    rank_by_similarity,
    rank_loras,
    read_unet_factors,
)
from loracompose.assets.tiny import build_tiny_lora, build_tiny_sd15  # noqa: E402

from bench_common import interleaved, machine_info, stock_pipeline, write_json  # noqa: E402

SIZE = 64
SEED = 0
GUIDANCE = 7.5
LORA_COUNTS = (2, 3, 4)
CATEGORIES = ("character", "style", "background", "object", "clothing")
WORDS = ("fox", "whale", "castle", "forest", "neon", "ink", "pixel", "desert", "robot", "cat", "oil", "snow", "city",
         "armor", "dress", "sunset", "river", "dragon", "glass", "paper")
PROMPT = "a robot cat in a neon city at sunset, tr0042"


@dataclass(frozen=True)
class Plan:
    library_sizes: tuple[int, ...]
    query_repeats: int
    steps: int
    rounds: int
    quick: bool


@dataclass
class RetrievalRow:
    loras: int
    seconds: dict[str, float]


@dataclass
class FusionRow:
    num_loras: int
    seconds: dict[str, float]
    cpu_seconds: dict[str, float]
    median_seconds: dict[str, float]
    unet_calls: int
    ratios: dict[str, float] = field(default_factory=dict)


# --- retrieval -----------------------------------------------------------------------------------


def write_synthetic_library(template: Path, folder: Path, count: int) -> Path:
    """``count`` LoRA files with the template's keys and shapes, random fp16 factors and varied metadata."""
    folder.mkdir(parents=True)
    shapes = {key: value.shape for key, value in load_file(template).items() if key.startswith("unet.")}
    rng = torch.Generator().manual_seed(SEED)
    for index in range(count):
        tensors = {key: torch.randn(shape, generator=rng).half() for key, shape in shapes.items()}
        picks = torch.randint(len(WORDS), (3,), generator=rng).tolist()
        metadata = {"modelspec.title": f"lora {index}", "modelspec.trigger_phrase": f"tr{index:04d}",
                    "loracompose.category": CATEGORIES[index % len(CATEGORIES)],
                    "loracompose.description": "a lora of " + " ".join(WORDS[p] for p in picks),
                    "modelspec.architecture": "stable-diffusion-v1/lora", "loracompose.alpha": "4"}
        save_file(tensors, str(folder / f"lora{index:04d}.safetensors"), metadata=metadata)
    return folder


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def median_seconds(call: Callable[[], Any], repeats: int) -> float:
    return statistics.median(timed(call)[0] for _ in range(repeats))


def reference_retriever(template: Path, text_dim: int) -> WeightRetriever:
    layers = layer_schema([read_unet_factors(template)])
    torch.manual_seed(SEED)
    return WeightRetriever(RetrieverConfig(layers, text_dim, 768, 2, 12, 3072, "bench")).eval()


def measure_retrieval(model: Path, template: Path, scratch: Path, plan: Plan) -> list[RetrievalRow]:
    with quiet_loading():
        pipe = load_pipeline(model, device="cpu", dtype="fp32")
    embedder = PipelineTextEmbedder(pipe)
    retriever = reference_retriever(template, int(embedder.embed(["x"]).shape[-1]))
    rows = []
    for count in plan.library_sizes:
        folder = write_synthetic_library(template, scratch / f"library-{count}", count)
        seconds: dict[str, float] = {}
        seconds["index cold"], library = timed(lambda: open_library(folder))
        seconds["index warm"] = median_seconds(lambda: open_library(folder), plan.query_repeats)
        for tier, extra in (("tier 1", {}), ("tier 2", {"retriever": retriever})):
            cache = EmbeddingCache()
            query = lambda: rank_loras(PROMPT, library, embedder, top_k=3, cache=cache, **extra)  # noqa: E731
            seconds[f"{tier} first"], ranked = timed(query)
            seconds[f"{tier} query"] = median_seconds(query, plan.query_repeats)
            if tier == "tier 1":
                assert ranked[0].entry.trigger_words == ("tr0042",) or count <= 42
        entries = library.sorted_entries()
        keys = torch.randn(len(entries), retriever.config.text_dim)
        prompt_vector = torch.randn(retriever.config.text_dim)
        select = lambda: rank_by_similarity(PROMPT, cosine_scores(prompt_vector, keys), entries, top_k=3)  # noqa: E731
        seconds["select"] = median_seconds(select, plan.query_repeats)
        rows.append(RetrievalRow(count, seconds))
        print(f"  {count} LoRAs: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in seconds.items()), file=sys.stderr,
              flush=True)
    return rows


# --- gated fusion --------------------------------------------------------------------------------


def stock_runner(pipe: StableDiffusionPipeline, plan: Plan, num_loras: int) -> Callable[[], None]:
    def run() -> None:
        if num_loras:
            pipe.set_adapters([f"lora{index}" for index in range(num_loras)], [1.0] * num_loras)
        pipe(PROMPT, num_inference_steps=plan.steps, guidance_scale=GUIDANCE, width=SIZE, height=SIZE,
             generator=torch.Generator("cpu").manual_seed(SEED))

    return run


def compose_runner(pipe: Any, specs: Sequence[LoraSpec], make_method: Callable[[], Any], plan: Plan,
                   cost: dict[str, int]) -> Callable[[], None]:
    def run() -> None:
        stats = pipe.generate(PROMPT, specs, make_method(), seed=SEED, steps=plan.steps, guidance_scale=GUIDANCE,
                              width=SIZE, height=SIZE, show_progress=False).stats
        cost["unet_calls"] = stats.unet_calls

    return run


def random_gate_file(pipe: Any, specs: Sequence[LoraSpec], out: Path) -> Path:
    pipe.prepare_loras(specs)
    gates = GateSet(lora_layer_channels(pipe.unet, [spec.name or spec.path.stem for spec in specs]))
    with torch.no_grad():
        for parameter in gates.parameters():
            parameter.normal_()
    return save_gates(gates, out)


def measure_fusion(model: Path, loras: Sequence[Path], scratch: Path, plan: Plan) -> list[FusionRow]:
    plain, with_loras = stock_pipeline(model), stock_pipeline(model, loras)
    compose = load_pipeline(model, device="cpu", dtype="fp32")
    specs = [LoraSpec(path) for path in loras]
    gates = random_gate_file(compose, specs, scratch / "gates.safetensors")
    rows = []
    for num_loras in LORA_COUNTS:
        cost: dict[str, int] = {}
        runners = {
            "plain": stock_runner(plain, plan, 0),
            "diffusers+N": stock_runner(with_loras, plan, num_loras),
            "merge": compose_runner(compose, specs[:num_loras], Merge, plan, {}),
            "autolora": compose_runner(compose, specs[:num_loras], lambda: AutoLoRA(gates=str(gates)), plan, cost),
        }
        wall, cpu = interleaved(runners, plan.rounds)
        best = {name: min(values) for name, values in wall.items()}
        best_cpu = {name: min(values) for name, values in cpu.items()}
        median = {name: statistics.median(values) for name, values in wall.items()}
        row = FusionRow(num_loras, best, best_cpu, median, cost["unet_calls"])
        row.ratios = {"autolora/plain": best["autolora"] / best["plain"],
                      "autolora/diffusers+N": best["autolora"] / best["diffusers+N"],
                      "autolora/merge": best["autolora"] / best["merge"],
                      "autolora/plain cpu": best_cpu["autolora"] / best_cpu["plain"]}
        print(f"  N={num_loras}: " + ", ".join(f"{k} {v:.3f} s" for k, v in best.items()), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


# --- output --------------------------------------------------------------------------------------


RETRIEVAL_COLUMNS = ("index cold", "index warm", "tier 1 first", "tier 1 query", "tier 2 first", "tier 2 query",
                     "select")
RATIO_COLUMNS = ("autolora/plain", "autolora/diffusers+N", "autolora/merge", "autolora/plain cpu")


def retrieval_table(rows: Sequence[RetrievalRow]) -> str:
    header = "| LoRAs | " + " | ".join(f"{name} ms" for name in RETRIEVAL_COLUMNS) + " |"
    rule = "|" + "---:|" * (len(RETRIEVAL_COLUMNS) + 1)
    body = [f"| {row.loras} | " + " | ".join(f"{row.seconds[name] * 1e3:.1f}" for name in RETRIEVAL_COLUMNS) + " |"
            for row in rows]
    return "\n".join([header, rule, *body])


def fusion_table(rows: Sequence[FusionRow]) -> str:
    names = list(rows[0].seconds)
    columns = ["N", *(f"{name} s" for name in names), *RATIO_COLUMNS, "UNet calls"]
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "---:|" * len(columns)
    body = [f"| {row.num_loras} | " + " | ".join(f"{row.seconds[name]:.3f}" for name in names) + " | "
            + " | ".join(f"{row.ratios[key]:.2f}" for key in RATIO_COLUMNS) + f" | {row.unet_calls} |" for row in rows]
    return "\n".join([header, rule, *body])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 steps, 2 rounds, 5 query repeats (< 3 min)")
    parser.add_argument("--sizes", default="10,100,1000", help="library sizes, comma-separated (default 10,100,1000)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 8; quick 4)")
    parser.add_argument("--rounds", type=int, help="timed rounds after the warm-up (default 5; quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file (atomically)")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    try:
        sizes = tuple(int(size) for size in args.sizes.split(",") if size.strip())
    except ValueError:
        raise SystemExit(f"--sizes {args.sizes!r}: give comma-separated integers, e.g. 10,100,1000") from None
    plan = Plan(sizes, 5 if args.quick else 20, args.steps or (4 if args.quick else 8),
                args.rounds or (2 if args.quick else 5), args.quick)
    if not sizes or min(*sizes, plan.steps, plan.rounds) < 1:
        raise SystemExit("--sizes, --steps and --rounds must be positive")
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = make_plan(args)
    with tempfile.TemporaryDirectory(prefix="loracompose-bench-autolora-") as scratch_name:
        scratch = Path(scratch_name)
        with quiet_loading():
            model = build_tiny_sd15(scratch / "tiny-sd15", seed=SEED)
            loras = [build_tiny_lora(model, scratch / f"lora{index}.safetensors", seed=10 + index, init_scale=2.0)
                     for index in range(max(LORA_COUNTS))]
        print("retrieval:", file=sys.stderr, flush=True)
        retrieval = measure_retrieval(model, loras[0], scratch, plan)
        print("gated fusion:", file=sys.stderr, flush=True)
        fusion = measure_fusion(model, loras, scratch, plan)
    total = time.perf_counter() - PROCESS_STARTED
    print(retrieval_table(retrieval))
    print()
    print(fusion_table(fusion))
    print(f"\ntotal {total:.1f} s; {plan.steps} steps, best of {plan.rounds} rounds, "
          f"median of {plan.query_repeats} queries, {torch.get_num_threads()} thread(s)")
    if args.out:
        payload = {"plan": asdict(plan), "prompt": PROMPT, "size": SIZE, "guidance_scale": GUIDANCE,
                   "retrieval": [asdict(row) for row in retrieval], "fusion": [asdict(row) for row in fusion],
                   "retrieval_markdown": retrieval_table(retrieval), "fusion_markdown": fusion_table(fusion),
                   "machine": machine_info(), "total_seconds": total}
        write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
