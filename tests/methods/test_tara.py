"""TARA: trigger-token positions and token-masked K/V composition (tiny models, CPU); its trainer is
tested in tests/training/test_tara_training.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loracompose import METHODS, LoraSpec, Merge, Tara, UserError
from loracompose.methods.tara import cfg_row_masks
from loracompose.tokens import pipeline_tokenizers, trigger_positions

COMMON = dict(show_progress=False, output_type="latent", append_triggers=False)
BOS = 1  # prompt tokens start after <|startoftext|>


# ------------------------------------------------------------------------------------ fixtures


def only_keys(source: Path, out: Path, keep) -> Path:
    """A copy of a LoRA file whose lora_B weights are zero (deltas exactly 0) except where ``keep(key)``."""
    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = {key: (value if "lora_A" in key or keep(key) else torch.zeros_like(value))
               for key, value in load_file(source).items()}
    save_file(tensors, str(out), metadata=metadata)
    return out


@pytest.fixture(scope="module")
def kv_only_lora(sd15_lora_files, tmp_path_factory) -> Path:
    """The style LoRA (trigger "qwv") reduced to its cross-attention K/V deltas."""
    out = tmp_path_factory.mktemp("tara-loras") / "kvonly.safetensors"
    return only_keys(sd15_lora_files[1], out, lambda key: "attn2.to_k" in key or "attn2.to_v" in key)


@pytest.fixture(scope="module")
def no_self_attention_lora(sd15_lora_files, tmp_path_factory) -> Path:
    """The character LoRA (trigger "zkx") without its attn1 deltas."""
    out = tmp_path_factory.mktemp("tara-loras") / "noattn1.safetensors"
    return only_keys(sd15_lora_files[0], out, lambda key: key.startswith("text_encoder") or ".attn1." not in key)


class Recorded:
    """Mixin: keep each step's Prediction."""

    def start(self, run):
        self.predictions = []
        super().start(run)

    def predict(self, run, step, latents):
        prediction = super().predict(run, step, latents)
        self.predictions.append(prediction)
        return prediction


class RecordedMerge(Recorded, Merge):
    pass


class RecordedTara(Recorded, Tara):
    pass


class AllOnesTara(RecordedTara):
    """TARA with every LoRA's token mask set to all ones (the cond half must then equal Merge)."""

    def trigger_masks(self, prompt, tokenizers):
        super().trigger_masks(prompt, tokenizers)
        return {lora.name: torch.ones(77) for lora in self.loras}


def first_prediction(pipe, specs, method, prompt="a zkx in qwv style", **kwargs):
    pipe.generate(prompt, specs, method, steps=1, guidance_scale=7.5, **COMMON | kwargs)
    return method.predictions[0]


# ------------------------------------------------------------------------------------ token positions


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_token_positions_repeated_multi_token_and_absent(model, request):
    tokenizers = pipeline_tokenizers(request.getfixturevalue(model))
    assert len(tokenizers) == (2 if model == "sdxl" else 1)
    # "zkx" is two BPE tokens (z, kx</w>); "a" is one: a(1) zkx(2,3) and(4) zkx(5,6)
    found = trigger_positions(tokenizers, "a zkx and zkx", ["zkx"])
    assert found.positions == [2, 3, 5, 6] and found.missing_words == ()
    assert all(list(per) == [2, 3, 5, 6] for per in found.per_tokenizer)
    mask = found.mask()
    assert mask.shape == (77,) and mask.sum() == 4 and mask[[2, 3, 5, 6]].eq(1).all()
    # several trigger words, one multi-word; one absent word is reported but the others still count
    found = trigger_positions(tokenizers, "blue fire, zkx", ["blue fire", "zkx", "qwv"])
    assert found.positions == [1, 2, 4, 5] and found.missing_words == ("qwv",)
    # absent: not in the prompt, only inside another word, or cut off by the 77-token limit
    assert not trigger_positions(tokenizers, "a cat", ["zkx"]).found
    assert not trigger_positions(tokenizers, "a zkxdog", ["zkx"]).found
    assert not trigger_positions(tokenizers, "a zkx", ["kx"]).found
    assert not trigger_positions(tokenizers, "cat " * 80 + "zkx", ["zkx"]).found
    assert trigger_positions(tokenizers, "zkx's hat", ["zkx"]).positions == [1, 2]


