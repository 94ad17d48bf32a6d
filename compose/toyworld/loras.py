"""Train the toy world's concept LoRAs with the project's LoRA trainer (training.py, as TARA does).

    for each concept (concepts.py):
        images  <- its training scenes (256), seeds CONCEPT_SEED_START + i (never the base's held-out
                   seeds), written as PNG with the caption beside each (NAME.txt, read by the trainer)
        train_lora(images, 1000 steps, rank 8, lr 1e-3, batch 16, attention q/k/v/out): a plain LoRA
                   with the concept's trigger word and category in the file's metadata

Per-concept recipes (CONCEPT_RECIPES; the rest as above): ambrel trains 2000 steps. At 1000 it
toned backgrounds by about a third of the training scenes' red - blue (median 0.039 of 0.125), and
in some images under the detector's threshold (0.021); 2000 steps lifted the weakest images above
it (Merge of ambrel alone: 32/32 tuning seeds, from 30/32), 3000 steps gave no more.

lunzor trains rank 16. At rank 8 the crescent came out weak where other concepts share the image:
judged on tuning seeds 100-131 (benchmarks/results/toyworld-lunzor-recipes.md), two rank-16 runs
(training seeds 0 and 1) kept the crescent alone in 100% through Merge, regional and auto (rank 8:
94-100%) and lifted auto's lunzor + checkered to 94% and 94% (rank 8: 78%, 97%) and moxel + lunzor +
ambrel to 69% and 66% (44%, 62%); Merge's and regional's lunzor + checkered and Composer stayed
uneven between seeds. 1024 training scenes and FFN/projection targets (which Composer does not
inject: its moxel + lunzor fell to 12%) were worse. The spread between two training seeds of one
recipe is as wide as most of these differences, so only what both seeds agreed on counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from loracompose.errors import UserError
from loracompose.outputs import staged_directory
from .concepts import CONCEPTS, Concept
from .scenes import render

if TYPE_CHECKING:
    from loracompose.training.trainer import TrainingResult

CONCEPT_SEED_START = 2_000_000
DEFAULT_IMAGES, DEFAULT_STEPS, DEFAULT_RANK, DEFAULT_LEARNING_RATE = 256, 1000, 8, 1e-3
DEFAULTS: dict[str, Any] = {"images": DEFAULT_IMAGES, "steps": DEFAULT_STEPS, "rank": DEFAULT_RANK,
                            "learning_rate": DEFAULT_LEARNING_RATE, "targets": None}
# Concepts whose recipe differs from the defaults (see above): field of ConceptTrainingSettings -> value.
CONCEPT_RECIPES: dict[str, dict[str, Any]] = {"ambrel": {"steps": 2000}, "lunzor": {"rank": 16}}


@dataclass(frozen=True)
class ConceptTrainingSettings:
    """How the concept LoRAs are trained (defaults: the shipped LoRAs' recipe)."""

    # None: the concept's own value (CONCEPT_RECIPES), else the DEFAULTS entry
    images: int | None = None
    steps: int | None = None
    rank: int | None = None
    learning_rate: float | None = None
    targets: tuple[str, ...] | None = None  # UNet projections with a LoRA (the trainer's default: attention)
    batch_size: int = 16
    seed: int = 0
    show_progress: bool = True


def concept_setting(settings: ConceptTrainingSettings, name: str, field: str) -> Any:
    """``settings.field`` where given, else concept ``name``'s own value (CONCEPT_RECIPES), else DEFAULTS'."""
    given = getattr(settings, field)
    return given if given is not None else CONCEPT_RECIPES.get(name, {}).get(field, DEFAULTS[field])


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
        count = concept_setting(settings, name, "images")
        images = work / f"{name}-images-{count}"
        if not images.is_dir():
            write_concept_images(concept, images, count)
        results.append(train_lora(LoraTrainingSettings(
            model=str(model_dir), images=images, out=Path(out_dir) / f"{name}.safetensors",
            steps=concept_setting(settings, name, "steps"), rank=concept_setting(settings, name, "rank"),
            learning_rate=concept_setting(settings, name, "learning_rate"),
            targets=concept_setting(settings, name, "targets"),
            batch_size=settings.batch_size, seed=settings.seed, work_dir=work / f"{name}-checkpoints",
            checkpoint_every=250, trigger_words=concept.trigger_words, title=name,
            category=concept.kind, probe_timesteps=0,
            show_progress=settings.show_progress,
        )))
    return results
