"""The toy world's commands: the base model, its concept LoRAs, and their acceptance numbers.

    loracompose train-toyworld --run-dir runs/base --steps 20000 [--resume]
    loracompose export-toyworld runs/base --out models/toyworld
    loracompose train-toyworld-loras --model models/toyworld --out models/toyworld-loras
    loracompose eval-toyworld --model models/toyworld --loras models/toyworld-loras
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from loracompose.cli.checkpoint_flags import add_checkpoint_arguments, checkpoint_options
from loracompose.errors import UserError


def add_train_toyworld_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, required=True,
                        help="the run's folder: checkpoints/step-NNNNNN, and model/ at the end")
    parser.add_argument("--steps", type=int, default=20000, help="optimisation steps in all (default 20000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--architecture", choices=("base", "tiny"), default="base",
                        help="base: the 1.7 M-parameter UNet (default); tiny: for tests")
    parser.add_argument("--seed", type=int, default=0)
    add_checkpoint_arguments(parser, folder_option="--run-dir")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_train_toyworld(args: argparse.Namespace) -> int:
    from loracompose.toyworld.train import ToyWorldTrainingSettings, train_toyworld

    result = train_toyworld(ToyWorldTrainingSettings(
        run_dir=args.run_dir, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
        architecture=args.architecture, seed=args.seed, threads=args.threads, show_progress=not args.quiet,
        **checkpoint_options(args),
    ))
    print(result.model_dir or result.checkpoint)
    print(f"train-toyworld: {result.steps} steps ({result.steps - result.resumed_from} run now) in "
          f"{result.train_seconds:.0f} s", file=sys.stderr)
    return 0


def add_export_toyworld_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a train-toyworld run folder")
    parser.add_argument("--out", type=Path, required=True, help="diffusers folder to write (loads with load_pipeline)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights instead of their EMA")


def run_export_toyworld(args: argparse.Namespace) -> int:
    from loracompose.toyworld.train import export_model, latest_checkpoint

    checkpoint = latest_checkpoint(args.run_dir)
    if checkpoint is None:
        raise UserError(f"export-toyworld {args.run_dir}: no checkpoint there; train with train-toyworld first")
    print(export_model(checkpoint, args.out, use_ema=not args.no_ema))
    return 0


def add_train_toyworld_loras_arguments(parser: argparse.ArgumentParser) -> None:
    from loracompose.toyworld.concepts import CONCEPTS
    from loracompose.toyworld.loras import CONCEPT_RECIPES, DEFAULT_IMAGES, DEFAULT_STEPS

    parser.add_argument("--model", type=Path, required=True, help="the toy-world base model folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for NAME.safetensors of each concept")
    parser.add_argument("--concept", action="append", choices=list(CONCEPTS), help="train only these (repeat)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"steps per LoRA (default: {DEFAULT_STEPS}; "
                             + ", ".join(f"{name} {recipe['steps']}" for name, recipe in CONCEPT_RECIPES.items()
                                         if "steps" in recipe) + ")")
    parser.add_argument("--images", type=int, default=None,
                        help=f"training scenes per concept (default: {DEFAULT_IMAGES}; "
                             + ", ".join(f"{name} {recipe['images']}" for name, recipe in CONCEPT_RECIPES.items()
                                         if "images" in recipe) + ")")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_train_toyworld_loras(args: argparse.Namespace) -> int:
    from loracompose.toyworld.loras import ConceptTrainingSettings, train_concept_loras

    if any(value is not None and value < 1 for value in (args.steps, args.images)):
        raise UserError("--steps and --images must be positive integers")
    settings = ConceptTrainingSettings(images=args.images, steps=args.steps, seed=args.seed,
                                       show_progress=not args.quiet)
    for result in train_concept_loras(args.model, args.out, args.concept, settings):
        print(result.path)
    return 0


def add_eval_toyworld_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="toy-world model folder (default: the embedded one)")
    parser.add_argument("--loras", type=Path, help="concept LoRA folder (default: the embedded one's)")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4)")
    parser.add_argument("--seeds", type=int, default=4, help="samples per single-object prompt (default 4)")
    parser.add_argument("--pairs", type=int, default=24, help="two-object prompts (default 24)")
    parser.add_argument("--lora-seeds", type=int, default=16, help="samples per concept LoRA (default 16)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")


def run_eval_toyworld(args: argparse.Namespace) -> int:
    from loracompose.assets.embedded import embedded_default
    from loracompose.outputs import atomic_write_text
    from loracompose.pipelines import load_pipeline
    from loracompose.toyworld.evaluate import evaluate_concept_loras, evaluate_samples

    if min(args.seeds, args.pairs, args.lora_seeds) < 1:
        raise UserError("--seeds, --pairs and --lora-seeds must be positive integers")
    if args.model is None or args.loras is None:
        default = embedded_default()
        args.model = args.model or default.model_dir
        args.loras = args.loras or default.loras[0].path.parent
    pipe = load_pipeline(args.model, device="cpu", dtype="fp32")
    base = evaluate_samples(pipe, args.guidance, seeds=args.seeds, pairs=args.pairs)
    concepts = evaluate_concept_loras(pipe, args.loras, args.guidance, seeds=args.lora_seeds)
    print(f"base model, CFG {args.guidance:g}: colour right {base.color_right:.1%}, shape right "
          f"{base.shape_right:.1%} ({base.single_samples} single-object samples); both objects present "
          f"{base.pair_both_present:.1%} ({base.pair_samples} two-object prompts)")
    print("| concept | prompt | present with its LoRA | without (base) |\n|---|---|---:|---:|")
    for row in concepts:
        print(f"| {row.concept} | {row.prompt} | {row.present_with_lora:.0%} | {row.present_without_lora:.0%} |")
    if args.json:
        report = {"model": str(args.model), "loras": str(args.loras), "base": asdict(base),
                  "concepts": [asdict(row) for row in concepts]}
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    return 0
