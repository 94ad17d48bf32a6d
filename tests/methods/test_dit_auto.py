"""``auto`` on FLUX.1 and SD3 (tiny folders saved and loaded back through load_pipeline) against its
oracles: Merge exactly where auto must be Merge (one LoRA; global LoRAs only), trigger positions found
by hand in the joint text stream (FLUX: T5's tokens; SD3: 77 CLIP positions then T5's), masks worked
out by hand from the maps the probe captured, the generation equal to regional with those masks, and
exact transformer call/row counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import DIT_FAMILIES, dit_rows_per_image, tiny_dits_with_two_loras
from loracompose import LoraSpec
from loracompose.attention import joint_maps
from loracompose.attention.auto_masks import AutoMasks
from loracompose.methods.auto import Auto
from loracompose.methods.merge import Merge
from loracompose.methods.regional import Regional

PROMPT = "a zkx on the left and a qwv on the right"
SIZE = 32
STEPS = 3
PROBE = 2
TOLERANCE = dict(rtol=0, atol=1e-5)  # the same sums through differently ordered adds


@pytest.fixture(scope="module", params=DIT_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def dits(tmp_path_factory) -> dict[str, tuple[object, list[Path]]]:
    return {name: (pipe, loras) for name, (_, pipe, loras) in tiny_dits_with_two_loras(tmp_path_factory).items()}


def _generate(pipe, specs, method, **kwargs):
    options = dict(steps=STEPS, width=SIZE, height=SIZE, output_type="latent", append_triggers=False,
                   show_progress=False, seed=3)
    return pipe.generate(PROMPT, specs, method, **{**options, **kwargs})


@pytest.mark.parametrize("files,kinds", [(1, {}), (2, {"character": "background", "other": "style"}),
                                         (2, {"character": "style", "other": "style"})])
def test_auto_is_merge_for_one_lora_or_only_global_loras(family, dits, files, kinds):
    pipe, loras = dits[family]
    specs = [LoraSpec(path, weight) for path, weight in zip(loras[:files], (0.8, 1.2))]
    merged = _generate(pipe, specs, Merge())
    auto = _generate(pipe, specs, Auto(kinds=kinds, style_combine="weights"))
    assert torch.equal(auto.latents, merged.latents)
    assert (auto.stats.unet_calls, auto.stats.unet_rows) == (STEPS, STEPS * dit_rows_per_image(family))


def _subsequence_starts(tokens: list[str], pieces: list[str]) -> list[int]:
    return [start for start in range(len(tokens) - len(pieces) + 1) if tokens[start:start + len(pieces)] == pieces]


def _positions_by_hand(pipe, family: str, word: str) -> list[int]:
    """The word's tokens in the joint text stream: T5 pieces start with '▁'; CLIP's end with '</w>'."""
    text_length = 32  # the tiny T5 tokenizer's model_max_length (generate caps the stream there)
    t5 = pipe.tokenizer_2 if family == "flux" else pipe.tokenizer_3
    t5_tokens = t5.convert_ids_to_tokens(t5(PROMPT, padding="max_length", max_length=text_length).input_ids)
    t5_pieces = t5.convert_ids_to_tokens(t5(word, add_special_tokens=False).input_ids)
    assert t5_pieces[0].startswith("\u2581")
    t5_positions = [s + k for s in _subsequence_starts(t5_tokens, t5_pieces) for k in range(len(t5_pieces))]
    if family == "flux":
        return t5_positions
    clip_positions: set[int] = set()
    for clip in (pipe.tokenizer, pipe.tokenizer_2):
        tokens = clip.convert_ids_to_tokens(clip(PROMPT, padding="max_length", max_length=77).input_ids)
        pieces = clip.convert_ids_to_tokens(clip(word, add_special_tokens=False).input_ids)
        assert pieces[-1].endswith("</w>")
        clip_positions |= {s + k for s in _subsequence_starts(tokens, pieces) for k in range(len(pieces))}
    return sorted(clip_positions) + [77 + position for position in t5_positions]


def _captured_maps(monkeypatch) -> list[torch.Tensor]:
    """Keeps what the probe's recorder hands to the mask making."""
    kept: list[torch.Tensor] = []
    original = joint_maps.JointMapRecorder.maps

    def keeping(self):
        maps = original(self)
        kept.append(maps.clone())
        return maps

    monkeypatch.setattr(joint_maps.JointMapRecorder, "maps", keeping)
    return kept


def _owner_by_hand(maps: torch.Tensor, groups: list[list[int]], threshold: float) -> torch.Tensor:
    """Mean map per concept over its token columns, min-max per concept, argmax above the threshold."""
    tokens = sorted({token for group in groups for token in group})
    scores = []
    for group in groups:
        score = maps[..., [tokens.index(token) for token in group]].mean(dim=-1)
        low = score.flatten(1).min(dim=1).values.view(-1, 1, 1)
        high = score.flatten(1).max(dim=1).values.view(-1, 1, 1)
        scores.append((score - low) / (high - low))
    best, index = torch.stack(scores, dim=1).max(dim=1)
    return torch.where(best >= threshold, index + 1, torch.zeros_like(index))


