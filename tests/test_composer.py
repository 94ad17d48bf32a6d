"""LoRA-Composer on tiny SD1.5 and SDXL (CPU): oracles against plain diffusers, measured isolation,
the losses, step sizes and stop rule, re-initialisation, bad boxes and exact call counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import UNetCallCounter, plain_diffusers
from loracompose import LoraSpec, UserError
from loracompose.attention import Box, LatentGrid
from loracompose.methods.composer import (
    CellRect,
    Composer,
    ConceptGeometry,
    ConceptMaps,
    RefinementSchedule,
    best_window,
    box_attention_loss,
    box_gaussian,
    check_cross_attention_coverage,
    fill_loss,
    parse_box,
    region_leakage_loss,
    reinitialised_noise,
    side_by_side_boxes,
    smooth_maps,
    top_k_count,
)

COMMON = dict(show_progress=False, append_triggers=False, guidance_scale=6.0)
LEFT, RIGHT = Box(0.0, 0.0, 0.5, 1.0), Box(0.5, 0.0, 1.0, 1.0)


def cross_attention_only(source: Path, out: Path, keep_text_encoder: bool) -> Path:
    """A copy of a LoRA whose deltas are exactly zero except on attn2 to_k/to_v/to_out.0 (and the
    text encoders when ``keep_text_encoder``): the only deltas LoRA-Composer uses in the UNet."""
    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata() or {})

    def kept(key: str) -> bool:
        if key.startswith("text_encoder"):
            return keep_text_encoder
        return any(f"attn2.{name}." in key for name in ("to_k", "to_v", "to_out"))

    tensors = {key: value if "lora_A" in key or kept(key) else torch.zeros_like(value)
               for key, value in load_file(source).items()}
    save_file(tensors, str(out), metadata=metadata)
    return out


# ------------------------------------------------------------------------------------ oracle: plain run


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_full_image_box_equals_plain_run_with_lora_on_cross_attention(model, request, tmp_path):
    sdxl = model == "sdxl"
    model_dir = request.getfixturevalue("tiny_sdxl_dir" if sdxl else "tiny_sd15_dir")
    source = request.getfixturevalue("sdxl_lora_files" if sdxl else "sd15_lora_files")[0]
    # SDXL's pooled embedding comes from the global prompt, so there the text encoders stay base and
    # the global prompt is the region prompt; SD1.5 checks the region prompt's text-encoder deltas too.
    lora = cross_attention_only(source, tmp_path / "cross.safetensors", keep_text_encoder=not sdxl)
    region_prompt = "a zkx cat on a rug"
    global_prompt = region_prompt if sdxl else "a quiet street"
    height, width = (96, 64) if sdxl else (48, 80)
    method = Composer(boxes=(Box(0, 0, 1, 1),), region_prompts=(region_prompt,), refine=False, isolate=False,
                      reinitialise=False)
    pipe = request.getfixturevalue(model)
    ours = pipe.generate(global_prompt, [LoraSpec(lora, 0.8)], method, seed=3, steps=2, height=height, width=width,
                         output_type="np", **COMMON).images[0]

    plain = plain_diffusers(model_dir, sdxl)
    kwargs = dict(num_inference_steps=2, guidance_scale=6.0, height=height, width=width, output_type="np")
    base = plain(region_prompt, generator=torch.Generator().manual_seed(3), **kwargs).images[0]
    plain.load_lora_weights(str(lora), adapter_name="ref")
    plain.set_adapters(["ref"], [0.8])
    reference = plain(region_prompt, generator=torch.Generator().manual_seed(3), **kwargs).images[0]
    assert np.abs(reference - base).max() > 1e-3, "the LoRA must change the image for this test to mean anything"
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def keys_kept(source: Path, out: Path, keep) -> Path:
    """A copy of a LoRA file with only the tensors whose key ``keep`` accepts, and no diffusers adapter
    config (as in a kohya file): PEFT then puts a layer only where the file has weights."""
    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    metadata.pop("lora_adapter_metadata", None)
    save_file({key: value for key, value in load_file(source).items() if keep(key)}, str(out), metadata=metadata)
    return out


def test_lora_on_some_cross_attention_blocks_is_injected_where_it_has_weights(sd15, tiny_sd15_dir, sd15_lora_files,
                                                                               tmp_path):
    cross = cross_attention_only(sd15_lora_files[0], tmp_path / "cross.safetensors", keep_text_encoder=True)
    partial = keys_kept(cross, tmp_path / "up-only.safetensors",
                        lambda key: key.startswith("text_encoder") or "up_blocks" in key)
    assert any("down_blocks" in key and "attn2" in key for key in load_file(cross)), "the model must lose layers"
    region_prompt = "a zkx cat on a rug"
    method = Composer(boxes=(Box(0, 0, 1, 1),), region_prompts=(region_prompt,), refine=False, isolate=False,
                      reinitialise=False)
    ours = sd15.generate("a quiet street", [LoraSpec(partial, 0.8)], method, seed=3, steps=2, height=48, width=80,
                         output_type="np", **COMMON).images[0]

    plain = plain_diffusers(tiny_sd15_dir, False)
    kwargs = dict(num_inference_steps=2, guidance_scale=6.0, height=48, width=80, output_type="np")
    full = plain(region_prompt, generator=torch.Generator().manual_seed(3), **kwargs).images[0]
    plain.load_lora_weights(str(partial), adapter_name="ref")
    plain.set_adapters(["ref"], [0.8])
    reference = plain(region_prompt, generator=torch.Generator().manual_seed(3), **kwargs).images[0]
    assert np.abs(reference - full).max() > 1e-3, "the partial LoRA must change the image for this test to mean anything"
    covered, total = check_cross_attention_coverage(plain.unet, "ref")
    assert 0 < covered < total
    np.testing.assert_allclose(ours, reference, atol=1e-5)

    self_attention_only = keys_kept(sd15_lora_files[0], tmp_path / "attn1.safetensors", lambda key: "attn1" in key)
    with pytest.raises(UserError, match="no weights on any of the .* cross-attention") as error:
        sd15.generate("a cat", [LoraSpec(self_attention_only)], Composer(), steps=1, output_type="latent", **COMMON)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------ isolation, measured


class SpiedComposer(Composer):
    """Composer whose isolated self-attention calls also measure their attention weights: the same
    call with an identity as values returns each query's weight on every key."""

    def start(self, run):
        self.weights = []
        super().start(run)

    def _region_attention(self, states):
        regions = super()._region_attention(states)
        isolated_attention = regions.isolated_attention

        def spy(kernel, query, key, value, *, scale, grid, level):
            identity = torch.eye(key.shape[2], dtype=query.dtype).expand(key.shape[0], key.shape[1], -1, -1)
            weights = isolated_attention(kernel, query, key, identity.contiguous(), scale=scale, grid=grid, level=level)
            self.weights.append((level, weights))
            return isolated_attention(kernel, query, key, value, scale=scale, grid=grid, level=level)

        regions.isolated_attention = spy
        return regions


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
    assert sizes[0] == 20.0 and sizes[25] == pytest.approx(20 * math.sqrt(1 - 0.5 * 25 / 49)) == pytest.approx(17.26, abs=0.01)
    assert sizes[49] == pytest.approx(20 * math.sqrt(0.5)) and all(a > b for a, b in zip(sizes, sizes[1:]))
    rose, fell = torch.tensor([2.0]), torch.tensor([0.5])
    previous = torch.tensor([1.0])
    assert not schedule.stops_after(4, rose, previous).item()  # a rise before step 5 is ignored
    assert schedule.stops_after(5, rose, previous).item() and not schedule.stops_after(5, fell, previous).item()
    assert schedule.stops_after(25, fell, previous).item() and not schedule.stops_after(24, fell, previous).item()
    assert schedule.stops_after(5, torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0])).tolist() == [True, False]


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
    method = ScriptedComposer(boxes=(LEFT, RIGHT), reinitialise=False)
    method.script, method.moves = (5.0, 4.0, 6.0, 3.0, 0.0, 2.0, 1.0, 3.0, 1.0, 1.0), []
    counter = UNetCallCounter(sd15.unet)
    try:
        stats = sd15.generate("a zkx and a qwv", [LoraSpec(p) for p in sd15_lora_files], method, seed=0, steps=steps,
                              output_type="latent", **COMMON).stats
    finally:
        counter.handle.remove()
    # steps 0-4 refine whatever the loss does; step 5's loss (2) rose from step 4's (0): it is the last.
    assert [r.index for r in method.refinement_trace] == [0, 1, 2, 3, 4, 5]
    assert [r.updated for r in method.refinement_trace] == [(True,)] * 4 + [(False,), (True,)]  # L = 0 moves nothing
    schedule = RefinementSchedule(steps)
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
        method = Composer(boxes=(LEFT, RIGHT), checkpoint_refinement=checkpointed)
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
             (specs, Composer(boxes=(LEFT,)), "only 1 boxes"),
             (specs, Composer(boxes=(LEFT, RIGHT), region_prompts=("a",)), "region prompts"),
             (specs[:1], Composer(boxes=(Box(0, 0, 0.01, 0.01),)), "covers no latent cell")]
    for loras, method, match in cases:
        with pytest.raises(UserError, match=match) as error:
            sd15.generate("a cat", loras, method, steps=1, output_type="latent", **COMMON)
        assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------ cost and batching