def test_sdxl_masks_are_the_or_of_both_tokenizers(sdxl):
    first, second = pipeline_tokenizers(sdxl)
    prompt = "a zkx and a qwv"
    one, two = (trigger_positions([tok], prompt, ["zkx", "qwv"]).positions for tok in (first, second))
    both = trigger_positions([first, second], prompt, ["zkx", "qwv"])
    assert both.positions == sorted(set(one) | set(two)) == [2, 3, 6, 7]
    assert second.pad_token_id != first.pad_token_id, "the two tokenizers really differ (padding)"


def test_cfg_row_masks_keep_the_unconditional_half_clear():
    token_mask = torch.zeros(77)
    token_mask[[2, 3]] = 1
    rows = cfg_row_masks(token_mask, batch_size=2, do_cfg=True)
    assert rows.shape == (4, 77)
    assert rows[:2].eq(0).all() and rows[2:].eq(token_mask).all()
    assert cfg_row_masks(token_mask, batch_size=1, do_cfg=False).eq(token_mask).all()


# ------------------------------------------------------------------------------------ inference


def test_tara_is_registered():
    assert METHODS["tara"] is Tara


@pytest.mark.parametrize("model,files", [("sd15", "sd15_lora_files"), ("sdxl", "sdxl_lora_files")])
def test_all_ones_masks_equal_merge_in_the_cond_half(model, files, request):
    pipe = request.getfixturevalue(model)
    specs = [LoraSpec(path) for path in request.getfixturevalue(files)]
    # a negative prompt: SDXL's empty one encodes to zeros, where K/V deltas vanish anyway
    merged = first_prediction(pipe, specs, RecordedMerge(), negative_prompt="blurry")
    ones = first_prediction(pipe, specs, AllOnesTara(untokened="global"), negative_prompt="blurry")
    torch.testing.assert_close(ones.cond, merged.cond, rtol=1e-5, atol=1e-5)
    # the unconditional half never gets K/V deltas, so it differs from Merge's
    assert (ones.uncond - merged.uncond).abs().max() > 1e-3


def test_all_ones_masks_without_cfg_equal_merge_whole_run(sd15, sd15_lora_files):
    specs = [LoraSpec(path) for path in sd15_lora_files]
    merged = sd15.generate("a zkx in qwv style", specs, Merge(), steps=2, guidance_scale=1.0, **COMMON)
    ones = sd15.generate("a zkx in qwv style", specs, AllOnesTara(untokened="global"), steps=2, guidance_scale=1.0,
                         **COMMON)
    torch.testing.assert_close(ones.latents, merged.latents, rtol=1e-5, atol=1e-5)


def test_unconditional_half_gets_no_kv_deltas(sd15, kv_only_lora):
    base = first_prediction(sd15, [], RecordedMerge())
    tara = first_prediction(sd15, [LoraSpec(kv_only_lora)], RecordedTara())
    merged = first_prediction(sd15, [LoraSpec(kv_only_lora)], RecordedMerge())
    assert torch.equal(tara.uncond, base.uncond), "uncond rows must run the base K/V exactly"
    assert (merged.uncond - base.uncond).abs().max() > 1e-3, "the reference's broadcast mask would change them"
    assert (tara.cond - base.cond).abs().max() > 1e-3, "the trigger tokens do get the LoRA"


