"""CLoRA (docs/methods/clora.md) on tiny SD1.5 / SDXL: loss, update, masks and fusion against independent oracles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import UNetCallCounter
from loracompose import LoraSpec, Merge, UserError, load_pipeline
from loracompose.methods.clora import CLoRA, ConceptMasks, concept_masks, contrastive_loss
from loracompose.assets.tiny import build_tiny_lora

PROMPT = "a cat and a dog"
COMMON = dict(guidance_scale=6.0, show_progress=False, seed=7)
# Tiny SD1.5: the 2-level UNet's deepest attention level is 1 (cells of 2x2 latent pixels).
MAP_MODULES = ("down_blocks.1.", "up_blocks.0.")


@pytest.fixture(scope="module")
def sd15(tiny_sd15_dir, sd15_lora_files):
    return load_pipeline(tiny_sd15_dir), [LoraSpec(path) for path in sd15_lora_files]


# ------------------------------------------------------------------------------------ independent oracles


def explicit_info_nce(maps: torch.Tensor, groups, temperature: float) -> torch.Tensor:
    """The contrastive loss written out pair by pair in float64: maps (branches, rows, columns, tokens)."""
    entries = []
    for concept, per_branch in enumerate(groups):
        for branch, tokens in enumerate(per_branch):
            for token in tokens:
                v = maps[branch, :, :, token].double().flatten()
                entries.append(((v - v.min()) / (v.max() - v.min()), concept))

    def similarity(a, b):
        return (a @ b) / (a.norm() * b.norm())

    losses = []
    for i, (anchor, label) in enumerate(entries):
        negatives = sum(torch.exp(similarity(anchor, other) / temperature)
                        for other, other_label in entries if other_label != label)
        for j, (positive, positive_label) in enumerate(entries):
            if i != j and positive_label == label:
                numerator = torch.exp(similarity(anchor, positive) / temperature)
                losses.append(-torch.log(numerator / (numerator + negatives)))
    return sum(losses) / len(losses)


class ProbeProcessor:
    """diffusers' plain attention math (``get_attention_scores``) that also keeps the head-mean
    probabilities: maps computed without any loracompose code."""

    def __init__(self, sink: list):
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, queries, _ = hidden_states.shape
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probabilities = attn.get_attention_scores(query, key, None)
        self.sink.append(probabilities.view(batch, attn.heads, queries, -1).mean(dim=1))
        out = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        return attn.to_out[1](attn.to_out[0](out))


def independent_maps(pipe, latents, timestep, prompts, adapter_weights, map_size):
    """(branches, rows, columns, tokens) maps of each branch, one plain UNet call per branch."""
    unet = pipe.unet
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor") and n.startswith(MAP_MODULES)]
    sink: list = []
    previous = unet.attn_processors
    unet.set_attn_processor({**previous, **{name: ProbeProcessor(sink) for name in names}})
    try:
        maps = []
        for prompt, weights in zip(prompts, adapter_weights):
            pipe.unet.set_adapters(list(weights), list(weights.values()))
            embeds = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
            sink.clear()
            unet(latents, timestep, encoder_hidden_states=embeds)
            maps.append(torch.stack(sink).mean(dim=0).reshape(*map_size, -1))
        return torch.stack(maps)
    finally:
        unet.set_attn_processor(previous)


def subsequence_positions(tokenizer, prompt: str, word: str) -> list[int]:
    ids = tokenizer(prompt).input_ids
    pieces = tokenizer(" " + word, add_special_tokens=False).input_ids
    starts = [s for s in range(len(ids)) if ids[s:s + len(pieces)] == pieces]
    return [s + k for s in starts for k in range(len(pieces))]


# ------------------------------------------------------------------------------------ loss and masks


def test_loss_equals_explicit_float64_infonce():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 4, 5, 12, generator=generator)
    groups = [[[1], [1, 2], []], [[4], [], [4, 6]], [[], [8], [9]]]
    expected = explicit_info_nce(maps, groups, 0.5)
    torch.testing.assert_close(contrastive_loss(maps, groups, 0.5).double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(contrastive_loss(maps.double(), groups, 0.7), explicit_info_nce(maps, groups, 0.7),
                               rtol=1e-12, atol=0)
    one_concept = [[[1], [2], [3]]]
    assert contrastive_loss(maps, one_concept).item() == 0.0  # no negatives: nothing to contrast


def synthetic_maps(rows: int, columns: int) -> torch.Tensor:
    """(branches 3, images 1, rows, columns, tokens 8): LoRA 1's token 3 hot in the top-right
    quarter, LoRA 2's token 5 hot in the bottom-left quarter, weak elsewhere."""
    maps = torch.full((3, 1, rows, columns, 8), 0.05)
    maps[1, 0, : rows // 2, columns // 2 :, 3] = 1.0
    maps[2, 0, rows // 2 :, : columns // 2, 5] = 0.8
    return maps


def test_masks_of_a_synthetic_hot_map_are_exactly_that_region_and_not_transposed():
    maps = synthetic_maps(4, 6)  # non-square map: 4 rows, 6 columns
    owner = concept_masks(maps, [[3], [5]], threshold=0.3, level=1, latent_size=(8, 12))[0]
    expected = torch.zeros(8, 12, dtype=torch.long)
    expected[:4, 6:] = 1
    expected[4:, :6] = 2
    assert torch.equal(owner, expected)
    # A latent that is not a multiple of the cell: the last cells are cropped, not stretched.
    cropped = concept_masks(maps, [[3], [5]], threshold=0.3, level=1, latent_size=(7, 11))[0]
    assert torch.equal(cropped, expected[:7, :11])


def test_overlapping_claims_go_to_the_stronger_concept_and_masks_partition():
    maps = synthetic_maps(4, 4)
    maps[2, 0, :, :, 5] = 0.5  # LoRA 2 now claims everything at relative 0.5/0.8; LoRA 1 its quarter at 1.0
    owner = concept_masks(maps, [[3], [5]], threshold=0.3, level=0, latent_size=(4, 4))
    assert torch.equal(owner[0, :2, 2:], torch.ones(2, 2, dtype=torch.long))
    assert (owner[0, 2:] == 2).all() and (owner[0, :, :2] == 2).all()
    masks = ConceptMasks(0, owner, ("base", "a", "b")).one_hot()
    assert torch.equal(masks.sum(dim=1), torch.ones(1, 4, 4))
    assert set(masks.unique().tolist()) == {0.0, 1.0}


def test_unclaimed_pixels_go_to_the_base_branch():
    maps = synthetic_maps(4, 4)
    owner = concept_masks(maps, [[3], [5]], threshold=0.3, level=0, latent_size=(4, 4))[0]
    assert (owner[:2, :2] == 0).all() and (owner[2:, 2:] == 0).all()


def test_minmax_scores_ignore_a_maps_floor_where_peak_scores_claim_everything():
    """LoRA 2's map is 0.8 everywhere and 1.5 in its quarter: over its peak it is above 0.5 everywhere,
    min-max normalised only in its quarter."""
    maps = synthetic_maps(4, 4)
    maps[2, 0, :, :, 5] = 0.8
    maps[2, 0, 2:, :2, 5] = 1.5
    peak = concept_masks(maps, [[3], [5]], threshold=0.5, level=0, latent_size=(4, 4), scores="peak")[0]
    minmax = concept_masks(maps, [[3], [5]], threshold=0.5, level=0, latent_size=(4, 4), scores="minmax")[0]
    assert (peak[2:, :2] == 2).all() and (peak[:2, :2] == 2).all()
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[:2, 2:] = 1
    expected[2:, :2] = 2
    assert torch.equal(minmax, expected)


# ------------------------------------------------------------------------------------ generations


def test_one_update_equals_independent_autograd_step_and_masks_match(sd15):
    """At a non-square size (latent 32 x 48): the method's update z - eta * grad equals one computed
    from plain diffusers attention and the explicit float64 loss; the step's masks equal masks made
    from independent maps of the updated latent (so they are not transposed either)."""
    pipe, loras = sd15
    method = CLoRA(step_size=50.0, max_update_step=1, iterative_steps=(), schedule_steps=0)
    seen = {}
    original = method.prepare_latents

    def recording(run, step, latents):
        updated = original(run, step, latents)
        seen.update(before=latents.clone(), after=updated.clone(), timestep=step.timestep)
        return updated

    method.prepare_latents = recording
    result = pipe.generate(PROMPT, loras, method, steps=1, width=96, height=64, output_type="latent",
                           text_encoder_loras=False, **COMMON)
    assert result.stats.backward_passes == 1
    tokenizer = pipe.tokenizer
    for index, word in enumerate(["zkx", "qwv"]):
        assert method.token_groups[index][index + 1] == subsequence_positions(tokenizer, method.branch_prompts[index + 1], word)

    names = [lora.name for lora in method.loras]
    weights = [{names[0]: 0.0, names[1]: 0.0}, {names[0]: 1.0, names[1]: 0.0}, {names[0]: 0.0, names[1]: 1.0}]
    latents = seen["before"].clone().requires_grad_(True)
    with torch.enable_grad():
        maps = independent_maps(pipe, latents, seen["timestep"], method.branch_prompts, weights, (16, 24))
        loss = explicit_info_nce(maps, method.token_groups, 0.5)
        (gradient,) = torch.autograd.grad(loss, latents)
    expected = seen["before"] - 50.0 * (32 * 48) / 64**2 * gradient.float()  # step size scaled by the latent area
    assert (seen["after"] - seen["before"]).abs().max() > 1e-4, "the update must move the latent"
    torch.testing.assert_close(seen["after"], expected, rtol=1e-4, atol=1e-6)

    with torch.no_grad():
        maps = independent_maps(pipe, seen["after"], seen["timestep"], method.branch_prompts, weights, (16, 24))
    pipe.unet.set_adapters(names, [0.0, 0.0])
    assert method.claims == [True, False]  # the second LoRA is a style: it covers the image, claims nothing
    expected_owner = concept_masks(maps[:, None], [method.token_groups[0][1], method.token_groups[1][2]],
                                   threshold=method.mask_threshold, level=1, latent_size=(32, 48),
                                   scores=method.mask_scores, smoothing=method.mask_smoothing, claims=[True, False])
    owner = method.mask_history[0].owner
    assert owner.shape == (1, 32, 48)
    assert torch.equal(owner, expected_owner)
    assert len(owner.unique()) > 1, "the masks should not be trivial for this test to mean anything"


def forced_owner(branch: int):
    return lambda masks: ConceptMasks(masks.step, torch.full_like(masks.owner, branch), masks.names)


@pytest.mark.parametrize("gate", ["layers", "prediction"])
def test_forced_masks_without_optimisation_equal_that_loras_single_run(sd15, gate):
    """Prediction: the style LoRA's branch owns every pixel. Layers: no concept owns any pixel; the
    character LoRA is then off everywhere and the style LoRA (a global kind) covers the whole image."""
    pipe, loras = sd15
    method = CLoRA(latent_update=False, gate=gate)
    forced = 2 if gate == "prediction" else 0
    method.mask_callback = forced_owner(forced)
    clora = pipe.generate(PROMPT, loras, method, steps=3, output_type="np", **COMMON)
    single = pipe.generate(PROMPT, loras[1:], Merge(), steps=3, output_type="np", **COMMON)
    other = pipe.generate(PROMPT, loras[:1], Merge(), steps=3, output_type="np", **COMMON)
    assert np.abs(single.images[0] - other.images[0]).max() > 1e-3
    np.testing.assert_allclose(clora.images[0], single.images[0], atol=1e-5)
    assert all((masks.owner == forced).all() for masks in method.mask_history)


@pytest.mark.parametrize("model,gate", [("sd15", "layers"), ("sd15", "prediction"), ("sdxl", "layers")])
def test_one_lora_with_all_ones_mask_equals_merge(model, gate, tiny_sd15_dir, tiny_sdxl_dir, sd15_lora_files,
                                                  sdxl_lora_files):
    model_dir, files = (tiny_sdxl_dir, sdxl_lora_files) if model == "sdxl" else (tiny_sd15_dir, sd15_lora_files)
    pipe, lora = load_pipeline(model_dir), [LoraSpec(files[0], 0.8)]
    # every pixel with any attention is claimed over its peak: the mask is all ones
    method = CLoRA(mask_threshold=0.0, mask_scores="peak", gate=gate)
    clora = pipe.generate(PROMPT, lora, method, steps=2, output_type="np", **COMMON)
    merge = pipe.generate(PROMPT, lora, Merge(), steps=2, output_type="np", **COMMON)
    assert all((masks.owner == 1).all() for masks in method.mask_history)
    assert clora.stats.backward_passes == 0  # one concept: nothing to contrast, no optimisation pass
    np.testing.assert_allclose(clora.images[0], merge.images[0], atol=1e-5)


@pytest.mark.parametrize("batched,gate", [(True, "layers"), (False, "layers"), (True, "prediction"),
                                          (False, "prediction")])
def test_unet_calls_rows_and_backward_passes_are_exact(sd15, tiny_sd15_dir, tmp_path, batched, gate):
    pipe, loras = sd15
    unet_only = build_tiny_lora(tiny_sd15_dir, tmp_path / "unet_only.safetensors", seed=5, trigger_words=["plk"],
                                text_encoder=False)
    specs = [*loras, LoraSpec(unet_only)]
    method = CLoRA(max_update_step=2, iterative_steps=(1,), extra_iterations=1, batched=batched, gate=gate,
                   schedule_steps=0)
    counter = UNetCallCounter(pipe.unet)
    try:
        stats = pipe.generate(PROMPT, specs, method, steps=3, num_images=2, width=32, height=32,
                              output_type="latent", **COMMON).stats
    finally:
        counter.handle.remove()
    updates, steps, branches, images = 1 + 2 + 0, 3, 4, 2
    if gate == "prediction":  # per step: every branch's CFG rows
        calls = updates + steps if batched else branches * (updates + steps)
        rows = images * (branches * updates + 2 * branches * steps)  # updates: conditional rows only
    else:  # per step: a map pass of the branches' conditional rows, then one regional CFG pass per image
        calls = (updates + steps if batched else branches * (updates + steps)) + steps * images
        rows = images * (branches * updates + branches * steps + 2 * steps)
    assert (stats.unet_calls, stats.unet_rows, stats.backward_passes) == (calls, rows, updates)
    assert (counter.calls, counter.rows) == (calls, rows)
    assert stats.execution.split("+")[0] == ("batched" if batched else "sequential")
    assert [step for step, _ in method.loss_history] == [0, 1, 1]
    assert len(method.mask_history) == steps and method.mask_history[0].owner.shape == (2, 16, 16)


def test_sdxl_two_loras_optimise_and_partition(tiny_sdxl_dir, sdxl_lora_files):
    pipe = load_pipeline(tiny_sdxl_dir)
    method = CLoRA(max_update_step=2, iterative_steps=(), schedule_steps=0)
    result = pipe.generate(PROMPT, [LoraSpec(p) for p in sdxl_lora_files], method, steps=2, width=64, height=96,
                           output_type="latent", **COMMON)
    assert (result.stats.unet_calls, result.stats.backward_passes) == (2 + 2 * 2, 2)  # per step: maps + regional
    assert torch.isfinite(result.latents).all()
    for masks in method.mask_history:
        assert masks.owner.shape == (1, 48, 32)
        assert torch.equal(masks.one_hot().sum(dim=1), torch.ones(1, 48, 32))


# ------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("settings,named", [
    (dict(mask_threshold=1.5), "mask_threshold"),
    (dict(step_size=-1.0), "step_size"),
    (dict(temperature=0.0), "temperature"),
    (dict(iterative_steps=(-2,)), "iterative_steps"),
    (dict(prompts=("only one",)), "prompts"),
    (dict(subjects=("cat", "dog", "bird")), "subjects"),
    (dict(mask_morphology=("blur",)), "mask_morphology"),
    (dict(concept_token_indices=(((1,), (2,)),)), "concept_token_indices"),
    (dict(prompts=("a cat", "")), "prompt"),
    (dict(subjects=("cat", "cat")), "share token"),
    (dict(concept_token_indices=(((1,), (2,), (3,)), ((4,), (5,), (99,)))), "outside"),
    (dict(backend="cuda-magic"), "backend"),
])
def test_bad_inputs_raise_one_line_user_errors(sd15, settings, named):
    pipe, loras = sd15
    with pytest.raises(UserError) as caught:
        pipe.generate(PROMPT, loras, CLoRA(**settings), steps=1, output_type="latent", **COMMON)
    message = str(caught.value)
    assert named in message and "\n" not in message


