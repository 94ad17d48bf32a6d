"""FLUX.1 and SD3 LoRA files, in each format users have, load as exactly the weight change they define.

Files are written with the real key names of each format from random factors chosen here. Oracle: the
delta computed by hand from the file's tensors, with the reference layouts' rows written out below for
each diffusers layer (fused qkv split by rows, FLUX's single-block ``linear1`` into q/k/v/mlp, the final
modulation's (shift, scale) halves swapped), added to the plain model's weights and compared with the
model's weights plus each loaded PEFT layer's delta (float32; atol 2e-5, rtol 1e-5). Where diffusers
loads a format itself (``FluxPipeline.load_lora_weights`` on kohya, XLabs and PEFT files,
``StableDiffusion3Pipeline.load_lora_weights`` on PEFT files), the loaded weights must equal diffusers'.
End to end, a kohya file made from a diffusers-format LoRA generates through ``load_pipeline`` what plain
diffusers generates with the diffusers file (latents within 1e-5).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from lora_files import _dora, weight_of, write
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from loracompose.errors import UserError
from loracompose.formats import load_lora_file
from loracompose.lora import LoraSpec, check_architecture, inspect_lora

ATOL, RTOL = 2e-5, 1e-5
RANK = 4
# One double-stream and one single-stream block, joint width 32 (as diffusers' own FLUX tests).
FLUX_TRANSFORMER = {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1,
                    "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                    "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [4, 4, 8]}
# Two joint blocks, so the last one is context-pre-only (its context modulation is (shift, scale)).
SD3_TRANSFORMER = {"sample_size": 32, "patch_size": 1, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8,
                   "num_attention_heads": 4, "caption_projection_dim": 32, "joint_attention_dim": 32,
                   "pooled_projection_dim": 64, "out_channels": 4}
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _clip(projection: bool = False) -> nn.Module:
    config = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
                            bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5() -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=_clip(), tokenizer=None,
                        text_encoder_2=_t5(), tokenizer_2=None, transformer=FluxTransformer2DModel(**FLUX_TRANSFORMER))


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(0)
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**SD3_TRANSFORMER), scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=_clip(projection=True), tokenizer=None, text_encoder_2=_clip(projection=True), tokenizer_2=None,
        text_encoder_3=_t5(), tokenizer_3=None)


def _rows(start: int, stop: int) -> list[tuple[int, int]]:
    return [(start, stop)]


# Reference layer -> (diffusers component, [(diffusers module, the reference layer's rows it is made of)]).
# Sizes of the tiny models: width 32, MLP 128, FLUX modulations 6 x 32 (double) and 3 x 32 (single).
DOUBLE, SINGLE = "transformer_blocks.0.", "single_transformer_blocks.0."
FLUX_REFERENCE = {
    "double_blocks.0.img_attn.qkv": [(DOUBLE + "attn.to_q", _rows(0, 32)), (DOUBLE + "attn.to_k", _rows(32, 64)),
                                     (DOUBLE + "attn.to_v", _rows(64, 96))],
    "double_blocks.0.img_attn.proj": [(DOUBLE + "attn.to_out.0", _rows(0, 32))],
    "double_blocks.0.img_mlp.0": [(DOUBLE + "ff.net.0.proj", _rows(0, 128))],
    "double_blocks.0.img_mlp.2": [(DOUBLE + "ff.net.2", _rows(0, 32))],
    "double_blocks.0.img_mod.lin": [(DOUBLE + "norm1.linear", _rows(0, 192))],
    "double_blocks.0.txt_attn.qkv": [(DOUBLE + "attn.add_q_proj", _rows(0, 32)),
                                     (DOUBLE + "attn.add_k_proj", _rows(32, 64)),
                                     (DOUBLE + "attn.add_v_proj", _rows(64, 96))],
    "double_blocks.0.txt_attn.proj": [(DOUBLE + "attn.to_add_out", _rows(0, 32))],
    "double_blocks.0.txt_mlp.0": [(DOUBLE + "ff_context.net.0.proj", _rows(0, 128))],
    "double_blocks.0.txt_mlp.2": [(DOUBLE + "ff_context.net.2", _rows(0, 32))],
    "double_blocks.0.txt_mod.lin": [(DOUBLE + "norm1_context.linear", _rows(0, 192))],
    "single_blocks.0.linear1": [(SINGLE + "attn.to_q", _rows(0, 32)), (SINGLE + "attn.to_k", _rows(32, 64)),
                                (SINGLE + "attn.to_v", _rows(64, 96)), (SINGLE + "proj_mlp", _rows(96, 224))],
    "single_blocks.0.linear2": [(SINGLE + "proj_out", _rows(0, 32))],
    "single_blocks.0.modulation.lin": [(SINGLE + "norm.linear", _rows(0, 96))],
    "img_in": [("x_embedder", _rows(0, 32))],
    "txt_in": [("context_embedder", _rows(0, 32))],
    "time_in.in_layer": [("time_text_embed.timestep_embedder.linear_1", _rows(0, 32))],
    "vector_in.out_layer": [("time_text_embed.text_embedder.linear_2", _rows(0, 32))],
    "guidance_in.in_layer": [("time_text_embed.guidance_embedder.linear_1", _rows(0, 32))],
    "final_layer.linear": [("proj_out", _rows(0, 4))],
    # reference (shift, scale) -> diffusers (scale, shift)
    "final_layer.adaLN_modulation.1": [("norm_out.linear", [(32, 64), (0, 32)])],
}
XLABS_REFERENCE = {
    "double_blocks.0.processor.qkv_lora1": FLUX_REFERENCE["double_blocks.0.img_attn.qkv"],
    "double_blocks.0.processor.proj_lora1": FLUX_REFERENCE["double_blocks.0.img_attn.proj"],
    "double_blocks.0.processor.qkv_lora2": FLUX_REFERENCE["double_blocks.0.txt_attn.qkv"],
    "double_blocks.0.processor.proj_lora2": FLUX_REFERENCE["double_blocks.0.txt_attn.proj"],
    "single_blocks.0.processor.qkv_lora": FLUX_REFERENCE["single_blocks.0.linear1"][:3],
    "single_blocks.0.processor.proj_lora": FLUX_REFERENCE["single_blocks.0.linear2"],
}
LAST = "transformer_blocks.1."
SD3_REFERENCE = {
    "joint_blocks.0.x_block.attn.qkv": [(DOUBLE + "attn.to_q", _rows(0, 32)), (DOUBLE + "attn.to_k", _rows(32, 64)),
                                        (DOUBLE + "attn.to_v", _rows(64, 96))],
    "joint_blocks.0.x_block.attn.proj": [(DOUBLE + "attn.to_out.0", _rows(0, 32))],
    "joint_blocks.0.x_block.mlp.fc1": [(DOUBLE + "ff.net.0.proj", _rows(0, 128))],
    "joint_blocks.0.x_block.adaLN_modulation.1": [(DOUBLE + "norm1.linear", _rows(0, 192))],
    "joint_blocks.0.context_block.attn.qkv": [(DOUBLE + "attn.add_q_proj", _rows(0, 32)),
                                              (DOUBLE + "attn.add_k_proj", _rows(32, 64)),
                                              (DOUBLE + "attn.add_v_proj", _rows(64, 96))],
    "joint_blocks.0.context_block.attn.proj": [(DOUBLE + "attn.to_add_out", _rows(0, 32))],
    "joint_blocks.0.context_block.mlp.fc2": [(DOUBLE + "ff_context.net.2", _rows(0, 32))],
    "joint_blocks.1.x_block.mlp.fc2": [(LAST + "ff.net.2", _rows(0, 32))],
    # the last block's context modulation is (shift, scale) in the reference, (scale, shift) in diffusers
    "joint_blocks.1.context_block.adaLN_modulation.1": [(LAST + "norm1_context.linear", [(32, 64), (0, 32)])],
    "x_embedder.proj": [("pos_embed.proj", _rows(0, 32))],
    "t_embedder.mlp.0": [("time_text_embed.timestep_embedder.linear_1", _rows(0, 32))],
    "y_embedder.mlp.2": [("time_text_embed.text_embedder.linear_2", _rows(0, 32))],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", [(32, 64), (0, 32)])],
}
# kohya's text-encoder names (with transformers 4's text_model. level) -> (component, module).
CLIP_LAYERS = {
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
    "lora_te1_text_model_encoder_layers_1_mlp_fc2": ("text_encoder", "encoder.layers.1.mlp.fc2"),
}
T5_LAYERS = {
    "lora_te2_encoder_block_0_layer_0_SelfAttention_q": ("text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q"),
    "lora_te2_encoder_block_0_layer_1_DenseReluDense_wo":
        ("text_encoder_2", "encoder.block.0.layer.1.DenseReluDense.wo"),
}
# SD3's CLIPTextModelWithProjection keeps the text_model. level.
SD3_CLIP_LAYERS = {
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
        ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
    "lora_te2_text_model_encoder_layers_1_self_attn_v_proj":
        ("text_encoder_2", "text_model.encoder.layers.1.self_attn.v_proj"),
    "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi":
        ("text_encoder_3", "encoder.block.0.layer.1.DenseReluDense.wi"),
}


def _weights(pipe) -> dict[tuple[str, str], torch.Tensor]:
    """Every Linear/Conv2d weight, plus the delta of each loaded LoRA layer (PEFT's own ``get_delta_weight``)."""
    weights = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        for name, module in (model.named_modules() if model is not None else ()):
            if ".base_layer" in name or ".lora_" in name:
                continue
            layer = getattr(module, "base_layer", module)
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                weight = layer.weight.detach().clone()
                if isinstance(module, LoraLayer):
                    for adapter in module.lora_A:
                        weight += module.get_delta_weight(adapter)
                weights[(component, name)] = weight
    return weights


def _width(pipe, component: str, module: str) -> tuple[int, ...]:
    return tuple(getattr(pipe, component).get_submodule(module).weight.shape[1:])


class Lora:
    """A file's tensors and the weight change they make per (component, module), computed by hand."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.tensors: dict[str, torch.Tensor] = {}
        self.deltas: dict[tuple[str, str], torch.Tensor] = {}

    def factors(self, rows: int, width: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        down = torch.randn(RANK, *width, generator=self.generator) * 0.3
        up = torch.randn(rows, RANK, *[1] * (len(width) - 1), generator=self.generator) * 0.3
        return down, up

    def layer(self, pipe, component: str, parts: list, keys: tuple[str, str], alpha: float | None) -> None:
        """One file layer (fused or not) with down/up under ``keys`` and alpha (None: no alpha key)."""
        width = _width(pipe, component, parts[0][0])
        rows = max(stop for _, ranges in parts for _, stop in ranges)
        down, up = self.factors(rows, width)
        self.tensors[keys[0]], self.tensors[keys[1]] = down, up
        scale = (alpha if alpha is not None else RANK) / RANK
        for module, ranges in parts:
            module_up = torch.cat([up[start:stop] for start, stop in ranges])
            delta = module_up.reshape(module_up.shape[0], RANK) @ down.reshape(RANK, -1)
            self.deltas[(component, module)] = scale * delta.reshape(module_up.shape[0], *width)

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> Path:
        return write(path, self.tensors, metadata)


def _kohya(pipe, reference: dict, seed: int, prefix: str = "lora_unet_", alpha: float | None = 8.0,
           text_layers: dict | None = None) -> Lora:
    lora = Lora(seed)
    for name, parts in reference.items():
        base = prefix + name.replace(".", "_")
        lora.layer(pipe, "transformer", parts, (f"{base}.lora_down.weight", f"{base}.lora_up.weight"), alpha)
        if alpha is not None:
            lora.tensors[f"{base}.alpha"] = torch.tensor(alpha)
    for base, (component, module) in (text_layers or {}).items():
        lora.layer(pipe, component, [(module, _rows(0, _rows_of(pipe, component, module)))],
                   (f"{base}.lora_down.weight", f"{base}.lora_up.weight"), alpha)
        if alpha is not None:
            lora.tensors[f"{base}.alpha"] = torch.tensor(alpha)
    return lora


def _rows_of(pipe, component: str, module: str) -> int:
    return int(getattr(pipe, component).get_submodule(module).weight.shape[0])


def _dotted(pipe, reference: dict, seed: int, prefix: str, down: str, up: str, alpha: float | None,
            text_layers: dict | None = None) -> Lora:
    """Dotted names (ComfyUI/BFL ``diffusion_model.``, XLabs, diffusers/PEFT, ai-toolkit) with an optional
    ``.alpha`` tensor; ``text_layers``: full key stems of text-encoder layers -> (component, module)."""
    lora = Lora(seed)
    layers = [("transformer", prefix + name, parts) for name, parts in reference.items()]
    layers += [(component, stem, [(module, _rows(0, _rows_of(pipe, component, module)))])
               for stem, (component, module) in (text_layers or {}).items()]
    for component, stem, parts in layers:
        lora.layer(pipe, component, parts, (f"{stem}.{down}", f"{stem}.{up}"), alpha)
        if alpha is not None:
            lora.tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    return lora


# ComfyUI's text-encoder names
COMFY_TEXT_LAYERS = {
    "text_encoders.clip_l.transformer.text_model.encoder.layers.1.self_attn.k_proj":
        ("text_encoder", "encoder.layers.1.self_attn.k_proj"),
    "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.o":
        ("text_encoder_2", "encoder.block.0.layer.0.SelfAttention.o"),
}


def _diffusers_reference(reference: dict) -> dict:
    """The diffusers layers of a reference table as a table of their own (one layer each)."""
    return {module: [(module, _rows(0, sum(stop - start for start, stop in ranges)))]
            for parts in reference.values() for module, ranges in parts}


def _peft(pipe, reference: dict, seed: int, alpha: float) -> tuple[Lora, dict[str, str]]:
    """A diffusers/PEFT file: transformer.<module>.lora_A/B.weight, alpha in the adapter metadata."""
    lora = _dotted(pipe, _diffusers_reference(reference), seed, "transformer.", "lora_A.weight", "lora_B.weight",
                   alpha=None)
    for module in list(lora.deltas):
        lora.deltas[module] = lora.deltas[module] * alpha / RANK
    config = {"transformer.r": RANK, "transformer.lora_alpha": alpha,
              "transformer.target_modules": sorted(_diffusers_reference(reference))}
    return lora, {"format": "pt", "lora_adapter_metadata": json.dumps(config)}


def _loaded(base, path: Path) -> dict[tuple[str, str], torch.Tensor]:
    pipe = copy.deepcopy(base)
    load_lora_file(pipe, path, "file")
    return _weights(pipe)


def _expected(base, lora: Lora) -> dict[tuple[str, str], torch.Tensor]:
    weights = _weights(base)
    for key, delta in lora.deltas.items():
        weights[key] = weights[key] + delta
    return weights


def _assert_weights(actual, expected) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=ATOL, rtol=RTOL,
                                   msg=lambda message, key=key: f"{key}: {message}")


FLUX_CASES = {
    "kohya (lora_unet_ BFL names, CLIP lora_te1_, T5 lora_te2_)":
        lambda pipe: _kohya(pipe, FLUX_REFERENCE, 1, text_layers=CLIP_LAYERS | T5_LAYERS),
    "kohya without alpha (scale 1)": lambda pipe: _kohya(pipe, FLUX_REFERENCE, 2, alpha=None),
    "ComfyUI / BFL names (diffusion_model., lora_down/up, alpha, text_encoders.clip_l/t5xxl)":
        lambda pipe: _dotted(pipe, FLUX_REFERENCE, 3, "diffusion_model.", "lora_down.weight", "lora_up.weight", 2.0,
                             text_layers=COMFY_TEXT_LAYERS),
    "BFL names with lora_A/B (no alpha)":
        lambda pipe: _dotted(pipe, FLUX_REFERENCE, 4, "diffusion_model.", "lora_A.weight", "lora_B.weight", None),
    "XLabs (processor.qkv_lora1 ...)":
        lambda pipe: _dotted(pipe, XLABS_REFERENCE, 5, "", "down.weight", "up.weight", None),
    "ai-toolkit (transformer. diffusers names, lora_A/B)":
        lambda pipe: _dotted(pipe, _diffusers_reference(FLUX_REFERENCE), 6, "transformer.", "lora_A.weight",
                             "lora_B.weight", None),
    "ai-toolkit with lora_down/up and alpha":
        lambda pipe: _dotted(pipe, _diffusers_reference(FLUX_REFERENCE), 7, "transformer.", "lora_down.weight",
                             "lora_up.weight", 16.0),
    "OneTrainer (lora_transformer_ flattened diffusers names, lora_te1_)":
        lambda pipe: _kohya(pipe, _diffusers_reference(FLUX_REFERENCE), 8, prefix="lora_transformer_",
                            text_layers=CLIP_LAYERS),
}
SD3_CASES = {
    "kohya-style (lora_unet_joint_blocks_, CLIP-L lora_te1_, CLIP-G lora_te2_, T5 lora_te3_)":
        lambda pipe: _kohya(pipe, SD3_REFERENCE, 11, alpha=2.0, text_layers=SD3_CLIP_LAYERS),
    "ComfyUI names (diffusion_model.joint_blocks, lora_A/B)":
        lambda pipe: _dotted(pipe, SD3_REFERENCE, 12, "diffusion_model.", "lora_A.weight", "lora_B.weight", None),
    "OneTrainer (lora_transformer_)":
        lambda pipe: _kohya(pipe, _diffusers_reference(SD3_REFERENCE), 13, prefix="lora_transformer_"),
}


@pytest.mark.parametrize("case", list(FLUX_CASES))
def test_flux_file_loads_as_the_hand_computed_delta(flux, tmp_path, case):
    lora = FLUX_CASES[case](flux)
    path = lora.save(tmp_path / "flux.safetensors")
    _assert_weights(_loaded(flux, path), _expected(flux, lora))


@pytest.mark.parametrize("case", list(SD3_CASES))
def test_sd3_file_loads_as_the_hand_computed_delta(sd3, tmp_path, case):
    lora = SD3_CASES[case](sd3)
    path = lora.save(tmp_path / "sd3.safetensors")
    _assert_weights(_loaded(sd3, path), _expected(sd3, lora))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_peft_file_loads_as_the_hand_computed_delta(flux, sd3, tmp_path, family):
    pipe, reference = (flux, FLUX_REFERENCE) if family == "flux" else (sd3, SD3_REFERENCE)
    lora, metadata = _peft(pipe, reference, 21, alpha=2.0)
    path = lora.save(tmp_path / "peft.safetensors", metadata)
    _assert_weights(_loaded(pipe, path), _expected(pipe, lora))


def test_lokr_on_a_fused_layer_is_split_by_rows(flux, tmp_path):
    """LyCORIS LoKr on kohya's img_attn.qkv: kron(w1, w2) (96 x 32), full factors (scale 1), split into q/k/v."""
    generator = torch.Generator().manual_seed(31)
    w1, w2 = torch.randn(4, 2, generator=generator), torch.randn(24, 16, generator=generator) * 0.1
    lora = Lora(0)
    lora.tensors = {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": w1,
                    "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": w2,
                    "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}
    delta = torch.kron(w1, w2)
    for (module, ranges) in FLUX_REFERENCE["double_blocks.0.img_attn.qkv"]:
        (start, stop), = ranges
        lora.deltas[("transformer", module)] = delta[start:stop]
    path = lora.save(tmp_path / "lokr.safetensors")
    _assert_weights(_loaded(flux, path), _expected(flux, lora))


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_on_a_fused_layer_is_taken_on_the_fused_weight(flux, tmp_path, axis):
    """LyCORIS DoRA (dora_scale per output row or per input column) on kohya's img_attn.qkv: the norm is
    over the reference layer's weight (q; k; v stacked), and the resulting change is split by rows."""
    parts = FLUX_REFERENCE["double_blocks.0.img_attn.qkv"]
    lora = _kohya(flux, {"double_blocks.0.img_attn.qkv": parts}, 61)
    fused = torch.cat([weight_of(flux, "transformer", module) for module, _ in parts])
    fused_delta = torch.cat([lora.deltas[("transformer", module)] for module, _ in parts])
    magnitude, delta = _dora(fused, fused_delta, axis, torch.Generator().manual_seed(62))
    lora.tensors["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = magnitude
    for module, ((start, stop),) in parts:
        lora.deltas[("transformer", module)] = delta[start:stop]
    path = lora.save(tmp_path / "dora.safetensors")
    _assert_weights(_loaded(flux, path), _expected(flux, lora))


def test_simpletuner_lycoris_lokr_loads(flux, tmp_path):
    """LyCORIS's wrapper names (lycoris_<flattened diffusers name>), as SimpleTuner saves FLUX LoKr files:
    lokr_w1 whole, lokr_w2 decomposed (scale alpha / rows of lokr_w2_b)."""
    generator = torch.Generator().manual_seed(32)
    w1 = torch.randn(4, 4, generator=generator)
    w2_a, w2_b = torch.randn(8, 2, generator=generator), torch.randn(2, 8, generator=generator) * 0.1
    stem = "lycoris_single_transformer_blocks_0_attn_to_v"
    lora = Lora(0)
    lora.tensors = {f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2_a": w2_a, f"{stem}.lokr_w2_b": w2_b,
                    f"{stem}.alpha": torch.tensor(1.0)}
    lora.deltas[("transformer", SINGLE + "attn.to_v")] = 0.5 * torch.kron(w1, w2_a @ w2_b)
    path = lora.save(tmp_path / "lycoris.safetensors")
    _assert_weights(_loaded(flux, path), _expected(flux, lora))


# --- equality with diffusers' own loading ------------------------------------------------------------

def _diffusers_loaded(base, path: Path) -> dict[tuple[str, str], torch.Tensor]:
    pipe = copy.deepcopy(base)
    pipe.load_lora_weights(str(path), adapter_name="file")
    return _weights(pipe)


@pytest.mark.parametrize("case", ["kohya", "xlabs", "peft"])
def test_flux_file_loads_as_diffusers_loads_it(flux, tmp_path, case):
    if case == "kohya":
        # The block layers only: diffusers 0.42's kohya converter splits linear1 by FLUX.1's sizes (3072 x 3 +
        # 12288 rows), drops the top-level layers (img_in, txt_in, time_in, vector_in, guidance_in, final_layer:
        # written without the transformer. prefix its loader keeps) and kohya's CLIP names (text_model. level,
        # gone in transformers 5); those are checked against the hand-computed oracle above.
        reference = {name: parts for name, parts in FLUX_REFERENCE.items()
                     if name.startswith(("double_blocks.", "single_blocks.")) and name != "single_blocks.0.linear1"}
        lora, metadata = _kohya(flux, reference, 41), None
    elif case == "xlabs":
        lora, metadata = _dotted(flux, XLABS_REFERENCE, 42, "", "down.weight", "up.weight", None), None
    else:
        lora, metadata = _peft(flux, FLUX_REFERENCE, 43, alpha=8.0)
    path = lora.save(tmp_path / f"{case}.safetensors", metadata)
    ours, theirs, plain = _loaded(flux, path), _diffusers_loaded(flux, path), _weights(flux)
    changed = {key for key in plain if not torch.equal(theirs[key], plain[key])}
    assert changed == set(lora.deltas), "diffusers changes the layers the file adapts"
    _assert_weights(ours, theirs)


def test_sd3_peft_file_loads_as_diffusers_loads_it(sd3, tmp_path):
    lora, metadata = _peft(sd3, SD3_REFERENCE, 44, alpha=8.0)
    path = lora.save(tmp_path / "sd3.safetensors", metadata)
    _assert_weights(_loaded(sd3, path), _diffusers_loaded(sd3, path))


# --- a kohya file through the pipeline, against plain diffusers with the same LoRA in diffusers format --

# diffusers projection -> (reference layer, position in its fused qkv or None)
_TO_REFERENCE = {
    "flux": {r"transformer_blocks\.(\d+)\.attn\.to_([qkv])$": "double_blocks.{}.img_attn.qkv",
             r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj$": "double_blocks.{}.txt_attn.qkv",
             r"single_transformer_blocks\.(\d+)\.attn\.to_([qkv])$": "single_blocks.{}.linear1",
             r"transformer_blocks\.(\d+)\.attn\.to_out\.0$": "double_blocks.{}.img_attn.proj",
             r"transformer_blocks\.(\d+)\.attn\.to_add_out$": "double_blocks.{}.txt_attn.proj"},
    "sd3": {r"transformer_blocks\.(\d+)\.attn\.to_([qkv])$": "joint_blocks.{}.x_block.attn.qkv",
            r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj$": "joint_blocks.{}.context_block.attn.qkv",
            r"transformer_blocks\.(\d+)\.attn\.to_out\.0$": "joint_blocks.{}.x_block.attn.proj",
            r"transformer_blocks\.(\d+)\.attn\.to_add_out$": "joint_blocks.{}.context_block.attn.proj"},
}


def _as_kohya(peft_file: Path, family: str, alpha: float, out: Path) -> Path:
    """The diffusers-format LoRA as kohya saves it with split q/k/v (``split_qkv``): one fused layer per qkv,
    down factors stacked, up factors block-diagonal (FLUX's single-block MLP rows zero), alpha times 3 for
    the tripled rank, so every projection keeps its scale."""
    from safetensors.torch import load_file

    tensors = load_file(str(peft_file))
    fused: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key in [key for key in tensors if key.startswith("transformer.") and key.endswith(".lora_A.weight")]:
        module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        match, name = next((match, name) for pattern, name in _TO_REFERENCE[family].items()
                           if (match := re.fullmatch(pattern, module)))
        part = match.group(2) if match.lastindex == 2 else "whole"
        fused.setdefault(name.format(match.group(1)), {})[part] = (
            tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")])
    kohya = {}
    for name, parts in fused.items():
        base = "lora_unet_" + name.replace(".", "_")
        if "whole" in parts:
            down, up = parts["whole"]
            kohya_alpha = alpha
        else:
            down = torch.cat([parts[part][0] for part in "qkv"])
            up = torch.block_diag(*[parts[part][1] for part in "qkv"])
            if name.endswith("linear1"):  # q, k, v, then the MLP input (128 rows), not adapted here
                up = torch.cat([up, torch.zeros(128, up.shape[1])])
            kohya_alpha = 3 * alpha
        kohya |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                  f"{base}.alpha": torch.tensor(kohya_alpha)}
    return write(out, kohya)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_kohya_file_generates_as_plain_diffusers_with_the_diffusers_file(tmp_path, family):
    from loracompose import load_pipeline
    from loracompose.assets.tiny import build_tiny_flux, build_tiny_lora, build_tiny_sd3
    from loracompose.methods.merge import Merge

    build, reference_class = {"flux": (build_tiny_flux, FluxPipeline),
                              "sd3": (build_tiny_sd3, StableDiffusion3Pipeline)}[family]
    model = build(tmp_path / "model", seed=0)
    peft_file = build_tiny_lora(model, tmp_path / "peft.safetensors", seed=1, alpha=8.0, text_encoder=False,
                                init_scale=2.0)
    kohya_file = _as_kohya(peft_file, family, 8.0, tmp_path / "kohya.safetensors")
    options = {"height": 32, "width": 32, "guidance_scale": 5.0}
    pipe = load_pipeline(model, device="cpu")
    ours = pipe.generate("a cat on a mat", [LoraSpec(kohya_file, 0.8)], Merge(), steps=3, seed=0,
                         output_type="latent", append_triggers=False, show_progress=False, **options).latents
    reference = reference_class.from_pretrained(model)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(peft_file), adapter_name="a")
    reference.set_adapters(["a"], [0.8])
    expected = reference("a cat on a mat", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                         output_type="latent", max_sequence_length=32, **options).images
    plain = reference_class.from_pretrained(model)
    plain.set_progress_bar_config(disable=True)
    without = plain("a cat on a mat", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="latent", max_sequence_length=32, **options).images
    assert (expected - without).abs().max() > 1e-2, "the LoRA changes the result"
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


# --- refusals ------------------------------------------------------------------------------------------

def _refusal(pipe, path: Path) -> str:
    before = _weights(pipe)
    with pytest.raises(UserError) as error:
        load_lora_file(pipe, path, "refused")
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    assert "refused" not in getattr(denoiser, "peft_config", {})
    after = _weights(pipe)
    assert all(torch.equal(before[key], after[key]) for key in before), "no layer touched"
    return message


def test_flux_lora_on_sd_model_is_refused_naming_both(base_pipes, flux, tmp_path):
    path = _kohya(flux, FLUX_REFERENCE, 51).save(tmp_path / "flux.safetensors")
    message = _refusal(base_pipes["sd15"], path)
    assert "FLUX" in message and "Stable Diffusion" in message
    lora = inspect_lora(LoraSpec(path))  # the pipeline's check before any conversion
    with pytest.raises(UserError, match=r"made for FLUX .*the model is SD1\.5"):
        check_architecture(lora, "sd15")


def test_diffusers_named_dit_lora_on_sd_model_is_refused_naming_both(base_pipes, flux, tmp_path):
    """transformer. / lora_transformer_ keys of joint blocks only (FLUX or SD3 alike) on an SD UNet."""
    reference = _diffusers_reference({"double_blocks.0.img_attn.proj": FLUX_REFERENCE["double_blocks.0.img_attn.proj"]})
    for prefix in ("transformer.", "lora_transformer_"):
        lora = (_dotted(flux, reference, 55, prefix, "lora_A.weight", "lora_B.weight", None) if prefix.endswith(".")
                else _kohya(flux, reference, 55, prefix=prefix))
        message = _refusal(base_pipes["sd15"], lora.save(tmp_path / "dit.safetensors"))
        assert "a diffusion transformer (FLUX or SD3)" in message and "Stable Diffusion" in message


def test_comfyui_sd_unet_names_load_on_sd15(base_pipes, tmp_path):
    """ComfyUI's diffusion_model. prefix on an SD1.5 UNet file (sgm names) is the UNet's, not a DiT's."""
    lora = Lora(56)
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    stem = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    lora.layer(base_pipes["sd15"], "unet", [(module, _rows(0, _rows_of(base_pipes["sd15"], "unet", module)))],
               (f"{stem}.lora_down.weight", f"{stem}.lora_up.weight"), None)
    path = lora.save(tmp_path / "comfy_sd15.safetensors")
    pipe = copy.deepcopy(base_pipes["sd15"])
    load_lora_file(pipe, path, "file")
    layer = pipe.unet.get_submodule(module)
    expected = layer.get_base_layer().weight + lora.deltas[("unet", module)]
    torch.testing.assert_close(layer.get_base_layer().weight + layer.get_delta_weight("file"), expected,
                               atol=ATOL, rtol=RTOL)


def test_sd_lora_on_flux_and_sd3_is_refused_naming_both(flux, sd3, tmp_path):
    path = write(tmp_path / "sd15.safetensors", {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 4)})
    for pipe, family in ((flux, "FLUX"), (sd3, "SD3")):
        message = _refusal(pipe, path)
        assert "Stable Diffusion" in message and f"the model is {family}" in message


def test_sd3_lora_on_flux_and_flux_lora_on_sd3_are_refused_naming_both(flux, sd3, tmp_path):
    sd3_file = _kohya(sd3, SD3_REFERENCE, 52).save(tmp_path / "sd3.safetensors")
    flux_file = _kohya(flux, FLUX_REFERENCE, 53).save(tmp_path / "flux.safetensors")
    assert re.search(r"made for SD3 .*the model is FLUX", _refusal(flux, sd3_file))
    assert re.search(r"made for FLUX .*the model is SD3", _refusal(sd3, flux_file))
    for path, family, model in ((sd3_file, "sd3", "flux"), (flux_file, "flux", "sd3")):
        lora = inspect_lora(LoraSpec(path))
        assert lora.architecture == family
        with pytest.raises(UserError, match="made for"):
            check_architecture(lora, model)


def _zero_lora(base: str, rows: int, down: str = "lora_down.weight", up: str = "lora_up.weight"):
    return {f"{base}.{down}": torch.zeros(RANK, 32), f"{base}.{up}": torch.zeros(rows, RANK)}


def test_flux_lora_on_double_blocks_only_is_not_taken_for_sd3(flux, tmp_path):
    """diffusers names of joint blocks alone fit FLUX and SD3 alike: the architecture check leaves the
    file to the converter, which loads it on FLUX."""
    reference = {name: parts for name, parts in FLUX_REFERENCE.items() if name.startswith("double_blocks.")}
    lora = _dotted(flux, _diffusers_reference(reference), 71, "transformer.", "lora_A.weight", "lora_B.weight", None)
    path = lora.save(tmp_path / "double_only.safetensors")
    check_architecture(inspect_lora(LoraSpec(path)), "flux")
    _assert_weights(_loaded(flux, path), _expected(flux, lora))


REFUSED_FILES = {
    "a key in no format": ({"transformer.transformer_blocks.0.attn.to_q.weight": torch.zeros(32, 32)},
                           "no format"),
    "a layer FLUX does not have": (_zero_lora("lora_unet_double_blocks_0_img_attn_norm", 32), "does not have"),
    "a block FLUX does not have": (_zero_lora("lora_unet_double_blocks_7_img_attn_qkv", 96), "does not have"),
    "qkv rows that do not fit": (_zero_lora("lora_unet_double_blocks_0_img_attn_qkv", 90), "does not fit"),
    "a FLUX Control LoRA": ({"double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(16)}, "Control LoRA"),
    "LoRA biases": ({**_zero_lora("transformer.context_embedder", 32, "lora_A.weight", "lora_B.weight"),
                     "transformer.context_embedder.lora_B.bias": torch.zeros(32)}, "bias"),
    "a fused layer and its parts both": ({**_zero_lora("lora_unet_double_blocks_0_img_attn_qkv", 96),
                                          **_zero_lora("transformer.transformer_blocks.0.attn.to_k", 32,
                                                       "lora_A.weight", "lora_B.weight")},
                                         "two sets of weights"),
}


@pytest.mark.parametrize("case", list(REFUSED_FILES))
def test_bad_flux_file_is_refused_in_one_line(flux, tmp_path, case):
    tensors, reason = REFUSED_FILES[case]
    path = write(tmp_path / "bad.safetensors", tensors)
    assert reason in _refusal(flux, path)


def test_non_finite_flux_file_is_refused(flux, tmp_path):
    lora = _kohya(flux, {"double_blocks.0.img_attn.qkv": FLUX_REFERENCE["double_blocks.0.img_attn.qkv"]}, 54)
    lora.tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(lora.tensors, str(path))
    assert "NaN or infinite" in _refusal(flux, path)


# --- full-size models (meta device: names and shapes only) -------------------------------------------

FLUX_1_DEV = {"in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
              "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
              "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
SD35_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
               "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
               "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
               "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"}
# kohya name -> the diffusers layer it renames, or its split [(diffusers layer, rows of the kohya layer)], or None
FLUX_1_DEV_NAMES = {
    "double_blocks_18_img_attn_qkv": [("transformer_blocks.18.attn.to_q", [(0, 3072)]),
                                      ("transformer_blocks.18.attn.to_k", [(3072, 6144)]),
                                      ("transformer_blocks.18.attn.to_v", [(6144, 9216)])],
    "double_blocks_3_txt_mod_lin": "transformer_blocks.3.norm1_context.linear",
    "single_blocks_37_linear1": [("single_transformer_blocks.37.attn.to_q", [(0, 3072)]),
                                 ("single_transformer_blocks.37.attn.to_k", [(3072, 6144)]),
                                 ("single_transformer_blocks.37.attn.to_v", [(6144, 9216)]),
                                 ("single_transformer_blocks.37.proj_mlp", [(9216, 21504)])],
    "single_blocks_20_linear2": "single_transformer_blocks.20.proj_out",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_adaLN_modulation_1": [("norm_out.linear", [(3072, 6144), (0, 3072)])],
    "double_blocks_19_img_attn_qkv": None,  # FLUX.1 has 19 double blocks
    "single_blocks_38_linear1": None,
}
SD35_MEDIUM_NAMES = {
    "joint_blocks_12_x_block_attn2_qkv": [("transformer_blocks.12.attn2.to_q", [(0, 1536)]),
                                          ("transformer_blocks.12.attn2.to_k", [(1536, 3072)]),
                                          ("transformer_blocks.12.attn2.to_v", [(3072, 4608)])],
    "joint_blocks_13_x_block_attn2_qkv": None,  # dual attention in blocks 0-12 only
    "joint_blocks_0_x_block_adaLN_modulation_1": "transformer_blocks.0.norm1.linear",  # 9 x 1536 rows, in order
    "joint_blocks_22_context_block_adaLN_modulation_1": "transformer_blocks.22.norm1_context.linear",
    "joint_blocks_23_context_block_adaLN_modulation_1": [("transformer_blocks.23.norm1_context.linear",
                                                          [(1536, 3072), (0, 1536)])],
    "joint_blocks_23_context_block_attn_proj": None,  # the last context block is pre-only
    "joint_blocks_23_context_block_attn_qkv": [("transformer_blocks.23.attn.add_q_proj", [(0, 1536)]),
                                               ("transformer_blocks.23.attn.add_k_proj", [(1536, 3072)]),
                                               ("transformer_blocks.23.attn.add_v_proj", [(3072, 4608)])],
    "x_embedder_proj": "pos_embed.proj",
    "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
}


@pytest.mark.parametrize("model_class, config, names", [
    (FluxTransformer2DModel, FLUX_1_DEV, FLUX_1_DEV_NAMES),
    (SD3Transformer2DModel, SD35_MEDIUM, SD35_MEDIUM_NAMES),
], ids=["FLUX.1-dev", "SD3.5-medium"])
def test_reference_names_resolve_on_full_size_models(model_class, config, names):
    from loracompose.formats.names import ModuleIndex

    with torch.device("meta"):
        model = model_class(**config)
    index = ModuleIndex.of(model)
    for name, expected in names.items():
        split = index.resolve_split(name)
        found = index.resolve(name) or (split and [(module, list(ranges)) for module, ranges in split.parts])
        assert found == expected, name
