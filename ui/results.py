"""Running a generation for the UI: the request, the saved files, the caption, the session history."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from loracompose.lora import LoraSpec
from loracompose.methods.base import CompositionMethod
from loracompose.outputs import save_result

HISTORY_LIMIT = 60


@dataclass(frozen=True)
class GenerationRequest:
    """Everything a generation needs except the method: the shared settings of the page."""

    prompt: str
    negative_prompt: str | None
    loras: tuple[LoraSpec, ...]
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    num_images: int
    scheduler: str
    append_triggers: bool = True
    text_encoder_loras: bool = True
    lora_dir: Path | None = None  # the folder <lora:NAME:W> prompt tags pick files from (the library)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``pipe.generate`` after prompt, loras and method."""
        return dict(negative_prompt=self.negative_prompt, seed=self.seed, steps=self.steps,
                    guidance_scale=self.guidance_scale, width=self.width, height=self.height,
                    num_images=self.num_images, scheduler=self.scheduler, append_triggers=self.append_triggers,
                    text_encoder_loras=self.text_encoder_loras, show_progress=True, lora_dir=self.lora_dir)


@dataclass(frozen=True)
class ResultItem:
    """One image of the session: its files, caption, and what made it (for "reuse settings")."""

    png: Path
    sidecar: Path
    caption: str
    request: GenerationRequest
    method_name: str
    method_settings: dict[str, Any]
    seconds: float
    unet_calls: int


@dataclass
class SessionState:
    """Per-browser-session state (a ``gr.State``): its LoRAs, its results, its output folder name."""

    catalog: Any
    history: list[ResultItem] = field(default_factory=list)
    selected: int | None = None
    session_id: str = ""
    lora_dir: Path | None = None  # the server's library folder: prompt tags pick LoRAs from it

    def output_folder(self, root: Path) -> Path:
        if not self.session_id:
            self.session_id = uuid.uuid4().hex[:12]
        return Path(root) / self.session_id

    def remember(self, items: Sequence[ResultItem]) -> None:
        """Put new results first (newest first), keep at most HISTORY_LIMIT, select the newest."""
        self.history = [*items, *self.history][:HISTORY_LIMIT]
        self.selected = 0 if self.history else None

    def selected_item(self) -> ResultItem | None:
        if self.selected is None or not 0 <= self.selected < len(self.history):
            return None
        return self.history[self.selected]

    def gallery(self) -> list[tuple[str, str]]:
        return [(str(item.png), item.caption) for item in self.history]


def run_generation(pipe: Any, request: GenerationRequest, method: CompositionMethod, out_dir: Path,
                   model_label: str) -> list[ResultItem]:
    """Generate with ``method``, save PNG + JSON sidecar per image, and describe each image."""
    result = pipe.generate(request.prompt, list(request.loras), method, **request.generate_kwargs())
    stem = f"{method.name}-{request.seed}-{uuid.uuid4().hex[:6]}"
    pngs = save_result(result, out_dir, stem, model_label)
    stats = result.stats
    settings = result.method
    items = []
    for index, png in enumerate(pngs):
        image_request = replace(request, seed=result.seeds[index], num_images=1)
        items.append(ResultItem(
            png=png, sidecar=png.with_suffix(".json"), caption=caption(method.name, settings, image_request, stats),
            request=image_request, method_name=method.name, method_settings=settings,
            seconds=stats.wall_seconds, unet_calls=stats.unet_calls,
        ))
    return items


def caption(method_name: str, settings: dict[str, Any], request: GenerationRequest, stats: Any) -> str:
    """``composite (batched=True) · seed 3 · 20 steps · cfg 7.5 · 64x64 · 1.23 s · 40 UNet calls``."""
    shown = ", ".join(f"{key}={_short(value)}" for key, value in settings.items()
                      if key != "name" and value is not None and not isinstance(value, dict))
    loras = ", ".join(f"{spec.name}:{spec.weight:g}" for spec in request.loras) or "no LoRA"
    partial = f" + {stats.partial_unet_calls} partial" if stats.partial_unet_calls else ""
    calls = f"{stats.unet_calls} UNet calls{partial}"
    return (f"{method_name}" + (f" ({shown})" if shown else "") + f" · {loras} · seed {request.seed} · "
            f"{request.steps} steps · cfg {request.guidance_scale:g} · {request.width}x{request.height} · "
            f"{request.scheduler} · {stats.wall_seconds:.2f} s · {calls}")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "/".join(_short(item) for item in value)
    return str(value)
