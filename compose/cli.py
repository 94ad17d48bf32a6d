"""The ``loracompose`` command line.

``loracompose`` with no arguments runs the demo on the embedded offline default;
``loracompose generate ...`` composes LoRAs on any model. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import UserError
from .lora import LoraSpec, inspect_loras

DEFAULT_OUT = Path("loracompose-out")


def build_method(args: argparse.Namespace):
    """The method object named by ``--method`` with its settings from the flags."""
    from . import Composite, Merge, Switch

    if args.method == "merge":
        return Merge(combine=args.merge_combine, fuse=args.fuse)
    if args.method == "switch":
        return Switch(period=args.switch_period)
    if args.method == "composite":
        return Composite(mixing_weights=tuple(args.mixing_weights) if args.mixing_weights else None,
                         batched=not args.sequential)
    raise UserError(f"--method {args.method}: not available")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    from . import METHODS
    from loracompose.pipelines.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

    parser.add_argument("--prompt", help="the prompt (default with the embedded model: its demo prompt)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="a .safetensors LoRA and its strength (repeatable, in order)")
    parser.add_argument("--trigger", action="append", default=[], metavar="WORDS",
                        help="trigger words for the --lora at the same position, comma-separated (overrides the file)")
    parser.add_argument("--method", default="merge", choices=sorted(METHODS), help="composition method (default merge)")
    parser.add_argument("--model", help="hub id, diffusers folder or .safetensors checkpoint (default: embedded tiny model)")
    parser.add_argument("--config", help="diffusers folder describing a single-file --model (needed offline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG scale")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=sorted(SCHEDULERS))
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--name", help="file name stem of the outputs (default: METHOD-SEED)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="fp32, fp16, bf16 or auto")
    parser.add_argument("--no-append-triggers", action="store_true", help="do not append missing trigger words")
    parser.add_argument("--no-text-encoder-loras", action="store_true", help="keep LoRAs off the text encoder")
    parser.add_argument("--max-batch-rows", type=int, help="cap on rows per UNet call (memory)")
    parser.add_argument("--switch-period", type=int, default=5, help="switch: steps per LoRA turn (default 5)")
    parser.add_argument("--merge-combine", default="sum", choices=["sum", "mean"], help="merge: sum or mean of deltas")
    parser.add_argument("--fuse", action="store_true", help="merge: fuse the LoRAs into the weights")
    parser.add_argument("--mixing-weights", type=float, nargs="+", help="composite: one mixing weight per LoRA")
    parser.add_argument("--sequential", action="store_true", help="composite: one UNet call per LoRA")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def lora_specs(args: argparse.Namespace) -> list[LoraSpec]:
    specs = [LoraSpec.parse(text) for text in args.lora]
    if args.trigger and len(args.trigger) != len(specs):
        raise UserError(
            f"got {len(args.trigger)} --trigger for {len(specs)} --lora; give one --trigger per --lora, in the same order"
        )
    for index, words in enumerate(args.trigger):
        triggers = tuple(word.strip() for word in words.split(",") if word.strip())
        specs[index] = LoraSpec(specs[index].path, specs[index].weight, trigger_words=triggers)
    return specs


def run_generate(args: argparse.Namespace) -> int:
    from .outputs import prepare_output_dir, save_result
    from loracompose.pipelines import load_pipeline

    specs = lora_specs(args)
    method = build_method(args)
    prompt, model = args.prompt, args.model
    if model is None:
        from .embedded import embedded_default

        demo = embedded_default()
        model = str(demo.model_dir)
        if not specs:
            specs = [LoraSpec(lora.path, trigger_words=lora.trigger_words, category=lora.category) for lora in demo.loras]
        prompt = prompt if prompt is not None else demo.prompt
    if prompt is None:
        raise UserError("--prompt is required with --model; say what the image shows")
    inspect_loras(specs)  # fail on a bad LoRA file before the (slow) model load
    prepare_output_dir(args.out)
    pipe = load_pipeline(model, device=args.device, dtype=args.dtype, config=args.config)
    result = pipe.generate(
        prompt, specs, method, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
        guidance_scale=args.guidance, width=args.width, height=args.height, num_images=args.num_images,
        scheduler=args.scheduler, append_triggers=not args.no_append_triggers,
        text_encoder_loras=not args.no_text_encoder_loras, max_batch_rows=args.max_batch_rows,
        show_progress=not args.quiet,
    )
    written = save_result(result, args.out, args.name or f"{method.name}-{args.seed}", model)
    stats = result.stats
    for path in written:
        print(path)
    print(f"{method.name}: {stats.unet_calls} UNet calls, {stats.unet_rows} rows, {stats.wall_seconds:.2f} s "
          f"({stats.execution})", file=sys.stderr)
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "generate": ("compose LoRAs into images", add_generate_arguments, run_generate),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loracompose", description="Training-free multi-concept LoRA composition for Stable Diffusion."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loracompose`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv or ["generate"])
    try:
        return COMMANDS[args.command][2](args)
    except UserError as error:
        print(f"loracompose: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loracompose: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
