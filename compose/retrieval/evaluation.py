"""recall@k of a retriever on held-out prompts, against the chance level of a random ranking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from loracompose.errors import UserError
from loracompose.library import LibraryIndex
from loracompose.retrieval.retriever import WeightRetriever
from loracompose.retrieval.text import TextEmbedder


@dataclass(frozen=True)
class RecallReport:
    """recall@k over queries, with the chance level k/N of a random ranking."""

    recall: dict[int, float]
    chance: dict[int, float]
    queries: int
    loras: int

    def to_json(self) -> dict[str, Any]:
        return {"recall": self.recall, "chance": self.chance, "queries": self.queries, "loras": self.loras}


def recall_at_k(query_embeddings: torch.Tensor, lora_embeddings: torch.Tensor, targets: Sequence[int],
                ks: Sequence[int] = (1, 3)) -> RecallReport:
    """Fraction of queries whose target LoRA is among the k best by cosine."""
    scores = F.normalize(query_embeddings.float(), dim=-1) @ F.normalize(lora_embeddings.float(), dim=-1).T
    order = scores.argsort(dim=1, descending=True)
    target = torch.as_tensor(list(targets)).reshape(-1, 1)
    position = (order == target).float().argmax(dim=1)
    count = lora_embeddings.shape[0]
    return RecallReport({k: float((position < k).float().mean()) for k in ks}, {k: min(k, count) / count for k in ks},
                        len(targets), count)


def evaluate_retriever(retriever: WeightRetriever, library: LibraryIndex, embedder: TextEmbedder,
                       queries: Mapping[str, Sequence[str]], ks: Sequence[int] = (1, 3)) -> RecallReport:
    """recall@k of held-out prompts: ``queries`` maps a library file (relative path) to prompts meant for it."""
    entries = library.sorted_entries()
    position = {entry.file: index for index, entry in enumerate(entries)}
    unknown = sorted(set(queries) - set(position))
    if unknown:
        raise UserError(f"evaluation queries name {unknown[0]!r}, which is not in the library; use library file names")
    prompts = [(prompt, position[file]) for file, texts in queries.items() for prompt in texts]
    lora_embeddings = retriever.embed_files([library.path_of(entry) for entry in entries])
    return recall_at_k(embedder.embed([p for p, _ in prompts]), lora_embeddings, [t for _, t in prompts], ks)