def test_two_local_loras_get_masks_from_the_captured_maps_and_run_as_regional(family, dits, monkeypatch):
    pipe, loras = dits[family]
    specs = [LoraSpec(path, weight, category="object") for path, weight in zip(loras, (0.8, 1.0))]
    kept = _captured_maps(monkeypatch)
    method = Auto(probe_steps=PROBE, smoothing=0.0)
    result = _generate(pipe, specs, method)

    groups = [_positions_by_hand(pipe, family, word) for word in ("zkx", "qwv")]
    assert method._token_groups == groups and all(groups)
    assert len(kept) == 1 and len(method.mask_history) == 1
    grid = (SIZE // 2 // 1, SIZE // 2) if family == "flux" else (SIZE, SIZE)  # FLUX packs 2x2 latent pixels
    assert kept[0].shape == (1, *grid, len({t for g in groups for t in g}))
    found = method.mask_history[0][1]
    assert torch.equal(found.owner, _owner_by_hand(kept[0], groups, method.threshold))
    assert found.masks().shape == (1, 2, *grid)
    assert 0 < float(found.masks()[:, 0].sum()) < grid[0] * grid[1], "the maps split the image"
    # The probe (PROBE base-model calls), then one regional pass per step.
    rows = dit_rows_per_image(family)
    assert (result.stats.unet_calls, result.stats.unet_rows) == (PROBE + STEPS, (PROBE + STEPS) * rows)
    assert not any("forward" in module.__dict__ for module in pipe.transformer.modules()), "patches undone"
    assert all(not isinstance(module.processor, joint_maps.JointMapProcessor)
               for name, module in pipe.transformer.named_modules() if hasattr(module, "processor"))
    # Oracle: regional with the masks the probe found.
    masks = found.masks()[0]
    regional = _generate(pipe, specs, Regional(masks=[masks[0], masks[1]]))
    torch.testing.assert_close(result.latents, regional.latents, **TOLERANCE)


def test_a_whole_image_mask_is_merge_and_an_empty_one_leaves_the_style_alone(family, dits):
    """With a local LoRA and a style added in noise space: the local concept everywhere is Merge; the
    local concept nowhere is the style merged alone (its effect added where no local concept is)."""
    pipe, loras = dits[family]
    specs = [LoraSpec(path, weight) for path, weight in zip(loras, (0.8, 1.2))]
    kinds = {"character": "object", "other": "style"}

    def fill(value):
        def callback(_step, found):
            owner = torch.full_like(found.owner, value)
            return AutoMasks(found.scores, owner, torch.full_like(found.latent_owner, value))
        return callback

    whole = Auto(kinds=kinds, probe_steps=1, style_inside_from=0)  # the style inside from the first step
    whole.mask_callback = fill(1)
    result = _generate(pipe, specs, whole)
    torch.testing.assert_close(result.latents, _generate(pipe, specs, Merge()).latents, **TOLERANCE)
    assert result.stats.unet_calls == 1 + 2 * STEPS  # the probe, then the main pass and it with the style
    empty = Auto(kinds=kinds, probe_steps=1)
    empty.mask_callback = fill(0)
    alone = _generate(pipe, specs[1:], Merge())
    torch.testing.assert_close(_generate(pipe, specs, empty).latents, alone.latents, **TOLERANCE)


@pytest.mark.parametrize("source", ["own", "merged"])
def test_other_map_sources_probe_with_their_branches_in_one_call(family, dits, source):
    pipe, loras = dits[family]
    specs = [LoraSpec(path, category="object") for path in loras]
    method = Auto(map_source=source, probe_steps=1)
    result = _generate(pipe, specs, method)
    masks = method.mask_history[0][1].masks()
    assert masks.shape[:2] == (1, 2) and float(masks.sum(dim=1).max()) <= 1  # a partition (or background)
    branches = 2 if source == "own" else 1
    rows = dit_rows_per_image(family)
    assert (result.stats.unet_calls, result.stats.unet_rows) == (1 + STEPS, (branches + STEPS) * rows)


def test_several_images_each_get_their_masks_and_equal_one_image_runs(family, dits):
    pipe, loras = dits[family]
    specs = [LoraSpec(path, category="object") for path in loras]
    method = Auto(probe_steps=1)
    batch = _generate(pipe, specs, method, num_images=2)
    assert method.mask_history[0][1].masks().shape[0] == 2
    assert batch.stats.unet_calls == 1 + 2 * STEPS  # the probe batched, then one regional pass per image
    for image in range(2):
        alone = _generate(pipe, specs, Auto(probe_steps=1), seed=3 + image)
        torch.testing.assert_close(batch.latents[image], alone.latents[0], rtol=0, atol=1e-4)


def test_cli_runs_auto_on_dits(family, dits, tmp_path, capsys):
    from loracompose.cli.main import main

    pipe, loras = dits[family]
    out = tmp_path / "out"
    code = main(["generate", "--model", str(pipe.name_or_path), "--prompt", PROMPT, "--lora", str(loras[0]),
                 "--lora", str(loras[1]), "--method", "auto", "--kind", "character=object", "--kind", "other=object",
                 "--auto-probe-steps", "1", "--width", str(SIZE), "--height", str(SIZE), "--steps", "2", "--quiet",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "auto-0.png").exists()
    assert "auto: 3 transformer calls" in captured.err  # 1 probe call, then one regional pass per step


def test_latent_mode_is_regional_latent_couple_with_the_found_masks(family, dits):
    pipe, loras = dits[family]
    specs = [LoraSpec(path, category="object") for path in loras]
    method = Auto(mode="latent", probe_steps=1)
    result = _generate(pipe, specs, method)
    masks = method.mask_history[0][1].masks()[0]
    regional = _generate(pipe, specs, Regional(masks=[masks[0], masks[1]], mode="latent"))
    torch.testing.assert_close(result.latents, regional.latents, **TOLERANCE)
    assert result.stats.unet_calls == 1 + regional.stats.unet_calls  # the probe, then the same couple
