"""LoRA-Composer on tiny SD1.5 and SDXL (CPU): oracles against plain diffusers (the whole LoRA in a
whole-image box) and against Regional LoRA (boxes without isolation and refinement), measured
isolation, the losses, step sizes and stop rule and their scaling, re-initialisation, box layout, bad
boxes and exact call counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusers import UNet2DConditionModel

from helpers import UNetCallCounter, plain_diffusers
from loracompose import LoraSpec, UserError
from loracompose.attention import Box, LatentGrid
from loracompose.methods.regional import Regional
from loracompose.methods.composer import (
    CellRect,
    Composer,
    ConceptGeometry,
    ConceptMaps,
    RefinementSchedule,
    best_window,
    box_attention_loss,
    box_gaussian,
    fill_loss,
    map_level,
    parse_box,
    region_leakage_loss,
    reinitialised_noise,
    side_by_side_boxes,
    smooth_maps,
    step_scale,
    top_k_count,
)

COMMON = dict(show_progress=False, append_triggers=False, guidance_scale=6.0)
LEFT, RIGHT = Box(0.0, 0.0, 0.5, 1.0), Box(0.5, 0.0, 1.0, 1.0)
EVERY_STEP_REFINED = dict(refine_fraction=1.0, patience_fraction=1.0)  # no stop before the last step
TOYWORLD_MODEL = Path(__file__).resolve().parents[2] / "compose" / "toyworld" / "weights" / "model"


def keys_kept(source: Path, out: Path, keep) -> Path:
    """A copy of a LoRA file with only the tensors whose key ``keep`` accepts, and no diffusers adapter
    config (as in a kohya file): PEFT then puts a layer only where the file has weights."""
    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    metadata.pop("lora_adapter_metadata", None)
    save_file({key: value for key, value in load_file(source).items() if keep(key)}, str(out), metadata=metadata)
    return out


def plain_with_lora(model_dir: Path, sdxl: bool, lora: Path, prompt: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(without, with) the LoRA at strength 0.8: plain diffusers images of ``prompt``."""
    plain = plain_diffusers(model_dir, sdxl)
    base = plain(prompt, generator=torch.Generator().manual_seed(3), **kwargs).images[0]
    plain.load_lora_weights(str(lora), adapter_name="ref")
    plain.set_adapters(["ref"], [0.8])
    return base, plain(prompt, generator=torch.Generator().manual_seed(3), **kwargs).images[0]


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_whole_image_box_equals_plain_run_with_the_whole_lora(model, request):
    """Every layer the LoRA adapts (UNet and text encoders) reaches the image, as in plain diffusers."""
    sdxl = model == "sdxl"
    model_dir = request.getfixturevalue("tiny_sdxl_dir" if sdxl else "tiny_sd15_dir")
    lora = request.getfixturevalue("sdxl_lora_files" if sdxl else "sd15_lora_files")[0]
    region_prompt = "a zkx cat on a rug"
    # SDXL's pooled embedding comes from the global prompt, so there the global prompt is the region prompt.
    global_prompt = region_prompt if sdxl else "a quiet street"
    height, width = (96, 64) if sdxl else (48, 80)
    method = Composer(boxes=(Box(0, 0, 1, 1),), region_prompts=(region_prompt,), refine=False, isolate=False,
                      reinitialise=False)
    ours = request.getfixturevalue(model).generate(global_prompt, [LoraSpec(lora, 0.8)], method, seed=3, steps=2,
                                                   height=height, width=width, output_type="np", **COMMON).images[0]
    kwargs = dict(num_inference_steps=2, guidance_scale=6.0, height=height, width=width, output_type="np")
    base, reference = plain_with_lora(model_dir, sdxl, lora, region_prompt, **kwargs)
    assert np.abs(reference - base).max() > 1e-3, "the LoRA must change the image for this test to mean anything"
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_lora_without_cross_attention_weights_is_injected(sd15, tiny_sd15_dir, sd15_lora_files, tmp_path):
    """A LoRA on self-attention only (kohya layout, no adapter config) still changes its region: the
    paper's K/V-only injection would draw nothing of it."""
    self_only = keys_kept(sd15_lora_files[0], tmp_path / "attn1.safetensors", lambda key: "attn1" in key)
    region_prompt = "a zkx cat on a rug"
    method = Composer(boxes=(Box(0, 0, 1, 1),), region_prompts=(region_prompt,), refine=False, isolate=False,
                      reinitialise=False)
    ours = sd15.generate("a quiet street", [LoraSpec(self_only, 0.8)], method, seed=3, steps=2, height=48, width=80,
                         output_type="np", **COMMON).images[0]
    kwargs = dict(num_inference_steps=2, guidance_scale=6.0, height=48, width=80, output_type="np")
    base, reference = plain_with_lora(tiny_sd15_dir, False, self_only, region_prompt, **kwargs)
    assert np.abs(reference - base).max() > 1e-3, "the LoRA must change the image for this test to mean anything"
    np.testing.assert_allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_boxes_without_isolation_and_refinement_equal_regional_lora(model, request):
    """Injection is Regional LoRA's (masked deltas on every layer, per-box prompts): with Composer's own
    parts off the two give the same latents, overlapping boxes included."""
    pipe = request.getfixturevalue(model)
    specs = [LoraSpec(p) for p in request.getfixturevalue(f"{model}_lora_files")]
    boxes = (Box(0.0, 0.0, 0.6, 1.0), Box(0.4, 0.2, 1.0, 0.8))
    prompts = ("a zkx cat", "a qwv dog")
    settings = dict(seed=5, steps=2, height=48, width=80, output_type="latent", **COMMON)
    ours = pipe.generate("a zkx and a qwv", specs, Composer(boxes=boxes, region_prompts=prompts, refine=False,
                                                            isolate=False, reinitialise=False), **settings)
    regional = pipe.generate("a zkx and a qwv", specs, Regional(boxes=boxes, region_prompts=prompts), **settings)
    torch.testing.assert_close(ours.latents, regional.latents, atol=1e-6, rtol=0)
    merged = pipe.generate("a zkx and a qwv", specs, Composer(boxes=(Box(0, 0, 1, 1),) * 2, refine=False,
                                                              isolate=False, reinitialise=False), **settings)
    assert (merged.latents - ours.latents).abs().max() > 1e-3, "the boxes must matter for this test to mean anything"


