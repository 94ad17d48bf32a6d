"""CLoRA on the toy world (issue 20): two objects at their sides, each LoRA alone, and every set with an
object, with Merge beside it.

    python benchmarks/toyworld_clora.py                               # report seeds 0-31 (never tuned on)
    python benchmarks/toyworld_clora.py --seeds 100-131 --tag tune    # the tuning seeds
    python benchmarks/toyworld_clora.py --methods merge 'clora:{"gate": "prediction"}' --sets moxel+lunzor

The shipped toy world at its reference settings (20 steps, CFG 4, DPM-Solver++, 32 px), prompts and
sets as benchmarks/toyworld.yaml (eval/toyworld.py). The detector judges each image: ``all`` = every
concept of the set present; ``two objects`` = a red heart on the left AND a yellow crescent on the right.
A method's seeds run as batches of ``--batch`` images (image k of a batch is the one-image run with seed
k: each image has its own loss, gradient and masks). Writes JSON and a Markdown table under
benchmarks/results/ and, with ``--images DIR``, one x8 grid PNG per method and set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from loracompose import LoraSpec
from loracompose.assets.embedded import embedded_default
from loracompose.pipelines import load_pipeline

from toyworld_auto import generate_in_batches, parse_method, parse_seeds, run_method, write_report

RESULTS = Path(__file__).parent / "results"
OBJECT_SETS = ["moxel", "lunzor", "moxel+lunzor", "moxel+checkered", "moxel+ambrel", "lunzor+checkered",
               "lunzor+ambrel", "moxel+lunzor+checkered", "moxel+lunzor+ambrel", "moxel+checkered+ambrel",
               "lunzor+checkered+ambrel"]


def generate(pipe: Any, make_method: Any, entry: dict[str, Any], seeds: list[int], lora_dir: Path,
             batch: int) -> list[Any]:
    specs = [LoraSpec(lora_dir / f"{name}.safetensors") for name in entry["loras"]]
    return generate_in_batches(pipe, make_method(entry), entry, specs, seeds, batch)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-31", help="seeds: 0-31 (report, default) or 100-131 (tuning)")
    parser.add_argument("--methods", nargs="+", default=["merge", "clora"], help="NAME or NAME:{json settings}")
    parser.add_argument("--sets", nargs="+", default=OBJECT_SETS, help="set ids (default: every set with an object)")
    parser.add_argument("--batch", type=int, default=8, help="images per generation call")
    parser.add_argument("--tag", default="report", help="name of the result files: toyworld-clora-TAG.{json,md}")
    parser.add_argument("--images", type=Path, default=None, help="write one grid PNG per method and set here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = parse_seeds(args.seeds)
    default = embedded_default()
    pipe = load_pipeline(default.model_dir, device="cpu", dtype="fp32")
    lora_dir = default.loras[0].path.parent
    results: dict[str, list[dict[str, Any]]] = {}
    timings: dict[str, float] = {}
    for text in args.methods:
        label, make_method = parse_method(text)
        results[label], timings[label] = run_method(
            label, args.sets,
            lambda entry, make_method=make_method: generate(pipe, make_method, entry, seeds, lora_dir, args.batch),
            args.images, scale=8)
    write_report("clora", args.tag, results, seeds, timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
