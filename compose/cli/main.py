"""The ``loracompose`` command line.

``loracompose`` with no arguments runs the demo on the embedded offline default;
``loracompose generate ...`` composes LoRAs on any model. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

from loracompose.cli.autolora import (
    add_auto_lora_arguments,
    add_retrieve_arguments,
    add_train_gates_arguments,
    add_train_retriever_arguments,
    auto_lora_specs,
    check_auto_lora_arguments,
    run_retrieve,
    run_train_gates,
    run_train_retriever,
)
from loracompose.cli.toyworld import (
    add_eval_toyworld_arguments,
    add_export_toyworld_arguments,
    add_train_toyworld_arguments,
    add_train_toyworld_loras_arguments,
    run_eval_toyworld,
    run_export_toyworld,
    run_train_toyworld,
    run_train_toyworld_loras,
)
from loracompose.cli.checkpoint_flags import add_checkpoint_arguments, checkpoint_options
from loracompose.cli.method_flags import UsageError, add_method_arguments, method_from_args
from loracompose.errors import UserError
from loracompose.lora import LoraSpec, inspect_loras
from loracompose.validation import LIMIT_FLAGS, Limits, check_generation_numbers, plain_file_name

if TYPE_CHECKING:
    from loracompose.methods.base import CompositionMethod
    from loracompose.training.trainer import LoraTrainingSettings, TrainingResult

DEFAULT_OUT = Path("loracompose-out")


def build_method(args: argparse.Namespace) -> CompositionMethod:
    """The method object named by ``--method`` with its settings from the flags."""
    from loracompose.methods import METHODS

    return method_from_args(args, METHODS)


MODEL_HELP = "hub id, diffusers folder or .safetensors checkpoint (default: the embedded toy-world model)"


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """generate's own options, the retrieval and profiling options, then one group per method."""
    from loracompose.methods import DEFAULT_METHOD, METHODS
    from loracompose.pipelines.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

    common = parser.add_argument_group("generation")
    common.add_argument("--prompt", help="the prompt (default with the embedded model: its demo prompt)")
    common.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT][:lbw=BLOCKS]",
                        help="a .safetensors LoRA and its strength (repeatable, in order); :lbw= takes per-block "
                             "strengths, an A1111 lora-block-weight preset name or 17 (SD1.5) / 12 (SDXL) numbers")
    common.add_argument("--trigger", action="append", default=[], metavar="WORDS",
                        help="trigger words for the --lora at the same position, comma-separated (overrides the file)")
    common.add_argument("--lora-dir", metavar="DIR",
                        help="folder for <lora:NAME:WEIGHT> prompt tags (NAME.safetensors, subfolders searched; "
                             "default $LORACOMPOSE_LORA_DIR)")
    common.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS),
                        help=f"composition method (default {DEFAULT_METHOD}); its settings are in its group below")
    common.add_argument("--model", help=MODEL_HELP)
    common.add_argument("--config", help="diffusers folder describing a single-file --model (needed offline)")
    common.add_argument("--seed", type=int, default=0, help="random seed of the first image (image k: seed + k)")
    common.add_argument("--steps", type=int, help="denoising steps (default 30; the embedded model's own: 20)")
    common.add_argument("--guidance", type=float,
                        help="CFG scale (default 7.5; SD3: 7; the embedded model's own: 4); on FLUX the distilled "
                             "guidance the model is conditioned on (default 3.5)")
    common.add_argument("--true-cfg", type=float, default=1.0,
                        help="FLUX only: real CFG scale on top of the distilled guidance (above 1: two rows per image)")
    common.add_argument("--negative-prompt")
    common.add_argument("--scheduler", choices=list(SCHEDULERS),
                        help=f"sampler (default: {DEFAULT_SCHEDULER}; FLUX/SD3: euler, their flow-matching Euler)")
    common.add_argument("--num-images", type=int, default=1)
    common.add_argument("--width", type=int, help="image width in pixels (default: the model's native size)")
    common.add_argument("--height", type=int, help="image height in pixels (default: the model's native size)")
    common.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    common.add_argument("--name", help="file name stem of the outputs (default: METHOD-SEED)")
    common.add_argument("--device", default="auto")
    common.add_argument("--dtype", default="auto", help="fp32, fp16, bf16 or auto")
    common.add_argument("--no-append-triggers", action="store_true", help="do not append missing trigger words")
    common.add_argument("--no-text-encoder-loras", action="store_true", help="keep LoRAs off the text encoder")
    common.add_argument("--max-batch-rows", type=int, help="cap on rows per UNet call (memory)")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    add_limit_arguments(parser.add_argument_group("limits (raise them for large requests)"))
    add_auto_lora_arguments(parser.add_argument_group("LoRA retrieval (AutoLoRA)"))
    add_method_arguments(parser, METHODS)


