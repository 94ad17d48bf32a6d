"""Training the weight-encoding retriever (:mod:`loracompose.retrieval.retriever`) on a LoRA library::

    targets: the frozen text embeddings of each LoRA's description and captions (else its metadata text)
    for each step (every draw seeded by (seed, step)):
        a batch of LoRAs;  one caption of each
        symmetric InfoNCE between e_lora and the caption embeddings, cosine logits / temperature
        AdamW step
        every K steps and at the end: checkpoint (weights + AdamW state as safetensors)
    write the retriever as safetensors

The temperature is a setting (0.07, CLIP's initial value) rather than a fixed 1 with the loss
multiplied by 10 as in the released code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from loracompose.errors import UserError
from loracompose.library import LibraryEntry, LibraryIndex, open_library
from loracompose.retrieval.lora_factors import AdaptedLayer, StackedFactors, layer_schema, read_unet_factors, \
    stack_factors
from loracompose.retrieval.retriever import RetrieverConfig, WeightRetriever, save_retriever
from loracompose.retrieval.text import PipelineTextEmbedder, TextEmbedder
from loracompose.training.checkpoints import CheckpointRecipe, CheckpointSettings, TrainingRun, resume_state, \
    run_steps, save_checkpoint
from loracompose.training.seeds import derived_seed, generator, seeded_global_rng


@dataclass
class RetrieverTrainingSettings(CheckpointSettings):
    """``train-retriever``: a library of LoRAs with descriptions, and how to train the weight encoder.

    Args:
        library: the LoRA library folder (descriptions and ``loracompose.captions`` in the files' metadata).
        out: the ``.safetensors`` retriever file to write.
        model: the base model whose text encoder gives the target embeddings (ignored if an embedder is passed).
        steps, batch_size, learning_rate, temperature: InfoNCE training (AdamW; a batch is that many LoRAs).
        width, depth, heads, mlp: the transformer (reference: 768, 2, 12, 3072).
        checkpoint_every (default 500), keep_checkpoints, work_dir, resume: :class:`CheckpointSettings`.
    """

    library: Path
    out: Path
    model: str | None = None
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-4
    temperature: float = 0.07
    width: int = 768
    depth: int = 2
    heads: int = 12
    mlp: int = 3072
    seed: int = 0
    device: str = "auto"
    show_progress: bool = True
    checkpoint_every: int = field(default=500, kw_only=True)

    def __post_init__(self) -> None:
        self.library, self.out = Path(self.library), Path(self.out)
        super().__post_init__()


@dataclass(frozen=True)
class ResolvedRetrieverSettings(CheckpointRecipe):
    """What a checkpoint must agree with to be resumed."""

    library_files: tuple[str, ...]
    text_embedder: str
    batch_size: int
    learning_rate: float
    temperature: float
    width: int
    depth: int
    heads: int
    mlp: int
    seed: int


@dataclass(kw_only=True)
class RetrieverTrainingResult(TrainingRun):
    """The run, the trained retriever and the library entries it was trained on."""

    retriever: WeightRetriever
    entries: list[LibraryEntry]


@dataclass
class RetrievalData:
    """The training set: stacked LoRA factors and every caption's frozen text embedding."""

    entries: list[LibraryEntry]
    factors: StackedFactors
    caption_embeddings: list[torch.Tensor]  # per LoRA: (captions, text_dim)
    layers: tuple[AdaptedLayer, ...]


def retrieval_data(library: LibraryIndex, embedder: TextEmbedder, architecture: str | None = None) -> RetrievalData:
    entries = library.for_architecture(architecture)
    if len(entries) < 2:
        raise UserError(f"--library {library.root} holds {len(entries)} usable LoRA(s); the retriever needs at "
                        "least 2 to contrast")
    factor_sets = [read_unet_factors(library.path_of(entry)) for entry in entries]
    layers = layer_schema(factor_sets)
    captions = [embedder.embed(list(entry.training_captions())) for entry in entries]
    return RetrievalData(entries, stack_factors(factor_sets, layers), captions, layers)


def info_nce(lora_embeddings: torch.Tensor, text_embeddings: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE with cosine logits: row i of each side is the positive pair."""
    logits = F.normalize(lora_embeddings, dim=-1) @ F.normalize(text_embeddings, dim=-1).T / temperature
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def batch_draw(step: int, data: RetrievalData, batch_size: int, seed: int) -> tuple[list[int], torch.Tensor]:
    """The LoRAs of a step (a seeded random subset) and one seeded caption embedding of each."""
    rng = generator(seed, "retriever-step", step)
    count = len(data.entries)
    indices = torch.randperm(count, generator=rng)[:min(batch_size, count)].tolist()
    texts = [data.caption_embeddings[i][int(torch.randint(len(data.caption_embeddings[i]), (1,), generator=rng))]
             for i in indices]
    return indices, torch.stack(texts)


def train_retriever(settings: RetrieverTrainingSettings,
                    embedder: TextEmbedder | None = None) -> RetrieverTrainingResult:
    """Train the weight-encoding retriever on a library and write it as safetensors (see the module docstring).

    ``embedder`` replaces the base model's text encoder (``settings.model``) as the source of targets.
    """
    _check_retriever_settings(settings)
    settings.check_checkpointing()
    embedder, architecture = embedder_for(settings.model, embedder)
    data = retrieval_data(open_library(settings.library), embedder, architecture)
    resolved = ResolvedRetrieverSettings(
        tuple(entry.file for entry in data.entries), embedder.fingerprint, settings.batch_size, settings.learning_rate,
        settings.temperature, settings.width, settings.depth, settings.heads, settings.mlp, settings.seed)
    config = RetrieverConfig(data.layers, int(data.caption_embeddings[0].shape[-1]), settings.width, settings.depth,
                             settings.heads, settings.mlp, embedder.fingerprint)
    with seeded_global_rng(derived_seed(settings.seed, "retriever-init", 0)):
        retriever = WeightRetriever(config)
    optimizer = torch.optim.AdamW(retriever.parameters(), lr=settings.learning_rate)
    trainable = dict(retriever.named_parameters())
    start, history, _ = resume_state(trainable, optimizer, resolved, settings)
    retriever.train()
    seconds = run_steps(
        settings, start, settings.steps, history,
        lambda step: retriever_step(retriever, optimizer, data, settings, step),
        lambda done, _seconds: save_checkpoint(trainable, optimizer, resolved, settings, done, history),
        desc="train retriever", show_progress=settings.show_progress)
    retriever.eval()
    training = json.dumps({**resolved.to_json(), "steps": settings.steps}, sort_keys=True)
    save_retriever(retriever, settings.out, {"loracompose.training": training})
    return RetrieverTrainingResult(path=settings.out, steps=settings.steps, history=history, retriever=retriever,
                                   entries=data.entries, work_dir=settings.folder, resumed_from=start,
                                   train_seconds=seconds)


def retriever_step(retriever: WeightRetriever, optimizer: torch.optim.Optimizer, data: RetrievalData,
                   settings: RetrieverTrainingSettings, step: int) -> dict[str, float]:
    """One InfoNCE step on the step's seeded batch of LoRAs and captions."""
    indices, texts = batch_draw(step, data, settings.batch_size, settings.seed)
    loss = info_nce(retriever(data.factors.select(indices)), texts, settings.temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"step": step + 1, "loss": float(loss.detach())}


def _check_retriever_settings(settings: RetrieverTrainingSettings) -> None:
    if settings.out.suffix.lower() != ".safetensors":
        raise UserError(f"--out {settings.out}: name the retriever file .safetensors")
    for label, value in (("--steps", settings.steps), ("--batch-size", settings.batch_size)):
        if int(value) < 1:
            raise UserError(f"{label} {value}: use a positive integer")
    if settings.batch_size < 2:
        raise UserError(f"--batch-size {settings.batch_size}: contrastive training needs at least 2 LoRAs per batch")
    if settings.learning_rate <= 0 or settings.temperature <= 0:
        raise UserError("--lr and --temperature must be positive numbers")


def embedder_for(model: str | None, embedder: TextEmbedder | None) -> tuple[TextEmbedder, str | None]:
    """The given embedder (any architecture), or the base model's text encoder and its architecture."""
    if embedder is not None:
        return embedder, None
    if not model:
        raise UserError("--model is needed: its text encoder embeds the LoRA descriptions and prompts")
    from loracompose.pipelines import load_pipeline
    from loracompose.pipelines.compose_pipeline import quiet_loading

    with quiet_loading():
        pipe = load_pipeline(model)
    return PipelineTextEmbedder(pipe), pipe.architecture
