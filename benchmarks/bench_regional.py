"""``regional`` (one UNet pass per step) against Merge and plain diffusers, for N = 2..4 LoRAs.

SD1.5's own UNet (random weights, :func:`bench_common.build_sd15_unet_model`) at ``--latent`` cells a
side (64 = SD1.5 at 512 px; the tiny VAE decodes), random LoRAs on to_q/k/v/out of every attention
layer (the diffusers default targets), DPM-Solver++, CFG 7.5. Configurations, timed round-robin after
one warm-up round (``bench_common.interleaved``), median wall and process CPU seconds:

* ``plain``: stock diffusers, no LoRA;
* ``merge N``: ``generate`` with Merge of N LoRAs;
* ``regional N``: ``generate`` with ``Regional()`` (the N LoRAs side by side in full-height columns).

The target (issue 19) is ``regional N / merge N <= 1.15``.

Peak memory (target: regional N <= 1.10 x merge N): each configuration once more, in a fresh
process of its own: load the model and its LoRAs, read the resident set (VmRSS), reset the kernel's
high-water mark (``/proc/self/clear_refs`` = 5), run one generation, read the high-water mark
(VmHWM). That is the process's true peak of resident memory during the generation (model, LoRAs,
activations, and whatever the allocator keeps), not a sample; a process per configuration keeps one
configuration's freed-but-kept memory out of the next one's number. Linux only. "generation extra"
(peak minus the resident set once loaded) includes the weights themselves: safetensors files are
memory-mapped, and their pages become resident when the first generation reads them.

    python benchmarks/bench_regional.py --latent 32 --steps 2 --rounds 2
    python benchmarks/bench_regional.py --memory-only      # add memory to the timings already in --out
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from loracompose import LoraSpec, Merge, load_pipeline
from loracompose.assets.tiny import build_tiny_lora
from loracompose.methods.regional import Regional

from bench_common import (
    build_sd15_unet_model, interleaved, machine_info, repo_relative, stock_pipeline, write_json,
)

PROMPT = "a photo of a cat and a dog"
RESULTS = Path(__file__).parent / "results"


def configurations(max_loras: int) -> list[str]:
    return ["plain"] + [f"{kind} {count}" for count in range(2, max_loras + 1) for kind in ("merge", "regional")]


def runner(name: str, pipe, stock, loras: Sequence[Path], steps: int, size: int):
    """A no-argument call that runs configuration ``name`` once (latents out, no decoding)."""
    if name == "plain":
        return lambda: stock(PROMPT, num_inference_steps=steps, width=size, height=size, output_type="latent")
    kind, count = name.split()
    specs = [LoraSpec(path) for path in loras[:int(count)]]
    method = Merge if kind == "merge" else Regional
    return lambda: pipe.generate(PROMPT, specs, method(), steps=steps, width=size, height=size, show_progress=False,
                                 output_type="latent")


def memory_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes (Linux /proc)."""
    with open("/proc/self/status", encoding="ascii") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
    return {key: int(value.split()[0]) * 1024 for key, value in fields.items()}


def measure_memory_here(name: str, model: Path, loras: Sequence[Path], steps: int, size: int) -> dict[str, int]:
    """In a fresh process: resident memory once loaded, and the peak during one generation of ``name``."""
    pipe = load_pipeline(model) if name != "plain" else None
    stock = stock_pipeline(model) if name == "plain" else None
    if pipe is not None:
        pipe.prepare_loras([LoraSpec(path) for path in loras[:int(name.split()[1])]])
    run = runner(name, pipe, stock, loras, steps, size)
    loaded = memory_status()["VmRSS"]
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # reset VmHWM to the current resident set
    run()
    peak = memory_status()["VmHWM"]
    return {"loaded_rss_bytes": loaded, "peak_rss_bytes": peak, "generation_extra_bytes": peak - loaded}


def measure_memory(names: Sequence[str], model: Path, loras: Sequence[Path], args: argparse.Namespace) -> dict:
    """measure_memory_here for each configuration, each in its own subprocess (this script, --child)."""
    measured = {}
    for name in names:
        command = [sys.executable, __file__, "--child", name, "--model-dir", str(model), "--latent", str(args.latent),
                   "--steps", str(args.steps), "--threads", str(args.threads), "--lora-files", *map(str, loras)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        measured[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"memory {name}: peak {measured[name]['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    return measured


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="latent cells a side (64: SD1.5 at 512 px)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up")
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "regional-cpu.json")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="timings only")
    parser.add_argument("--memory-only", action="store_true", help="keep the timings in --out, measure memory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--lora-files", type=Path, nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = 2 * args.latent  # the tiny VAE's factor
    if args.child:
        print(json.dumps(measure_memory_here(args.child, args.model_dir, args.lora_files, args.steps, size)))
        return 0
    names = configurations(args.max_loras)
    with tempfile.TemporaryDirectory() as scratch:
        model = build_sd15_unet_model(Path(scratch) / "sd15-unet", latent_size=args.latent)
        loras = [build_tiny_lora(model, Path(scratch) / f"lora{k}.safetensors", seed=10 + k, text_encoder=False,
                                 category="object") for k in range(args.max_loras)]
        if args.memory_only:
            previous = json.loads(args.out.read_text())
            rows, settings = previous["results"], previous["settings"]
        else:
            pipe, stock = load_pipeline(model), stock_pipeline(model)
            wall, cpu = interleaved({name: runner(name, pipe, stock, loras, args.steps, size) for name in names},
                                    args.rounds)
            rows = {name: {"wall_s": statistics.median(wall[name]), "cpu_s": statistics.median(cpu[name])}
                    for name in names}
            hidden = ("child", "model_dir", "lora_files")
            settings = {key: value for key, value in vars(args).items() if key not in hidden}
            settings["out"] = repo_relative(args.out)
        memory = measure_memory(names, model, loras, args) if args.memory or args.memory_only else {}
    for name, row in rows.items():
        row.update(memory.get(name, {}))
    print_table(rows, settings)
    payload = {"settings": settings, "machine": machine_info(), "results": rows}
    if memory:
        payload["memory_method"] = ("fresh process per configuration: VmRSS once the model and LoRAs are loaded, "
                                    "then VmHWM over one generation after resetting it (/proc/self/clear_refs = 5)")
        payload["memory_steps"] = args.steps
    write_json(args.out, payload)
    return 0


def print_table(rows: dict, settings: dict) -> None:
    print(f"SD1.5 UNet, latent {settings['latent']}x{settings['latent']}, {settings['steps']} steps, "
          f"median of {settings['rounds']}")
    print("| config | wall s | cpu s | cpu / merge | peak MiB | peak / merge | generation extra MiB | extra / merge |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        merge = rows.get(name.replace("regional", "merge")) if name.startswith("regional") else None
        row["cpu_ratio_to_merge"] = round(row["cpu_s"] / merge["cpu_s"], 3) if merge else None
        for key, ratio in (("peak_rss_bytes", "peak_ratio_to_merge"),
                           ("generation_extra_bytes", "extra_ratio_to_merge")):
            row[ratio] = round(row[key] / merge[key], 3) if merge and key in row and key in merge else None
        peak, extra = (f"{row[key] / 2**20:.0f}" if key in row else ""
                       for key in ("peak_rss_bytes", "generation_extra_bytes"))
        print(f"| {name} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | {row['cpu_ratio_to_merge'] or ''} | {peak} | "
              f"{row['peak_ratio_to_merge'] or ''} | {extra} | {row['extra_ratio_to_merge'] or ''} |")


if __name__ == "__main__":
    sys.exit(main())
