"""The LoRA library: specs, safetensors validation, metadata (triggers, category), loading.

A :class:`LoraSpec` is what a user asks for (a file and a strength); a :class:`LoadedLora` is that
file checked and read (adapter name, trigger words, category, architecture). Files are only ever
read as safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, cast

from safetensors import SafetensorError, safe_open

from loracompose.errors import UserError, first_line
from loracompose.formats.metadata import (FAMILY_NAMES, TAG_FREQUENCY_KEY, declared_family, display_name,
                                          triggers_from_tag_frequency)
from loracompose.validation import check_finite_tensors, check_lora_weight, check_tensor_bytes_fit, regular_file

SD15 = "sd15"
SDXL = "sdxl"
FLUX = "flux"
SD3 = "sd3"
ARCHITECTURE_NAMES = {**FAMILY_NAMES, SD15: "SD1.5", SDXL: "SDXL", FLUX: "FLUX", SD3: "SD3"}
# Key fragments only a FLUX transformer has (diffusers names, then BFL/kohya names); SD3's MMDiT has
# joint (double-stream) blocks only, and patch-embeds with ``pos_embed`` rather than ``x_embedder``.
FLUX_KEY_MARKERS = ("single_transformer_blocks", "x_embedder", "guidance_embedder", "double_blocks",
                    "single_blocks")
SD3_KEY_MARKERS = ("joint_blocks",)
FLUX_DOUBLE_BLOCKS = 19
_JOINT_BLOCK = re.compile(r"^(?:transformer\.transformer_blocks\.|lora_transformer_transformer_blocks_)(\d+)[._]")

# Metadata keys that carry trigger words in files found in the wild (first match wins).
TRIGGER_KEYS = ("modelspec.trigger_phrase", "ss_trigger_words", "trigger_words", "loracompose.triggers")
CATEGORY_KEYS = ("loracompose.category", "modelspec.category")
TITLE_KEYS = ("modelspec.title", "ss_output_name")
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own bound on a header


@dataclass(frozen=True)
class LoraSpec:
    """What the user asks for: a LoRA file at a strength.

    Args:
        path: a ``.safetensors`` LoRA file (diffusers/PEFT or kohya naming).
        weight: the LoRA's strength (its PEFT adapter weight), in every method.
        name: adapter name; defaults to the file name without suffix.
        trigger_words: words that invoke the concept; default: read from the file's metadata.
        category: character, clothing, style, background, object, ...; default: from metadata.
        text_encoder_weight: the text encoders' strength when it differs from ``weight`` (A1111's
            ``<lora:NAME:TE_W:UNET_W>``); None: ``weight``.
        block_weights: per-block strengths in diffusers' ``set_adapters`` dict form (see
            :mod:`loracompose.formats.block_weights`), multiplied by ``weight``; None: every layer alike.
            A string is an A1111 lora-block-weight vector or preset name, as after ``lbw=`` ("INALL").
    """

    path: Path
    weight: float = 1.0
    name: str | None = None
    trigger_words: tuple[str, ...] | None = None
    category: str | None = None
    text_encoder_weight: float | None = None
    block_weights: Mapping[str, Any] | str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "weight", check_lora_weight(self.weight, f"LoRA {self.name or self.path.name}"))
        if self.trigger_words is not None:
            object.__setattr__(self, "trigger_words", tuple(self.trigger_words))
        if self.text_encoder_weight is not None:
            object.__setattr__(self, "text_encoder_weight", check_lora_weight(
                self.text_encoder_weight, f"LoRA {self.name or self.path.name} text-encoder weight"))
        if isinstance(self.block_weights, str):
            from loracompose.formats.block_weights import lbw_block_weights

            object.__setattr__(self, "block_weights", lbw_block_weights(
                self.block_weights, f"LoRA {self.name or self.path.name}"))

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """Parse the CLI form ``PATH[:WEIGHT][:lbw=V1,V2,...]`` (an A1111 lora-block-weight vector or
        preset name, e.g. ``lbw=INALL``)."""
        head, marker, vector = text.partition(":lbw=")
        if marker:
            from loracompose.formats.block_weights import lbw_block_weights

            return replace(cls.parse(head), block_weights=lbw_block_weights(vector, f"--lora {text!r}"))
        if text.lower().endswith(".safetensors"):  # a file name may hold colons: weird:name.safetensors
            return cls(Path(text))
        path, sep, weight = text.rpartition(":")
        if sep and path and _looks_like_number(weight):
            return cls(Path(path), weight=float(weight))
        if sep and path and not weight.startswith(("\\", "/")) and "/" not in weight:
            raise UserError(f"--lora {text!r}: weight {weight!r} is not a number; use PATH or PATH:WEIGHT, "
                            "e.g. style.safetensors:0.8")
        return cls(Path(text))


@dataclass(frozen=True)
class LoadedLora:
    """A checked LoRA file, ready to be loaded into a pipeline as a PEFT adapter."""

    path: Path
    name: str
    weight: float
    trigger_words: tuple[str, ...]
    category: str | None
    architecture: str | None
    has_text_encoder: bool
    metadata: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    text_encoder_weight: float | None = None  # the text encoders' own strength, if it differs
    block_weights: Mapping[str, Any] | None = field(default=None, compare=False)  # set_adapters dict form

    @property
    def text_encoder_scale(self) -> float:
        """Text-encoder strength relative to ``weight``: baked into the loaded text-encoder layers, so any
        strength a method sets keeps the ratio (an exact ``<lora:NAME:TE_W:UNET_W>``)."""
        if self.text_encoder_weight is None or self.text_encoder_weight == self.weight:
            return 1.0
        if self.weight == 0:
            raise UserError(f"LoRA {self.path}: a UNet weight of 0 with text-encoder weight "
                            f"{self.text_encoder_weight} cannot be expressed; use a small UNet weight instead")
        return self.text_encoder_weight / self.weight

    def with_weight(self, weight: float) -> LoadedLora:
        return replace(self, weight=weight)

    @property
    def display_name(self) -> str:
        """kohya's ``ss_output_name`` (else ``modelspec.title``, else the adapter name), for lists and UIs."""
        return display_name(self.metadata) or self.name

    def describe(self) -> dict:
        """A JSON-ready summary for sidecars and reports (strengths other than ``weight`` only when set)."""
        described = {
            "path": str(self.path),
            "name": self.name,
            "weight": self.weight,
            "trigger_words": list(self.trigger_words),
            "category": self.category,
        }
        if self.text_encoder_weight is not None:
            described["text_encoder_weight"] = self.text_encoder_weight
        if self.block_weights is not None:  # the lbw text as written, else the dict form
            described["block_weights"] = getattr(self.block_weights, "spelled", "") or dict(self.block_weights)
        return described


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def adapter_name_for(path: Path) -> str:
    """A PEFT-safe adapter name from a file name (PEFT forbids dots in adapter names)."""
    name = re.sub(r"[^0-9A-Za-z_-]+", "_", path.stem).strip("_")
    return name or "lora"


