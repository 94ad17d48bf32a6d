"""The toy-world base model's trainer (loracompose.toyworld.train): one step, exact resuming, refusals, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loracompose.errors import UserError
from loracompose.pipelines import load_pipeline
from loracompose.toyworld.train import (ToyWorldTrainingSettings, build_trainer, generator, latest_checkpoint,
                                        train_toyworld, training_batch)


def _settings(run_dir: Path, steps: int, **extra) -> ToyWorldTrainingSettings:
    options = dict(steps=steps, batch_size=4, decoder_batch_size=2, architecture="tiny", checkpoint_every=1,
                   keep_checkpoints=5, warmup_steps=1, show_progress=False, export=False)
    return ToyWorldTrainingSettings(run_dir, **{**options, **extra})


def test_one_training_step_lowers_the_loss_on_its_batch(tmp_path: Path) -> None:
    trainer = build_trainer(_settings(tmp_path, 1))
    pixels, captions = training_batch(trainer.settings, 0)

    def loss() -> float:
        with torch.no_grad():
            return float(trainer.diffusion_loss(pixels, captions, generator(0, "noise", 0)))

    before = loss()
    trainer.step(0)
    assert loss() < before


def test_resumed_training_continues_identically(tmp_path: Path) -> None:
    straight = train_toyworld(_settings(tmp_path / "straight", 3))
    train_toyworld(_settings(tmp_path / "resumed", 2))
    resumed = train_toyworld(_settings(tmp_path / "resumed", 3, resume=True, export=True))
    assert resumed.resumed_from == 2 and resumed.steps == 3
    assert [row["loss"] for row in resumed.history] == [row["loss"] for row in straight.history]
    for name in ("weights.safetensors", "ema.safetensors", "optimizer-model.safetensors"):
        a, b = load_file(straight.checkpoint / name), load_file(resumed.checkpoint / name)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000003"
    assert load_pipeline(resumed.model_dir, device="cpu").unet.config.in_channels == 12


def test_training_refuses_to_overwrite_or_resume_nothing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no checkpoint"):
        train_toyworld(_settings(tmp_path / "empty", 1, resume=True))
    train_toyworld(_settings(tmp_path / "run", 1))
    with pytest.raises(UserError, match="already holds checkpoints"):
        train_toyworld(_settings(tmp_path / "run", 2))
    with pytest.raises(UserError, match="architecture"):
        train_toyworld(_settings(tmp_path / "other", 1, architecture="huge"))


def test_cli_trains_resumes_and_exports_a_tiny_toyworld(tmp_path, capsys) -> None:
    from loracompose.cli.main import main

    run = tmp_path / "run"
    args = ["train-toyworld", "--run-dir", str(run), "--architecture", "tiny", "--batch-size", "2",
            "--checkpoint-every", "1", "--threads", "1", "--quiet"]
    assert main([*args, "--steps", "1"]) == 0
    assert main([*args, "--steps", "2"]) == 2  # checkpoints exist: continuing must be asked for
    assert "resume" in capsys.readouterr().err
    assert main([*args, "--steps", "2", "--resume"]) == 0
    assert latest_checkpoint(run).name.endswith("2")
    capsys.readouterr()
    assert main(["export-toyworld", str(run), "--out", str(tmp_path / "model")]) == 0
    pipe = load_pipeline(capsys.readouterr().out.strip())
    assert pipe.unet.config.in_channels == 12
    assert main(["export-toyworld", str(tmp_path / "empty"), "--out", str(tmp_path / "m2")]) == 2
