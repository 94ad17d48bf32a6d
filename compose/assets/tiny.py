"""Tiny random-weight Stable Diffusion models and LoRA files, built offline.

Tests, benchmarks and the demo need a base model and LoRAs without any model hub. The component
sizes are those of diffusers' own LoRA tests (``tests/lora/test_lora_layers_sd.py`` and the SDXL
pipeline tests), but the text encoders use the real 49408-token CLIP vocabulary shipped inside
open_clip, so prompts tokenize exactly as they would on a real checkpoint. A 64x64 image takes a
fraction of a second on a CPU.

Everything is deterministic in ``seed`` and written atomically (staged beside the target, then
renamed), so a crash never leaves a half-written model or LoRA behind.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from loracompose.outputs import staged_directory

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_MAX_LENGTH = 77
# Line 0 of open_clip's BPE file is a version header; the merges fill the vocabulary up to
# 49152 entries after the 2 x 256 byte symbols, leaving room for the two special tokens.
_CLIP_MERGE_COUNT = 49152 - 256 - 2

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# The joint attention of FLUX / SD3 blocks: image-stream and text-stream projections.
DIT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_ADAPTER_NAME = "tiny"
T = TypeVar("T")
Pipeline = TypeVar("Pipeline", bound=DiffusionPipeline)

_SD15_ARCHITECTURE = ("stable-diffusion-v1/lora", "sd_v1")
_SDXL_ARCHITECTURE = ("stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0")

_NOISE_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


# --- tokenizer -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _clip_bpe_files() -> tuple[str, str]:
    """The contents of ``vocab.json`` and ``merges.txt`` for open_clip's CLIP BPE."""
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1 : _CLIP_MERGE_COUNT + 1]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"{default_bpe()} gave {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return json.dumps(vocab, ensure_ascii=False), "\n".join(["#version: 0.2", *merges]) + "\n"


def build_clip_tokenizer(out_dir: str | Path, *, pad_token: str | None = None) -> CLIPTokenizer:
    """Write the real CLIP BPE tokenizer files to ``out_dir`` and load them as a ``CLIPTokenizer``.

    Args:
        out_dir: folder that receives ``vocab.json`` and ``merges.txt`` (created if missing).
        pad_token: padding token; SDXL's second tokenizer pads with ``"!"`` (id 0). Default:
            ``<|endoftext|>`` (id 49407), as in SD1.5.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_json, merges_txt = _clip_bpe_files()
    (out_dir / "vocab.json").write_text(vocab_json, encoding="utf-8")
    (out_dir / "merges.txt").write_text(merges_txt, encoding="utf-8")
    extra = {"pad_token": pad_token} if pad_token is not None else {}
    return CLIPTokenizer.from_pretrained(out_dir, model_max_length=CLIP_MAX_LENGTH, **extra)


def _clip_tokenizer(pad_token: str | None = None) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory(prefix="loracompose-tokenizer-") as scratch:
        return build_clip_tokenizer(scratch, pad_token=pad_token)


# --- components ----------------------------------------------------------------------------------


def _seeded(seed: int, factory: Callable[..., T], *args: object, **kwargs: object) -> T:
    """``factory(*args, **kwargs)`` with torch's global RNG reset to ``seed``, so weights are reproducible."""
    torch.manual_seed(seed)
    return factory(*args, **kwargs)


def _text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        projection_dim=32,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
    )


def _tiny_vae(seed: int, **extra: object) -> AutoencoderKL:
    return _seeded(
        seed,
        AutoencoderKL,
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        **extra,
    )


_UNET_COMMON = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}
TINY_SD15_UNET = {**_UNET_COMMON, "cross_attention_dim": 32}
"""The tiny SD1.5 UNet's config (also the LoRA converter's name skeleton for files made for it)."""
TINY_SDXL_UNET = {
    **_UNET_COMMON,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 2),
    # 6 micro-conditioning ids x addition_time_embed_dim + the 32-wide pooled text embedding.
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "cross_attention_dim": 64,
}
"""The tiny SDXL UNet's config."""