# ------------------------------------------------------------------------------------ isolation, measured


class SpiedComposer(Composer):
    """Composer whose isolated self-attention calls also measure their attention weights: the same
    call with an identity as values returns each query's weight on every key."""

    def start(self, run):
        self.weights = []
        super().start(run)
        regions = next(iter(self.processors.values())).regions  # one isolation controller, shared
        isolated_attention = regions.isolated_attention

        def spy(kernel, query, key, value, *, scale, grid, level):
            identity = torch.eye(key.shape[2], dtype=query.dtype).expand(key.shape[0], key.shape[1], -1, -1)
            weights = isolated_attention(kernel, query, key, identity.contiguous(), scale=scale, grid=grid, level=level)
            self.weights.append((level, weights))
            return isolated_attention(kernel, query, key, value, scale=scale, grid=grid, level=level)

        regions.isolated_attention = spy


def test_isolation_gives_exactly_zero_attention_between_boxes(sd15, sd15_lora_files):
    a, b = Box(0.0, 0.0, 0.4, 1.0), Box(0.6, 0.0, 1.0, 1.0)
    # checkpoint_refinement=False: the backward recomputes no self-attention, so each call is measured once
    method = SpiedComposer(boxes=(a, b), reinitialise=False, checkpoint_refinement=False)
    sd15.generate("a zkx and a qwv", [LoraSpec(p) for p in sd15_lora_files], method, seed=0, steps=1, height=48,
                  width=80, output_type="latent", **COMMON)
    grid = LatentGrid(24, 40)
    levels = {level for level, _ in method.weights}
    assert levels == {1} and len(method.weights) == 2 * 6  # refinement + CFG call, 6 attn1 (2 down, mid, 3 up)
    for level, weights in method.weights:
        in_a, in_b = grid.box_mask(a, level).flatten(), grid.box_mask(b, level).flatten()
        assert in_a.any() and in_b.any() and not (in_a & in_b).any()
        assert torch.all(weights[:, :, in_a][..., in_b] == 0)
        assert torch.all(weights[:, :, in_b][..., in_a] == 0)
        assert torch.all(weights[:, :, in_a][..., in_a] > 0)
        background = ~(in_a | in_b)
        assert torch.all(weights[:, :, background] > 0)


