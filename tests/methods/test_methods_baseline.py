"""Merge, Switch and Composite on tiny SD1.5 and SDXL, against plain diffusers and each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import UNetCallCounter, plain_diffusers
from loracompose import Composite, LoraSpec, Merge, Switch, load_pipeline
from loracompose.methods.switch import switch_schedule

STEPS = 4
COMMON = dict(steps=STEPS, guidance_scale=6.0, output_type="np", show_progress=False, append_triggers=False)


def plain_image(pipe, prompt: str, seed: int, **kwargs) -> np.ndarray:
    return pipe(prompt=prompt, num_inference_steps=STEPS, guidance_scale=6.0,
                generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images[0]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def setup(request, tiny_sd15_dir, tiny_sdxl_dir, sd15_lora_files, sdxl_lora_files):
    sdxl = request.param == "sdxl"
    model_dir = tiny_sdxl_dir if sdxl else tiny_sd15_dir
    loras = sdxl_lora_files if sdxl else sd15_lora_files
    return {"pipe": load_pipeline(model_dir), "model_dir": model_dir, "loras": loras, "sdxl": sdxl}


def test_merge_one_lora_equals_diffusers_set_adapters(setup):
    pipe, loras = setup["pipe"], setup["loras"]
    ours = pipe.generate("a zkx cat", [LoraSpec(loras[0], 0.7)], Merge(), seed=3, **COMMON).images[0]
    plain = plain_diffusers(setup["model_dir"], setup["sdxl"])
    plain.load_lora_weights(str(loras[0]), adapter_name="ref")
    plain.set_adapters(["ref"], [0.7])
    reference = plain_image(plain, "a zkx cat", 3)
    base = plain_image(plain_diffusers(setup["model_dir"], setup["sdxl"]), "a zkx cat", 3)
    assert np.abs(ours - base).max() > 1e-3, "the LoRA must change the image for this test to mean anything"
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_all_weights_zero_equals_base_model(setup):
    pipe, loras = setup["pipe"], setup["loras"]
    zero = pipe.generate("a cat", [LoraSpec(loras[0], 0.0), LoraSpec(loras[1], 0.0)], Merge(), seed=5, **COMMON)
    none = pipe.generate("a cat", [], Merge(), seed=5, **COMMON)
    base = plain_image(plain_diffusers(setup["model_dir"], setup["sdxl"]), "a cat", 5)
    np.testing.assert_allclose(zero.images[0], base, atol=1e-5)
    np.testing.assert_allclose(none.images[0], base, atol=1e-5)


def test_auto_without_loras_is_the_base_model(setup):
    """auto is the default method, so a prompt with no LoRA must give the base model's image."""
    from loracompose.methods.auto import Auto

    result = setup["pipe"].generate("a cat", [], Auto(), seed=5, **COMMON)
    base = plain_image(plain_diffusers(setup["model_dir"], setup["sdxl"]), "a cat", 5)
    np.testing.assert_allclose(result.images[0], base, atol=1e-5)


def test_composite_batched_equals_sequential(setup):
    pipe, loras = setup["pipe"], setup["loras"]
    specs = [LoraSpec(loras[0], 0.8), LoraSpec(loras[1], 1.0)]
    batched = pipe.generate("a cat", specs, Composite(), seed=1, **COMMON)
    sequential = pipe.generate("a cat", specs, Composite(batched=False), seed=1, **COMMON)
    assert batched.stats.execution == "batched" and sequential.stats.execution == "sequential"
    np.testing.assert_allclose(batched.images[0], sequential.images[0], atol=1e-4)
    np.testing.assert_allclose(batched.latents.numpy(), sequential.latents.numpy(), atol=1e-4)


def test_composite_one_lora_equals_merge(setup):
    pipe, loras = setup["pipe"], setup["loras"]
    spec = [LoraSpec(loras[1], 0.9)]
    composite = pipe.generate("a cat", spec, Composite(), seed=2, **COMMON).images[0]
    merge = pipe.generate("a cat", spec, Merge(), seed=2, **COMMON).images[0]
    np.testing.assert_allclose(composite, merge, atol=1e-5)


