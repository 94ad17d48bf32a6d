"""What kind of concept a LoRA teaches, and whether it belongs to a region or to the whole image.

    kind <- the user's override for this LoRA (``kinds={"name": "object"}``, ``--kind NAME=object``)
            else its category: the spec's (library index entries fill it), else the file's metadata
            (``loracompose.category``, ``modelspec.category``), else the library index beside the file
    local  kinds (object, character, clothing): one thing somewhere in the image -> a region
    global kinds (style, background): the whole image

Categories found in the wild are mapped onto the five kinds (``vehicle`` -> object, ``outfit`` ->
clothing, ``scenery`` -> background, ...); a category none of these covers leaves the kind unknown,
and the method decides (``auto`` treats an unknown kind as local when its trigger words are in
the prompt).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from loracompose.errors import UserError
from loracompose.lora import LoadedLora

OBJECT, CHARACTER, CLOTHING, STYLE, BACKGROUND = "object", "character", "clothing", "style", "background"
LOCAL_KINDS = (OBJECT, CHARACTER, CLOTHING)
GLOBAL_KINDS = (STYLE, BACKGROUND)
KINDS = LOCAL_KINDS + GLOBAL_KINDS

# Category words used by LoRA sites and trainers -> kind.
_SYNONYMS = {
    "objects": OBJECT, "item": OBJECT, "items": OBJECT, "vehicle": OBJECT, "vehicles": OBJECT, "animal": OBJECT,
    "animals": OBJECT, "tool": OBJECT, "tools": OBJECT, "building": OBJECT, "buildings": OBJECT, "assets": OBJECT,
    "characters": CHARACTER, "person": CHARACTER, "people": CHARACTER, "celebrity": CHARACTER, "subject": CHARACTER,
    "creature": CHARACTER,
    "clothes": CLOTHING, "outfit": CLOTHING, "outfits": CLOTHING, "costume": CLOTHING, "garment": CLOTHING,
    "styles": STYLE, "art style": STYLE, "artstyle": STYLE, "artist": STYLE, "aesthetic": STYLE,
    "backgrounds": BACKGROUND, "scenery": BACKGROUND, "scene": BACKGROUND, "environment": BACKGROUND,
    "location": BACKGROUND, "landscape": BACKGROUND,
}


def kind_of_category(category: str | None) -> str | None:
    """The kind a category names (case and spacing ignored), or None when it names none."""
    if not category:
        return None
    word = " ".join(category.strip().lower().replace("_", " ").split())
    return word if word in KINDS else _SYNONYMS.get(word)


def is_local(kind: str | None) -> bool:
    """Whether a concept of this kind belongs to a region (object, character, clothing)."""
    return kind in LOCAL_KINDS


def is_global_kind(category: str | None) -> bool:
    """Whether a LoRA of this category (``LoadedLora.category``, synonyms included) applies to the whole
    image: style or background."""
    return kind_of_category(category) in GLOBAL_KINDS


def check_kind(name: str, kind: str) -> str:
    """``kind`` lower-cased if it is one of :data:`KINDS`, else a one-line UserError naming ``name``."""
    normalised = str(kind).strip().lower()
    if normalised not in KINDS:
        raise UserError(f"kind {kind!r} for LoRA {name!r} is not known; use one of {'|'.join(KINDS)}")
    return normalised


def parse_kind(text: str) -> tuple[str, str]:
    """Parse the CLI form ``NAME=KIND`` into (name, kind)."""
    name, sep, kind = text.partition("=")
    if not sep or not name.strip() or not kind.strip():
        raise UserError(f"--kind {text!r}: write NAME=KIND, e.g. --kind moxel=object (kinds: {'|'.join(KINDS)})")
    return name.strip(), check_kind(name.strip(), kind)


def parse_kinds(texts: Sequence[str]) -> dict[str, str]:
    """Several ``NAME=KIND`` texts into a dict; a name given twice is an error."""
    kinds: dict[str, str] = {}
    for text in texts:
        name, kind = parse_kind(text)
        if name in kinds:
            raise UserError(f"--kind {name}: given twice; give each LoRA's kind once")
        kinds[name] = kind
    return kinds


def check_overrides(overrides: Mapping[str, str], loras: Sequence[LoadedLora]) -> dict[str, str]:
    """The overrides with checked kinds; a name that is no LoRA of the generation is an error."""
    names = [lora.name for lora in loras]
    checked = {}
    for name, kind in overrides.items():
        if name not in names:
            raise UserError(f"kind given for {name!r}, which is none of the LoRAs ({', '.join(names) or 'none'}); "
                            "use a LoRA's name (its file name without .safetensors)")
        checked[name] = check_kind(name, kind)
    return checked


def library_category(path: Path) -> str | None:
    """The category the library index next to ``path`` (in its folder or a parent) records for it.

    Reads the index file only (no scan); None when there is no index or no entry for the file.
    """
    from loracompose.library import INDEX_FILE

    resolved = Path(path).resolve()
    for folder in resolved.parents:
        index_file = folder / INDEX_FILE
        if not index_file.is_file():
            continue
        try:
            entries = json.loads(index_file.read_text(encoding="utf-8")).get("entries", {})
            entry = entries.get(resolved.relative_to(folder).as_posix())
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(entry, dict):
            return entry.get("category")
    return None


def lora_kind(lora: LoadedLora, overrides: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """(kind or None, where it came from) for one LoRA; see the module doc for the order."""
    if overrides and lora.name in overrides:
        return check_kind(lora.name, overrides[lora.name]), "override"
    if lora.category:
        kind = kind_of_category(lora.category)
        if kind is not None:
            return kind, f"category {lora.category!r}"
    indexed = library_category(lora.path)
    kind = kind_of_category(indexed)
    if kind is not None:
        return kind, f"library index category {indexed!r}"
    return None, "unknown" if not lora.category else f"category {lora.category!r} names no kind"
