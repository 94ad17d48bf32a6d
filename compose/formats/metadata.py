"""What a LoRA file's metadata says about it: trigger words, display name, base model family.

kohya-ss (``ss_*``) and modelspec (``modelspec.*``) keys, as written by the trainers users have.
"""

from __future__ import annotations

import json
import re
from typing import Mapping

TAG_FREQUENCY_KEY = "ss_tag_frequency"
DISPLAY_NAME_KEYS = ("ss_output_name", "modelspec.title")
FAMILY_KEYS = ("modelspec.architecture", "ss_base_model_version")
MAX_TAG_TRIGGERS = 3

# Base model families as kohya / modelspec name them: (id, display name, substrings of the lower-cased
# value). Checked in order: the first match wins ("pixart-xl" is PixArt, not SDXL).
FAMILIES = (
    ("flux", "FLUX", ("flux",)),
    ("sd3", "SD3", ("sd3", "stable-diffusion-v3", "sd_3")),
    ("cascade", "Stable Cascade", ("cascade",)),
    ("pixart", "PixArt", ("pixart",)),
    ("hunyuan", "Hunyuan-DiT", ("hunyuan",)),
    ("auraflow", "AuraFlow", ("auraflow",)),
    ("sdxl", "SDXL", ("xl",)),
    ("sd2", "SD2.x", ("sd_v2", "sd_2", "sd2", "stable-diffusion-v2", "v2-")),
    ("sd15", "SD1.5", ("sd_v1", "sd1", "stable-diffusion-v1", "v1-")),
)
FAMILY_NAMES = {family: name for family, name, _ in FAMILIES}


def tag_totals(value: str | None) -> list[tuple[str, int]]:
    """kohya's ``ss_tag_frequency`` ({folder: {tag: count}}) as (tag, count summed over folders), most
    frequent first (ties in the order the tags first appear)."""
    try:
        folders = json.loads(value) if value else {}
    except json.JSONDecodeError:
        return []
    totals: dict[str, int] = {}
    for tags in folders.values() if isinstance(folders, dict) else []:
        for tag, count in tags.items() if isinstance(tags, dict) else []:
            tag = re.sub(r"\s+", " ", str(tag)).strip()
            if tag and isinstance(count, (int, float)):
                totals[tag] = totals.get(tag, 0) + int(count)
    return sorted(totals.items(), key=lambda item: -item[1])  # stable: first appearance breaks ties


def triggers_from_tag_frequency(value: str | None) -> tuple[str, ...]:
    """The most frequent training tags: those with the top summed count (at most 3), in file order.

    A trigger word is in every caption, so it has the top count; a tag in fewer captions is not one.
    """
    totals = tag_totals(value)
    if not totals:
        return ()
    top = totals[0][1]
    return tuple(tag for tag, count in totals if count == top)[:MAX_TAG_TRIGGERS]


def display_name(metadata: Mapping[str, str]) -> str | None:
    """kohya's ``ss_output_name`` (the name the trainer saved it under), else ``modelspec.title``."""
    return next((metadata[key].strip() for key in DISPLAY_NAME_KEYS if metadata.get(key, "").strip()), None)


def declared_family(metadata: Mapping[str, str]) -> tuple[str, str] | None:
    """``(family id, "key 'value'")`` of the base model family the metadata declares, or None."""
    for key in FAMILY_KEYS:
        value = (metadata.get(key) or "").strip()
        lowered = value.lower()
        for family, _, patterns in FAMILIES:
            if any(pattern in lowered for pattern in patterns):
                return family, f"{key} {value!r}"
    return None
