"""What the front-ends call: ``generate --auto-loras``, the UI's ranking of session LoRAs, and ``retrieve``'s
listing and ``--category-limit`` option."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from loracompose.errors import UserError
from loracompose.library import LibraryIndex, entry_from_lora, open_library
from loracompose.lora import LoraSpec, inspect_lora
from loracompose.retrieval.ranking import DEFAULT_CATEGORY_LIMITS, RankedLora, check_prompt, cosine_scores, \
    rank_by_similarity, rank_loras
from loracompose.retrieval.retriever import load_retriever
from loracompose.retrieval.text import PipelineTextEmbedder


def auto_lora_specs(pipe: Any, prompt: str, library: str | Path | LibraryIndex, top_k: int, *,
                    retriever: str | Path | None = None, weight: float = 1.0,
                    category_limits: Mapping[str, int] | None = None) -> tuple[list[Any], list[RankedLora]]:
    """``generate --auto-loras K``: the top-k LoRAs of a library for the prompt, as LoraSpecs for ``pipe``.

    Ranked with the pipeline's own text encoder(s) (tier 1), or with a trained retriever file (tier 2);
    only LoRAs made for the pipeline's base model (or of unknown base) are considered.
    """
    index = library if isinstance(library, LibraryIndex) else open_library(library)
    encoder = load_retriever(retriever) if retriever is not None else None
    ranked = rank_loras(prompt, index, PipelineTextEmbedder(pipe), top_k=top_k, architecture=pipe.architecture,
                        retriever=encoder, category_limits=category_limits)
    return index.specs([item.entry for item in ranked], weight=weight), ranked


def rank_lora_files(pipe: Any, prompt: str, loras: Mapping[str, Path], top_k: int, *,
                    category_limits: Mapping[str, int] | None = None) -> list[RankedLora]:
    """Tier-1 ranking of LoRA files outside a library (the UI's session LoRAs), keyed by adapter name:
    each result's ``entry.name`` is the adapter name it was given under."""
    entries = []
    for name, path in loras.items():
        stat = Path(path).stat()
        entry = entry_from_lora(str(path), inspect_lora(LoraSpec(path, name=name)), stat.st_size, stat.st_mtime_ns)
        entries.append(replace(entry, name=name))
    if not entries:
        return []
    embedder = PipelineTextEmbedder(pipe)
    query = embedder.embed([check_prompt(prompt)])[0]
    keys = embedder.embed([entry.metadata_text() for entry in entries])
    return rank_by_similarity(prompt, cosine_scores(query, keys), entries, top_k=top_k, category_limits=category_limits)


def format_ranking(ranked: Sequence[RankedLora]) -> str:
    """``retrieve``'s output: one line per LoRA, best first: score, name, file, category, trigger mark."""
    lines = [f"{'score':>7}  {'cosine':>7}  name (file; category)"]
    for item in ranked:
        mark = "  [trigger in prompt]" if item.trigger_match else ""
        lines.append(f"{item.score:7.3f}  {item.similarity:7.3f}  {item.entry.name} ({item.entry.file}; "
                     f"{item.entry.category or 'no category'}){mark}")
    return "\n".join(lines)


def parse_category_limits(text: str | None) -> dict[str, int] | None:
    """``--category-limit character=2,style=1`` -> limits over the defaults; None: the defaults."""
    if not text:
        return None
    limits = dict(DEFAULT_CATEGORY_LIMITS)
    for part in text.split(","):
        category, sep, value = part.partition("=")
        if not sep or not category.strip() or not value.strip().isdigit():
            raise UserError(f"--category-limit {text!r}: use CATEGORY=N pairs, e.g. character=2,style=1")
        limits[category.strip().lower()] = int(value)
    return limits
