"""LoRA-Composer on FLUX.1 and SD3 (tiny folders saved and loaded back through load_pipeline), against
its oracles: one LoRA on the whole image without isolation == Merge (also when the box goes through the
masked joint attention); a concept's words reach only its box (changing its region prompt changes no
image token outside the box at the first block's output); with isolation no image token of one box
reads another box (changing the tokens of one box changes nothing in the other at the first block);
the refinement's concept maps equal the joint attention's image x text block renormalised over the
concept's segment (JointMapRecorder, an independent capture); re-initialisation copies windows of
the initial noise on the token grid (FLUX's packed tokens included); checkpointed refinement equals
plain; exact transformer call, row, backward and prompt-encoding counts; the CLI on both families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loracompose import LoraSpec, load_pipeline
from loracompose.assets.tiny import build_tiny_lora, build_tiny_sd3
from loracompose.attention.composer_dit import JointRegionProcessor
from loracompose.attention.joint_maps import JointMapRecorder
from loracompose.attention.masks import Box, LatentGrid
from loracompose.methods.composer import Composer
from loracompose.methods.merge import Merge
from loracompose.methods.regional import Regional

from helpers import DIT_FAMILIES, dit_rows_per_image, tiny_dits_with_two_loras

PROMPT = "a zkx beside a qwv"
SIZE = 32
STEPS = 2
WHOLE = (0.0, 0.0, 1.0, 1.0)
NEARLY_WHOLE = (0.0, 0.0, 1.0, 0.99)  # every token by the rounding rule, but a placed box
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
OVERLAPPING = [(0.0, 0.0, 0.6, 0.75), (0.4, 0.0, 1.0, 0.75)]
# The same sums through a masked and an unmasked SDPA, or differently ordered adds: float rounding only.
TOLERANCE = dict(rtol=0, atol=1e-5)
NO_LATENT_UPDATES = dict(refine=False, reinitialise=False)  # the first transformer call is then the first step's


@pytest.fixture(scope="module", params=DIT_FAMILIES)
def family(request) -> str:
    return request.param


# One attention head, so head-mean maps renormalise exactly (the maps oracle); SD3 with 2x2 patches, so
# the image-token grid is the latent halved (the re-initialisation's stride 2).
SINGLE_HEAD = {"flux": {"num_attention_heads": 1},
               "sd3": {"num_attention_heads": 1, "attention_head_dim": 32, "patch_size": 2}}


@pytest.fixture(scope="module")
def dits(tmp_path_factory) -> dict[str, tuple[Path, object, list[Path]]]:
    return tiny_dits_with_two_loras(tmp_path_factory)


@pytest.fixture(scope="module")
def single_head_dits(tmp_path_factory) -> dict[str, tuple[Path, object, list[Path]]]:
    return tiny_dits_with_two_loras(tmp_path_factory, SINGLE_HEAD)


def _specs(loras, weights=(0.8, 1.0)) -> list[LoraSpec]:
    return [LoraSpec(path, weight, category="object") for path, weight in zip(loras, weights)]


def _generate(pipe, specs, method, **kwargs):
    options = dict(steps=STEPS, width=SIZE, height=SIZE, output_type="latent", append_triggers=False,
                   show_progress=False)
    return pipe.generate(PROMPT, specs, method, **{**options, **kwargs})




def _token_grid(pipe) -> LatentGrid:
    side = SIZE // pipe.vae_scale_factor // pipe.token_patch
    return LatentGrid(side, side)


def _in_box(pipe, box) -> torch.Tensor:
    """Bool (image tokens,): the tokens a box covers, row-major as the transformer flattens them."""
    return _token_grid(pipe).box_mask(Box(*box), 0).flatten()


def _stock_state(transformer) -> bool:
    no_forwards = not any("forward" in sub.__dict__ for sub in transformer.modules())
    no_processors = not any(isinstance(getattr(sub, "processor", None), JointRegionProcessor)
                            for sub in transformer.modules())
    return no_forwards and no_processors


def _first_block_image_output(pipe, specs, method, perturb: torch.Tensor | None = None) -> torch.Tensor:
    """The image tokens out of transformer_blocks.0 at the first transformer call; ``perturb``, bool
    (image tokens,), adds a fixed offset to those image tokens at that block's input."""
    block = pipe.transformer.transformer_blocks[0]
    seen: list[torch.Tensor] = []

    def change_input(_module, args, kwargs):
        if perturb is None or seen:
            return None
        hidden = kwargs["hidden_states"]
        offset = torch.linspace(-1.0, 1.0, hidden.shape[-1]).to(hidden) * perturb.to(hidden)[None, :, None]
        return args, {**kwargs, "hidden_states": hidden + offset}

    def record(_module, _args, output):
        if not seen:
            seen.append(output[1].detach().clone())  # (encoder states, image states) on both families

    handles = [block.register_forward_pre_hook(change_input, with_kwargs=True), block.register_forward_hook(record)]
    try:
        _generate(pipe, specs, method, steps=1)
    finally:
        for handle in handles:
            handle.remove()
    return seen[0]


