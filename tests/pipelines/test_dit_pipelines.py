"""FLUX.1 and SD3 through the one loop: tiny DiT folders saved to disk and loaded back, Merge against
plain diffusers with the same LoRAs, Composite batched against sequential, Switch's schedule, exact
transformer call/row counts, the CLI, and one-line refusals of what is not ported yet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from helpers import UNetOnlyMerge

from loracompose import LoraSpec, UserError, load_pipeline
from loracompose.assets.tiny import build_tiny_flux, build_tiny_lora, build_tiny_sd3
from loracompose.lora import inspect_lora
from loracompose.methods.composite import Composite
from loracompose.methods.merge import Merge
from loracompose.methods.switch import Switch
from loracompose.pipelines import LoraComposeFluxPipeline, LoraComposeSD3Pipeline

PROMPT = "a cat on a mat"
SIZE = 32
STEPS = 3
TEXT_TOKENS = 32  # the tiny T5 tokenizer's model_max_length, which generate uses on it
# Plain diffusers and our loop run the same operations in the same order; CFG and true CFG batch the
# two halves into one call here where FLUX's pipeline makes two, which moves results by float noise.
EXACT, BATCHING_NOISE = 1e-6, 1e-4

FAMILIES = {
    "flux": (build_tiny_flux, FluxPipeline, LoraComposeFluxPipeline),
    "sd3": (build_tiny_sd3, StableDiffusion3Pipeline, LoraComposeSD3Pipeline),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def dit_dirs(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    """Each family: a tiny model folder and two LoRAs (transformer + CLIP encoders) built for it."""
    made = {}
    for name, (build, _, _) in FAMILIES.items():
        root = tmp_path_factory.mktemp(f"tiny-{name}")
        model = build(root / "model", seed=0)
        loras = [build_tiny_lora(model, root / f"{stem}.safetensors", seed=seed, trigger_words=[trigger],
                                 init_scale=2.0)
                 for stem, trigger, seed in (("character", "zkx", 1), ("style", "qwv", 2))]
        made[name] = (model, loras)
    return made


@pytest.fixture(scope="module")
def pipes(dit_dirs) -> dict[str, object]:
    return {name: load_pipeline(model, device="cpu") for name, (model, _) in dit_dirs.items()}


def _generate(pipe, loras, method, **kwargs):
    options = dict(steps=STEPS, width=SIZE, height=SIZE, output_type="latent", append_triggers=False,
                   show_progress=False)
    return pipe.generate(PROMPT, loras, method, **{**options, **kwargs})


def _diffusers_latents(family: str, model: Path, loras: list[Path], weights: list[float], *, seed: int = 0,
                       num_images: int = 1, **kwargs) -> torch.Tensor:
    """Plain diffusers: load_lora_weights + set_adapters, the family's own pipeline call."""
    reference = FAMILIES[family][1].from_pretrained(model)
    reference.set_progress_bar_config(disable=True)
    names = [f"lora{index}" for index in range(len(loras))]
    for name, path in zip(names, loras):
        reference.load_lora_weights(str(path), adapter_name=name)
    reference.set_adapters(names, weights)
    generators = [torch.Generator().manual_seed(seed + k) for k in range(num_images)]
    return reference(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=generators,
                     num_images_per_prompt=num_images, output_type="latent", max_sequence_length=TEXT_TOKENS,
                     **kwargs).images


def test_tiny_folders_load_as_our_dit_pipelines(family, dit_dirs, pipes):
    _, loras = dit_dirs[family]
    pipe = pipes[family]
    assert isinstance(pipe, FAMILIES[family][2]) and pipe.architecture == family
    assert inspect_lora(LoraSpec(loras[0])).architecture == family


@pytest.mark.parametrize("guidance", [None, 5.0])
def test_merge_equals_plain_diffusers(family, dit_dirs, pipes, guidance):
    model, loras = dit_dirs[family]
    result = _generate(pipes[family], [LoraSpec(loras[0], 0.8), LoraSpec(loras[1], 0.6)], Merge(),
                       guidance_scale=guidance, num_images=2, seed=3)
    expected_guidance = pipes[family].default_guidance_scale if guidance is None else guidance
    expected = _diffusers_latents(family, model, loras, [0.8, 0.6], seed=3, num_images=2,
                                  guidance_scale=expected_guidance)
    torch.testing.assert_close(result.latents, expected, atol=EXACT, rtol=0)
    rows_per_image = 1 if family == "flux" else 2  # FLUX: distilled guidance, no CFG halves
    assert (result.stats.unet_calls, result.stats.unet_rows) == (STEPS, STEPS * 2 * rows_per_image)
    assert (result.stats.model_calls, result.stats.model_rows) == (result.stats.unet_calls, result.stats.unet_rows)


