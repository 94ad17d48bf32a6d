"""Bad and hostile Python API calls: each raises a one-line UserError naming the input, and afterwards
the same pipeline's next Merge equals a fresh pipeline's, bit for bit (issue 21)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ORACLE_PROMPT, ORACLE_SETTINGS
from hostile_files import fifo, misshapen_lora, poisoned_lora, sparse_huge_lora

from loracompose import Composite, LoraSpec, Merge, UserError, load_pipeline
from loracompose.methods import METHODS
from loracompose.validation import Limits

PROMPT, COMMON = ORACLE_PROMPT, ORACLE_SETTINGS  # the request of the fresh_merge oracle (conftest)


@pytest.fixture(scope="module")
def shared(tiny_sd15_dir):
    """The one pipeline every bad request below is made on."""
    return load_pipeline(tiny_sd15_dir)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, sd15_lora_files):
    folder = tmp_path_factory.mktemp("hostile-api")
    lora = sd15_lora_files[0]
    return {
        "inf": poisoned_lora(lora, folder / "inf.safetensors", math.inf),
        "nan": poisoned_lora(lora, folder / "nan.safetensors", math.nan),
        "misshapen": misshapen_lora(lora, folder / "misshapen.safetensors"),
        "fifo": fifo(folder / "fifo.safetensors"),
        "sparse": sparse_huge_lora(folder / "huge.safetensors"),
    }


# (case, generate keyword changes, expected text of the UserError)
BAD_CALLS = [
    ("steps 0", {"steps": 0}, "steps=0 is out of range"),
    ("steps 1.5", {"steps": 1.5}, "steps=1.5: give a whole number"),
    ("steps text", {"steps": "many"}, "steps='many' is not a number"),
    ("steps over the limit", {"steps": 1001}, "steps=1001 is over the step limit 1000; raise it with --max-steps"),
    ("guidance nan", {"guidance_scale": math.nan}, "guidance=nan: give a finite number"),
    ("guidance inf", {"guidance_scale": math.inf}, "guidance=inf: give a finite number"),
    ("guidance negative", {"guidance_scale": -1.0}, "guidance=-1.0 is out of range"),
    ("seed negative", {"seed": -1}, "seed=-1 is out of range"),
    ("seed 2**64", {"seed": 2**64}, "is out of range; use 0 to 1.84467e+19"),
    ("seed 2**70", {"seed": 2**70}, "is out of range"),
    ("seed fraction", {"seed": 0.5}, "seed=0.5: give a whole number"),
    ("last seed overflows", {"seed": 2**64 - 1, "num_images": 2}, "is out of range"),
    ("no images", {"num_images": 0}, "num_images=0 is out of range"),
    ("width 0", {"width": 0}, "width=0: image sizes must be positive multiples of 8"),
    ("width 63", {"width": 63}, "width=63: image sizes must be positive multiples of 8"),
    ("height negative", {"height": -64}, "height=-64: image sizes must be positive"),
    ("height nan", {"height": math.nan}, "height=nan: give a finite number"),
    ("width yes", {"width": True}, "give a whole number, not a yes/no value"),
    ("side over the limit", {"width": 4096}, "width=4096 is over the image side limit 2048; raise it with --max-side"),
    ("pixels over the limit", {"num_images": 4097}, "is over the per-call limit 16777216"),
    ("max batch rows 0", {"max_batch_rows": 0}, "max_batch_rows=0 is out of range"),
    ("output type", {"output_type": "jpg"}, "output_type='jpg'"),
]


def assert_next_merge_is_fresh(pipe, specs, fresh_merge) -> None:
    assert torch.equal(pipe.generate(PROMPT, specs, Merge(), **COMMON).latents, fresh_merge)


@pytest.mark.parametrize("case,changes,expected", BAD_CALLS, ids=[case[0] for case in BAD_CALLS])
def test_bad_generate_arguments(shared, specs, fresh_merge, case, changes, expected):
    with pytest.raises(UserError) as error:
        shared.generate(PROMPT, specs, Merge(), **{**COMMON, **changes})
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert_next_merge_is_fresh(shared, specs, fresh_merge)


@pytest.mark.parametrize("weight,expected", [(math.inf, "give a finite number"), (math.nan, "give a finite number"),
                                             (1e30, "out of range; use -100 to 100"), ("x", "is not a number")])
def test_lora_strengths_are_finite_and_bounded(sd15_lora_files, weight, expected):
    with pytest.raises(UserError, match=expected):
        LoraSpec(sd15_lora_files[0], weight)


@pytest.mark.parametrize("name,expected", [("inf", "has NaN or infinite values"), ("nan", "has NaN or infinite values"),
                                           ("misshapen", "does not fit layer"), ("fifo", "is not a regular file"),
                                           ("sparse", "GiB of tensors, more than the")])
@pytest.mark.parametrize("fuse", [False, True], ids=["merge", "merge-fuse"])
def test_hostile_lora_files_are_refused_and_leave_the_pipeline_clean(shared, specs, fresh_merge, hostile, name,
                                                                      expected, fuse):
    if hostile[name] is None:
        pytest.skip("this file system cannot hold a 4 TiB sparse file")
    with pytest.raises(UserError, match=expected):
        shared.generate(PROMPT, [specs[0], LoraSpec(hostile[name], trigger_words=("zkx",))], Merge(fuse=fuse),
                        **COMMON)
    assert_next_merge_is_fresh(shared, specs, fresh_merge)


@pytest.mark.parametrize("method,expected", [
    (Composite(mixing_weights=(math.nan, 1.0)), "give a finite number"),
    (Composite(mixing_weights=(-1.0, 2.0)), "is out of range"),
    (Composite(mixing_weights=(0.0, 0.0)), "the weights sum to 0"),
    (METHODS["cmlora"](profile_size=99992), "--cmlora-profile-size=99992 is over the image side limit 2048"),
], ids=["mixing-nan", "mixing-negative", "mixing-zero", "profile-size"])
def test_bad_method_settings(shared, specs, fresh_merge, method, expected):
    with pytest.raises(UserError, match=expected):
        shared.generate(PROMPT, specs, method, **COMMON)
    assert_next_merge_is_fresh(shared, specs, fresh_merge)


def test_a_request_that_would_not_fit_in_memory_is_refused_before_allocating(shared, specs, fresh_merge, monkeypatch):
    import loracompose.validation as validation

    monkeypatch.setattr(validation, "_linux_available_memory", lambda: 1024**2)  # 1 MiB free
    with pytest.raises(UserError, match=r"needs about .* GiB but 0\.0 GiB is free on cpu; ask for fewer or smaller"):
        shared.generate(PROMPT, specs, Merge(), **COMMON)
    monkeypatch.undo()
    assert_next_merge_is_fresh(shared, specs, fresh_merge)


def test_raised_limits_let_a_larger_request_through(tiny_sd15_dir):
    pipe = load_pipeline(tiny_sd15_dir)
    pipe.limits = Limits(max_side=32)
    with pytest.raises(UserError, match="width=64 is over the image side limit 32"):
        pipe.generate(PROMPT, [], Merge(), **COMMON)
    pipe.limits = Limits(max_side=64)
    assert pipe.generate(PROMPT, [], Merge(), **COMMON).latents.shape[-1] == 64 // pipe.vae_scale_factor
    with pytest.raises(UserError, match="--max-side=0 is out of range"):
        Limits(max_side=0)


def test_the_quick_check_sees_a_weight_left_changed(shared, specs):
    """The UI's per-request check: a fused delta left behind (or a NaN) in a LoRA layer's base weight
    is a PatchLeak naming the layer."""
    from loracompose.pipelines.patches import PatchLeak, assert_unchanged, quick_fingerprint

    shared.prepare_loras(specs)
    before = quick_fingerprint({"unet": shared.unet})
    layer = next(module for module in shared.unet.modules() if hasattr(module, "lora_A") and module.lora_A)
    weight = layer.get_base_layer().weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)
    try:
        with pytest.raises(PatchLeak, match="base-sample"):
            assert_unchanged(before, quick_fingerprint({"unet": shared.unet}))
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert_unchanged(before, quick_fingerprint({"unet": shared.unet}))
