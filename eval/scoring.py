"""``loracompose score DIR``: add CLIPScore (and per-concept similarity) to a finished run, resumably.

    setup    <- CLIP model, weights and convention: the flags, else the run's suite (run.json clipscore:)
    records  <- the run's finished jobs (manifests) with the scores added so far (metrics/clipscore.jsonl)
    for each record of the run's grid not scored under this setup (scored under another: only with --rescore):
        line <- CLIPScore of its image, cosine, scored text, setup, concept similarity
        append the line to metrics/clipscore.jsonl     # one write + fsync: a kill loses at most this job

Scores are kept beside the manifest, not written into it (metrics apart from
generation, so they can be recomputed under another convention, and a running ``bench`` keeps
appending to its manifest undisturbed). Readers (:func:`read_records`, the report) lay the last
score line of a job over its manifest record. A line names the generation it scored (a digest of
the manifest record), so a job generated again after its image was deleted is scored again and
never shows the old image's score.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from loracompose.errors import UserError

from .clipscore import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, convention_from, resolve_clip, same_setup
from .manifest import ManifestWriter, read_lines, read_manifest

SCORES_FILE = Path("metrics") / "clipscore.jsonl"
SCORE_FIELDS = ("clipscore", "clip_cosine", "clip_text", "clip", "concept_similarity")


@dataclass(frozen=True)
class ScoreOptions:
    """What to score with. A field left None comes from the run's suite, else the defaults;
    a ``model`` given here brings its own ``weights`` and ``config`` (the run's are for its model)."""

    run_dir: Path
    model: str | None = None
    weights: str | None = None
    config: str | None = None
    convention: str | Mapping[str, Any] | None = None
    rescore: bool = False
    device: str = "auto"
    progress: bool = True


@dataclass(frozen=True)
class ScoreSummary:
    """Finished jobs of the grid; of them: scored before under this setup, under another setup
    (left as they are without --rescore), scored now; and jobs whose image is gone."""

    jobs: int
    already_scored: int
    other_setup: int
    scored: int
    missing_images: int
    scores_file: Path


def score_run(options: ScoreOptions) -> ScoreSummary:
    """Score the run's finished jobs that have no score under the requested setup."""
    from .runner import RUN_FILE

    run_dir = Path(options.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"score {run_dir}: not a folder; give the --out folder of a bench run")
    if not (run_dir / RUN_FILE).is_file():
        raise UserError(f"score {run_dir}: no {RUN_FILE} here; give the --out folder of a bench run "
                        "(rerun `loracompose bench SUITE --out DIR` to write it)")
    suite = _read_suite(run_dir / RUN_FILE)
    planned = {job["id"] for job in suite["jobs"]}
    settings = clip_settings(suite["suite"].get("clipscore"), options)
    _, target = resolve_clip(settings.model, settings.pretrained, config=settings.config)
    target["convention"] = settings.convention.to_dict()

    path = run_dir / SCORES_FILE
    path.parent.mkdir(exist_ok=True)
    with ManifestWriter(path, command="score") as writer:  # read what is done only once the file is ours
        records = [record for job_id, record in read_records(run_dir).items() if job_id in planned]
        present = [record for record in records if (run_dir / record["image"]).is_file()]
        already = [record for record in present if "clip" in record and same_setup(record["clip"], target)]
        other = [record for record in present if "clip" in record and not same_setup(record["clip"], target)]
        pending = [record for record in present if "clip" not in record] + (other if options.rescore else [])
        if pending:
            _score_pending(pending, len(already) + len(pending), settings, suite["suite"], target, options, writer)
    return ScoreSummary(len(records), len(already), 0 if options.rescore else len(other), len(pending),
                        len(records) - len(present), path)


def clip_settings(stored: Mapping[str, Any] | None, options: ScoreOptions):
    """The CLIP model, weights, config and convention: flags over the run's suite over the defaults."""
    from .suite import ClipSettings

    stored = dict(stored or {})
    if options.model is not None and options.model != stored.get("model"):
        stored = {key: value for key, value in stored.items() if key in ("convention", "reduce")}
    convention = options.convention if options.convention is not None else stored.get("convention")
    return ClipSettings(
        model=options.model or stored.get("model") or DEFAULT_CLIP_MODEL,
        pretrained=str(options.weights or stored.get("pretrained") or DEFAULT_CLIP_PRETRAINED),
        config=options.config or stored.get("config"),
        convention=convention_from(convention),
        reduce=stored.get("reduce") or "mean",
    )


def _score_pending(pending: Sequence[Mapping[str, Any]], total: int, settings: Any, suite: Mapping[str, Any],
                   target: Mapping[str, Any], options: ScoreOptions, writer: ManifestWriter) -> None:
    from tqdm.auto import tqdm

    scorer = settings.load(options.device)
    if not same_setup(scorer.describe(), target):  # the weights file changed under us
        raise UserError(f"score: the CLIP weights {settings.pretrained} changed while loading; rerun")
    loras = suite["loras"]
    bar = tqdm(total=total, initial=total - len(pending), unit="image", desc="score", disable=not options.progress,
               file=sys.stderr, dynamic_ncols=True)
    with bar:
        for record in pending:
            names = record["loras"]
            unknown = [name for name in names if name not in loras]
            if unknown:
                raise UserError(f"score: LoRA {unknown[0]!r} of job {record['job_id']} is not in run.json; "
                                "rerun the suite's bench command to rewrite it")
            triggers = [word for name in names for word in loras[name]["trigger_words"]]
            references = {name: loras[name].get("references") or [] for name in names}
            fields = score_fields(scorer, Path(options.run_dir) / record["image"], record["prompt"], triggers,
                                  references, settings.reduce)
            writer.append({"job_id": record["job_id"], "generation": generation_digest(record), **fields,
                           "scored_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            bar.update(1)


def score_fields(scorer: Any, image: Any, prompt: str, trigger_words: Sequence[str],
                 references: Mapping[str, Sequence[Any]], reduce: str = "mean") -> dict[str, Any]:
    """CLIPScore of one image under the scorer's convention, and its similarity to each concept
    with reference images (the fields of a manifest record / score line)."""
    scores = scorer.score_generation([image], prompt, trigger_words)
    fields = {"clipscore": scores.per_sample[0], "clip_cosine": scores.cosines[0], "clip_text": scores.texts[0],
              "clip": scorer.describe()}
    references = {concept: images for concept, images in references.items() if images}
    if references:
        fields["concept_similarity"] = scorer.concept_similarity(image, references, reduce)
    return fields


# ------------------------------------------------------------------------------------ reading


def read_records(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """job id -> its manifest record with its latest scores (metrics/clipscore.jsonl) laid over it."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    records = dict(manifest)
    path = run_dir / SCORES_FILE
    if path.is_file():
        digests: dict[str, str] = {}
        for line in read_lines(path):
            generated = manifest.get(str(line.get("job_id")))
            if generated is None:
                continue
            digest = digests.setdefault(line["job_id"], generation_digest(generated))
            if line.get("generation") == digest:
                records[line["job_id"]] = without_scores(generated) | {k: line[k] for k in SCORE_FIELDS if k in line}
    return records


def generation_digest(record: Mapping[str, Any]) -> str:
    """Identifies one generation of a job: its manifest record without scores."""
    text = json.dumps(without_scores(record), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def without_scores(record: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in SCORE_FIELDS}


def _read_suite(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(content["suite"]["loras"], dict) or not isinstance(content["jobs"], list):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a bench run file; rerun the suite's bench command to rewrite it") from None
    return content