# ------------------------------------------------------------------------------------ oracles


@pytest.mark.parametrize("box", [WHOLE, NEARLY_WHOLE], ids=["whole", "placed-whole"])
def test_one_lora_on_the_whole_image_without_isolation_is_merge(family, dits, box):
    _, pipe, loras = dits[family]
    spec = _specs(loras)[:1]
    merged = _generate(pipe, spec, Merge())
    method = Composer(boxes=[box], isolate=False, refine=False)  # re-initialisation of a whole box: no change
    composed = _generate(pipe, spec, method)
    torch.testing.assert_close(composed.latents, merged.latents, **TOLERANCE)
    placed = box == NEARLY_WHOLE
    calls = STEPS + placed  # a placed box: one map pass for the re-initialisation
    assert (composed.stats.unet_calls, composed.stats.unet_rows) == (calls, STEPS * dit_rows_per_image(family) + placed)
    assert composed.stats.backward_passes == 0
    assert method.placed == ([0] if placed else []) and method.segment_codes == (1,)
    assert composed.method["text_segments"] == [1]
    base = _generate(pipe, [], Merge())
    assert (merged.latents - base.latents).abs().max() > 1e-2, "the LoRA changes the result"
    assert _stock_state(pipe.transformer), "processors and PEFT forwards restored"


def test_two_boxes_run_one_pass_per_step_with_one_text_segment_per_group(family, dits):
    _, pipe, loras = dits[family]
    specs = _specs(loras)
    method = Composer(boxes=OVERLAPPING, region_prompts=["a zkx", "a qwv"], refine=False, reinitialise=False)
    composed = _generate(pipe, specs, method)
    rows = dit_rows_per_image(family)
    assert (composed.stats.unet_calls, composed.stats.unet_rows) == (STEPS, STEPS * rows)
    assert composed.stats.backward_passes == 0
    # below the boxes (no LoRA), each box alone, the overlap
    assert method.segment_codes == (0, 1, 2, 3)
    # the generation's branch, then the groups' prompts: none, "a zkx", "a qwv", "a zkx, a qwv"
    assert composed.stats.text_encoder_calls == 5
    regional = _generate(pipe, specs, Regional(boxes=OVERLAPPING))
    assert (composed.latents - regional.latents).abs().max() > 1e-4, "region prompts and masks change the result"
    assert _stock_state(pipe.transformer)


def test_two_images_equal_their_one_image_runs(family, dits):
    _, pipe, loras = dits[family]
    specs = _specs(loras)
    both = _generate(pipe, specs, Composer(boxes=[LEFT, RIGHT]), num_images=2, seed=5, steps=4)
    for image, seed in enumerate((5, 6)):
        alone = _generate(pipe, specs, Composer(boxes=[LEFT, RIGHT]), seed=seed, steps=4)
        torch.testing.assert_close(both.latents[image:image + 1], alone.latents, **TOLERANCE)


@pytest.mark.parametrize("isolate", [True, False])
def test_a_concepts_words_reach_only_its_box(family, dits, isolate):
    """Changing concept 0's region prompt changes the first block's image tokens inside box 0 only."""
    _, pipe, loras = dits[family]
    outputs = [_first_block_image_output(pipe, _specs(loras), Composer(boxes=[LEFT, RIGHT], isolate=isolate,
                                                                        region_prompts=[words, "a qwv"],
                                                                        **NO_LATENT_UPDATES))
               for words in ("a zkx", "a zkx on grass under a red sky")]
    inside = _in_box(pipe, LEFT)
    torch.testing.assert_close(outputs[0][:, ~inside], outputs[1][:, ~inside], rtol=0, atol=1e-6)
    assert (outputs[0][:, inside] - outputs[1][:, inside]).abs().max() > 1e-4


def test_isolation_keeps_one_box_from_reading_the_other(family, dits):
    """Changing the image tokens of box 1 at the first block's input leaves box 0's outputs unchanged
    with isolation, and changes them without."""
    _, pipe, loras = dits[family]
    other = _in_box(pipe, RIGHT)
    changed = {}
    for isolate in (True, False):
        plain, perturbed = (_first_block_image_output(pipe, _specs(loras),
                                                      Composer(boxes=[LEFT, RIGHT], isolate=isolate,
                                                               **NO_LATENT_UPDATES), perturb=change)
                            for change in (None, other))
        changed[isolate] = (plain[:, ~other] - perturbed[:, ~other]).abs().max()
        assert (plain[:, other] - perturbed[:, other]).abs().max() > 1e-3
    assert changed[True] <= 1e-6
    assert changed[False] > 1e-4


