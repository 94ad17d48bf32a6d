"""``regional`` on the toy world (issue 19): two objects at their sides, and each LoRA alone.

    python benchmarks/toyworld_regional.py                            # report seeds 0-31 (never tuned on)
    python benchmarks/toyworld_regional.py --seeds 100-131 --tag tune # the tuning seeds
    python benchmarks/toyworld_regional.py --images grids/            # also x8 grids of the images

The shipped toy world at its reference settings (20 steps, CFG 4, DPM-Solver++, 32 px). Rows:

* ``moxel+lunzor``: "a moxel on the left and a lunzor on the right", the moxel and lunzor LoRAs, with
  Merge, ``regional`` (boxes: the toy world's left and right slots, one UNet pass per step) and
  ``regional`` latent couple, each also with the set's region prompts ("a moxel on the left", as
  benchmarks/toyworld.yaml runs it); "right" = a red heart on the left AND a yellow crescent on the right
  (shape, colour and side, as the detector sees them).
* each LoRA alone through ``regional`` (its composition prompt; an object in the left and in the right
  slot's box, a background or style on the whole image), beside the LoRA alone (Merge of one LoRA):
  "right" = its concept present as the eval runner judges it (``Concept.present``), and for objects
  also its colour and side.

The seeds of a row run as one batch of images (image j is the one-image run with seed j, up to float
rounding). Prints a Markdown table and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from loracompose import LoraSpec, Merge
from loracompose.assets.embedded import embedded_default
from loracompose.eval.toyworld import REFERENCE_SETTINGS
from loracompose.methods.regional import Regional
from loracompose.pipelines import load_pipeline
from loracompose.toyworld.concepts import CONCEPTS, GLYPH_COLORS, OBJECT, SLOT_BOXES, composition
from loracompose.toyworld.detector import Detection, detect

from bench_common import machine_info, write_json

RESULTS = Path(__file__).parent / "results"
TWO_OBJECTS = ("moxel", "lunzor")
TARGETS = {"two objects": 0.95, "alone": 0.90}


def parse_seeds(text: str) -> list[int]:
    """``0-31`` or ``1,2,5``."""
    if "-" in text:
        low, high = (int(part) for part in text.split("-"))
        return list(range(low, high + 1))
    return [int(part) for part in text.split(",")]


def two_objects_right(detection: Detection) -> bool:
    return (detection.has(shape="heart", color="red", position="left")
            and detection.has(shape="crescent", color="yellow", position="right"))


def concept_right(name: str, slot: str | None) -> Callable[[Detection], bool]:
    """The concept present; for an object also in its colour and on its side."""
    concept = CONCEPTS[name]
    if concept.kind != OBJECT:
        return concept.present
    return lambda detection: detection.has(shape=concept.value, color=GLYPH_COLORS[concept.value], position=slot)


def rows() -> list[dict[str, Any]]:
    """(label, LoRAs, prompt, method factory, judge) of every row."""
    pair = composition(TWO_OBJECTS)
    boxes = [SLOT_BOXES["left"], SLOT_BOXES["right"]]
    table = [
        dict(row="moxel+lunzor", method="merge", loras=TWO_OBJECTS, prompt=pair.prompt, make=Merge,
             judge=two_objects_right, target="two objects"),
        dict(row="moxel+lunzor", method="regional (boxes)", loras=TWO_OBJECTS, prompt=pair.prompt,
             make=lambda: Regional(boxes=boxes), judge=two_objects_right, target="two objects"),
        dict(row="moxel+lunzor", method="regional latent (boxes)", loras=TWO_OBJECTS, prompt=pair.prompt,
             make=lambda: Regional(boxes=boxes, mode="latent"), judge=two_objects_right, target="two objects"),
    ]
    for mode in ("delta", "latent"):  # as benchmarks/toyworld.yaml runs it: the set's region prompts too
        table.append(dict(row="moxel+lunzor", method=f"regional{' latent' if mode == 'latent' else ''} "
                          "(boxes, region prompts)", loras=TWO_OBJECTS, prompt=pair.prompt,
                          make=lambda mode=mode: Regional(boxes=boxes, region_prompts=list(pair.region_prompts),
                                                          mode=mode),
                          judge=two_objects_right, target="two objects"))
    for name, concept in CONCEPTS.items():
        slots = ("left", "right") if concept.kind == OBJECT else (None,)
        for slot in slots:
            alone = composition([name])
            prompt, box = alone.prompt, alone.boxes[0]
            if slot == "right":  # composition() puts a lone object on the left
                prompt, box = prompt.replace("on the left", "on the right"), SLOT_BOXES["right"]
            label = f"{name} alone" + (f" ({slot})" if slot else "")
            for method, make in (("lora alone (merge)", Merge), ("regional (box)", lambda box=box: Regional(boxes=[box]))):
                table.append(dict(row=label, method=method, loras=(name,), prompt=prompt, make=make,
                                  judge=concept_right(name, slot), present=concept.present, target="alone"))
    return table


def generate(pipe: Any, row: dict[str, Any], seeds: list[int], lora_dir: Path) -> list[Image.Image]:
    specs = [LoraSpec(lora_dir / f"{name}.safetensors") for name in row["loras"]]
    settings = dict(steps=REFERENCE_SETTINGS["steps"], guidance_scale=REFERENCE_SETTINGS["guidance"],
                    scheduler=REFERENCE_SETTINGS["scheduler"], width=REFERENCE_SETTINGS["width"],
                    height=REFERENCE_SETTINGS["height"], append_triggers=False, show_progress=False)
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return pipe.generate(row["prompt"], specs, row["make"](), seed=seeds[0], num_images=len(seeds), **settings).images
    return [pipe.generate(row["prompt"], specs, row["make"](), seed=seed, **settings).images[0] for seed in seeds]


def save_grid(images: Sequence[Image.Image], path: Path, columns: int = 8, scale: int = 8) -> None:
    """The images upscaled ``scale`` times (nearest: pixels stay visible) in a grid, 2 px apart."""
    width, height = images[0].width * scale, images[0].height * scale
    lines = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * (width + 2), lines * (height + 2)), (255, 255, 255))
    for index, image in enumerate(images):
        grid.paste(image.resize((width, height), Image.NEAREST),
                   ((index % columns) * (width + 2), (index // columns) * (height + 2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def run_row(pipe: Any, row: dict[str, Any], seeds: list[int], lora_dir: Path, images_dir: Path | None,
            targets: dict[str, float] = TARGETS) -> dict[str, Any]:
    """One table row: its images for ``seeds``, judged by the detector (a grid saved to ``images_dir``)."""
    started = time.perf_counter()
    images = generate(pipe, row, seeds, lora_dir)
    detections = [detect(image) for image in images]
    right = [bool(row["judge"](detection)) for detection in detections]
    entry = {"row": row["row"], "method": row["method"], "loras": list(row["loras"]), "prompt": row["prompt"],
             "right": sum(right), "images": len(right), "share": sum(right) / len(right),
             "target": targets[row["target"]], "seconds": round(time.perf_counter() - started, 1),
             "wrong_seeds": [seed for seed, ok in zip(seeds, right) if not ok],
             "objects": [[f"{o.color} {o.shape} {o.position}" for o in d.objects] for d in detections]}
    if "present" in row:
        entry["present"] = sum(bool(row["present"](d)) for d in detections)
    if images_dir:
        save_grid(images, images_dir / f"{row['row']}--{row['method']}.png".replace(" ", "_"))
    print(f"{row['row']:26s} {row['method']:50s} {entry['right']:3d}/{len(right)}  ({entry['seconds']} s)",
          file=sys.stderr, flush=True)
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-31", help="seeds to judge: 0-31 (default, never tuned on) or 1,2,5")
    parser.add_argument("--tag", default="report", help="name of the results file: toyworld-regional-<tag>.json")
    parser.add_argument("--rows", nargs="*", help="only these rows (e.g. 'moxel+lunzor', 'moxel alone')")
    parser.add_argument("--images", type=Path, help="write one x8 grid PNG per row and method here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = parse_seeds(args.seeds)
    default = embedded_default()
    pipe = load_pipeline(default.model_dir)
    lora_dir = default.loras[0].path.parent
    results = []
    for row in rows():
        if args.rows and row["row"] not in args.rows:
            continue
        results.append(run_row(pipe, row, seeds, lora_dir, args.images))
    print(table(results, seeds))
    write_json(RESULTS / f"toyworld-regional-{args.tag}.json",
               {"seeds": seeds, "settings": REFERENCE_SETTINGS, "machine": machine_info(), "results": results})
    return 0


def table(results: Sequence[dict[str, Any]], seeds: Sequence[int]) -> str:
    lines = [f"Toy world, seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} images per row), detector-judged",
             "", "| set | method | right | share | target | concept present |", "|---|---|---|---|---|---|"]
    for entry in results:
        present = f"{entry['present']}/{entry['images']}" if "present" in entry else ""
        lines.append(f"| {entry['row']} | {entry['method']} | {entry['right']}/{entry['images']} | "
                     f"{entry['share']:.0%} | >= {entry['target']:.0%} | {present} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