def test_lora_without_trigger_words_needs_subjects(sd15, tiny_sd15_dir, tmp_path):
    pipe, loras = sd15
    anonymous = LoraSpec(build_tiny_lora(tiny_sd15_dir, tmp_path / "anonymous.safetensors", seed=9))
    with pytest.raises(UserError, match="subjects"):
        pipe.generate(PROMPT, [loras[0], anonymous], CLoRA(), steps=1, output_type="latent", **COMMON)
    method = CLoRA(subjects=("", "dog"), latent_update=False)
    pipe.generate(PROMPT, [loras[0], anonymous], method, steps=1, output_type="latent", **COMMON)
    assert method.token_groups[1][0] == method.token_groups[1][2] == subsequence_positions(pipe.tokenizer, PROMPT, "dog")
    with pytest.raises(UserError, match="clora needs at least 1"):
        pipe.generate(PROMPT, [], CLoRA(), steps=1, output_type="latent", **COMMON)


def test_update_schedule():
    method = CLoRA()
    assert [method.updates_at(i) for i in (0, 1, 10, 20, 29, 30)] == [21, 1, 21, 21, 1, 0]
    assert [method.updates_at(i, 50) for i in (0, 1, 10, 20, 29, 30)] == [21, 1, 21, 21, 1, 0]
    # 20 steps: the 50-step schedule scaled, updates before step 12, extra ones at steps 0, 4 and 8
    assert [method.updates_at(i, 20) for i in range(20)] == [21, 1, 1, 1, 21, 1, 1, 1, 21, 1, 1, 1] + [0] * 8
    assert CLoRA(schedule_steps=0).updates_at(29, 20) == 1
    assert CLoRA(latent_update=False).updates_at(0) == 0
    assert math.isclose(CLoRA().step_size, 20.0) and CLoRA().temperature == 0.5 and CLoRA().mask_threshold == 0.5


