"""Automatic masks (attention/auto_masks.py), LoRA kinds (compose/kinds.py) and the ``auto`` method
(compose/methods/auto.py) against their oracles: masks worked out by hand from synthetic attention maps,
masks that move with where a token attends in a real attention layer, Merge where auto must be Merge,
and exact UNet call counts."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import ClassVar

import pytest
import torch

from helpers import assert_one_line_user_errors, with_metadata
from loracompose import LoraSpec, Merge
from loracompose.attention.auto_masks import (AutoMasks, MaskSettings, assign_owner, auto_mask_layers, concept_scores,
                                              masks_from_maps, normalise, owner_to_latent, smooth)
from loracompose.attention.capture import AttentionStore
from loracompose.attention.layers import AttentionLayer, UNetCall
from loracompose.attention.masks import LatentGrid
from loracompose.attention.processor import ComposeAttnProcessor
from loracompose.kinds import check_overrides, kind_of_category, lora_kind, parse_kind, parse_kinds
from loracompose.lora import LoraSpec as Spec, inspect_lora
from loracompose.methods import METHODS
from loracompose.methods.auto import Auto
from loracompose.methods.base import CompositionMethod
from loracompose.methods.regional import Regional
from loracompose.pipelines.values import Branch, Prediction

COMMON = dict(show_progress=False, output_type="latent", append_triggers=False, width=32, height=32)
PROMPT = "a zkx on the left, qwv style"
STEPS = 3


# ------------------------------------------------------------------------------------ synthetic maps


def synthetic_maps() -> torch.Tensor:
    """(1 image, 4 rows, 4 columns, 3 tokens): token 0 peaks in the left column, token 1 in the right
    column, token 2 is flat; everything else is a floor of 0.1."""
    maps = torch.full((1, 4, 4, 3), 0.1)
    maps[0, :, 0, 0] = 0.9
    maps[0, :, 1, 0] = 0.5
    maps[0, :, 3, 1] = 0.6
    maps[0, 1:3, 2, 1] = 0.35
    return maps


def test_masks_from_synthetic_maps_are_the_hand_computed_ones():
    maps = synthetic_maps()
    scores = normalise(concept_scores(maps, [[0], [1]]))
    # token 0: (0.9, 0.5, 0.1, 0.1) per row -> (1, 0.5, 0, 0); token 1: right column 1, rows 1-2 of column 2 0.5
    torch.testing.assert_close(scores[0, 0, 0], torch.tensor([1.0, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(scores[0, 1, 1], torch.tensor([0.0, 0.0, 0.5, 1.0]))
    owner = assign_owner(scores, threshold=0.4)
    expected = torch.tensor([[1, 1, 0, 2],
                             [1, 1, 2, 2],
                             [1, 1, 2, 2],
                             [1, 1, 0, 2]])
    assert torch.equal(owner[0], expected)
    # Above every score nothing is claimed; at 0 every pixel goes to the best concept (ties: the first).
    assert torch.equal(assign_owner(scores, threshold=1.01), torch.zeros_like(owner))
    assert torch.equal(assign_owner(scores, threshold=0.0)[0, 0], torch.tensor([1, 1, 1, 2]))

    found = masks_from_maps(maps, [[0], [1]], MaskSettings(threshold=0.4), latent_size=(8, 8))
    masks = found.masks()
    assert masks.shape == (1, 2, 8, 8)
    assert torch.equal(masks[0, 0], expected.eq(1).float().repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert torch.equal(masks[0, 1], expected.eq(2).float().repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert float((masks.sum(dim=1) <= 1).float().min()) == 1.0, "one owner per pixel"


def test_several_tokens_per_concept_are_averaged_and_flat_maps_claim_nothing():
    maps = synthetic_maps()
    scores = concept_scores(maps, [[0, 1], [2]])
    torch.testing.assert_close(scores[0, 0], (maps[0, ..., 0] + maps[0, ..., 1]) / 2)
    assert float(normalise(scores)[0, 1].abs().max()) == 0.0, "a flat map normalises to zeros"
    owner = assign_owner(normalise(scores), threshold=0.1)
    assert not bool((owner == 2).any())


def test_owner_upsampling_follows_the_cell_geometry():
    owner = torch.tensor([[[1, 2, 0], [0, 1, 2], [2, 0, 1]]])
    latent = owner_to_latent(owner, (5, 5))  # a 5x5 latent has 3x3 cells of 2 at level 1, the last cropped
    assert latent.shape == (1, 5, 5)
    assert torch.equal(latent[0, 4], torch.tensor([2, 2, 0, 0, 1]))
    assert torch.equal(latent[0, :, 4], torch.tensor([0, 0, 2, 2, 1]))


def test_smoothing_keeps_constants_and_mass_and_spreads_a_peak():
    flat = torch.full((1, 1, 5, 5), 0.3)
    torch.testing.assert_close(smooth(flat, 1.0), flat)
    assert smooth(flat, 0.0) is flat
    peak = torch.zeros(1, 1, 7, 7)
    peak[0, 0, 3, 3] = 1.0
    blurred = smooth(peak, 1.0)
    torch.testing.assert_close(blurred.sum(), torch.tensor(1.0))
    assert blurred[0, 0, 3, 3] == blurred.max() and blurred[0, 0, 3, 4] > 0
    assert blurred[0, 0, 3, 2] == blurred[0, 0, 3, 4]


# ------------------------------------------------------------------------------------ real attention


def attention_with_features(width: int = 8):
    """A diffusers cross-attention layer with identity q/k projections (one head), so a position's query
    is its feature and a token's key its embedding."""
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=width, cross_attention_dim=width, heads=1, dim_head=width)
    with torch.no_grad():
        for projection in (attn.to_q, attn.to_k):
            projection.weight.copy_(torch.eye(width))
    return attn


