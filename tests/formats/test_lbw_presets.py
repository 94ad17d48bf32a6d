"""A1111 lora-block-weight vectors and preset names (``lbw=INALL``): every layer a LoCon file touches gets
the extension's strength (blocks the vector does not list at 0, the mid block's ResNets at MID), each
preset name is the extension's vector, a name gives the same pixels as its numbers spelled out, a vector
for another block layout is refused, and the API, prompt tags and suites take names as the CLI does.

The oracles are written out by hand: the extension's default preset table, the block each module of
the standard UNets belongs to in the extension's (sgm) numbering, and each LoCon layer's strength.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from lora_files import assert_weights, layer_weights, weight_of, write

from loracompose.assets.tiny import build_tiny_lora, tiny_sd15_pipeline, tiny_sdxl_pipeline
from loracompose.errors import UserError
from loracompose.formats import load_lora_file
from loracompose.formats.block_weights import LBW_PRESETS, layer_factors, lbw_block_weights
from loracompose.formats.prompt_tags import split_lora_tags
from loracompose.lora import LoraSpec
from loracompose import load_pipeline

# The default presets of sd-webui-lora-block-weight, as its preset list spells them.
EXTENSION_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
# The extension's block order for 17- and 12-value vectors (its M00 is our MID).
BLOCKS = {
    "sd15": ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06",
             "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"],
    "sdxl": ["BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"],
}
# A full vector (26 values for SD1.5, 20 for SDXL) lists every block of the original UNet.
FULL_BLOCKS = {
    "sd15": ["BASE", *[f"IN{index:02d}" for index in range(12)], "MID", *[f"OUT{index:02d}" for index in range(12)]],
    "sdxl": ["BASE", *[f"IN{index:02d}" for index in range(9)], "MID", *[f"OUT{index:02d}" for index in range(9)]],
}
# The standard UNets' block layouts at tiny width (SDXL with fewer transformer layers: the layout is what counts).
SD15_LAYOUT = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=2, sample_size=16, cross_attention_dim=32)
SDXL_LAYOUT = dict(
    block_out_channels=(32, 32, 32), layers_per_block=2, sample_size=16,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(2, 4, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
)
# The blocks of each UNet a vector does not list (the extension gives them 0), and its layers in no block.
UNLISTED = {"sd15": {"IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02"},
            "sdxl": {"IN00", "IN01", "IN02", "IN03", "IN06", "OUT06", "OUT07", "OUT08"}}
OUTSIDE_BLOCKS = {"sd15": {"time_embedding.linear_1", "time_embedding.linear_2", "conv_out"},
                  "sdxl": {"time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1",
                           "add_embedding.linear_2", "conv_out"}}
MIDD_SPELLED = "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"
SDXL_VECTOR = "0.5,1,0,1,0.5,0,1,1,1,0,0.5,0"


def _single_line(caught) -> str:
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_every_preset_name_is_the_extensions_vector():
    assert list(LBW_PRESETS) == list(EXTENSION_PRESETS)
    for name, spelled in EXTENSION_PRESETS.items():
        assert LBW_PRESETS[name] == tuple(float(value) for value in spelled.split(","))
        assert lbw_block_weights(name, "test") == lbw_block_weights(spelled, "test")
        assert LoraSpec.parse(f"x.safetensors:0.8:lbw={name}").block_weights == lbw_block_weights(spelled, "test")


def _extension_block(module: str) -> str | None:
    """The extension's block of a module of the standard UNets (two ResNets per down block, three per up
    block), by hand from the sgm layout: input block 0 is conv_in, then each down block's (ResNet,
    attention) pairs and its downsampler; the mid block is one block; each up block's (ResNet, attention)
    pairs one output block each, its upsampler in the last. None: in no block."""
    if module == "conv_in":
        return "IN00"
    if module.startswith("mid_block."):
        return "MID"
    found = re.match(r"(down|up)_blocks\.(\d)\.(attentions|resnets|downsamplers|upsamplers)\.(\d)\.", module)
    if found is None:
        return None
    side, block, kind, index = found.group(1), int(found.group(2)), found.group(3), int(found.group(4))
    if side == "down":
        return f"IN{3 * block + (3 if kind == 'downsamplers' else index + 1):02d}"
    return f"OUT{3 * block + (2 if kind == 'upsamplers' else index):02d}"


@pytest.mark.parametrize("arch, config", [("sd15", dict(cross_attention_dim=768)), ("sdxl", dict(
    SDXL_LAYOUT, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816))])
@pytest.mark.parametrize("form", ["listed", "full"])
def test_vector_values_land_on_the_extensions_blocks(arch, config, form):
    """On the full-size UNets (meta device), every Linear/Conv2d: a block the vector lists gives its value
    (all values distinct), a block it does not list 0, a layer in no block (time/label embedding,
    conv_out) 1, as the extension does; a full vector (26/20 values) gives every block its own value."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    blocks = BLOCKS[arch] if form == "listed" else FULL_BLOCKS[arch]
    values = [float(index + 1) for index in range(len(blocks))]
    weights = lbw_block_weights(",".join(map(str, values)), "test")
    modules = [name for name, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    factors = layer_factors(weights, "unet", modules, unet, "test")
    unlisted = set()
    for module, factor in factors.items():
        block = _extension_block(module)
        if block is None:
            assert factor == 1.0, module
        elif block in blocks:
            assert factor == values[blocks.index(block)], module
        else:
            assert factor == 0.0, module
            unlisted.add(block)
    assert unlisted == (UNLISTED[arch] if form == "listed" else set())
    assert {module for module in factors if _extension_block(module) is None} == OUTSIDE_BLOCKS[arch]
    assert layer_factors(weights, "text_encoder", ["encoder.layers.0.mlp.fc1"], unet, "test") == {
        "encoder.layers.0.mlp.fc1": values[0]}


# A LoCon/LoHa file on every kind of layer of the tiny real-layout UNets, in and out of the listed blocks:
# (component, module) -> (the file's key prefix, the layer's strength under LOCON_VECTORS by the extension's
# rule, worked out by hand: a listed block its value, an unlisted block 0, outside the blocks 1).
# The vectors: BASE 0.9, INxx 0.xx, MID 1.3, OUTxx 2.xx.
LOCON_VECTORS = {"sd15": "0.9,0.01,0.02,0.04,0.05,0.07,0.08,1.3,2.03,2.04,2.05,2.06,2.07,2.08,2.09,2.10,2.11",
                 "sdxl": "0.9,0.04,0.05,0.07,0.08,1.3,2.00,2.01,2.02,2.03,2.04,2.05"}
LOCON_LAYERS = {
    "sd15": {
        ("unet", "conv_in"): ("lora_unet_conv_in", 0.0),  # IN00
        ("unet", "down_blocks.0.resnets.0.conv1"): ("lora_unet_down_blocks_0_resnets_0_conv1", 0.01),  # IN01
        ("unet", "down_blocks.0.attentions.1.proj_in"): ("lora_unet_down_blocks_0_attentions_1_proj_in", 0.02),
        ("unet", "down_blocks.0.downsamplers.0.conv"): ("lora_unet_down_blocks_0_downsamplers_0_conv", 0.0),  # IN03
        ("unet", "down_blocks.1.downsamplers.0.conv"): ("lora_unet_down_blocks_1_downsamplers_0_conv", 0.0),  # IN06
        ("unet", "down_blocks.2.resnets.1.conv2"): ("lora_unet_down_blocks_2_resnets_1_conv2", 0.08),  # IN08
        ("unet", "down_blocks.2.downsamplers.0.conv"): ("lora_unet_down_blocks_2_downsamplers_0_conv", 0.0),  # IN09
        ("unet", "down_blocks.3.resnets.0.conv1"): ("lora_unet_down_blocks_3_resnets_0_conv1", 0.0),  # IN10
        ("unet", "down_blocks.3.resnets.1.time_emb_proj"): ("lora_unet_down_blocks_3_resnets_1_time_emb_proj",
                                                            0.0),  # IN11
        ("unet", "mid_block.resnets.0.conv1"): ("lora_unet_mid_block_resnets_0_conv1", 1.3),
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"):
            ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", 1.3),
        ("unet", "mid_block.resnets.1.conv2"): ("lora_unet_mid_block_resnets_1_conv2", 1.3),
        ("unet", "up_blocks.0.resnets.0.conv_shortcut"): ("lora_unet_up_blocks_0_resnets_0_conv_shortcut", 0.0),
        ("unet", "up_blocks.0.resnets.1.conv1"): ("lora_unet_up_blocks_0_resnets_1_conv1", 0.0),  # OUT01
        ("unet", "up_blocks.0.upsamplers.0.conv"): ("lora_unet_up_blocks_0_upsamplers_0_conv", 0.0),  # OUT02
        ("unet", "up_blocks.1.resnets.0.conv2"): ("lora_unet_up_blocks_1_resnets_0_conv2", 2.03),
        ("unet", "up_blocks.1.upsamplers.0.conv"): ("lora_unet_up_blocks_1_upsamplers_0_conv", 2.05),  # in OUT05
        ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k"):
            ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k", 2.11),
        ("unet", "time_embedding.linear_1"): ("lora_unet_time_embedding_linear_1", 1.0),
        ("unet", "conv_out"): ("lora_unet_conv_out", 1.0),
        ("text_encoder", "encoder.layers.0.self_attn.q_proj"): ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                                                                0.9),
    },
    "sdxl": {  # kohya's sgm names: the block is in the name
        ("unet", "conv_in"): ("lora_unet_input_blocks_0_0", 0.0),
        ("unet", "down_blocks.0.resnets.0.conv1"): ("lora_unet_input_blocks_1_0_in_layers_2", 0.0),
        ("unet", "down_blocks.0.resnets.1.conv2"): ("lora_unet_input_blocks_2_0_out_layers_3", 0.0),
        ("unet", "down_blocks.0.downsamplers.0.conv"): ("lora_unet_input_blocks_3_0_op", 0.0),
        ("unet", "down_blocks.1.resnets.0.conv1"): ("lora_unet_input_blocks_4_0_in_layers_2", 0.04),
        ("unet", "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_q"):
            ("lora_unet_input_blocks_5_1_transformer_blocks_1_attn1_to_q", 0.05),
        ("unet", "down_blocks.1.downsamplers.0.conv"): ("lora_unet_input_blocks_6_0_op", 0.0),
        ("unet", "down_blocks.2.resnets.1.time_emb_proj"): ("lora_unet_input_blocks_8_0_emb_layers_1", 0.08),
        ("unet", "mid_block.resnets.0.conv1"): ("lora_unet_middle_block_0_in_layers_2", 1.3),
        ("unet", "mid_block.resnets.1.conv2"): ("lora_unet_middle_block_2_out_layers_3", 1.3),
        ("unet", "up_blocks.0.resnets.0.conv_shortcut"): ("lora_unet_output_blocks_0_0_skip_connection", 2.00),
        ("unet", "up_blocks.0.upsamplers.0.conv"): ("lora_unet_output_blocks_2_2_conv", 2.02),
        ("unet", "up_blocks.1.attentions.2.proj_out"): ("lora_unet_output_blocks_5_1_proj_out", 2.05),
        ("unet", "up_blocks.1.upsamplers.0.conv"): ("lora_unet_output_blocks_5_2_conv", 2.05),
        ("unet", "up_blocks.2.resnets.0.conv1"): ("lora_unet_output_blocks_6_0_in_layers_2", 0.0),
        ("unet", "up_blocks.2.resnets.2.conv_shortcut"): ("lora_unet_output_blocks_8_0_skip_connection", 0.0),
        ("unet", "time_embedding.linear_1"): ("lora_unet_time_embed_0", 1.0),
        ("unet", "add_embedding.linear_2"): ("lora_unet_label_emb_0_2", 1.0),
        ("unet", "conv_out"): ("lora_unet_out_2", 1.0),
        ("text_encoder", "encoder.layers.0.self_attn.q_proj"):
            ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 0.9),
        ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc1"):
            ("lora_te2_text_model_encoder_layers_1_mlp_fc1", 0.9),
    },
}


