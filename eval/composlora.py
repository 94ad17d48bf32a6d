"""The ComposLoRA testbed (Zhong et al. 2024; docs/evaluation.md): 22 LoRAs, 5 categories, 480 sets.

    for each style, for N in 2..5:
        for each choice of N-1 categories out of the non-character ones, in the info file's key order:
            for each character x one instance of each chosen category (character varies slowest):
                set <- [character, chosen instances in key order]
    prompt <- style prefix + ", " + every trigger word of the set, comma-joined, in set order

Per style that is 24 / 72 / 96 / 48 sets for N = 2 / 3 / 4 / 5. The LoRA metadata is MLC's
``anime_lora_info.json`` / ``reality_lora_info.json`` (copied below; those files can also be read
directly), and the LoRA files are ``<lora_dir>/<style>/<id>.safetensors`` as unpacked from
``ComposLoRA.zip`` (``<lora_dir>/<id>.safetensors`` is accepted too).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from loracompose.errors import UserError

STYLES = ("anime", "reality")
CHARACTER = "character"

PROMPT_PREFIX = {
    "anime": "masterpiece, best quality",
    "reality": "RAW photo, subject, 8k uhd, dslr, high quality, Fujifilm XT3, half-length portrait from knees up",
}
# MLC-code utils.get_prompt. "EasyNegative" is a textual-inversion name that MLC never loads: plain words.
NEGATIVE_PROMPT = {
    "anime": (
        "EasyNegative, extra fingers, extra limbs, fewer fingers, fewer limbs, multiple girls, multiple views, "
        "worst quality, low quality, depth of field, blurry, greyscale, 3D face, cropped, lowres, text, jpeg "
        "artifacts, signature, watermark, username, blurry, artist name, trademark, watermark, title, reference "
        "sheet, curvy, plump, fat, muscular female, strabismus, clothing cutout, side slit, tattoo, nsfw"
    ),
    "reality": (
        "extra heads, nsfw, deformed iris, deformed pupils, semi-realistic, cgi, 3d, render, sketch, cartoon, "
        "drawing, anime, text, cropped, out of frame, worst quality, low quality, jpeg artifacts, ugly, duplicate, "
        "morbid, mutilated, extra fingers, mutated hands, poorly drawn hands, poorly drawn face, mutation, "
        "deformed, blurry, dehydrated, bad anatomy, bad proportions, extra limbs, cloned face, disfigured, gross "
        "proportions, malformed limbs, missing arms, missing legs, extra arms, extra legs, fused fingers, too "
        "many fingers, long neck"
    ),
}
# MLC's defaults per style. Suite keys; a suite file may override any of them.
REFERENCE_SETTINGS: dict[str, dict[str, Any]] = {
    "anime": {"model": "gsdf/Counterfeit-V2.5", "steps": 200, "guidance": 10.0, "width": 512, "height": 512,
              "lora_weight": 0.8, "seeds": [111], "scheduler": "dpmsolver++", "dtype": "fp32"},
    "reality": {"model": "SG161222/Realistic_Vision_V5.1_noVAE", "vae": "stabilityai/sd-vae-ft-mse", "steps": 100,
                "guidance": 7.0, "width": 768, "height": 1024, "lora_weight": 0.8, "seeds": [111],
                "scheduler": "dpmsolver++", "dtype": "fp32"},
}


def _entries(*rows: tuple[str, str, Sequence[str]]) -> list[dict[str, Any]]:
    return [{"id": lora_id, "name": name, "trigger": list(triggers)} for lora_id, name, triggers in rows]


# MLC-code anime_lora_info.json / reality_lora_info.json (ids, names, triggers; civitai URLs left out).
BUILTIN_LORA_INFO: dict[str, dict[str, list[dict[str, Any]]]] = {
    "anime": {
        "character": _entries(
            ("character_1", "Kamado Nezuko", ["kamado nezuko", "black hair", "pink eyes", "forehead"]),
            ("character_2", "Texas the Omertosa in Arknights", ["omertosa", "1girl", "wolf ears", "long hair"]),
            ("character_3", "Son Goku", ["son goku", "spiked hair", "muscular male", "wristband"]),
        ),
        "clothing": _entries(
            ("clothing_1", "Garreg Mach Monastery Uniform", ["gmuniform", "blue thighhighs", "long sleeves"]),
            ("clothing_2", "Zero Suit (Metroid)", ["zero suit", "blue gloves", "high heels"]),
        ),
        "style": _entries(
            ("style_1", "Hand-drawn Style", ["lineart", "hand-drawn style"]),
            ("style_2", "Shuimobysim (Chinese Ink Wash Style)", ["shuimobysim", "traditional chinese ink painting"]),
        ),
        "background": _entries(
            ("background_1", "Bamboolight Background", ["bamboolight", "outdoors", "bamboo"]),
            ("background_2", "Auroral Background", ["auroral", "starry sky", "outdoors"]),
        ),
        "object": _entries(
            ("object_1", "Huge Two-Handed Burger", ["two-handed burger", "holding a huge burger with both hands"]),
            ("object_2", "Toast", ["toast", "toast in mouth"]),
        ),
    },
    "reality": {
        "character": _entries(
            ("character_1", "IU (Lee Ji Eun, Korean singer)",
             ["iu1", "long straight black hair", "hazel eyes", "diamond stud earrings"]),
            ("character_2", "Scarlett Johansson", ["scarlett", "short red hair", "blue eyes"]),
            ("character_3", "The Rock (Dwayne Johnson)",
             ["th3r0ck with no hair", "muscular male", "serious look on his face"]),
        ),
        "clothing": _entries(
            ("clothing_1", "Thai University Uniform",
             ["mahalaiuniform", "white shirt short sleeves", "black pencil skirt"]),
            ("clothing_2", "School Dress", ["school uniform", "white shirt", "red tie", "blue pleated microskirt"]),
        ),
        "style": _entries(
            ("style_1", "Japanese Film Color Style", ["film overlay", "film grain"]),
            ("style_2", "Bright Style", ["bright lighting"]),
        ),
        "background": _entries(
            ("background_1", "Library Bookshelf Background", ["lib_bg", "library bookshelf"]),
            ("background_2", "Forest Background", ["slg", "river", "forest"]),
        ),
        "object": _entries(
            ("object_1", "Umbrella", ["transparent umbrella"]),
            ("object_2", "Bubble Gum", ["blow bubble gum"]),
        ),
    },
}


@dataclass(frozen=True)
class TestbedLora:
    """One LoRA of the testbed: its id (the file stem and adapter name), name, category, triggers."""

    __test__ = False  # not a pytest test class despite the name

    id: str
    name: str
    category: str
    trigger_words: tuple[str, ...]


@dataclass(frozen=True)
class TestbedSet:
    """One composition set: a character first, then one LoRA per chosen category, in key order."""

    __test__ = False

    loras: tuple[TestbedLora, ...]

    @property
    def id(self) -> str:
        return "+".join(lora.id for lora in self.loras)

    @property
    def trigger_words(self) -> list[str]:
        return [word for lora in self.loras for word in lora.trigger_words]


def check_style(style: str) -> str:
    if style not in STYLES:
        raise UserError(f"composlora style {style!r} is not known; use 'anime' or 'reality'")
    return style


def builtin_lora_info(style: str) -> list[TestbedLora]:
    """The 11 LoRAs of a style, categories in the info file's key order."""
    return parse_lora_info(BUILTIN_LORA_INFO[check_style(style)], f"built-in {style} info")