def test_absent_trigger_contributes_nothing_on_kv(sd15, sd15_lora_files, kv_only_lora):
    character = LoraSpec(sd15_lora_files[0])  # trigger "zkx"; the K/V-only LoRA's "qwv" is not in the prompt
    # the K/V-only LoRA is a style: masked to its trigger like an object here (global_kinds="trigger")
    with pytest.warns(UserWarning, match="kvonly"):
        both = sd15.generate("a zkx", [character, LoraSpec(kv_only_lora)],
                             Tara(missing_trigger="warn", untokened="global", global_kinds="trigger"), steps=2,
                             **COMMON)
    alone = sd15.generate("a zkx", [character], Tara(untokened="global"), steps=2, **COMMON)
    torch.testing.assert_close(both.latents, alone.latents, rtol=0, atol=1e-6)
    present = sd15.generate("a zkx, qwv", [character, LoraSpec(kv_only_lora)],
                            Tara(untokened="global", global_kinds="trigger"), steps=2, **COMMON)
    again = sd15.generate("a zkx, qwv", [character], Tara(untokened="global"), steps=2, **COMMON)
    assert (present.latents - again.latents).abs().max() > 1e-3


class TriggerOnlyTara(RecordedTara):
    """TARA whose token masks are each LoRA's trigger words, whatever its kind."""

    def _every_token_for_global_kinds(self, masks):
        self.every_token = []
        return masks


def test_a_style_lora_keeps_its_kv_deltas_on_every_token(sd15, kv_only_lora):
    """A LoRA of a global kind (the K/V-only style LoRA) gets K/V deltas on every text token of the
    conditional rows: equal to all-ones masks, unlike its trigger-only mask."""
    spec = [LoraSpec(kv_only_lora)]
    style = RecordedTara()
    default = first_prediction(sd15, spec, style)
    assert style.every_token == ["kvonly"] and style.settings()["every_token"] == ["kvonly"]
    ones = first_prediction(sd15, spec, AllOnesTara())
    torch.testing.assert_close(default.cond, ones.cond, rtol=0, atol=1e-6)
    trigger = first_prediction(sd15, spec, RecordedTara(global_kinds="trigger"))
    assert (trigger.cond - default.cond).abs().max() > 1e-3
    torch.testing.assert_close(trigger.cond, first_prediction(sd15, spec, TriggerOnlyTara()).cond, rtol=0, atol=0)


def test_absent_trigger_is_an_error_by_default_and_leaves_the_unet_clean(sd15, sd15_lora_files):
    before = {key: type(p) for key, p in sd15.unet.attn_processors.items()}
    with pytest.raises(UserError, match="no trigger word of LoRA style"):
        sd15.generate("a zkx", [LoraSpec(path) for path in sd15_lora_files], Tara(), steps=1, **COMMON)
    assert {key: type(p) for key, p in sd15.unet.attn_processors.items()} == before


def test_bad_settings_and_triggerless_loras_are_user_errors(sd15, sd15_lora_files):
    with pytest.raises(UserError, match="self_attention"):
        sd15.generate("a zkx", [LoraSpec(sd15_lora_files[0])], Tara(self_attention="mask"), steps=1, **COMMON)
    with pytest.raises(UserError, match="no trigger words"):
        sd15.generate("a zkx", [LoraSpec(sd15_lora_files[0], trigger_words=())], Tara(), steps=1, **COMMON)
    with pytest.raises(UserError, match="at least 1 LoRA"):
        sd15.generate("a zkx", [], Tara(), steps=1, **COMMON)