def test_tiny_t5_tokenizer_round_trips_plain_prompts(tmp_path):
    from transformers import T5TokenizerFast

    from loracompose.assets.tiny import build_t5_tokenizer

    build_t5_tokenizer(tmp_path)
    tokenizer = T5TokenizerFast.from_pretrained(tmp_path)  # as the pipeline folders load it
    ids = tokenizer("A Red cat, 2 dogs!").input_ids
    assert tokenizer.unk_token_id not in ids and ids[-1] == tokenizer.eos_token_id == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "A Red cat, 2 dogs!"
    padded = tokenizer("a cat", padding="max_length", max_length=TEXT_TOKENS).input_ids
    assert len(padded) == TEXT_TOKENS and padded[-1] == tokenizer.pad_token_id == 0


def test_sd35_layout_merge_equals_diffusers_and_composite_batches(tmp_path):
    model = build_tiny_sd3(tmp_path / "sd35", seed=0, sd35=True)
    loras = [build_tiny_lora(model, tmp_path / f"{seed}.safetensors", seed=seed, init_scale=2.0) for seed in (1, 2)]
    pipe = load_pipeline(model, device="cpu")
    assert any(name.endswith("attn2") for name, _ in pipe.transformer.named_modules())  # MMDiT-X block
    result = _generate(pipe, [LoraSpec(loras[0], 0.8)], Merge())
    expected = _diffusers_latents("sd3", model, loras[:1], [0.8], guidance_scale=pipe.default_guidance_scale)
    torch.testing.assert_close(result.latents, expected, atol=EXACT, rtol=0)
    specs = [LoraSpec(loras[0], 0.8), LoraSpec(loras[1], 0.5)]
    batched, sequential = _generate(pipe, specs, Composite()), _generate(pipe, specs, Composite(batched=False))
    torch.testing.assert_close(batched.latents, sequential.latents, atol=BATCHING_NOISE, rtol=0)
    assert (batched.stats.unet_calls, batched.stats.unet_rows) == (STEPS, STEPS * 2 * 2)


def test_flux_true_cfg_equals_plain_diffusers(dit_dirs, pipes):
    model, loras = dit_dirs["flux"]
    result = _generate(pipes["flux"], [LoraSpec(loras[0])], Merge(), true_cfg_scale=2.0, negative_prompt="blurry")
    expected = _diffusers_latents("flux", model, loras[:1], [1.0], true_cfg_scale=2.0, negative_prompt="blurry",
                                  guidance_scale=3.5)
    torch.testing.assert_close(result.latents, expected, atol=BATCHING_NOISE, rtol=0)
    assert (result.stats.unet_calls, result.stats.unet_rows) == (STEPS, 2 * STEPS)
    assert not torch.allclose(result.latents, _generate(pipes["flux"], [LoraSpec(loras[0])], Merge()).latents)


def test_decoded_images_equal_plain_diffusers(family, dit_dirs, pipes):
    model, loras = dit_dirs[family]
    ours = _generate(pipes[family], [LoraSpec(loras[0], 0.7)], Merge(), output_type="np").images[0]
    reference = FAMILIES[family][1].from_pretrained(model)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(loras[0]), adapter_name="a")
    reference.set_adapters(["a"], [0.7])
    expected = reference(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                         generator=torch.Generator().manual_seed(0), output_type="np",
                         max_sequence_length=TEXT_TOKENS).images[0]
    assert ours.shape == (SIZE, SIZE, 3)
    assert abs(ours - expected).max() <= 1e-5


