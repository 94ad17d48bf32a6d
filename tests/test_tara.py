"""TARA: trigger-token positions, token-masked K/V composition, and the TARA trainer (tiny models, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loracompose import METHODS, LoraSpec, Merge, Tara, UserError
from loracompose.cli.main import main
from loracompose.lora import inspect_lora
from loracompose.pipelines.compose_pipeline import quiet_loading
from loracompose.methods.tara import (
    TARA_TOKEN_KEY,
    TaraTrainingSettings,
    cfg_row_masks,
    is_tara_trained,
    key_alignment_loss,
    rare_and_class_positions,
    train_tara,
)
from loracompose.tokens import pipeline_tokenizers, trigger_positions
from loracompose.training.trainer import LoraTrainingSettings, flatten_optimizer_state, unflatten_optimizer_state

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
    ones = first_prediction(pipe, specs, AllOnesTara(), negative_prompt="blurry")
    torch.testing.assert_close(ones.cond, merged.cond, rtol=1e-5, atol=1e-5)
    # the unconditional half never gets K/V deltas, so it differs from Merge's
    assert (ones.uncond - merged.uncond).abs().max() > 1e-3


def test_all_ones_masks_without_cfg_equal_merge_whole_run(sd15, sd15_lora_files):
    specs = [LoraSpec(path) for path in sd15_lora_files]
    merged = sd15.generate("a zkx in qwv style", specs, Merge(), steps=2, guidance_scale=1.0, **COMMON)
    ones = sd15.generate("a zkx in qwv style", specs, AllOnesTara(), steps=2, guidance_scale=1.0, **COMMON)
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
    with pytest.warns(UserWarning, match="kvonly"):
        both = sd15.generate("a zkx", [character, LoraSpec(kv_only_lora)], Tara(missing_trigger="warn"),
                             steps=2, **COMMON)
    alone = sd15.generate("a zkx", [character], Tara(), steps=2, **COMMON)
    torch.testing.assert_close(both.latents, alone.latents, rtol=0, atol=1e-6)
    present = sd15.generate("a zkx, qwv", [character, LoraSpec(kv_only_lora)], Tara(), steps=2, **COMMON)
    again = sd15.generate("a zkx, qwv", [character], Tara(), steps=2, **COMMON)
    assert (present.latents - again.latents).abs().max() > 1e-3


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
    keep = first_prediction(sd15, [full], RecordedTara(), prompt="a zkx")
    off = first_prediction(sd15, [full], RecordedTara(self_attention="off"), prompt="a zkx")
    cond = first_prediction(sd15, [full], RecordedTara(self_attention="cond"), prompt="a zkx")
    without = first_prediction(sd15, [no_attn1], RecordedTara(), prompt="a zkx")
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
    unfused = sd15.generate("a zkx in qwv style", specs, Tara(self_attention=self_attention), steps=2, **COMMON)
    fused = sd15.generate("a zkx in qwv style", specs, Tara(self_attention=self_attention, fuse=True), steps=2,
                          **COMMON)
    torch.testing.assert_close(fused.latents, unfused.latents, rtol=0, atol=1e-4)  # float rounding of W + dW
    after = sd15.unet.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[key], value) for key, value in weights.items())
    assert not any(module.merged for module in sd15.unet.modules() if isinstance(module, LoraLayer))


@pytest.mark.parametrize("guidance,rows_per_step", [(7.5, 4), (1.0, 2)])
def test_unet_calls_and_rows(sd15, sd15_lora_files, guidance, rows_per_step):
    result = sd15.generate("a zkx in qwv style", [LoraSpec(path) for path in sd15_lora_files], Tara(), steps=3,
                           num_images=2, guidance_scale=guidance, **COMMON)
    assert result.stats.unet_calls == 3
    assert result.stats.unet_rows == 3 * rows_per_step
    assert result.method["name"] == "tara"


# ------------------------------------------------------------------------------------ trainer


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Four small PNGs of simple coloured shapes."""
    folder = tmp_path_factory.mktemp("tara-images")
    shapes = [("ellipse", "red"), ("rectangle", "blue"), ("ellipse", "green"), ("rectangle", "orange")]
    for index, (shape, colour) in enumerate(shapes):
        image = Image.new("RGB", (80, 64), "white")
        getattr(ImageDraw.Draw(image), shape)((8 + 4 * index, 8, 60, 52), fill=colour)
        image.save(folder / f"shape{index}.png")
    return folder


def tara_settings(model_dir, images, out, **training) -> TaraTrainingSettings:
    values = dict(model=str(model_dir), images=images, out=out, show_progress=False, probe_timesteps=0) | training
    return TaraTrainingSettings("zkx", "teddy bear", LoraTrainingSettings(**values))


