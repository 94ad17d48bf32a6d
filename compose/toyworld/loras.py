"""Train the toy world's concept LoRAs with the project's LoRA trainer (training.py, as TARA does).

    for each concept (concepts.py):
        images  <- its training scenes, seeds CONCEPT_SEED_START + i (never the base's held-out seeds),
                   written as PNG with the caption beside each (NAME.txt, read by the trainer)
        train_lora(images, 1000 steps, rank 8, lr 1e-3, batch 16): a plain LoRA with the concept's
                   trigger word and category in the file's metadata
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from loracompose.errors import UserError
from loracompose.outputs import staged_directory
from .concepts import CONCEPTS, Concept
from .scenes import render

if TYPE_CHECKING:
    from loracompose.training.trainer import TrainingResult

CONCEPT_SEED_START = 2_000_000


@dataclass(frozen=True)
class ConceptTrainingSettings:
    """How the concept LoRAs are trained (defaults: the shipped LoRAs' recipe)."""

    images: int = 256
    steps: int = 1000
    rank: int = 8
    learning_rate: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    show_progress: bool = True


def write_concept_images(concept: Concept, folder: Path, count: int) -> Path:
    """``count`` training scenes of ``concept`` as ``NNNN.png`` + ``NNNN.txt`` (its caption), published whole."""
    from loracompose.training.trainer import CAPTION_SUFFIX  # the trainer (torch) loads only to train

    with staged_directory(folder) as staging:
        for index in range(count):
            seed = CONCEPT_SEED_START + index
            scene = concept.training_scene(seed)
            render(scene).save(staging / f"{index:04d}.png")
            (staging / f"{index:04d}{CAPTION_SUFFIX}").write_text(concept.training_caption(scene, seed) + "\n")
    return folder


def train_concept_loras(model_dir: Path, out_dir: Path, names: Sequence[str] | None = None,
                        settings: ConceptTrainingSettings = ConceptTrainingSettings(),
                        work_dir: Path | None = None) -> list[TrainingResult]:
    """Train the named concepts' LoRAs (default: all) on ``model_dir``; write ``out_dir/NAME.safetensors``."""
    from loracompose.training.trainer import LoraTrainingSettings, train_lora

    unknown = [name for name in names or () if name not in CONCEPTS]
    if unknown:
        raise UserError(f"--concept {unknown[0]!r} is not a toy-world concept; choose from {', '.join(CONCEPTS)}")
    work = Path(work_dir or f"{Path(out_dir)}-training")  # beside the LoRA folder, not in it
    results = []
    for name in names or list(CONCEPTS):
        concept = CONCEPTS[name]
        images = work / f"{name}-images"
        if not images.is_dir():
            write_concept_images(concept, images, settings.images)
        results.append(train_lora(LoraTrainingSettings(
            model=str(model_dir), images=images, out=Path(out_dir) / f"{name}.safetensors",
            steps=settings.steps, rank=settings.rank, learning_rate=settings.learning_rate,
            batch_size=settings.batch_size, seed=settings.seed, work_dir=work / f"{name}-checkpoints",
            checkpoint_every=250, trigger_words=concept.trigger_words, title=name,
            category=concept.kind, probe_timesteps=0,
            show_progress=settings.show_progress,
        )))
    return results