def test_composite_batched_equals_sequential(family, dit_dirs, pipes):
    _, loras = dit_dirs[family]
    specs = [LoraSpec(loras[0], 0.8), LoraSpec(loras[1], 0.6)]
    batched = _generate(pipes[family], specs, Composite())
    sequential = _generate(pipes[family], specs, Composite(batched=False))
    torch.testing.assert_close(batched.latents, sequential.latents, atol=BATCHING_NOISE, rtol=0)
    halves = 1 if family == "flux" else 2
    assert batched.stats.execution == "batched" and sequential.stats.execution == "sequential"
    assert (batched.stats.unet_calls, batched.stats.unet_rows) == (STEPS, STEPS * 2 * halves)
    assert (sequential.stats.unet_calls, sequential.stats.unet_rows) == (2 * STEPS, STEPS * 2 * halves)
    # Composite is not Merge: averaging two one-LoRA predictions differs from summing the LoRAs.
    assert not torch.allclose(batched.latents, _generate(pipes[family], specs, Merge()).latents, atol=1e-3)


def test_composite_of_one_lora_equals_merge(family, dit_dirs, pipes):
    _, loras = dit_dirs[family]
    one = [LoraSpec(loras[1], 0.9)]
    torch.testing.assert_close(_generate(pipes[family], one, Composite()).latents,
                               _generate(pipes[family], one, Merge()).latents, atol=EXACT, rtol=0)


def test_fused_merge_equals_unfused_and_leaves_the_transformer_clean(family, dit_dirs, pipes):
    _, loras = dit_dirs[family]
    specs = [LoraSpec(loras[0], 0.8), LoraSpec(loras[1], 0.6)]
    pipes[family].prepare_loras(specs)  # the LoRA layers exist before the snapshot
    before = {name: value.clone() for name, value in pipes[family].transformer.state_dict().items()}
    fused = _generate(pipes[family], specs, Merge(fuse=True))
    torch.testing.assert_close(fused.latents, _generate(pipes[family], specs, Merge()).latents,
                               atol=BATCHING_NOISE, rtol=0)
    after = pipes[family].transformer.state_dict()
    assert all(torch.equal(value, after[name]) for name, value in before.items())


def test_model_call_exposes_the_image_token_layout(family, dit_dirs, pipes):
    _, loras = dit_dirs[family]
    seen = {}

    class Probe(Merge):
        def start(self, run):
            seen["grid"], seen["order"] = run.model.token_grid, run.model.joint_order
            seen["module"] = run.unet

    _generate(pipes[family], [LoraSpec(loras[0])], Probe(), width=SIZE, height=2 * SIZE)
    expected_grid = (SIZE, SIZE // 2) if family == "flux" else (2 * SIZE, SIZE)  # FLUX: 2x2 latents per token
    assert seen["grid"] == expected_grid and seen["module"] is pipes[family].transformer
    assert seen["order"] == (("text", "image") if family == "flux" else ("image", "text"))


def test_a_lora_for_another_family_is_refused(family, dit_dirs, pipes, sd15_lora_files):
    with pytest.raises(UserError, match=r"is made for SD1\.5 .* but the model is "):
        _generate(pipes[family], [LoraSpec(sd15_lora_files[0])], Merge())
    other = "sd3" if family == "flux" else "flux"
    with pytest.raises(UserError, match=f"is made for {other.upper() if other == 'sd3' else 'FLUX'}"):
        _generate(pipes[family], [LoraSpec(dit_dirs[other][1][0])], Merge())


def test_switch_runs_one_lora_per_step_in_order(family, dit_dirs, pipes):
    _, loras = dit_dirs[family]
    pipe = pipes[family]
    layer = next(module for module in pipe.transformer.modules() if hasattr(module, "lora_A") and module.lora_A)
    trace: list[tuple[str, ...]] = []

    def record(_module, _args):
        trace.append(tuple(layer.active_adapters))

    handle = pipe.transformer.register_forward_pre_hook(record)
    try:
        result = _generate(pipe, [LoraSpec(loras[0]), LoraSpec(loras[1])], Switch(period=2), steps=5)
    finally:
        handle.remove()
    names = [path.stem for path in loras]
    assert trace == [(names[0],), (names[0],), (names[1],), (names[1],), (names[0],)]
    assert result.stats.unet_calls == 5


def test_switch_with_one_lora_equals_merge(family, dit_dirs, pipes):
    _, loras = dit_dirs[family]
    one = [LoraSpec(loras[0], 0.5)]
    torch.testing.assert_close(_generate(pipes[family], one, Switch(period=1)).latents,
                               _generate(pipes[family], one, Merge()).latents, atol=EXACT, rtol=0)


def test_unported_method_and_bad_settings_are_one_line_errors(family, dit_dirs, pipes):
    _, loras = dit_dirs[family]
    pipe = pipes[family]
    name = "FLUX" if family == "flux" else "SD3"
    cases = [
        (lambda: pipe.generate(PROMPT, [LoraSpec(loras[0])], UNetOnlyMerge(), steps=1),
         f"method unet-only-merge does not support {name} yet; use merge, "),
        (lambda: _generate(pipe, [LoraSpec(loras[0])], Merge(), scheduler="ddim"),
         f"scheduler ddim does not support {name} yet"),
    ]
    for call, expected in cases:
        with pytest.raises(UserError) as error:
            call()
        assert expected in str(error.value) and "\n" not in str(error.value)


def test_flux_sizes_must_split_into_whole_tokens(pipes, monkeypatch):
    pipe = pipes["flux"]
    monkeypatch.setattr(pipe, "vae_scale_factor", 8)  # the real FLUX VAE: 8x, then 2x2 latents per token
    assert pipe._latent_side(48, "width") == 6
    with pytest.raises(UserError, match=r"^width 40 is not a multiple of 16 on FLUX; use e\.g\. 32$"):
        pipe._latent_side(40, "width")


def test_true_cfg_is_refused_on_unet_families(sd15):
    with pytest.raises(UserError, match=r"true_cfg_scale=2\.0 is for FLUX"):
        sd15.generate("a cat", [], Merge(), steps=1, width=64, height=64, true_cfg_scale=2.0, show_progress=False)


def test_other_families_are_refused_in_one_line(tmp_path):
    folder = tmp_path / "pixart"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "PixArtAlphaPipeline"}')
    with pytest.raises(UserError, match="is a PixArtAlphaPipeline, a model family loracompose does not run"):
        load_pipeline(folder, device="cpu")


