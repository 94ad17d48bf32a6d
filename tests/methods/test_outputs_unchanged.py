"""Every method's output on the tiny SD1.5 model against latents recorded before the engine redesign
(issue 18): the redesign must not change what any method computes.

The reference file ``tests/data/method_reference_latents.safetensors`` holds, per case below, the final
latents of one ``generate`` call (3 steps, fixed seed, two LoRAs). Regenerate it only for an intended
change of outputs: ``LORACOMPOSE_WRITE_REFERENCE=1 pytest tests/methods/test_outputs_unchanged.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loracompose import LoraSpec, load_pipeline
from loracompose.methods import METHODS
from loracompose.methods.autolora import GateSet, lora_layer_channels, save_gates

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "method_reference_latents.safetensors"
PROMPT = "a zkx cat and a qwv dog"
COMMON = dict(steps=3, guidance_scale=6.0, width=64, height=64, output_type="latent", show_progress=False)
# Float32: a refactoring that keeps the arithmetic gives the same bits, but another torch/diffusers/peft
# release may reorder sums (measured: up to 3e-5 on latents of magnitude ~20 after a fresh install, i.e.
# 1.5e-6 of the largest value). The tolerance is relative to each case's largest value; any real change
# of a method moves latents by 1e-2 of it or more.
RELATIVE_TOLERANCE = 1e-5

CLORA_AS_RECORDED = {"gate": "prediction", "mask_scores": "peak", "mask_threshold": 0.3, "min_map_side": 1,
                     "step_latent_side": 0, "schedule_steps": 0}
# (case, registry name, settings): every method, and the switches that take another code path.
CASES = [
    ("merge", "merge", {}),
    ("merge-mean", "merge", {"combine": "mean"}),
    ("merge-fuse", "merge", {"fuse": True}),
    ("switch", "switch", {"period": 1}),
    ("composite", "composite", {}),
    ("composite-sequential", "composite", {"batched": False, "mixing_weights": (3.0, 1.0)}),
    # Classes given for every LoRA: nothing to profile, the order is the one the categories gave when recorded.
    ("cmlora", "cmlora", {"cache_interval": 2, "frequency_classes": {"character": "high", "style": "high"}}),
    ("cmlora-sequential", "cmlora",
     {"cache_interval": 2, "batched": False, "frequency_classes": {"character": "high", "style": "low"}}),
    ("cmlora-switch", "cmlora-switch",
     {"period": 1, "phase_fraction": 0.3, "frequency_scores": {"character": 0.9, "style": 0.1}}),
    # CLoRA as recorded: the paper's noise fusion and mask rule, the deepest map level, nothing scaled.
    ("clora", "clora", {"iterative_steps": (0,), "extra_iterations": 1, "max_update_step": 2, **CLORA_AS_RECORDED}),
    ("clora-sequential", "clora",
     {"iterative_steps": (), "max_update_step": 1, "batched": False, **CLORA_AS_RECORDED}),
    # Explicit boxes: by default the one local LoRA here (the style is global) gets the whole image, = Merge.
    ("composer", "composer", {"boxes": ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)), "refine_with_globals": True}),
    ("composer-plain", "composer", {"boxes": ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)), "refine": False,
                                    "reinitialise": False, "checkpoint_refinement": False}),
    # TARA as recorded: the deltas that have no token on the whole image (issue 20 added region masks)
    # and a style LoRA's K/V at its trigger words (issue 20 gave global kinds every token).
    ("tara", "tara", {"untokened": "global", "global_kinds": "trigger"}),
    ("tara-fuse-cond", "tara", {"fuse": True, "self_attention": "cond", "untokened": "global",
                                "global_kinds": "trigger"}),
    ("tara-off", "tara", {"self_attention": "off", "untokened": "global", "global_kinds": "trigger"}),
    ("autolora-open", "autolora", {}),
    ("autolora-gated", "autolora", {"gates": "GATES"}),
]


def seeded_gates(pipe, names: list[str], path: Path) -> Path:
    """A gate file with random (seeded) gates for every LoRA layer: closed, open and in between."""
    gates = GateSet(lora_layer_channels(pipe.unet, names))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in gates.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return save_gates(gates, path)


def method_outputs(model_dir: Path, lora_files: list[Path], gates_path: Path) -> dict[str, torch.Tensor]:
    """The final latents of every case, each on a fresh pipeline."""
    specs = [LoraSpec(lora_files[0], 0.8), LoraSpec(lora_files[1], 1.0)]
    outputs = {}
    for case, name, settings in CASES:
        pipe = load_pipeline(model_dir)
        if settings.get("gates") == "GATES":
            pipe.prepare_loras(specs)
            settings = {**settings, "gates": str(seeded_gates(pipe, [path.stem for path in lora_files], gates_path))}
        result = pipe.generate(PROMPT, specs, METHODS[name](**settings), seed=11, num_images=2, **COMMON)
        outputs[case] = result.latents.detach().clone().contiguous()
    return outputs


def test_every_method_gives_the_recorded_latents(tiny_sd15_dir, sd15_lora_files, tmp_path):
    outputs = method_outputs(tiny_sd15_dir, sd15_lora_files, tmp_path / "gates.safetensors")
    if os.environ.get("LORACOMPOSE_WRITE_REFERENCE") == "1":
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        save_file(outputs, str(REFERENCE))
    reference = load_file(str(REFERENCE))
    assert set(reference) == {case for case, _, _ in CASES}
    for case, latents in outputs.items():
        assert latents.abs().max() > 0.1, case
        atol = RELATIVE_TOLERANCE * float(reference[case].abs().max())
        torch.testing.assert_close(latents, reference[case], atol=atol, rtol=0, msg=lambda m, case=case: f"{case}: {m}")
    distinct = {case: reference[case] for case in ("merge", "switch", "composite", "clora", "composer", "tara")}
    for case, latents in distinct.items():  # the cases differ, so a method silently running another fails
        others = [other for other in distinct if other != case and torch.allclose(latents, distinct[other], atol=1e-3)]
        assert not others, f"{case} equals {others}"
