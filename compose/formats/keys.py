"""Tensor keys of a LoRA file, split into (component, module spelling, part), and refused formats.

A key is ``<component prefix><module><part suffix>``: the component prefix is kohya's
(``lora_unet_``, ``lora_te_``, ``lora_te1_``..``lora_te3_``), OneTrainer's (``lora_transformer_``),
ComfyUI's (``diffusion_model.``) or diffusers' (``unet.``, ``transformer.``, ``text_encoder.``..
``text_encoder_3.``; none in the oldest UNet-only files and in XLabs FLUX files); the part suffix names
the tensor's role in its format (``lora_down.weight``, ``hada_w1_a``, ``lokr_w2_b``, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# kohya / LyCORIS component prefixes, then diffusers ones (longest first where one is a prefix of another).
# FLUX/SD3 files name the denoiser "transformer." (diffusers, ai-toolkit) or "lora_transformer_"
# (OneTrainer): only a transformer has those. kohya's "lora_unet_", ComfyUI's "diffusion_model." and
# LyCORIS's "lycoris_" name any denoiser ("unet"); the converter maps "unet" and "transformer" to
# whichever of the two the model has, after checking the layer names' family.
COMPONENT_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_transformer_", "transformer"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder_3.", "text_encoder_3"),
    ("text_encoder.", "text_encoder"),
    ("unet.", "unet"),
    ("transformer.", "transformer"),
    ("diffusion_model.", "unet"),  # ComfyUI's denoiser prefix, on UNets and DiTs alike
    ("lycoris_", "unet"),  # LyCORIS's own wrapper (SimpleTuner's FLUX LoKr files): flattened diffusers names
    # ComfyUI's text encoders; "t5" is the model's T5 encoder (FLUX's text_encoder_2, SD3's text_encoder_3)
    ("text_encoders.clip_l.transformer.", "text_encoder"),
    ("text_encoders.clip_g.transformer.", "text_encoder_2"),
    ("text_encoders.t5xxl.transformer.", "t5"),
)

# part suffix -> (format family, part name)
PARTS = {
    ".lora_down.weight": ("lora", "down"),
    ".lora_up.weight": ("lora", "up"),
    ".lora_mid.weight": ("lora", "mid"),
    ".lora_A.weight": ("lora", "down"),
    ".lora_B.weight": ("lora", "up"),
    ".lora.down.weight": ("lora", "down"),
    ".lora.up.weight": ("lora", "up"),
    ".lora_linear_layer.down.weight": ("lora", "down"),
    ".lora_linear_layer.up.weight": ("lora", "up"),
    ".lora_magnitude_vector": ("dora", "magnitude"),
    ".lora_magnitude_vector.weight": ("dora", "magnitude"),
    ".dora_scale": ("dora", "magnitude"),
    ".alpha": ("any", "alpha"),
    **{f".hada_{part}": ("loha", part) for part in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{part}": ("lokr", f"lokr_{part}") for part in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t1", "t2")},
}

# The old diffusers attention-processor format: <attention>.processor.to_q_lora.down.weight
_ATTN_PROCESSOR = re.compile(r"^(?P<module>.+)\.processor\.(?P<projection>to_q|to_k|to_v|to_out)_lora\."
                             r"(?P<part>down|up)\.weight$")

# XLabs FLUX LoRA processors: double_blocks.0.processor.qkv_lora1.down.weight (dit_names maps the module)
_XLABS_PROCESSOR = re.compile(r"^(?P<module>(double|single)_blocks\.\d+\.processor\.(qkv|proj)_lora[12]?)\."
                              r"(?P<part>down|up)\.weight$")

# Formats we recognise and refuse: (pattern on the key, format name).
REFUSED = (
    (re.compile(r"\.boft_"), "BOFT"),
    (re.compile(r"\.oft_(blocks|diag|r|R|s)\b"), "OFT"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "GLoRA"),
    (re.compile(r"\.diff(_b)?$"), "full weight difference ('diff', LyCORIS full)"),
    (re.compile(r"\.on_input$"), "(IA)^3"),
    (re.compile(r"\.(w_norm|b_norm)$"), "LyCORIS norm-layer weights"),
    (re.compile(r"\.(lora_up|lora_down|lora_A|lora_B)\.bias$"), "LoRA bias terms"),
    (re.compile(r"^bundle_emb\.|\.string_to_param\."), "embedded textual inversion (bundle_emb)"),
    (re.compile(r"(query|key)_norm\.scale$"), "FLUX Control LoRA (norm weights and a widened input layer)"),
)


@dataclass(frozen=True)
class ParsedKey:
    """One tensor key: which component, the module as spelt in the file, the format family and part."""

    component: str
    module: str
    family: str
    part: str


def refused_format(key: str) -> str | None:
    """The name of a known-but-unsupported format that ``key`` belongs to, if any."""
    return next((name for pattern, name in REFUSED if pattern.search(key)), None)


def parse_key(key: str) -> ParsedKey | None:
    """Split a tensor key; None when no known part suffix ends it."""
    component, rest = _split_component(key)
    processor = _ATTN_PROCESSOR.match(rest)
    if processor:
        projection = "to_out.0" if processor["projection"] == "to_out" else processor["projection"]
        return ParsedKey(component, f"{processor['module']}.{projection}", "lora", processor["part"])
    xlabs = _XLABS_PROCESSOR.match(rest)
    if xlabs:
        return ParsedKey(component, xlabs["module"], "lora", xlabs["part"])
    for suffix, (family, part) in PARTS.items():
        if rest.endswith(suffix):
            return ParsedKey(component, rest[: -len(suffix)], family, part)
    return None


def _split_component(key: str) -> tuple[str, str]:
    for prefix, component in COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return component, key[len(prefix):]
    return "unet", key


def kinds_from_shapes(shapes: dict[str, tuple[int, ...]]) -> tuple[str, ...]:
    """The kinds of LoRA a file holds, from its tensor names and shapes alone (a listing's "kind" column).

    LoRA, LoCon (a LoRA factor with a kernel wider than 1x1), LoHa, LoKr, DoRA; a refused format by its
    name (``"OFT (not loaded)"``); ``"unknown"`` for keys no format has. The converter decides at load time.
    """
    kinds: set[str] = set()
    for key, shape in shapes.items():
        refused = refused_format(key)
        parsed = None if refused else parse_key(key)
        if refused:
            kinds.add(f"{refused} (not loaded)")
        elif parsed is None:
            kinds.add("unknown")
        elif parsed.family == "lora" and parsed.part in ("down", "mid"):
            kinds.add("LoCon" if len(shape) == 4 and shape[-1] > 1 else "LoRA")
        elif parsed.family in _KIND_NAMES:
            kinds.add(_KIND_NAMES[parsed.family])
    return tuple(sorted(kinds))


_KIND_NAMES = {"loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}