def _lycoris_file(pipe, arch, kind, path):
    """A kohya LoCon (rank 2, alpha 1) or LyCORIS LoHa (dim 2, alpha 1) file on LOCON_LAYERS, and each
    layer's weight change at strength 1 (scale alpha / rank = 0.5)."""
    generator = torch.Generator().manual_seed(11)

    def randn(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    tensors, deltas = {}, {}
    for (component, module), (prefix, _) in LOCON_LAYERS[arch].items():
        weight = weight_of(pipe, component, module)
        tensors[f"{prefix}.alpha"] = torch.tensor(1.0)
        if kind == "locon":
            down, up = randn(2, *weight.shape[1:]), randn(weight.shape[0], 2, *[1] * (weight.ndim - 2))
            tensors |= {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up}
            delta = up.flatten(1) @ down.flatten(1)
        else:
            parts = {"w1_a": randn(weight.shape[0], 2), "w1_b": randn(2, weight[0].numel()),
                     "w2_a": randn(weight.shape[0], 2), "w2_b": randn(2, weight[0].numel())}
            tensors |= {f"{prefix}.hada_{name}": value for name, value in parts.items()}
            delta = (parts["w1_a"] @ parts["w1_b"]) * (parts["w2_a"] @ parts["w2_b"])
        deltas[(component, module)] = delta.reshape(weight.shape) * 0.5
    return write(path, tensors), deltas


@pytest.mark.parametrize("kind", ["locon", "loha"])
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_every_layer_gets_the_extensions_strength(base_pipes, tmp_path, arch, kind):
    """Every layer of a LoCon / LoHa file, listed block or not, fused into a tiny real-layout model: the
    base weight plus the layer's change times its hand-worked strength (float32, atol 2e-5 + rtol 1e-5)."""
    base = copy.deepcopy(base_pipes[arch])  # the shared text encoders stay without adapters
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SD15_LAYOUT if arch == "sd15" else SDXL_LAYOUT))
    pipe = (StableDiffusionPipeline if arch == "sd15" else StableDiffusionXLPipeline)(**{**base.components,
                                                                                          "unet": unet})
    expected = layer_weights(pipe)
    path, deltas = _lycoris_file(pipe, arch, kind, tmp_path / f"{kind}.safetensors")
    for key, delta in deltas.items():
        expected[key] = expected[key] + delta * LOCON_LAYERS[arch][key][1]
    load_lora_file(pipe, path, "locon", block_weights=lbw_block_weights(LOCON_VECTORS[arch], "test"))
    components = sorted({component for component, _ in LOCON_LAYERS[arch]})
    pipe.fuse_lora(components=components, adapter_names=["locon"])
    assert_weights(layer_weights(pipe), expected, set(deltas))


