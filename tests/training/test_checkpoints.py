"""Checkpoints shared by every trainer (loracompose.training.checkpoints): the one settings type, when
checkpoints are due, refusals, exact resuming, optimizer state through safetensors."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from loracompose import UserError
from loracompose.cli.main import main
from loracompose.toyworld.train import ToyWorldTrainingSettings
from loracompose.training.checkpoints import (CheckpointRecipe, CheckpointSettings, TrainingRun, checkpoint_dirs,
                                              flatten_optimizer_state, resume_state, run_steps, save_checkpoint,
                                              unflatten_optimizer_state)
from loracompose.training.gates import GateTrainingResult, GateTrainingSettings
from loracompose.training.retriever import RetrieverTrainingResult, RetrieverTrainingSettings
from loracompose.training.tara import TaraTrainingSettings
from loracompose.training.trainer import LoraTrainingSettings, TrainingResult


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


def trainer_settings(tmp_path: Path) -> dict[str, CheckpointSettings]:
    """One settings object of every trainer, with their defaults."""
    out = tmp_path / "out.safetensors"
    training = LoraTrainingSettings(model="m", images=tmp_path, out=out)
    return {
        "lora": training,
        "tara": TaraTrainingSettings("zkx", "dog", training).training,
        "gates": GateTrainingSettings("m", [], out),
        "retriever": RetrieverTrainingSettings(tmp_path, out),
        "toyworld": ToyWorldTrainingSettings(tmp_path / "run"),
    }


def test_every_trainer_takes_the_one_checkpoint_settings_type(tmp_path: Path):
    settings = trainer_settings(tmp_path)
    assert all(isinstance(value, CheckpointSettings) for value in settings.values())
    assert {name: value.checkpoint_every for name, value in settings.items()} == {
        "lora": 250, "tara": 250, "gates": 250, "retriever": 500, "toyworld": 250}
    assert {value.work_dir for name, value in settings.items() if name != "toyworld"} == {
        tmp_path / "out.checkpoints"}
    assert settings["toyworld"].work_dir == tmp_path / "run" / "checkpoints"
    given = GateTrainingSettings("m", [], tmp_path / "g.safetensors", work_dir=str(tmp_path / "w"), keep_checkpoints=5)
    assert given.work_dir == tmp_path / "w" and given.keep_checkpoints == 5
    results = (TrainingResult, GateTrainingResult, RetrieverTrainingResult)
    assert all(issubclass(result, TrainingRun) for result in results)


def test_checkpoints_are_due_every_k_steps_and_at_the_end(tmp_path: Path):
    settings = GateTrainingSettings("m", [], tmp_path / "g.safetensors", checkpoint_every=4)
    assert [done for done in range(1, 11) if settings.checkpoint_due(done, 10)] == [4, 8, 10]


def test_checkpointing_refuses_bad_intervals_overwriting_and_resuming_nothing(tmp_path: Path):
    settings = RetrieverTrainingSettings(tmp_path, tmp_path / "r.safetensors", checkpoint_every=0)
    with pytest.raises(UserError, match="--checkpoint-every 0"):
        settings.check_checkpointing()
    with pytest.raises(UserError, match="--resume: no checkpoint"):
        RetrieverTrainingSettings(tmp_path, tmp_path / "r.safetensors", resume=True).check_checkpointing()
    fresh = RetrieverTrainingSettings(tmp_path, tmp_path / "r.safetensors")
    fresh.check_checkpointing()
    assert fresh.latest_checkpoint() is None
    trainable = {"w": torch.nn.Parameter(torch.ones(2))}
    optimizer = torch.optim.AdamW(trainable.values())
    for step in (1, 2, 3):
        save_checkpoint(trainable, optimizer, Recipe(seed=0), fresh, step, [{"step": step}])
    assert [path.name for path in checkpoint_dirs(fresh.work_dir)] == ["step-000002", "step-000003"], "keeps 2"
    with pytest.raises(UserError, match=r"already holds checkpoints; pass --resume .* new --work-dir"):
        fresh.check_checkpointing()
    resumed = RetrieverTrainingSettings(tmp_path, tmp_path / "r.safetensors", resume=True)
    resumed.check_checkpointing()
    assert resumed.latest_checkpoint().name == "step-000003"


@dataclass(frozen=True)
class Recipe(CheckpointRecipe):
    seed: int


def test_resuming_restores_weights_optimizer_and_history_and_refuses_another_recipe(tmp_path: Path):
    def run(settings: CheckpointSettings, recipe: Recipe, seed: int = 0):
        torch.manual_seed(seed)
        trainable = {"w": torch.nn.Parameter(torch.randn(3))}
        optimizer = torch.optim.AdamW(trainable.values(), lr=0.1)
        start, history, _ = resume_state(trainable, optimizer, recipe, settings)

        def step(index: int) -> dict[str, float]:
            loss = (trainable["w"] - index).square().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return {"step": index + 1, "loss": float(loss.detach())}

        run_steps(settings, start, 6, history, step,
                  lambda done, _seconds: save_checkpoint(trainable, optimizer, recipe, settings, done, history),
                  desc="test", show_progress=False)
        return trainable["w"].detach(), history, start

    out = tmp_path / "x.safetensors"
    straight, straight_history, _ = run(GateTrainingSettings("m", [], tmp_path / "a.safetensors", checkpoint_every=3),
                                        Recipe(seed=0))
    first = GateTrainingSettings("m", [], out, checkpoint_every=3)
    run(first, Recipe(seed=0))
    with pytest.raises(UserError, match="other settings \\(seed\\)"):
        run(GateTrainingSettings("m", [], out, checkpoint_every=3, resume=True), Recipe(seed=1))
    shutil.rmtree(first.work_dir / "step-000006")  # as if the first run had been stopped after step 3
    resumed, history, start = run(GateTrainingSettings("m", [], out, checkpoint_every=3, resume=True), Recipe(seed=0),
                                  seed=99)
    assert start == 3 and history == straight_history
    assert torch.equal(resumed, straight)


@pytest.mark.parametrize("command", [
    ["train-lora", "--model", "m", "--images", "i", "--out", "{tmp}/x.safetensors"],
    ["train-tara", "--model", "m", "--images", "i", "--out", "{tmp}/x.safetensors", "--token", "zkx",
     "--class-word", "dog"],
    ["train-gates", "--model", "m", "--lora", "a", "--lora", "b", "--out", "{tmp}/x.safetensors"],
    ["train-retriever", "--library", "l", "--model", "m", "--out", "{tmp}/x.safetensors"],
    ["train-toyworld", "--run-dir", "{tmp}/run", "--architecture", "tiny"],
])
def test_every_training_command_takes_the_checkpoint_flags(command, tmp_path, capsys):
    args = [arg.format(tmp=tmp_path) for arg in command]
    assert main([*args, "--checkpoint-every", "0", "--keep-checkpoints", "3", "--quiet"]) == 2
    assert "--checkpoint-every 0: use a positive integer" in capsys.readouterr().err


def test_keep_checkpoints_reaches_the_trainer(tmp_path):
    run = tmp_path / "run"
    assert main(["train-toyworld", "--run-dir", str(run), "--architecture", "tiny", "--batch-size", "2", "--steps", "3",
                 "--checkpoint-every", "1", "--keep-checkpoints", "1", "--threads", "1", "--quiet"]) == 0
    assert [path.name for path in checkpoint_dirs(run / "checkpoints")] == ["step-000003"]