def read_lora_info(path: str | Path) -> list[TestbedLora]:
    """LoRAs from one of MLC's ``*_lora_info.json`` files ({category: [{id, name, trigger}, ...]})."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"composlora info file {path} not found; give the path of MLC's anime_lora_info.json "
                        "or reality_lora_info.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"composlora info file {path} is not valid JSON ({error}); "
                        "use MLC's *_lora_info.json") from None
    return parse_lora_info(data, str(path))


def parse_lora_info(data: Any, source: str) -> list[TestbedLora]:
    if not isinstance(data, Mapping) or CHARACTER not in data:
        raise UserError(f"composlora info {source}: expected a JSON object of categories including 'character'")
    loras: list[TestbedLora] = []
    for category, entries in data.items():
        if not isinstance(entries, list) or not entries:
            raise UserError(f"composlora info {source}: category {category!r} must list at least one LoRA")
        loras.extend(_parse_entry(entry, category, source) for entry in entries)
    ids = [lora.id for lora in loras]
    duplicate = next((lora_id for lora_id in ids if ids.count(lora_id) > 1), None)
    if duplicate:
        raise UserError(f"composlora info {source}: LoRA id {duplicate!r} appears twice; ids must be unique")
    return loras


def _parse_entry(entry: Any, category: str, source: str) -> TestbedLora:
    if not (isinstance(entry, Mapping) and isinstance(entry.get("id"), str) and isinstance(entry.get("trigger"), list)):
        raise UserError(f"composlora info {source}: each {category!r} entry needs an 'id' and a 'trigger' list")
    if not re.match(r"^[A-Za-z0-9_-]+$", entry["id"]):
        raise UserError(f"composlora info {source}: id {entry['id']!r} must use letters, digits, '_' and '-' only")
    triggers = tuple(str(word).strip() for word in entry["trigger"] if str(word).strip())
    return TestbedLora(entry["id"], str(entry.get("name", entry["id"])), category, triggers)


def categories(loras: Sequence[TestbedLora]) -> list[str]:
    """Categories in first-seen (info file key) order."""
    return list(dict.fromkeys(lora.category for lora in loras))


def set_sizes(loras: Sequence[TestbedLora]) -> list[int]:
    """Every possible set size: 2 up to one character plus one of every other category (2..5 here)."""
    return list(range(2, len(categories(loras)) + 1))


def composition_sets(loras: Sequence[TestbedLora], size: int) -> list[TestbedSet]:
    """Every set of ``size`` LoRAs: one character plus one LoRA from each of size-1 other categories."""
    by_category = {name: [lora for lora in loras if lora.category == name] for name in categories(loras)}
    others = [name for name in by_category if name != CHARACTER]
    if CHARACTER not in by_category:
        raise UserError("composlora: the LoRA info has no 'character' category; every set needs one character")
    if not 1 <= size - 1 <= len(others):
        raise UserError(f"composlora size {size}: use 2 to {len(others) + 1} (one character plus other categories)")
    sets: list[TestbedSet] = []
    for chosen in itertools.combinations(others, size - 1):
        groups = [by_category[CHARACTER], *(by_category[name] for name in chosen)]
        sets.extend(TestbedSet(tuple(combo)) for combo in itertools.product(*groups))
    return sets


def prompt_for(style: str, testbed_set: TestbedSet) -> str:
    """MLC's prompt: the style prefix, then every trigger word of the set in set order."""
    return PROMPT_PREFIX[check_style(style)] + ", " + ", ".join(testbed_set.trigger_words)


def lora_file(lora_dir: Path, style: str, lora_id: str) -> Path:
    """``<lora_dir>/<style>/<id>.safetensors`` (MLC's layout), else ``<lora_dir>/<id>.safetensors``."""
    nested = lora_dir / style / f"{lora_id}.safetensors"
    flat = lora_dir / f"{lora_id}.safetensors"
    return nested if nested.is_file() or not flat.is_file() else flat
