"""The README's toy-world results table: every method of benchmarks/toyworld.yaml on every set of it.

    python benchmarks/toyworld_table.py                          # run what is missing, then the report
    python benchmarks/toyworld_table.py --rerun composer clora   # run those methods' rows again
    python benchmarks/toyworld_table.py --report-only            # the report from the rows on disk
    python benchmarks/toyworld_table.py --check-batches          # which methods' batches equal one-image runs
    python benchmarks/toyworld_table.py --rejudge                # judge the saved images again (detector changed)

The grid is the suite's (methods and their settings, sets with their prompts, boxes and region
prompts, seeds, 20 steps, CFG 4), the one `loracompose bench benchmarks/toyworld.yaml` runs one image
per job; here each method x set is generated as one batch of all seeds where that equals the
one-image runs (image k of a batch uses seed k: checked per method by --check-batches, which writes
the evidence beside the table), else one image per seed. The detector judges every image:

* present: the concept shows (an object's shape anywhere; the background; the style);
* exact: an object's shape in its colour on its side (a red heart on the left, a yellow crescent on the
  right), a background or style as present;
* all present / all exact: every concept of the set.

Rows are kept per method (results/toyworld-table/rows/METHOD.json, with the commit that produced
them), so a method can be rerun alone. The report: results/toyworld-table.{json,md}, a plot of "all
present" against N, and per set an x8 nearest-upscaled grid (one row per method, seeds 0-7).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from loracompose.eval.confidence import mean_interval
from loracompose.eval.suite import CompositionSet, MethodEntry, Suite, load_suite
from loracompose.pipelines import load_pipeline
from loracompose.toyworld.concepts import CONCEPTS, GLYPH_COLORS, OBJECT, OBJECT_SLOTS
from loracompose.toyworld.detector import Detection, detect

from bench_common import machine_info, write_json

HERE = Path(__file__).parent
SUITE = HERE / "toyworld.yaml"
RESULTS = HERE / "results"
OUT = RESULTS / "toyworld-table"
BATCH_CHECK = OUT / "batch-check.json"
BATCH_TOLERANCE = 8  # largest pixel difference (of 255) between a batch's image and its one-image run: float
# order in batched arithmetic moves a few levels; a batch whose images interact moves tens (the old clora: 66-160)
GRID_SEEDS, GRID_SCALE = 8, 8
LABEL_WIDTH = 170  # pixels left of each grid row for the method's name


# ------------------------------------------------------------------------------------ judging


def object_slots(composition_set: CompositionSet) -> dict[str, str]:
    """The side each object concept of a set is asked on (the prompt places them left, then right)."""
    objects = [name for name in composition_set.loras if CONCEPTS[name].kind == OBJECT]
    return dict(zip(objects, OBJECT_SLOTS))


def judge_image(detection: Detection, composition_set: CompositionSet) -> dict[str, dict[str, bool]]:
    """Per concept of the set: present, and exact (an object's shape, colour and side)."""
    slots = object_slots(composition_set)
    judged = {}
    for name in composition_set.loras:
        concept = CONCEPTS[name]
        present = bool(concept.present(detection))
        exact = (detection.has(shape=concept.value, color=GLYPH_COLORS[concept.value], position=slots[name])
                 if concept.kind == OBJECT else present)
        judged[name] = {"present": present, "exact": bool(exact)}
    return judged


# ------------------------------------------------------------------------------------ generating


def generation_settings(suite: Suite) -> dict[str, Any]:
    return dict(negative_prompt=suite.negative_prompt, steps=suite.steps, guidance_scale=suite.guidance,
                width=suite.width, height=suite.height, scheduler=suite.scheduler,
                append_triggers=suite.append_triggers, text_encoder_loras=suite.text_encoder_loras,
                show_progress=False)


def generate(pipe: Any, suite: Suite, method: MethodEntry, composition_set: CompositionSet, seeds: Sequence[int],
             batched: bool) -> list[Image.Image]:
    """The set's images for ``seeds`` (consecutive when batched), as the suite's jobs would make them."""
    specs = [lora.spec() for lora in suite.set_loras(composition_set)]
    settings = generation_settings(suite)
    if batched:
        return pipe.generate(composition_set.prompt, specs, method.build(composition_set), seed=seeds[0],
                             num_images=len(seeds), **settings).images
    return [pipe.generate(composition_set.prompt, specs, method.build(composition_set), seed=seed,
                          **settings).images[0] for seed in seeds]


def consecutive(seeds: Sequence[int]) -> bool:
    return list(seeds) == list(range(seeds[0], seeds[0] + len(seeds)))


def select_methods(suite: Suite, labels: Sequence[str]) -> list[MethodEntry]:
    """The suite's methods with these labels, in the order given (each once)."""
    by_label = {method.label: method for method in suite.methods}
    unknown = [label for label in labels if label not in by_label]
    if unknown:
        raise SystemExit(f"method {unknown[0]!r} is not in the suite; use one of {', '.join(by_label)}")
    return [by_label[label] for label in dict.fromkeys(labels)]


def check_batches(pipe: Any, suite: Suite, methods: Sequence[MethodEntry],
                  seeds: Sequence[int] = (0, 1, 2, 3)) -> dict[str, Any]:
    """For each method: the largest pixel difference between a batch of ``seeds`` and one-image runs,
    on the largest set with two objects (boxes, region prompts and three LoRAs in play); methods
    checked before keep their entries."""
    target = max((s for s in suite.sets if sum(CONCEPTS[n].kind == OBJECT for n in s.loras) == 2),
                 key=lambda s: len(s.loras))
    checked = json.loads(BATCH_CHECK.read_text())["methods"] if BATCH_CHECK.is_file() else {}
    for method in methods:
        singles = generate(pipe, suite, method, target, seeds, batched=False)
        batch = generate(pipe, suite, method, target, seeds, batched=True)
        differences = [int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())
                       for a, b in zip(singles, batch)]
        checked[method.label] = {"max_pixel_difference": differences,
                                 "batch_equals_single": max(differences) <= BATCH_TOLERANCE,
                                 "method_file_commit": git_commit(f"compose/methods/{method.name}.py")}
        print(f"{method.label:12s} batch vs one-image runs, largest pixel difference per image: {differences}",
              flush=True)
    return {"set": target.id, "seeds": list(seeds), "tolerance": BATCH_TOLERANCE, "methods": checked,
            "commit": git_commit()}