def add_limit_arguments(group: Any) -> None:
    """--max-side, --max-pixels, --max-steps and --no-memory-check (loracompose.validation.Limits)."""
    defaults = Limits()
    group.add_argument(LIMIT_FLAGS["max_side"], type=int, default=defaults.max_side,
                       help="largest image width or height in pixels")
    group.add_argument(LIMIT_FLAGS["max_pixels"], type=int, default=defaults.max_pixels,
                       help="largest width x height x images of one call")
    group.add_argument(LIMIT_FLAGS["max_steps"], type=int, default=defaults.max_steps,
                       help="most denoising steps")
    group.add_argument(LIMIT_FLAGS["check_memory"], dest="check_memory", action="store_false",
                       help="do not refuse requests whose estimated memory exceeds the free memory")


def limits_from_args(args: argparse.Namespace) -> Limits:
    return Limits(max_side=args.max_side, max_pixels=args.max_pixels, max_steps=args.max_steps,
                  check_memory=args.check_memory)


def lora_specs(args: argparse.Namespace) -> list[LoraSpec]:
    specs = [LoraSpec.parse(text) for text in args.lora]
    if args.trigger and len(args.trigger) != len(specs):
        raise UserError(
            f"got {len(args.trigger)} --trigger for {len(specs)} --lora; give one --trigger per --lora, "
            "in the same order"
        )
    for index, words in enumerate(args.trigger):
        triggers = tuple(word.strip() for word in words.split(",") if word.strip())
        specs[index] = LoraSpec(specs[index].path, specs[index].weight, trigger_words=triggers)
    return specs


def run_generate(args: argparse.Namespace) -> int:
    from loracompose.formats.prompt_tags import with_prompt_loras
    from loracompose.outputs import prepare_output_dir, save_result
    from loracompose.pipelines import load_pipeline

    specs = lora_specs(args)
    method = build_method(args)
    prompt, model = args.prompt, args.model
    default_steps, default_guidance = 30, None  # None: the model family's own (pipe.default_guidance_scale)
    if model is None:
        from loracompose.assets.embedded import embedded_default

        demo = embedded_default()
        model = str(demo.model_dir)
        default_steps, default_guidance = demo.steps, demo.guidance_scale
        if not specs:
            specs = [LoraSpec(lora.path, trigger_words=lora.trigger_words, category=lora.category)
                     for lora in demo.loras]
        prompt = prompt if prompt is not None else demo.prompt
    if prompt is None:
        raise UserError("--prompt is required with --model; say what the image shows")
    prompt, specs = with_prompt_loras(prompt, specs, args.lora_dir)  # <lora:NAME:W> tags, like --lora
    steps = args.steps if args.steps is not None else default_steps
    guidance = args.guidance if args.guidance is not None else default_guidance
    limits = limits_from_args(args)
    check_generation_numbers(steps=steps, guidance_scale=7.5 if guidance is None else guidance,
                             num_images=args.num_images, seed=args.seed, width=args.width, height=args.height,
                             max_batch_rows=args.max_batch_rows, limits=limits)
    name = plain_file_name(args.name, "--name") if args.name is not None else f"{method.name}-{args.seed}"
    inspect_loras(specs)  # fail on a bad LoRA file before the (slow) model load
    check_auto_lora_arguments(args)
    if args.out.exists() and not args.out.is_dir():  # the folder itself is made only once there is an image
        raise UserError(f"--out {args.out} is a file; give a folder for the images")
    pipe = load_pipeline(model, device=args.device, dtype=args.dtype, config=args.config)
    pipe.limits = limits
    specs += auto_lora_specs(pipe, prompt, args)
    result = pipe.generate(
        prompt, specs, method, negative_prompt=args.negative_prompt, seed=args.seed, steps=steps,
        guidance_scale=guidance, width=args.width, height=args.height, num_images=args.num_images,
        scheduler=args.scheduler, append_triggers=not args.no_append_triggers,
        text_encoder_loras=not args.no_text_encoder_loras, max_batch_rows=args.max_batch_rows,
        show_progress=not args.quiet, true_cfg_scale=args.true_cfg,
    )
    prepare_output_dir(args.out)
    written = save_result(result, args.out, name, model)
    stats = result.stats
    for path in written:
        print(path)
    print(f"{method.name}: {stats.unet_calls} {pipe.denoiser_name} calls, {stats.unet_rows} rows, "
          f"{stats.wall_seconds:.2f} s ({stats.execution})", file=sys.stderr)
    return 0