def test_self_attention_modes(sd15, sd15_lora_files, no_self_attention_lora):
    full = LoraSpec(sd15_lora_files[0], name="zkx_lora")
    no_attn1 = LoraSpec(no_self_attention_lora, name="zkx_lora_noattn1")
    keep = first_prediction(sd15, [full], RecordedTara(untokened="global"), prompt="a zkx")
    off = first_prediction(sd15, [full], RecordedTara(self_attention="off", untokened="global"), prompt="a zkx")
    cond = first_prediction(sd15, [full], RecordedTara(self_attention="cond", untokened="global"), prompt="a zkx")
    without = first_prediction(sd15, [no_attn1], RecordedTara(untokened="global"), prompt="a zkx")
    torch.testing.assert_close(off.cond, without.cond, rtol=0, atol=1e-6)   # off = LoRA without attn1 deltas
    torch.testing.assert_close(off.uncond, without.uncond, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.cond, keep.cond, rtol=0, atol=1e-5)     # cond rows: as keep
    torch.testing.assert_close(cond.uncond, off.uncond, rtol=0, atol=1e-6)  # uncond rows: as off
    assert (keep.uncond - off.uncond).abs().max() > 1e-3
    assert not any(sd15.unet.get_submodule(name)._forward_hooks or sd15.unet.get_submodule(name)._forward_pre_hooks
                   for name, module in sd15.unet.named_modules() if isinstance(module, LoraLayer)), "hooks removed"


@pytest.mark.parametrize("self_attention", ["keep", "cond"])
def test_fuse_matches_unfused_and_restores_the_weights_exactly(sd15, sd15_lora_files, self_attention):
    specs = [LoraSpec(path) for path in sd15_lora_files]
    sd15.prepare_loras(specs)  # loaded first, so the state dict keys stay the same
    weights = {key: value.clone() for key, value in sd15.unet.state_dict().items()}
    unfused = sd15.generate("a zkx in qwv style", specs, Tara(self_attention=self_attention, untokened="global"),
                            steps=2, **COMMON)
    fused = sd15.generate("a zkx in qwv style", specs,
                          Tara(self_attention=self_attention, fuse=True, untokened="global"), steps=2, **COMMON)
    torch.testing.assert_close(fused.latents, unfused.latents, rtol=0, atol=1e-4)  # float rounding of W + dW
    after = sd15.unet.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[key], value) for key, value in weights.items())
    assert not any(module.merged for module in sd15.unet.modules() if isinstance(module, LoraLayer))


@pytest.mark.parametrize("guidance,rows_per_step", [(7.5, 4), (1.0, 2)])
@pytest.mark.parametrize("settings,probe_calls", [({"untokened": "global"}, 0), ({}, 3),
                                                  ({"boxes": ((0, 0, 0.5, 1),)}, 0)])
def test_unet_calls_and_rows(sd15, sd15_lora_files, guidance, rows_per_step, settings, probe_calls):
    """One UNet call per step; automatic regions add the base model's probe (auto's 3 steps, one call each,
    the same rows: the base model on every image) and, their regions being per image, one call per image
    and step (the same rows in all)."""
    result = sd15.generate("a zkx in qwv style", [LoraSpec(path) for path in sd15_lora_files], Tara(**settings),
                           steps=4, num_images=2, guidance_scale=guidance, **COMMON)
    calls_per_step = 2 if probe_calls else 1
    assert result.stats.unet_calls == 4 * calls_per_step + probe_calls
    assert result.stats.unet_rows == (4 + probe_calls) * rows_per_step
    assert result.method["name"] == "tara"
    assert result.method["regions"] == ("automatic" if probe_calls else "given" if "boxes" in settings else "none")


# ------------------------------------------------------------------------------------ untokened deltas in regions


def test_whole_image_regions_equal_global_tara(sd15, sd15_lora_files):
    specs = [LoraSpec(path) for path in sd15_lora_files]
    whole = ((0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 1.0))
    regions = sd15.generate("a zkx in qwv style", specs, Tara(boxes=whole), steps=2, **COMMON)
    plain = sd15.generate("a zkx in qwv style", specs, Tara(untokened="global"), steps=2, **COMMON)
    torch.testing.assert_close(regions.latents, plain.latents, rtol=0, atol=1e-5)
    assert regions.method["regions"] == "given" and regions.method["boxes"] == [list(box) for box in whole]