def read_safetensors_header(path: Path) -> tuple[dict[str, str], list[str]]:
    """Return (metadata, tensor keys) of a safetensors file, or raise UserError naming the file."""
    regular_file(path, "LoRA file")  # a FIFO named .safetensors would block the reader forever
    if path.suffix.lower() != ".safetensors":
        raise UserError(
            f"LoRA file {path} is not a .safetensors file; only safetensors are loaded (pickled "
            "formats like .ckpt/.pt/.bin can run code): convert it to safetensors first"
        )
    promised = _promised_tensor_bytes(path)
    if promised is not None:  # before safe_open, which maps the whole file (a sparse file can promise terabytes)
        check_tensor_bytes_fit(path, promised, "LoRA file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise UserError(f"LoRA file {path} is truncated or not a valid safetensors file ({first_line(error)}); "
                        "re-download it") from None
    _check_tensor_data_present(path, keys)
    return metadata, keys


def _promised_tensor_bytes(path: Path) -> int | None:
    """The tensor bytes a safetensors header promises (None if the header cannot be read: safe_open
    then says why)."""
    try:
        with open(path, "rb") as raw:
            header_size = int.from_bytes(raw.read(8), "little")
            if header_size > MAX_HEADER_BYTES:
                return None
            header = json.loads(raw.read(header_size))
        return max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                   default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def _check_tensor_data_present(path: Path, keys: Sequence[str]) -> None:
    """safetensors only reads the header at open; make sure the data it promises is in the file."""
    with open(path, "rb") as raw:
        header_size = int.from_bytes(raw.read(8), "little")
        header = json.loads(raw.read(header_size))
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_size + data_end > path.stat().st_size:
        raise UserError(f"LoRA file {path} is truncated (its header promises more data than the file holds); "
                        "re-download it")
    if not keys:
        raise UserError(f"LoRA file {path} holds no tensors; it is not a LoRA")