@pytest.fixture(scope="module")
def trained(tiny_sd15_dir, image_folder, tmp_path_factory):
    """50 TARA steps on the tiny SD1.5 model (multi-token rare word and class word)."""
    out = tmp_path_factory.mktemp("tara-train") / "zkx.safetensors"
    return train_tara(tara_settings(tiny_sd15_dir, image_folder, out, steps=50, learning_rate=1e-3,
                                    checkpoint_every=25, probe_timesteps=4))


def test_training_loss_decreases(trained):
    assert trained.steps == 50 and len(trained.history) == 50
    before, after = trained.probe_losses[0], trained.probe_losses[50]
    assert after["loss"] < before["loss"]
    assert after["mse"] < before["mse"]
    assert after["align"] < 0.5 * before["align"]
    assert {"loss", "mse", "align", "focus"} <= set(trained.history[-1])
    assert [path.name for path in sorted(trained.work_dir.iterdir())] == ["step-000025", "step-000050"]


def test_alignment_loss_equals_its_formula(sd15, trained):
    with quiet_loading():
        sd15.load_lora_weights(str(trained.path), adapter_name="aligned")
    try:
        prompt = "a photo of zkx teddy bear"
        rare, classes = rare_and_class_positions(pipeline_tokenizers(sd15), prompt, "zkx", "teddy bear")
        assert len(rare) == 2 and len(classes) == 2, "multi-token rare word and class word"
        with torch.no_grad():
            context, _ = sd15.encode_prompt(prompt, "cpu", 1, False)
            attn2 = [module for name, module in sd15.unet.named_modules() if name.endswith("attn2")]
            loss = key_alignment_loss(attn2, context, rare, classes, "aligned")
            per_layer = []
            for attn in attn2:
                layer = attn.to_k
                weight, a, b = layer.base_layer.weight, layer.lora_A["aligned"].weight, layer.lora_B["aligned"].weight
                scale = layer.scaling["aligned"]
                class_key = sum(weight @ context[0, k] for k in classes) / len(classes)
                distances = [((weight + scale * b @ a) @ context[0, j] - class_key).abs().mean() for j in rare]
                per_layer.append(sum(distances) / len(distances))
            expected = sum(per_layer) / len(per_layer)
        assert len(attn2) > 1 and layer.scaling["aligned"] == pytest.approx(32 / 8)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    finally:
        with quiet_loading():
            sd15.delete_adapters("aligned")


def test_saved_lora_loads_back_exactly(sd15, trained):
    lora = inspect_lora(LoraSpec(trained.path))
    assert lora.trigger_words == ("zkx",) and lora.architecture == "sd15" and is_tara_trained(lora)
    assert lora.metadata[TARA_TOKEN_KEY] == "zkx" and lora.metadata["loracompose.tara_class"] == "teddy bear"
    assert (lora.metadata["loracompose.rank"], float(lora.metadata["loracompose.alpha"])) == ("8", 32.0)
    assert json.loads(lora.metadata["loracompose.training"])["steps"] == 50
    result = sd15.generate("a zkx on the grass", [LoraSpec(trained.path, name="trained_zkx")], Tara(),
                           steps=1, **COMMON)
    assert result.stats.unet_calls == 1
    loaded = get_peft_model_state_dict(sd15.unet, adapter_name="trained_zkx")
    assert set(loaded) == set(trained.lora_state)
    assert all(torch.equal(loaded[key], trained.lora_state[key]) for key in loaded)
    scales = {module.scaling["trained_zkx"] for module in sd15.unet.modules()
              if isinstance(module, LoraLayer) and "trained_zkx" in module.scaling}
    assert scales == {32 / 8}, "alpha/rank is applied at inference"


def test_resume_continues_the_same_run(tiny_sd15_dir, image_folder, tmp_path):
    straight = train_tara(tara_settings(tiny_sd15_dir, image_folder, tmp_path / "a.safetensors", steps=10,
                                        checkpoint_every=5))
    first = tmp_path / "b.safetensors"
    train_tara(tara_settings(tiny_sd15_dir, image_folder, first, steps=5, checkpoint_every=5))
    with pytest.raises(UserError, match="--resume"):
        train_tara(tara_settings(tiny_sd15_dir, image_folder, first, steps=10, checkpoint_every=5))
    with pytest.raises(UserError, match="other settings"):
        train_tara(tara_settings(tiny_sd15_dir, image_folder, first, steps=10, resume=True, learning_rate=3e-4))
    resumed = train_tara(tara_settings(tiny_sd15_dir, image_folder, first, steps=10, checkpoint_every=5, resume=True))
    assert resumed.resumed_from == 5 and len(resumed.history) == 10
    for key, value in straight.lora_state.items():
        torch.testing.assert_close(resumed.lora_state[key], value, rtol=0, atol=1e-6)
    losses = [row["loss"] for row in straight.history]
    assert [row["loss"] for row in resumed.history] == pytest.approx(losses, abs=1e-6)