def test_auto_dtype_is_bf16_for_dits_on_cuda():
    from loracompose.pipelines import LoraComposeSDPipeline
    from loracompose.pipelines.loading import auto_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert auto_dtype(LoraComposeFluxPipeline, cuda) == auto_dtype(LoraComposeSD3Pipeline, cuda) == torch.bfloat16
    assert auto_dtype(LoraComposeSDPipeline, cuda) == torch.float16
    assert auto_dtype(LoraComposeFluxPipeline, cpu) == torch.float32


def test_single_files_are_told_apart_by_their_keys():
    from loracompose.pipelines.loading import _single_file_class

    assert _single_file_class({"double_blocks.0.img_attn.qkv.weight"}) is LoraComposeFluxPipeline
    assert _single_file_class({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"}) \
        is LoraComposeSD3Pipeline


@pytest.mark.parametrize("method", ["merge", "switch", "composite"])
def test_cli_generates_on_dits(family, dit_dirs, method, tmp_path, capsys):
    from loracompose.cli.main import main

    model, loras = dit_dirs[family]
    out = tmp_path / "out"
    code = main(["generate", "--model", str(model), "--prompt", PROMPT, "--lora", f"{loras[0]}:0.8",
                 "--lora", str(loras[1]), "--method", method, "--width", str(SIZE), "--height", str(SIZE),
                 "--steps", "2", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / f"{method}-0.png").exists()
    calls = {"merge": 2, "switch": 2, "composite": 2}[method]
    assert f"{method}: {calls} transformer calls" in captured.err


def test_cli_refuses_unported_method_in_one_line(family, dit_dirs, tmp_path, capsys, monkeypatch):
    from loracompose.cli.main import main
    from loracompose.methods import METHODS

    monkeypatch.setitem(METHODS, UNetOnlyMerge.name, UNetOnlyMerge)
    model, loras = dit_dirs[family]
    code = main(["generate", "--model", str(model), "--prompt", PROMPT, "--lora", str(loras[0]),
                 "--method", UNetOnlyMerge.name, "--width", str(SIZE), "--height", str(SIZE), "--steps", "2",
                 "--quiet", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    name = "FLUX" if family == "flux" else "SD3"
    assert code == 2 and len(lines) == 1 and "Traceback" not in lines[0]
    assert lines[0].startswith(f"loracompose: error: method unet-only-merge does not support {name} yet; use merge, ")
    assert not (tmp_path / "out").exists()