def trigger_masks(where: dict[int, tuple[slice, slice]], size: int = 4) -> torch.Tensor:
    """Masks from a real attention layer whose positions in ``where[token]`` carry token's feature."""
    attn = attention_with_features()
    hidden = torch.zeros(1, size * size, 8)
    grid = hidden.view(1, size, size, 8)
    for token, (rows, columns) in where.items():
        grid[0, rows, columns, token] = 6.0
    tokens = torch.eye(8)[None, :3] * 6.0  # token t's key is feature t
    store = AttentionStore(token_indices=[0, 1, 2])
    processor = ComposeAttnProcessor("sdpa", store=store)
    call = UNetCall()
    call.record(torch.zeros(1, 4, size, size))
    processor.bind(AttentionLayer("down_blocks.0.attentions.0.transformer_blocks.0.attn2", True, "down", 0), call)
    processor(attn, hidden, encoder_hidden_states=tokens)
    return masks_from_maps(store.maps(), [[0], [1]], MaskSettings(threshold=0.5), (size, size)).masks()[0]


def test_masks_follow_where_the_trigger_attends_in_a_real_attention_layer():
    left_right = trigger_masks({0: (slice(None), slice(0, 2)), 1: (slice(None), slice(2, 4))})
    assert torch.equal(left_right[0], torch.tensor([[1.0, 1, 0, 0]] * 4))
    assert torch.equal(left_right[1], torch.tensor([[0.0, 0, 1, 1]] * 4))
    # Move the tokens: the first to the bottom-right corner, the second to the top row.
    moved = trigger_masks({0: (slice(2, 4), slice(2, 4)), 1: (slice(0, 1), slice(None))})
    corner = torch.zeros(4, 4)
    corner[2:, 2:] = 1
    top = torch.zeros(4, 4)
    top[0] = 1
    assert torch.equal(moved[0], corner) and torch.equal(moved[1], top)


