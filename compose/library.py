"""A LoRA library: a folder of LoRA files, indexed once into a small JSON file that follows changes.

    files   <- every *.safetensors under the folder (hidden files and folders skipped);
               *.ckpt/.pt/.bin are listed as corrupt (never unpickled)
    index   <- the JSON index at <folder>/.loracompose-index.json, if readable and of this format
    for each file:
        unchanged (same size and mtime as indexed)  -> keep its entry (or its corrupt record)
        new or changed                              -> read its safetensors header (no tensors):
                                                       an entry, or a corrupt record with the reason
    entries of files that are gone are dropped; the index is rewritten atomically if anything changed

An entry holds what retrieval reads: name, trigger words, category, description, training captions,
the most frequent training tags (kohya ``ss_tag_frequency``) and the base model. A corrupt or
unreadable file never stops the scan: it is collected in :attr:`LibraryIndex.corrupt` with a one-line
reason, and a corrupt index file is rebuilt from the folder.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from loracompose.errors import UserError, first_line
from loracompose.lora import ARCHITECTURE_NAMES, TITLE_KEYS, LoadedLora, LoraSpec, adapter_name_for, inspect_lora
from loracompose.outputs import atomic_write_text

log = logging.getLogger(__name__)

INDEX_FILE = ".loracompose-index.json"
INDEX_FORMAT = 1
LORA_SUFFIX = ".safetensors"
PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DESCRIPTION_KEYS = ("loracompose.description", "modelspec.description")
CAPTIONS_KEY = "loracompose.captions"  # JSON list of extra captions (retriever training targets)
TAG_FREQUENCY_KEY = "ss_tag_frequency"
TOP_TAGS = 10


@dataclass(frozen=True)
class LibraryEntry:
    """One readable LoRA file of the library, as the index stores it."""

    file: str  # path relative to the library folder, POSIX separators
    name: str
    trigger_words: tuple[str, ...]
    category: str | None
    description: str
    captions: tuple[str, ...]
    tags: tuple[str, ...]
    architecture: str | None
    size: int
    mtime_ns: int

    def metadata_text(self) -> str:
        """The text retrieval embeds for this LoRA: name, triggers, category, description, tags."""
        parts = [self.name, ", ".join(self.trigger_words), self.category or "", self.description, ", ".join(self.tags)]
        return ". ".join(part.strip() for part in parts if part and part.strip())

    def training_captions(self) -> tuple[str, ...]:
        """What the weight retriever is trained to match: the description and the captions (else the metadata text)."""
        captions = tuple(text for text in (self.description, *self.captions) if text.strip())
        return captions or (self.metadata_text(),)

    def spec(self, root: Path, weight: float = 1.0) -> LoraSpec:
        return LoraSpec(root / self.file, weight=weight, trigger_words=self.trigger_words, category=self.category)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LibraryEntry:
        values = dict(data)
        for key in ("trigger_words", "captions", "tags"):
            values[key] = tuple(values.get(key) or ())
        return cls(**values)


@dataclass(frozen=True)
class CorruptEntry:
    """A library file that could not be indexed, and why (kept so an unchanged bad file is not re-read)."""

    file: str
    reason: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class IndexChanges:
    """What the last :func:`open_library` scan changed in the index (file names relative to the folder)."""

    added: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    rebuilt: bool = False  # the index file was missing, unreadable or of another format

    @property
    def any(self) -> bool:
        return bool(self.added or self.updated or self.removed or self.rebuilt)


@dataclass
class LibraryIndex:
    """The indexed library: its readable entries, its corrupt files, and the last scan's changes."""

    root: Path
    index_path: Path
    entries: dict[str, LibraryEntry] = field(default_factory=dict)
    corrupt: dict[str, CorruptEntry] = field(default_factory=dict)
    changes: IndexChanges = field(default_factory=IndexChanges)

    def __len__(self) -> int:
        return len(self.entries)

    def sorted_entries(self) -> list[LibraryEntry]:
        return [self.entries[key] for key in sorted(self.entries)]

    def for_architecture(self, architecture: str | None) -> list[LibraryEntry]:
        """Entries usable on this base model (``None``: all); files of unknown base model are kept."""
        return [entry for entry in self.sorted_entries()
                if architecture is None or entry.architecture in (None, architecture)]

    def path_of(self, entry: LibraryEntry) -> Path:
        return self.root / entry.file

    def specs(self, entries: Sequence[LibraryEntry], weight: float = 1.0) -> list[LoraSpec]:
        """LoRA specs for ``entries`` with unique adapter names (files in different folders may share a name)."""
        specs, used = [], set()
        for entry in entries:
            name = base = adapter_name_for(Path(entry.file))
            suffix = 2
            while name in used:
                name, suffix = f"{base}_{suffix}", suffix + 1
            used.add(name)
            specs.append(LoraSpec(self.root / entry.file, weight=weight, name=name, trigger_words=entry.trigger_words,
                                  category=entry.category))
        return specs

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "entries": {key: self.entries[key].to_json() for key in sorted(self.entries)},
            "corrupt": {key: asdict(self.corrupt[key]) for key in sorted(self.corrupt)},
        }