def test_optimizer_state_round_trips_through_safetensors():
    weights = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(weights, lr=1e-2)
    (weights[0].sum() + weights[1].square().sum()).backward()
    optimizer.step()
    tensors, metadata = flatten_optimizer_state(optimizer, ["a", "b"])
    assert all(isinstance(value, str) for value in metadata.values())
    fresh = torch.optim.AdamW([torch.nn.Parameter(w.detach().clone()) for w in weights], lr=1e-2)
    fresh.load_state_dict(unflatten_optimizer_state(tensors, metadata, ["a", "b"]))
    for index in (0, 1):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state_dict()["state"][index][key], optimizer.state_dict()["state"][index][key])
    with pytest.raises(UserError, match="other LoRA layers"):
        unflatten_optimizer_state(tensors, metadata, ["b", "a"])


def test_sdxl_training_runs_and_loads(tiny_sdxl_dir, sdxl, image_folder, tmp_path):
    result = train_tara(tara_settings(tiny_sdxl_dir, image_folder, tmp_path / "xl.safetensors", steps=2))
    lora = inspect_lora(LoraSpec(result.path))
    assert lora.architecture == "sdxl" and lora.metadata["loracompose.rank"] == "4"
    assert float(lora.metadata["loracompose.alpha"]) == 4.0, "SDXL default: alpha = rank (scale 1)"
    generated = sdxl.generate("a zkx", [LoraSpec(result.path, name="xl_zkx")], Tara(), steps=1, **COMMON)
    assert generated.stats.unet_calls == 1


def test_trainer_bad_inputs_are_user_errors(tiny_sd15_dir, image_folder, tmp_path):
    with pytest.raises(UserError, match="--images"):
        train_tara(tara_settings(tiny_sd15_dir, tmp_path / "missing", tmp_path / "x.safetensors", steps=1))
    with pytest.raises(UserError, match="not in the training prompt"):
        train_tara(tara_settings(tiny_sd15_dir, image_folder, tmp_path / "x.safetensors", steps=1,
                                 prompt="a photo of a teddy bear"))
    with pytest.raises(UserError, match="fp16"):
        train_tara(tara_settings(tiny_sd15_dir, image_folder, tmp_path / "x.safetensors", steps=1, dtype="fp16"))
    with pytest.raises(UserError, match=".safetensors"):
        train_tara(tara_settings(tiny_sd15_dir, image_folder, tmp_path / "x.pt", steps=1))
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_train_tara_then_generate(tiny_sd15_dir, image_folder, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    code = main(["train-tara", "--model", str(tiny_sd15_dir), "--images", str(image_folder), "--token", "zkx",
                 "--class-word", "dog", "--out", str(out), "--steps", "2", "--probe-timesteps", "0", "--quiet"])
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    code = main(["generate", "--model", str(tiny_sd15_dir), "--prompt", "a zkx", "--lora", str(out), "--method",
                 "tara", "--tara-self-attention", "cond", "--steps", "1", "--out", str(tmp_path / "images"), "--quiet"])
    assert code == 0
    record = json.loads((tmp_path / "images" / "tara-0.json").read_text())
    assert record["method_settings"]["self_attention"] == "cond" and record["stats"]["unet_calls"] == 1
    code = main(["train-tara", "--model", str(tiny_sd15_dir), "--images", str(tmp_path / "none"), "--token", "zkx",
                 "--class-word", "dog", "--out", str(tmp_path / "y.safetensors"), "--quiet"])
    assert code == 2 and "--images" in capsys.readouterr().err


def test_caption_files_give_each_image_its_own_text_states(tmp_path, tiny_sd15_dir) -> None:
    """Per-image captions (NAME.txt) are encoded exactly as generate encodes a prompt, one per image;
    images without one take --prompt."""
    from PIL import Image

    from loracompose.pipelines import load_pipeline
    from loracompose.training.trainer import LoraTrainingSettings, PlainObjective, PLAIN_DEFAULTS, build_training_model

    images = tmp_path / "images"
    images.mkdir()
    for name, text in (("a", "a zkx dog"), ("b", None), ("c", "a qwv cat")):
        Image.new("RGB", (64, 64), (40, 90, 200)).save(images / f"{name}.png")
        if text:
            (images / f"{name}.txt").write_text(text + "\n")
    settings = LoraTrainingSettings(model=str(tiny_sd15_dir), images=images, out=tmp_path / "l.safetensors",
                                    prompt="a photo", device="cpu", show_progress=False)
    model, resolved, _ = build_training_model(settings, PLAIN_DEFAULTS, PlainObjective())
    assert resolved.captions == ("a zkx dog", "a photo", "a qwv cat")
    pipe = load_pipeline(tiny_sd15_dir, device="cpu")
    expected = [pipe.encode_prompt(text, "cpu", 1, False)[0][0] for text in resolved.captions]
    states = model.conditioning.states([2, 0, 1, 0])
    for row, index in enumerate([2, 0, 1, 0]):
        torch.testing.assert_close(states[row], expected[index])
