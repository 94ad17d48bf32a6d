"""LoRA-Composer on FLUX.1 and SD3 (tiny folders saved and loaded back through load_pipeline), against
its oracles: one LoRA on the whole image without isolation == Merge (also when the box goes through the
masked joint attention); a concept's words reach only its box (changing its region prompt changes no
image token outside the box at the first block's output); with isolation no image token of one box
reads another box (changing the tokens of one box changes nothing in the other at the first block);
exact transformer call, row and prompt-encoding counts; the CLI on both families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loracompose import LoraSpec, UserError, load_pipeline
from loracompose.assets.tiny import build_tiny_flux, build_tiny_lora, build_tiny_sd3
from loracompose.attention.composer_dit import JointRegionProcessor
from loracompose.attention.masks import Box, LatentGrid
from loracompose.methods.composer import Composer
from loracompose.methods.merge import Merge
from loracompose.methods.regional import Regional

PROMPT = "a zkx beside a qwv"
SIZE = 32
STEPS = 2
WHOLE = (0.0, 0.0, 1.0, 1.0)
NEARLY_WHOLE = (0.0, 0.0, 1.0, 0.99)  # every token by the rounding rule, but a placed box
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
OVERLAPPING = [(0.0, 0.0, 0.6, 0.75), (0.4, 0.0, 1.0, 0.75)]
# The same sums through a masked and an unmasked SDPA, or differently ordered adds: float rounding only.
TOLERANCE = dict(rtol=0, atol=1e-5)
BUILDERS = {"flux": build_tiny_flux, "sd3": build_tiny_sd3}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def dits(tmp_path_factory) -> dict[str, tuple[Path, object, list[Path]]]:
    made = {}
    for name, build in BUILDERS.items():
        root = tmp_path_factory.mktemp(f"tiny-{name}")
        model = build(root / "model", seed=0)
        loras = [build_tiny_lora(model, root / f"{stem}.safetensors", seed=seed, trigger_words=[trigger],
                                 init_scale=2.0)
                 for stem, trigger, seed in (("character", "zkx", 1), ("other", "qwv", 2))]
        made[name] = (model, load_pipeline(model, device="cpu"), loras)
    return made


def _specs(loras, weights=(0.8, 1.0)) -> list[LoraSpec]:
    return [LoraSpec(path, weight, category="object") for path, weight in zip(loras, weights)]


def _generate(pipe, specs, method, **kwargs):
    options = dict(steps=STEPS, width=SIZE, height=SIZE, output_type="latent", append_triggers=False,
                   show_progress=False)
    return pipe.generate(PROMPT, specs, method, **{**options, **kwargs})


def _rows_per_image(family: str) -> int:
    return 1 if family == "flux" else 2  # FLUX: distilled guidance, no CFG halves


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
    method = Composer(boxes=[box], isolate=False)
    composed = _generate(pipe, spec, method)
    torch.testing.assert_close(composed.latents, merged.latents, **TOLERANCE)
    assert (composed.stats.unet_calls, composed.stats.unet_rows) == (STEPS, STEPS * _rows_per_image(family))
    assert composed.stats.backward_passes == 0, "no refinement on DiTs"
    assert method.placed == ([0] if box == NEARLY_WHOLE else []) and method.segment_codes == (1,)
    assert composed.method["not_on_this_model"] == ["refine", "reinitialise"]
    assert composed.method["text_segments"] == [1]
    base = _generate(pipe, [], Merge())
    assert (merged.latents - base.latents).abs().max() > 1e-2, "the LoRA changes the result"
    assert _stock_state(pipe.transformer), "processors and PEFT forwards restored"


def test_two_boxes_run_one_pass_per_step_with_one_text_segment_per_group(family, dits):
    _, pipe, loras = dits[family]
    specs = _specs(loras)
    method = Composer(boxes=OVERLAPPING, region_prompts=["a zkx", "a qwv"])
    composed = _generate(pipe, specs, method)
    rows = _rows_per_image(family)
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
    both = _generate(pipe, specs, Composer(boxes=[LEFT, RIGHT]), num_images=2, seed=5)
    for image, seed in enumerate((5, 6)):
        alone = _generate(pipe, specs, Composer(boxes=[LEFT, RIGHT]), seed=seed)
        torch.testing.assert_close(both.latents[image:image + 1], alone.latents, **TOLERANCE)
    assert both.stats.unet_rows == STEPS * 2 * _rows_per_image(family)


@pytest.mark.parametrize("isolate", [True, False])
def test_a_concepts_words_reach_only_its_box(family, dits, isolate):
    """Changing concept 0's region prompt changes the first block's image tokens inside box 0 only."""
    _, pipe, loras = dits[family]
    outputs = [_first_block_image_output(pipe, _specs(loras), Composer(boxes=[LEFT, RIGHT], isolate=isolate,
                                                                        region_prompts=[words, "a qwv"]))
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
        plain, perturbed = (_first_block_image_output(pipe, _specs(loras), Composer(boxes=[LEFT, RIGHT],
                                                                                    isolate=isolate), perturb=change)
                            for change in (None, other))
        changed[isolate] = (plain[:, ~other] - perturbed[:, ~other]).abs().max()
        assert (plain[:, other] - perturbed[:, other]).abs().max() > 1e-3
    assert changed[True] <= 1e-6
    assert changed[False] > 1e-4


# ------------------------------------------------------------------------------------ refusals and CLI


def test_refinement_forced_with_globals_is_refused_on_dits(family, dits):
    _, pipe, loras = dits[family]
    with pytest.raises(UserError, match=r"^composer refine_with_globals=True: latent refinement is not built") as error:
        _generate(pipe, _specs(loras), Composer(refine_with_globals=True))
    assert "\n" not in str(error.value)


def test_cli_runs_composer_on_dits(family, dits, tmp_path, capsys):
    from loracompose.cli.main import main

    model, _, loras = dits[family]
    out = tmp_path / "out"
    code = main(["generate", "--model", str(model), "--prompt", PROMPT, "--lora", f"{loras[0]}:0.8",
                 "--lora", str(loras[1]), "--method", "composer", "--box", "0,0,0.5,1", "--box", "0.5,0,1,1",
                 "--region-prompt", "a zkx", "--region-prompt", "a qwv", "--width", str(SIZE), "--height", str(SIZE),
                 "--steps", "2", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "composer-0.png").exists()
    assert "composer: 2 transformer calls" in captured.err