def test_map_layers_are_the_deepest_level_wide_enough(sd15):
    layers = auto_mask_layers(sd15.unet, LatentGrid(64, 64), min_side=8)
    assert layers and all(layer.is_cross and layer.block in ("down", "up") for layer in layers)
    deepest = max(layer.level for layer in auto_mask_layers(sd15.unet, LatentGrid(64, 64), min_side=1))
    assert {layer.level for layer in layers} == {deepest}, "a 64x64 latent: the deepest level is wide enough"
    small = auto_mask_layers(sd15.unet, LatentGrid(8, 8), min_side=8)
    assert {layer.level for layer in small} == {min(layer.level for layer in layers + small)}, \
        "no level is 8 wide: the finest level with cross-attention"


# ------------------------------------------------------------------------------------ kinds


def test_kinds_from_override_category_synonym_and_library_index(sd15_lora_files, tmp_path):
    character, style = (inspect_lora(Spec(path)) for path in sd15_lora_files)
    assert lora_kind(character) == ("character", "category 'character'")
    assert lora_kind(style)[0] == "style"
    assert lora_kind(character, {"character": "Background"})[0] == "background"
    assert [kind_of_category(word) for word in ("Vehicle", "art_style", "outfit", "scenery", "pose", None)] == \
        ["object", "style", "clothing", "background", None, None]

    folder = tmp_path / "library"
    folder.mkdir()
    bare = with_metadata(sd15_lora_files[0], folder / "bare.safetensors")
    stripped = replace(inspect_lora(Spec(bare)), category=None)  # as if the file had no category
    assert lora_kind(stripped) == (None, "unknown")
    index = {"format": 1, "entries": {"bare.safetensors": {"category": "clothing"}}, "corrupt": {}}
    (folder / ".loracompose-index.json").write_text(json.dumps(index))
    assert lora_kind(stripped) == ("clothing", "library index category 'clothing'")


def test_kind_overrides_and_their_errors_are_one_line(sd15_lora_files):
    loras = [inspect_lora(Spec(path)) for path in sd15_lora_files]
    assert parse_kind(" moxel = Object ") == ("moxel", "object")
    assert parse_kinds(["a=style", "b=clothing"]) == {"a": "style", "b": "clothing"}
    assert check_overrides({"style": "OBJECT"}, loras) == {"style": "object"}
    assert_one_line_user_errors([
        (lambda: parse_kind("moxel"), r"--kind 'moxel': write NAME=KIND"),
        (lambda: parse_kind("=object"), r"write NAME=KIND"),
        (lambda: parse_kind("moxel=thing"), r"kind 'thing' for LoRA 'moxel' is not known; use one of object\|"),
        (lambda: parse_kinds(["a=style", "a=object"]), r"--kind a: given twice"),
        (lambda: check_overrides({"nobody": "object"}, loras), r"kind given for 'nobody', which is none of the LoRAs"),
        (lambda: Auto(kinds={"character": "hat"}).bind(loras), r"kind 'hat' for LoRA 'character'"),
        (lambda: Auto(mode="fast").bind(loras), r"auto mode='fast' is not known"),
        (lambda: Auto(threshold=2).bind(loras), r"threshold=2 must lie in \[0, 1\]"),
        (lambda: Auto(probe_steps=0).bind(loras), r"probe_steps=0 must be an integer >= 1"),
    ])


