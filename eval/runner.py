"""Run a suite's grid into a folder, resumably and shardably.

    jobs     <- suite grid (set x seed x method) -> --only filters -> first --limit -> every n-th from i (--shard i/n)
    finished <- job ids in the folder's manifests whose image exists
    for each job not finished:
        image, sidecar  <- generate; write each atomically (temp file + rename)
        manifest line   <- one write + fsync            # the job counts as done only now

A kill at any moment loses at most the job in flight; rerunning the same command finishes the
grid with every job recorded exactly once. Each job seeds its own generator from its seed, so a
resumed, reordered or sharded run gives the same images.

Layout of DIR::

    run.json                         the resolved suite and the ids of the whole grid
    manifest.jsonl                   one line per finished job (manifest.shard-I-of-N.jsonl per shard)
    images/<job id>.png, .json       the image and its sidecar (settings, versions, UNet calls, timings)
    metrics/clipscore.jsonl          scores added later by `loracompose score DIR` (scoring.py)
    results.csv, by_size.csv, summary.csv, report.html   written by `loracompose report DIR`
"""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from loracompose.errors import UserError, first_line
from loracompose.outputs import atomic_write_text, package_versions, prepare_output_dir, save_result

from . import toyworld
from .manifest import ManifestWriter, manifest_name, read_manifest
from .scoring import score_fields
from .suite import Job, Suite, select_jobs

IMAGES_DIR = "images"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class Shard:
    """Process ``index`` of ``count`` runs the jobs at positions index, index + count, ..."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UserError(f"--shard {self.index}/{self.count}: use I/N with 0 <= I < N, e.g. 0/2 and 1/2")

    @classmethod
    def parse(cls, text: str) -> Shard:
        index, sep, count = text.partition("/")
        if not sep or not index.isdigit() or not count.isdigit():
            raise UserError(f"--shard {text!r}: use I/N with 0 <= I < N, e.g. 0/2 and 1/2")
        return cls(int(index), int(count))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Shard:
        """The shard of a process started by ``accelerate launch`` / ``torchrun`` (RANK of WORLD_SIZE)."""
        world = int(environ.get("WORLD_SIZE", "1") or 1)
        return cls(int(environ.get("RANK", "0") or 0), world) if world > 1 else cls()

    def owns(self, position: int) -> bool:
        return position % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class RunOptions:
    """How to run a suite: where, which part of the grid, on which device."""

    out_dir: Path
    shard: Shard = field(default_factory=Shard)
    only: Mapping[str, Sequence[str]] | None = None
    limit: int | None = None
    device: str | None = None
    dtype: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class RunSummary:
    """What a run did: this shard's jobs, those already finished before, those run now."""

    jobs: int
    already_done: int
    ran: int
    manifest: Path


def run_suite(suite: Suite, options: RunOptions) -> RunSummary:
    """Run this shard's unfinished jobs of the suite into ``options.out_dir``."""
    out_dir = prepare_output_dir(options.out_dir)
    grid = suite.jobs()
    if options.limit is not None and options.limit < 1:
        raise UserError(f"--limit {options.limit}: give a positive number of jobs")
    selected = select_jobs(grid, options.only, options.limit)
    mine = [job for position, job in enumerate(selected) if options.shard.owns(position)]
    write_run_file(out_dir, suite, grid)
    manifest_path = out_dir / manifest_name(options.shard.index, options.shard.count)
    with ManifestWriter(manifest_path) as manifest:
        finished = finished_job_ids(out_dir)
        pending = [job for job in mine if job.id not in finished]
        if pending:
            _run_pending(suite, pending, len(mine), options, manifest)
    return RunSummary(len(mine), len(mine) - len(pending), len(pending), manifest_path)


def write_run_file(out_dir: Path, suite: Suite, grid: Sequence[Job]) -> Path:
    """``run.json``: the resolved suite and the ids of the whole grid (what the report covers)."""
    jobs = [{"id": job.id, "method": job.method.label, "set_id": job.set.id, "seed": job.seed, "n": len(job.set.loras)}
            for job in grid]
    content = {"suite": suite.describe(), "jobs": jobs, "versions": package_versions()}
    return atomic_write_text(out_dir / RUN_FILE, json.dumps(content, indent=2, default=str) + "\n")


def finished_job_ids(out_dir: Path) -> set[str]:
    """Jobs with a manifest line and their image still on disk."""
    return {job_id for job_id, record in read_manifest(out_dir).items() if (out_dir / record["image"]).is_file()}


def _run_pending(suite: Suite, pending: Sequence[Job], total: int, options: RunOptions,
                 manifest: ManifestWriter) -> None:
    from tqdm.auto import tqdm

    _check_lora_files(suite, pending)  # a missing or broken file fails before the slow model load
    device = options.device or _device_for(suite.device, options.shard)
    scorer = suite.clipscore.load(device) if suite.clipscore else None  # missing CLIP weights fail first
    pipe = _load_pipeline(suite, device, options.dtype or suite.dtype)
    bar = tqdm(total=total, initial=total - len(pending), unit="image", desc=f"bench {options.shard}",
               disable=not options.progress, file=sys.stderr, dynamic_ncols=True)
    with bar:
        for job in pending:
            record = run_job(pipe, scorer, suite, job, options.out_dir)
            manifest.append(record | {"shard": str(options.shard)})
            bar.update(1)


