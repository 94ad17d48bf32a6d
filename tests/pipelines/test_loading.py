"""load_pipeline: folders, hub ids, single-file checkpoints, and their errors (offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from loracompose import UserError, load_pipeline
from loracompose.pipelines import LoraComposeSDPipeline, LoraComposeSDXLPipeline
from loracompose.pipelines.loading import SDXL_CHECKPOINT_KEY


def test_folders_load_as_the_right_pipeline(tiny_sd15_dir, tiny_sdxl_dir):
    assert type(load_pipeline(tiny_sd15_dir)) is LoraComposeSDPipeline
    assert type(load_pipeline(tiny_sdxl_dir)) is LoraComposeSDXLPipeline


def test_loaded_pipeline_still_works_as_plain_diffusers(tiny_sd15_dir):
    pipe = load_pipeline(tiny_sd15_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not be fetched from the hub"):
        load_pipeline("nobody-here/no-such-model-xyz")


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickled_checkpoints_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not read")
    with pytest.raises(UserError, match="pickled"):
        load_pipeline(path)


def test_broken_single_file_is_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="truncated or not a safetensors"):
        load_pipeline(path)


@pytest.mark.parametrize("sdxl", [False, True])
def test_single_file_offline_without_config_names_the_fix(tmp_path, monkeypatch, sdxl):
    """The architecture is detected from the keys; without a config offline the error says what to pass."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "checkpoint.safetensors"
    key = SDXL_CHECKPOINT_KEY if sdxl else "model.diffusion_model.input_blocks.0.0.weight"
    save_file({key: torch.zeros(4)}, str(path))
    calls = []
    for cls in (LoraComposeSDPipeline, LoraComposeSDXLPipeline):
        original = cls.from_single_file.__func__
        monkeypatch.setattr(cls, "from_single_file", classmethod(
            lambda c, *a, _orig=original, **k: calls.append(c) or _orig(c, *a, **k)))
    with pytest.raises(UserError, match="pass --config"):
        load_pipeline(path)
    assert calls == [LoraComposeSDXLPipeline if sdxl else LoraComposeSDPipeline]


def test_missing_local_paths_are_not_sent_to_the_hub(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_pipeline(tmp_path / "nowhere")
    with pytest.raises(UserError, match="not found"):
        load_pipeline("./relative/model")
