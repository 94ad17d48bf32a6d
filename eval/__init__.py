"""Evaluation: CLIPScore under explicit conventions, benchmark suites (ComposLoRA built in),
resumable and shardable batch runs, and reports. See eval/README.md.

    from loracompose.eval import ClipScorer, load_suite, run_suite, RunOptions, score_run, ScoreOptions, write_report
"""

from typing import TYPE_CHECKING

from loracompose.lazy import lazy_exports

if TYPE_CHECKING:
    from .clipscore import CONVENTIONS, ClipConvention, ClipScorer, ClipScores, convention_from
    from .report import write_report
    from .runner import RunOptions, RunSummary, Shard, run_suite
    from .scoring import ScoreOptions, ScoreSummary, read_records, score_run
    from .suite import Suite, load_suite, parse_suite

# Imported on first use (PEP 562): `loracompose bench --help` loads neither torch nor open_clip.
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["CONVENTIONS", "ClipConvention", "ClipScorer", "ClipScores", "convention_from"],
                    f"{__name__}.clipscore"),
    "write_report": f"{__name__}.report",
    **dict.fromkeys(["RunOptions", "RunSummary", "Shard", "run_suite"], f"{__name__}.runner"),
    **dict.fromkeys(["ScoreOptions", "ScoreSummary", "read_records", "score_run"], f"{__name__}.scoring"),
    **dict.fromkeys(["Suite", "load_suite", "parse_suite"], f"{__name__}.suite"),
})

__all__ = [
    "CONVENTIONS", "ClipConvention", "ClipScorer", "ClipScores", "RunOptions", "RunSummary", "ScoreOptions",
    "ScoreSummary", "Shard", "Suite", "convention_from", "load_suite", "parse_suite", "read_records", "run_suite",
    "score_run", "write_report",
]
