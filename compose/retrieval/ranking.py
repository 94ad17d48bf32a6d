"""Ranking a library's LoRAs for a prompt (both tiers): cosine similarity, the trigger boost, category limits.

    score_i <- cos(e_prompt, e_i) + TRIGGER_BOOST·[a trigger word of LoRA i is in the prompt]
    walk the LoRAs by score, keep at most one character, one style and one background
    (unless limits say otherwise; trigger matches are always kept: the prompt asks for them), stop at k

``e_i`` is the text embedding of LoRA i's metadata (tier 1) or a
:class:`~loracompose.retrieval.retriever.WeightRetriever`'s embedding of its weights (tier 2).
Ranking is by cosine (per-row norms), not by dot product.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from loracompose.errors import UserError
from loracompose.library import LibraryEntry, LibraryIndex
from loracompose.retrieval.text import TextEmbedder

if TYPE_CHECKING:
    from loracompose.retrieval.retriever import WeightRetriever


TRIGGER_BOOST = 2.0  # > the whole cosine range [-1, 1]: an exact trigger match always ranks above the rest


DEFAULT_CATEGORY_LIMITS: dict[str, int] = {"character": 1, "style": 1, "background": 1}


@dataclass(frozen=True)
class RankedLora:
    """One retrieved LoRA: its entry, its final score and the parts of it."""

    entry: LibraryEntry
    score: float
    similarity: float
    trigger_match: bool

    def to_json(self) -> dict[str, Any]:
        return {"file": self.entry.file, "name": self.entry.name, "category": self.entry.category,
                "score": self.score, "similarity": self.similarity, "trigger_match": self.trigger_match}


def trigger_in_prompt(prompt: str, trigger_words: Sequence[str]) -> bool:
    """Whether one of the trigger words appears in the prompt as a whole word (case-insensitive)."""
    lowered = prompt.lower()
    # the substring test first: it is cheap and rules out almost every LoRA of a large library
    return any(word.strip() and word.lower() in lowered
               and re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, flags=re.IGNORECASE)
               for word in trigger_words)


def cosine_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of one query (dim,) with each row of keys (n, dim): per-row norms, not a global one."""
    return F.normalize(keys.float(), dim=-1) @ F.normalize(query.float().reshape(-1), dim=0)


def rank_by_similarity(prompt: str, similarities: torch.Tensor, entries: Sequence[LibraryEntry], *, top_k: int = 3,
                       category_limits: Mapping[str, int] | None = None,
                       trigger_boost: float = TRIGGER_BOOST) -> list[RankedLora]:
    """Add the trigger boost to each entry's similarity, sort, and pick up to ``top_k`` under the category limits."""
    check_top_k(top_k)
    limits = DEFAULT_CATEGORY_LIMITS if category_limits is None else category_limits
    matches = [trigger_in_prompt(prompt, entry.trigger_words) for entry in entries]
    values = similarities.tolist()
    scored = [RankedLora(entry, value + trigger_boost * match, value, match)
              for entry, value, match in zip(entries, values, matches)]
    scored.sort(key=lambda ranked: (-ranked.score, ranked.entry.file))
    return select_under_limits(scored, top_k, limits)


def select_under_limits(ranked: Sequence[RankedLora], top_k: int, limits: Mapping[str, int]) -> list[RankedLora]:
    """The best ``top_k`` with at most ``limits[category]`` LoRAs of each limited category; LoRAs whose
    trigger is in the prompt are always kept (the prompt asks for them) but count towards their limit."""
    chosen: list[RankedLora] = []
    used: dict[str, int] = {}
    for candidate in ranked:
        if len(chosen) == top_k:
            break
        category = (candidate.entry.category or "").lower()
        if category in limits and used.get(category, 0) >= limits[category] and not candidate.trigger_match:
            continue
        used[category] = used.get(category, 0) + 1
        chosen.append(candidate)
    return chosen


def check_top_k(top_k: int) -> None:
    if int(top_k) < 1:
        raise UserError(f"--top {top_k}: ask for at least 1 LoRA")


def check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("the prompt is empty; give the prompt to retrieve LoRAs for")
    return prompt.strip()


class EmbeddingCache:
    """Embeddings of library entries, computed once per (file, size, mtime, what was embedded)."""

    def __init__(self) -> None:
        self._store: dict[tuple, torch.Tensor] = {}

    def get(self, entries: Sequence[LibraryEntry], tag: str, compute) -> torch.Tensor:
        keys = [(entry.file, entry.size, entry.mtime_ns, tag) for entry in entries]
        missing = [entry for entry, key in zip(entries, keys) if key not in self._store]
        if missing:
            for entry, vector in zip(missing, compute(missing)):
                self._store[(entry.file, entry.size, entry.mtime_ns, tag)] = vector
        if not keys:
            return torch.zeros(0)
        return torch.stack([self._store[key] for key in keys])


_DEFAULT_CACHE = EmbeddingCache()


def rank_loras(prompt: str, library: LibraryIndex, embedder: TextEmbedder, *, top_k: int = 3,
               architecture: str | None = None, retriever: WeightRetriever | None = None,
               category_limits: Mapping[str, int] | None = None, trigger_boost: float = TRIGGER_BOOST,
               cache: EmbeddingCache | None = None) -> list[RankedLora]:
    """Rank the library's LoRAs for ``prompt``: tier 1 (metadata text) or, with ``retriever``, tier 2 (weights).

    Args:
        prompt: the generation prompt.
        library: from :func:`~loracompose.library.open_library`.
        embedder: text embeddings (e.g. :class:`PipelineTextEmbedder` of the base model).
        top_k: how many LoRAs to return (fewer if the library or the category limits run out).
        architecture: keep only LoRAs for this base model (``"sd15"``/``"sdxl"``; unknown ones are kept).
        retriever: a trained :class:`WeightRetriever`; None: the training-free tier.
        category_limits: most LoRAs per category; default one character, one style, one background.
        trigger_boost: added to the cosine of LoRAs whose trigger word is in the prompt.
    """
    prompt = check_prompt(prompt)
    check_top_k(top_k)
    entries = library.for_architecture(architecture)
    if not entries:
        return []
    cache = cache or _DEFAULT_CACHE
    query = embedder.embed([prompt])[0]
    if retriever is None:
        keys = cache.get(entries, f"text:{embedder.fingerprint}",
                         lambda missing: embedder.embed([entry.metadata_text() for entry in missing]))
    else:
        retriever.check_embedder(embedder, query)
        keys = cache.get(entries, f"weights:{retriever.fingerprint}",
                         lambda missing: retriever.embed_files([library.path_of(entry) for entry in missing]))
    return rank_by_similarity(prompt, cosine_scores(query, keys), entries, top_k=top_k,
                              category_limits=category_limits, trigger_boost=trigger_boost)
