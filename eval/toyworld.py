"""The toy-world testbed: concept LoRAs whose presence in an image is checked exactly.

A ``toyworld:`` section of a suite stands for the toy world's concept LoRAs, every composition
set of the given sizes (prompts, LoRA-Composer boxes and region prompts from ``toyworld.concepts``) and the
toy model's generation settings; the runner then asks the detector, for every image, which of its
set's concepts are present (``concepts_present``, ``all_present`` in the manifest).

    toyworld:
      lora_dir: null        # the concept LoRAs (default: the embedded toy world's)
      concepts: [moxel, lunzor, checkered, ambrel]
      sizes: [2, 3]
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from loracompose.errors import UserError

DETECTOR = "toyworld"
SECTION_KEYS = {"lora_dir", "concepts", "sizes"}
# The toy model's generation settings (CFG 4: see the README's toy-world section).
REFERENCE_SETTINGS: dict[str, Any] = {"steps": 20, "guidance": 4.0, "scheduler": "dpmsolver++", "width": 32,
                                      "height": 32, "append_triggers": False, "lora_weight": 1.0}


def composition_sets(names: Sequence[str], size: int) -> list[dict[str, Any]]:
    """Every set of ``size`` concepts (in the order given) that fits one image, with its prompt and boxes."""
    from loracompose.toyworld.concepts import BACKGROUND, CONCEPTS, OBJECT, OBJECT_SLOTS, STYLE, composition

    sets = []
    for combo in itertools.combinations(names, size):
        kinds = Counter(CONCEPTS[name].kind for name in combo)
        if kinds[OBJECT] > len(OBJECT_SLOTS) or kinds[BACKGROUND] > 1 or kinds[STYLE] > 1:
            continue  # more objects than slots, or two backgrounds or styles, cannot all show
        planned = composition(combo)
        sets.append({"id": "+".join(combo), "loras": list(combo), "prompt": planned.prompt,
                     "boxes": [list(box) for box in planned.boxes], "region_prompts": list(planned.region_prompts)})
    return sets


def testbed(section: Any, data: Mapping[str, Any], resolve: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(suite settings, LoRA entries) a ``toyworld:`` section stands for."""
    from loracompose.toyworld.concepts import CONCEPTS

    if not isinstance(section, Mapping):
        raise UserError("suite toyworld: give a mapping (lora_dir, concepts, sizes), or {} for the embedded toy world")
    unknown = sorted(set(section) - SECTION_KEYS)
    if unknown:
        raise UserError(f"suite toyworld key {unknown[0]!r} is not known; use {', '.join(sorted(SECTION_KEYS))}")
    if "loras" in data or "sets" in data:
        raise UserError("suite: give either toyworld: or loras:/sets:, not both")
    names = [str(name) for name in section.get("concepts") or CONCEPTS]
    for name in names:
        if name not in CONCEPTS:
            raise UserError(f"suite toyworld concept {name!r} is not known; use {', '.join(CONCEPTS)}")
    model, lora_dir = _model_and_lora_dir(section, data, resolve)
    sizes = section.get("sizes", [2, 3])
    if not isinstance(sizes, list) or not all(isinstance(size, int) and 1 <= size <= len(names) for size in sizes):
        raise UserError(f"suite toyworld sizes {sizes!r}: give a list of set sizes between 1 and {len(names)}")
    loras = {name: {"file": str(Path(lora_dir) / f"{name}.safetensors"), "triggers": list(CONCEPTS[name].trigger_words),
                    "category": CONCEPTS[name].kind} for name in names}
    sets = [entry for size in sizes for entry in composition_sets(names, size)]
    settings = {**REFERENCE_SETTINGS, "model": model, "loras": loras, "sets": sets, "detector": DETECTOR,
                "name": "toyworld", "style": DETECTOR}
    return settings, loras


def _model_and_lora_dir(section: Mapping[str, Any], data: Mapping[str, Any], resolve: Any) -> tuple[str, str]:
    """The suite's model and ``lora_dir``; the embedded toy world's for what the suite does not give."""
    model = data.get("model")
    lora_dir = resolve(section["lora_dir"]) if section.get("lora_dir") is not None else None
    if model is None or lora_dir is None:
        from loracompose.assets.embedded import embedded_default

        default = embedded_default()
        model = model if model is not None else default.model_dir
        lora_dir = lora_dir if lora_dir is not None else default.loras[0].path.parent
    return str(model), str(lora_dir)


def detect_concepts(image: Any, loras: Sequence[str]) -> dict[str, Any]:
    """The manifest fields of one image: which of its concepts the detector sees, and whether all."""
    from loracompose.toyworld.concepts import CONCEPTS
    from loracompose.toyworld.detector import detect

    detection = detect(image)
    present = {name: bool(CONCEPTS[name].present(detection)) for name in loras}
    return {"concepts_present": present, "all_present": all(present.values())}