# ------------------------------------------------------------------------------------ refusals and CLI


@pytest.mark.parametrize("settings,message", [
    (dict(backend="flex"), r"^composer backend='flex' picks a UNet self-attention kernel; on FLUX/SD3"),
    (dict(map_size=8), r"^composer map_size=8 picks a UNet attention level; FLUX/SD3 read their one image-token grid"),
])
def test_unet_only_settings_are_refused_in_one_line(family, dits, settings, message):
    from loracompose import UserError

    _, pipe, loras = dits[family]
    with pytest.raises(UserError, match=message) as error:
        _generate(pipe, _specs(loras), Composer(**settings))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("extra,calls", [
    (["--box", "0,0,0.5,1", "--box", "0.5,0,1,1", "--region-prompt", "a zkx", "--region-prompt", "a qwv",
      "--composer-no-refine", "--composer-no-reinit"], 2),
    ([], None),  # default boxes, refinement and re-initialisation: 2 steps + 1 re-init pass + refined steps
])
def test_cli_runs_composer_on_dits(family, dits, tmp_path, capsys, extra, calls):
    import json

    from loracompose.cli.main import main

    model, _, loras = dits[family]
    out = tmp_path / "out"
    code = main(["generate", "--model", str(model), "--prompt", PROMPT, "--lora", f"{loras[0]}:0.8",
                 "--lora", str(loras[1]), "--method", "composer", *extra, "--width", str(SIZE), "--height", str(SIZE),
                 "--steps", "2", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "composer-0.png").exists()
    stats = json.loads((out / "composer-0.json").read_text())["stats"]
    if calls is None:
        calls = 2 + 1 + stats["backward_passes"]  # each refined step here moved the latent
        assert stats["backward_passes"] >= 1
    assert stats["unet_calls"] == calls and f"composer: {calls} transformer calls" in captured.err


# ------------------------------------------------------------------------------------ refinement, re-initialisation


class RecordedMaps(Composer):
    """Composer that also records every concept's segment with JointMapRecorder (an independent capture
    wrapping the same blocks, normalised over every segment's text keys) during its map passes; with one
    head, renormalising those over the concept's segment gives exactly the concept's map."""

    def concept_maps(self, run, sample, timestep, **kwargs):
        tokens = int(self._group_states(self.segment_codes[0]).shape[1])
        recorders = [JointMapRecorder(run.unet, self._token_grid,
                                      range(segment * tokens, (segment + 1) * tokens), blocks=self._cross_map_layers)
                     for segment in (self._concept_segment(k) for k in self.placed)]
        try:
            maps = super().concept_maps(run, sample, timestep, **kwargs)
        finally:
            for recorder in recorders:
                recorder.end_call()  # the map pass ends after the map blocks, before the transformer's hook
                recorder.remove()
        self.checked = getattr(self, "checked", [])
        for slot, recorder in enumerate(recorders):
            whole_segment = recorder.last_call()  # normalised over every segment's text keys
            expected = whole_segment / whole_segment.sum(dim=-1, keepdim=True)  # renormalised over the segment
            self.checked.append((self._cross_store.maps(source=slot).detach(), expected))
        return maps


def test_refinement_maps_are_the_joint_attention_over_each_segment(family, single_head_dits):
    _, pipe, loras = single_head_dits[family]
    method = RecordedMaps(boxes=[LEFT, RIGHT], region_prompts=["a zkx", "a qwv"])
    result = _generate(pipe, _specs(loras), method, steps=4)
    assert len(method.checked) == 2 * (1 + len(method.refinement_trace)), "two concepts per map pass"
    for captured, expected in method.checked:
        torch.testing.assert_close(captured, expected, rtol=0, atol=1e-6)
    assert method.segment_codes == (1, 2) and len(method.token_positions) == 2
    rows = dit_rows_per_image(family)
    refined = len(method.refinement_trace)
    assert refined >= 1 and result.stats.backward_passes == sum(any(step.updated) for step in method.refinement_trace)
    assert (result.stats.unet_calls, result.stats.unet_rows) == (4 + 1 + refined, 4 * rows + 1 + refined)


def test_checkpointed_refinement_equals_plain(family, dits):
    _, pipe, loras = dits[family]
    runs = [_generate(pipe, _specs(loras), Composer(boxes=[LEFT, RIGHT], checkpoint_refinement=checkpoint), steps=4)
            for checkpoint in (True, False)]
    torch.testing.assert_close(runs[0].latents, runs[1].latents, **TOLERANCE)
    no_updates = _generate(pipe, _specs(loras), Composer(boxes=[LEFT, RIGHT], **NO_LATENT_UPDATES), steps=4)
    assert (runs[0].latents - no_updates.latents).abs().max() > 1e-3, "refinement and re-initialisation act"
    assert _stock_state(pipe.transformer)


class InitialLatents(Composer):
    """Keeps the loop's latents before and after the first prepare_latents (the re-initialisation)."""

    def prepare_latents(self, run, step, latents):
        updated = super().prepare_latents(run, step, latents)
        if step.index == 0:
            self.before_after = (latents.clone(), updated.clone())
        return updated


def _on_token_grid(pipe, latents: torch.Tensor) -> torch.Tensor:
    """(channels, rows, columns) of image 0: SD3's latent as it is, FLUX's packed tokens on their grid."""
    if latents.ndim == 4:
        return latents[0]
    grid = _token_grid(pipe)
    return latents[0].T.reshape(latents.shape[-1], grid.height, grid.width)


def test_reinitialisation_copies_windows_of_the_noise_on_the_token_grid(family, single_head_dits):
    """Outside the boxes the latent is an affine map of the noise (the restored mean and std); inside
    each box, the same map of a same-sized window of the noise at a token-grid position (SD3 here with
    2x2 patches: windows start on even latent rows and columns)."""
    _, pipe, loras = single_head_dits[family]
    boxes = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)]
    method = InitialLatents(boxes=boxes, refine=False)
    _generate(pipe, _specs(loras), method, steps=1)
    before, after = (_on_token_grid(pipe, latents) for latents in method.before_after)
    rows, columns = before.shape[-2:]
    inside = [LatentGrid(rows, columns).box_mask(Box(*box), 0) for box in boxes]
    outside = ~(inside[0] | inside[1])
    design = torch.stack([before[:, outside].flatten(), torch.ones(before[:, outside].numel())], dim=1)
    scale, shift = torch.linalg.lstsq(design, after[:, outside].flatten()[:, None]).solution.flatten()
    torch.testing.assert_close(after[:, outside], scale * before[:, outside] + shift, rtol=0, atol=1e-5)
    stride = rows // _token_grid(pipe).height
    assert stride == (2 if family == "sd3" else 1)
    for box in inside:
        top, left = (int(axis.nonzero()[0]) for axis in (box.any(dim=1), box.any(dim=0)))
        height, width = int(box.any(dim=1).sum()), int(box.any(dim=0).sum())
        target = (after[:, top:top + height, left:left + width] - shift) / scale
        windows = [(r, c) for r in range(0, rows - height + 1, stride) for c in range(0, columns - width + 1, stride)
                   if torch.allclose(before[:, r:r + height, c:c + width], target, rtol=0, atol=1e-4)]
        assert windows, "the box holds a window of the initial noise at a token position"


