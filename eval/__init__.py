"""Evaluation: CLIPScore under explicit conventions, benchmark suites (ComposLoRA built in),
resumable and shardable batch runs, and reports. See eval/README.md.

    from loracompose.eval import ClipScorer, load_suite, run_suite, RunOptions, score_run, ScoreOptions, write_report
"""

from .clipscore import CONVENTIONS, ClipConvention, ClipScorer, ClipScores, convention_from
from .report import write_report
from .runner import RunOptions, RunSummary, Shard, run_suite
from .scoring import ScoreOptions, ScoreSummary, read_records, score_run
from .suite import Suite, load_suite, parse_suite

__all__ = [
    "CONVENTIONS", "ClipConvention", "ClipScorer", "ClipScores", "RunOptions", "RunSummary", "ScoreOptions",
    "ScoreSummary", "Shard", "Suite", "convention_from", "load_suite", "parse_suite", "read_records", "run_suite",
    "score_run", "write_report",
]