def test_plan_puts_local_kinds_in_regions_and_global_ones_everywhere(sd15, sd15_lora_files):
    loras = [inspect_lora(Spec(path)) for path in sd15_lora_files]
    tokenizers = [sd15.tokenizer]
    method = Auto()
    method.bind(loras)
    method.plan(PROMPT, tokenizers)
    assert [lora.name for lora in method.local] == ["character"] and [lora.name for lora in method.global_] == ["style"]
    assert method.decisions["style"]["why"] == "style is a global kind" and not method.merges
    assert method.decisions["style"]["placement"] == "whole image, in a pass of its own"
    for combine, placement in (("noise", "outside the local regions, in a pass of its own"),
                               ("weights", "outside the local regions")):
        as_background = Auto(kinds={"style": "background"}, background_combine=combine)
        as_background.bind(loras)
        as_background.plan(PROMPT, tokenizers)
        assert as_background.decisions["style"]["placement"] == placement
        assert [lora.name for lora in as_background.backgrounds] == (["style"] if combine == "noise" else [])
    method.plan("a landscape, qwv style", tokenizers)  # the character's trigger is not in the prompt
    assert not method.local and "not in the prompt" in method.decisions["character"]["why"]
    assert [lora.name for lora in method.styles] == ["style"] and not method.merges  # the style in its own pass
    in_weights = Auto(style_combine="weights")
    in_weights.bind(loras)
    in_weights.plan("a landscape, qwv style", tokenizers)
    assert in_weights.merges and not in_weights.styles
    overridden = Auto(kinds={"character": "background"})
    overridden.bind(loras)
    overridden.plan(PROMPT, tokenizers)
    assert not overridden.local and overridden.decisions["character"]["from"] == "override"


# ------------------------------------------------------------------------------------ the method


def test_auto_is_registered():
    assert METHODS["auto"] is Auto


@pytest.mark.parametrize("files,kinds,combine", [(1, {}, "noise"), (2, {"character": "background"}, "weights"),
                                                 (2, {"character": "style"}, "weights")])
def test_auto_equals_merge_for_one_lora_or_only_global_loras(sd15, sd15_lora_files, files, kinds, combine):
    specs = [LoraSpec(path, weight) for path, weight in zip(sd15_lora_files[:files], (0.8, 1.2))]
    merged = pipe_run(sd15, specs, Merge())
    auto = pipe_run(sd15, specs, Auto(kinds=kinds, style_combine=combine))
    assert torch.equal(auto.latents, merged.latents)
    assert auto.stats.unet_calls == merged.stats.unet_calls == STEPS


@pytest.mark.parametrize("model,files,mode,calls_per_step", [("sd15", "sd15_lora_files", "delta", 1),
                                                              ("sd15", "sd15_lora_files", "latent", 1),
                                                              ("sdxl", "sdxl_lora_files", "delta", 1)])
def test_auto_probes_then_runs_regional_with_the_found_masks(model, files, mode, calls_per_step, request):
    pipe, lora_files = request.getfixturevalue(model), request.getfixturevalue(files)
    specs = [LoraSpec(path) for path in lora_files]
    method = Auto(mode=mode, probe_steps=2, style_combine="weights", style_inside_from=0)
    processors = {key: id(value) for key, value in pipe.unet.attn_processors.items()}
    result = pipe_run(pipe, specs, method)
    # The probe: 2 base-model passes; then one (batched) pass per step.
    assert result.stats.unet_calls == 2 + STEPS * calls_per_step
    assert len(method.mask_history) == 1
    assert method.mask_history[0][1].masks().shape == (1, 1, *result.latents[0].shape[-2:])
    assert result.method["decisions"]["character"]["placement"] == "region"
    assert {key: id(value) for key, value in pipe.unet.attn_processors.items()} == processors
    assert not any("forward" in module.__dict__ for module in pipe.unet.modules()), "PEFT forwards restored"
    # Oracle: regional with the found mask for the character and the whole image for the style.
    found = method.mask_history[0][1].masks()[0, 0]
    regional = pipe_run(pipe, specs, Regional(masks=[found], mode=mode))
    torch.testing.assert_close(result.latents, regional.latents, rtol=0, atol=1e-5)


@pytest.mark.parametrize("source", ["own", "merged"])
def test_other_map_sources_probe_with_their_branches(sd15, sd15_lora_files, source):
    specs = [LoraSpec(path, category="object") for path in sd15_lora_files]  # two local LoRAs
    method = Auto(map_source=source, probe_steps=1, kinds={"style": "object"})
    assert probes_once_and_partitions(method, sd15, specs)


