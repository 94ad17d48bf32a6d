"""The checkpoint flags every training command shares (they set
:class:`~loracompose.training.checkpoints.CheckpointSettings`; defaults are kept here so that
building the parser imports no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_checkpoint_arguments(parser: argparse.ArgumentParser, *, every: int = 250,
                             folder_option: str = "--work-dir") -> None:
    """``--checkpoint-every``, ``--keep-checkpoints``, ``--resume`` and, unless the command has its own
    run folder (``folder_option``), ``--work-dir``."""
    parser.add_argument("--checkpoint-every", type=int, default=every,
                        help=f"steps between checkpoints (default {every})")
    parser.add_argument("--keep-checkpoints", type=int, default=2,
                        help="how many of the newest checkpoints to keep (default 2)")
    if folder_option == "--work-dir":
        parser.add_argument("--work-dir", type=Path,
                            help="checkpoint folder (default: OUT_STEM.checkpoints beside --out)")
    parser.add_argument("--resume", action="store_true", help=f"continue from the latest checkpoint in {folder_option}")


def checkpoint_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed checkpoint flags as CheckpointSettings keyword arguments."""
    return {"checkpoint_every": args.checkpoint_every, "keep_checkpoints": args.keep_checkpoints,
            "work_dir": getattr(args, "work_dir", None), "resume": args.resume}