def run_job(pipe: Any, scorer: Any, suite: Suite, job: Job, out_dir: Path) -> dict[str, Any]:
    """Generate one job's image, write it with its sidecar, and return its manifest record."""
    _remove_stale_temp_files(Path(out_dir) / IMAGES_DIR, job.id)
    method = job.method.build(job.set)
    specs = [lora.spec() for lora in suite.set_loras(job.set)]
    result = pipe.generate(
        job.set.prompt, specs, method, negative_prompt=suite.negative_prompt, seed=job.seed, steps=suite.steps,
        guidance_scale=suite.guidance, width=suite.width, height=suite.height, scheduler=suite.scheduler,
        append_triggers=suite.append_triggers, text_encoder_loras=suite.text_encoder_loras, show_progress=False,
        lora_dir=suite.lora_dir,
    )
    image_path = save_result(result, Path(out_dir) / IMAGES_DIR, job.id, suite.model)[0]
    for path in (image_path, image_path.with_suffix(".json")):  # on disk before the manifest says "done"
        _fsync(path)
    record = job_record(suite, job, result, image_path.relative_to(out_dir))
    if scorer is not None:
        record |= clip_fields(scorer, suite, job, result)
    if suite.detector == toyworld.DETECTOR:
        record |= toyworld.detect_concepts(result.images[0], [lora.name for lora in suite.set_loras(job.set)])
    return record


def job_record(suite: Suite, job: Job, result: Any, image: Path) -> dict[str, Any]:
    """The manifest line of a finished job (paths relative to the run folder)."""
    loras = suite.set_loras(job.set)
    return {
        "job_id": job.id, "method": job.method.label, "method_name": job.method.name,
        "method_settings": result.method, "set_id": job.set.id, "loras": [lora.name for lora in loras],
        "categories": [lora.category for lora in loras], "n": len(loras), "seed": job.seed,
        "prompt": result.prompt, "image": image.as_posix(), "sidecar": image.with_suffix(".json").as_posix(),
        **{key: result.settings[key] for key in ("width", "height", "steps", "guidance_scale", "scheduler")},
        "stats": result.stats.to_dict(), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def clip_fields(scorer: Any, suite: Suite, job: Job, result: Any) -> dict[str, Any]:
    """CLIPScore of the job's image under the scorer's convention, and per-concept similarity
    (the same fields ``loracompose score`` adds later)."""
    if suite.clipscore is None:  # the runner makes a scorer only for suites with a clipscore section
        raise ValueError("clip_fields: the suite has no clipscore settings")
    references = {lora.name: lora.references for lora in suite.set_loras(job.set)}
    return score_fields(scorer, result.images[0], result.prompt, suite.trigger_words(job.set), references,
                        suite.clipscore.reduce)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _remove_stale_temp_files(images_dir: Path, job_id: str) -> None:
    """Temp files a killed earlier attempt at this job left (only this process runs this job)."""
    for path in images_dir.glob(f".{glob.escape(job_id)}.*.tmp"):
        path.unlink(missing_ok=True)


def _check_lora_files(suite: Suite, jobs: Sequence[Job]) -> None:
    from loracompose.lora import inspect_loras

    names = dict.fromkeys(name for job in jobs for name in job.set.loras)
    missing = [suite.loras[name].file for name in names if not suite.loras[name].file.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"LoRA file {missing[0]}{more} not found; check the suite's LoRA paths (composlora: lora_dir)")
    inspect_loras([suite.loras[name].spec() for name in names])


def _device_for(device: str, shard: Shard) -> str:
    """``auto`` under ``accelerate launch`` means this process's GPU (LOCAL_RANK)."""
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if device == "auto" and local_rank is not None and shard.count > 1 and torch.cuda.is_available():
        return f"cuda:{int(local_rank) % torch.cuda.device_count()}"
    return device


def _load_pipeline(suite: Suite, device: str, dtype: str) -> Any:
    from loracompose.pipelines import load_pipeline

    pipe = load_pipeline(suite.model, device=device, dtype=dtype, config=suite.config)
    if suite.vae:
        pipe.vae = _load_vae(suite.vae, pipe)
    return pipe


def _load_vae(source: str, pipe: Any) -> Any:
    """A replacement VAE (ComposLoRA realistic: stabilityai/sd-vae-ft-mse), safetensors only."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(source, torch_dtype=pipe.vae.dtype, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise UserError(f"vae {source}: could not load it ({first_line(error)}); download it first or give a local "
                        "diffusers VAE folder") from None
    return vae.to(pipe.device)
