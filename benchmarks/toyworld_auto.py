"""The toy world judged for ``auto`` (issue 19): every concept alone, every set of 2 and 3, and the two
objects at their sides, with Merge (and ``regional`` where it is installed) beside it.

    python benchmarks/toyworld_auto.py                          # report seeds 0-31 (never tuned on)
    python benchmarks/toyworld_auto.py --seeds 100-131 --tag tune  # the tuning seeds
    python benchmarks/toyworld_auto.py --methods merge 'auto:{"threshold": 0.4}' --sets moxel+lunzor

Each image is one generation with its own seed (20 steps, CFG 4, the shipped toy world); for Merge
and ``auto``, whose batches equal one-image runs (tested), the seeds run as one batch of images. The
detector judges every image:
``all`` = every concept of the set present; ``two objects`` = a red heart on the left AND a yellow
crescent on the right (shape, colour and side). Writes a table (Markdown) and JSON under
benchmarks/results/ and, with ``--images DIR``, one x4 grid PNG per method and set.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from loracompose import LoraSpec
from loracompose.assets.embedded import embedded_default
from loracompose.eval.toyworld import REFERENCE_SETTINGS, composition_sets
from loracompose.methods import METHODS
from loracompose.pipelines import load_pipeline
from loracompose.toyworld.concepts import CONCEPTS
from loracompose.toyworld.detector import detect

from bench_common import machine_info, write_json

RESULTS = Path(__file__).parent / "results"
TWO_OBJECTS = "moxel+lunzor"
TARGETS = {"two objects": 0.90, "N=1": 0.90, "N=2": 0.90, "N=3": 0.75}


def parse_seeds(text: str) -> list[int]:
    """``0-31`` or ``1,2,5``."""
    if "-" in text:
        low, high = (int(part) for part in text.split("-"))
        return list(range(low, high + 1))
    return [int(part) for part in text.split(",")]


def parse_method(text: str) -> tuple[str, Any]:
    """``NAME`` or ``NAME:{json settings}`` -> (label, method factory)."""
    name, _, settings = text.partition(":")
    if name not in METHODS:
        raise SystemExit(f"method {name!r} is not registered; use one of {', '.join(sorted(METHODS))}")
    options = json.loads(settings) if settings else {}
    fields = getattr(METHODS[name], "__dataclass_fields__", {})

    def build(entry: dict[str, Any]) -> Any:
        """The method with the set's boxes and region prompts where it takes them (regional), as suites do."""
        from_set = {key: entry[key] for key in ("boxes", "region_prompts") if key in fields and key not in options}
        return METHODS[name](**from_set, **options)

    return text, build


def concept_sets(names: Sequence[str] | None) -> list[dict[str, Any]]:
    sets = [entry for size in (1, 2, 3) for entry in composition_sets(list(CONCEPTS), size)]
    return [entry for entry in sets if names is None or entry["id"] in names]


def two_objects_right(detection: Any) -> bool:
    return (detection.has(shape="heart", color="red", position="left")
            and detection.has(shape="crescent", color="yellow", position="right"))


def generate(pipe: Any, make_method: Any, entry: dict[str, Any], seeds: list[int], lora_dir: Path) -> list[Image.Image]:
    specs = [LoraSpec(lora_dir / f"{name}.safetensors") for name in entry["loras"]]
    settings = dict(steps=REFERENCE_SETTINGS["steps"], guidance_scale=REFERENCE_SETTINGS["guidance"],
                    append_triggers=False, show_progress=False)
    if _batchable(make_method(entry)) and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return pipe.generate(entry["prompt"], specs, make_method(entry), seed=seeds[0], num_images=len(seeds),
                             **settings).images
    return [pipe.generate(entry["prompt"], specs, make_method(entry), seed=seed, **settings).images[0]
            for seed in seeds]


def _batchable(method: Any) -> bool:
    """Whether a batch of images equals one-image runs: Merge, and auto (each image gets its own masks
    and its own regional pass; tests/methods/test_auto.py checks the equality)."""
    return method.name in ("merge", "auto")


def judge(entry: dict[str, Any], images: Sequence[Image.Image]) -> dict[str, Any]:
    detections = [detect(image) for image in images]
    present = [{name: bool(CONCEPTS[name].present(d)) for name in entry["loras"]} for d in detections]
    row = {"set": entry["id"], "size": len(entry["loras"]), "images": len(images),
           "all": sum(all(p.values()) for p in present) / len(images),
           "per_concept": {name: sum(p[name] for p in present) / len(images) for name in entry["loras"]},
           "all_by_seed": [all(p.values()) for p in present]}
    if entry["id"] == TWO_OBJECTS:
        row["two_objects"] = sum(two_objects_right(d) for d in detections) / len(images)
    return row


