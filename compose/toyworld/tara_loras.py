"""Train the toy world's TARA LoRAs (``NAME-tara.safetensors``, TARA's benchmark rows) with train-tara.

    prior  <- base-world scenes without any concept, seeds PRIOR_SEED_START + i, each with a caption
              whose details are dropped at random (as the concepts' captions)
    for each object concept (moxel, lunzor):
        images <- its training scenes with their own captions (loras.write_concept_images, the
                  ordinary LoRAs' images)
        train_tara(images, prior images, token = the concept's word, class word "circle",
                   800 steps, rank 8, alpha 8, lr 1e-3, batch 16)

The class word is a shape the base model knows: the concepts' own shapes (heart, crescent) never
occur in its captions, so their token embeddings are untrained and their keys mean nothing. The
prior images keep every delta that no token mask reaches (self-attention, queries, outputs) from
drawing the concept on other objects (docs/methods/tara.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from loracompose.errors import UserError
from loracompose.outputs import staged_directory
from .concepts import CONCEPTS, OBJECT
from .loras import write_concept_images
from .scenes import caption, render, scene_from_seed

if TYPE_CHECKING:
    from loracompose.training.trainer import TrainingResult

PRIOR_SEED_START = 3_000_000
CLASS_WORD = "circle"


@dataclass(frozen=True)
class TaraLoraSettings:
    """How the toy world's TARA LoRAs are trained (defaults: the shipped files' recipe)."""

    images: int = 256
    prior_images: int = 256
    steps: int = 800
    rank: int = 8
    learning_rate: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    show_progress: bool = True


def write_prior_images(folder: Path, count: int) -> Path:
    """``count`` base-world scenes (no concept) as ``NNNN.png`` + ``NNNN.txt``, published whole."""
    from loracompose.training.trainer import CAPTION_SUFFIX  # the trainer (torch) loads only to train

    with staged_directory(folder) as staging:
        for index in range(count):
            seed = PRIOR_SEED_START + index
            scene = scene_from_seed(seed, max_objects=2)
            rng = np.random.default_rng([seed, 0xCA])
            text = caption(scene, with_position=bool(rng.random() < 0.7), with_background=bool(rng.random() < 0.6))
            render(scene).save(staging / f"{index:04d}.png")
            (staging / f"{index:04d}{CAPTION_SUFFIX}").write_text(text + "\n")
    return folder


def train_tara_loras(model_dir: Path, out_dir: Path, names: Sequence[str] = ("moxel", "lunzor"),
                     settings: TaraLoraSettings = TaraLoraSettings(),
                     work_dir: Path | None = None) -> list[TrainingResult]:
    """Train the named object concepts' TARA LoRAs on ``model_dir``; write ``out_dir/NAME-tara.safetensors``."""
    from loracompose.training.tara import TaraTrainingSettings, train_tara
    from loracompose.training.trainer import LoraTrainingSettings

    wrong = [name for name in names if name not in CONCEPTS or CONCEPTS[name].kind != OBJECT]
    if wrong:
        objects = ", ".join(name for name, concept in CONCEPTS.items() if concept.kind == OBJECT)
        raise UserError(f"concept {wrong[0]!r}: TARA LoRAs are trained for the object concepts ({objects})")
    work = Path(work_dir or f"{Path(out_dir)}-tara-training")
    prior = work / "prior-images"
    if not prior.is_dir():
        write_prior_images(prior, settings.prior_images)
    results = []
    for name in names:
        images = work / f"{name}-images"
        if not images.is_dir():
            write_concept_images(CONCEPTS[name], images, settings.images)
        training = LoraTrainingSettings(
            model=str(model_dir), images=images, prior_images=prior, out=Path(out_dir) / f"{name}-tara.safetensors",
            steps=settings.steps, rank=settings.rank, alpha=float(settings.rank),
            learning_rate=settings.learning_rate, batch_size=settings.batch_size, seed=settings.seed,
            work_dir=work / f"{name}-checkpoints", checkpoint_every=100, title=f"{name}-tara",
            category=CONCEPTS[name].kind, probe_timesteps=0, show_progress=settings.show_progress)
        results.append(train_tara(TaraTrainingSettings(name, CLASS_WORD, training)))
    return results
