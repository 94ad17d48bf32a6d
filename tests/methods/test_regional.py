"""Regional LoRA (compose/methods/regional.py, attention/regional.py) against its oracles: Merge where
every region is the whole image, the base model where every region is empty, an explicit computation
of one masked layer and of one cross-attention layer, and exact UNet call counts."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import assert_one_line_user_errors
from loracompose import LoraSpec, Merge
from loracompose.attention.masks import Box, LatentGrid
from loracompose.attention.regional import RegionMasks, code_members, install_regional
from loracompose.methods import METHODS
from loracompose.methods.regional import Regional
from loracompose.pipelines.adapters import AdapterController

COMMON = dict(show_progress=False, output_type="latent", append_triggers=False, width=32, height=32)
PROMPT = "a zkx in qwv style"
STEPS = 2
WHOLE = (0.0, 0.0, 1.0, 1.0)
# Relative boxes that overlap in the middle and leave a band at the bottom outside both.
LEFT, RIGHT = (0.0, 0.0, 0.6, 0.75), (0.4, 0.0, 1.0, 0.75)
# Two runs of the same math through SDPA on differently batched rows differ by float rounding only.
TOLERANCE = dict(rtol=0, atol=1e-5)


def local_specs(files, weights=(0.8, 1.0)) -> list[LoraSpec]:
    """The two tiny LoRAs, both of a local kind (the fixtures' second one is a style)."""
    return [LoraSpec(path, weight, category="object") for path, weight in zip(files, weights)]


def restored(unet) -> bool:
    return not any("forward" in module.__dict__ for module in unet.modules())


@pytest.mark.parametrize("model,files", [("sd15", "sd15_lora_files"), ("sdxl", "sdxl_lora_files")])
def test_whole_image_regions_equal_merge_and_empty_ones_the_base_model(model, files, request):
    pipe, files = request.getfixturevalue(model), request.getfixturevalue(files)
    specs = local_specs(files)
    processors = dict(pipe.unet.attn_processors)
    merged = pipe.generate(PROMPT, specs, Merge(), steps=STEPS, **COMMON)
    whole = pipe.generate(PROMPT, specs, Regional(boxes=[WHOLE, WHOLE]), steps=STEPS, **COMMON)
    torch.testing.assert_close(whole.latents, merged.latents, **TOLERANCE)
    assert whole.stats.unet_calls == STEPS and whole.stats.unet_rows == STEPS * 2

    base = pipe.generate(PROMPT, [], Merge(), steps=STEPS, **COMMON)
    empty = [torch.zeros(4, 4), torch.zeros(4, 4)]
    nothing = pipe.generate(PROMPT, specs, Regional(masks=empty), steps=STEPS, **COMMON)
    torch.testing.assert_close(nothing.latents, base.latents, **TOLERANCE)
    assert torch.equal(pipe.generate(PROMPT, specs, Regional(masks=empty, mode="latent"), steps=STEPS,
                                     **COMMON).latents, base.latents)
    assert (merged.latents - base.latents).abs().max() > 1e-2, "the LoRAs change the result"
    assert restored(pipe.unet) and {k: id(v) for k, v in pipe.unet.attn_processors.items()} == \
        {k: id(v) for k, v in processors.items()}, "PEFT forwards and processors restored"


@pytest.mark.parametrize("model,files", [("sd15", "sd15_lora_files"), ("sdxl", "sdxl_lora_files")])
def test_one_lora_on_the_whole_image_is_merge_in_both_modes(model, files, request):
    pipe, files = request.getfixturevalue(model), request.getfixturevalue(files)
    spec = local_specs(files)[:1]
    merged = pipe.generate(PROMPT, spec, Merge(), steps=STEPS, **COMMON)
    latent = pipe.generate(PROMPT, spec, Regional(boxes=[WHOLE], mode="latent"), steps=STEPS, **COMMON)
    delta = pipe.generate(PROMPT, spec, Regional(boxes=[WHOLE]), steps=STEPS, **COMMON)
    assert torch.equal(latent.latents, merged.latents), "latent couple: the base branch has no cell, so it is not run"
    torch.testing.assert_close(delta.latents, latent.latents, **TOLERANCE)
    assert latent.stats.unet_rows == delta.stats.unet_rows == STEPS * 2


def test_boxes_change_the_image_and_cost_one_pass_or_n_plus_one_branches(sd15, sd15_lora_files):
    specs = local_specs(sd15_lora_files)
    merged = sd15.generate(PROMPT, specs, Merge(), steps=STEPS, **COMMON)
    delta = sd15.generate(PROMPT, specs, Regional(boxes=[LEFT, RIGHT]), steps=STEPS, **COMMON)
    latent = sd15.generate(PROMPT, specs, Regional(boxes=[LEFT, RIGHT], mode="latent"), steps=STEPS, **COMMON)
    assert (delta.stats.unet_calls, delta.stats.unet_rows) == (STEPS, STEPS * 2)
    assert (latent.stats.unet_calls, latent.stats.unet_rows) == (STEPS, STEPS * 3 * 2), "base + 2 LoRAs, batched"
    for result in (delta, latent):
        assert (result.latents - merged.latents).abs().max() > 1e-3
    assert (delta.latents - latent.latents).abs().max() > 1e-4, "the two forms differ where regions are partial"
    pair = sd15.generate(PROMPT, specs, Regional(boxes=[LEFT, RIGHT]), steps=STEPS, num_images=2, **COMMON)
    second = sd15.generate(PROMPT, specs, Regional(boxes=[LEFT, RIGHT]), steps=STEPS, seed=1, **COMMON)
    # image k is the one-image run with seed k; other batch sizes round differently (as Composer's test)
    torch.testing.assert_close(pair.latents[:1], delta.latents, rtol=0, atol=1e-4)
    torch.testing.assert_close(pair.latents[1:], second.latents, rtol=0, atol=1e-4)
    assert delta.method == {"name": "regional", "boxes": [list(LEFT), list(RIGHT)], "masks": None,
                            "region_prompts": None, "mode": "delta"}


def test_a_global_lora_gets_the_whole_image_and_local_ones_stand_side_by_side(sd15, sd15_lora_files):
    character, style = sd15_lora_files  # categories character and style (conftest)
    specs = [LoraSpec(character), LoraSpec(style)]
    merged = sd15.generate(PROMPT, specs, Merge(), steps=STEPS, **COMMON)
    default = sd15.generate(PROMPT, specs, Regional(), steps=STEPS, **COMMON)
    torch.testing.assert_close(default.latents, merged.latents, **TOLERANCE)  # one local LoRA: the whole width
    method = Regional()
    method.bind(sd15.prepare_loras([LoraSpec(character), LoraSpec(style), LoraSpec(character, name="second")]))
    assert method.areas(method.loras) == [Box(0.0, 0.0, 0.5, 1.0), None, Box(0.5, 0.0, 1.0, 1.0)]
    only_local = Regional(boxes=[LEFT, RIGHT])
    only_local.bind(method.loras)
    assert only_local.areas(method.loras) == [Box(*LEFT), None, Box(*RIGHT)], "boxes for the local LoRAs only"
    prompts = Regional(region_prompts=["a zkx", "qwv style", ""])
    prompts.bind(method.loras)
    assert prompts.group_branch([0, 1]).prompt == "a zkx", "an object's words over a style's where both apply"
    assert prompts.group_branch([1]).prompt == "qwv style" and prompts.group_branch([1, 2]).prompt == "qwv style"
    assert prompts.group_branch([2]).prompt is None, "'' keeps the generation's prompt"
    assert prompts.group_branch([0, 1]).weights == {"character": 1.0, "style": 1.0}


# ------------------------------------------------------------------------------------ one layer


def lora_module(conv: bool) -> torch.nn.Module:
    """A one-layer model with a PEFT LoRA (two adapters) on a strided conv or a linear layer."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    inner = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1) if conv else torch.nn.Linear(3, 5)
    model = torch.nn.Sequential(inner)
    for name in ("a", "b"):
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False)
        model = inject_adapter_in_model(config, model, adapter_name=name)
    controller = AdapterController({"model": model})
    controller.activate({"a": 0.7, "b": 1.3})
    return model


def explicit_delta(layer, x, name: str, conv: bool) -> torch.Tensor:
    a, b = layer.lora_A[name], layer.lora_B[name]
    scale = layer.scaling[name]
    if conv:
        return scale * F.conv2d(F.conv2d(x, a.weight, stride=2, padding=1), b.weight)
    return scale * (x @ a.weight.T @ b.weight.T)


@pytest.mark.parametrize("conv", [True, False])
def test_masked_layer_adds_each_delta_inside_its_region_at_the_output_resolution(conv):
    model = lora_module(conv)
    layer = model[0]
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1  # the left half
    masks = RegionMasks(["a", "b"], [mask, Box(0.0, 0.5, 1.0, 1.0)])  # b: the bottom half
    patches = install_regional(model, masks)
    try:
        x = torch.randn(2, 3, 8, 8) if conv else torch.randn(2, 16, 3)  # linear: 4x4 tokens = level 1 of 8x8
        grid = LatentGrid(8, 8)
        patches.call.record(torch.zeros(1, 4, 8, 8))  # the layer is called alone: no pre-hook sets the grid
        with torch.no_grad():
            output = layer(x)
            base = layer.base_layer(x)
        level_masks = [masks.members(grid, 1)[r].float() for r in range(2)]  # 4x4 either way
        shape = (1, 1, 4, 4) if conv else (1, 16, 1)
        with torch.no_grad():
            expected = base + sum(m.view(shape) * explicit_delta(layer, x, name, conv)
                                  for m, name in zip(level_masks, ("a", "b")))
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
        assert level_masks[0].view(4, 4)[:, :2].all() and not level_masks[0].view(4, 4)[:, 2:].any()
        flat = torch.randn(2, 3)
        if not conv:  # no positions: each delta whole where the region is non-empty
            with torch.no_grad():
                torch.testing.assert_close(layer(flat), layer.base_layer(flat) + explicit_delta(layer, flat, "a", False)
                                           + explicit_delta(layer, flat, "b", False), rtol=1e-5, atol=1e-6)
    finally:
        patches.restore()
    assert restored(model)


def test_cross_attention_groups_attend_their_own_prompt_through_their_own_deltas(sd15, sd15_lora_files):
    loras = sd15.prepare_loras(local_specs(sd15_lora_files))
    names = [lora.name for lora in loras]
    controller = AdapterController({"unet": sd15.unet})
    controller.activate({lora.name: lora.weight for lora in loras})
    masks = RegionMasks(names, [Box(*LEFT), Box(*RIGHT)])
    torch.manual_seed(1)
    states = {code: torch.randn(2, 7, 32) for code in range(4)}
    patches = install_regional(sd15.unet, masks, lambda code: states[code])
    name = next(layer for layer, _ in sd15.unet.named_modules() if layer.endswith("attn2"))
    attn = sd15.unet.get_submodule(name)
    try:
        patches.call.record(torch.zeros(1, 4, 16, 16))  # an 8x8 level-1 map
        x = torch.randn(2, 64, attn.to_q.in_features)
        with torch.no_grad():
            output = attn(x, encoder_hidden_states=torch.zeros(2, 7, 32))
            expected = explicit_cross_attention(attn, x, masks.codes(LatentGrid(16, 16), 1), states, names)
    finally:
        patches.restore()
        controller.activate({})
    assert set(masks.codes(LatentGrid(16, 16), 1).tolist()) == {0, 1, 2, 3}, "background, each box, the overlap"
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)


def explicit_cross_attention(attn, x, codes, states, names) -> torch.Tensor:
    """Per query: q with the deltas of the regions covering it; K/V of its group's states with the
    group's deltas; out-projection with the covering regions' deltas; plain matrix products."""
    def project(layer, value, adapters):
        result = value @ layer.base_layer.weight.T + (0 if layer.base_layer.bias is None else layer.base_layer.bias)
        for adapter in adapters:
            result = result + layer.scaling[adapter] * (value @ layer.lora_A[adapter].weight.T
                                                        @ layer.lora_B[adapter].weight.T)
        return result

    heads, rows = attn.heads, []
    for position in range(x.shape[1]):
        code = int(codes[position])
        adapters = [names[r] for r in code_members(code, len(names))]
        q = project(attn.to_q, x[:, position:position + 1], adapters)
        k, v = project(attn.to_k, states[code], adapters), project(attn.to_v, states[code], adapters)
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) * attn.scale, dim=-1)
        hidden = (weights @ split(v)).transpose(1, 2).reshape(x.shape[0], 1, -1)
        rows.append(project(attn.to_out[0], hidden, adapters))
    return torch.cat(rows, dim=1)


# ------------------------------------------------------------------------------------ inputs


def test_masks_from_image_files_of_any_size_and_the_registry(sd15, sd15_lora_files, tmp_path):
    left = Image.new("L", (40, 40), 0)
    left.paste(255, (0, 0, 24, 30))
    right = Image.new("RGB", (200, 200), (0, 0, 0))
    right.paste((255, 255, 255), (80, 0, 200, 150))
    left.save(tmp_path / "left.png")
    right.save(tmp_path / "right.png")
    specs = local_specs(sd15_lora_files)
    from_files = sd15.generate(PROMPT, specs, Regional(masks=[tmp_path / "left.png", str(tmp_path / "right.png")]),
                               steps=STEPS, **COMMON)
    from_boxes = sd15.generate(PROMPT, specs, Regional(boxes=["0,0,0.6,0.75", "0.4,0,1,0.75"]), steps=STEPS, **COMMON)
    torch.testing.assert_close(from_files.latents, from_boxes.latents, **TOLERANCE)
    assert METHODS["regional"] is Regional
    assert all("help" in field.metadata for field in dataclasses.fields(Regional))


def test_bad_regions_are_one_line_user_errors(sd15, sd15_lora_files, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("L", (64, 32), 255).save(tmp_path / "wide.png")
    specs = local_specs(sd15_lora_files)
    two = sd15.prepare_loras(specs)

    def bound(method: Regional) -> None:
        method.bind(two)

    def generate(method: Regional) -> None:
        sd15.generate(PROMPT, specs, method, steps=1, **COMMON)

    assert_one_line_user_errors([
        (lambda: Regional(boxes=["0,0,1"]), "four numbers"),
        (lambda: Regional(boxes=["0,0,a,1"]), "must be a number"),
        (lambda: Regional(boxes=["0,0,1.5,1"]), "outside the image"),
        (lambda: Regional(boxes=["0.5,0,0.5,1"]), "zero area"),
        (lambda: Regional(boxes=[(0, 0, 1)]), "four relative numbers"),
        (lambda: Regional(masks=[tmp_path / "notes.png"]), "not an image"),
        (lambda: Regional(masks=[tmp_path / "missing.png"]), "not found"),
        (lambda: Regional(masks=[torch.ones(2, 3, 4)]), "2-D"),
        (lambda: Regional(boxes=[WHOLE], masks=[torch.ones(4, 4)]), "either boxes or masks"),
        (lambda: Regional(mode="couple"), "mode='couple' is not known"),
        (lambda: bound(Regional(masks=[torch.ones(4, 4)] * 3)), "3 masks for 2 LoRAs; give at most one per LoRA"),
        (lambda: bound(Regional(boxes=[WHOLE])), "1 boxes for 2 LoRAs"),
        (lambda: bound(Regional(region_prompts=["a"])), "1 region prompts for 2 LoRAs"),
        (lambda: generate(Regional(masks=[tmp_path / "wide.png", torch.ones(4, 4)])), "but the image's aspect is 1:1"),
    ])
    assert restored(sd15.unet)


# ------------------------------------------------------------------------------------ every front-end


def bad_region_inputs(tmp_path):
    """(method, region flags, expected text) for the CLI; files made under ``tmp_path``."""
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("L", (64, 32), 255).save(tmp_path / "wide.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "square.png")
    square, wide, notes = (str(tmp_path / name) for name in ("square.png", "wide.png", "notes.png"))
    return {
        "box outside": ("regional", ["--box", "0,0,1.5,1"], "outside the image"),
        "box of zero area": ("regional", ["--box", "0.5,0,0.5,1"], "zero area"),
        "box with three numbers": ("regional", ["--box", "0,0,1"], "four numbers"),
        "more boxes than loras": ("regional", ["--box", "0,0,1,1"] * 3, "3 boxes for 2 LoRAs; give at most one"),
        "mask not an image": ("regional", ["--mask", notes], "is not an image"),
        "mask missing": ("regional", ["--mask", str(tmp_path / "missing.png")], "mask file not found"),
        "more masks than loras": ("regional", ["--mask", square] * 3, "3 masks for 2 LoRAs; give at most one"),
        "mask of the wrong size": ("regional", ["--mask", wide, "--mask", square],
                                   "(width x height, 2:1) but the image's aspect is 1:1"),
        "boxes and masks": ("regional", ["--box", "0,0,1,1", "--mask", square], "either boxes or masks"),
        "mask with merge": ("merge", ["--mask", square], "is a setting of tara, regional, not of --method merge"),
        "mask with auto": ("auto", ["--mask", square], "is a setting of tara, regional, not of --method auto"),
    }


BAD_REGION_CASES = ["box outside", "box of zero area", "box with three numbers", "more boxes than loras",
                    "mask not an image", "mask missing", "more masks than loras", "mask of the wrong size",
                    "boxes and masks", "mask with merge", "mask with auto"]


@pytest.mark.parametrize("case", BAD_REGION_CASES)
def test_bad_regions_on_the_command_line_exit_2_with_one_line(case, tiny_sd15_dir, sd15_lora_files, tmp_path, capsys):
    from loracompose.cli.main import main

    method, flags, expected = bad_region_inputs(tmp_path)[case]
    out = tmp_path / "out"
    code = main(["generate", "--model", str(tiny_sd15_dir), "--prompt", "a zkx", "--lora", str(sd15_lora_files[0]),
                 "--lora", str(sd15_lora_files[1]), "--method", method, *flags, "--steps", "1", "--width", "32",
                 "--height", "32", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith(("loracompose: error: ", "loracompose generate: error: ")) and expected in lines[0]
    assert captured.out == "" and not (out.exists() and any(out.iterdir()))


def test_bad_regions_in_a_bench_suite_are_one_line_user_errors(sd15_lora_files, tmp_path):
    from loracompose.eval.suite import parse_suite

    (tmp_path / "notes.png").write_text("not an image")

    def suite(method: Any, **set_settings: Any) -> None:
        parse_suite({"model": str(tmp_path), "loras": {"a": {"file": str(sd15_lora_files[0]), "triggers": ["zkx"]},
                                                       "b": {"file": str(sd15_lora_files[1]), "triggers": ["qwv"]}},
                     "sets": [{"loras": ["a", "b"], **set_settings}], "methods": [method]}, base_dir=tmp_path)

    assert_one_line_user_errors([
        (lambda: suite("regional", boxes=[[0, 0, 1.5, 1], [0, 0, 1, 1]]), "with method 'regional': .*not inside"),
        (lambda: suite("regional", boxes=[[0.5, 0, 0.5, 1], [0, 0, 1, 1]]), "with method 'regional': .*inside"),
        (lambda: suite("regional", boxes=[[0, 0, 1, 1]]), "boxes must list one"),
        (lambda: suite({"method": "regional", "masks": [str(tmp_path / "notes.png")]}), "is not an image"),
        (lambda: suite({"method": "regional", "boxes": ["0,0,2,1"]}), "outside the image"),
        (lambda: suite({"method": "merge", "masks": ["m.png"]}), "masks"),
    ])


def test_a_suite_reads_mask_files_relative_to_itself(tmp_path):
    from loracompose.eval.suite import parse_suite

    Image.new("L", (8, 8), 255).save(tmp_path / "left.png")
    suite = parse_suite({"model": "m", "loras": {"a": {"file": "a.safetensors", "triggers": ["zkx"]}},
                         "sets": [["a"]], "methods": [{"method": "regional", "masks": ["left.png"]}]},
                        base_dir=tmp_path)
    assert suite.methods[0].build().masks == (str(tmp_path / "left.png"),)


def test_command_line_masks_and_region_prompts_give_the_python_api_image(tiny_sd15_dir, sd15_lora_files, tmp_path,
                                                                        capsys):
    import json

    import numpy as np

    from loracompose import load_pipeline
    from loracompose.cli.main import main

    left, right = Image.new("L", (16, 16), 0), Image.new("L", (16, 16), 0)
    left.paste(255, (0, 0, 10, 12))
    right.paste(255, (6, 0, 16, 12))
    left.save(tmp_path / "left.png")
    right.save(tmp_path / "right.png")
    out = tmp_path / "out"
    code = main(["generate", "--model", str(tiny_sd15_dir), "--prompt", PROMPT, "--lora", str(sd15_lora_files[0]),
                 "--lora", str(sd15_lora_files[1]), "--method", "regional", "--mask", str(tmp_path / "left.png"),
                 "--mask", str(tmp_path / "right.png"), "--region-prompt", "a zkx", "--region-prompt", "",
                 "--steps", "2", "--guidance", "5", "--width", "32", "--height", "32", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    (png,) = out.glob("*.png")
    method = Regional(masks=[tmp_path / "left.png", tmp_path / "right.png"], region_prompts=["a zkx", ""])
    expected = load_pipeline(tiny_sd15_dir).generate(
        PROMPT, [LoraSpec(path) for path in sd15_lora_files], method, steps=2, guidance_scale=5, width=32, height=32,
        show_progress=False).images[0]
    difference = np.abs(np.asarray(Image.open(png), np.int16) - np.asarray(expected, np.int16))
    assert difference.max() <= 1, "the command line's image differs from the Python API's"
    settings = json.loads(png.with_suffix(".json").read_text())["method_settings"]
    assert settings["masks"] == [str(tmp_path / "left.png"), str(tmp_path / "right.png")]
    assert settings["region_prompts"] == ["a zkx", ""]
