"""The patch stack (pipelines/patches.py): every change a method makes to the shared model is undone
however the generation ends; a failing or hostile request leaves the next Merge equal, bit for bit,
to a fresh pipeline's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import ORACLE_PROMPT, ORACLE_SETTINGS
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loracompose import LoraSpec, Merge, UserError, load_pipeline
from loracompose.methods import METHODS
from loracompose.pipelines.adapters import AdapterController
from loracompose.pipelines.patches import PatchLeak, PatchStack, assert_unchanged, fingerprint

PROMPT, COMMON = ORACLE_PROMPT, ORACLE_SETTINGS  # the request of the fresh_merge oracle (conftest)

# (label, registry name, settings): every method, cheap settings, and the paths that fold weights.
METHOD_CASES = [
    ("merge", "merge", {}),
    ("merge-fuse", "merge", {"fuse": True}),
    ("switch", "switch", {"period": 1}),
    ("composite", "composite", {}),
    ("cmlora", "cmlora", {"profile": False, "cache_interval": 2}),
    ("cmlora-switch", "cmlora-switch", {"profile": False, "period": 1}),
    ("clora", "clora", {"iterative_steps": (), "max_update_step": 1}),
    ("composer", "composer", {}),
    ("tara", "tara", {}),
    ("tara-fuse-cond", "tara", {"fuse": True, "self_attention": "cond", "untokened": "global"}),
    ("autolora", "autolora", {}),
    ("regional", "regional", {}),
    ("regional-latent", "regional", {"mode": "latent"}),
    ("auto", "auto", {"kinds": {"character": "character", "style": "character"}}),
]


def test_every_registered_method_is_covered():
    assert {name for _, name, _ in METHOD_CASES} == set(METHODS)


class Injected(RuntimeError):
    """The failure a test makes a method raise."""


def failing(method, where: str):
    """``method`` raising once its ``start`` has run (patches installed), or after the first step."""
    if where == "start":
        start = method.start

        def failing_start(run):
            start(run)
            raise Injected("after start")

        method.start = failing_start
    else:
        end_step = method.end_step

        def failing_end_step(run, step, latents):
            end_step(run, step, latents)
            if step.index == 0:
                raise Injected("after the first step")

        method.end_step = failing_end_step
    return method


def model_state(pipe) -> dict:
    """The pipeline's fingerprint, less the poisoned test LoRA's own layers (loading a LoRA is no patch)."""
    state = {**fingerprint({"unet": pipe.unet}), **fingerprint({"text_encoder": pipe.text_encoder}, structure=False)}
    return {key: value for key, value in state.items() if ".poison" not in key}


@pytest.fixture(scope="module")
def shared(tiny_sd15_dir, specs):
    """One pipeline every failing request runs on, with its clean state after the LoRAs are loaded."""
    pipe = load_pipeline(tiny_sd15_dir)
    pipe.prepare_loras(specs)
    return pipe, model_state(pipe)


@pytest.mark.parametrize("where", ["start", "first step"])
@pytest.mark.parametrize("label,name,settings", METHOD_CASES, ids=[case[0] for case in METHOD_CASES])
def test_a_failing_method_leaves_the_next_merge_as_on_a_fresh_pipeline(shared, specs, fresh_merge, label, name,
                                                                        settings, where):
    pipe, clean = shared
    with pytest.raises(Injected):
        pipe.generate(PROMPT, specs, failing(METHODS[name](**settings), where), **COMMON)
    assert_unchanged(clean, model_state(pipe))
    assert torch.equal(pipe.generate(PROMPT, specs, Merge(), **COMMON).latents, fresh_merge)


@pytest.mark.parametrize("method", [Merge(fuse=True), METHODS["tara"](fuse=True, untokened="global")],
                         ids=["merge", "tara"])
def test_a_fused_run_puts_the_weights_back_exactly(shared, specs, fresh_merge, method):
    """Unmerging by subtraction left the weights ~1e-6 off; they now come back from a saved copy."""
    pipe, clean = shared
    pipe.generate(PROMPT, specs, method, **COMMON)
    assert_unchanged(clean, model_state(pipe))
    assert torch.equal(pipe.generate(PROMPT, specs, Merge(), **COMMON).latents, fresh_merge)


def infinite_lora(source: Path, out: Path) -> Path:
    """A copy of a LoRA whose up (B) matrices are all +Inf: a valid file that poisons fused weights."""
    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = {key: torch.full_like(value, float("inf")) if "lora_B" in key or "lora_up" in key or "lora.up" in key
               else value for key, value in load_file(source).items()}
    save_file(tensors, str(out), metadata=metadata)
    return out


@pytest.mark.parametrize("method", [Merge(fuse=True), METHODS["tara"](fuse=True, untokened="global")],
                         ids=["merge", "tara"])
def test_a_fused_infinite_lora_does_not_poison_later_requests(shared, specs, fresh_merge, sd15_lora_files, tmp_path,
                                                               method):
    pipe, clean = shared
    poison = LoraSpec(infinite_lora(sd15_lora_files[0], tmp_path / "poison.safetensors"), trigger_words=("zkx",))
    try:
        result = pipe.generate(PROMPT, [poison], method, **COMMON)
        assert not torch.isfinite(result.latents).all(), "the poisoned LoRA must reach the image for this test"
    except UserError:
        pass  # refused as non-finite when loaded: nothing was fused either
    assert_unchanged(clean, model_state(pipe))
    assert torch.equal(pipe.generate(PROMPT, specs, Merge(), **COMMON).latents, fresh_merge)


def test_fused_weights_come_back_from_the_saved_copy_exactly(shared):
    pipe, clean = shared
    adapters = AdapterController({"unet": pipe.unet})
    layers = adapters.layers["unet"]
    before = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    adapters.activate({"character": 1e30})  # a merge + unmerge by subtraction would not give these back
    stack = PatchStack()
    assert stack.fuse(layers, ["character"]) == len(layers)
    assert all(layer.merged for layer in layers)
    assert any(not torch.equal(layer.get_base_layer().weight, weight) for layer, weight in zip(layers, before))
    stack.unwind()
    adapters.activate({})
    assert not any(layer.merged for layer in layers)
    assert all(torch.equal(layer.get_base_layer().weight, weight) for layer, weight in zip(layers, before))
    assert_unchanged(clean, model_state(pipe))


def test_processors_hooks_and_forwards_come_back(shared):
    pipe, clean = shared
    unet = pipe.unet
    stack = PatchStack()
    name = next(iter(unet.attn_processors)).removesuffix(".processor")
    module = unet.get_submodule(name)
    stack.processors(unet, {name: type(module.processor)()})
    stack.module_processors([unet.get_submodule(name)], lambda attention: type(attention.processor)())
    stack.hook(unet.register_forward_hook(lambda *args: None))
    stack.forward(unet.conv_in, lambda x: x)
    with pytest.raises(RuntimeError, match="already replaced"):
        stack.forward(unet.conv_in, lambda x: x)
    with pytest.raises(PatchLeak, match="conv_in"):
        assert_unchanged(clean, model_state(pipe))
    stack.unwind()
    assert_unchanged(clean, model_state(pipe))


def test_every_undo_runs_newest_first_even_when_one_fails():
    undone = []
    stack = PatchStack()
    stack.on_unwind(lambda: undone.append("first"))
    stack.on_unwind(lambda: 1 / 0)
    stack.on_unwind(lambda: undone.append("last"))
    with pytest.raises(ZeroDivisionError):
        stack.unwind()
    assert undone == ["last", "first"]
    stack.unwind()
    assert undone == ["last", "first"], "an unwound stack is empty"


def test_the_fingerprint_sees_a_changed_weight_and_a_hook():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    before = fingerprint({"model": model})
    with torch.no_grad():
        model[1].weight[0, 0] += 1e-6
    with pytest.raises(PatchLeak, match=r"model:1\.weight"):
        assert_unchanged(before, fingerprint({"model": model}))
    with torch.no_grad():  # swapped values keep the sum; the fingerprint still sees them
        model[1].weight[0, 0] -= 1e-6
        model[0].weight[[0, 1]] = model[0].weight[[1, 0]]
    with pytest.raises(PatchLeak, match=r"model:0\.weight"):
        assert_unchanged(before, fingerprint({"model": model}))
    with torch.no_grad():
        model[0].weight[[0, 1]] = model[0].weight[[1, 0]]
    assert_unchanged(before, fingerprint({"model": model}))
    handle = model[0].register_forward_pre_hook(lambda *args: None)
    with pytest.raises(PatchLeak, match="model:0:module"):
        assert_unchanged(before, fingerprint({"model": model}))
    handle.remove()
    assert_unchanged(before, fingerprint({"model": model}))


def test_generate_checks_the_model_is_clean_afterwards(tiny_sd15_dir, specs):
    """With verify_clean on, a method that leaves a patch fails its own generation."""
    pipe = load_pipeline(tiny_sd15_dir)
    pipe.verify_clean = True

    class LeakyMerge(Merge):
        def start(self, run):
            run.unet.register_forward_hook(lambda *args: None)  # not on run.patches: never removed

    with pytest.raises(PatchLeak, match="unet::module"):
        pipe.generate(PROMPT, specs, LeakyMerge(), **COMMON)
