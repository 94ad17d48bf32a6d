"""Reports of a benchmark run, rendered from its manifest (and the scores `loracompose score` added).

    results.csv   one row per finished job of the run's grid (the manifest, flattened)
    by_size.csv   one row per method x set size N: means of CLIPScore, concept similarity, UNet
                  calls and wall time, with 95% Student t intervals (confidence.py)
    summary.csv   one row per method: jobs done / planned, mean CLIPScore under the run's
                  convention, mean concept similarity, mean UNet calls and rows, wall time
    report.html   the summary, the method x N table, plots of CLIPScore, time and UNet calls
                  against N (matplotlib), and a thumbnail grid (sets x methods); self-contained:
                  images and plots are inlined as data: URIs

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

from .clipscore import ClipConvention, same_setup
from .confidence import CONFIDENCE, mean_interval
from .plots import require_matplotlib, size_plot
from .runner import RUN_FILE
from .scoring import read_records

RESULT_COLUMNS = (
    "job_id", "method", "method_name", "set_id", "n", "loras", "seed", "clipscore", "clip_cosine",
    "unet_calls", "unet_rows", "partial_unet_calls", "wall_seconds", "peak_memory_bytes", "image", "prompt",
    "concept_similarity", "all_present", "concepts_present",
)
BY_SIZE_COLUMNS = (
    "method", "n", "jobs", "scored", "clipscore_mean", "clipscore_ci_low", "clipscore_ci_high",
    "all_present_pct_mean", "all_present_pct_ci_low", "all_present_pct_ci_high",
    "concept_similarity_mean", "concept_similarity_ci_low", "concept_similarity_ci_high",
    "unet_calls_mean", "unet_calls_ci_low", "unet_calls_ci_high",
    "wall_seconds_mean", "wall_seconds_ci_low", "wall_seconds_ci_high",
)
SUMMARY_COLUMNS = (
    "method", "jobs", "planned", "clipscore_mean", "concept_similarity_mean", "all_present_pct_mean",
    "unet_calls_mean", "unet_rows_mean", "wall_seconds_mean", "wall_seconds_total",
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
    clip: Mapping[str, Any] | None  # the CLIP setup (model, weights, convention) most jobs were scored under
    other_setup: int  # jobs scored under another setup, left out of the means


@dataclass(frozen=True)
class ReportFiles:
    results_csv: Path
    summary_csv: Path
    html: Path
    by_size_csv: Path
    presence_md: Path | None = None  # runs judged by the toy-world detector


def write_report(run_dir: str | Path, *, max_thumbnails: int = DEFAULT_MAX_THUMBNAILS) -> ReportFiles:
    """Write results.csv, by_size.csv, summary.csv and report.html into the run folder."""
    require_matplotlib()
    data = load_run(run_dir)
    summary = summarise(data)
    by_size = summarise_by_size(data)
    results_csv = _write_csv(data.run_dir / "results.csv", RESULT_COLUMNS, [result_row(r) for r in data.records])
    by_size_csv = _write_csv(data.run_dir / "by_size.csv", BY_SIZE_COLUMNS, by_size)
    summary_csv = _write_csv(data.run_dir / "summary.csv", SUMMARY_COLUMNS, summary)
    concepts = summarise_concepts(data)
    page = render_html(data, summary, by_size, max_thumbnails, concepts)
    presence = presence_markdown(by_size, concepts)
    presence_md = atomic_write_text(data.run_dir / "presence.md", presence) if presence else None
    return ReportFiles(results_csv, summary_csv, atomic_write_text(data.run_dir / "report.html", page), by_size_csv,
                       presence_md)


def presence_markdown(by_size: Sequence[Mapping[str, Any]], concepts: Sequence[Mapping[str, Any]]) -> str:
    """Markdown tables of "all concepts present %" per method and N (95% intervals), then per concept;
    empty for runs without detector judgements."""
    rows = [row for row in by_size if row.get("all_present_pct_mean") is not None]
    if not rows:
        return ""
    sizes = sorted({row["n"] for row in rows})
    methods = list(dict.fromkeys(row["method"] for row in rows))
    cell = {(row["method"], row["n"]): row for row in rows}
    lines = ["| method | " + " | ".join(f"N={n}: all present % [95% CI] (images)" for n in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for method in methods:
        values = [cell.get((method, n)) for n in sizes]
        lines.append(f"| {method} | " + " | ".join(_presence_cell(value) for value in values) + " |")
    names = list(dict.fromkeys(row["concept"] for row in concepts))
    share = {(row["method"], row["concept"]): row["present_pct"] for row in concepts}
    lines += ["", "| method | " + " | ".join(f"{name} present %" for name in names) + " |",
              "|---|" + "---:|" * len(names)]
    lines += [f"| {method} | " + " | ".join(f"{share[(method, name)]:.0f}" if (method, name) in share else "-"
                                             for name in names) + " |" for method in methods]
    return "\n".join(lines) + "\n"


def _presence_cell(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "-"
    low, high = row.get("all_present_pct_ci_low"), row.get("all_present_pct_ci_high")
    interval = f" [{max(low, 0):.0f}, {min(high, 100):.0f}]" if low is not None and high is not None else ""
    return f"{row['all_present_pct_mean']:.0f}{interval} ({row['jobs']})"


def load_run(run_dir: str | Path) -> RunData:
    """The finished records of the run's grid, read from its manifests, with their latest scores."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"report {run_dir}: not a folder; give the --out folder of a bench run")
    records = read_records(run_dir)
    if not records and not (run_dir / RUN_FILE).exists():
        raise UserError(f"report {run_dir}: no manifest*.jsonl or run.json here; give the --out folder of a bench run")
    planned = _planned_jobs(run_dir) or [{"id": job_id, "method": r["method"]} for job_id, r in records.items()]
    current = [records[job["id"]] for job in planned if job["id"] in records]
    clip, other = _common_setup(current)
    convention = None if clip is None else ClipConvention(**clip["convention"])
    return RunData(run_dir, current, planned, len(records) - len(current), convention, clip, other)


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


