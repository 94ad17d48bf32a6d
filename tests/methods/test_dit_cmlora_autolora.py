"""CMLoRA and AutoLoRA on FLUX.1 and SD3 (tiny DiTs with a few blocks, saved and loaded back): CMLoRA's
block cache (a shallow pass around a fresh cache equals the full pass; caching off equals a weighted
Composite; exact full/partial transformer call and row counts; batched equals sequential), its
frequency profiling on a DiT, and AutoLoRA's gated fusion on the transformer's LoRA layers (open gates
equal Merge bit for bit, a closed gate removes that LoRA from that layer, other models' gates refused)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import ShallowProbe, StepWeightedComposite, assert_one_line_user_errors, with_metadata
from loracompose import CMLoRA, LoraSpec, Merge, load_pipeline
from loracompose.assets.tiny import build_tiny_flux, build_tiny_lora, build_tiny_sd3
from loracompose.methods.autolora import AutoLoRA
from loracompose.methods.autolora_gates import GateSet, lora_layer_channels, save_gates
from loracompose.pipelines.dit_cache import middle_blocks

COMMON = dict(width=32, height=32, output_type="latent", append_triggers=False, show_progress=False)
PROMPT = "a cat on a mat"
# Enough blocks for a non-empty middle: FLUX 2 double + 2 single (3 blocks skipped), SD3 4 joint (2 skipped).
FAMILIES = {"flux": (build_tiny_flux, {"num_layers": 2, "num_single_layers": 2}, 1),
            "sd3": (build_tiny_sd3, {"num_layers": 4}, 2)}  # (builder, transformer config, rows per branch)
PROBED_LAYER = "transformer_blocks.1.attn.to_k"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def dits(tmp_path_factory) -> dict[str, tuple[object, list[LoraSpec]]]:
    """Each family: a pipeline loaded back from a saved folder, and three LoRAs made for it."""
    made = {}
    for name, (build, config, _) in FAMILIES.items():
        root = tmp_path_factory.mktemp(f"dit-{name}")
        model = build(root / "model", seed=0, transformer=config)
        files = [build_tiny_lora(model, root / f"{stem}.safetensors", seed=seed, init_scale=2.0)
                 for stem, seed in (("character", 1), ("style", 2), ("park", 3))]
        made[name] = (load_pipeline(model, device="cpu"), [LoraSpec(path) for path in files])
    return made


# ------------------------------------------------------------------------------------ CMLoRA's block cache


@pytest.mark.parametrize("batched", [True, False])
def test_shallow_pass_around_a_fresh_cache_equals_the_full_pass(family, dits, batched):
    pipe, specs = dits[family]
    probe = ShallowProbe(batched=batched)
    pipe.generate(PROMPT, specs[:2], probe, steps=3, **COMMON)
    assert max(probe.shallow_vs_full) <= 1e-5, "a + (b - a) is b up to rounding"
    assert max(probe.full_vs_plain) == 0.0, "keeping the residual must not change the full pass"
    assert min(probe.stale_vs_full) > 1e-4, "another step's residual must change the output"
    assert not any("forward" in block.__dict__ for block in middle_blocks(pipe.transformer)), "forwards restored"


def test_caching_off_equals_the_weighted_composite_of_its_schedule(family, dits):
    pipe, specs = dits[family]
    classes = dict(zip([spec.path.stem for spec in specs], ["high", "high", "low"]))
    # T=6, phase 0.5 -> S=3; every step refreshes: early H=[0, 1] alternate, late cycle Lo ++ H[1:] = [2, 1].
    dominants = [0, 1, 0, 1, 2, 1]
    weights = tuple(tuple(5 / 9 if j == d else 2 / 9 for j in range(3)) for d in dominants)
    options = dict(COMMON, steps=6, seed=3)
    ours = pipe.generate(PROMPT, specs, CMLoRA(frequency_classes=classes, phase_fraction=0.5, cache_interval=1),
                         **options)
    reference = pipe.generate(PROMPT, specs, StepWeightedComposite(weights_per_step=weights), **options)
    torch.testing.assert_close(ours.latents, reference.latents, atol=1e-5, rtol=0)
    assert (ours.stats.unet_calls, ours.stats.partial_unet_calls) == (6, 0)
    cached = pipe.generate(PROMPT, specs, CMLoRA(frequency_classes=classes, phase_fraction=0.5), **options)
    assert (cached.latents - ours.latents).abs().max() > 1e-4, "the cache and its schedule change the result"


def _spec_refresh_steps(num_steps: int) -> set[int]:
    """docs/methods/cmlora.md: every 2nd step of [0, 0.375T), every 3rd of [0.375T, 0.875T), every 2nd after."""
    first, second = int(0.375 * num_steps), int(0.875 * num_steps)
    return {*range(0, first, 2), *range(first, second, 3), *range(second, num_steps, 2)}


@pytest.mark.parametrize("num_loras,num_steps,batched", [(3, 10, True), (2, 9, False)])
def test_full_and_shallow_transformer_passes_are_counted_exactly(family, dits, num_loras, num_steps, batched):
    pipe, specs = dits[family]
    rows_per_branch = FAMILIES[family][2]
    forwards: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda _module, _args, kwargs: forwards.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    middle_calls: list[int] = []
    middle_handle = middle_blocks(pipe.transformer)[0].attn.register_forward_pre_hook(
        lambda *_: middle_calls.append(1))
    try:
        result = pipe.generate(PROMPT, specs[:num_loras], CMLoRA(batched=batched, profile=False), steps=num_steps,
                               **COMMON)
    finally:
        handle.remove()
        middle_handle.remove()
    refresh = _spec_refresh_steps(num_steps)
    full = [num_loras if i == 0 else (1 if i in refresh else 0) for i in range(num_steps)]
    shallow = [num_loras - f for f in full]
    calls = (lambda n: sum(1 for k in n if k)) if batched else sum
    stats = result.stats
    assert (stats.unet_calls, stats.unet_rows) == (calls(full), rows_per_branch * sum(full))
    assert (stats.partial_unet_calls, stats.partial_unet_rows) == (calls(shallow), rows_per_branch * sum(shallow))
    assert (len(forwards), sum(forwards)) == (stats.unet_calls + stats.partial_unet_calls,
                                             stats.unet_rows + stats.partial_unet_rows)
    assert len(middle_calls) == stats.unet_calls, "shallow passes skip the middle blocks"


def test_cached_batched_equals_sequential(family, dits):
    pipe, specs = dits[family]
    options = dict(COMMON, steps=8, seed=1)
    batched = pipe.generate(PROMPT, specs, CMLoRA(profile=False), **options)
    sequential = pipe.generate(PROMPT, specs, CMLoRA(profile=False, batched=False), **options)
    assert "batched" in batched.stats.execution and "sequential" in sequential.stats.execution
    torch.testing.assert_close(batched.latents, sequential.latents, atol=1e-5, rtol=0)


def test_cmlora_profiles_dit_loras_and_follows_its_plan(family, dits, tmp_path, monkeypatch):
    monkeypatch.setenv("LORACOMPOSE_HOME", str(tmp_path))
    pipe, specs = dits[family]
    method = CMLoRA(profile_steps=2)
    result = pipe.generate(PROMPT, specs, method, steps=8, **COMMON)
    order = result.method["frequency_order"]
    assert set(order["class_sources"].values()) == {"score"} and sorted(order["high"] + order["low"]) == sorted(
        spec.path.stem for spec in specs)
    assert len(list((tmp_path / "frequency-profiles").rglob("*.json"))) == 3, "one cached profile per LoRA"
    assert [plan.refresh for plan in method.plan] == [i in _spec_refresh_steps(8) for i in range(8)]


def test_models_without_a_middle_run_cmlora_at_full_cost(tmp_path):
    """Stock tiny FLUX (one double, one single block): the shallow pass is the full pass."""
    model = build_tiny_flux(tmp_path / "model")
    specs = [LoraSpec(build_tiny_lora(model, tmp_path / f"l{seed}.safetensors", seed=seed)) for seed in (1, 2)]
    pipe = load_pipeline(model, device="cpu")
    probe = ShallowProbe()
    pipe.generate(PROMPT, specs, probe, steps=2, **COMMON)
    assert middle_blocks(pipe.transformer) == [] and max(probe.shallow_vs_full) == 0.0


# ------------------------------------------------------------------------------------ AutoLoRA's gates


def test_open_gates_equal_merge_exactly(family, dits):
    pipe, specs = dits[family]
    weighted = [LoraSpec(spec.path, weight) for spec, weight in zip(specs[:2], (0.8, 1.0))]
    merged = pipe.generate(PROMPT, weighted, Merge(), steps=2, **COMMON)
    base = pipe.generate(PROMPT, [], Merge(), steps=2, **COMMON)
    for gates in (None, "open"):
        gated = pipe.generate(PROMPT, weighted, AutoLoRA(gates=gates), steps=2, **COMMON)
        assert torch.equal(gated.latents, merged.latents)
        assert gated.stats.unet_calls == 2 and gated.method["gates"] == gates
    assert (merged.latents - base.latents).abs().max() > 1e-3, "the LoRAs change the result"
    assert not any("forward" in module.__dict__ for module in pipe.transformer.modules()), "PEFT forwards restored"


class OneClosedGate(AutoLoRA):
    """Open gates except one (layer, LoRA) gate held at 0."""

    closed = (PROBED_LAYER, "character")

    def layer_gates(self, layer, adapters, base, deltas):
        gates = list(super().layer_gates(layer, adapters, base, deltas))
        if layer == self.closed[0]:
            gates[list(adapters).index(self.closed[1])] = torch.zeros(())
        return gates


def test_one_closed_gate_equals_the_run_without_that_lora_on_that_transformer_layer(family, dits, tmp_path):
    pipe, specs = dits[family]
    cut = with_metadata(specs[0].path, tmp_path / "cut.safetensors", zero=lambda key: f".{PROBED_LAYER}." in key)
    closed = pipe.generate(PROMPT, specs[:2], OneClosedGate(), steps=2, **COMMON)
    without = pipe.generate(PROMPT, [LoraSpec(cut, name="character_cut"), specs[1]], Merge(), steps=2, **COMMON)
    merged = pipe.generate(PROMPT, specs[:2], Merge(), steps=2, **COMMON)
    assert torch.equal(closed.latents, without.latents)
    assert (closed.latents - merged.latents).abs().max() > 1e-5, "that one layer matters"


def test_gates_made_for_the_transformer_load_and_change_the_result(family, dits, tmp_path):
    pipe, specs = dits[family]
    pipe.prepare_loras(specs[:2])
    gates = GateSet(lora_layer_channels(pipe.transformer, ["character", "style"]))
    with torch.no_grad():
        for parameter in gates.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    path = save_gates(gates, tmp_path / "gates.safetensors")
    gated = pipe.generate(PROMPT, specs[:2], AutoLoRA(gates=str(path)), steps=2, **COMMON)
    merged = pipe.generate(PROMPT, specs[:2], Merge(), steps=2, **COMMON)
    assert (gated.latents - merged.latents).abs().max() > 1e-4 and gated.method["gates"] == str(path)


def test_gates_of_another_model_are_refused_in_one_line(family, dits):
    from loracompose.assets.embedded import PACKAGED_TOYWORLD

    pipe, specs = dits[family]
    toy_world_gates = Path(PACKAGED_TOYWORLD) / "gates.safetensors"
    assert_one_line_user_errors([
        (lambda: pipe.generate(PROMPT, specs[:2], AutoLoRA(gates=str(toy_world_gates)), steps=1, **COMMON),
         "no gate for any LoRA layer"),
    ])


def test_gate_training_on_a_dit_is_refused_in_one_line(family, dits, tmp_path):
    from loracompose.training.gates import GateTrainingSettings, train_gates

    pipe, specs = dits[family]
    model = Path(pipe.config._name_or_path)
    settings = GateTrainingSettings(str(model), [spec.path for spec in specs[:2]], tmp_path / "g.safetensors",
                                    steps=1, resolution=32, show_progress=False)
    assert_one_line_user_errors([(lambda: train_gates(settings), "gate training runs on SD1.5 and SDXL")])


@pytest.mark.parametrize("method", ["cmlora", "autolora"])
def test_cli_generates_on_dits(family, dits, method, tmp_path, capsys, monkeypatch):
    from loracompose.cli.main import main

    monkeypatch.setenv("LORACOMPOSE_HOME", str(tmp_path / "home"))
    pipe, specs = dits[family]
    out = tmp_path / "out"
    extra = ["--cmlora-profile-steps", "1"] if method == "cmlora" else []
    code = main(["generate", "--model", pipe.config._name_or_path, "--prompt", PROMPT, "--lora", str(specs[0].path),
                 "--lora", str(specs[1].path), "--method", method, "--width", "32", "--height", "32", "--steps", "4",
                 *extra, "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    sidecar = json.loads((out / f"{method}-0.json").read_text())
    calls = {"cmlora": 3, "autolora": 4}[method]  # cmlora at T=4: refreshes at steps 0, 1, 3; step 2 shallow only
    assert sidecar["stats"]["unet_calls"] == calls and f"{method}: {calls} transformer calls" in captured.err
