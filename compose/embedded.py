"""The embedded offline default: a tiny SD1.5 model and three demo LoRAs, built on first use.

With no model or LoRA given, the CLI and the UI run on this default, so a fresh install works with
no network. The pictures are noise-like (random weights), but every code path is the real one.
The folder name carries a version tag so a later, better toy model can sit beside this one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .outputs import staged_directory
from .tiny import build_tiny_lora, build_tiny_sd15

EMBEDDED_VERSION = "tiny-sd15-v1"
MODEL_SEED = 0


@dataclass(frozen=True)
class DemoLora:
    """One demo LoRA file and what it is about."""

    path: Path
    name: str
    trigger_words: tuple[str, ...]
    category: str


@dataclass(frozen=True)
class EmbeddedDefault:
    """The embedded model folder, its demo LoRAs and a prompt that triggers all of them."""

    model_dir: Path
    loras: tuple[DemoLora, ...]
    prompt: str


@dataclass(frozen=True)
class _DemoRecipe:
    name: str
    trigger_words: tuple[str, ...]
    category: str
    seed: int
    init_scale: float


_DEMO_RECIPES = (
    _DemoRecipe("character", ("zkx character",), "character", seed=101, init_scale=3.0),
    _DemoRecipe("outfit", ("red cloak",), "clothing", seed=202, init_scale=3.0),
    _DemoRecipe("style", ("inkwash style",), "style", seed=303, init_scale=3.0),
)
DEMO_PROMPT = "zkx character wearing a red cloak, inkwash style"


def loracompose_home() -> Path:
    """Where loracompose keeps the files it builds.

    ``$LORACOMPOSE_HOME``, else ``$XDG_CACHE_HOME/loracompose``, else ``~/.cache/loracompose``.
    """
    if os.environ.get("LORACOMPOSE_HOME"):
        return Path(os.environ["LORACOMPOSE_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "loracompose"


def embedded_default() -> EmbeddedDefault:
    """The embedded model and demo LoRAs, built under :func:`loracompose_home` the first time.

    Safe when several processes start at once: one builds while the others wait on a file lock,
    and the finished folder appears by a single rename, so it is either complete or absent.
    """
    root = loracompose_home() / "embedded" / EMBEDDED_VERSION
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root) + ".lock"):
            if not root.is_dir():
                _build_and_publish(root)
    return _describe(root)


def _describe(root: Path) -> EmbeddedDefault:
    loras = tuple(
        DemoLora(_lora_path(root, recipe.name), recipe.name, recipe.trigger_words, recipe.category)
        for recipe in _DEMO_RECIPES
    )
    return EmbeddedDefault(model_dir=root / "model", loras=loras, prompt=DEMO_PROMPT)


def _lora_path(root: Path, name: str) -> Path:
    return root / "loras" / f"{name}.safetensors"


def _build_and_publish(root: Path) -> None:
    """Build everything in a scratch folder beside ``root``, then rename it to ``root``.

    If another process published ``root`` first (the lock can be unavailable, e.g. on some network
    file systems), the rename fails and its copy is kept.
    """
    try:
        with staged_directory(root) as staging:
            _build(staging)
    except OSError:
        if not root.is_dir():
            raise


def _build(root: Path) -> None:
    model_dir = build_tiny_sd15(root / "model", seed=MODEL_SEED)
    for recipe in _DEMO_RECIPES:
        build_tiny_lora(
            model_dir,
            _lora_path(root, recipe.name),
            seed=recipe.seed,
            trigger_words=recipe.trigger_words,
            name=recipe.name,
            category=recipe.category,
            init_scale=recipe.init_scale,
        )