# ------------------------------------------------------------------------------------ losses


def synthetic_maps(rows=6, columns=8, tokens=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(rows, columns, tokens, generator=generator, dtype=torch.float64)


def box_mask(rows=6, columns=8, top=1, left=2, bottom=5, right=7):
    mask = torch.zeros(rows, columns, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def test_box_attention_loss_equals_formula():
    maps, mask = synthetic_maps() * 3, box_mask()
    k = top_k_count(mask)
    assert k == round(0.2 * 20) == 4
    expected = 0.0
    for t in range(2):
        values = []
        for i in range(1, 5):
            for j in range(2, 7):
                y, x = -1 + 2 * (i - 1) / 3, -1 + 2 * (j - 2) / 4
                values.append(maps[i, j, t].item() * math.exp(-(x * x + y * y) / 2))
        expected += 8 * max(0.0, 1 - sum(sorted(values, reverse=True)[:k]) / k)
    assert box_attention_loss(maps, mask, k).item() == pytest.approx(expected, abs=1e-6)
    assert box_attention_loss(maps * 0.1, mask, k).item() > 0  # weak attention is penalised
    assert box_gaussian(box_mask(top=1, bottom=4, left=2, right=5))[2, 3] == 1.0


def test_fill_loss_equals_formula():
    maps, mask = synthetic_maps(seed=1), box_mask()
    expected = 0.0
    for t in range(2):
        p_x = [max(maps[i, j, t].item() * mask[i, j].item() for i in range(6)) for j in range(8)]
        p_y = [max(maps[i, j, t].item() * mask[i, j].item() for j in range(8)) for i in range(6)]
        proj_x = [1.0 if 2 <= j < 7 else 0.0 for j in range(8)]
        proj_y = [1.0 if 1 <= i < 5 else 0.0 for i in range(6)]
        expected += 2 * sum(abs(a - b) for a, b in zip(p_x, proj_x)) / 8
        expected += 2 * sum(abs(a - b) for a, b in zip(p_y, proj_y)) / 6
    assert fill_loss(maps, mask).item() == pytest.approx(expected, abs=1e-6)
    full = mask[..., None].double().expand(-1, -1, 2)
    assert fill_loss(full, mask).item() == pytest.approx(0.0)  # attention filling the box exactly


def test_region_leakage_loss_equals_formula():
    generator = torch.Generator().manual_seed(2)
    attention = torch.randn(48, 48, generator=generator, dtype=torch.float64).softmax(-1)
    mask = box_mask().flatten()
    k = 4
    leaking = sorted((attention[q, key].item() for q in range(48) if mask[q] for key in range(48) if not mask[key]),
                     reverse=True)
    assert region_leakage_loss(attention, mask, k).item() == pytest.approx(10 * sum(leaking[:k]) / k, abs=1e-9)
    assert region_leakage_loss(attention, torch.ones(48, dtype=torch.bool), k).item() == 0.0


def test_smoothing_is_reflect_padded_gaussian():
    maps = synthetic_maps(5, 7, 1, seed=3)
    weights = [math.exp(-d * d / (2 * 0.25)) for d in (-1, 0, 1)]
    total = sum(weights) ** 2

    def reflect(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    smoothed = smooth_maps(maps)
    for i, j in [(0, 0), (2, 3), (4, 6), (0, 5)]:
        expected = sum(weights[a + 1] * weights[b + 1] * maps[reflect(i + a, 5), reflect(j + b, 7), 0].item()
                       for a in (-1, 0, 1) for b in (-1, 0, 1)) / total
        assert smoothed[i, j, 0].item() == pytest.approx(expected, abs=1e-9)


def test_total_loss_is_the_sum_over_concepts_and_terms():
    method = Composer(boxes=(LEFT, RIGHT), box_weight=3.0, fill_weight=0.5, region_weight=7.0)
    masks = [box_mask(), box_mask(top=0, left=0, bottom=2, right=3)]
    method._concepts = [ConceptGeometry(m, CellRect(0, 0, 1, 1), top_k_count(m)) for m in masks]
    cross = [synthetic_maps(seed=4)[None], synthetic_maps(tokens=3, seed=5)[None]]
    attention = torch.rand(1, 48, 48, dtype=torch.float64)
    total = method.refinement_losses(ConceptMaps(cross, attention, torch.zeros(1, 4, 12, 16)))
    expected = sum(box_attention_loss(c[0], m, top_k_count(m), 3.0) + fill_loss(c[0], m, 0.5)
                   + region_leakage_loss(attention[0], m.flatten(), top_k_count(m), 7.0) for c, m in zip(cross, masks))
    assert total.shape == (1,) and total.item() == pytest.approx(expected.item(), abs=1e-9)


# ------------------------------------------------------------------------------------ step sizes and stop rule


def test_step_size_schedule_and_stop_rule():
    schedule = RefinementSchedule(50)
    sizes = [schedule.step_size_at(i) for i in range(50)]
    assert sizes[0] == 20.0
    assert sizes[25] == pytest.approx(20 * math.sqrt(1 - 0.5 * 25 / 49)) == pytest.approx(17.26, abs=0.01)
    assert sizes[49] == pytest.approx(20 * math.sqrt(0.5)) and all(a > b for a, b in zip(sizes, sizes[1:]))
    rose, fell = torch.tensor([2.0]), torch.tensor([0.5])
    previous = torch.tensor([1.0])
    assert not schedule.stops_after(4, rose, previous).item()  # a rise before step 5 is ignored
    assert schedule.stops_after(5, rose, previous).item() and not schedule.stops_after(5, fell, previous).item()
    assert schedule.stops_after(25, fell, previous).item() and not schedule.stops_after(24, fell, previous).item()
    assert schedule.stops_after(5, torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0])).tolist() == [True, False]



def test_schedule_step_size_and_map_level_scale_with_the_model():
    method = Composer()
    assert (method.schedule(50).last_step, method.schedule(50).patience_step) == (25, 5)  # the paper's, at 50 steps
    assert (method.schedule(20).last_step, method.schedule(20).patience_step) == (10, 2)
    assert step_scale((4, 64, 64), level=2) == 1.0  # SD1.5 at 512 px: 4 channels x 4x4 latent cells per map cell
    assert step_scale((12, 16, 16), level=1) == 0.75  # the toy world: 12 channels x 2x2
    # the toy world's UNet has cross-attention at levels 1 and 2: the level nearest 16 cells a side
    unet = UNet2DConditionModel.from_pretrained(TOYWORLD_MODEL / "unet")
    assert [map_level(unet, LatentGrid(side, side)) for side in (16, 32, 48, 64, 128)] == [1, 1, 2, 2, 2]

SLOPE = 1e-3


class ScriptedComposer(Composer):
    """Losses from a script with gradient SLOPE everywhere, and the latent change of each step."""

    script: tuple[float, ...] = ()

    def refinement_losses(self, maps):
        latents = maps.latents
        value = torch.full((latents.shape[0],), self.script[len(self.refinement_trace)])
        return value + SLOPE * (latents - latents.detach()).flatten(1).sum(1)

    def prepare_latents(self, run, step, latents):
        prepared = super().prepare_latents(run, step, latents)
        self.moves.append(prepared - latents)
        return prepared


def test_refinement_trace_follows_step_sizes_and_stop_rule(sd15, sd15_lora_files):
    steps = 10
    # the paper's stop rule at 50 steps (steps 25 and 5) is at 10 steps what these shares give
    method = ScriptedComposer(boxes=(LEFT, RIGHT), reinitialise=False, refine_fraction=1.0, patience_fraction=0.5)
    method.script, method.moves = (5.0, 4.0, 6.0, 3.0, 0.0, 2.0, 1.0, 3.0, 1.0, 1.0), []
    counter = UNetCallCounter(sd15.unet)
    try:
        result = sd15.generate("a zkx and a qwv", [LoraSpec(p) for p in sd15_lora_files], method, seed=0, steps=steps,
                               output_type="latent", **COMMON)
    finally:
        counter.handle.remove()
    stats = result.stats
    # steps 0-4 refine whatever the loss does; step 5's loss (2) rose from step 4's (0): it is the last.
    assert [r.index for r in method.refinement_trace] == [0, 1, 2, 3, 4, 5]
    assert [r.updated for r in method.refinement_trace] == [(True,)] * 4 + [(False,), (True,)]  # L = 0 moves nothing
    schedule = method.schedule(steps, result.latents.shape[1:])
    assert (schedule.last_step, schedule.patience_step) == (10, 5)
    for index, move in enumerate(method.moves):
        refined = index < 6 and index != 4
        expected = -schedule.step_size_at(index) * SLOPE if refined else 0.0
        torch.testing.assert_close(move, torch.full_like(move, expected), atol=1e-6, rtol=0)
    assert (stats.unet_calls, stats.unet_rows, stats.backward_passes) == (steps + 6, 2 * steps + 6, 5)
    assert (counter.calls, counter.rows) == (steps + 6, 2 * steps + 6)


def test_checkpointed_refinement_equals_the_stored_one_and_recomputes_once_per_backward(sd15, sd15_lora_files):
    resnet = sd15.unet.down_blocks[0].resnets[0]  # outside every map block
    runs = {}
    for checkpointed in (False, True):
        calls = []
        hook = resnet.register_forward_pre_hook(lambda *_: calls.append(1))
        method = Composer(boxes=(LEFT, RIGHT), checkpoint_refinement=checkpointed, **EVERY_STEP_REFINED)
        try:
            result = sd15.generate("a zkx and a qwv", [LoraSpec(p) for p in sd15_lora_files], method, seed=0, steps=4,
                                   output_type="latent", **COMMON)
        finally:
            hook.remove()
        runs[checkpointed] = (result, method.refinement_trace, len(calls))
    (stored, stored_trace, stored_calls), (recomputed, recomputed_trace, recomputed_calls) = runs[False], runs[True]
    assert stored.stats.backward_passes == 4
    assert recomputed_calls == stored_calls + recomputed.stats.backward_passes
    torch.testing.assert_close(torch.tensor([r.losses for r in recomputed_trace]),
                               torch.tensor([r.losses for r in stored_trace]), atol=0, rtol=1e-5)
    torch.testing.assert_close(recomputed.images, stored.images, atol=1e-5, rtol=1e-5)
    assert not sd15.unet.is_gradient_checkpointing


# ------------------------------------------------------------------------------------ re-initialisation


def test_reinitialisation_picks_best_window_and_keeps_noise_statistics():
    scores = torch.zeros(8, 12)
    scores[5:7, 7:10] = 1.0  # the best 2x3 window starts at (5, 7)
    scores[0:2, 0:2] = 1.2  # a hotter but smaller spot: its 2x3 windows sum to 4.8 < 6
    scores[3, 2] = 0.5
    assert best_window(scores, 2, 3) == (5, 7)

    noise = torch.randn(4, 32, 48, generator=torch.Generator().manual_seed(0))
    target = CellRect(4, 8, 12, 20)  # the box's latent cells: 8 x 12 = 2 x 3 map cells at stride 4
    out = reinitialised_noise(noise, [(target, (5 * 4, 7 * 4))])
    copied = noise.clone()
    copied[:, 4:12, 8:20] = noise[:, 20:28, 28:40]
    expected = (copied - copied.mean()) / copied.std() * noise.std() + noise.mean()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert out.mean().item() == pytest.approx(noise.mean().item(), abs=1e-6)
    assert out.std().item() == pytest.approx(noise.std().item(), abs=1e-6)
    assert abs(out.mean().item()) < 0.05 and abs(out.std().item() - 1) < 0.05
    # a window that would run past the latent is moved back inside it
    edge = reinitialised_noise(noise, [(target, (30, 44))])
    shifted = noise.clone()
    shifted[:, 4:12, 8:20] = noise[:, 24:32, 36:48]
    torch.testing.assert_close(edge, (shifted - shifted.mean()) / shifted.std() * noise.std() + noise.mean(),
                               atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ bad input


def test_bad_boxes_give_one_line_errors(sd15, sd15_lora_files):
    for text, match in [("0,0,1", "four numbers"), ("0,0,a,1", "number"), ("0,0,1.5,1", "outside"),
                        ("0.5,0,0.5,1", "zero area"), ("-0.1,0,1,1", "outside")]:
        with pytest.raises(UserError, match=match) as error:
            parse_box(text)
        assert "\n" not in str(error.value) and "--box" in str(error.value)
    assert parse_box(" 0, 0.25 ,0.5,1 ") == Box(0.0, 0.25, 0.5, 1.0)
    with pytest.raises(UserError, match="not inside the image"):
        Composer(boxes=((0.0, 0.0, 1.2, 1.0),))
    with pytest.raises(UserError, match="not inside the image"):
        Box.from_pixels(0, 0, 100, 64, image_width=80, image_height=64)
    specs = [LoraSpec(p) for p in sd15_lora_files]
    cases = [(specs[:1], Composer(boxes=(LEFT, RIGHT)), "2 boxes for 1 LoRAs"),
             ([LoraSpec(p, category="object") for p in sd15_lora_files], Composer(boxes=(LEFT,)), "only 1 boxes"),
             (specs, Composer(boxes=(LEFT, RIGHT), region_prompts=("a",)), "region prompts"),
             (specs[:1], Composer(boxes=(Box(0, 0, 0.01, 0.01),)), "covers no latent cell")]
    for loras, method, match in cases:
        with pytest.raises(UserError, match=match) as error:
            sd15.generate("a cat", loras, method, steps=1, output_type="latent", **COMMON)
        assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------ cost and batching


@pytest.mark.parametrize("refine,reinitialise", [(True, True), (False, False)])
def test_unet_call_counts_are_exact(sd15, sd15_lora_files, refine, reinitialise):
    steps = 4
    counter = UNetCallCounter(sd15.unet)
    try:
        stats = sd15.generate("a zkx and a qwv", [LoraSpec(p) for p in sd15_lora_files],
                              Composer(boxes=(LEFT, RIGHT), refine=refine, reinitialise=reinitialise,
                                       **EVERY_STEP_REFINED), seed=0,
                              steps=steps, output_type="latent", **COMMON).stats
    finally:
        counter.handle.remove()
    refined, initial = (steps if refine else 0), (1 if reinitialise else 0)
    expected = (steps + refined + initial, 2 * steps + refined + initial)
    assert (stats.unet_calls, stats.unet_rows) == expected == (counter.calls, counter.rows)
    assert stats.backward_passes == refined
    # no region prompts: the prompt under each box's LoRA, and under both (where the boxes share a cell at a
    # coarse level, and the UNet call's own states)
    assert stats.text_encoder_calls == 3


def test_image_k_equals_single_run_with_seed_plus_k(sd15, sd15_lora_files):
    specs = [LoraSpec(p) for p in sd15_lora_files]
    boxes = (Box(0.0, 0.0, 0.6, 1.0), Box(0.4, 0.2, 1.0, 0.8))  # overlapping
    pair = sd15.generate("a zkx and a qwv", specs, Composer(boxes=boxes), seed=10, num_images=2, steps=2,
                         output_type="latent", **COMMON)
    single = sd15.generate("a zkx and a qwv", specs, Composer(boxes=boxes), seed=11, steps=2, output_type="latent",
                           **COMMON)
    torch.testing.assert_close(pair.latents[1], single.latents[0], atol=1e-4, rtol=0)


def test_sdxl_non_square_runs_end_to_end(sdxl, sdxl_lora_files):
    pipe = sdxl
    method = Composer(boxes=(Box.from_pixels(0, 0, 40, 48, image_width=80, image_height=48), RIGHT),
                      region_prompts=("a zkx dog", None))
    result = pipe.generate("a zkx and a qwv", [LoraSpec(p) for p in sdxl_lora_files], method, seed=0, steps=2,
                           height=48, width=80, output_type="np", **COMMON)
    assert result.images[0].shape == (48, 80, 3) and np.isfinite(result.images[0]).all()
    assert result.stats.backward_passes == 2 and len(method.refinement_trace) == 2
    # "zkx" = z + kx in its region prompt; "qwv" in the generation's prompt (no region prompt given)
    assert method.token_positions[0] == [2, 3] and method.token_positions[1] == [6, 7]


def test_default_boxes_place_local_loras_side_by_side_and_globals_everywhere(sd15, sd15_lora_files):
    assert side_by_side_boxes(2) == (Box(0.0, 0.0, 0.5, 1.0), Box(0.5, 0.0, 1.0, 1.0))
    objects = [LoraSpec(p, category="object") for p in sd15_lora_files]
    settings = dict(seed=3, steps=2, output_type="latent", **COMMON)
    automatic, explicit = Composer(refine=False), Composer(boxes=side_by_side_boxes(2), refine=False)
    results = [sd15.generate("a zkx and a qwv", objects, method, **settings) for method in (automatic, explicit)]
    torch.testing.assert_close(results[0].latents, results[1].latents, atol=0, rtol=0)
    assert results[0].method["boxes"] == results[1].method["boxes"]
    assert automatic.areas == list(side_by_side_boxes(2))
    # the tiny "style" LoRA is global: the character alone is placed (the whole image), the style everywhere
    character_and_style = [LoraSpec(p) for p in sd15_lora_files]
    sd15.generate("a zkx and a qwv", character_and_style, automatic, **settings)
    assert automatic.areas == [None, None] and automatic.placed == []
    one_box = Composer(boxes=(LEFT,), refine=False)  # one box per local LoRA
    sd15.generate("a zkx and a qwv", character_and_style, one_box, **settings)
    assert one_box.areas == [LEFT, None] and one_box.boxes == (LEFT, Box(0.0, 0.0, 1.0, 1.0))
    assert one_box.region_prompt(0) is None and one_box.region_prompt(1) is None  # both: the generation's prompt


def test_cli_composer_with_boxes_and_region_prompts(tmp_path, tiny_sd15_dir, sd15_lora_files, capsys):
    from loracompose.cli.main import main

    out = tmp_path / "out"
    args = ["generate", "--model", str(tiny_sd15_dir), "--prompt", "a zkx and a qwv", "--method", "composer",
            "--lora", str(sd15_lora_files[0]), "--lora", str(sd15_lora_files[1]), "--box", "0,0,0.5,1",
            "--box", "0.5,0.2,1,0.8", "--region-prompt", "a zkx cat", "--region-prompt", "",
            "--steps", "2", "--quiet", "--out", str(out)]
    assert main(args) == 0
    record = json.loads((out / "composer-0.json").read_text())
    assert [list(box.values()) for box in record["method_settings"]["boxes"]] == [[0, 0, 0.5, 1], [0.5, 0.2, 1, 0.8]]
    assert record["method_settings"]["region_prompts"] == ["a zkx cat", ""]
    assert record["method_settings"]["checkpoint_refinement"] is True
    assert main([*args[:-2], "--composer-no-checkpointing", "--out", str(tmp_path / "stored")]) == 0
    stored = json.loads((tmp_path / "stored" / "composer-0.json").read_text())
    assert stored["method_settings"]["checkpoint_refinement"] is False
    capsys.readouterr()
    assert main([*args[:-2], "--box", "0,0,2,1", "--out", str(tmp_path / "bad")]) == 2
    assert "--box '0,0,2,1' is outside the image" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
