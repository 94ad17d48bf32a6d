"""AutoLoRA's commands: ``retrieve``, ``train-retriever``, ``train-gates`` and ``generate --auto-loras``.

    loracompose retrieve "a knight in a bamboo forest" --library ~/loras [--top 3] [--retriever R.safetensors]
    loracompose generate --model M --prompt "..." --auto-loras 2 --library ~/loras --method autolora
    loracompose train-retriever --library ~/loras --model M --out retriever.safetensors
    loracompose train-gates --model M --lora a.safetensors --lora b.safetensors --out gates.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from loracompose.cli.checkpoint_flags import add_checkpoint_arguments, checkpoint_options
from loracompose.errors import UserError
from loracompose.lora import LoraSpec


def add_library_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, required: bool) -> None:
    parser.add_argument("--library", type=Path, required=required, help="folder of .safetensors LoRAs (indexed once)")
    parser.add_argument("--retriever", type=Path,
                        help="a trained weight retriever (train-retriever); default: rank by metadata text")
    parser.add_argument("--category-limit", metavar="CATEGORY=N,...",
                        help="most LoRAs per category (default: one character, one style, one background)")


def add_auto_lora_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``generate``'s retrieval flags (the autolora method's own are derived from its settings)."""
    parser.add_argument("--auto-loras", type=int, metavar="K",
                        help="add the K LoRAs of --library that best fit the prompt")
    add_library_arguments(parser, required=False)


def check_auto_lora_arguments(args: argparse.Namespace) -> None:
    """``--auto-loras`` and ``--library`` come together (checked before anything is loaded or written)."""
    if args.auto_loras is None and args.library is not None:
        raise UserError("--library is given without --auto-loras K; say how many LoRAs to pick")
    if args.auto_loras is not None and args.library is None:
        raise UserError("--auto-loras needs --library DIR, the folder of LoRAs to pick from")
    if args.auto_loras is not None and not args.library.is_dir():
        raise UserError(f"--library {args.library}: no such folder; give the folder of your .safetensors LoRAs")


def auto_lora_specs(pipe: Any, prompt: str, args: argparse.Namespace) -> list[LoraSpec]:
    """The LoRAs ``--auto-loras K --library DIR`` picks for the prompt (none without --auto-loras)."""
    if args.auto_loras is None:
        return []
    from loracompose.retrieval import auto_lora_specs as pick, format_ranking, parse_category_limits

    specs, ranked = pick(pipe, prompt, args.library, args.auto_loras, retriever=args.retriever,
                         category_limits=parse_category_limits(args.category_limit))
    print(f"auto-loras:\n{format_ranking(ranked)}", file=sys.stderr)
    return specs


def add_retrieve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt to find LoRAs for")
    add_library_arguments(parser, required=True)
    parser.add_argument("--top", type=int, default=3, help="how many LoRAs to list (default 3)")
    parser.add_argument("--model", help="base model whose text encoder ranks (default: the embedded toy-world model)")
    parser.add_argument("--config", help="diffusers folder describing a single-file --model (needed offline)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="auto")


def run_retrieve(args: argparse.Namespace) -> int:
    from loracompose.library import open_library
    from loracompose.retrieval import auto_lora_specs as pick, check_top_k, format_ranking, parse_category_limits
    from loracompose.pipelines import load_pipeline

    check_top_k(args.top)
    library = open_library(args.library)
    for corrupt in library.corrupt.values():
        print(f"loracompose: warning: skipped {corrupt.file}: {corrupt.reason}", file=sys.stderr)
    pipe = load_pipeline(_model_or_default(args.model), device=args.device, config=args.config)
    _, ranked = pick(pipe, args.prompt, library, args.top, retriever=args.retriever,
                     category_limits=parse_category_limits(args.category_limit))
    if args.json:
        print(json.dumps([{"name": item.entry.name, "file": str(library.path_of(item.entry)), "score": item.score,
                           "cosine": item.similarity, "category": item.entry.category,
                           "trigger_in_prompt": item.trigger_match} for item in ranked], indent=2))
    else:
        print(format_ranking(ranked))
    return 0


def _model_or_default(model: str | None) -> str:
    if model is not None:
        return model
    from loracompose.assets.embedded import embedded_default

    return str(embedded_default().model_dir)


def add_train_retriever_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--library", type=Path, required=True, help="LoRAs with descriptions in their metadata")
    parser.add_argument("--model", required=True, help="base model whose text encoder gives the target embeddings")
    parser.add_argument("--out", type=Path, required=True, help="the retriever .safetensors file to write")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--width", type=int, default=768, help="transformer width (default 768)")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--mlp", type=int, default=3072)
    _add_training_arguments(parser, checkpoint_every=500)


def run_train_retriever(args: argparse.Namespace) -> int:
    from loracompose.training.retriever import RetrieverTrainingSettings, train_retriever

    result = train_retriever(RetrieverTrainingSettings(
        library=args.library, out=args.out, model=args.model, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, temperature=args.temperature, width=args.width, depth=args.depth, heads=args.heads,
        mlp=args.mlp, seed=args.seed, device=args.device, show_progress=not args.quiet, **checkpoint_options(args),
    ))
    print(result.path)
    return 0


def add_train_gates_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub id, diffusers folder or .safetensors checkpoint")
    parser.add_argument("--lora", type=Path, action="append", required=True,
                        help="a LoRA file or a library folder (repeatable; at least 2 LoRAs in all)")
    parser.add_argument("--out", type=Path, required=True, help="the gate .safetensors file to write")
    parser.add_argument("--variant", default="full", choices=["full", "no_base", "no_cross"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--margin", type=float, default=0.5)
    parser.add_argument("--caption-dropout", type=float, default=0.3)
    parser.add_argument("--showcase-steps", type=int, default=30,
                        help="denoising steps of a LoRA's generated showcase image when it has no <stem>.png")
    parser.add_argument("--resolution", type=int, help="training size in pixels (default: the model's native size)")
    parser.add_argument("--dtype", default="auto")
    _add_training_arguments(parser, checkpoint_every=250)


def run_train_gates(args: argparse.Namespace) -> int:
    from loracompose.training.gates import GateTrainingSettings, train_gates

    result = train_gates(GateTrainingSettings(
        model=args.model, loras=args.lora, out=args.out, variant=args.variant, steps=args.steps,
        learning_rate=args.lr, margin=args.margin, caption_dropout=args.caption_dropout,
        showcase_steps=args.showcase_steps, resolution=args.resolution, seed=args.seed, device=args.device,
        dtype=args.dtype, show_progress=not args.quiet, **checkpoint_options(args),
    ))
    print(result.path)
    return 0


def _add_training_arguments(parser: argparse.ArgumentParser, *, checkpoint_every: int) -> None:
    parser.add_argument("--seed", type=int, default=0)
    add_checkpoint_arguments(parser, every=checkpoint_every)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
