"""Writing results: images and their JSON sidecars, atomically (temp file, then rename)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from loracompose.errors import UserError

VERSIONED_PACKAGES = ("loracompose", "diffusers", "torch", "transformers", "peft", "accelerate", "safetensors")


def package_versions() -> dict[str, str]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temp_path)`` on a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        write(temp)
        os.chmod(temp, 0o644)  # mkstemp makes 0600 files; outputs are ordinary files
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


@contextmanager
def staged_directory(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside ``final`` that is renamed to ``final`` when the block succeeds
    (an existing ``final`` is removed first when ``replace``); on failure nothing is left behind."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes 0700 folders; outputs are ordinary folders
        if replace and final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def prepare_output_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder for the images")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {out_dir}: cannot create the folder ({error.strerror})") from None
    return out_dir


def sidecar(result: Any, index: int, model: str) -> dict[str, Any]:
    """The JSON record of image ``index`` of a GenerationResult."""
    return {
        "method": result.method["name"],
        "method_settings": result.method,
        "seed": result.seeds[index],
        "model": model,
        "prompt": result.prompt,
        "negative_prompt": result.negative_prompt,
        "loras": [lora.describe() for lora in result.loras],
        **result.settings,
        "versions": package_versions(),
        "stats": result.stats.to_dict(),
    }


def _save_png(image: Any, path: Path) -> None:
    image.save(path, format="PNG")


def save_result(result: Any, out_dir: Path, stem: str, model: str) -> list[Path]:
    """Write ``<stem>.png`` + ``<stem>.json`` per image (``<stem>-<k>`` for several) into out_dir."""
    out_dir = prepare_output_dir(out_dir)
    written = []
    for index, image in enumerate(result.images):
        name = stem if len(result.images) == 1 else f"{stem}-{index}"
        png = atomic_write(out_dir / f"{name}.png", functools.partial(_save_png, image))
        atomic_write_text(out_dir / f"{name}.json", json.dumps(sidecar(result, index, model), indent=2) + "\n")
        written.append(png)
    return written