def tiny_sd15_pipeline(*, seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight SD1.5 pipeline in memory (49408-token vocabulary)."""
    pipe = StableDiffusionPipeline(
        unet=_seeded(seed, UNet2DConditionModel, **TINY_SD15_UNET),
        vae=_tiny_vae(seed),
        text_encoder=_seeded(seed, CLIPTextModel, _text_config()),
        tokenizer=_clip_tokenizer(),
        scheduler=DDIMScheduler(**_NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return _ready(pipe)


def tiny_sdxl_pipeline(*, seed: int = 0) -> StableDiffusionXLPipeline:
    """A random-weight SDXL pipeline in memory (two text encoders, added text and time embeddings)."""
    unet = _seeded(seed, UNet2DConditionModel, **TINY_SDXL_UNET)
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_tiny_vae(seed, sample_size=128),
        text_encoder=_seeded(seed, CLIPTextModel, _text_config()),
        # Another seed, so a swap of the two encoders changes the image.
        text_encoder_2=_seeded(seed + 1, CLIPTextModelWithProjection, _text_config()),
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(pad_token="!"),
        scheduler=EulerDiscreteScheduler(**_NOISE_SCHEDULE, timestep_spacing="leading"),
        image_encoder=None,
        feature_extractor=None,
        add_watermarker=False,
    )
    return _ready(pipe)


def _ready(pipe: Pipeline) -> Pipeline:
    """Put freshly built models in eval mode, as ``from_pretrained`` does, and silence the progress bar."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- saving --------------------------------------------------------------------------------------


def _require_free(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already exists and is not empty")


@contextmanager
def _staged_directory(out_dir: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``out_dir`` that becomes ``out_dir`` when the block succeeds."""
    _require_free(out_dir)
    with staged_directory(out_dir) as staging:
        yield staging


def _save_pipeline(build: Callable[[], DiffusionPipeline], out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    with _staged_directory(out_dir) as staging:
        build().save_pretrained(staging, safe_serialization=True)
    return out_dir


def build_tiny_sd15(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build a tiny random SD1.5 model and save it as a diffusers folder at ``out_dir``.

    ``out_dir`` must not exist or be empty. The folder loads offline with
    ``StableDiffusionPipeline.from_pretrained(out_dir)``.
    """
    return _save_pipeline(functools.partial(tiny_sd15_pipeline, seed=seed), out_dir)


def build_tiny_sdxl(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build a tiny random SDXL model and save it as a diffusers folder at ``out_dir``.

    ``out_dir`` must not exist or be empty. The folder loads offline with
    ``StableDiffusionXLPipeline.from_pretrained(out_dir)``.
    """
    return _save_pipeline(functools.partial(tiny_sdxl_pipeline, seed=seed), out_dir)


# --- LoRA files ----------------------------------------------------------------------------------


def is_sdxl_model(model_dir: str | Path) -> bool:
    """Whether the diffusers folder ``model_dir`` holds an SDXL pipeline (by ``model_index.json``)."""
    index = json.loads((Path(model_dir) / "model_index.json").read_text(encoding="utf-8"))
    return "XL" in index["_class_name"]


def model_family(model_dir: str | Path) -> str:
    """``sd15``, ``sdxl``, ``flux`` or ``sd3``: the family of the diffusers folder ``model_dir``."""
    class_name = json.loads((Path(model_dir) / "model_index.json").read_text(encoding="utf-8"))["_class_name"]
    families = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}
    return families.get(class_name, "sdxl" if "XL" in class_name else "sd15")


def _dit_lora_targets(model_dir: Path, family: str, text_encoder: bool) -> dict[str, torch.nn.Module]:
    """A DiT LoRA adapts the transformer and, with ``text_encoder``, the CLIP encoder(s) diffusers'
    loader takes for that family (FLUX: the one CLIP; SD3: both CLIPs; never T5)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    transformer_class = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    models: dict[str, torch.nn.Module] = {"transformer": transformer_class.from_pretrained(model_dir,
                                                                                            subfolder="transformer")}
    encoders = ("text_encoder",) if family == "flux" else ("text_encoder", "text_encoder_2")
    for encoder in encoders if text_encoder else ():
        encoder_class = CLIPTextModel if family == "flux" else CLIPTextModelWithProjection
        models[encoder] = encoder_class.from_pretrained(model_dir, subfolder=encoder)
    return models


def _load_lora_targets(model_dir: Path, *, sdxl: bool, text_encoder: bool) -> dict[str, torch.nn.Module]:
    """The models a LoRA adapts, keyed by their ``save_lora_weights`` argument prefix."""
    family = model_family(model_dir)
    if family in ("flux", "sd3"):
        return _dit_lora_targets(model_dir, family, text_encoder)
    models: dict[str, torch.nn.Module] = {"unet": UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")}
    if text_encoder:
        models["text_encoder"] = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    if text_encoder and sdxl:
        models["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2")
    return models


def _lora_config(prefix: str, rank: int, alpha: float) -> LoraConfig:
    targets = {"unet": UNET_LORA_TARGETS, "transformer": DIT_LORA_TARGETS}.get(prefix, TEXT_ENCODER_LORA_TARGETS)
    # init_lora_weights=False draws lora_B at random too, so a fresh adapter already changes outputs.
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=list(targets))


def _attach_random_adapter(model: Any, config: LoraConfig, init_scale: float) -> dict[str, torch.Tensor]:
    """Add a randomly initialised adapter to ``model`` and return its PEFT state dict."""
    model.add_adapter(config, adapter_name=_ADAPTER_NAME)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(init_scale)
    return get_peft_model_state_dict(model, adapter_name=_ADAPTER_NAME, save_embedding_layers=False)


def _adapter_metadata(config: LoraConfig) -> dict[str, object]:
    """The LoraConfig fields ``load_lora_weights`` needs to rebuild the adapter.

    Only these few: diffusers passes the stored dict straight to ``LoraConfig(**...)``, so a full
    ``to_dict()`` would hold fields that older PEFT versions reject, and the model's temporary path.
    """
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}


def _diffusers_lora_tensors(
    pipeline_class: Any, layers: dict[str, dict[str, torch.Tensor]], configs: dict[str, LoraConfig]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata exactly as ``save_lora_weights`` writes them."""
    arguments: dict[str, object] = {}
    for prefix, state in layers.items():
        arguments[f"{prefix}_lora_layers"] = state
        arguments[f"{prefix}_lora_adapter_metadata"] = _adapter_metadata(configs[prefix])
    with tempfile.TemporaryDirectory(prefix="loracompose-lora-") as scratch:
        pipeline_class.save_lora_weights(scratch, safe_serialization=True, weight_name="lora.safetensors", **arguments)
        saved = Path(scratch) / "lora.safetensors"
        with safe_open(saved, "pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(saved), metadata


def _write_safetensors(tensors: dict[str, torch.Tensor], out_file: Path, metadata: dict[str, str]) -> Path:
    out_file.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".partial", dir=out_file.parent)
    os.close(handle)
    try:
        save_file(tensors, staging, metadata=metadata)
        os.chmod(staging, 0o644)
        os.replace(staging, out_file)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return out_file


def _pipeline_class(family: str) -> Any:
    """The diffusers pipeline class whose ``save_lora_weights`` writes a LoRA for ``family``."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "flux": FluxPipeline,
            "sd3": StableDiffusion3Pipeline}[family]


def build_tiny_lora(
    model_dir: str | Path,
    out_file: str | Path,
    *,
    seed: int,
    trigger_words: Sequence[str] = (),
    name: str | None = None,
    category: str | None = None,
    rank: int = 4,
    alpha: float | None = None,
    text_encoder: bool = True,
    init_scale: float = 1.0,
) -> Path:
    """Write a random LoRA for the tiny model at ``model_dir`` as a diffusers-format safetensors file.

    Args:
        model_dir: a folder from :func:`build_tiny_sd15`, :func:`build_tiny_sdxl`, :func:`build_tiny_flux`
            or :func:`build_tiny_sd3` (DiT LoRAs adapt the transformer's joint attention, ``transformer.`` keys).
        out_file: the ``.safetensors`` file to write (replaced atomically).
        seed: different seeds give different LoRAs.
        trigger_words: stored as ``modelspec.trigger_phrase``, comma-separated.
        name: stored as ``modelspec.title``; default: the file name without suffix.
        category: stored as ``loracompose.category`` (character, clothing, style, ...).
        rank: LoRA rank ``r``.
        alpha: LoRA alpha; default ``rank`` (scaling 1).
        text_encoder: also adapt the CLIP text encoder(s) (both of them on SDXL and SD3; T5 never).
        init_scale: multiplies every ``lora_B`` weight; larger values change images more.
    """
    model_dir, out_file = Path(model_dir), Path(out_file)
    sdxl = is_sdxl_model(model_dir)
    alpha = alpha or rank
    models = _load_lora_targets(model_dir, sdxl=sdxl, text_encoder=text_encoder)
    configs = {prefix: _lora_config(prefix, rank, alpha) for prefix in models}
    torch.manual_seed(seed)
    layers = {prefix: _attach_random_adapter(model, configs[prefix], init_scale) for prefix, model in models.items()}
    family = model_family(model_dir)
    tensors, metadata = _diffusers_lora_tensors(_pipeline_class(family), layers, configs)
    architecture, base_version = _ARCHITECTURES[family]
    metadata |= {
        "modelspec.trigger_phrase": ", ".join(trigger_words),
        "modelspec.title": name or out_file.stem,
        "modelspec.architecture": architecture,
        "ss_base_model_version": base_version,
        "loracompose.rank": str(rank),
        "loracompose.alpha": str(alpha),
    }
    if category:
        metadata["loracompose.category"] = category
    return _write_safetensors(tensors, out_file, metadata)


_KOHYA_SUFFIXES = {".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight"}


def _kohya_module(diffusers_module: str) -> str:
    """The kohya name of a module key such as ``unet.down_blocks.1.attentions.0...to_q``.

    kohya names text-encoder modules from transformers 4's ``CLIPTextModel.text_model``; transformers
    5 dropped that level, so our files lack it. diffusers and transformers 5 accept both spellings.
    """
    component, _, module = diffusers_module.partition(".")
    if component == "unet":
        return "lora_unet_" + module.replace(".", "_")
    if component == "text_encoder":
        module = module if module.startswith("text_model.") else "text_model." + module
        return "lora_te_" + module.replace(".", "_")
    raise ValueError(f"{diffusers_module!r} is not an SD1.5 LoRA module (unet.* or text_encoder.*)")


def _kohya_key(diffusers_key: str) -> tuple[str, str]:
    """``(module, suffix)`` in kohya naming for one SD1.5 diffusers LoRA key."""
    for suffix, kohya_suffix in _KOHYA_SUFFIXES.items():
        if diffusers_key.endswith(suffix):
            return _kohya_module(diffusers_key.removesuffix(suffix)), kohya_suffix
    raise ValueError(f"{diffusers_key!r} is not a LoRA weight (lora_A / lora_B)")


def write_kohya_lora(diffusers_lora_file: str | Path, out_file: str | Path) -> Path:
    """Rewrite an SD1.5 LoRA file from :func:`build_tiny_lora` in kohya/A1111 key naming.

    Keys become ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` (``lora_te_`` for the
    text encoder) with one ``<module>.alpha`` scalar each; the ``loracompose.*`` and ``modelspec.*``
    metadata is kept, diffusers' adapter-config metadata is dropped (kohya files carry alpha as tensors).
    """
    diffusers_lora_file = Path(diffusers_lora_file)
    with safe_open(diffusers_lora_file, "pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(diffusers_lora_file).items():
        module, suffix = _kohya_key(key)
        tensors[f"{module}.{suffix}"] = tensor
        if suffix == "lora_down.weight":
            rank = tensor.shape[0]
            tensors[f"{module}.alpha"] = torch.tensor(float(metadata.get("loracompose.alpha", rank)))
    metadata.pop("lora_adapter_metadata", None)
    return _write_safetensors(tensors, Path(out_file), metadata)


# --- tiny DiTs: FLUX.1 and SD3 ---------------------------------------------------------------------
# Sizes as diffusers' own FLUX / SD3 pipeline tests build them (one double-stream and one single-stream
# block, 32-wide joint attention); the T5 tokenizer is a small Unigram model built here, so nothing
# comes from a hub. FLUX gets the guidance embedding of FLUX.1-dev, so distilled guidance is exercised.

_T5_SPECIAL = ("<pad>", "</s>", "<unk>")
_T5_MAX_LENGTH = 32
TINY_FLUX_TRANSFORMER = {
    "patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
    "axes_dims_rope": [4, 4, 8],
}
"""The tiny FLUX transformer's config (FLUX.1-dev's layout: guidance embedding on)."""
TINY_SD3_TRANSFORMER = {
    "sample_size": 32, "patch_size": 1, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8,
    "num_attention_heads": 4, "caption_projection_dim": 32, "joint_attention_dim": 32,
    "pooled_projection_dim": 64, "out_channels": 4,
}
"""The tiny SD3 transformer's config (two joint blocks, so the last one is context-pre-only as in SD3)."""
TINY_SD35_TRANSFORMER = {**TINY_SD3_TRANSFORMER, "qk_norm": "rms_norm", "dual_attention_layers": (0,)}
"""SD3.5 Medium's layout in small: RMS-normed queries and keys, and a second (image-only) attention in
the first block (MMDiT-X)."""
# The flow-matching schedules of FLUX.1-dev (resolution-dependent shift) and SD3 (fixed shift 3).
_FLUX_SCHEDULE = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096}
_SD3_SCHEDULE = {"shift": 3.0}
_ARCHITECTURES = {"sd15": _SD15_ARCHITECTURE, "sdxl": _SDXL_ARCHITECTURE, "flux": ("flux-1-dev/lora", "flux1"),
                  "sd3": ("stable-diffusion-v3-medium/lora", "sd3")}


def _t5_pieces() -> list[tuple[str, float]]:
    """A small Unigram vocabulary: the specials, then word-start and inner letters, digits and
    punctuation (so every plain-ASCII prompt tokenizes without <unk>)."""
    symbols = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?'-:;()"
    pieces = [(token, 0.0) for token in _T5_SPECIAL] + [("\u2581", -2.0)]
    pieces += [("\u2581" + symbol, -3.0) for symbol in symbols]
    pieces += [(symbol, -4.0) for symbol in symbols]
    return pieces


def build_t5_tokenizer(out_dir: str | Path) -> Any:
    """Write a tiny T5 tokenizer (``tokenizer.json``, a Unigram model) to ``out_dir`` and load it as
    ``T5TokenizerFast``: pad id 0, ``</s>`` id 1 appended to every sequence, ``<unk>`` id 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.Unigram(_t5_pieces(), unk_id=_T5_SPECIAL.index("<unk>")))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return T5TokenizerFast(tokenizer_file=str(out_dir / "tokenizer.json"), extra_ids=0, pad_token="<pad>",
                           eos_token="</s>", unk_token="<unk>", model_max_length=_T5_MAX_LENGTH)


def _t5_tokenizer() -> Any:
    with tempfile.TemporaryDirectory(prefix="loracompose-t5-") as scratch:
        return build_t5_tokenizer(scratch)


def _t5_encoder(seed: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(_t5_pieces()), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return _seeded(seed, T5EncoderModel, config)


def _flow_vae(seed: int, latent_channels: int) -> AutoencoderKL:
    """A one-level VAE (no spatial compression) with FLUX's latent shift and scale."""
    return _seeded(seed, AutoencoderKL, block_out_channels=(4,), layers_per_block=1, in_channels=3, out_channels=3,
                   down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
                   latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                   use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def tiny_flux_pipeline(*, seed: int = 0, transformer: Mapping[str, Any] | None = None) -> Any:
    """A random-weight FLUX.1 pipeline in memory (CLIP + T5 text encoders, guidance embedding);
    ``transformer``: entries replacing those of :data:`TINY_FLUX_TRANSFORMER` (more blocks, wider)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    pipe = FluxPipeline(
        transformer=_seeded(seed, FluxTransformer2DModel, **{**TINY_FLUX_TRANSFORMER, **(transformer or {})}),
        vae=_flow_vae(seed, latent_channels=1),
        text_encoder=_seeded(seed, CLIPTextModel, _text_config()),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5_encoder(seed + 1),
        tokenizer_2=_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**_FLUX_SCHEDULE),
    )
    return _ready(pipe)


def tiny_sd3_pipeline(*, seed: int = 0, sd35: bool = False, transformer: Mapping[str, Any] | None = None) -> Any:
    """A random-weight SD3 pipeline in memory (two CLIP encoders with projection + T5); ``sd35``: with
    SD3.5 Medium's transformer layout (:data:`TINY_SD35_TRANSFORMER`); ``transformer``: entries replacing
    those of the transformer's config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=_seeded(seed, SD3Transformer2DModel,
                            **{**(TINY_SD35_TRANSFORMER if sd35 else TINY_SD3_TRANSFORMER), **(transformer or {})}),
        vae=_flow_vae(seed, latent_channels=4),
        text_encoder=_seeded(seed, CLIPTextModelWithProjection, _text_config()),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_seeded(seed + 1, CLIPTextModelWithProjection, _text_config()),
        tokenizer_2=_clip_tokenizer(pad_token="!"),
        text_encoder_3=_t5_encoder(seed + 2),
        tokenizer_3=_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**_SD3_SCHEDULE),
    )
    return _ready(pipe)


def build_tiny_flux(out_dir: str | Path, *, seed: int = 0, transformer: Mapping[str, Any] | None = None) -> Path:
    """Build a tiny random FLUX.1 model and save it as a diffusers folder at ``out_dir`` (must not
    exist or be empty); it loads offline with ``FluxPipeline.from_pretrained(out_dir)``. ``transformer``:
    config entries replacing the tiny ones (e.g. ``{"num_layers": 2, "num_single_layers": 2}``)."""
    return _save_pipeline(functools.partial(tiny_flux_pipeline, seed=seed, transformer=transformer), out_dir)


def build_tiny_sd3(out_dir: str | Path, *, seed: int = 0, sd35: bool = False,
                   transformer: Mapping[str, Any] | None = None) -> Path:
    """Build a tiny random SD3 model (``sd35``: SD3.5 Medium's layout) and save it as a diffusers folder
    at ``out_dir`` (must not exist or be empty); it loads offline with
    ``StableDiffusion3Pipeline.from_pretrained(out_dir)``. ``transformer``: config entries replacing the
    tiny ones (e.g. ``{"num_layers": 4}``)."""
    return _save_pipeline(functools.partial(tiny_sd3_pipeline, seed=seed, sd35=sd35, transformer=transformer),
                          out_dir)
