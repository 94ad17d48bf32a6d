"""Training AutoLoRA's gates (loracompose.training.gates): checkpoints, exact resuming, the trained gates at
inference, bad settings (tiny models, CPU)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from helpers import assert_one_line_user_errors
from loracompose import AutoLoRA, LoraSpec, Merge
from loracompose.training.gates import GateTrainingSettings, train_gates

COMMON = dict(show_progress=False, output_type="latent", append_triggers=False)
PROMPT = "a zkx in qwv style"


def test_train_gates_writes_loadable_gates_and_resumes(tiny_sd15_dir, sd15, sd15_lora_files, tmp_path):
    def settings(out, steps, **extra):
        return GateTrainingSettings(str(tiny_sd15_dir), sd15_lora_files, out, steps=steps, checkpoint_every=2,
                                    showcase_steps=1, learning_rate=1e-2, resolution=32, show_progress=False,
                                    **extra)

    straight = train_gates(settings(tmp_path / "a.safetensors", 4))
    assert len(straight.history) == 4 and {"loss", "mse", "hinge"} <= set(straight.history[-1])
    assert sorted(path.name for path in straight.work_dir.iterdir()) == ["showcase", "step-000002", "step-000004"]
    train_gates(settings(tmp_path / "b.safetensors", 2, work_dir=tmp_path / "b-work"))
    resumed = train_gates(settings(tmp_path / "b.safetensors", 4, work_dir=tmp_path / "b-work", resume=True))
    assert resumed.resumed_from == 2
    trained, again = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert trained.keys() == again.keys() and len(trained) == 5 * 48
    for key, value in trained.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6)
    specs = [LoraSpec(path) for path in sd15_lora_files]
    merged = sd15.generate(PROMPT, specs, Merge(), steps=2, **COMMON)
    gated = sd15.generate(PROMPT, specs, AutoLoRA(gates=str(straight.path)), steps=2, **COMMON)
    assert (gated.latents - merged.latents).abs().max() > 1e-5, "trained gates are no longer the plain sum"


def test_bad_gate_training_settings_are_one_line_user_errors(sd15_lora_files, tmp_path):
    out = tmp_path / "g.safetensors"
    assert_one_line_user_errors([
        (lambda: train_gates(GateTrainingSettings("m", sd15_lora_files, out, variant="x")), "variant"),
        (lambda: train_gates(GateTrainingSettings("m", sd15_lora_files, out, caption_dropout=1)), "--caption-dropout"),
    ])
