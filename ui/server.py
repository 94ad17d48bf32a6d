"""From command-line options to a served app: model, library, folders, launch.

With no model the app runs on the embedded offline default and offers its demo LoRAs (ticked),
so ``loracompose ui`` works on a fresh machine with no network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracompose.assets.embedded import embedded_default, loracompose_home
from loracompose.errors import UserError
from loracompose.validation import Limits

from .app import AppSettings, build_app, launch_app
from .library import DEFAULT_MAX_UPLOAD_BYTES, LoraEntry, describe_lora_file, scan_library


@dataclass(frozen=True)
class UiOptions:
    """What ``loracompose ui`` was asked for."""

    model: str | None = None
    config: str | None = None
    library: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    out: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_BYTES / 1024**2
    limits: Limits = field(default_factory=Limits)


def ui_home() -> Path:
    """The app's own folder: ``<LORACOMPOSE_HOME>/ui`` (outputs and uploads)."""
    return loracompose_home() / "ui"


def resolve_settings(options: UiOptions) -> tuple[str, AppSettings]:
    """(model to load, app settings); the embedded default when no model is given."""
    if not 0 <= options.port <= 65535:
        raise UserError(f"--port {options.port}: give a TCP port from 1 to 65535 (0: any free port)")
    if options.max_upload_mb <= 0:
        raise UserError(f"--max-upload-mb {options.max_upload_mb}: give a positive size in MiB")
    model, library, prompt, preselect = options.model, scan_library(options.library), "", False
    lora_dir = Path(options.library).resolve() if options.library is not None else None  # prompt tags' folder
    defaults: dict[str, Any] = {}
    if model is None:
        demo = embedded_default()
        model, prompt = str(demo.model_dir), demo.prompt
        defaults = {"default_steps": demo.steps, "default_guidance": demo.guidance_scale}
        if options.library is None:
            library, preselect = _demo_library(demo.loras), True
            lora_dir = _demo_folder(demo.loras)
    home = ui_home()
    settings = AppSettings(
        model_label=model, library=tuple(library), output_root=Path(options.out or home / "outputs").resolve(),
        upload_root=(home / "uploads").resolve(), default_prompt=prompt, preselect_library=preselect,
        max_upload_bytes=int(options.max_upload_mb * 1024**2), lora_dir=lora_dir, **defaults,
    )
    return model, settings


def _demo_library(demo_loras) -> list[LoraEntry]:
    return [describe_lora_file(lora.path, lora.name, "demo") for lora in demo_loras]


def _demo_folder(demo_loras) -> Path | None:
    """The demo LoRAs' folder, when they share one (prompt tags then pick them by file name)."""
    folders = {Path(lora.path).resolve().parent for lora in demo_loras}
    return folders.pop() if len(folders) == 1 else None


def serve(options: UiOptions, block: bool = True):
    """Load the model, build the app and serve it (blocking unless ``block=False``)."""
    from loracompose.pipelines import load_pipeline

    model, settings = resolve_settings(options)
    pipe = load_pipeline(model, device=options.device, dtype=options.dtype, config=options.config)
    pipe.limits = options.limits
    blocks = build_app(pipe, settings)
    return launch_app(blocks, settings, host=options.host, port=options.port, block=block)