@pytest.mark.parametrize("refine,reinitialise", [(True, True), (False, False)])
def test_unet_call_counts_are_exact(sd15, sd15_lora_files, refine, reinitialise):
    steps = 4  # below the patience step: every step refines
    counter = UNetCallCounter(sd15.unet)
    try:
        stats = sd15.generate("a zkx and a qwv", [LoraSpec(p) for p in sd15_lora_files],
                              Composer(boxes=(LEFT, RIGHT), refine=refine, reinitialise=reinitialise), seed=0,
                              steps=steps, output_type="latent", **COMMON).stats
    finally:
        counter.handle.remove()
    refined, initial = (steps if refine else 0), (1 if reinitialise else 0)
    expected = (steps + refined + initial, 2 * steps + refined + initial)
    assert (stats.unet_calls, stats.unet_rows) == expected == (counter.calls, counter.rows)
    assert stats.backward_passes == refined
    assert stats.text_encoder_calls == 3  # the global prompt (base) and one region prompt per LoRA


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
    assert method.token_positions[0] == [2, 3] and method.token_positions[1] == [1, 2]  # "zkx" = z + kx


def test_without_boxes_the_loras_stand_side_by_side(sd15, sd15_lora_files):
    specs = [LoraSpec(p) for p in sd15_lora_files]
    assert side_by_side_boxes(2) == (Box(0.0, 0.0, 0.5, 1.0), Box(0.5, 0.0, 1.0, 1.0))
    automatic = Composer(refine=False)
    explicit = Composer(boxes=side_by_side_boxes(2), refine=False)
    results = [sd15.generate("a zkx and a qwv", specs, method, seed=3, steps=2, output_type="latent", **COMMON)
               for method in (automatic, explicit)]
    torch.testing.assert_close(results[0].latents, results[1].latents, atol=0, rtol=0)
    assert results[0].method["boxes"] == results[1].method["boxes"]
    sd15.generate("a zkx", specs[:1], automatic, seed=3, steps=1, output_type="latent", **COMMON)
    assert automatic.boxes == (Box(0.0, 0.0, 1.0, 1.0),)  # re-laid out for the new set


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