def _common_setup(records: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any] | None, int]:
    """The CLIP setup (same_setup: model, weights, convention) most records were scored under,
    and how many records were scored under another."""
    setups: list[tuple[Mapping[str, Any], int]] = []
    for record in records:
        if "clip" in record:
            index = next((i for i, (clip, _) in enumerate(setups) if same_setup(clip, record["clip"])), None)
            if index is None:
                setups.append((record["clip"], 1))
            else:
                setups[index] = (setups[index][0], setups[index][1] + 1)
    if not setups:
        return None, 0
    chosen, used = max(setups, key=lambda setup: setup[1])  # the first seen of equally common ones
    return chosen, sum(count for _, count in setups) - used


def _scored_under(record: Mapping[str, Any], clip: Mapping[str, Any] | None) -> bool:
    return clip is not None and "clip" in record and same_setup(record["clip"], clip)


# ------------------------------------------------------------------------------------ tables


def result_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest record flattened to the results.csv columns."""
    stats = record.get("stats", {})
    return {
        "job_id": record["job_id"], "method": record["method"], "method_name": record.get("method_name"),
        "set_id": record["set_id"], "n": record["n"], "loras": "+".join(record["loras"]), "seed": record["seed"],
        "clipscore": record.get("clipscore"), "clip_cosine": record.get("clip_cosine"),
        **{key: stats.get(key)
           for key in ("unet_calls", "unet_rows", "partial_unet_calls", "wall_seconds", "peak_memory_bytes")},
        "image": record["image"], "prompt": record["prompt"],
        "concept_similarity": _json_or_none(record, "concept_similarity"),
        "all_present": record.get("all_present"),
        "concepts_present": _json_or_none(record, "concepts_present"),
    }


def _json_or_none(record: Mapping[str, Any], key: str) -> str | None:
    return json.dumps(record[key], sort_keys=True) if key in record else None


def summarise(data: RunData) -> list[dict[str, Any]]:
    """One row per method (in grid order) with its means."""
    planned = Counter(job["method"] for job in data.planned)
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in data.records:
        by_method[record["method"]].append(record)
    methods = list(dict.fromkeys([*(job["method"] for job in data.planned), *by_method]))
    return [_method_row(method, by_method.get(method, []), planned.get(method, 0), data) for method in methods]


def _method_row(method: str, records: Sequence[Mapping[str, Any]], planned: int, data: RunData) -> dict[str, Any]:
    convention = data.convention
    scores = [r["clipscore"] for r in records if _scored_under(r, data.clip)]
    concept = [value for r in records for value in r.get("concept_similarity", {}).values()]
    walls = [r["stats"]["wall_seconds"] for r in records]
    return {
        "method": method, "jobs": len(records), "planned": planned,
        "clipscore_mean": convention.aggregate(scores) if scores and convention is not None else None,
        "concept_similarity_mean": _mean(concept), "all_present_pct_mean": _mean(_present_percentages(records)),
        "unet_calls_mean": _mean(r["stats"]["unet_calls"] for r in records),
        "unet_rows_mean": _mean(r["stats"]["unet_rows"] for r in records), "wall_seconds_mean": _mean(walls),
        "wall_seconds_total": math.fsum(walls) if walls else None,
    }


def summarise_by_size(data: RunData) -> list[dict[str, Any]]:
    """One row per method x set size N (N ascending, methods in grid order): means and 95% t
    intervals of CLIPScore (under the run's convention), concept similarity, UNet calls, wall time."""
    groups: dict[tuple[int, str], list[Mapping[str, Any]]] = defaultdict(list)
    for record in data.records:
        groups[(record["n"], record["method"])].append(record)
    order = list(dict.fromkeys([*(job["method"] for job in data.planned), *(r["method"] for r in data.records)]))
    rows = []
    for n, method in sorted(groups, key=lambda key: (key[0], order.index(key[1]))):
        records = groups[(n, method)]
        scores = [r["clipscore"] for r in records if _scored_under(r, data.clip)]
        row = {"method": method, "n": n, "jobs": len(records), "scored": len(scores)}
        row |= _interval_columns("clipscore", scores, data.convention)
        concept = [mean for r in records if (mean := _mean(r.get("concept_similarity", {}).values())) is not None]
        row |= _interval_columns("concept_similarity", concept)
        row |= _interval_columns("all_present_pct", _present_percentages(records))
        row |= _interval_columns("unet_calls", [r["stats"]["unet_calls"] for r in records])
        row |= _interval_columns("wall_seconds", [r["stats"]["wall_seconds"] for r in records])
        rows.append(row)
    return rows


def _present_percentages(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """100 or 0 per image the detector judged (toy-world runs): all of its set's concepts present?"""
    return [100.0 * bool(r["all_present"]) for r in records if r.get("all_present") is not None]


def summarise_concepts(data: RunData) -> list[dict[str, Any]]:
    """Per method and concept (toy-world runs): in how many % of the images holding it the concept shows."""
    counts: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for record in data.records:
        for concept, present in record.get("concepts_present", {}).items():
            counts[(record["method"], concept)].append(bool(present))
    return [{"method": method, "concept": concept, "images": len(values),
             "present_pct": 100.0 * sum(values) / len(values)}
            for (method, concept), values in counts.items()]


def _interval_columns(name: str, values: Sequence[float], convention: ClipConvention | None = None) -> dict[str, Any]:
    """``<name>_mean``, ``_ci_low``, ``_ci_high``. Under a convention that clamps the mean
    (torchmetrics), the mean and both bounds are clamped alike (a monotone map keeps the coverage)."""
    interval = mean_interval(values)
    if interval is None:
        return {f"{name}_mean": None, f"{name}_ci_low": None, f"{name}_ci_high": None}
    clamps_mean = convention is not None and convention.clamp == "mean"
    clamp = (lambda v: None if v is None else max(v, 0.0)) if clamps_mean else (lambda v: v)
    return {f"{name}_mean": clamp(interval.mean), f"{name}_ci_low": clamp(interval.low),
            f"{name}_ci_high": clamp(interval.high)}


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
td.text { text-align: left; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
.plot img { border: 1px solid #ddd; }
"""


def render_html(data: RunData, summary: Sequence[Mapping[str, Any]], by_size: Sequence[Mapping[str, Any]],
                max_thumbnails: int, concepts: Sequence[Mapping[str, Any]] = ()) -> str:
    """The self-contained HTML report (``concepts``: :func:`summarise_concepts` rows, toy-world runs)."""
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>loracompose bench: {html.escape(data.run_dir.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>loracompose bench: {html.escape(data.run_dir.name)}</h1>",
        _notes(data), "<h2>Per method</h2>", _summary_table(summary),
        "<h2>Per method and set size N</h2>", _interval_note(), _size_table(by_size), _concept_table(concepts),
        "<h2>Against set size N</h2>", _plots(by_size, data.convention),
        "<h2>Images</h2>", _thumbnail_grid(data, max_thumbnails), "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _notes(data: RunData) -> str:
    notes = [f"{len(data.records)} of {len(data.planned)} planned jobs finished."]
    if data.convention is not None:
        notes.append(f"CLIPScore convention: {html.escape(json.dumps(data.convention.to_dict()))}.")
        clip = data.clip or {}
        model, weights = (html.escape(str(clip.get(key))) for key in ("model", "weights"))
        notes.append(f"CLIP model: {model}, weights {weights}.")
    else:
        notes.append("No CLIPScore in this run: run <code>loracompose score DIR</code> "
                     "(or add a clipscore: section to the suite).")
    if data.other_setup:
        notes.append(f"{data.other_setup} jobs scored under another CLIP model, weights or convention are left out "
                     "of the means (<code>loracompose score DIR --rescore</code> scores them under one).")
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
    header = ["method", "jobs", "planned", "CLIPScore", "concept sim.", "all concepts present %", "UNet calls",
              "UNet rows", "wall s (mean)", "wall s (total)"]
    return _table(header, ([row[key] for key in SUMMARY_COLUMNS] for row in summary))


def _interval_note() -> str:
    return (f'<p class="note">Means over images with {CONFIDENCE:.0%} confidence intervals: Student t, '
            "mean &plusmn; t(0.975, n&minus;1)&middot;s/&radic;n (s: sample standard deviation; "
            "none for a single image). Concept similarity: per image, the mean over its concepts.</p>")


def _interval(row: Mapping[str, Any], name: str) -> str:
    low, high = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    return "&mdash;" if low is None or high is None else f"[{_cell(low)}, {_cell(high)}]"


def _size_table(by_size: Sequence[Mapping[str, Any]]) -> str:
    header = ["N", "method", "images", "CLIPScore", "95% CI", "concept sim.", "95% CI", "all present %", "95% CI",
              "UNet calls", "wall s", "95% CI"]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in by_size:
        cells = [_cell(row["n"]), _cell(row["method"]), _cell(row["jobs"]), _cell(row["clipscore_mean"]),
                 _interval(row, "clipscore"), _cell(row["concept_similarity_mean"]),
                 _interval(row, "concept_similarity"), _cell(row["all_present_pct_mean"]),
                 _interval(row, "all_present_pct"), _cell(row["unet_calls_mean"]), _cell(row["wall_seconds_mean"]),
                 _interval(row, "wall_seconds")]
        body.append("<tr>" + "".join(f'<td class="text">{cell}</td>' if index == 1 else f"<td>{cell}</td>"
                                     for index, cell in enumerate(cells)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _concept_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per concept and method: present %, for runs judged by the toy-world detector."""
    if not rows:
        return ""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    concepts = list(dict.fromkeys(row["concept"] for row in rows))
    value = {(row["method"], row["concept"]): row["present_pct"] for row in rows}
    return ("<h3>Each concept present (% of the images whose set holds it; toy-world detector)</h3>"
            + _table(["method", *concepts],
                     ([method, *(value.get((method, c)) for c in concepts)] for method in methods)))


def _plots(by_size: Sequence[Mapping[str, Any]], convention: ClipConvention | None) -> str:
    scale = "" if convention is None else f" (x{convention.scale:g}, {convention.text_source})"
    plots = [
        ("clipscore", "CLIPScore vs N", f"CLIPScore{scale}"),
        ("wall_seconds", "Time per image vs N", "wall seconds per image"),
        ("unet_calls", "UNet calls per image vs N", "UNet calls per image"),
    ]
    figures = []
    for metric, title, ylabel in plots:
        uri = size_plot(by_size, metric, title, ylabel)
        if uri is None:
            figures.append(f'<p class="note">{html.escape(title)}: no values.</p>')
        else:
            alt = html.escape(f"plot: {title}", quote=True)
            figures.append(f'<figure class="plot"><img src="{uri}" alt="{alt}"></figure>')
    note = '<p class="note">Error bars: 95% Student t intervals (none for a single image).</p>'
    return f'{note}<div class="plots">{"".join(figures)}</div>'


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


def _thumbnail_row(key: tuple[str, int], cells: Mapping[str, Mapping[str, Any]], methods: Sequence[str],
                   run_dir: Path) -> str:
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
