"""A1111 lora-block-weight preset names (``lbw=INALL``): each is the extension's vector, a name gives the
same pixels as its numbers spelled out, a vector for another block layout is refused, and the API,
prompt tags and suites take names as the CLI does.

The oracles are written out by hand: the extension's default preset table, and the block each module of
the standard UNets belongs to in the extension's (sgm) numbering.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from loracompose.assets.tiny import build_tiny_lora, tiny_sd15_pipeline, tiny_sdxl_pipeline
from loracompose.errors import UserError
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
# The standard UNets' block layouts at tiny width (SDXL with fewer transformer layers: the layout is what counts).
SD15_LAYOUT = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=2, sample_size=16, cross_attention_dim=32)
SDXL_LAYOUT = dict(
    block_out_channels=(32, 32, 32), layers_per_block=2, sample_size=16,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(2, 4, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
)
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


def _sgm_block(module: str) -> str | None:
    """The extension's block of a diffusers UNet attention or ResNet (one sgm block holds both; the mid
    block's ResNets are left out: diffusers' rule, which the dict form follows, keeps them at 1)."""
    found = re.match(r"(down|up)_blocks\.(\d)\.(attentions|resnets)\.(\d)\.", module)
    if found:
        side, block, index = found.group(1), int(found.group(2)), int(found.group(4))
        return f"IN{3 * block + index + 1:02d}" if side == "down" else f"OUT{3 * block + index:02d}"
    return "MID" if module.startswith("mid_block.attentions.") else None


@pytest.mark.parametrize("arch, config", [("sd15", dict(cross_attention_dim=768)), ("sdxl", dict(
    SDXL_LAYOUT, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816))])
def test_vector_values_land_on_the_extensions_blocks(arch, config):
    """On the full-size UNets (meta device): every attention/ResNet layer of a block the vector lists gets
    that block's value (all values distinct)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    values = [float(index + 1) for index in range(len(BLOCKS[arch]))]
    weights = lbw_block_weights(",".join(map(str, values)), "test")
    modules = [name for name, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    factors = layer_factors(weights, "unet", modules, unet, "test")
    checked = 0
    for module, factor in factors.items():
        block = _sgm_block(module)
        if block in BLOCKS[arch]:
            assert factor == values[BLOCKS[arch].index(block)], module
            checked += 1
    assert checked > 100
    assert layer_factors(weights, "text_encoder", ["encoder.layers.0.mlp.fc1"], unet, "test") == {
        "encoder.layers.0.mlp.fc1": values[0]}


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
                                        r"layout; give 12 numbers \(SDXL\)") as caught:
        pipe.generate("a cat", [LoraSpec.parse(f"{lora}:lbw=INALL")], steps=1, width=32, height=32)
    assert str(lora) in _single_line(caught)


def test_sdxl_vector_on_sd15_and_any_vector_on_another_layout_are_refused(sd15_layout, sd15, sd15_lora_files):
    pipe, lora = sd15_layout
    with pytest.raises(UserError, match=r"is an SDXL vector, but this model's UNet has the SD1\.5 block layout; "
                                        r"give 17 numbers or a preset name") as caught:
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