def test_composite_equals_explicit_average_of_single_lora_predictions(setup):
    """One step of Composite equals the mean of the two single-LoRA guided predictions."""
    pipe, loras = setup["pipe"], setup["loras"]
    specs = [LoraSpec(loras[0], 0.8), LoraSpec(loras[1], 1.0)]
    kwargs = dict(COMMON, steps=1, output_type="latent", scheduler="euler")
    both = pipe.generate("a cat", specs, Composite(mixing_weights=(3.0, 1.0)), seed=4, **kwargs).latents
    first = pipe.generate("a cat", specs[:1], Merge(), seed=4, **kwargs).latents
    second = pipe.generate("a cat", specs[1:], Merge(), seed=4, **kwargs).latents
    # An Euler step is affine in the noise prediction, so a weighted mix of predictions mixes the results.
    torch.testing.assert_close(both, 0.75 * first + 0.25 * second, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_loras", [1, 2])
def test_unet_call_counts_are_exact(setup, num_loras):
    pipe, loras = setup["pipe"], setup["loras"]
    specs = [LoraSpec(path) for path in loras[:num_loras]]
    expected = {  # (calls, rows) for STEPS steps, CFG on, 1 image
        "merge": (STEPS, 2 * STEPS),
        "switch": (STEPS, 2 * STEPS),
        "composite": (STEPS, 2 * num_loras * STEPS),
        "composite-sequential": (num_loras * STEPS, 2 * num_loras * STEPS),
    }
    methods = {"merge": Merge(), "switch": Switch(period=1), "composite": Composite(),
               "composite-sequential": Composite(batched=False)}
    for label, method in methods.items():
        counter = UNetCallCounter(pipe.unet)
        try:
            stats = pipe.generate("a cat", specs, method, seed=0, **COMMON).stats
        finally:
            counter.close()
        assert (stats.unet_calls, stats.unet_rows) == expected[label], label
        assert (counter.calls, counter.rows) == expected[label], label


def test_rows_scale_with_num_images(setup):
    pipe, loras = setup["pipe"], setup["loras"]
    stats = pipe.generate("a cat", [LoraSpec(p) for p in loras], Composite(), num_images=2, seed=0, **COMMON).stats
    assert (stats.unet_calls, stats.unet_rows) == (STEPS, STEPS * 2 * 2 * 2)


def test_image_k_equals_single_run_with_seed_plus_k(setup):
    pipe, loras = setup["pipe"], setup["loras"]
    specs = [LoraSpec(p) for p in loras]
    pair = pipe.generate("a cat", specs, Composite(), num_images=2, seed=10, **COMMON)
    second = pipe.generate("a cat", specs, Composite(), seed=11, **COMMON)
    assert pair.seeds == [10, 11]
    np.testing.assert_allclose(pair.images[1], second.images[0], atol=1e-4)


@pytest.mark.parametrize("num_loras,period,steps", [(2, 1, 5), (2, 2, 7), (3, 2, 9), (3, 3, 10)])
def test_switch_trace_follows_schedule(tiny_sd15_dir, sd15_lora_files, tmp_path, num_loras, period, steps):
    from loracompose.assets.tiny import build_tiny_lora

    files = list(sd15_lora_files)
    if num_loras == 3:
        files.append(build_tiny_lora(tiny_sd15_dir, tmp_path / "third.safetensors", seed=33, trigger_words=["third"]))
    pipe = load_pipeline(tiny_sd15_dir)
    counter = UNetCallCounter(pipe.unet)
    try:
        pipe.generate("a cat", [LoraSpec(p) for p in files], Switch(period=period),
                      **dict(COMMON, steps=steps, output_type="latent"))
    finally:
        counter.close()
    names = [LoraSpec(p).path.stem for p in files]
    expected = [(names[(step // period) % num_loras],) for step in range(steps)]
    assert counter.active == expected


def test_switch_schedule_gives_every_lora_exactly_period_steps():
    assert switch_schedule(12, 3, 2) == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]
    assert switch_schedule(11, 2, 5) == [0] * 5 + [1] * 5 + [0]
    assert switch_schedule(4, 4, 1) == [0, 1, 2, 3]


def test_merge_fused_matches_unfused_and_restores_weights(setup):
    pipe, loras = setup["pipe"], setup["loras"]
    specs = [LoraSpec(loras[0], 0.6), LoraSpec(loras[1], 0.5)]
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "base_layer" in k}
    fused = pipe.generate("a cat", specs, Merge(fuse=True), seed=0, **COMMON).images[0]
    unfused = pipe.generate("a cat", specs, Merge(), seed=0, **COMMON).images[0]
    np.testing.assert_allclose(fused, unfused, atol=1e-4)
    after = pipe.unet.state_dict()
    assert max((after[k] - v).abs().max().item() for k, v in before.items()) < 1e-5


def test_merge_mean_equals_sum_with_weights_divided(setup):
    pipe, loras = setup["pipe"], setup["loras"]
    mean = pipe.generate("a cat", [LoraSpec(p, 1.0) for p in loras], Merge(combine="mean"), seed=0, **COMMON)
    halved = pipe.generate("a cat", [LoraSpec(p, 0.5) for p in loras], Merge(), seed=0, **COMMON)
    np.testing.assert_allclose(mean.images[0], halved.images[0], atol=1e-6)


def test_non_square_size_runs_with_right_shape(setup):
    pipe, loras = setup["pipe"], setup["loras"]
    result = pipe.generate("a cat", [LoraSpec(p) for p in loras], Composite(), width=96, height=64, seed=0, **COMMON)
    assert result.images[0].shape == (64, 96, 3)


def test_adapters_left_inactive_after_generate(setup):
    pipe, loras = setup["pipe"], setup["loras"]
    pipe.generate("a cat", [LoraSpec(loras[0])], Merge(), seed=0, **COMMON)
    probe = next(m for m in pipe.unet.modules() if hasattr(m, "lora_A") and len(m.lora_A))
    assert list(probe.active_adapters) == []


def test_peak_rss_is_this_process_not_a_larger_parent():
    import subprocess
    import sys

    from loracompose.pipelines.stats import peak_rss_bytes

    ballast = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched: the parent's peak now includes it
    parent = peak_rss_bytes()
    assert parent >= ballast.numel() * 4
    code = "from loracompose.pipelines.stats import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert 0 < child < parent - ballast.numel() * 4 // 2, "the child read its parent's peak"
    del ballast
