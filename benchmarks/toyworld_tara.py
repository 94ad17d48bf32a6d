"""TARA on the toy world with its TARA-trained LoRAs (issue 20), with Merge beside it.

    python benchmarks/toyworld_tara.py                                # report seeds 0-31 (never tuned on)
    python benchmarks/toyworld_tara.py --seeds 100-131 --tag tune     # the tuning seeds
    python benchmarks/toyworld_tara.py --methods merge tara plain/tara --sets moxel lunzor moxel+lunzor

The suite format (benchmarks/toyworld.yaml) names one LoRA file per concept for every method, so TARA's
rows live here: a ``tara`` method uses ``moxel-tara.safetensors`` and ``lunzor-tara.safetensors``
(trained with ``loracompose train-tara``, shipped beside the toy world's LoRAs) for the two objects;
``plain/METHOD`` runs a method on the ordinary shipped LoRAs instead, and every other method runs on
them by default. Concepts without a TARA file (the background and the style) use the ordinary ones.

The shipped toy world at its reference settings (20 steps, CFG 4, 32 px), prompts and sets as
benchmarks/toyworld.yaml. The detector judges each image: ``all`` = every concept of the set present;
``two objects`` = a red heart on the left AND a yellow crescent on the right. Writes JSON and a Markdown
table under benchmarks/results/ and, with ``--images DIR``, one x8 grid PNG per method and set.
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
TARA_SUFFIX = "-tara"
PLAIN_PREFIX = "plain/"
DEFAULT_SETS = ["moxel", "lunzor", "moxel+lunzor"]


def lora_file(lora_dir: Path, name: str, use_tara: bool, tara_dir: Path | None = None) -> Path:
    """The concept's TARA-trained file where asked for and shipped, else its ordinary LoRA."""
    tara = (tara_dir or lora_dir) / f"{name}{TARA_SUFFIX}.safetensors"
    return tara if use_tara and tara.is_file() else lora_dir / f"{name}.safetensors"


def generate(pipe: Any, make_method: Any, entry: dict[str, Any], seeds: list[int], lora_dir: Path,
             use_tara: bool, batch: int, tara_dir: Path | None = None) -> list[Any]:
    specs = [LoraSpec(lora_file(lora_dir, name, use_tara, tara_dir)) for name in entry["loras"]]
    return generate_in_batches(pipe, make_method(entry), entry, specs, seeds, batch)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-31", help="seeds: 0-31 (report, default) or 100-131 (tuning)")
    parser.add_argument("--methods", nargs="+", default=["merge", "tara", "plain/tara"],
                        help="NAME or NAME:{json settings}; plain/... runs TARA on the ordinary LoRAs")
    parser.add_argument("--sets", nargs="+", default=DEFAULT_SETS, help="set ids (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="images per generation call")
    parser.add_argument("--tag", default="report", help="name of the result files: toyworld-tara-TAG.{json,md}")
    parser.add_argument("--images", type=Path, default=None, help="write one grid PNG per method and set here")
    parser.add_argument("--tara-dir", type=Path, default=None,
                        help="folder of NAME-tara.safetensors files (default: the toy world's LoRA folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = parse_seeds(args.seeds)
    default = embedded_default()
    pipe = load_pipeline(default.model_dir, device="cpu", dtype="fp32")
    lora_dir = default.loras[0].path.parent
    results: dict[str, list[dict[str, Any]]] = {}
    timings: dict[str, float] = {}
    for text in args.methods:
        plain = text.startswith(PLAIN_PREFIX)
        label, make_method = parse_method(text.removeprefix(PLAIN_PREFIX))
        label = f"{label} (ordinary LoRAs)" if plain else label
        use_tara = not plain and text.split(":")[0] == "tara"

        def images_for(entry: dict[str, Any], make_method: Any = make_method, use_tara: bool = use_tara) -> list[Any]:
            return generate(pipe, make_method, entry, seeds, lora_dir, use_tara, args.batch, args.tara_dir)

        results[label], timings[label] = run_method(label, args.sets, images_for, args.images, scale=8)
    write_report("tara", args.tag, results, seeds, timings,
                 lora_files={"tara": f"NAME{TARA_SUFFIX}.safetensors where shipped", "others": "NAME.safetensors"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
