"""Reports of a benchmark run, rendered from its manifest alone.

    results.csv   one row per finished job of the run's grid (the manifest, flattened)
    summary.csv   one row per method: jobs done / planned, mean CLIPScore under the run's
                  convention, mean concept similarity, mean UNet calls and rows, wall time
    report.html   the summary, CLIPScore per method and set size, and a thumbnail grid
                  (sets x methods), self-contained: images are inlined as data: URIs

Only jobs of the run's current grid (``run.json``) are reported; lines left by an earlier,
different suite in the same folder are counted and left out.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from PIL import Image

from loracompose.errors import UserError
from loracompose.outputs import atomic_write, atomic_write_text

from .clipscore import ClipConvention
from .manifest import read_manifest
from .runner import RUN_FILE

RESULT_COLUMNS = (
    "job_id", "method", "method_name", "set_id", "n", "loras", "seed", "clipscore", "clip_cosine",
    "unet_calls", "unet_rows", "partial_unet_calls", "wall_seconds", "peak_memory_bytes", "image", "prompt",
    "concept_similarity",
)
SUMMARY_COLUMNS = (
    "method", "jobs", "planned", "clipscore_mean", "concept_similarity_mean", "unet_calls_mean", "unet_rows_mean",
    "wall_seconds_mean", "wall_seconds_total",
)
THUMBNAIL_SIZE = 128
DEFAULT_MAX_THUMBNAILS = 240


@dataclass(frozen=True)
class RunData:
    """A run's finished records (grid order), its planned job ids, and what was left out."""

    run_dir: Path
    records: list[dict[str, Any]]
    planned: list[dict[str, Any]]
    stale: int
    convention: ClipConvention | None
    other_convention: int


@dataclass(frozen=True)
class ReportFiles:
    results_csv: Path
    summary_csv: Path
    html: Path


def write_report(run_dir: str | Path, *, max_thumbnails: int = DEFAULT_MAX_THUMBNAILS) -> ReportFiles:
    """Write results.csv, summary.csv and report.html into the run folder."""
    data = load_run(run_dir)
    summary = summarise(data)
    results_csv = _write_csv(data.run_dir / "results.csv", RESULT_COLUMNS, [result_row(r) for r in data.records])
    summary_csv = _write_csv(data.run_dir / "summary.csv", SUMMARY_COLUMNS, summary)
    page = render_html(data, summary, max_thumbnails)
    return ReportFiles(results_csv, summary_csv, atomic_write_text(data.run_dir / "report.html", page))


def load_run(run_dir: str | Path) -> RunData:
    """The finished records of the run's grid, read from its manifests."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"bench report {run_dir}: not a folder; give the --out folder of a bench run")
    records = read_manifest(run_dir)
    if not records and not (run_dir / RUN_FILE).exists():
        raise UserError(f"bench report {run_dir}: no manifest*.jsonl or run.json here; give the --out folder of a bench run")
    planned = _planned_jobs(run_dir) or [{"id": job_id, "method": r["method"]} for job_id, r in records.items()]
    current = [records[job["id"]] for job in planned if job["id"] in records]
    convention, other = _common_convention(current)
    return RunData(run_dir, current, planned, len(records) - len(current), convention, other)


def _planned_jobs(run_dir: Path) -> list[dict[str, Any]]:
    """The grid written to run.json: id, method label, set id, seed, N per job."""
    path = run_dir / RUN_FILE
    if not path.exists():
        return []
    try:
        jobs = json.loads(path.read_text(encoding="utf-8"))["jobs"]
        return [{"id": job["id"], "method": job["method"]} for job in jobs]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a bench run file; rerun the suite to rewrite it") from None


def _common_convention(records: Sequence[Mapping[str, Any]]) -> tuple[ClipConvention | None, int]:
    """The CLIPScore convention most records were scored under, and how many used another."""
    counts = Counter(json.dumps(r["clip"]["convention"], sort_keys=True) for r in records if "clip" in r)
    if not counts:
        return None, 0
    chosen, used = counts.most_common(1)[0]
    return ClipConvention(**json.loads(chosen)), sum(counts.values()) - used


def _scored_under(record: Mapping[str, Any], convention: ClipConvention | None) -> bool:
    return convention is not None and "clip" in record and record["clip"]["convention"] == convention.to_dict()


# ------------------------------------------------------------------------------------ tables


def result_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest record flattened to the results.csv columns."""
    stats = record.get("stats", {})
    return {
        "job_id": record["job_id"], "method": record["method"], "method_name": record.get("method_name"),
        "set_id": record["set_id"], "n": record["n"], "loras": "+".join(record["loras"]), "seed": record["seed"],
        "clipscore": record.get("clipscore"), "clip_cosine": record.get("clip_cosine"),
        **{key: stats.get(key) for key in ("unet_calls", "unet_rows", "partial_unet_calls", "wall_seconds", "peak_memory_bytes")},
        "image": record["image"], "prompt": record["prompt"],
        "concept_similarity": json.dumps(record["concept_similarity"], sort_keys=True) if "concept_similarity" in record else None,
    }


def summarise(data: RunData) -> list[dict[str, Any]]:
    """One row per method (in grid order) with its means."""
    planned = Counter(job["method"] for job in data.planned)
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in data.records:
        by_method[record["method"]].append(record)
    methods = list(dict.fromkeys([*(job["method"] for job in data.planned), *by_method]))
    return [_method_row(method, by_method.get(method, []), planned.get(method, 0), data.convention) for method in methods]