def test_step_size_scales_with_the_latent_area():
    latents = torch.zeros(1, 4, 16, 16)
    assert CLoRA().scaled_step_size(torch.zeros(1, 4, 64, 64)) == 20.0  # SD1.5 at 512 px: the paper's value
    assert CLoRA().scaled_step_size(latents) == 20.0 * 256 / 4096
    assert CLoRA(step_latent_side=0).scaled_step_size(latents) == 20.0


def test_cli_clora_writes_masks_settings_and_counts(tmp_path, tiny_sd15_dir, sd15_lora_files, capsys):
    from loracompose.cli.main import main

    out = tmp_path / "out"
    args = ["generate", "--model", str(tiny_sd15_dir), "--prompt", "a photo", "--method", "clora",
            "--lora", str(sd15_lora_files[0]), "--lora", str(sd15_lora_files[1]), "--clora-iterative-steps", "",
            "--clora-mask-threshold", "0.4", "--steps", "2", "--guidance", "1", "--quiet", "--out", str(out)]
    assert main(args) == 0
    record = json.loads((out / "clora-0.json").read_text())
    assert record["method_settings"]["mask_threshold"] == 0.4 and record["method_settings"]["iterative_steps"] == []
    # 3 branches, no CFG: per step a map pass and a regional pass, plus one optimisation call per update
    assert record["stats"]["unet_calls"] == 6 and record["stats"]["backward_passes"] == 2
    capsys.readouterr()
    assert main([*args[:-2], "--clora-iterative-steps", "0,x", "--out", str(tmp_path / "bad")]) == 2
    assert "--clora-iterative-steps '0,x'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_stopping_after_the_map_layers_gives_the_same_loss_and_gradient(sd15):
    """The optimisation pass ends after its last map layer (the last up block never runs in it);
    latents, loss and counts are those of the full pass."""
    pipe, specs = sd15
    results, last_block_calls = {}, []
    hook = pipe.unet.up_blocks[-1].register_forward_hook(lambda *_: last_block_calls.append(1))
    try:
        for stop in (True, False):
            last_block_calls.clear()
            method = CLoRA(stop_after_maps=stop, iterative_steps=(), max_update_step=1, gate="prediction")
            result = pipe.generate("a photo", specs, method, steps=2, seed=4, output_type="latent", show_progress=False)
            results[stop] = (result.latents, method.loss_history, result.stats, len(last_block_calls))
    finally:
        hook.remove()
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=0)
    stopped_losses, full_losses = results[True][1], results[False][1]  # (step, loss) per update
    assert [step for step, _ in stopped_losses] == [step for step, _ in full_losses]
    assert [loss for _, loss in stopped_losses] == pytest.approx([loss for _, loss in full_losses], rel=1e-5)
    assert results[True][2].unet_calls == results[False][2].unet_calls == 3
    assert results[True][2].backward_passes == results[False][2].backward_passes == 1
    assert (results[True][3], results[False][3]) == (2, 3), "the optimisation pass skipped the last up block"
