"""The LoRA panel's data: library files, uploaded files, and the table the user edits.

A session's :class:`LoraCatalog` maps each adapter name to a checked file on the server. The table
in the page only carries adapter names, weights and trigger words: a file path never comes from
the browser, so a client cannot make the server read a file it was not offered.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from loracompose.errors import UserError
from loracompose.library import PICKLED_SUFFIXES, library_files, library_root
from loracompose.lora import ARCHITECTURE_NAMES, LoraSpec, adapter_name_for, check_lora_tensors, inspect_lora
from loracompose.outputs import file_sha256

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024**2
TABLE_HEADERS = ["use", "LoRA", "weight", "trigger words", "category", "base model", "source", "display name", "kind"]
TABLE_TYPES: list[Literal["bool", "str", "number"]] = ["bool", "str", "number", "str", "str", "str", "str", "str",
                                                       "str"]
READ_ONLY_COLUMNS = [1, 4, 5, 6, 7, 8]
METADATA_VALUE_CHARS = 200


@dataclass(frozen=True)
class LoraEntry:
    """A checked LoRA file the session may use, under a unique adapter name."""

    name: str
    path: Path
    trigger_words: tuple[str, ...]
    category: str | None
    architecture: str | None
    source: str
    metadata: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    display_name: str = ""  # kohya's ss_output_name (else modelspec.title, else the adapter name)
    kinds: tuple[str, ...] = ()  # LoRA, LoCon, LoHa, LoKr, DoRA (from the file's tensor names and shapes)

    def table_row(self, use: bool, weight: float = 1.0, trigger_words: str | None = None) -> list[Any]:
        """This LoRA as a row of the table (``TABLE_HEADERS``)."""
        triggers = ", ".join(self.trigger_words) if trigger_words is None else trigger_words
        base = ARCHITECTURE_NAMES.get(self.architecture or "", "unknown")
        return [use, self.name, weight, triggers, self.category or "", base, self.source,
                self.display_name or self.name, ", ".join(self.kinds)]

    def details(self) -> dict[str, Any]:
        """File, category and metadata for the details box (long metadata values shortened)."""
        return {
            "name": self.name,
            "file": self.path.name,
            "source": self.source,
            "display_name": self.display_name or self.name,
            "kinds": list(self.kinds),
            "category": self.category,
            "trigger_words": list(self.trigger_words),
            "metadata": {key: _shorten(value) for key, value in sorted(self.metadata.items())},
        }


def _shorten(value: str) -> str:
    return value if len(value) <= METADATA_VALUE_CHARS else value[:METADATA_VALUE_CHARS] + "..."


def describe_lora_file(path: Path, name: str, source: str) -> LoraEntry:
    """Check a LoRA file (header only) and describe it; raises UserError for a bad file."""
    lora = inspect_lora(LoraSpec(path, name=name))
    return LoraEntry(lora.name, lora.path, lora.trigger_words, lora.category, lora.architecture, source,
                     dict(lora.metadata), lora.display_name, _kinds(lora.path))


def _kinds(path: Path) -> tuple[str, ...]:
    """The file's LoRA kinds from its header (tensor names and shapes; no tensor is read)."""
    from safetensors import safe_open

    from loracompose.formats.keys import kinds_from_shapes

    with safe_open(str(path), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    return kinds_from_shapes(shapes)


class LoraCatalog:
    """The LoRAs one session may use, by adapter name, in the order they were added."""

    def __init__(self, entries: Iterable[LoraEntry] = ()):
        self.entries: dict[str, LoraEntry] = {}
        for entry in entries:
            self.add(entry)

    def free_name(self, wanted: str) -> str:
        """``wanted``, or ``wanted_2``, ``wanted_3``... if a LoRA of this session has that name."""
        name, counter = wanted, 1
        while name in self.entries:
            counter += 1
            name = f"{wanted}_{counter}"
        return name

    def add(self, entry: LoraEntry) -> LoraEntry:
        """Add an entry (renamed if its name is taken by another file); the same file is kept once."""
        for existing in self.entries.values():
            if existing.path == entry.path:
                return existing
        entry = replace(entry, name=self.free_name(entry.name))
        self.entries[entry.name] = entry
        return entry

    def get(self, name: str) -> LoraEntry:
        if name not in self.entries:
            raise UserError(f"LoRA {name!r} is not in the library or this session's uploads; reload the page")
        return self.entries[name]

    def table(self, selected: Sequence[str] = ()) -> list[list[Any]]:
        """Every LoRA as a table row, ticked when its name is in ``selected``."""
        return [entry.table_row(entry.name in selected) for entry in self.entries.values()]


def scan_library(folder: Path | None) -> list[LoraEntry]:
    """The valid ``.safetensors`` LoRAs under ``folder``, found as ``loracompose library`` finds them
    (recursively, hidden names skipped); bad and pickled files are logged and skipped."""
    if folder is None:
        return []
    root = library_root(folder)
    entries = []
    for path in library_files(root):
        if path.suffix.lower() in PICKLED_SUFFIXES:
            log.warning("skipping %s: a pickled format (can run code); convert it to safetensors", path)
            continue
        try:
            entries.append(describe_lora_file(path, adapter_name_for(path), "library"))
        except UserError as error:
            log.warning("skipping %s: %s", path, error)
    return entries


# ------------------------------------------------------------------------------------ the table


def selected_specs(rows: Sequence[Sequence[Any]], catalog: LoraCatalog) -> list[LoraSpec]:
    """LoRA specs of the ticked rows, in table order; names are resolved to files by the catalog."""
    specs = []
    for row in rows:
        if not row or not str(row[1] if len(row) > 1 else "").strip():
            continue  # an empty row the table widget added
        use, name, weight, triggers = (list(row) + [None] * 4)[:4]
        if not _as_bool(use):
            continue
        entry = catalog.get(str(name).strip())
        specs.append(LoraSpec(entry.path, _as_weight(weight, entry.name), entry.name,
                              split_trigger_words(triggers), entry.category))
    return specs


def table_rows(value: Any) -> list[list[Any]]:
    """Rows of a Dataframe value as it reaches an event (list of lists, dict or pandas frame)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [list(row) for row in value.get("data") or []]
    if hasattr(value, "values") and hasattr(value, "columns"):
        return [list(row) for row in value.values.tolist()]
    return [list(row) for row in value]


def split_trigger_words(text: Any) -> tuple[str, ...]:
    """``"zkx, red cloak"`` -> ``("zkx", "red cloak")``."""
    return tuple(word.strip() for word in str(text or "").split(",") if word.strip())


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "y", "x")
    return bool(value)


def _as_weight(value: Any, name: str) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise UserError(f"weight of LoRA {name!r} is {value!r}; give a number such as 0.8") from None
    if weight != weight or abs(weight) > 100:
        raise UserError(f"weight of LoRA {name!r} is {value!r}; give a number between -100 and 100")
    return weight


# ------------------------------------------------------------------------------------ uploads


def safe_file_stem(client_name: str) -> str:
    """A file stem made only of ``[0-9A-Za-z_-]`` from a name the browser sent (never a path)."""
    base = re.split(r"[\\/]", str(client_name))[-1]
    if base.lower().endswith(SAFETENSORS_SUFFIX):
        base = base[: -len(SAFETENSORS_SUFFIX)]
    stem = re.sub(r"[^0-9A-Za-z_-]+", "_", base).strip("_-")[:80]
    return stem or "lora"


class UploadStore:
    """Checked uploads under one folder: ``<folder>/<sha256[:16]>/<safe stem>.safetensors``.

    The content hash names the sub-folder, so two uploads with the same file name never clash and
    a re-upload of the same file is stored once. A file is checked in a staging file inside the
    folder and only renamed into place once its safetensors header and LoRA keys are valid.
    """

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)

    def store(self, source: Path, client_name: str) -> Path:
        """Copy an uploaded file into the store; raises UserError (and writes nothing) for a bad one."""
        shown = f"upload {safe_file_stem(client_name)!r}"
        if not str(client_name).lower().endswith(SAFETENSORS_SUFFIX):
            raise UserError(f"{shown}: only .safetensors LoRA files are accepted "
                            "(pickled .ckpt/.pt/.bin files can run code)")
        size = Path(source).stat().st_size
        if size > self.max_bytes:
            raise UserError(f"{shown}: the file is {size / 1024**2:.0f} MiB, "
                            f"over the {self.max_bytes / 1024**2:.0f} MiB upload limit")
        target = self._target(source, client_name)
        if not target.exists():
            self._check_and_place(source, target, shown)
        return target

    def _target(self, source: Path, client_name: str) -> Path:
        target = self.folder / file_sha256(source)[:16] / f"{safe_file_stem(client_name)}{SAFETENSORS_SUFFIX}"
        if not target.resolve().is_relative_to(self.folder.resolve()):
            raise UserError(f"upload {client_name!r}: refused, the name does not make a file inside the upload folder")
        return target

    def _check_and_place(self, source: Path, target: Path, shown: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.folder / f".staging-{uuid.uuid4().hex}{SAFETENSORS_SUFFIX}"
        try:
            shutil.copyfile(source, staging)
            describe_lora_file(staging, "upload", "upload")
            check_lora_tensors(staging)  # NaN or Inf: refused before it can reach the shared model
            target.parent.mkdir(exist_ok=True)
            os.replace(staging, target)
        except UserError as error:
            reason = str(error).replace(str(staging), "the file")
            raise UserError(f"{shown} refused: {reason}") from None
        finally:
            staging.unlink(missing_ok=True)


