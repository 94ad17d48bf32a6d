"""``clora`` on FLUX.1 and SD3 (tiny folders saved and loaded back through load_pipeline): exact
transformer calls and rows per step (counted by a hook, not by our stats), one LoRA with an all-ones
mask equal to Merge, forced masks equal to the branches they pick (left/right halves placed on the
image as the transformer flattens its tokens), latent updates only at their scheduled steps with a
decreasing loss, one update equal to an autograd step through the attention diffusers computes, the
early stop after the map blocks giving the same updates, and the CLI."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from loracompose import LoraSpec, load_pipeline
from loracompose.assets.tiny import build_tiny_flux, build_tiny_lora, build_tiny_sd3
from loracompose.attention import joint_maps
from loracompose.methods.clora import CLoRA, ConceptMasks
from loracompose.methods.merge import Merge

PROMPT = "a zkx on the left and a qwv on the right"
SIZE = 32
BUILDERS = {"flux": build_tiny_flux, "sd3": build_tiny_sd3}
TOLERANCE = dict(rtol=0, atol=1e-4)  # batched per-row adapters against one merged call (as Composite's test)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def dits(tmp_path_factory) -> dict[str, tuple[object, list[Path]]]:
    made = {}
    for name, build in BUILDERS.items():
        root = tmp_path_factory.mktemp(f"tiny-{name}")
        model = build(root / "model", seed=0)
        loras = [build_tiny_lora(model, root / f"{stem}.safetensors", seed=seed, trigger_words=[trigger],
                                 init_scale=2.0)
                 for stem, trigger, seed in (("character", "zkx", 1), ("other", "qwv", 2))]
        made[name] = (load_pipeline(model, device="cpu"), loras)
    return made


def _generate(pipe, specs, method, **kwargs):
    options = dict(steps=3, width=SIZE, height=SIZE, output_type="latent", append_triggers=False,
                   show_progress=False, seed=3)
    return pipe.generate(PROMPT, specs, method, **{**options, **kwargs})


def _objects(loras, weights=(1.0, 1.0)):
    return [LoraSpec(path, weight, category="object") for path, weight in zip(loras, weights)]


def _rows_per_branch(family: str) -> int:
    return 1 if family == "flux" else 2  # FLUX: distilled guidance, one row; SD3: CFG halves


class TransformerCalls:
    """Transformer forwards and their rows, counted by a pre-hook (the DiTs take keyword arguments)."""

    def __init__(self, transformer):
        self.calls, self.rows = 0, 0
        self.handle = transformer.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, _module, _args, kwargs):
        self.calls += 1
        self.rows += kwargs["hidden_states"].shape[0]


def forced_owner(owner_of):
    """A mask callback whose owner map is ``owner_of(rows, columns)`` (long, on the token grid) per image."""
    def callback(masks: ConceptMasks) -> ConceptMasks:
        owner = owner_of(*masks.owner.shape[-2:]).expand_as(masks.owner).clone()
        return ConceptMasks(masks.step, owner, masks.names)
    return callback


@pytest.mark.parametrize("gate,batched", [("prediction", True), ("prediction", False), ("layers", True),
                                          ("layers", False)])
def test_transformer_calls_rows_and_backward_passes_are_exact(family, dits, gate, batched):
    pipe, loras = dits[family]
    method = CLoRA(gate=gate, batched=batched, max_update_step=2, iterative_steps=(1,), extra_iterations=2,
                   schedule_steps=0)
    counter = TransformerCalls(pipe.transformer)
    try:
        stats = _generate(pipe, _objects(loras), method, num_images=2).stats
    finally:
        counter.handle.remove()
    updates, steps, branches, images, halves = 1 + 3 + 0, 3, 3, 2, _rows_per_branch(family)
    passes = 1 if batched else branches  # the branches in one call with per-row adapters, or one call each
    if gate == "prediction":  # every branch's rows (CFG halves on SD3), the masks mixing their predictions
        calls = passes * (updates + steps)
        rows = images * branches * (updates + halves * steps)  # updates: conditional rows only
    else:  # a map pass of the branches' conditional rows, then one regional pass per image
        calls = passes * (updates + steps) + steps * images
        rows = images * (branches * (updates + steps) + halves * steps)
    assert (counter.calls, counter.rows) == (calls, rows)
    assert (stats.unet_calls, stats.unet_rows, stats.backward_passes) == (calls, rows, updates)
    assert [step for step, _ in method.loss_history] == [0, 1, 1, 1]
    token_grid = (SIZE // 2, SIZE // 2) if family == "flux" else (SIZE, SIZE)  # FLUX packs 2x2 latent pixels
    assert len(method.mask_history) == steps
    assert method.mask_history[0].owner.shape == (images, *token_grid)
    assert not any("forward" in module.__dict__ for module in pipe.transformer.modules()), "patches undone"
    assert all(not isinstance(module.processor, joint_maps.JointMapProcessor)
               for module in pipe.transformer.modules() if hasattr(module, "processor"))


def test_token_positions_index_the_joint_text_stream(family, dits):
    """FLUX: T5's pieces; SD3: the 77 CLIP positions, then T5's from 77 on; the same in every branch
    (the branch prompts add no word: the prompt holds both trigger words)."""
    pipe, loras = dits[family]
    method = CLoRA(latent_update=False)
    _generate(pipe, _objects(loras), method, steps=1)
    t5 = pipe.tokenizer_2 if family == "flux" else pipe.tokenizer_3
    for concept, word in enumerate(("zkx", "qwv")):
        ids = t5(PROMPT, padding="max_length", max_length=32).input_ids
        pieces = t5(word, add_special_tokens=False).input_ids
        t5_positions = [s + k for s in range(len(ids)) if ids[s:s + len(pieces)] == pieces for k in range(len(pieces))]
        expected = t5_positions if family == "flux" else [77 + p for p in t5_positions]
        positions = method.token_groups[concept]
        assert all(branch == positions[0] for branch in positions)
        assert [p for p in positions[0] if family == "flux" or p >= 77] == expected and expected
        if family == "sd3":
            clip_ids = pipe.tokenizer(PROMPT).input_ids
            clip_pieces = pipe.tokenizer(word, add_special_tokens=False).input_ids
            clip = [s + k for s in range(len(clip_ids)) if clip_ids[s:s + len(clip_pieces)] == clip_pieces
                    for k in range(len(clip_pieces))]
            assert [p for p in positions[0] if p < 77] == clip and clip


@pytest.mark.parametrize("gate", ["prediction", "layers"])
def test_one_lora_with_all_ones_mask_and_no_update_equals_merge(family, dits, gate):
    pipe, loras = dits[family]
    specs = [LoraSpec(loras[0], 0.8, category="object")]
    # every token with any attention is claimed over its peak: the mask is all ones
    method = CLoRA(latent_update=False, mask_threshold=0.0, mask_scores="peak", gate=gate)
    clora = _generate(pipe, specs, method)
    merge = _generate(pipe, specs, Merge())
    assert all(bool((masks.owner == 1).all()) for masks in method.mask_history) and len(method.mask_history) == 3
    assert clora.stats.backward_passes == 0
    torch.testing.assert_close(clora.latents, merge.latents, **TOLERANCE)
    assert (clora.latents - _generate(pipe, [LoraSpec(loras[1])], Merge()).latents).abs().max() > 1e-3


def test_forced_halves_take_each_branchs_prediction_on_its_side(family, dits):
    """gate="prediction", one step: left half owned by LoRA 1, right half by LoRA 2. A flow-matching
    Euler step is linear in the prediction, so the latent is LoRA 1 alone on the left and LoRA 2 alone
    on the right, in image coordinates (FLUX's packed tokens unpacked by the pipeline)."""
    pipe, loras = dits[family]
    specs = _objects(loras, (0.8, 1.0))
    method = CLoRA(latent_update=False, gate="prediction")
    method.mask_callback = forced_owner(lambda rows, columns: (torch.arange(columns) >= columns // 2).long()
                                        .add(1).expand(rows, columns))

    def image(latents):  # FLUX's latents come out packed: diffusers' own unpacking gives (B, C, H, W)
        return pipe._unpack_latents(latents, SIZE, SIZE, pipe.vae_scale_factor) if family == "flux" else latents

    fused = image(_generate(pipe, specs, method, steps=1).latents)
    left = image(_generate(pipe, specs[:1], Merge(), steps=1).latents)
    right = image(_generate(pipe, specs[1:], Merge(), steps=1).latents)
    half = fused.shape[-1] // 2
    torch.testing.assert_close(fused[..., :half], left[..., :half], **TOLERANCE)
    torch.testing.assert_close(fused[..., half:], right[..., half:], **TOLERANCE)
    assert (left[..., :half] - right[..., :half]).abs().max() > 1e-3, "the two LoRAs must differ"


def test_forced_masks_in_layers_gate_keep_the_style_alone(family, dits):
    """gate="layers", no concept owning a token: the object LoRA is off everywhere and the style LoRA
    (a global kind) covers the image: the style merged alone."""
    pipe, loras = dits[family]
    specs = [LoraSpec(loras[0], category="object"), LoraSpec(loras[1], category="style")]
    method = CLoRA(latent_update=False)
    method.mask_callback = forced_owner(lambda rows, columns: torch.zeros(rows, columns, dtype=torch.long))
    clora = _generate(pipe, specs, method)
    alone = _generate(pipe, specs[1:], Merge())
    torch.testing.assert_close(clora.latents, alone.latents, **TOLERANCE)


def _explicit_branch_maps(pipe, family, call, latents, weights, token_count):
    """(branches, image tokens, text tokens) maps without loracompose code: each branch's row of the
    recorded call run alone with its adapters set by diffusers, the joint attention's softmax formed
    from the queries and keys its SDPA receives, the image x text block renormalised over the text,
    head mean, on the map block (the later half of the joint blocks: FLUX's double block 0 of 1,
    SD3's joint block 1 of 2)."""
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = torch.nn.functional.scaled_dot_product_attention
    image = latents.shape[1] if family == "flux" else latents.shape[-2] * latents.shape[-1]

    def keeping(query, key, value, *args, **kwargs):
        kept.append((query, key))
        return original(query, key, value, *args, **kwargs)

    maps = []
    for branch, adapter_weights in enumerate(weights):
        pipe.transformer.set_adapters(list(adapter_weights), list(adapter_weights.values()))
        row = {name: value[branch:branch + 1] if name in ("encoder_hidden_states", "pooled_projections", "timestep",
                                                          "guidance") and value is not None else value
               for name, value in call.items()}
        row["hidden_states"] = latents
        kept.clear()
        torch.nn.functional.scaled_dot_product_attention = keeping
        try:
            pipe.transformer(**row)
        finally:
            torch.nn.functional.scaled_dot_product_attention = original
        query, key = kept[0] if family == "flux" else kept[1]
        scores = (query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(dim=-1)
        rows, columns = ((slice(token_count, None), slice(0, token_count)) if family == "flux"
                         else (slice(0, image), slice(image, None)))
        block = scores[0, :, rows, columns]
        maps.append((block / block.sum(dim=-1, keepdim=True)).mean(dim=0))
    pipe.transformer.set_adapters(list(weights[0]), [0.0] * len(weights[0]))
    return torch.stack(maps)


def test_one_update_equals_an_independent_autograd_step(family, dits):
    """The method's z - eta * grad equals one computed with the adapters set by diffusers, maps from the
    attention's own queries and keys, the float64 loss written out pair by pair (test_clora) and eta
    = 20 x latent pixels / 64² (FLUX: 2x2 latent pixels per packed token)."""
    from test_clora import explicit_info_nce

    pipe, loras = dits[family]
    method = CLoRA(gate="prediction", step_size=200.0, max_update_step=1, iterative_steps=(), schedule_steps=0)
    seen, calls = {}, []
    original = method.prepare_latents

    def recording(run, step, latents):
        updated = original(run, step, latents)
        seen.update(before=latents.clone(), after=updated.clone())
        return updated

    method.prepare_latents = recording
    hook = pipe.transformer.register_forward_pre_hook(lambda _m, _a, kwargs: calls.append(dict(kwargs)),
                                                      with_kwargs=True)
    try:
        _generate(pipe, _objects(loras), method, steps=1)
    finally:
        hook.remove()
    names = [lora.name for lora in method.loras]
    weights = [{names[0]: 0.0, names[1]: 0.0}, {names[0]: 1.0, names[1]: 0.0}, {names[0]: 0.0, names[1]: 1.0}]
    call = {name: value.detach() if isinstance(value, torch.Tensor) else value for name, value in calls[0].items()}
    latents = seen["before"].clone().requires_grad_(True)
    with torch.enable_grad():
        maps = _explicit_branch_maps(pipe, family, call, latents, weights, call["encoder_hidden_states"].shape[1])
        loss = explicit_info_nce(maps[:, :, None, :], method.token_groups, 0.5)  # one map row: min-max is global
        (gradient,) = torch.autograd.grad(loss, latents)
    latent_pixels = (SIZE // pipe.vae_scale_factor) ** 2
    expected = seen["before"] - 200.0 * latent_pixels / 64**2 * gradient.float()
    assert (seen["after"] - seen["before"]).abs().max() > 1e-4, "the update must move the latent"
    torch.testing.assert_close(seen["after"], expected, rtol=1e-4, atol=1e-6)


def test_latent_updates_only_at_their_steps_and_the_loss_decreases(family, dits):
    pipe, loras = dits[family]
    method = CLoRA(gate="prediction", max_update_step=2, iterative_steps=(1,), extra_iterations=4, schedule_steps=0)
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    original = method.prepare_latents

    def recording(run, step, latents):
        updated = original(run, step, latents)
        seen.append((step.index, latents.clone(), updated.clone()))
        return updated

    method.prepare_latents = recording
    _generate(pipe, _objects(loras), method, steps=4)
    moved = {index: float((after - before).abs().max()) for index, before, after in seen}
    assert moved[0] > 0 and moved[1] > 0 and moved[2] == moved[3] == 0.0
    losses = [loss for step, loss in method.loss_history if step == 1]
    assert len(losses) == 5 and all(b < a for a, b in itertools.pairwise(losses)), losses


def test_stopping_after_the_map_blocks_gives_the_same_updates(family, dits):
    """The optimisation and map passes end after the last map block (FLUX: its single-stream block
    never runs in them); the latents, losses and counts are those of full passes."""
    pipe, loras = dits[family]
    last = (pipe.transformer.single_transformer_blocks[-1] if family == "flux"
            else pipe.transformer.transformer_blocks[-1])
    results = {}
    runs: list[int] = []
    hook = last.register_forward_hook(lambda *_: runs.append(1))
    try:
        for stop in (True, False):
            runs.clear()
            method = CLoRA(stop_after_maps=stop, max_update_step=2, iterative_steps=(), schedule_steps=0)
            result = _generate(pipe, _objects(loras), method, steps=2)
            results[stop] = (result.latents, method.loss_history, result.stats.unet_calls, len(runs))
    finally:
        hook.remove()
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=1e-5)
    assert [step for step, _ in results[True][1]] == [0, 1]
    for (_, stopped), (_, full) in zip(results[True][1], results[False][1]):
        assert abs(stopped - full) < 1e-5
    assert results[True][2] == results[False][2] == 2 + 2 * 2  # per step: an update, a map pass, a regional pass
    if family == "flux":  # the map block is the double-stream block: the single-stream one is skipped
        assert (results[True][3], results[False][3]) == (2, 6)


def test_cli_runs_clora_on_dits(family, dits, tmp_path, capsys):
    import json

    from loracompose.cli.main import main

    pipe, loras = dits[family]
    out = tmp_path / "out"
    code = main(["generate", "--model", str(pipe.name_or_path), "--prompt", PROMPT, "--lora", str(loras[0]),
                 "--lora", str(loras[1]), "--method", "clora", "--clora-iterative-steps", "", "--clora-max-update-step",
                 "1", "--clora-schedule-steps", "0", "--width", str(SIZE), "--height", str(SIZE), "--steps", "2",
                 "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "clora-0.png").exists()
    record = json.loads((out / "clora-0.json").read_text())
    # one update (step 0), then per step a map pass of the 3 branches and one regional pass
    assert (record["stats"]["unet_calls"], record["stats"]["backward_passes"]) == (1 + 2 * 2, 1)
    assert "clora: 5 transformer calls" in captured.err


def test_step_size_counts_a_flux_token_as_its_2x2_latent_pixels():
    # FLUX.1 at 512 px: 32 x 32 packed tokens of 16 channels x 2 x 2 = a 64 x 64 latent, SD1.5's size at 512 px
    assert CLoRA().scaled_step_size(torch.zeros(1, 32 * 32, 64)) == 20.0
    assert CLoRA().scaled_step_size(torch.zeros(1, 16, 64, 64)) == 20.0  # SD3 at 512 px: (B, C, H, W)
