"""LoRA retrieval from a library (AutoLoRA), in two tiers.

Tier 1, training-free: the prompt's pooled text embedding against each LoRA's metadata text
(name, triggers, category, description, tags), both from the base model's text encoder(s)
(:mod:`~loracompose.retrieval.text`). Tier 2: against a learned embedding of each LoRA's weights
(:mod:`~loracompose.retrieval.retriever`, reading :mod:`~loracompose.retrieval.lora_factors`; trained
by :mod:`loracompose.training.retriever`). Both tiers rank the same way
(:mod:`~loracompose.retrieval.ranking`): cosine, a boost for trigger words in the prompt, category
limits. :mod:`~loracompose.retrieval.commands` is what the CLI and UI call;
:mod:`~loracompose.retrieval.evaluation` measures recall@k.

Departures from the released code: ranking is by cosine (the reference divides by a global norm,
which ranks by dot product); no causal mask over the layer tokens; only UNet LoRA layers are encoded
(text-encoder layers are ignored); ranks are zero-padded per layer.
"""

from loracompose.retrieval.commands import auto_lora_specs, format_ranking, parse_category_limits, rank_lora_files
from loracompose.retrieval.evaluation import RecallReport, evaluate_retriever, recall_at_k
from loracompose.retrieval.lora_factors import AdaptedLayer, StackedFactors, layer_schema, read_unet_factors, \
    stack_factors
from loracompose.retrieval.ranking import DEFAULT_CATEGORY_LIMITS, TRIGGER_BOOST, EmbeddingCache, RankedLora, \
    check_prompt, check_top_k, cosine_scores, rank_by_similarity, rank_loras, select_under_limits, trigger_in_prompt
from loracompose.retrieval.retriever import RetrieverConfig, WeightRetriever, load_retriever, save_retriever
from loracompose.retrieval.text import OpenClipTextEmbedder, PipelineTextEmbedder, TextEmbedder

__all__ = [
    "DEFAULT_CATEGORY_LIMITS", "TRIGGER_BOOST", "AdaptedLayer", "EmbeddingCache", "OpenClipTextEmbedder",
    "PipelineTextEmbedder", "RankedLora", "RecallReport", "RetrieverConfig", "StackedFactors", "TextEmbedder",
    "WeightRetriever", "auto_lora_specs", "check_prompt", "check_top_k", "cosine_scores", "evaluate_retriever",
    "format_ranking", "layer_schema", "load_retriever", "parse_category_limits", "rank_by_similarity", "rank_loras",
    "rank_lora_files", "read_unet_factors", "recall_at_k", "save_retriever", "select_under_limits", "stack_factors",
    "trigger_in_prompt",
]