def probes_once_and_partitions(method, pipe, specs) -> bool:
    """Runs ``method`` on a prompt naming both tiny LoRAs' triggers; checks its probe cost and masks."""
    result = pipe.generate("a zkx on the left and a qwv on the right", specs, method, steps=STEPS, seed=1, **COMMON)
    probe_calls = 1  # one step: own branches batched in one call, or the merged branch
    masks = method.mask_history[0][1].masks()
    return result.stats.unet_calls == probe_calls + STEPS and masks.shape[1] == 2 and float(masks.sum(1).max()) <= 1


def left_half(_step, found):
    """A mask callback: the (only) local concept owns the left half of the image."""
    latent_owner = torch.zeros_like(found.latent_owner)
    latent_owner[..., : latent_owner.shape[-1] // 2] = 1
    return AutoMasks(found.scores, found.owner, latent_owner)


def test_auto_confines_a_local_lora_to_its_mask_as_regional_does(sd15, sd15_lora_files):
    specs = [LoraSpec(path) for path in sd15_lora_files]
    method = Auto(style_combine="weights", style_inside_from=0)
    method.mask_callback = left_half
    result = pipe_run(sd15, specs, method)
    half = torch.zeros(16, 16)
    half[:, :8] = 1
    regional = pipe_run(sd15, specs, Regional(masks=[half]))
    torch.testing.assert_close(result.latents, regional.latents, rtol=0, atol=1e-5)
    assert (result.latents - pipe_run(sd15, specs, Merge()).latents).abs().max() > 1e-2, "not Merge"


def test_auto_with_a_whole_image_mask_equals_merge(sd15, sd15_lora_files):
    """A mask callback that gives the local concept every pixel: regional of whole-image regions is Merge."""
    def everything(_step, found):
        owner = torch.ones_like(found.owner)
        return AutoMasks(found.scores, owner, torch.ones_like(found.latent_owner))

    specs = [LoraSpec(path) for path in sd15_lora_files]
    merged = pipe_run(sd15, specs, Merge())
    for combine in ("weights", "noise"):  # noise: the style's effect is added nowhere, it runs inside the region
        method = Auto(style_combine=combine, style_inside_from=0)
        method.mask_callback = everything
        result = pipe_run(sd15, specs, method)
        torch.testing.assert_close(result.latents, merged.latents, rtol=0, atol=1e-5)
    # The probe (3 steps), then per step the main pass and the main pass with the style.
    assert result.stats.unet_calls == 3 + 2 * STEPS


def owning(part):
    """A mask callback: the (only) local concept owns ``part`` of the map grid ("all", "none" or "left")."""
    def callback(_step, found):
        owner = torch.zeros_like(found.owner)
        if part != "none":
            owner[..., : owner.shape[-1] if part == "all" else owner.shape[-1] // 2] = 1
        return AutoMasks(found.scores, owner, owner_to_latent(owner, tuple(found.latent_owner.shape[-2:])))
    return callback


def test_a_background_in_its_own_pass_fills_the_rest_and_never_reaches_the_local_region(sd15, sd15_lora_files):
    """background_combine='noise': the local concept owning nothing gives the background merged alone,
    owning everything the character merged alone (3 passes per step); owning the left half, after one
    step the left half is the same whatever the background's strength (it never acts there, not even
    through self-attention), which is not so with the background's deltas in the one pass (weights)."""
    kinds = {"style": "background"}
    specs = [LoraSpec(path) for path in sd15_lora_files]
    for part, alone in (("none", specs[1:]), ("all", specs[:1])):
        method = Auto(kinds=kinds)
        method.mask_callback = owning(part)
        result = pipe_run(sd15, specs, method)
        torch.testing.assert_close(result.latents, pipe_run(sd15, alone, Merge()).latents, rtol=0, atol=1e-5)
        assert result.stats.unet_calls == 3 + 2 * STEPS  # the probe, then the main pass and it with the background
    assert method.decisions["style"]["placement"] == "outside the local regions, in a pass of its own"

    def left_half_after_one_step(combine, strength):
        method = Auto(kinds=kinds, background_combine=combine)
        method.mask_callback = owning("left")
        specs = [LoraSpec(sd15_lora_files[0]), LoraSpec(sd15_lora_files[1], strength)]
        latents = sd15.generate(PROMPT, specs, method, steps=1, seed=3, **COMMON).latents
        return latents[..., : latents.shape[-1] // 2], latents[..., latents.shape[-1] // 2:]

    (left_weak, right_weak), (left_strong, right_strong) = (left_half_after_one_step("noise", w) for w in (0.5, 1.5))
    torch.testing.assert_close(left_weak, left_strong, rtol=0, atol=1e-6)
    assert (right_weak - right_strong).abs().max() > 1e-3
    (left_weak, _), (left_strong, _) = (left_half_after_one_step("weights", w) for w in (0.5, 1.5))
    assert (left_weak - left_strong).abs().max() > 1e-4, "in the one pass the background reaches the region"


def test_a_style_effect_is_the_main_pass_with_the_style_minus_the_main_pass(sd15, sd15_lora_files):
    """The character owning the left half, the style kept out of it (style_inside=False): after one
    step the left half is the main pass (regional: the character there, no style) and the right half
    the main pass with the style added on the whole image (regional: the character left, the style
    everywhere), each taken from plain regional runs."""
    specs = [LoraSpec(path) for path in sd15_lora_files]
    method = Auto(style_inside=False)
    method.mask_callback = owning("left")
    latents = sd15.generate(PROMPT, specs, method, steps=1, seed=3, **COMMON).latents
    half = torch.zeros(latents.shape[-2:])
    half[:, : half.shape[-1] // 2] = 1
    main, with_style = (sd15.generate(PROMPT, specs, Regional(masks=masks), steps=1, seed=3, **COMMON).latents
                        for masks in ([half, torch.zeros_like(half)], [half]))
    middle = latents.shape[-1] // 2
    torch.testing.assert_close(latents[..., :middle], main[..., :middle], rtol=0, atol=1e-5)
    torch.testing.assert_close(latents[..., middle:], with_style[..., middle:], rtol=0, atol=1e-5)
    assert (main[..., middle:] - with_style[..., middle:]).abs().max() > 1e-3, "the style changes the right half"


@dataclass
class StyleJoinsLater(CompositionMethod):
    """Reference for a style joining a whole-image local region at step ``start``: the character
    merged alone before it, the character and the style merged from it on."""

    name: ClassVar[str] = "style-joins-later-reference"
    joins_at: int = 0

    def predict(self, run, step, latents):
        running = self.loras if step.index >= self.joins_at else self.loras[:1]
        return run.predict(latents, step, [self.branch(*running)])[0]


@pytest.mark.parametrize("combine", ["weights", "noise"])
@pytest.mark.parametrize("inside_from,start", [(0.0, 0), (0.5, 2), (1.0, STEPS)])
def test_a_style_joins_the_local_regions_from_its_share_of_the_steps(sd15, sd15_lora_files, combine, inside_from,
                                                                      start):
    """With the local concept owning every pixel, the style acts nowhere until ``style_inside_from`` of
    the steps (round(0.5 * 3) = step 2), then inside the region: Merge of the character, then of both."""
    def everything(_step, found):
        return AutoMasks(found.scores, torch.ones_like(found.owner), torch.ones_like(found.latent_owner))

    specs = [LoraSpec(path) for path in sd15_lora_files]
    method = Auto(style_combine=combine, style_inside_from=inside_from)
    method.mask_callback = everything
    result = pipe_run(sd15, specs, method)
    reference = pipe_run(sd15, specs, StyleJoinsLater(joins_at=start))
    torch.testing.assert_close(result.latents, reference.latents, rtol=0, atol=1e-5)
    if 0 < start < STEPS:
        for other in (0, STEPS):
            assert (result.latents - pipe_run(sd15, specs, StyleJoinsLater(joins_at=other)).latents).abs().max() > 1e-3


def test_auto_adds_the_style_effect_where_no_local_concept_is(sd15, sd15_lora_files):
    """A mask callback that gives the local concept nothing: the main pass is the base model, and the
    style's effect (its pass minus the base's) added everywhere makes the style LoRA merged alone."""
    def nothing(_step, found):
        return AutoMasks(found.scores, torch.zeros_like(found.owner), torch.zeros_like(found.latent_owner))

    specs = [LoraSpec(path, weight) for path, weight in zip(sd15_lora_files, (0.8, 1.2))]
    method = Auto(background_margin=0)
    method.mask_callback = nothing
    result = pipe_run(sd15, specs, method)
    style_alone = pipe_run(sd15, specs[1:], Merge())
    torch.testing.assert_close(result.latents, style_alone.latents, rtol=0, atol=1e-5)


@dataclass
class SummedEffects(CompositionMethod):
    """Reference for global LoRAs with a style in its own pass: the others merged, plus the style's
    prediction minus the base model's (each CFG half), written out step by step."""

    name: ClassVar[str] = "summed-effects-reference"

    def predict(self, run, step, latents):
        others, style = self.loras[:-1], self.loras[-1]
        main, alone, base = (run.predict(latents, step, [branch])[0]
                             for branch in (self.branch(*others), self.branch(style), Branch()))
        return Prediction(cond=main.cond + alone.cond - base.cond, uncond=main.uncond + alone.uncond - base.uncond)


def test_a_background_and_a_style_add_their_effects_in_one_batched_call(sd15, sd15_lora_files):
    specs = [LoraSpec(path, weight) for path, weight in zip(sd15_lora_files, (0.8, 1.2))]
    method = Auto(kinds={"character": "background"})
    result = pipe_run(sd15, specs, method)
    reference = pipe_run(sd15, specs, SummedEffects())
    # One batched call against three separate ones: the same sums in another float order.
    torch.testing.assert_close(result.latents, reference.latents, rtol=0, atol=1e-4)
    assert result.stats.unet_calls == STEPS and reference.stats.unet_calls == 3 * STEPS
    assert (result.latents - pipe_run(sd15, specs, Merge()).latents).abs().max() > 1e-3, "not Merge"


def test_background_margin_keeps_a_background_away_from_the_local_regions():
    owner = torch.zeros(1, 4, 4, dtype=torch.long)
    owner[0, 1, 1] = 1
    found = AutoMasks(torch.zeros(1, 1, 4, 4), owner, owner_to_latent(owner, (8, 8)))
    assert torch.equal(found.outside(0), 1 - found.masks()[:, 0])
    near = torch.ones(4, 4)
    near[0:3, 0:3] = 0  # one map cell around (1, 1), chessboard distance
    assert torch.equal(found.outside(1)[0], owner_to_latent(near, (8, 8)))


@pytest.mark.parametrize("combine,passes", [("weights", 1), ("noise", 2)])
def test_several_images_each_get_their_masks_and_equal_one_image_runs(sd15, sd15_lora_files, combine, passes):
    specs = [LoraSpec(path) for path in sd15_lora_files]
    method = Auto(style_combine=combine)
    batch = sd15.generate(PROMPT, specs, method, steps=STEPS, seed=3, num_images=2, **COMMON)
    assert method.mask_history[0][1].masks().shape[0] == 2
    assert batch.stats.unet_calls == 3 + 2 * passes * STEPS  # the probe batched, then the regional passes per image
    for image in range(2):
        alone = sd15.generate(PROMPT, specs, Auto(style_combine=combine), steps=STEPS, seed=3 + image, **COMMON)
        torch.testing.assert_close(batch.latents[image], alone.latents[0], rtol=0, atol=1e-4)


def pipe_run(pipe, specs, method):
    return pipe.generate(PROMPT, specs, method, steps=STEPS, seed=3, **COMMON)