def check_lora_tensors(path: Path) -> None:
    """Read a LoRA file's tensors and refuse NaN or infinite values (before they reach a model, where
    one Inf turns every later image black)."""
    from safetensors.torch import load_file

    regular_file(path, "LoRA file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise UserError(f"LoRA file {path} cannot be read ({first_line(error)}); re-download it") from None
    check_finite_tensors(tensors, f"LoRA file {path}")


def trigger_words_from_metadata(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """Trigger words from safetensors metadata, as written by kohya, modelspec or loracompose; else
    the most frequent tags of kohya's ``ss_tag_frequency`` (counts summed over folders, top first)."""
    for key in TRIGGER_KEYS:
        value = metadata.get(key)
        if not value:
            continue
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        items = parsed if isinstance(parsed, list) else str(parsed).split(",")
        words = tuple(str(word).strip() for word in items if str(word).strip())
        if words:
            return words
    return triggers_from_tag_frequency(metadata.get(TAG_FREQUENCY_KEY))


def _first(metadata: Mapping[str, str], keys: Iterable[str]) -> str | None:
    return next((metadata[key] for key in keys if metadata.get(key)), None)


def architecture_from_file(metadata: Mapping[str, str], keys: Sequence[str]) -> str | None:
    """SD15, SDXL, another family's id (formats.metadata.FAMILIES) or None (unknown), from the
    metadata, then from key names."""
    declared = declared_family(metadata)
    if declared:
        return declared[0]
    dit = _dit_architecture(keys)
    if dit:
        return dit
    if any(key.startswith(("transformer.", "lora_transformer_")) for key in keys):
        return None  # a transformer's first joint blocks by diffusers names: FLUX or SD3 (the converter checks)
    if any(key.startswith(("text_encoder_2.", "lora_te2_")) for key in keys):
        return SDXL
    if any("transformer_blocks.1." in key or "_transformer_blocks_1_" in key for key in keys):
        return SDXL  # SD1.5 has exactly one transformer block per attention module
    return None


def _dit_architecture(keys: Sequence[str]) -> str | None:
    """FLUX or SD3 from DiT key names, or None when the keys name no DiT transformer."""
    if any(marker in key for key in keys for marker in SD3_KEY_MARKERS):
        return SD3  # first: SD3's reference names have an x_embedder too (joint_blocks / x_embedder.proj)
    if any(marker in key for key in keys for marker in FLUX_KEY_MARKERS):
        return FLUX
    if any(_joint_block_index(key) >= FLUX_DOUBLE_BLOCKS for key in keys):
        return SD3  # a joint block past FLUX.1's last double block (SD3 medium has 24, SD3.5 large 38)
    return None  # diffusers names of the first joint blocks only: FLUX's double blocks and SD3's look alike


def _joint_block_index(key: str) -> int:
    match = _JOINT_BLOCK.match(key)
    return int(match[1]) if match else -1


def inspect_lora(spec: LoraSpec) -> LoadedLora:
    """Check a LoRA file and read its metadata, without loading any tensors."""
    metadata, keys = read_safetensors_header(spec.path)
    if not any(part in key for key in keys for part in ("lora", "hada_", "lokr_")):
        raise UserError(f"LoRA file {spec.path} has no LoRA tensors (no key contains 'lora', 'hada_' or 'lokr_'); "
                        "is it a full model checkpoint?")
    triggers = spec.trigger_words if spec.trigger_words is not None else trigger_words_from_metadata(metadata)
    return LoadedLora(
        path=spec.path,
        name=spec.name or adapter_name_for(spec.path),
        weight=float(spec.weight),
        trigger_words=tuple(triggers),
        category=spec.category or _first(metadata, CATEGORY_KEYS),
        architecture=architecture_from_file(metadata, keys),
        has_text_encoder=any(key.startswith(("text_encoder", "lora_te")) for key in keys),
        text_encoder_weight=spec.text_encoder_weight,
        block_weights=cast("Mapping[str, Any] | None", spec.block_weights),  # a string was parsed in __post_init__
        metadata=metadata,
    )


def inspect_loras(specs: Sequence[LoraSpec]) -> list[LoadedLora]:
    """Inspect every spec; duplicate adapter names are an error naming both files."""
    loras = [inspect_lora(spec) for spec in specs]
    seen: dict[str, LoadedLora] = {}
    for lora in loras:
        if lora.name in seen:
            other = seen[lora.name]
            raise UserError(
                f"two LoRAs are named {lora.name!r} ({other.path} and {lora.path}); "
                "rename one file or give it another name"
            )
        seen[lora.name] = lora
    return loras


def check_architecture(lora: LoadedLora, pipeline_architecture: str) -> None:
    """Refuse a LoRA declared or shaped for another base model family."""
    if lora.architecture and lora.architecture != pipeline_architecture:
        declared = declared_family(lora.metadata)
        source = f" ({declared[1]})" if declared else ""
        raise UserError(
            f"LoRA file {lora.path} is made for {ARCHITECTURE_NAMES.get(lora.architecture, lora.architecture)}"
            f"{source} but the model is {ARCHITECTURE_NAMES[pipeline_architecture]}; use a LoRA trained for "
            "this base model"
        )


def with_trigger_words(prompt: str, loras: Sequence[LoadedLora]) -> str:
    """Append each LoRA's trigger words that the prompt does not already contain (MLC convention)."""
    missing = [
        word
        for lora in loras
        for word in lora.trigger_words
        if not re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, flags=re.IGNORECASE)
    ]
    if not missing:
        return prompt
    return ", ".join(part for part in [prompt.strip(), *missing] if part)
