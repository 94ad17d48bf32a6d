"""A1111-style LoRA tags in prompts: ``<lora:NAME:WEIGHT>`` (``<lyco:...>`` is the same) pick
``NAME.safetensors`` from a LoRA folder (``--lora-dir`` or ``LORACOMPOSE_LORA_DIR``).

A tag is removed from the prompt and becomes a :class:`~loracompose.lora.LoraSpec` at that weight, so
``"a cat <lora:zkx:0.8>"`` is exactly ``"a cat"`` with ``--lora DIR/zkx.safetensors:0.8``. The weight
defaults to 1. ``<lora:NAME:TE_W:UNET_W>`` gives the text encoders their own strength, and a last
``:lbw=...`` item per-block strengths (a lora-block-weight vector or preset name: ``<lora:zkx:0.8:lbw=INALL>``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from loracompose.errors import UserError
from loracompose.lora import LoraSpec

LORA_DIR_VARIABLE = "LORACOMPOSE_LORA_DIR"
_TAG = re.compile(r"<(?:lora|lyco):([^<>]*)>", flags=re.IGNORECASE)


def lora_dir_from(value: str | Path | None) -> Path | None:
    """The LoRA folder: ``value`` if given, else ``$LORACOMPOSE_LORA_DIR``, else None."""
    chosen = value if value not in (None, "") else os.environ.get(LORA_DIR_VARIABLE) or None
    return Path(chosen).expanduser() if chosen is not None else None


def has_lora_tags(prompt: str) -> bool:
    return bool(_TAG.search(prompt))


def split_lora_tags(prompt: str, lora_dir: str | Path | None = None) -> tuple[str, list[LoraSpec]]:
    """``(prompt without its LoRA tags, one LoraSpec per tag in order)``.

    Raises:
        UserError: a tag without a LoRA folder, a malformed tag, a name no file has or several files have.
    """
    tags = list(_TAG.finditer(prompt))
    if not tags:
        return prompt, []
    folder = lora_dir_from(lora_dir)
    if folder is None or not folder.is_dir():
        where = f"{folder} is not a folder" if folder is not None else "no LoRA folder is set"
        raise UserError(f"prompt tag {tags[0].group(0)!r} needs a LoRA folder but {where}; pass --lora-dir DIR "
                        f"(or set {LORA_DIR_VARIABLE})")
    specs = [_spec(match.group(0), match.group(1), folder) for match in tags]
    return _without_tags(prompt), specs


def _spec(tag: str, body: str, folder: Path) -> LoraSpec:
    name, *weights = [part.strip() for part in body.split(":")]
    lbw_text = weights.pop()[len("lbw="):] if weights and weights[-1].startswith("lbw=") else None
    if not name or len(weights) > 2:
        raise UserError(f"prompt tag {tag!r} is malformed; write <lora:NAME>, <lora:NAME:WEIGHT> or "
                        "<lora:NAME:TE_WEIGHT:UNET_WEIGHT>, optionally ending in :lbw=PRESET_OR_VECTOR")
    numbers = [_number(tag, value) for value in weights]
    block_weights: Mapping[str, Any] | None = None
    if lbw_text is not None:
        from loracompose.formats.block_weights import lbw_block_weights

        block_weights = lbw_block_weights(lbw_text, f"prompt tag {tag!r}")
    path = find_lora(name, folder)
    if len(numbers) == 2:
        return LoraSpec(path, weight=numbers[1], text_encoder_weight=numbers[0], block_weights=block_weights)
    return LoraSpec(path, weight=numbers[0] if numbers else 1.0, block_weights=block_weights)


def _number(tag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"prompt tag {tag!r}: weight {text!r} is not a number, e.g. <lora:NAME:0.8>") from None


def find_lora(name: str, folder: Path) -> Path:
    """``folder/NAME.safetensors``, else the one file named ``NAME.safetensors`` in its subfolders.

    A name never leaves the folder (no absolute paths, no ``..``): a served UI takes prompts from anyone.
    """
    if Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
        raise UserError(f"LoRA name {name!r} in a prompt tag must be a name inside the LoRA folder, e.g. "
                        "<lora:style:0.8> or <lora:folder/style:0.8>")
    direct = folder / f"{name}.safetensors"
    if direct.is_file():
        return direct
    candidates = sorted(path for path in folder.rglob("*.safetensors")
                        if path.is_file() and path.relative_to(folder).with_suffix("").as_posix().endswith(name)
                        and path.stem == Path(name).name)
    if not candidates:
        raise UserError(f"no LoRA named {name!r} in {folder} or its subfolders; check the name in the prompt tag")
    if len(candidates) > 1:
        listed = ", ".join(str(path.relative_to(folder)) for path in candidates)
        raise UserError(f"LoRA name {name!r} matches several files in {folder} ({listed}); write the subfolder "
                        "too, e.g. <lora:folder/name:0.8>")
    return candidates[0]


def _without_tags(prompt: str) -> str:
    """The prompt with its tags removed and the separators they leave behind tidied."""
    text = _TAG.sub(" ", prompt)
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\s+,", ",", text)
    return text.strip().strip(",").strip()


def with_prompt_loras(prompt: str, loras: Sequence, lora_dir: str | Path | None) -> tuple[str, list]:
    """``(prompt without tags, loras + the tags' LoRAs)``: what ``generate`` and the front ends call."""
    cleaned, tagged = split_lora_tags(prompt, lora_dir)
    return cleaned, [*loras, *tagged]
