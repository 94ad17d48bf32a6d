"""``loracompose bench``, ``score`` and ``report``: run a suite's grid, score it, report on it.

    loracompose bench SUITE.yaml --out DIR [--limit N] [--only KEY=V1,V2 ...] [--shard I/N] [--report]
    loracompose score DIR [--clip-model M --clip-weights W --clip-config C] [--convention NAME|MAPPING] [--rescore]
    loracompose report DIR            (``bench report DIR`` is the same)

Under ``accelerate launch`` (or torchrun) each process takes shard RANK/WORLD_SIZE and, with
``device: auto``, the GPU LOCAL_RANK, unless --shard is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loracompose.errors import UserError

REPORT_WORD = "report"
DEFAULT_BENCH_ROOT = Path("loracompose-bench")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", metavar="SUITE.yaml|report",
                        help="suite file to run, or the word 'report' followed by a run folder")
    parser.add_argument("run_dir", nargs="?", type=Path, metavar="DIR", help="with 'report': the run folder")
    parser.add_argument("--out", type=Path, help=f"run folder (default {DEFAULT_BENCH_ROOT}/SUITE_NAME)")
    parser.add_argument("--limit", type=int, help="run only the first N jobs of the (filtered) grid")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=V1,V2",
                        help="keep jobs whose method, set, seed or n is one of the values (repeatable, all must match)")
    parser.add_argument("--shard", help="run shard I of N (I/N, 0-based); default from accelerate/torchrun, else 0/1")
    parser.add_argument("--device", help="override the suite's device (auto, cpu, cuda:1, ...)")
    parser.add_argument("--dtype", help="override the suite's dtype (auto, fp32, fp16, bf16)")
    parser.add_argument("--report", action="store_true", help="write the report after the run")
    parser.add_argument("--thumbnails", type=int, default=240, help="at most this many thumbnails in report.html")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_bench(args: argparse.Namespace) -> int:
    if args.suite == REPORT_WORD:
        return _report(args.run_dir or args.out, args.thumbnails, "bench report")
    if args.run_dir is not None:
        raise UserError(f"bench {args.suite} {args.run_dir}: give the run folder with --out DIR")
    if args.report:
        from .plots import require_matplotlib

        require_matplotlib()  # fail now, not after the run
    from .runner import RunOptions, Shard, run_suite
    from .suite import load_suite

    suite = load_suite(args.suite)
    shard = Shard.parse(args.shard) if args.shard else Shard.from_environment()
    out_dir = args.out or DEFAULT_BENCH_ROOT / suite.name
    options = RunOptions(out_dir=out_dir, shard=shard, only=parse_only(args.only), limit=args.limit,
                         device=args.device, dtype=args.dtype, progress=not args.quiet)
    summary = run_suite(suite, options)
    print(f"bench {suite.name} shard {shard}: {summary.jobs} jobs, {summary.already_done} already done, "
          f"{summary.ran} run now; manifest {summary.manifest}", file=sys.stderr)
    return _report(out_dir, args.thumbnails, "bench --report") if args.report else 0


def parse_only(filters: list[str]) -> dict[str, list[str]]:
    """``--only method=merge,switch --only n=2`` as {key: accepted values}."""
    only: dict[str, set[str]] = {}
    for text in filters:
        key, sep, values = text.partition("=")
        accepted = {value.strip() for value in values.split(",") if value.strip()}
        if not sep or not key or not accepted:
            raise UserError(f"--only {text!r}: use KEY=VALUE[,VALUE...] with KEY method, set, seed or n, "
                            "e.g. method=merge")
        only[key.strip()] = only.get(key.strip(), set()) | accepted
    return {key: sorted(values) for key, values in only.items()}


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", type=Path, metavar="DIR", help="the --out folder of a bench run")
    parser.add_argument("--thumbnails", type=int, default=240, help="at most this many thumbnails in report.html")


def run_report(args: argparse.Namespace) -> int:
    return _report(args.run_dir, args.thumbnails, "report")


def _report(run_dir: Path | None, thumbnails: int, command: str) -> int:
    from .report import write_report

    if run_dir is None:
        raise UserError(f"{command}: give the run folder, e.g. loracompose report runs/my-suite")
    if thumbnails < 1:
        raise UserError(f"{command} --thumbnails {thumbnails}: give a positive number of thumbnails")
    files = write_report(run_dir, max_thumbnails=thumbnails)
    for path in (files.html, files.results_csv, files.by_size_csv, files.summary_csv, files.presence_md):
        if path is not None:
            print(path)
    return 0


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", type=Path, metavar="DIR", help="the --out folder of a bench run")
    parser.add_argument("--clip-model", help="open_clip architecture (default: the suite's clipscore: model, else "
                                             "ViT-B-16-quickgelu); a different model does not take the suite's weights")
    parser.add_argument("--clip-weights",
                        help="pretrained tag or local .safetensors file (default: the suite's, else openai)")
    parser.add_argument("--clip-config", help="open_clip model config JSON for an architecture open_clip does not ship")
    parser.add_argument("--convention", help="composlora, torchmetrics, clip-s, raw, or a mapping such as "
                                             "'{scale: 100, clamp: mean, prefix: \"\", text: prompt}' "
                                             "(default: the suite's)")
    parser.add_argument("--rescore", action="store_true",
                        help="also score jobs scored under another CLIP model, weights or convention")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:1, ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_score(args: argparse.Namespace) -> int:
    from .scoring import ScoreOptions, score_run

    if args.run_dir is None:
        raise UserError("score: give the run folder, e.g. loracompose score runs/my-suite")
    options = ScoreOptions(run_dir=args.run_dir, model=args.clip_model, weights=args.clip_weights,
                           config=args.clip_config, convention=parse_convention(args.convention),
                           rescore=args.rescore, device=args.device, progress=not args.quiet)
    summary = score_run(options)
    print(summary.scores_file)
    print(f"score {args.run_dir}: {summary.jobs} finished jobs, {summary.already_scored} already scored, "
          f"{summary.scored} scored now", file=sys.stderr)
    if summary.other_setup:
        print(f"score: {summary.other_setup} jobs were scored under another CLIP model, weights or convention and "
              "are left as they are; add --rescore to score them under this one", file=sys.stderr)
    if summary.missing_images:
        print(f"score: {summary.missing_images} jobs have no image on disk; rerun bench to generate them again",
              file=sys.stderr)
    return 0


def parse_convention(text: str | None) -> str | dict | None:
    """``--convention``: a preset name, or a YAML/JSON mapping of its fields."""
    if text is None or not text.lstrip().startswith("{"):
        return text
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise UserError(f"--convention {text!r}: give a preset name or a mapping such as '{{scale: 100, clamp: mean}}'")
    return value
