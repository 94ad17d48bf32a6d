"""TARA training (loracompose.training.tara): losses, the saved file, resuming, bad inputs and the CLI (tiny
models, CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from PIL import Image, ImageDraw
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from loracompose import LoraSpec, Tara, UserError
from loracompose.cli.main import main
from loracompose.lora import inspect_lora
from loracompose.methods.tara import TARA_TOKEN_KEY, is_tara_trained
from loracompose.pipelines.compose_pipeline import quiet_loading
from loracompose.tokens import pipeline_tokenizers
from loracompose.attention.lora_deltas import token_mask
import loracompose.training.tara as tara_training
from loracompose.tokens import trigger_positions
from loracompose.training.tara import (TaraObjective, TaraTrainingSettings, caption_tokens, class_keys,
                                      key_alignment_loss, train_tara)
from loracompose.training.trainer import LoraTrainingSettings, batch_indices

COMMON = dict(show_progress=False, output_type="latent", append_triggers=False)

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


@pytest.mark.parametrize("caption, class_context", [
    ("a photo of zkx teddy bear", "a photo of zkx teddy bear"),  # the class word in the caption (the paper's)
    ("a zkx on the grass", "a teddy bear on the grass"),  # no class word: it stands in for the rare word
])
def test_alignment_loss_equals_its_formula(sd15, trained, caption, class_context):
    with quiet_loading():
        sd15.load_lora_weights(str(trained.path), adapter_name="aligned")
    try:
        found = caption_tokens(pipeline_tokenizers(sd15), caption, "zkx", "teddy bear")
        assert found.class_caption == class_context
        rare, classes = found.rare, found.classes
        assert len(rare) == 2 and len(classes) == 2, "multi-token rare word and class word"
        with torch.no_grad():
            context, _ = sd15.encode_prompt(caption, "cpu", 1, False)
            class_states, _ = sd15.encode_prompt(class_context, "cpu", 1, False)
            attn2 = [module for name, module in sd15.unet.named_modules() if name.endswith("attn2")]
            targets = class_keys(attn2, class_states, token_mask(classes)[None])
            loss = key_alignment_loss(attn2, context, token_mask(rare)[None], targets, "aligned")
            per_layer = []
            for attn in attn2:
                layer = attn.to_k
                weight, a, b = layer.base_layer.weight, layer.lora_A["aligned"].weight, layer.lora_B["aligned"].weight
                scale = layer.scaling["aligned"]
                class_key = sum(weight @ class_states[0, k] for k in classes) / len(classes)
                distances = [((weight + scale * b @ a) @ context[0, j] - class_key).abs().mean() for j in rare]
                per_layer.append(sum(distances) / len(distances))
            expected = sum(per_layer) / len(per_layer)
        assert len(attn2) > 1 and layer.scaling["aligned"] == pytest.approx(32 / 8)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    finally:
        with quiet_loading():
            sd15.delete_adapters("aligned")


CAPTIONS = {"shape0": "a zkx", "shape1": "a red ball on the left and a zkx on the right",
            "shape2": "a zkx teddy bear on the grass", "shape3": None}  # None: no caption file


@pytest.fixture(scope="module")
def captioned_folder(image_folder, tmp_path_factory) -> Path:
    """The four images, three with caption files that put the rare word at different positions."""
    folder = tmp_path_factory.mktemp("tara-captions")
    for stem, caption in CAPTIONS.items():
        shutil.copy(image_folder / f"{stem}.png", folder / f"{stem}.png")
        if caption:
            (folder / f"{stem}.txt").write_text(caption + "\n")
    return folder


class RecordingTara(TaraObjective):
    """TARA's objective, recording each batch's images and the token masks set for it."""

    instances: ClassVar[list[RecordingTara]] = []

    def __post_init__(self) -> None:
        super().__post_init__()
        self.batches: list[tuple[list[int], torch.Tensor]] = []
        RecordingTara.instances.append(self)

    def start_batch(self, model, indices) -> None:
        super().start_batch(model, indices)
        self.batches.append((list(indices), self._token_masks.masks[model.adapter].clone()))


def test_masks_and_alignment_follow_each_image_caption(sd15, tiny_sd15_dir, captioned_folder, tmp_path,
                                                       monkeypatch):
    monkeypatch.setattr(tara_training, "TaraObjective", RecordingTara)
    train_tara(tara_settings(tiny_sd15_dir, captioned_folder, tmp_path / "c.safetensors", steps=4, batch_size=2))
    objective = RecordingTara.instances[-1]
    captions = [CAPTIONS[f"shape{index}"] or "a photo of zkx teddy bear" for index in range(4)]
    tokenizers = pipeline_tokenizers(sd15)
    assert [indices for indices, _ in objective.batches] == [batch_indices(step, 2, 4, 0) for step in range(4)]
    for indices, masks in objective.batches:
        expected = torch.stack([trigger_positions(tokenizers, captions[i], ["zkx"]).mask() for i in indices])
        torch.testing.assert_close(masks.cpu(), expected, rtol=0, atol=0)
    assert len({tuple(trigger_positions(tokenizers, caption, ["zkx"]).positions) for caption in captions}) == 3
    class_captions = sorted(found.class_caption for found in objective.caption_tokens)
    assert class_captions == sorted(["a teddy bear", "a red ball on the left and a teddy bear on the right",
                                     "a zkx teddy bear on the grass", "a photo of zkx teddy bear"])


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


def test_sdxl_training_runs_and_loads(tiny_sdxl_dir, sdxl, image_folder, tmp_path):
    result = train_tara(tara_settings(tiny_sdxl_dir, image_folder, tmp_path / "xl.safetensors", steps=2))
    lora = inspect_lora(LoraSpec(result.path))
    assert lora.architecture == "sdxl" and lora.metadata["loracompose.rank"] == "4"
    assert float(lora.metadata["loracompose.alpha"]) == 4.0, "SDXL default: alpha = rank (scale 1)"
    generated = sdxl.generate("a zkx", [LoraSpec(result.path, name="xl_zkx")], Tara(), steps=1, **COMMON)
    assert generated.stats.unet_calls == 1


@pytest.fixture(scope="module")
def prior_folder(image_folder, tmp_path_factory) -> Path:
    """Two regularisation images with captions that do not name the concept."""
    folder = tmp_path_factory.mktemp("tara-prior")
    for index, caption in enumerate(["a green ball", "a blue box on the left"]):
        shutil.copy(image_folder / f"shape{index + 2}.png", folder / f"prior{index}.png")
        (folder / f"prior{index}.txt").write_text(caption + "\n")
    return folder


def test_prior_images_get_no_mask_and_no_alignment(sd15, tiny_sd15_dir, captioned_folder, prior_folder, tmp_path,
                                                   monkeypatch):
    monkeypatch.setattr(tara_training, "TaraObjective", RecordingTara)
    result = train_tara(tara_settings(tiny_sd15_dir, captioned_folder, tmp_path / "p.safetensors", steps=3,
                                      batch_size=3, prior_images=prior_folder))
    objective = RecordingTara.instances[-1]
    assert json.loads(inspect_lora(LoraSpec(result.path)).metadata["loracompose.training"])["images"] == 6
    seen = {index for indices, _ in objective.batches for index in indices}
    assert {4, 5} & seen, "the regularisation images (after the four training images) are drawn"
    for indices, masks in objective.batches:
        for index, mask in zip(indices, masks):
            assert (mask.sum() == 0) == (index >= 4)
    with quiet_loading():
        sd15.load_lora_weights(str(result.path), adapter_name="prior")
    try:
        attn2 = [module for name, module in sd15.unet.named_modules() if name.endswith("attn2")]
        with torch.no_grad():
            context = torch.cat([sd15.encode_prompt(text, "cpu", 1, False)[0] for text in ("a zkx", "a green ball")])
            class_states = sd15.encode_prompt("a teddy bear", "cpu", 1, False)[0]
            classes = caption_tokens(pipeline_tokenizers(sd15), "a zkx", "zkx", "teddy bear")
            targets = class_keys(attn2, class_states, token_mask(classes.classes)[None])
            alone = key_alignment_loss(attn2, context[:1], token_mask(classes.rare)[None], targets, "prior")
            rare_mask = torch.stack([token_mask(classes.rare), torch.zeros(77)])
            padded = [torch.cat([target, torch.zeros_like(target)]) for target in targets]
            with_prior = key_alignment_loss(attn2, context, rare_mask, padded, "prior")
        torch.testing.assert_close(with_prior, alone, rtol=1e-6, atol=1e-7)
    finally:
        with quiet_loading():
            sd15.delete_adapters("prior")
    (prior_folder / "prior0.txt").rename(tmp_path / "moved.txt")
    try:
        with pytest.raises(UserError, match=r"--prior-images images need prior0\.txt"):
            train_tara(tara_settings(tiny_sd15_dir, captioned_folder, tmp_path / "q.safetensors", steps=1,
                                     prior_images=prior_folder))
    finally:
        (tmp_path / "moved.txt").rename(prior_folder / "prior0.txt")


def test_cross_attention_kv_targets_train_only_those_layers(sd15, tiny_sd15_dir, image_folder, tmp_path):
    result = train_tara(tara_settings(tiny_sd15_dir, image_folder, tmp_path / "kv.safetensors", steps=1,
                                      targets=("attn2.to_k", "attn2.to_v")))
    layers = {key.rsplit(".lora_", 1)[0] for key in result.lora_state}
    expected = {f"{name}.{projection}" for name, module in sd15.unet.named_modules() if name.endswith("attn2")
                for projection in ("to_k", "to_v")}
    assert layers == expected and len(expected) > 2
    recipe = json.loads(inspect_lora(LoraSpec(result.path)).metadata["loracompose.training"])
    assert recipe["targets"] == ["attn2.to_k", "attn2.to_v"]
    with pytest.raises(UserError, match="--targets to_nothing"):
        train_tara(tara_settings(tiny_sd15_dir, image_folder, tmp_path / "none.safetensors", steps=1,
                                 targets=("to_nothing",)))


def test_trainer_bad_inputs_are_user_errors(tiny_sd15_dir, image_folder, tmp_path):
    with pytest.raises(UserError, match="--images"):
        train_tara(tara_settings(tiny_sd15_dir, tmp_path / "missing", tmp_path / "x.safetensors", steps=1))
    with pytest.raises(UserError, match="not in the training prompt"):
        train_tara(tara_settings(tiny_sd15_dir, image_folder, tmp_path / "x.safetensors", steps=1,
                                 prompt="a photo of a teddy bear"))
    with pytest.raises(UserError, match="fp16"):
        train_tara(tara_settings(tiny_sd15_dir, image_folder, tmp_path / "x.safetensors", steps=1, dtype="fp16"))
    with pytest.raises(UserError, match=r"\.safetensors"):
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
