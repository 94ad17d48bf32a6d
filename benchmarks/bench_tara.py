"""TARA's cost: wall time against plain diffusers for N = 1..4 LoRAs, and TARA training speed.

On the tiny random SD1.5 of :mod:`loracompose.tiny` (or ``--model mid``, a 12 M-parameter UNet; 64 px, DPM-Solver++, CFG 7.5), in one process,
with the measurements of each N interleaved (one run of every configuration per round, the best of
the rounds after one warm-up round: other processes only ever add time), it times:

* ``plain``: ``diffusers.StableDiffusionPipeline``, no LoRA;
* ``diffusers+N``: the same stock pipeline with the N LoRAs loaded and active (``set_adapters``);
* ``merge``: ``loracompose`` ``generate`` with :class:`~loracompose.Merge` and the N LoRAs;
* ``tara``: ``generate`` with :class:`~loracompose.Tara` (token-masked cross-attention K/V);
* ``tara-fuse``: ``Tara(fuse=True)``: the unmasked deltas folded into the weights per generation.

The target is ``tara / plain <= 1.10``; ``tara / diffusers+N`` isolates TARA's own overhead from the
cost of running N LoRAs at all. Each run's process CPU time is recorded beside its wall time: with
one torch thread it is the work done, unaffected by other processes on a shared machine, so the
``cpu`` ratios stay meaningful when the wall times are noisy. Training speed: ``train_tara`` steps
per second on the same model (the optimisation loop alone, probes off), batch 1 at its native 64 px.

    python benchmarks/bench_tara.py --quick
    python benchmarks/bench_tara.py --out bench_out/tara.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

PROCESS_STARTED = time.perf_counter()

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP workers sleep (read when torch loads)

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

from loracompose import LoraSpec, Merge, Tara, load_pipeline  # noqa: E402
from loracompose.pipelines.compose_pipeline import quiet_loading  # noqa: E402
from loracompose.training.tara import TaraTrainingSettings, train_tara  # noqa: E402
from loracompose.assets.tiny import build_tiny_lora, build_tiny_sd15  # noqa: E402
from loracompose.training.trainer import LoraTrainingSettings  # noqa: E402

from bench_common import build_mid_sd15, interleaved, machine_info, stock_pipeline, write_json  # noqa: E402

SIZE = 64
SEED = 0
GUIDANCE = 7.5
MAX_LORAS = 4
TRIGGERS = ("zkx", "qwv", "plm", "vtx")
PROMPT = "a photo of zkx with qwv, plm and vtx"
TARGET_RATIO = 1.10


@dataclass(frozen=True)
class Plan:
    steps: int
    rounds: int
    train_steps: int
    quick: bool


@dataclass
class Row:
    """One N: best-of-rounds and median seconds per configuration and the ratios that matter."""

    num_loras: int
    seconds: dict[str, float]  # best of the rounds (wall)
    cpu_seconds: dict[str, float]  # best of the rounds (process CPU time)
    median_seconds: dict[str, float]
    runs: dict[str, list[float]]
    unet_calls: int
    unet_rows: int
    ratios: dict[str, float] = field(default_factory=dict)


# --- models --------------------------------------------------------------------------------------


def build_models(scratch: Path, size: str = "tiny") -> tuple[Path, list[Path]]:
    """The model folder (``tiny``: loracompose's tiny SD1.5; ``mid``: its random 12 M-parameter
    SD1.5-layout UNet of bench_methods) and MAX_LORAS random LoRAs (UNet + text encoder, rank 4)."""
    with quiet_loading():
        model = (build_tiny_sd15(scratch / "tiny-sd15", seed=SEED) if size == "tiny"
                 else build_mid_sd15(scratch / "mid-sd15", size=SIZE, seed=SEED))
        loras = [build_tiny_lora(model, scratch / f"lora{index}.safetensors", seed=10 + index,
                                 trigger_words=[trigger], init_scale=2.0) for index, trigger in enumerate(TRIGGERS)]
    return model, loras


def stock_runner(pipe: StableDiffusionPipeline, plan: Plan, num_loras: int) -> Callable[[], None]:
    def run() -> None:
        if num_loras:
            pipe.set_adapters([f"lora{index}" for index in range(num_loras)], [1.0] * num_loras)
        pipe(PROMPT, num_inference_steps=plan.steps, guidance_scale=GUIDANCE, width=SIZE, height=SIZE,
             generator=torch.Generator("cpu").manual_seed(SEED))

    return run


def compose_runner(pipe: Any, loras: Sequence[Path], make_method: Callable[[], Any], plan: Plan,
                   cost: dict[str, int]) -> Callable[[], None]:
    specs = [LoraSpec(path) for path in loras]

    def run() -> None:
        stats = pipe.generate(PROMPT, specs, make_method(), seed=SEED, steps=plan.steps, guidance_scale=GUIDANCE,
                              width=SIZE, height=SIZE, show_progress=False).stats
        cost.update(unet_calls=stats.unet_calls, unet_rows=stats.unet_rows)

    return run


# --- timing --------------------------------------------------------------------------------------


def measure_inference(model: Path, loras: Sequence[Path], plan: Plan) -> list[Row]:
    plain, with_loras = stock_pipeline(model), stock_pipeline(model, loras)
    compose = load_pipeline(model, device="cpu", dtype="fp32")
    rows = []
    for num_loras in range(1, MAX_LORAS + 1):
        cost: dict[str, int] = {}
        runners = {
            "plain": stock_runner(plain, plan, 0),
            "diffusers+N": stock_runner(with_loras, plan, num_loras),
            "merge": compose_runner(compose, loras[:num_loras], Merge, plan, {}),
            "tara": compose_runner(compose, loras[:num_loras], Tara, plan, cost),
            "tara-fuse": compose_runner(compose, loras[:num_loras], lambda: Tara(fuse=True), plan, {}),
        }
        runs, cpu_runs = interleaved(runners, plan.rounds)
        seconds = {name: min(values) for name, values in runs.items()}
        cpu = {name: min(values) for name, values in cpu_runs.items()}
        median = {name: statistics.median(values) for name, values in runs.items()}
        row = Row(num_loras, seconds, cpu, median, runs, cost["unet_calls"], cost["unet_rows"])
        row.ratios = {"tara/plain": seconds["tara"] / seconds["plain"],
                      "tara-fuse/plain": seconds["tara-fuse"] / seconds["plain"],
                      "tara/diffusers+N": seconds["tara"] / seconds["diffusers+N"],
                      "tara/merge": seconds["tara"] / seconds["merge"],
                      "tara/plain cpu": cpu["tara"] / cpu["plain"],
                      "tara-fuse/plain cpu": cpu["tara-fuse"] / cpu["plain"],
                      "tara/plain median": median["tara"] / median["plain"]}
        print(f"  N={num_loras}: " + ", ".join(f"{k} {v:.3f} s" for k, v in seconds.items()), file=sys.stderr,
              flush=True)
        rows.append(row)
    return rows


def measure_training(model: Path, scratch: Path, plan: Plan) -> dict[str, Any]:
    """train_tara steps per second on the tiny model (four 64 px shape images, batch 1)."""
    from PIL import Image, ImageDraw

    images = scratch / "images"
    images.mkdir()
    for index, colour in enumerate(("red", "blue", "green", "orange")):
        image = Image.new("RGB", (SIZE, SIZE), "white")
        ImageDraw.Draw(image).ellipse((8 + 4 * index, 8, 56, 56), fill=colour)
        image.save(images / f"{index}.png")
    settings = LoraTrainingSettings(model=str(model), images=images, out=scratch / "tara.safetensors",
                                    steps=plan.train_steps, device="cpu", probe_timesteps=0, show_progress=False)
    started = time.perf_counter()
    result = train_tara(TaraTrainingSettings("zkx", "dog", settings))
    return {"steps": result.steps, "loop_seconds": result.train_seconds,
            "steps_per_second": result.steps / result.train_seconds,
            "total_seconds": time.perf_counter() - started, "final_loss": result.history[-1]["loss"]}


# --- output --------------------------------------------------------------------------------------


RATIO_COLUMNS = ("tara/plain", "tara-fuse/plain", "tara/diffusers+N", "tara/merge", "tara/plain cpu",
                 "tara-fuse/plain cpu")


def markdown(rows: Sequence[Row], training: dict[str, Any]) -> str:
    """Best-of-rounds wall seconds of every configuration, the ratios (wall; CPU where marked), calls, rows."""
    names = list(rows[0].seconds)
    columns = ["N", *(f"{name} s" for name in names), *RATIO_COLUMNS, "UNet calls", "UNet rows"]
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "---:|" * len(columns)
    body = [
        f"| {row.num_loras} | " + " | ".join(f"{row.seconds[name]:.3f}" for name in names) + " | "
        + " | ".join(f"{row.ratios[key]:.2f}" for key in RATIO_COLUMNS) + f" | {row.unet_calls} | {row.unet_rows} |"
        for row in rows
    ]
    train = (f"\nTARA training (this model, CPU, batch 1, {SIZE} px): {training['steps_per_second']:.2f} steps/s "
             f"({training['steps']} steps in {training['loop_seconds']:.1f} s)")
    return "\n".join([header, rule, *body]) + "\n" + train


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 steps, 2 rounds, 10 training steps (< 90 s)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 8; quick 4)")
    parser.add_argument("--rounds", type=int, help="timed rounds after the warm-up (default 5; quick 2)")
    parser.add_argument("--train-steps", type=int, help="training steps timed (default 30; quick 10)")
    parser.add_argument("--model", choices=("tiny", "mid"), default="tiny",
                        help="tiny SD1.5 (default) or the 12 M-parameter mid UNet of bench_methods (64 px)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file (atomically)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = Plan(steps=args.steps or (4 if args.quick else 8), rounds=args.rounds or (2 if args.quick else 5),
                train_steps=args.train_steps or (10 if args.quick else 30), quick=args.quick)
    if min(plan.steps, plan.rounds, plan.train_steps) < 1:
        raise SystemExit("--steps, --rounds and --train-steps must be at least 1")
    with tempfile.TemporaryDirectory(prefix="loracompose-bench-tara-") as scratch:
        model, loras = build_models(Path(scratch), args.model)
        rows = measure_inference(model, loras, plan)
        training = measure_training(model, Path(scratch), plan)
    table = markdown(rows, training)
    print(table)
    total = time.perf_counter() - PROCESS_STARTED
    worst = {key: max(row.ratios[key] for row in rows) for key in ("tara/plain", "tara-fuse/plain")}
    print(f"\nworst over N: tara / plain {worst['tara/plain']:.2f}, tara-fuse / plain {worst['tara-fuse/plain']:.2f} "
          f"(target <= {TARGET_RATIO:.2f}); total {total:.1f} s, "
          f"{plan.steps} steps, best of {plan.rounds} rounds, {torch.get_num_threads()} thread(s)")
    if args.out:
        payload = {"model": args.model, "plan": asdict(plan), "prompt": PROMPT, "size": SIZE, "guidance_scale": GUIDANCE,
                   "rows": [asdict(row) for row in rows], "training": training, "machine": machine_info(),
                   "target_ratio": TARGET_RATIO, "total_seconds": total}
        write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