def add_lora_training_arguments(parser: argparse.ArgumentParser, defaults: str) -> None:
    """The arguments train-lora and train-tara share; ``defaults`` names the recipe's default values."""
    parser.add_argument("--model", required=True, help="hub id, diffusers folder or .safetensors checkpoint")
    parser.add_argument("--config", help="diffusers folder describing a single-file --model (needed offline)")
    parser.add_argument("--images", type=Path, required=True, help="folder of training images of the concept")
    parser.add_argument("--prior-images", type=Path,
                        help="folder of regularisation images without the concept, each with its NAME.txt caption "
                             "(DreamBooth prior preservation): the LoRA learns to leave such scenes unchanged")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors LoRA file to write")
    parser.add_argument("--steps", type=int, help=f"optimisation steps (default: the recipe's; recipe: {defaults})")
    parser.add_argument("--rank", type=int, help="LoRA rank (default: the recipe's, see --steps)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default: the recipe's)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the recipe's, see --steps)")
    parser.add_argument("--batch-size", type=int, help="images per step (default: the recipe's)")
    parser.add_argument("--resolution", type=int, help="training size in pixels (default: the model's native size)")
    parser.add_argument("--seed", type=int, default=0)
    add_checkpoint_arguments(parser)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="base weights: auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory (SDXL)")
    parser.add_argument("--targets", nargs="+", metavar="NAME",
                        help="UNet projections that get the LoRA, as name suffixes (default: to_q to_k to_v "
                             "to_out.0, every attention's; attn2.to_k attn2.to_v: cross-attention keys and values)")
    parser.add_argument("--probe-timesteps", type=int, default=8,
                        help="timesteps per image of the fixed-draw loss logged before and after training (0: off)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def lora_training_settings(args: argparse.Namespace, **extra: Any) -> LoraTrainingSettings:
    from loracompose.training.trainer import LoraTrainingSettings

    return LoraTrainingSettings(
        model=args.model, images=args.images, prior_images=args.prior_images, out=args.out, prompt=args.prompt or "",
        steps=args.steps,
        rank=args.rank, alpha=args.alpha, learning_rate=args.lr, batch_size=args.batch_size,
        resolution=args.resolution, seed=args.seed, device=args.device, dtype=args.dtype, config=args.config,
        gradient_checkpointing=args.gradient_checkpointing, probe_timesteps=args.probe_timesteps,
        targets=tuple(args.targets) if args.targets else None,
        show_progress=not args.quiet, **checkpoint_options(args), **extra,
    )


def report_training(command: str, result: TrainingResult) -> None:
    print(result.path)
    last = result.history[-1] if result.history else {}
    print(f"{command}: {result.steps} steps ({result.steps - result.resumed_from} run now), final loss "
          f"{last.get('loss', float('nan')):.4f}; checkpoints in {result.work_dir}", file=sys.stderr)


def add_train_lora_arguments(parser: argparse.ArgumentParser) -> None:
    add_lora_training_arguments(parser, "500 steps, rank 4, lr 1e-4")
    parser.add_argument("--prompt", help="caption of every image without a NAME.txt caption file beside it")
    parser.add_argument("--trigger", action="append", default=[], metavar="WORDS",
                        help="trigger words written into the file's metadata (repeat for several)")
    parser.add_argument("--title", help="the LoRA's title in its metadata (default: the file name)")
    parser.add_argument("--category", help="the LoRA's category in its metadata (character, style, object, ...)")


def run_train_lora(args: argparse.Namespace) -> int:
    from loracompose.training.trainer import train_lora

    settings = lora_training_settings(args, trigger_words=tuple(word.strip() for word in args.trigger if word.strip()),
                                      title=args.title, category=args.category)
    report_training("train-lora", train_lora(settings))
    return 0


def add_train_tara_arguments(parser: argparse.ArgumentParser) -> None:
    add_lora_training_arguments(parser, "1000 steps; SD1.5 rank 8, alpha 32, lr 1e-4; SDXL rank 4, lr 5e-5")
    parser.add_argument("--token", required=True, help="the rare token naming the concept, e.g. sks")
    parser.add_argument("--class-word", required=True, help="the concept's class word, e.g. dog")
    parser.add_argument("--prompt", help="caption of every image without a NAME.txt caption file beside it "
                        "(default: 'a photo of TOKEN CLASS'); every caption must hold TOKEN")
    parser.add_argument("--align-weight", type=float, default=1.0, help="weight of the key alignment loss (default 1)")


def run_train_tara(args: argparse.Namespace) -> int:
    from loracompose.training.tara import TaraTrainingSettings, train_tara

    settings = TaraTrainingSettings(args.token, args.class_word, lora_training_settings(args),
                                    align_weight=args.align_weight)
    report_training("train-tara", train_tara(settings))
    return 0


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from loracompose.eval.cli import add_bench_arguments as add_arguments

    add_arguments(parser)


def run_bench(args: argparse.Namespace) -> int:
    """``loracompose bench SUITE.yaml --out DIR`` / ``loracompose bench report DIR`` (eval/cli.py)."""
    from loracompose.eval.cli import run_bench as run

    return run(args)


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    from loracompose.eval.cli import add_score_arguments as add_arguments

    add_arguments(parser)


def run_score(args: argparse.Namespace) -> int:
    """``loracompose score DIR`` (eval/cli.py)."""
    from loracompose.eval.cli import run_score as run

    return run(args)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    from loracompose.eval.cli import add_report_arguments as add_arguments

    add_arguments(parser)


def run_report(args: argparse.Namespace) -> int:
    """``loracompose report DIR`` (eval/cli.py)."""
    from loracompose.eval.cli import run_report as run

    return run(args)


def add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--config", help="diffusers folder describing a single-file --model (needed offline)")
    parser.add_argument("--library", type=Path,
                        help="folder of .safetensors LoRAs to offer (default with the embedded model: its demo LoRAs)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--out", type=Path, help="output folder (default: LORACOMPOSE_HOME/ui/outputs)")
    parser.add_argument("--max-upload-mb", type=float, default=512, help="largest LoRA upload in MiB (default 512)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="fp32, fp16, bf16 or auto")
    add_limit_arguments(parser.add_argument_group("limits of one request (raise them for large requests)"))


def run_ui(args: argparse.Namespace) -> int:
    from loracompose.ui import UiOptions, serve

    serve(UiOptions(model=args.model, config=args.config, library=args.library, host=args.host, port=args.port,
                    out=args.out, device=args.device, dtype=args.dtype, max_upload_mb=args.max_upload_mb,
                    limits=limits_from_args(args)))
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "generate": ("compose LoRAs into images", add_generate_arguments, run_generate),
    "bench": ("run a benchmark suite (method x set x seed), resumable; or `bench report DIR`", add_bench_arguments,
              run_bench),
    "score": ("add CLIPScore (and concept similarity) to a finished bench run, resumable", add_score_arguments,
              run_score),
    "report": ("write results.csv, by_size.csv and report.html (tables with confidence intervals, plots, images) "
               "for a bench run", add_report_arguments, run_report),
    "train-lora": ("train a LoRA on a folder of images (captions: NAME.txt beside each image, or --prompt)",
                   add_train_lora_arguments, run_train_lora),
    "train-tara": ("train a TARA LoRA (token-masked K/V) on a folder of images", add_train_tara_arguments,
                   run_train_tara),
    "ui": ("serve the web UI (Gradio) for composing LoRAs", add_ui_arguments, run_ui),
    "retrieve": ("rank a LoRA library's LoRAs for a prompt (AutoLoRA retrieval)", add_retrieve_arguments, run_retrieve),
    "train-retriever": ("train AutoLoRA's weight-encoding LoRA retriever on a library", add_train_retriever_arguments,
                        run_train_retriever),
    "train-gates": ("train AutoLoRA's fusion gates on a LoRA set", add_train_gates_arguments, run_train_gates),
    "train-toyworld": ("train the toy-world base model (procedural scenes) from scratch, resumable",
                       add_train_toyworld_arguments, run_train_toyworld),
    "export-toyworld": ("write a toy-world run's latest checkpoint as a diffusers folder",
                        add_export_toyworld_arguments, run_export_toyworld),
    "train-toyworld-loras": ("train the toy world's concept LoRAs (moxel, lunzor, checkered, pixelart) on its "
                             "base model", add_train_toyworld_loras_arguments, run_train_toyworld_loras),
    "eval-toyworld": ("the toy world's acceptance numbers: base model and each concept LoRA, judged by the detector",
                      add_eval_toyworld_arguments, run_eval_toyworld),
}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each option's default where it has a telling one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        quiet: tuple[object, ...] = (None, False, True, [], argparse.SUPPRESS)
        if "default" in text or any(action.default is value or action.default == [] for value in quiet) \
                or not action.option_strings:
            return action.help
        return f"{text} (default: %(default)s)".lstrip()


class Parser(argparse.ArgumentParser):
    """A usage error is one line, ``loracompose generate: error: ... (see --help)``, and exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="loracompose",
                    description="Training-free multi-concept LoRA composition for Stable Diffusion.")
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
    except UsageError as error:
        print(f"loracompose {args.command}: error: {error} (see --help)", file=sys.stderr)
        return 2
    except UserError as error:
        print(f"loracompose: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loracompose: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(error, MemoryError) and type(error).__name__ != "OutOfMemoryError":
            raise
        print("loracompose: error: out of memory; ask for fewer or smaller images (--num-images, --width, "
              "--height) or cap --max-batch-rows", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
