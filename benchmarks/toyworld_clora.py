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
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from loracompose import LoraSpec
from loracompose.assets.embedded import embedded_default
from loracompose.eval.toyworld import REFERENCE_SETTINGS
from loracompose.pipelines import load_pipeline

from bench_common import machine_info, write_json
from toyworld_auto import concept_sets, judge, parse_method, parse_seeds, save_grid, summary, table

RESULTS = Path(__file__).parent / "results"
OBJECT_SETS = ["moxel", "lunzor", "moxel+lunzor", "moxel+checkered", "moxel+ambrel", "lunzor+checkered",
               "lunzor+ambrel", "moxel+lunzor+checkered", "moxel+lunzor+ambrel", "moxel+checkered+ambrel",
               "lunzor+checkered+ambrel"]


def generate(pipe: Any, make_method: Any, entry: dict[str, Any], seeds: list[int], lora_dir: Path,
             batch: int) -> list[Any]:
    specs = [LoraSpec(lora_dir / f"{name}.safetensors") for name in entry["loras"]]
    images: list[Any] = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        if chunk != list(range(chunk[0], chunk[0] + len(chunk))):
            raise SystemExit("give consecutive seeds (a batch's image k uses seed + k)")
        images += pipe.generate(entry["prompt"], specs, make_method(entry), seed=chunk[0], num_images=len(chunk),
                                steps=REFERENCE_SETTINGS["steps"], guidance_scale=REFERENCE_SETTINGS["guidance"],
                                append_triggers=False, show_progress=False).images
    return images


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
        started, results[label] = time.perf_counter(), []
        for entry in concept_sets(args.sets):
            images = generate(pipe, make_method, entry, seeds, lora_dir, args.batch)
            row = judge(entry, images)
            results[label].append(row)
            print(f"{label:30s} {entry['id']:28s} all {row['all']:.0%}"
                  + (f"  two objects {row['two_objects']:.0%}" if "two_objects" in row else ""), flush=True)
            if args.images is not None:
                save_grid(images, args.images / label.replace("/", "_") / f"{entry['id']}.png", scale=8)
        timings[label] = time.perf_counter() - started
    text_table = table(results, seeds)
    print(text_table)
    payload = {"seeds": seeds, "settings": REFERENCE_SETTINGS, "machine": machine_info(), "wall_seconds": timings,
               "methods": {label: {"sets": rows, "summary": summary(rows)} for label, rows in results.items()}}
    write_json(RESULTS / f"toyworld-clora-{args.tag}.json", payload)
    (RESULTS / f"toyworld-clora-{args.tag}.md").write_text(text_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
