"""LoRA files as users have them, converted to PEFT LoRA adapters (one converter for every format).

Loaded (see README "LoRA files"):

* diffusers / PEFT files (``unet.<module>.lora_A.weight``, ``lora_magnitude_vector`` for DoRA), and
  the old diffusers attention-processor files (``...processor.to_q_lora.down.weight``);
* kohya-ss and LyCORIS files for SD1.x and SDXL: ``lora_unet_``, ``lora_te_``, ``lora_te1_``,
  ``lora_te2_`` names, diffusers-style or sgm (``input_blocks``/``middle_block``/``output_blocks``)
  UNet names, text-encoder names with or without transformers 4's ``text_model.`` level;
* FLUX.1 and SD3/SD3.5 files (:mod:`.dit_names`): diffusers/PEFT and ai-toolkit (``transformer.``),
  OneTrainer (``lora_transformer_``), kohya (``lora_unet_double_blocks_``, ``single_blocks_``,
  ``joint_blocks_``; ``lora_te1_``..``lora_te3_``), ComfyUI/BFL (``diffusion_model.``) and XLabs
  (``processor.qkv_lora1``) names, a fused reference layer (``qkv``, ``linear1``) split by rows;
* in those files: LoRA and LoCon (with the Tucker ``lora_mid``), LoHa (``hada_*``, Tucker
  ``hada_t1``/``hada_t2``), LoKr (``lokr_w1`` or ``lokr_w1_a/_b``, ``lokr_w2`` or ``lokr_w2_a/_b``,
  ``lokr_t2``) and DoRA (``dora_scale``).

Every layer becomes a plain PEFT LoRA layer whose ``scale * B @ A`` equals the file's delta exactly
(:mod:`.factors`). PEFT has LoHa and LoKr tuners, but they do not serve here: their layers take no
per-row ``adapter_names`` (Composite's batched branches), expose no ``lora_A``/``lora_B`` for the
token-masked and per-region deltas (TARA, LoRA-Composer, AutoLoRA's gates) and cannot share a layer
with a LoRA adapter in diffusers' adapter handling. DoRA layers are materialised here (the effective
``W' - W`` against the model's own weight) for the same reason, so a DoRA LoRA's strength scales that
weight change linearly, as ComfyUI does.

Refused, in one line naming the file and the format: OFT, BOFT, GLoRA, full weight differences
(``diff``), (IA)^3, norm-layer weights, LoRA bias terms, embedded textual inversions, FLUX Control
LoRAs, any key this module does not recognise, and layer names of another model family than the
model's (an SD UNet LoRA on FLUX, a FLUX LoRA on SD3, ...), naming both.
"""

from __future__ import annotations

from typing import Any

# The converter needs torch; this package is imported by loracompose.lora (metadata only), which the
# CLI's --help path loads, so the converter's names resolve on first use.
_CONVERTER_NAMES = ("ConvertedLora", "LowRankDelta", "convert_lora", "load_lora_file", "read_lora_tensors")
__all__ = list(_CONVERTER_NAMES)


def __getattr__(name: str) -> Any:
    if name in _CONVERTER_NAMES:
        from loracompose.formats import convert

        return getattr(convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