def test_empty_region_leaves_only_the_token_masked_kv(sd15, sd15_lora_files, tmp_path):
    """A LoRA whose region is empty acts only through its token-masked cross-attention K/V (and its text
    encoder deltas, which no region touches): as global TARA with that LoRA cut down to those deltas."""
    kv_and_text = only_keys(sd15_lora_files[0], tmp_path / "zkx_kv.safetensors",
                            lambda key: key.startswith("text_encoder") or "attn2.to_k" in key or "attn2.to_v" in key)
    empty = sd15.generate("a zkx", [LoraSpec(sd15_lora_files[0], name="zkx")],
                          Tara(masks=(torch.zeros(8, 8),)), steps=2, **COMMON)
    cut = sd15.generate("a zkx", [LoraSpec(kv_and_text, name="zkx")], Tara(untokened="global"), steps=2, **COMMON)
    torch.testing.assert_close(empty.latents, cut.latents, rtol=0, atol=1e-5)
    full = sd15.generate("a zkx", [LoraSpec(sd15_lora_files[0], name="zkx")], Tara(untokened="global"),
                         steps=2, **COMMON)
    assert (full.latents - cut.latents).abs().max() > 1e-3, "the untokened deltas matter here"


def test_automatic_regions_come_from_the_probe_and_leave_the_unet_clean(sd15, sd15_lora_files):
    specs = [LoraSpec(path) for path in sd15_lora_files]
    before = {key: type(p) for key, p in sd15.unet.attn_processors.items()}
    method = Tara()
    automatic = sd15.generate("a zkx in qwv style", specs, method, steps=2, **COMMON)
    plain = sd15.generate("a zkx in qwv style", specs, Tara(untokened="global"), steps=2, **COMMON)
    assert (automatic.latents - plain.latents).abs().max() > 1e-4
    character, style = method.region_masks.areas
    assert isinstance(character, torch.Tensor) and style is None  # the style LoRA is global: the whole image
    assert {key: type(p) for key, p in sd15.unet.attn_processors.items()} == before
    assert not any(type(module).forward is not module.forward.__func__ for module in sd15.unet.modules()
                   if isinstance(module, LoraLayer) and hasattr(module.forward, "__func__"))


def test_automatic_regions_are_per_image(sd15, sd15_lora_files):
    """Several images in one call: each gets its own probe regions, so each equals its one-image run
    (image k of a call with seed s uses seed s + k)."""
    specs = [LoraSpec(path) for path in sd15_lora_files]
    both = sd15.generate("a zkx in qwv style", specs, Tara(), steps=2, seed=5, num_images=2, **COMMON)
    alone = [sd15.generate("a zkx in qwv style", specs, Tara(), steps=2, seed=seed, **COMMON) for seed in (5, 6)]
    for image, single in enumerate(alone):
        torch.testing.assert_close(both.latents[image:image + 1], single.latents, rtol=0, atol=1e-5)
    assert both.stats.unet_calls == 2 + 2 * 2  # the probe (2 steps, all images) + one pass per image and step


def test_region_settings_errors(sd15, sd15_lora_files):
    """Settings regions cannot follow are refused where regions apply (two LoRAs, one local), not with one LoRA."""
    specs = [LoraSpec(path) for path in sd15_lora_files]
    for settings, match in [({"untokened": "all"}, "untokened"), ({"fuse": True}, "fuse"),
                            ({"self_attention": "cond"}, "cond"),
                            ({"untokened": "global", "boxes": ((0, 0, 1, 1),)}, "boxes"),
                            ({"boxes": ((0, 0, 1, 1), (0, 0, 1, 1), (0, 0, 1, 1))}, "3 boxes")]:
        with pytest.raises(UserError, match=match):
            sd15.generate("a zkx in qwv style", specs, Tara(**settings), steps=1, **COMMON)
    alone = sd15.generate("a zkx", specs[:1], Tara(fuse=True, self_attention="cond"), steps=1, **COMMON)
    assert alone.method["regions"] == "none"