def save_grid(images: Sequence[Image.Image], path: Path, columns: int = 8, scale: int = 4) -> None:
    tiles = [np.array(image.resize((image.width * scale, image.height * scale), Image.NEAREST)) for image in images]
    blank = np.full_like(tiles[0], 255)
    tiles += [blank] * (-len(tiles) % columns)
    rows = [np.concatenate(tiles[start:start + columns], axis=1) for start in range(0, len(tiles), columns)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per group (N=1, 2, 3, two objects): the worst and mean set rates and whether every set meets its target."""
    out: dict[str, Any] = {}
    for size in (1, 2, 3):
        rates = [row["all"] for row in rows if row["size"] == size]
        if rates:
            out[f"N={size}"] = {"min": min(rates), "mean": sum(rates) / len(rates),
                                "meets_target": min(rates) >= TARGETS[f"N={size}"]}
    two = [row["two_objects"] for row in rows if "two_objects" in row]
    if two:
        out["two objects"] = {"rate": two[0], "meets_target": two[0] >= TARGETS["two objects"]}
    return out


def table(results: dict[str, list[dict[str, Any]]], seeds: list[int]) -> str:
    labels = list(results)
    sets = [row["set"] for row in results[labels[0]]]
    lines = [f"Toy world, seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} per set), 20 steps, CFG 4; "
             "share of images with every concept of the set present (detector)", "",
             "| set | N | " + " | ".join(f"`{label}`" for label in labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for index, name in enumerate(sets):
        cells = [f"{results[label][index]['all']:.0%}" for label in labels]
        lines.append(f"| {name} | {results[labels[0]][index]['size']} | " + " | ".join(cells) + " |")
    two = [next((row.get("two_objects") for row in results[label] if "two_objects" in row), None) for label in labels]
    if any(value is not None for value in two):
        lines.append("| two objects: red heart left + yellow crescent right | 2 | "
                     + " | ".join("-" if value is None else f"{value:.0%}" for value in two) + " |")
    return "\n".join(lines) + "\n"


def generate_in_batches(pipe: Any, method: Any, entry: dict[str, Any], specs: Sequence[LoraSpec],
                        seeds: list[int], batch: int) -> list[Image.Image]:
    """The set's images for consecutive ``seeds``, ``batch`` per call (image k of a call uses seed + k)."""
    images: list[Image.Image] = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        if chunk != list(range(chunk[0], chunk[0] + len(chunk))):
            raise SystemExit("give consecutive seeds (a batch's image k uses seed + k)")
        images += pipe.generate(entry["prompt"], specs, method, seed=chunk[0], num_images=len(chunk),
                                steps=REFERENCE_SETTINGS["steps"], guidance_scale=REFERENCE_SETTINGS["guidance"],
                                append_triggers=False, show_progress=False).images
    return images


def run_method(label: str, sets: Sequence[str] | None, images_for: Any, images_dir: Path | None,
               scale: int = 4) -> tuple[list[dict[str, Any]], float]:
    """One method over the sets: ``images_for(entry)`` makes a set's images, the detector judges them.
    Returns the judged rows and the wall seconds; prints a line per set and saves grids to ``images_dir``."""
    started, rows = time.perf_counter(), []
    for entry in concept_sets(sets):
        images = images_for(entry)
        row = judge(entry, images)
        rows.append(row)
        print(f"{label:30s} {entry['id']:28s} all {row['all']:.0%}"
              + (f"  two objects {row['two_objects']:.0%}" if "two_objects" in row else ""), flush=True)
        if images_dir is not None:
            folder = images_dir / label.replace("/", "_").replace(" ", "_")
            save_grid(images, folder / f"{entry['id']}.png", scale=scale)
    return rows, time.perf_counter() - started


def write_report(name: str, tag: str, results: dict[str, list[dict[str, Any]]], seeds: list[int],
                 timings: dict[str, float], **extra: Any) -> None:
    """Print the table and write results/toyworld-NAME-TAG.{json,md}."""
    text_table = table(results, seeds)
    print(text_table)
    payload = {"seeds": seeds, "settings": REFERENCE_SETTINGS, "targets": TARGETS, "machine": machine_info(),
               "wall_seconds": timings, **extra,
               "methods": {label: {"sets": rows, "summary": summary(rows)} for label, rows in results.items()}}
    write_json(RESULTS / f"toyworld-{name}-{tag}.json", payload)
    (RESULTS / f"toyworld-{name}-{tag}.md").write_text(text_table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-31", help="seeds: 0-31 (report, default) or 100-131 (tuning)")
    parser.add_argument("--methods", nargs="+", default=["merge", "regional", "auto"],
                        help="NAME or NAME:{json settings}")
    parser.add_argument("--sets", nargs="+", default=None, help="set ids such as moxel+lunzor (default: all)")
    parser.add_argument("--tag", default="report", help="name of the result files: toyworld-auto-TAG.{json,md}")
    parser.add_argument("--images", type=Path, default=None, help="write one grid PNG per method and set here")
    parser.add_argument("--loras", type=Path, default=None,
                        help="folder of NAME.safetensors concept LoRAs (default: the embedded toy world's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = parse_seeds(args.seeds)
    default = embedded_default()
    pipe = load_pipeline(default.model_dir, device="cpu", dtype="fp32")
    lora_dir = args.loras or default.loras[0].path.parent
    missing = [name for name in CONCEPTS if not (lora_dir / f"{name}.safetensors").is_file()]
    if missing:
        parser.error(f"--loras {lora_dir}: no {missing[0]}.safetensors there; give a folder with every concept's LoRA")
    results: dict[str, list[dict[str, Any]]] = {}
    timings: dict[str, float] = {}
    for text in args.methods:
        label, make_method = parse_method(text)
        results[label], timings[label] = run_method(
            label, args.sets,
            lambda entry, make_method=make_method: generate(pipe, make_method, entry, seeds, lora_dir), args.images)
    write_report("auto", args.tag, results, seeds, timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
