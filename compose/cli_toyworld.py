"""The toy world's commands: ``train-toyworld`` (the base model) and ``export-toyworld``.

    loracompose train-toyworld --run-dir runs/base --steps 20000 [--resume]
    loracompose export-toyworld runs/base --out models/toyworld
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError


def add_train_toyworld_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, required=True,
                        help="the run's folder: checkpoints/step-NNNNNN, and model/ at the end")
    parser.add_argument("--steps", type=int, default=20000, help="optimisation steps in all (default 20000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--architecture", choices=("base", "tiny"), default="base",
                        help="base: the 1.7 M-parameter UNet (default); tiny: for tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --run-dir")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_train_toyworld(args: argparse.Namespace) -> int:
    from .toyworld.train import ToyWorldTrainingSettings, train_toyworld

    result = train_toyworld(ToyWorldTrainingSettings(
        run_dir=args.run_dir, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
        architecture=args.architecture, seed=args.seed, checkpoint_every=args.checkpoint_every,
        resume=args.resume, threads=args.threads, show_progress=not args.quiet,
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
    from .toyworld.train import export_model, latest_checkpoint

    checkpoint = latest_checkpoint(args.run_dir)
    if checkpoint is None:
        raise UserError(f"export-toyworld {args.run_dir}: no checkpoint there; train with train-toyworld first")
    print(export_model(checkpoint, args.out, use_ema=not args.no_ema))
    return 0
