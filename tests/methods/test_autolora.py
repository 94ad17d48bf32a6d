"""AutoLoRA gated fusion (loracompose.methods.autolora): open gates equal Merge, the gate formula, gate files
and bad inputs (tiny models, CPU). Retrieval: tests/retrieval/; gate training: tests/training/test_gate_training.py."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_one_line_user_errors, with_metadata
from loracompose import LoraSpec, Merge
from loracompose.methods.autolora import AutoLoRA, GatedFusion
from loracompose.methods.autolora_gates import GateSet, LayerGate, lora_layer_channels, save_gates
from loracompose.pipelines.adapters import AdapterController

COMMON = dict(show_progress=False, output_type="latent", append_triggers=False)
PROMPT = "a zkx in qwv style"
PROBED_LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


# ------------------------------------------------------------------------------------ gated fusion


@pytest.mark.parametrize("model,files", [("sd15", "sd15_lora_files"), ("sdxl", "sdxl_lora_files")])
def test_open_gates_equal_merge_exactly(model, files, request):
    pipe = request.getfixturevalue(model)
    specs = [LoraSpec(path, weight) for path, weight in zip(request.getfixturevalue(files), (0.8, 1.0))]
    merged = pipe.generate(PROMPT, specs, Merge(), steps=2, **COMMON)
    gated = pipe.generate(PROMPT, specs, AutoLoRA(), steps=2, **COMMON)
    base = pipe.generate(PROMPT, [], Merge(), steps=2, **COMMON)
    assert torch.equal(gated.latents, merged.latents)
    assert (merged.latents - base.latents).abs().max() > 1e-2, "the LoRAs change the result"
    assert gated.stats.unet_calls == 2 and gated.method["name"] == "autolora"
    assert not any("forward" in module.__dict__ for module in pipe.unet.modules()), "PEFT forwards restored"


class OneClosedGate(AutoLoRA):
    """AutoLoRA with open gates except one (layer, LoRA) gate held at 0."""

    closed = (PROBED_LAYER, "a_char")

    def layer_gates(self, layer, adapters, base, deltas):
        gates = list(super().layer_gates(layer, adapters, base, deltas))
        if layer == self.closed[0]:
            gates[list(adapters).index(self.closed[1])] = torch.zeros(())
        return gates


def test_one_closed_gate_equals_the_run_without_that_lora_on_that_layer(sd15, sd15_lora_files, tmp_path):
    cut = with_metadata(sd15_lora_files[0], tmp_path / "cut.safetensors", zero=lambda key: PROBED_LAYER in key)
    style = LoraSpec(sd15_lora_files[1], name="b_style")
    closed = sd15.generate(PROMPT, [LoraSpec(sd15_lora_files[0], name="a_char"), style], OneClosedGate(), steps=2,
                           **COMMON)
    without = sd15.generate(PROMPT, [LoraSpec(cut, name="a_char_cut"), style], Merge(), steps=2, **COMMON)
    merged = sd15.generate(PROMPT, [LoraSpec(sd15_lora_files[0], name="a_char"), style], Merge(), steps=2, **COMMON)
    assert torch.equal(closed.latents, without.latents)
    assert (closed.latents - merged.latents).abs().max() > 1e-4, "that one layer matters"


def random_gates(channels, variant="full", seed=0) -> GateSet:
    gates = GateSet(channels, variant)
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in gates.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=rng))
    return gates


def layer_norm(value: torch.Tensor) -> torch.Tensor:
    mean = value.mean(-1, keepdim=True)
    return (value - mean) / torch.sqrt(((value - mean) ** 2).mean(-1, keepdim=True) + 1e-5)


@pytest.mark.parametrize("variant", ["full", "no_base", "no_cross"])
def test_gate_formula_equals_its_explicit_computation(variant):
    gate = random_gates({"layer": 16}, variant, seed=3).gate("layer")
    base, delta = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    h, d = layer_norm(base), layer_norm(delta)
    terms = {"full": gate.w_base * h + gate.w_lora * d + gate.w_cross * h * d,
             "no_base": gate.w_lora * d + gate.w_cross * h * d,
             "no_cross": gate.w_lora * d}[variant]
    expected = gate.w_out * torch.sigmoid(terms + gate.bias)
    torch.testing.assert_close(gate(base, delta), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(LayerGate(16)(base, delta), torch.ones(2, 5, 16)), "an untrained gate is exactly open"


def test_gated_layer_output_equals_h_plus_sum_of_gated_deltas(sd15, sd15_lora_files):
    loras = sd15.prepare_loras([LoraSpec(path) for path in sd15_lora_files])
    controller = AdapterController({"unet": sd15.unet})
    controller.activate({"character": 0.8, "style": 1.0})
    layer = sd15.unet.get_submodule(PROBED_LAYER)
    gates = random_gates(lora_layer_channels(sd15.unet), seed=5)
    fusion = GatedFusion(sd15.unet, lambda name, adapters, base, deltas: gates.gate(name).gates(base, deltas))
    try:
        x = torch.randn(2, 7, layer.in_features)
        with torch.no_grad():
            output = layer(x)
            h = x @ layer.base_layer.weight.T + (0 if layer.base_layer.bias is None else layer.base_layer.bias)
            expected = h.clone()
            for lora, weight in zip(loras, (0.8, 1.0)):
                a, b = layer.lora_A[lora.name].weight, layer.lora_B[lora.name].weight
                delta = weight * (4 / 4) * (x @ a.T @ b.T)
                g = gates.gate(PROBED_LAYER)
                expected += g.w_out * torch.sigmoid(g.w_base * layer_norm(h) + g.w_lora * layer_norm(delta)
                                                    + g.w_cross * layer_norm(h) * layer_norm(delta) + g.bias) * delta
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
    finally:
        fusion.restore()
        controller.activate({})


def test_gate_file_round_trip_changes_the_result(sd15, sd15_lora_files, tmp_path):
    specs = [LoraSpec(path) for path in sd15_lora_files]
    sd15.prepare_loras(specs)
    path = save_gates(random_gates(lora_layer_channels(sd15.unet, ["character", "style"]), seed=1),
                      tmp_path / "gates.safetensors")
    merged = sd15.generate(PROMPT, specs, Merge(), steps=2, **COMMON)
    gated = sd15.generate(PROMPT, specs, AutoLoRA(gates=str(path)), steps=2, **COMMON)
    again = sd15.generate(PROMPT, specs, AutoLoRA(gates=str(path)), steps=2, **COMMON)
    assert torch.equal(gated.latents, again.latents)
    assert (gated.latents - merged.latents).abs().max() > 1e-3
    assert gated.method["gates"] == str(path)


def test_toy_world_default_is_its_shipped_gates_and_open_asks_for_merge():
    from loracompose.assets.embedded import PACKAGED_TOYWORLD, embedded_default
    from loracompose.pipelines import load_pipeline

    default = embedded_default("toyworld")
    pipe = load_pipeline(default.model_dir, device="cpu", dtype="fp32")
    specs = [LoraSpec(lora.path) for lora in default.loras]
    shipped = PACKAGED_TOYWORLD / "gates.safetensors"

    def run(method):
        return pipe.generate(default.prompt, specs, method, steps=2, seed=0, guidance_scale=4.0, **COMMON)

    by_default, explicit = run(AutoLoRA()), run(AutoLoRA(gates=str(shipped)))
    open_gates, merged = run(AutoLoRA(gates="open")), run(Merge())
    assert torch.equal(by_default.latents, explicit.latents)
    assert by_default.method["gates"] == str(shipped), "the sidecar names the gate file used"
    assert torch.equal(open_gates.latents, merged.latents)
    assert (by_default.latents - merged.latents).abs().max() > 1e-3, "the shipped gates change the result"


def test_other_models_get_open_gates_by_default(sd15, sd15_lora_files):
    from loracompose.methods.autolora import shipped_gates

    assert shipped_gates(sd15) is None
    specs = [LoraSpec(path) for path in sd15_lora_files]
    gated = sd15.generate(PROMPT, specs, AutoLoRA(), steps=1, **COMMON)
    assert gated.method["gates"] is None


def test_bad_inputs_are_one_line_user_errors(sd15, sd15_lora_files, tmp_path):
    specs = [LoraSpec(path) for path in sd15_lora_files]
    (tmp_path / "gates.pt").write_bytes(b"x")
    other_model_gates = save_gates(GateSet({"not.a.layer": 4}), tmp_path / "other.safetensors")

    def generate(method, loras=specs):
        return sd15.generate(PROMPT, loras, method, steps=1, **COMMON)

    assert_one_line_user_errors([
        (lambda: generate(AutoLoRA(gates=str(tmp_path / "gates.pt"))), "safetensors"),
        (lambda: generate(AutoLoRA(gates=str(sd15_lora_files[0]))), "gate file"),
        (lambda: generate(AutoLoRA(gates=str(other_model_gates))), "no gate for"),
        (lambda: generate(AutoLoRA(), []), "at least 1 LoRA"),
        (lambda: GateSet({"a": 2}, "sideways"), "variant"),
    ])
    assert not any("forward" in module.__dict__ for module in sd15.unet.modules())