def _real_layout_model(folder, arch):
    """A tiny pipeline folder whose UNet has the standard SD1.5 or SDXL block layout, with one LoRA."""
    base = tiny_sd15_pipeline(seed=0) if arch == "sd15" else tiny_sdxl_pipeline(seed=0)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SD15_LAYOUT if arch == "sd15" else SDXL_LAYOUT))
    cls = StableDiffusionPipeline if arch == "sd15" else StableDiffusionXLPipeline
    cls(**{**base.components, "unet": unet}).save_pretrained(folder / "model", safe_serialization=True)
    lora = build_tiny_lora(folder / "model", folder / "lora.safetensors", seed=5, init_scale=2.0)
    return load_pipeline(folder / "model", device="cpu", dtype="fp32"), lora


@pytest.fixture(scope="module")
def sd15_layout(tmp_path_factory):
    return _real_layout_model(tmp_path_factory.mktemp("sd15-layout"), "sd15")


@pytest.fixture(scope="module")
def sdxl_layout(tmp_path_factory):
    return _real_layout_model(tmp_path_factory.mktemp("sdxl-layout"), "sdxl")


def _pixels(pipe, loras):
    result = pipe.generate("a cat", loras, steps=2, seed=3, width=32, height=32, output_type="np",
                           append_triggers=False)
    return np.asarray(result.images)


