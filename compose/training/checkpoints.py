"""Checkpoints and resuming, shared by every trainer (LoRA, TARA, AutoLoRA gates, the retriever, the toy world).

A run's settings derive from :class:`CheckpointSettings` (how often to checkpoint, how many to keep,
where, whether to resume). A checkpoint is a folder ``step-NNNNNN/`` in the work folder: the
trainer's safetensors files and ``state.json`` (the step, the loss history and the recipe the run
must agree with to be resumed). It is written in a staging folder and renamed into place, so a
killed run leaves only complete checkpoints. Optimizer state is flattened into safetensors, keyed
by parameter name, with its hyperparameters in the file's metadata: nothing is pickled.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from loracompose.errors import UserError
from loracompose.outputs import staged_directory

CHECKPOINT_PREFIX = "step-"
STATE_FILE, WEIGHTS_FILE, OPTIMIZER_FILE = "state.json", "adapter.safetensors", "optimizer.safetensors"
CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------------------------ settings


@dataclass(kw_only=True)
class CheckpointSettings:
    """How a trainer checkpoints and resumes (every trainer's settings derive from this).

    Args:
        checkpoint_every: steps between checkpoints (a checkpoint is also written at the end).
        keep_checkpoints: how many of the newest checkpoints to keep (at least one is).
        work_dir: the checkpoint folder (default: the trainer's :meth:`default_work_dir`).
        resume: continue from the latest checkpoint in ``work_dir`` (same recipe required).
    """

    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    work_dir: Path | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir) if self.work_dir else self.default_work_dir()

    def default_work_dir(self) -> Path:
        """``OUT_STEM.checkpoints`` beside the file the trainer writes (``out``)."""
        out = Path(self.out)  # type: ignore[attr-defined]  # trainers without ``out`` override this
        return out.with_name(out.stem + ".checkpoints")

    def checkpoint_due(self, done: int, total: int) -> bool:
        """Whether a checkpoint is written after ``done`` of ``total`` steps."""
        return done % self.checkpoint_every == 0 or done == total

    def check_checkpointing(self, folder_option: str = "--work-dir") -> None:
        """A positive interval; resume only from checkpoints, and never start over on top of them
        (``folder_option`` names the folder's option in the message)."""
        if int(self.checkpoint_every) < 1:
            raise UserError(f"--checkpoint-every {self.checkpoint_every}: use a positive integer")
        existing = checkpoint_dirs(self.folder)
        if existing and not self.resume:
            raise UserError(f"{self.folder} already holds checkpoints; pass --resume to continue that run or "
                            f"give a new {folder_option}")
        if self.resume:
            self.resume_checkpoint()

    @property
    def folder(self) -> Path:
        """The checkpoint folder: ``work_dir``, which ``__post_init__`` resolved (the default when None)."""
        return self.work_dir if self.work_dir is not None else self.default_work_dir()

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint in ``work_dir``, or None."""
        found = checkpoint_dirs(self.folder)
        return found[-1] if found else None

    def resume_checkpoint(self) -> Path:
        """The checkpoint a resumed run starts from (the newest); a UserError when there is none."""
        latest = self.latest_checkpoint()
        if latest is None:
            raise UserError(f"--resume: no checkpoint in {self.folder}; train without --resume first")
        return latest


@dataclass(kw_only=True)
class TrainingRun:
    """What a training run wrote and how it went (every trainer's result derives from this)."""

    path: Path
    steps: int
    history: list[dict[str, float]]
    work_dir: Path
    resumed_from: int = 0
    train_seconds: float = 0.0  # the optimisation loop alone (no loading, probes or saving)


class CheckpointRecipe:
    """Base of a trainer's resolved settings (a frozen dataclass): what a checkpoint must agree with to be resumed."""

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # type: ignore[call-overload]


# ------------------------------------------------------------------------------------ folders


def checkpoint_dirs(work_dir: Path) -> list[Path]:
    """Complete checkpoints in ``work_dir``, oldest first."""
    if not work_dir.is_dir():
        return []
    found = [path for path in work_dir.iterdir()
             if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and (path / STATE_FILE).exists()]
    return sorted(found, key=lambda path: path.name)


def prune_checkpoints(work_dir: Path, keep: int) -> None:
    """Drop all but the last ``keep`` (at least one) complete checkpoints of ``work_dir``."""
    for old in checkpoint_dirs(work_dir)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(settings: CheckpointSettings, step: int, state: Mapping[str, Any],
                     write_files: Callable[[Path], None]) -> Path:
    """Write ``step-NNNNNN/`` (``write_files`` fills the staging folder; ``state`` becomes state.json),
    rename it into place and drop all but the last ``keep_checkpoints``."""
    final = settings.folder / f"{CHECKPOINT_PREFIX}{step:06d}"
    with staged_directory(final, replace=True) as staging:
        write_files(staging)
        (staging / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1) + "\n", encoding="utf-8")
    prune_checkpoints(settings.folder, settings.keep_checkpoints)
    return final


def read_state(checkpoint: Path, recipe: Mapping[str, Any], key: str = "settings",
               folder_option: str = "--work-dir") -> dict[str, Any]:
    """A checkpoint's state.json, refused if its ``key`` entry differs from ``recipe`` anywhere."""
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    differing = sorted(name for name, value in recipe.items() if state[key].get(name) != value)
    if differing:
        raise UserError(f"checkpoint {checkpoint} was made with other settings ({', '.join(differing)}); "
                        f"resume with the same settings or use a new {folder_option}")
    return state


# ------------------------------------------------------------------------------------ optimizer state


def flatten_optimizer_state(optimizer: torch.optim.Optimizer,
                            names: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An optimizer's state as safetensors tensors ``<param name>::<key>`` plus JSON metadata
    (hyperparameters and any non-tensor state), keyed by parameter name rather than position."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            target = f"{names[index]}::{key}"
            if torch.is_tensor(value):
                tensors[target] = value.detach().cpu().contiguous()
            else:
                scalars[target] = value
    metadata = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars),
                "parameters": json.dumps(list(names))}
    return tensors, metadata


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                              names: Sequence[str]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state` for an optimizer over ``names`` (same order)."""
    saved_names = json.loads(metadata["parameters"])
    if list(saved_names) != list(names):
        raise UserError("the checkpoint's optimizer state belongs to other LoRA layers; resume with the same model "
                        "and rank, or start a new --work-dir")
    position = {name: index for index, name in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for target, value in [*tensors.items(), *json.loads(metadata["scalars"]).items()]:
        name, _, key = target.partition("::")
        state.setdefault(position[name], {})[key] = value
    return {"state": state, "param_groups": json.loads(metadata["param_groups"])}


def save_optimizer(optimizer: torch.optim.Optimizer, names: Sequence[str], path: Path) -> None:
    """The optimizer's state as one safetensors file (see :func:`flatten_optimizer_state`)."""
    tensors, metadata = flatten_optimizer_state(optimizer, names)
    save_file(tensors, path, metadata=metadata)


def load_optimizer(optimizer: torch.optim.Optimizer, names: Sequence[str], path: Path) -> None:
    """Restore what :func:`save_optimizer` wrote into an optimizer over the same named parameters."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    optimizer.load_state_dict(unflatten_optimizer_state(load_file(path), metadata, names))


# ------------------------------------------------------------------------------------ trainable weights


def save_checkpoint(trainable: Mapping[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    recipe: CheckpointRecipe, settings: CheckpointSettings, step: int, history: list,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """A checkpoint of a set of trainable parameters and their optimizer (``extra`` joins state.json)."""
    def write_files(folder: Path) -> None:
        save_file({name: p.detach().cpu().contiguous() for name, p in trainable.items()}, folder / WEIGHTS_FILE)
        save_optimizer(optimizer, list(trainable), folder / OPTIMIZER_FILE)

    state = {"format": CHECKPOINT_FORMAT, "settings": recipe.to_json(), "history": history, **(extra or {})}
    return write_checkpoint(settings, step, state, write_files)


def load_checkpoint(trainable: Mapping[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    recipe: CheckpointRecipe, checkpoint: Path) -> dict[str, Any]:
    """Restore the parameters and optimizer state from ``checkpoint``; its recipe must match."""
    state = read_state(checkpoint, recipe.to_json())
    weights = load_file(checkpoint / WEIGHTS_FILE)
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(weights[name].to(parameter.device))
    load_optimizer(optimizer, list(trainable), checkpoint / OPTIMIZER_FILE)
    return state


def resume_state(trainable: Mapping[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 recipe: CheckpointRecipe, settings: CheckpointSettings) -> tuple[int, list, dict[str, Any]]:
    """(first step, loss history, the checkpoint's state): from the latest checkpoint when resuming,
    else a fresh start (0, [], {})."""
    if not settings.resume:
        return 0, [], {}
    state = load_checkpoint(trainable, optimizer, recipe, settings.resume_checkpoint())
    return int(state["step"]), list(state["history"]), state


# ------------------------------------------------------------------------------------ the loop


def run_steps(settings: CheckpointSettings, start: int, total: int, history: list[dict[str, float]],
              step: Callable[[int], dict[str, float]], checkpoint: Callable[[int, float], Any], *,
              desc: str, show_progress: bool) -> float:
    """Steps ``start .. total-1`` with a progress bar: ``step(s)`` returns the step's losses (appended
    to ``history``), ``checkpoint(done, seconds)`` runs whenever one is due. Returns the seconds spent
    in ``step`` (the optimisation alone)."""
    bar = tqdm(total=total, initial=min(start, total), desc=desc, disable=not show_progress, unit="step")
    seconds = 0.0
    for index in range(start, total):
        started = time.perf_counter()
        history.append(step(index))
        seconds += time.perf_counter() - started
        bar.update(1)
        bar.set_postfix({key: f"{value:.4f}" for key, value in history[-1].items() if key != "step"}, refresh=False)
        if settings.checkpoint_due(index + 1, total):
            checkpoint(index + 1, seconds)
    bar.close()
    return seconds