# ------------------------------------------------------------------------------------ scanning


def open_library(folder: str | Path, *, index_path: str | Path | None = None, write: bool = True) -> LibraryIndex:
    """Scan ``folder`` and bring its index up to date (see the module docstring).

    Args:
        folder: the library folder (searched recursively).
        index_path: where the JSON index lives; default ``<folder>/.loracompose-index.json``.
        write: rewrite the index file when the scan changed it (False: read-only use).
    """
    root = library_root(folder)
    index_file = Path(index_path) if index_path is not None else root / INDEX_FILE
    previous, rebuilt = read_index(index_file)
    current = LibraryIndex(root, index_file)
    added: list[str] = []
    updated: list[str] = []
    for path in library_files(root):
        key = path.relative_to(root).as_posix()
        stat = path.stat()
        known = previous.entries.get(key) or previous.corrupt.get(key)
        if known is not None and (known.size, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            _keep(current, key, known)
            continue
        (updated if known is not None else added).append(key)
        _keep(current, key, index_file_entry(root, path, stat.st_size, stat.st_mtime_ns))
    removed = sorted((set(previous.entries) | set(previous.corrupt)) - set(current.entries) - set(current.corrupt))
    current.changes = IndexChanges(tuple(added), tuple(updated), tuple(removed), rebuilt)
    if write and (current.changes.any or not index_file.exists()):
        write_index(current)
    return current


def library_root(folder: str | Path) -> Path:
    """``folder`` resolved, or UserError when it is missing or a file."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise UserError(f"--library {root}: folder not found; give the folder that holds your LoRA files")
    if not root.is_dir():
        raise UserError(f"--library {root} is a file; give the folder that holds your LoRA files")
    return root.resolve()


def library_files(root: Path) -> list[Path]:
    """LoRA candidates under ``root``: safetensors and pickled checkpoints, skipping hidden names."""
    suffixes = (LORA_SUFFIX, *PICKLED_SUFFIXES)
    found = [path for path in root.rglob("*")
             if path.suffix.lower() in suffixes and path.is_file()
             and not any(part.startswith(".") for part in path.relative_to(root).parts)]
    return sorted(found)


def _keep(index: LibraryIndex, key: str, entry: LibraryEntry | CorruptEntry) -> None:
    if isinstance(entry, LibraryEntry):
        index.entries[key] = entry
    else:
        index.corrupt[key] = entry


def index_file_entry(root: Path, path: Path, size: int, mtime_ns: int) -> LibraryEntry | CorruptEntry:
    """Read one file's header into an entry; any failure becomes a corrupt record, never an exception."""
    key = path.relative_to(root).as_posix()
    if path.suffix.lower() in PICKLED_SUFFIXES:
        return CorruptEntry(key, f"{path.suffix} is a pickled format (can run code); convert it to safetensors",
                            size, mtime_ns)
    try:
        lora = inspect_lora(LoraSpec(path))
    except UserError as error:
        return CorruptEntry(key, str(error), size, mtime_ns)
    except Exception as error:  # a library scan must survive any bad file
        return CorruptEntry(key, f"unreadable ({type(error).__name__}: {first_line(error)})",
                            size, mtime_ns)
    return entry_from_lora(key, lora, size, mtime_ns)


def entry_from_lora(key: str, lora: LoadedLora, size: int, mtime_ns: int) -> LibraryEntry:
    metadata = lora.metadata
    name = next((metadata[k] for k in TITLE_KEYS if metadata.get(k)), None) or Path(key).stem
    description = next((metadata[k] for k in DESCRIPTION_KEYS if metadata.get(k)), "")
    return LibraryEntry(
        file=key, name=name, trigger_words=lora.trigger_words, category=(lora.category or None),
        description=description.strip(), captions=_captions(metadata.get(CAPTIONS_KEY)),
        tags=frequent_tags(metadata.get(TAG_FREQUENCY_KEY)), architecture=lora.architecture, size=size,
        mtime_ns=mtime_ns,
    )


def _captions(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return (value.strip(),)
    items = parsed if isinstance(parsed, list) else [parsed]
    return tuple(str(item).strip() for item in items if str(item).strip())


def frequent_tags(value: str | None, count: int = TOP_TAGS) -> tuple[str, ...]:
    """The ``count`` most frequent tags of kohya's ``ss_tag_frequency`` ({folder: {tag: n}}), summed over folders."""
    if not value:
        return ()
    try:
        folders = json.loads(value)
    except json.JSONDecodeError:
        return ()
    totals: dict[str, int] = {}
    for tags in (folders.values() if isinstance(folders, dict) else []):
        for tag, number in (tags.items() if isinstance(tags, dict) else []):
            tag = re.sub(r"\s+", " ", str(tag)).strip()
            if tag and isinstance(number, (int, float)):
                totals[tag] = totals.get(tag, 0) + int(number)
    return tuple(tag for tag, _ in sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:count])


# ------------------------------------------------------------------------------------ the index file


def read_index(index_file: Path) -> tuple[LibraryIndex, bool]:
    """The stored index (empty if missing or unusable) and whether it must be rebuilt."""
    empty = LibraryIndex(index_file.parent, index_file)
    if not index_file.exists():
        return empty, True
    try:
        data = json.loads(index_file.read_text(encoding="utf-8"))
        if data.get("format") != INDEX_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {INDEX_FORMAT}")
        entries = {key: LibraryEntry.from_json(value) for key, value in data["entries"].items()}
        corrupt = {key: CorruptEntry(**value) for key, value in data["corrupt"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning("LoRA library index %s is unreadable (%s); rebuilding it from the folder", index_file, error)
        return empty, True
    return LibraryIndex(index_file.parent, index_file, entries, corrupt), False


def write_index(index: LibraryIndex) -> Path | None:
    """Write the index atomically (never half-written). The index is a cache: if it cannot be written
    (a read-only library), the scan's result is still used and the next scan reads the files again."""
    try:
        index.index_path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(index.index_path, json.dumps(index.to_json(), indent=1) + "\n")
    except OSError as error:
        log.warning("cannot write the LoRA library index %s (%s); continuing without it: make the folder "
                    "writable or give another index file", index.index_path, error.strerror)
        return None


def describe_entry(entry: LibraryEntry) -> str:
    """One line for listings: name, file, category, base model, triggers."""
    base = ARCHITECTURE_NAMES.get(entry.architecture or "", "unknown base")
    triggers = ", ".join(entry.trigger_words) or "no triggers"
    return f"{entry.name} ({entry.file}; {entry.category or 'no category'}; {base}; {triggers})"