def batch_safe(label: str) -> bool:
    if not BATCH_CHECK.is_file():
        return False
    return bool(json.loads(BATCH_CHECK.read_text())["methods"].get(label, {}).get("batch_equals_single"))


def run_method(pipe: Any, suite: Suite, method: MethodEntry, images_dir: Path,
               only_sets: Sequence[str] | None = None, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every set of the suite for one method (or only ``only_sets``, the other entries kept from
    ``previous``): per image judgements, per set wall time, commit and toy-world weights."""
    seeds = list(suite.seeds)
    batched = batch_safe(method.label) and consecutive(seeds)
    kept = {entry["set"]: {"commit": (previous or {}).get("commit"), **entry}  # the run that made it
            for entry in (previous or {}).get("sets", [])}
    sets = []
    for composition_set in suite.sets:
        if only_sets is not None and composition_set.id not in only_sets and composition_set.id in kept:
            sets.append(kept[composition_set.id])
            continue
        started = time.perf_counter()
        images = generate(pipe, suite, method, composition_set, seeds, batched)
        seconds = time.perf_counter() - started
        save_native_grid(images, images_dir / method.label / f"{composition_set.id}.png")
        judged = [judge_image(detect(image), composition_set) for image in images]
        sets.append({"set": composition_set.id, "n": len(composition_set.loras), "prompt": composition_set.prompt,
                     "seeds": seeds, "images": judged, "wall_seconds": seconds, "commit": git_commit(),
                     "weights": weights_digest()})
        row = summarise_set(sets[-1])
        print(f"{method.label:12s} {composition_set.id:28s} all present {row['all_present']:.0%}  "
              f"all exact {row['all_exact']:.0%}  ({seconds:.0f} s)", flush=True)
    method_file = f"compose/methods/{method.name}.py"
    return {"method": method.describe(), "batched": batched, "commit": git_commit(),
            "method_file_commit": git_commit(method_file), "method_file_edited": uncommitted(method_file),
            "sets": sets}


def save_native_grid(images: Sequence[Image.Image], path: Path, columns: int = 8) -> None:
    """All images of a set at their own size, ``columns`` per row (the upscaled report grids read these)."""
    width, height = images[0].size
    grid = Image.new("RGB", (width * columns, height * -(-len(images) // columns)), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp.png")
    grid.save(temp)
    temp.replace(path)


def weights_digest() -> str:
    """The shipped toy-world weights a set was generated with (their manifest's short digest)."""
    from loracompose.assets.embedded import PACKAGED_TOYWORLD
    from loracompose.toyworld.shipping import manifest_digest

    return manifest_digest(PACKAGED_TOYWORLD)


def uncommitted(path: str) -> bool | None:
    """Whether the working tree's ``path`` differs from the last commit (others may be editing it)."""
    try:
        done = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", path], cwd=HERE.parent)
    except OSError:
        return None
    return done.returncode != 0


def git_commit(path: str | None = None) -> str | None:
    command = ["git", "log", "-1", "--format=%h"] + (["--", path] if path else [])
    try:
        done = subprocess.run(command, cwd=HERE.parent, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip() or None


# ------------------------------------------------------------------------------------ summarising


def share(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarise_set(entry: dict[str, Any]) -> dict[str, Any]:
    images = entry["images"]
    names = list(images[0])
    return {"set": entry["set"], "n": entry["n"], "images": len(images),
            "all_present": share([all(j[n]["present"] for n in names) for j in images]),
            "all_exact": share([all(j[n]["exact"] for n in names) for j in images]),
            "present": {n: share([j[n]["present"] for j in images]) for n in names},
            "exact": {n: share([j[n]["exact"] for j in images]) for n in names}}


def by_size(rows: dict[str, Any], key: str) -> dict[int, dict[str, Any]]:
    """Per N: the share over every image of that size, with its 95% Student-t interval and image count."""
    out = {}
    for n in sorted({entry["n"] for entry in rows["sets"]}):
        values = [100.0 * all(j[name][key] for name in j) for entry in rows["sets"] if entry["n"] == n
                  for j in entry["images"]]
        interval = mean_interval(values)
        out[n] = {"mean": interval.mean, "ci_low": max(0.0, interval.low), "ci_high": min(100.0, interval.high),
                  "images": interval.count}
    return out


TWO_OBJECTS, TWO_OBJECTS_TEXT = "moxel+lunzor", "a red heart on the left and a yellow crescent on the right"


def two_objects(rows: dict[str, Any]) -> str:
    """The two-object set's "all exact" share, % (the issue's headline case)."""
    entry = next((entry for entry in rows["sets"] if entry["set"] == TWO_OBJECTS), None)
    return "-" if entry is None else f"{100 * summarise_set(entry)['all_exact']:.0f}"


def per_concept(rows: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per concept, over every image whose set holds it: present and exact shares."""
    out: dict[str, dict[str, list[bool]]] = {}
    for entry in rows["sets"]:
        for judged in entry["images"]:
            for name, verdict in judged.items():
                for key in ("present", "exact"):
                    out.setdefault(name, {"present": [], "exact": []})[key].append(verdict[key])
    return {name: {key: share(values) for key, values in keys.items()} for name, keys in out.items()}


# ------------------------------------------------------------------------------------ re-judging


def cut_native_grid(path: Path, count: int, columns: int = 8) -> list[Image.Image]:
    """The first ``count`` images of a native grid (:func:`save_native_grid`), in seed order."""
    with Image.open(path) as grid:
        grid = grid.convert("RGB")
    size = grid.width // columns
    return [grid.crop(((index % columns) * size, (index // columns) * size,
                       (index % columns + 1) * size, (index // columns + 1) * size)) for index in range(count)]


def rejudge_row(row: dict[str, Any], label: str, suite: Suite, images_dir: Path, judged_with: str | None) -> None:
    """Judge every set's saved images of one method again with the current detector, in place, and print
    per set how many images' judgements changed (a set whose grid is missing keeps its judgements)."""
    sets = {composition_set.id: composition_set for composition_set in suite.sets}
    for entry in row["sets"]:
        native = images_dir / label / f"{entry['set']}.png"
        if not native.is_file() or entry["set"] not in sets:
            print(f"{label:12s} {entry['set']:28s} no saved grid (or set not in the suite): kept", flush=True)
            continue
        images = cut_native_grid(native, len(entry["images"]))
        judged = [judge_image(detect(image), sets[entry["set"]]) for image in images]
        before, after = summarise_set(entry), summarise_set({**entry, "images": judged})
        changed = sum(old != new for old, new in zip(entry["images"], judged))
        print(f"{label:12s} {entry['set']:28s} images changed {changed:2d}/{len(judged)}  all present "
              f"{before['all_present']:.0%} -> {after['all_present']:.0%}  all exact "
              f"{before['all_exact']:.0%} -> {after['all_exact']:.0%}", flush=True)
        entry["images"], entry["judged_with"] = judged, judged_with


def rejudge(suite: Suite, rows_dir: Path, images_dir: Path) -> None:
    """Every method's row in ``rows_dir`` judged again from its saved native grids (generation fields kept;
    "judged_with" names the detector file's commit)."""
    judged_with = git_commit("compose/toyworld/detector.py")
    if uncommitted("compose/toyworld/detector.py"):
        judged_with = f"{judged_with}+edited"
    for method in suite.methods:
        path = rows_dir / f"{method.label}.json"
        if path.is_file():
            row = json.loads(path.read_text())
            rejudge_row(row, method.label, suite, images_dir, judged_with)
            write_json(path, row)


# ------------------------------------------------------------------------------------ the report


def load_rows(suite: Suite) -> dict[str, dict[str, Any]]:
    """The rows on disk for the suite's methods, in the suite's order."""
    rows = {}
    for method in suite.methods:
        path = OUT / "rows" / f"{method.label}.json"
        if path.is_file():
            rows[method.label] = json.loads(path.read_text())
    return rows


MANIFEST = "compose/toyworld/weights/manifest.json"


def manifest_files(commit: str | None) -> dict[str, str]:
    """File -> sha256 of the toy-world weights as shipped at ``commit`` (now: the working tree's)."""
    if commit is None:
        text = (HERE.parent / MANIFEST).read_text()
    else:
        done = subprocess.run(["git", "show", f"{commit}:{MANIFEST}"], cwd=HERE.parent, capture_output=True,
                              text=True)
        if done.returncode != 0:
            return {}
        text = done.stdout
    return {name: entry["sha256"] for name, entry in json.loads(text)["files"].items()}


def stale(entry: dict[str, Any], row: dict[str, Any], label: str, shipped: dict[str, str]) -> bool:
    """Whether any weight file a set entry used (the model, its LoRAs, autolora's gates) differs from
    the shipped one: compared with the manifest at the commit the entry was generated at."""
    used = [name for name in shipped if name.startswith("model/")]
    used += [f"loras/{name}.safetensors" for name in entry["images"][0]]
    used += ["gates.safetensors"] if label == "autolora" else []
    then = manifest_files(entry.get("commit") or row.get("commit"))
    return any(then.get(name) != shipped.get(name) for name in used)


def markdown(rows: dict[str, dict[str, Any]], suite: Suite) -> str:
    seeds = list(suite.seeds)
    shipped = manifest_files(None)
    old = {label: [stale(entry, row, label, shipped) for entry in row["sets"]] for label, row in rows.items()}
    marked = {label: "†" if any(flags) else "" for label, flags in old.items()}
    sizes = sorted({entry["n"] for row in rows.values() for entry in row["sets"]})
    lines = [f"Toy world, report seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} images per set and method), "
             f"{suite.steps} steps, CFG {_guidance_text(suite)}, detector-judged. All concepts of the set present, "
             "% [95% CI] (images); exact: every object also in its colour on its side; two objects: "
             f"{TWO_OBJECTS_TEXT}.", "",
             "| method | " + " | ".join(f"N={n}: all present" for n in sizes) + " | "
             + " | ".join(f"N={n}: exact" for n in sizes if n > 1) + " | two objects |",
             "|---|" + "---:|" * (len(sizes) + sum(n > 1 for n in sizes) + 1)]
    for label, row in rows.items():
        present, exact = by_size(row, "present"), by_size(row, "exact")
        cells = [f"{present[n]['mean']:.0f} [{present[n]['ci_low']:.0f}, {present[n]['ci_high']:.0f}] "
                 f"({present[n]['images']})" for n in sizes]
        cells += [f"{exact[n]['mean']:.0f}" for n in sizes if n > 1]
        lines.append(f"| {label}{marked[label]} | " + " | ".join(cells) + f" | {two_objects(row)} |")
    concepts = list(dict.fromkeys(name for row in rows.values() for name in per_concept(row)))
    lines += ["", "**Per concept**, over every image whose set holds it: present % / exact % (shape, colour "
              "and side for an object; the same for a background or style):", "",
              "| method | " + " | ".join(f"{name} ({CONCEPTS[name].description})" for name in concepts) + " |",
              "|---|" + "---:|" * len(concepts)]
    for label, row in rows.items():
        table = per_concept(row)
        lines.append(f"| {label} | " + " | ".join(
            f"{100 * table[name]['present']:.0f} / {100 * table[name]['exact']:.0f}" for name in concepts) + " |")
    set_ids = [entry["set"] for entry in next(iter(rows.values()))["sets"]]
    lines += ["", "**Per set**: all present % (all exact %):", "",
              "| set | N | " + " | ".join(rows) + " |", "|---|---:|" + "---:|" * len(rows)]
    for index, set_id in enumerate(set_ids):
        summaries = [summarise_set(row["sets"][index]) for row in rows.values()]
        daggers = ["†" if old[label][index] else "" for label in rows]
        lines.append(f"| {set_id} | {summaries[0]['n']} | " + " | ".join(
            f"{100 * s['all_present']:.0f} ({100 * s['all_exact']:.0f}){dagger}"
            for s, dagger in zip(summaries, daggers)) + " |")
    if any(marked.values()):
        lines += ["", "† made with an earlier version of a weight file the set uses (a LoRA, or autolora's "
                  "gates) than the shipped one; those sets are not yet rerun."]
    lines += ["", "Rows produced at: " + ", ".join(
        f"{label} {row.get('method_file_commit') or '?'} (run at {row.get('commit') or '?'})"
        for label, row in rows.items()), ""]
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    """All concepts present against N, one line per method, integer ticks on N."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.5, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (label, row) in enumerate(rows.items()):
        sizes = by_size(row, "present")
        dodge = (index - (len(rows) - 1) / 2) * 0.03
        axes.errorbar([n + dodge for n in sizes], [v["mean"] for v in sizes.values()],
                      yerr=[[v["mean"] - v["ci_low"] for v in sizes.values()],
                            [v["ci_high"] - v["mean"] for v in sizes.values()]],
                      marker="o", markersize=4, capsize=3, linewidth=1.5, label=label)
    axes.set_xlabel("LoRAs composed (N)")
    axes.set_ylabel("all concepts present (%)")
    axes.set_ylim(-3, 103)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.savefig(path, metadata={"Software": None})


def upscaled_grids(rows: dict[str, dict[str, Any]], images_dir: Path, out_dir: Path) -> list[Path]:
    """Per set, one PNG: a row per method (seeds 0-7), every image upscaled x8 by nearest neighbour."""
    written = []
    set_ids = [entry["set"] for entry in next(iter(rows.values()))["sets"]]
    for set_id in set_ids:
        strips = []
        for label in rows:
            native = images_dir / label / f"{set_id}.png"
            if native.is_file():
                with Image.open(native) as grid:
                    strip = grid.convert("RGB").crop((0, 0, grid.width, grid.width // 8))
                strips.append((label, strip.resize((strip.width * GRID_SCALE, strip.height * GRID_SCALE),
                                                   Image.NEAREST)))
        if not strips:
            continue
        margin = LABEL_WIDTH
        width = margin + max(strip.width for _, strip in strips)
        canvas = Image.new("RGB", (width, sum(strip.height for _, strip in strips)), "white")
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default(size=28)
        top = 0
        for label, strip in strips:
            canvas.paste(strip, (margin, top))
            draw.text((8, top + strip.height // 2), label, fill="black", font=font, anchor="lm")
            top += strip.height
        path = out_dir / f"grid-{set_id}.png"
        canvas.save(path, optimize=True)
        written.append(path)
    return written


def write_report(suite: Suite, images_dir: Path) -> None:
    rows = load_rows(suite)
    if not rows:
        raise SystemExit("no rows yet: run the benchmark first")
    text = markdown(rows, suite)
    plot(rows, OUT / "all-present-by-n.png")
    grids = upscaled_grids(rows, images_dir, OUT)
    text += ("\n![all concepts present against N](toyworld-table/all-present-by-n.png)\n\n"
             f"Images: per set, one row per method (named on the left), seeds 0-{GRID_SEEDS - 1}, "
             f"x{GRID_SCALE} nearest:\n\n"
             + "\n".join(f"* {path.stem.removeprefix('grid-')}: ![{path.stem}](toyworld-table/{path.name})"
                         for path in grids) + "\n")
    summary = {label: {"by_size_present": by_size(row, "present"), "by_size_exact": by_size(row, "exact"),
                       "per_concept": per_concept(row), "sets": [summarise_set(entry) for entry in row["sets"]],
                       "batched": row["batched"], "method_file_commit": row.get("method_file_commit"),
                       "commit": row.get("commit"), "settings": row["method"]}
               for label, row in rows.items()}
    write_json(RESULTS / "toyworld-table.json", {"seeds": list(suite.seeds), "steps": suite.steps,
                                                 "guidance": suite.guidance, "machine": machine_info(),
                                                 "methods": summary})
    (RESULTS / "toyworld-table.md").write_text(text)
    print(text)


def _guidance_text(suite: Suite) -> str:
    """The suite's CFG scale for the table's caption (a suite without one runs at the model's own)."""
    return "at the model's default" if suite.guidance is None else f"{suite.guidance:g}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", type=Path, default=SUITE)
    parser.add_argument("--methods", nargs="+", help="only these method labels (default: the suite's)")
    parser.add_argument("--rerun", nargs="+", default=[], metavar="LABEL", help="run these methods' rows again")
    parser.add_argument("--sets", nargs="+", metavar="SET",
                        help="with --rerun: regenerate only these sets, keeping the rows' other entries")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--check-batches", action="store_true", help="compare batches with one-image runs per method")
    parser.add_argument("--images", type=Path, default=HERE.parent / "toyworld_runs" / "table-images",
                        help="native-size image grids (not committed; the report's x8 grids come from them)")
    parser.add_argument("--rejudge", action="store_true",
                        help="judge the saved images of every row again with the current detector (no generating)")
    parser.add_argument("--rows", type=Path, default=OUT / "rows",
                        help="with --rejudge: the rows folder to rewrite (a copy, to try it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    suite = load_suite(args.suite)
    if args.rejudge:
        rejudge(suite, args.rows, args.images)
        return 0
    if not args.report_only:
        pipe = load_pipeline(suite.model, device="cpu", dtype="fp32")
        methods = select_methods(suite, args.methods or [m.label for m in suite.methods] + args.rerun)
        if args.check_batches:
            write_json(BATCH_CHECK, check_batches(pipe, suite, methods))
            return 0
        for method in methods:
            path = OUT / "rows" / f"{method.label}.json"
            if path.is_file() and method.label not in args.rerun:
                continue
            previous = json.loads(path.read_text()) if path.is_file() and args.sets else None
            try:
                write_json(path, run_method(pipe, suite, method, args.images, args.sets, previous))
            except Exception as error:  # one broken method (e.g. mid-edit) must not lose the others' rows
                print(f"{method.label}: failed, its row is not written: {type(error).__name__}: {error}", flush=True)
    write_report(suite, args.images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
