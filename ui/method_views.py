"""What a method shows about its run besides the image: concept boxes, concept masks, token positions.

``method_view(method, image)`` returns overlays for the "Concepts" gallery and a Markdown note:

* LoRA-Composer: the image with each concept's box drawn in its colour and labelled;
* CLoRA: the image tinted by the concept that owns each pixel at the last step (base left clear),
  plus one overlay per concept;
* TARA: the prompt token positions each LoRA's K/V deltas were kept on;
* regional: one overlay per LoRA, the image tinted where its deltas applied;
* auto: one overlay per LoRA and mask estimate (probe step): its automatic mask, the part of the image
  no local concept owns (a background), or the whole image (a style), with each LoRA's kind.

Methods without a view return nothing; a view reads only attributes the method keeps after a run.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

CONCEPT_COLOURS = ((230, 57, 70), (29, 120, 230), (46, 160, 67), (245, 166, 35), (155, 89, 182), (0, 170, 170))
TINT_OPACITY = 0.45
NEAREST = Image.NEAREST  # type: ignore[attr-defined]  # Image.Resampling needs Pillow 9.1

Overlay = tuple[Image.Image, str]
View = tuple[list[Overlay], str]


def colour(index: int) -> tuple[int, int, int]:
    return CONCEPT_COLOURS[index % len(CONCEPT_COLOURS)]


def composer_view(method: Any, image: Image.Image) -> View:
    """The image with every concept's box outlined and labelled in its colour."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    legend = []
    for index, (box, lora) in enumerate(zip(method.boxes, method.loras)):
        left, top, right, bottom = box.x0 * width, box.y0 * height, box.x1 * width - 1, box.y1 * height - 1
        draw.rectangle((left, top, right, bottom), outline=colour(index), width=max(1, width // 128))
        draw.text((left + 2, top + 1), lora.name, fill=colour(index))
        legend.append(f"{lora.name}: ({box.x0:.2f}, {box.y0:.2f}, {box.x1:.2f}, {box.y1:.2f})")
    return [(canvas, "boxes: " + ", ".join(lora.name for lora in method.loras))], "Boxes: " + "; ".join(legend)


def box_layout(boxes_text: str, size: tuple[int, int] = (256, 256)) -> Image.Image | None:
    """The Composer panel's live preview: the typed boxes, numbered in LoRA order, on a blank canvas
    (None while the text does not parse, or is empty: then the LoRAs stand side by side)."""
    from loracompose.methods.composer import parse_box
    from loracompose.errors import UserError

    try:
        boxes = [parse_box(part) for part in str(boxes_text or "").split(";") if part.strip()]
    except UserError:
        return None
    if not boxes:
        return None
    canvas = Image.new("RGB", size, (240, 240, 240))
    draw = ImageDraw.Draw(canvas)
    for index, box in enumerate(boxes):
        corners = (box.x0 * size[0], box.y0 * size[1], box.x1 * size[0] - 1, box.y1 * size[1] - 1)
        draw.rectangle(corners, outline=colour(index), width=3)
        draw.text((corners[0] + 5, corners[1] + 4), str(index + 1), fill=colour(index))
    return canvas


def boxes_from_drawing(drawing: Any) -> Any:
    """The boxes text from the Composer box editor: layer k's strokes, by their bounding box, are
    LoRA k's box (relative coordinates). Nothing drawn: the text is left as it is."""
    import gradio as gr

    layers = (drawing or {}).get("layers") or []
    boxes = []
    for layer in layers:
        alpha = np.asarray(layer)[..., -1] > 0
        if not alpha.any():
            continue
        height, width = alpha.shape
        rows, columns = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
        corners = (columns[0] / width, rows[0] / height, (columns[-1] + 1) / width, (rows[-1] + 1) / height)
        boxes.append(",".join(f"{value:.3f}".rstrip("0").rstrip(".") for value in corners))
    return "; ".join(boxes) if boxes else gr.update()


def clora_view(method: Any, image: Image.Image) -> View:
    """The last step's concept masks: all concepts in one tinted overlay, then one overlay each."""
    history = getattr(method, "mask_history", None)
    if not history:
        return [], ""
    masks = history[-1]
    owner = masks.owner[0].numpy()  # the first image's masks
    base = image.convert("RGB")
    overlays = [(_tint(base, [owner == p for p in range(1, len(masks.names))], range(len(masks.names) - 1)),
                 f"concept masks at step {masks.step}")]
    for concept in range(1, len(masks.names)):
        overlays.append((_tint(base, [owner == concept], [concept - 1]), f"{masks.names[concept]} (step {masks.step})"))
    shares = ", ".join(f"{name} {np.mean(owner == p):.0%}" for p, name in enumerate(masks.names))
    return overlays, f"Mask shares at step {masks.step}: {shares}"


def tara_view(method: Any, image: Image.Image) -> View:
    """Each LoRA's trigger-token positions in the prompt (and the trigger words not found)."""
    lines = []
    for name, found in getattr(method, "positions", {}).items():
        missing = f" (not in the prompt: {', '.join(found.missing_words)})" if found.missing_words else ""
        lines.append(f"{name}: tokens {found.positions or 'none'}{missing}")
    return [], "Token positions: " + "; ".join(lines) if lines else ""


def _tint(image: Image.Image, masks: list[np.ndarray], colour_indices) -> Image.Image:
    """``image`` with each latent-resolution mask upsampled (nearest) and tinted in its colour."""
    pixels = np.asarray(image, dtype=np.float32)
    for mask, index in zip(masks, colour_indices):
        upsampled = Image.fromarray(mask.astype(np.uint8) * 255).resize(image.size, NEAREST)
        full = np.asarray(upsampled) > 0
        pixels[full] = (1 - TINT_OPACITY) * pixels[full] + TINT_OPACITY * np.array(colour(index), dtype=np.float32)
    return Image.fromarray(pixels.round().astype(np.uint8))


def regional_view(method: Any, image: Image.Image) -> View:
    """Each LoRA's region as the model used it (latent cells), one tinted overlay per LoRA."""
    grid, masks = getattr(method, "latent_grid", None), getattr(method, "region_masks", None)
    if grid is None or masks is None:
        return [], ""
    members = masks.members(grid, 0).reshape(-1, grid.height, grid.width).cpu().numpy()
    return _region_overlays(image, [(lora.name, region, "") for lora, region in zip(method.loras, members)],
                            "Regions")


def auto_view(method: Any, image: Image.Image) -> View:
    """The automatic masks of the first image, one overlay per LoRA for each mask estimate."""
    history = getattr(method, "mask_history", None)
    decisions = getattr(method, "decisions", {})
    if not history:
        placed = "; ".join(f"{name}: {decision['kind'] or 'kind unknown'}, {decision['why']}"
                           for name, decision in decisions.items())
        return [], f"auto ran as Merge (no local concept to place){': ' + placed if placed else ''}"
    overlays, notes = [], []
    for step, found in history:
        regions = [(lora.name, area, f"step {step}") for lora, area in zip(method.loras, auto_regions(method, found))]
        step_overlays, note = _region_overlays(image, regions, f"Automatic masks at step {step}")
        overlays += step_overlays
        notes.append(note)
    kinds = "; ".join(f"{name}: {decision['kind'] or 'kind unknown'} -> {decision['placement']}"
                      for name, decision in decisions.items())
    return overlays, "  \n".join([*notes, f"Kinds: {kinds}"])


def auto_regions(method: Any, found: Any) -> list[np.ndarray]:
    """Each LoRA's region in the first image (bool, latent cells) from one automatic mask estimate:
    a local concept its mask, a background (with ``background_outside``) or a style (without
    ``style_inside``) where no local concept is, any other LoRA the whole image."""
    owner = found.latent_owner[0].cpu().numpy()
    local = {lora.name: index for index, lora in enumerate(method.local)}
    regions = []
    for lora in method.loras:
        kind = method.decisions.get(lora.name, {}).get("kind")
        if lora.name in local:
            regions.append(owner == local[lora.name] + 1)
        elif (kind == "background" and method.background_outside) or (kind == "style" and not method.style_inside):
            regions.append(owner == 0)
        else:
            regions.append(np.ones_like(owner, dtype=bool))
    return regions


def _region_overlays(image: Image.Image, regions: list[tuple[str, np.ndarray, str]], title: str) -> View:
    """One overlay per (name, bool mask, detail): the image tinted in the LoRA's colour where its mask is."""
    base = image.convert("RGB")
    overlays, shares = [], []
    for index, (name, region, detail) in enumerate(regions):
        share = f"{np.mean(region):.0%}"
        caption = f"{name} ({detail}, {share})" if detail else f"{name} ({share})"
        overlays.append((_tint(base, [region], [index]), caption))
        shares.append(f"{name} {share}")
    return overlays, f"{title}: " + ", ".join(shares)


VIEWS: dict[str, Callable[[Any, Image.Image], View]] = {
    "composer": composer_view,
    "clora": clora_view,
    "tara": tara_view,
    "regional": regional_view,
    "auto": auto_view,
}


def method_view(method: Any, image: Image.Image) -> View:
    """Overlays and a note for this method's last run (nothing for methods without a view)."""
    view = VIEWS.get(getattr(method, "name", ""))
    return view(method, image) if view is not None else ([], "")