def _method_row(method: str, records: Sequence[Mapping[str, Any]], planned: int, convention: ClipConvention | None) -> dict[str, Any]:
    scores = [r["clipscore"] for r in records if _scored_under(r, convention)]
    concept = [value for r in records for value in r.get("concept_similarity", {}).values()]
    walls = [r["stats"]["wall_seconds"] for r in records]
    return {
        "method": method, "jobs": len(records), "planned": planned,
        "clipscore_mean": convention.aggregate(scores) if scores else None,
        "concept_similarity_mean": _mean(concept), "unet_calls_mean": _mean(r["stats"]["unet_calls"] for r in records),
        "unet_rows_mean": _mean(r["stats"]["unet_rows"] for r in records), "wall_seconds_mean": _mean(walls),
        "wall_seconds_total": math.fsum(walls) if walls else None,
    }


def clipscore_by_size(data: RunData) -> dict[str, dict[int, float]]:
    """method -> set size N -> mean CLIPScore under the run's convention."""
    groups: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in data.records:
        if _scored_under(record, data.convention):
            groups[record["method"]][record["n"]].append(record["clipscore"])
    return {method: {n: data.convention.aggregate(scores) for n, scores in sorted(sizes.items())}
            for method, sizes in groups.items()}


def _mean(values: Iterable[float]) -> float | None:
    values = [float(v) for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    def write(temp: Path) -> None:
        with open(temp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows({key: "" if row.get(key) is None else row[key] for key in columns} for row in rows)

    return atomic_write(path, write)


# ------------------------------------------------------------------------------------ HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 0; } figcaption { font-size: 11px; color: #555; }
.note { color: #666; font-size: 13px; }
"""


def render_html(data: RunData, summary: Sequence[Mapping[str, Any]], max_thumbnails: int) -> str:
    """The self-contained HTML report."""
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>loracompose bench: {html.escape(data.run_dir.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>loracompose bench: {html.escape(data.run_dir.name)}</h1>",
        _notes(data), "<h2>Per method</h2>", _summary_table(summary),
    ]
    by_size = clipscore_by_size(data)
    if by_size:
        parts += ["<h2>CLIPScore by set size</h2>", _size_table(by_size)]
    parts += ["<h2>Images</h2>", _thumbnail_grid(data, max_thumbnails), "</body></html>"]
    return "\n".join(parts) + "\n"


def _notes(data: RunData) -> str:
    notes = [f"{len(data.records)} of {len(data.planned)} planned jobs finished."]
    if data.convention is not None:
        notes.append(f"CLIPScore convention: {html.escape(json.dumps(data.convention.to_dict()))}.")
    else:
        notes.append("No CLIPScore in this run (add a clipscore: section to the suite).")
    if data.other_convention:
        notes.append(f"{data.other_convention} jobs scored under another convention are left out of the means.")
    if data.stale:
        notes.append(f"{data.stale} manifest lines of an earlier, different grid are left out.")
    return "".join(f'<p class="note">{note}</p>' for note in notes)


def _cell(value: Any) -> str:
    if value is None:
        return "&mdash;"
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:.1f}"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_table(summary: Sequence[Mapping[str, Any]]) -> str:
    header = ["method", "jobs", "planned", "CLIPScore", "concept sim.", "UNet calls", "UNet rows", "wall s (mean)", "wall s (total)"]
    return _table(header, ([row[key] for key in SUMMARY_COLUMNS] for row in summary))


def _size_table(by_size: Mapping[str, Mapping[int, float]]) -> str:
    sizes = sorted({n for values in by_size.values() for n in values})
    rows = ([method, *(values.get(n) for n in sizes)] for method, values in by_size.items())
    return _table(["method", *(f"N = {n}" for n in sizes)], rows)


def _thumbnail_grid(data: RunData, max_thumbnails: int) -> str:
    methods = list(dict.fromkeys(r["method"] for r in data.records))
    rows: dict[tuple[str, int], dict[str, Mapping[str, Any]]] = defaultdict(dict)
    for record in data.records:
        rows[(record["set_id"], record["seed"])][record["method"]] = record
    if not methods:
        return '<p class="note">No finished jobs yet.</p>'
    shown = list(rows.items())[: max(1, max_thumbnails // len(methods))]
    body = [_thumbnail_row(key, cells, methods, data.run_dir) for key, cells in shown]
    note = f'<p class="note">Showing {len(shown)} of {len(rows)} set/seed rows.</p>' if len(shown) < len(rows) else ""
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    return f"{note}<table><thead><tr><th>set / seed</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _thumbnail_row(key: tuple[str, int], cells: Mapping[str, Mapping[str, Any]], methods: Sequence[str], run_dir: Path) -> str:
    set_id, seed = key
    tds = []
    for method in methods:
        record = cells.get(method)
        if record is None:
            tds.append("<td>&mdash;</td>")
            continue
        caption = "" if record.get("clipscore") is None else f"CLIPScore {record['clipscore']:.2f}"
        alt = html.escape(f"{method} {set_id} seed {seed}", quote=True)
        tds.append(f'<td><figure><img src="{thumbnail_uri(run_dir / record["image"])}" alt="{alt}">'
                   f"<figcaption>{caption}</figcaption></figure></td>")
    return f"<tr><td>{html.escape(set_id.replace('+', ' + '))}<br>seed {seed}</td>{''.join(tds)}</tr>"


def thumbnail_uri(path: Path) -> str:
    """A small JPEG of the image as a data: URI (an empty gif if the file is gone)."""
    try:
        with Image.open(path) as image:
            thumbnail = image.convert("RGB")
            thumbnail.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    except (OSError, ValueError):
        return "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
