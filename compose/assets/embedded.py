"""The embedded offline default: a small model and demo LoRAs that need no network.

With no model or LoRA given, the CLI and the UI run on this default, so a fresh install works with
no network. Two variants, chosen by ``$LORACOMPOSE_EMBEDDED``:

* ``toyworld`` (default): the toy-world model trained here (32x32 scenes of coloured shapes,
  toyworld/) and its concept LoRAs, shipped inside the package; real pictures whose concepts
  the toy-world detector checks.
* ``tiny-sd15``: a random-weight SD1.5-shaped model and three LoRAs, built on first use; noise-like
  pictures, but the standard SD1.5 layout (4 latent channels, 64x64) for tests of that shape.

Either is published under :func:`loracompose_home` (copied or built once, then renamed into place),
so the package folder is only ever read.
The folder names carry a version tag so a later model can sit beside an earlier one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

from loracompose.errors import UserError
from loracompose.outputs import staged_directory
from loracompose.assets.tiny import build_tiny_lora, build_tiny_sd15

VARIANT_VARIABLE = "LORACOMPOSE_EMBEDDED"
TOYWORLD, TINY_SD15 = "toyworld", "tiny-sd15"
EMBEDDED_VERSION = "tiny-sd15-v1"  # the random tiny SD1.5 variant's folder
TOYWORLD_PREFIX = "toyworld-"  # + the shipped manifest's digest: new weights, new folder
PACKAGED_TOYWORLD = Path(__file__).parent.parent / "toyworld" / "weights"  # model/ and loras/ as shipped
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
    steps: int = 30  # the generation settings the model is made for
    guidance_scale: float = 7.5


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

# The toy world's demo: three of its four concept LoRAs (toyworld/concepts.py) in one prompt.
TOYWORLD_DEMO = (("moxel", "object"), ("lunzor", "object"), ("checkered", "background"))
TOYWORLD_PROMPT = "a moxel on the left and a lunzor on the right on a checkered background"
TOYWORLD_STEPS, TOYWORLD_GUIDANCE = 20, 4.0


def loracompose_home() -> Path:
    """Where loracompose keeps the files it builds.

    ``$LORACOMPOSE_HOME``, else ``$XDG_CACHE_HOME/loracompose``, else ``~/.cache/loracompose``.
    """
    if os.environ.get("LORACOMPOSE_HOME"):
        return Path(os.environ["LORACOMPOSE_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "loracompose"


def embedded_variant() -> str:
    """``$LORACOMPOSE_EMBEDDED`` (toyworld or tiny-sd15), toyworld when unset."""
    variant = os.environ.get(VARIANT_VARIABLE, "").strip() or TOYWORLD
    if variant not in (TOYWORLD, TINY_SD15):
        raise UserError(f"{VARIANT_VARIABLE}={variant!r} is not known; use {TOYWORLD} (default) or {TINY_SD15}")
    return variant


def embedded_default(variant: str | None = None) -> EmbeddedDefault:
    """The embedded model and demo LoRAs, published under :func:`loracompose_home` the first time.

    Safe when several processes start at once: one builds while the others wait on a file lock,
    and the finished folder appears by a single rename, so it is either complete or absent.
    """
    variant = variant or embedded_variant()
    version, build = (_toyworld_version(), _copy_toyworld) if variant == TOYWORLD else (EMBEDDED_VERSION, _build)
    root = loracompose_home() / "embedded" / version
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root) + ".lock"):
            if not root.is_dir():
                _build_and_publish(root, build)
    return _describe_toyworld(root) if variant == TOYWORLD else _describe(root)


def _describe_toyworld(root: Path) -> EmbeddedDefault:
    loras = tuple(DemoLora(_lora_path(root, name), name, (name,), category) for name, category in TOYWORLD_DEMO)
    return EmbeddedDefault(model_dir=root / "model", loras=loras, prompt=TOYWORLD_PROMPT, steps=TOYWORLD_STEPS,
                           guidance_scale=TOYWORLD_GUIDANCE)


def _toyworld_version() -> str:
    from loracompose.toyworld.shipping import MANIFEST, manifest_digest

    if not (PACKAGED_TOYWORLD / MANIFEST).is_file():
        raise UserError(f"the toy-world weights are missing from the package ({PACKAGED_TOYWORLD}); reinstall "
                        f"loracompose, or set {VARIANT_VARIABLE}={TINY_SD15}")
    return TOYWORLD_PREFIX + manifest_digest(PACKAGED_TOYWORLD)


def _copy_toyworld(root: Path) -> None:
    shutil.copytree(PACKAGED_TOYWORLD, root, dirs_exist_ok=True)


def _describe(root: Path) -> EmbeddedDefault:
    loras = tuple(
        DemoLora(_lora_path(root, recipe.name), recipe.name, recipe.trigger_words, recipe.category)
        for recipe in _DEMO_RECIPES
    )
    return EmbeddedDefault(model_dir=root / "model", loras=loras, prompt=DEMO_PROMPT)


def _lora_path(root: Path, name: str) -> Path:
    return root / "loras" / f"{name}.safetensors"


def _build_and_publish(root: Path, build: Callable[[Path], None] | None = None) -> None:
    """Build everything in a scratch folder beside ``root``, then rename it to ``root``.

    If another process published ``root`` first (the lock can be unavailable, e.g. on some network
    file systems), the rename fails and its copy is kept.
    """
    build = build or _build
    try:
        with staged_directory(root) as staging:
            build(staging)
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