def test_named_preset_gives_the_pixels_of_its_spelled_vector_sd15(sd15_layout):
    pipe, lora = sd15_layout
    named = _pixels(pipe, [LoraSpec.parse(f"{lora}:0.8:lbw=MIDD")])
    spelled = _pixels(pipe, [LoraSpec(lora, 0.8, block_weights=MIDD_SPELLED)])  # the API's string form
    assert np.array_equal(named, spelled)
    plain = _pixels(pipe, [LoraSpec(lora, 0.8)])
    assert np.abs(named - plain).max() > 1e-3, "MIDD switches blocks off"
    assert np.array_equal(_pixels(pipe, [LoraSpec.parse(f"{lora}:0.8:lbw=ALL")]), plain)
    assert np.array_equal(_pixels(pipe, [LoraSpec.parse(f"{lora}:0.8:lbw=NONE")]), _pixels(pipe, []))


def test_sdxl_vector_applies_and_an_sd15_preset_is_refused(sdxl_layout):
    pipe, lora = sdxl_layout
    weighted = _pixels(pipe, [LoraSpec.parse(f"{lora}:lbw={SDXL_VECTOR}")])
    assert np.abs(weighted - _pixels(pipe, [LoraSpec(lora)])).max() > 1e-3
    assert np.array_equal(_pixels(pipe, [LoraSpec.parse(f"{lora}:lbw=1,0,0,0,0,0,0,0,0,0,0,0")]),
                          _pixels(pipe, [LoraSpec(lora, block_weights={"unet": 0.0})]))
    with pytest.raises(UserError, match=r"lbw=INALL is an SD1\.5 vector, but this model's UNet has the SDXL block "
                                        r"layout; give 12 or 20 numbers \(SDXL\)") as caught:
        pipe.generate("a cat", [LoraSpec.parse(f"{lora}:lbw=INALL")], steps=1, width=32, height=32)
    assert str(lora) in _single_line(caught)


