"""``composer`` on the toy world (issue 20): two objects at their sides, every set with an object, and
each LoRA alone, beside Merge.

    python benchmarks/toyworld_composer.py                            # report seeds 0-31 (never tuned on)
    python benchmarks/toyworld_composer.py --seeds 100-131 --tag tune # the tuning seeds
    python benchmarks/toyworld_composer.py --images grids/            # also x8 grids of the images

The shipped toy world at its reference settings (20 steps, CFG 4, DPM-Solver++, 32 px). Rows:

* every set of the shipped concepts with at least one object (toyworld/concepts.composition: objects
  on the left then the right third, a background or style on the whole image), with Merge and with
  ``composer`` given the set's boxes and region prompts (as benchmarks/toyworld.yaml runs it); the
  two-object set also with ``composer``'s own defaults for region prompts (the trigger words) and
  without refinement and re-initialisation. "Right" = every concept present and each object in its
  colour on its side, as the detector sees them.
* each LoRA alone through ``composer`` (its composition prompt; an object in the left and in the right
  slot's box, a background or style on the whole image), beside the LoRA alone (Merge of one LoRA):
  "right" = its concept present (``Concept.present``), and for objects also its colour and side.

Each row's seeds run as one batch (image j is the one-image run with seed j). Prints a Markdown table
and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from loracompose import Merge
from loracompose.assets.embedded import embedded_default
from loracompose.eval.toyworld import REFERENCE_SETTINGS
from loracompose.methods.composer import Composer
from loracompose.pipelines import load_pipeline
from loracompose.toyworld.concepts import CONCEPTS, GLYPH_COLORS, OBJECT, OBJECT_SLOTS, SLOT_BOXES, composition
from loracompose.toyworld.detector import Detection

from bench_common import machine_info, write_json
from toyworld_regional import concept_right, parse_seeds, run_row, table

RESULTS = Path(__file__).parent / "results"
TARGETS = {"two objects": 0.85, "alone": 0.90, "set": 0.0}  # "set": at least Merge (compared in the table)


def set_right(names: Sequence[str]) -> Callable[[Detection], bool]:
    """Every concept of the set present; each object in its colour on its slot (left, then right)."""
    objects = [name for name in names if CONCEPTS[name].kind == OBJECT]
    slots = dict(zip(objects, OBJECT_SLOTS))

    def judge(detection: Detection) -> bool:
        for name in names:
            concept = CONCEPTS[name]
            if concept.kind == OBJECT:
                if not detection.has(shape=concept.value, color=GLYPH_COLORS[concept.value], position=slots[name]):
                    return False
            elif not concept.present(detection):
                return False
        return True

    return judge


def object_sets() -> list[tuple[str, ...]]:
    """Every set of 1-3 shipped concepts with at least one object, in the concepts' order."""
    names = list(CONCEPTS)
    sets = [combo for size in (1, 2, 3) for combo in itertools.combinations(names, size)]
    return [combo for combo in sets if any(CONCEPTS[name].kind == OBJECT for name in combo)]


def rows() -> list[dict[str, Any]]:
    table_rows = []
    for names in object_sets():
        made = composition(names)
        label = "+".join(names)
        target = "two objects" if names == ("moxel", "lunzor") else "set"
        boxes, prompts = list(made.boxes), list(made.region_prompts)
        methods: list[tuple[str, Callable[[], Any]]] = [
            ("merge", Merge),
            ("composer (boxes, region prompts)", lambda b=boxes, p=prompts: Composer(boxes=b, region_prompts=p))]
        if target == "two objects":
            methods += [("composer (boxes)", lambda b=boxes: Composer(boxes=b)),
                        ("composer (boxes, region prompts, no refine/reinit)",
                         lambda b=boxes, p=prompts: Composer(boxes=b, region_prompts=p, refine=False,
                                                             reinitialise=False)),
                        ("composer (defaults)", Composer)]
        for method, make in methods:
            table_rows.append(dict(row=label, method=method, loras=names, prompt=made.prompt, make=make,
                                   judge=set_right(names), target=target))
    for name, concept in CONCEPTS.items():
        slots = ("left", "right") if concept.kind == OBJECT else (None,)
        for slot in slots:
            alone = composition([name])
            prompt, box, region = alone.prompt, alone.boxes[0], alone.region_prompts[0]
            if slot == "right":  # composition() puts a lone object on the left
                prompt, box = prompt.replace("on the left", "on the right"), SLOT_BOXES["right"]
                region = region.replace("on the left", "on the right")
            label = f"{name} alone" + (f" ({slot})" if slot else "")
            for method, make in (("lora alone (merge)", Merge),
                                 ("composer (box)", lambda b=box, r=region: Composer(boxes=[b], region_prompts=[r]))):
                table_rows.append(dict(row=label, method=method, loras=(name,), prompt=prompt, make=make,
                                       judge=concept_right(name, slot), present=concept.present, target="alone"))
    return table_rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-31", help="seeds to judge: 0-31 (default, never tuned on) or 1,2,5")
    parser.add_argument("--tag", default="report", help="name of the results file: toyworld-composer-<tag>.json")
    parser.add_argument("--rows", nargs="*", help="only these rows (e.g. 'moxel+lunzor', 'moxel alone (left)')")
    parser.add_argument("--methods", nargs="*", help="only these methods (e.g. 'composer (boxes, region prompts)')")
    parser.add_argument("--images", type=Path, help="write one x8 grid PNG per row and method here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = parse_seeds(args.seeds)
    default = embedded_default()
    pipe = load_pipeline(default.model_dir)
    lora_dir = default.loras[0].path.parent
    results = []
    for row in rows():
        if (args.rows and row["row"] not in args.rows) or (args.methods and row["method"] not in args.methods):
            continue
        results.append(run_row(pipe, row, seeds, lora_dir, args.images, TARGETS))
    print(table(results, seeds).replace(">= 0%", "Merge"))
    write_json(RESULTS / f"toyworld-composer-{args.tag}.json",
               {"seeds": seeds, "settings": REFERENCE_SETTINGS, "machine": machine_info(), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