# ------------------------------------------------------------------------------------ layouts


def test_flux_true_cfg_and_sd35_run_the_masked_attention(dits, tmp_path):
    """FLUX with true CFG ([uncond, cond] rows, each half its segments) and SD3.5's layout (RMS-normed
    q/k, an image-only attn2 given the isolation mask): a placed whole-image box without isolation is
    Merge; two boxes refine and re-initialise with exact counts."""
    _, flux, flux_loras = dits["flux"]
    sd35_model = build_tiny_sd3(tmp_path / "sd35", seed=0, sd35=True)
    sd35_loras = [build_tiny_lora(sd35_model, tmp_path / f"{stem}.safetensors", seed=seed, trigger_words=[word],
                                  init_scale=2.0)
                  for stem, word, seed in (("character", "zkx", 1), ("other", "qwv", 2))]
    cases = [(flux, flux_loras, dict(true_cfg_scale=2.0, negative_prompt="blurry")),
             (load_pipeline(sd35_model, device="cpu"), sd35_loras, {})]
    for pipe, loras, options in cases:
        merged = _generate(pipe, _specs(loras)[:1], Merge(), **options)
        whole = _generate(pipe, _specs(loras)[:1], Composer(boxes=[NEARLY_WHOLE], isolate=False, refine=False),
                          **options)
        torch.testing.assert_close(whole.latents, merged.latents, **TOLERANCE)
        method = Composer(boxes=[LEFT, RIGHT])
        result = _generate(pipe, _specs(loras), method, steps=4, **options)
        refined = len(method.refinement_trace)
        assert refined >= 1 and result.stats.unet_calls == 4 + 1 + refined
        assert result.stats.unet_rows == 4 * 2 + 1 + refined  # CFG rows; map passes: the conditional row
        assert _stock_state(pipe.transformer)