def test_sdxl_vector_on_sd15_and_any_vector_on_another_layout_are_refused(sd15_layout, sd15, sd15_lora_files):
    pipe, lora = sd15_layout
    with pytest.raises(UserError, match=r"is an SDXL vector, but this model's UNet has the SD1\.5 block layout; "
                                        r"give 17 or 26 numbers or a preset name") as caught:
        pipe.generate("a cat", [LoraSpec(lora, block_weights=SDXL_VECTOR)], steps=1, width=32, height=32)
    _single_line(caught)
    with pytest.raises(UserError, match=r"has neither the SD1\.5 nor the SDXL block layout; use the block_weights "
                                        r"dict form") as caught:
        sd15.generate("a cat", [LoraSpec(sd15_lora_files[0], block_weights="ALL")], steps=1)
    _single_line(caught)


@pytest.mark.parametrize("text, fragment", [
    ("FOO", r"must be a preset name \(NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0\.5\)"),
    ("inall", r"preset names are upper case, as in the extension; write lbw=INALL"),
    ("1,R,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", r"random \(R, U\) and inherited \(X\) values are not supported"),
    ("1,1,1,1,1,1,1,1,U,U,1,1,1,1,1,1,1", r"random \(R, U\)"),
    ("1,2,3", r"must be a preset name"),
])
def test_bad_lbw_is_one_line_naming_the_input(text, fragment):
    with pytest.raises(UserError, match=re.escape(f"--lora 'x.safetensors:lbw={text}': lbw={text!r}") + ".*" + fragment
                       ) as caught:
        LoraSpec.parse(f"x.safetensors:lbw={text}")
    _single_line(caught)
    with pytest.raises(UserError, match=r"^LoRA x\.safetensors: lbw=") as caught:
        LoraSpec("x.safetensors", block_weights=text)
    _single_line(caught)


def test_prompt_tags_take_lbw(tmp_path, sd15_lora_files):
    (tmp_path / "zkx.safetensors").write_bytes(sd15_lora_files[0].read_bytes())
    prompt, specs = split_lora_tags("a cat <lora:zkx:0.7:lbw=OUTD>, <lora:zkx:0.5:0.9:lbw=1,0,0,0,0,0,0,0,1,1,1,1,"
                                    "0,0,0,0,0>", tmp_path)
    assert prompt == "a cat" and [spec.weight for spec in specs] == [0.7, 0.9] and specs[1].text_encoder_weight == 0.5
    assert specs[0].block_weights == specs[1].block_weights == lbw_block_weights(EXTENSION_PRESETS["OUTD"], "test")
    with pytest.raises(UserError, match=r"prompt tag '<lora:zkx:lbw=outd>': lbw='outd': preset names are") as caught:
        split_lora_tags("<lora:zkx:lbw=outd>", tmp_path)
    _single_line(caught)


def test_suite_loras_take_lbw(tmp_path):
    from loracompose.eval import parse_suite

    def suite(**lora):
        entry = {"file": "a.safetensors", "triggers": "zkx", "category": "style", **lora}
        return parse_suite({"model": "some/model", "loras": {"a": entry}, "sets": [["a"]], "methods": ["merge"]},
                           base_dir=tmp_path)

    named, listed, plain = suite(lbw="MIDD"), suite(lbw=[float(v) for v in MIDD_SPELLED.split(",")]), suite()
    expected = lbw_block_weights(MIDD_SPELLED, "test")
    assert named.loras["a"].spec().block_weights == listed.loras["a"].spec().block_weights == expected
    assert plain.loras["a"].spec().block_weights is None
    assert named.jobs()[0].id != plain.jobs()[0].id, "block weights are part of a job's identity"
    with pytest.raises(UserError, match=r"suite LoRA 'a': lbw='MIDDLE' must be a preset name") as caught:
        suite(lbw="MIDDLE")
    _single_line(caught)


def test_sidecar_records_block_weights_as_written(sd15_lora_files):
    from loracompose.lora import inspect_lora

    file = sd15_lora_files[0]
    assert inspect_lora(LoraSpec.parse(f"{file}:0.8:lbw=MIDD")).describe()["block_weights"] == "MIDD"
    as_dict = inspect_lora(LoraSpec(file, block_weights={"unet": {"mid": 0.0}})).describe()
    assert as_dict["block_weights"] == {"unet": {"mid": 0.0}}
    plain = inspect_lora(LoraSpec(file)).describe()
    assert "block_weights" not in plain and "text_encoder_weight" not in plain
    assert inspect_lora(LoraSpec(file, 0.5, text_encoder_weight=0.2)).describe()["text_encoder_weight"] == 0.2
