"""CMLoRA and CMLoRA-Switch: schedule, ordering, profiling, the per-LoRA cache and its cost."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import ShallowProbe, StepWeightedComposite
from loracompose import CMLoRA, CMLoRASwitch, Composite, LoraSpec, UserError, load_pipeline
from loracompose.methods.cmlora import (
    FrequencyOrder,
    dominant_schedule,
    dominant_weights,
    frequency_order,
    end_of_early_phase,
    refresh_steps,
    switch_active_schedule,
)
from loracompose.frequency import ProfileSettings, cache_folder, cached_profiles, high_frequency_score, profile_loras
from loracompose.assets.tiny import build_tiny_lora, tiny_sd15_pipeline

COMMON = dict(guidance_scale=6.0, show_progress=False, append_triggers=False)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def sd15_three(pipelines, tiny_sd15_dir, sd15_lora_files, tmp_path_factory):
    """The tiny SD1.5 pipeline with three LoRA files (copied: the profile tests make folders read-only)."""
    folder = tmp_path_factory.mktemp("cmlora-sd15")
    files = [shutil.copy(path, folder / path.name) for path in sd15_lora_files]
    files.append(build_tiny_lora(tiny_sd15_dir, folder / "park.safetensors", seed=7, trigger_words=["prk"],
                                 category="background", init_scale=2.0))
    return pipelines(tiny_sd15_dir), [LoraSpec(path) for path in files]


@pytest.fixture(scope="module")
def sd15_layout_dir(tmp_path_factory):
    """A tiny model with SD1.5's real block layout: cross-attention in the first down block and the
    last up block, so the shallow path runs LoRA layers (the fixture model has none there)."""
    pipe = tiny_sd15_pipeline(seed=0)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    ).eval()
    out = tmp_path_factory.mktemp("models") / "sd15-layout"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def sd15_layout_loras(sd15_layout_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("layout-loras")
    return [build_tiny_lora(sd15_layout_dir, folder / f"l{k}.safetensors", seed=20 + k, init_scale=2.0) for k in range(2)]


@pytest.fixture(scope="module")
def pipelines():
    """One loaded pipeline per model folder for the whole module (loading is the slow part)."""
    loaded = {}

    def pipeline_for(model_dir):
        if str(model_dir) not in loaded:
            loaded[str(model_dir)] = load_pipeline(model_dir)
        return loaded[str(model_dir)]

    return pipeline_for


# ------------------------------------------------------------------------------------ schedule


def spec_refresh_steps(num_steps: int) -> list[int]:
    """The non-uniform refresh schedule, written out: step 2 / 3 / 2 between floor(0.375T) and floor(0.875T)."""
    first, second = math.floor(0.375 * num_steps), math.floor(0.875 * num_steps)
    return [*range(0, first, 2), *range(first, second, 3), *range(second, num_steps, 2)]


def test_non_uniform_schedule_at_220_steps_has_the_listed_92_refreshes():
    steps = refresh_steps(220)
    assert steps == [*range(0, 81, 2), *range(82, 191, 3), *range(192, 219, 2)]
    assert len(steps) == 92


@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 10, 30, 50, 100, 221])
def test_non_uniform_schedule_matches_spec_and_starts_at_zero(num_steps):
    assert refresh_steps(num_steps) == spec_refresh_steps(num_steps)
    assert refresh_steps(num_steps)[0] == 0


def test_uniform_schedule_is_every_cth_step():
    assert refresh_steps(10, interval=1) == list(range(10))
    assert refresh_steps(10, interval=3) == [0, 3, 6, 9]


def test_early_phase_end_scales_with_steps():
    assert end_of_early_phase(220, 120 / 220) == 120
    assert end_of_early_phase(110, 120 / 220) == 60
    assert end_of_early_phase(12, 0.5) == 6


def names_of(schedule, names):
    return "".join(names[i] for i in schedule)


@pytest.mark.parametrize(
    "scores,num_steps,interval,fraction,expected",
    [
        # N=2: H=[a], Lo=[b]; S=5, R={0,2,3,6,8}; late cycle = Lo ++ H[1:] = [b].
        ({"a": 0.9, "b": 0.1}, 10, 0, 120 / 220, "aaaaaabbbb"),
        # N=3: mean 0.4 -> H=[b, a] by score, Lo=[c]; S=6, R={0,2,4,7,10}; late cycle [c, a].
        ({"a": 0.5, "b": 0.6, "c": 0.1}, 12, 0, 0.5, "bbaabbbcccaa"),
        # N=4, equal scores: all high, ties in user order; uniform c=2.
        ({"a": 0.3, "b": 0.3, "c": 0.3, "d": 0.3}, 9, 2, 0.5, "aabbccdda"),
        # N=3, c=1: the dominant rotates every step; late: [c, a] from step 5.
        ({"a": 0.5, "b": 0.6, "c": 0.1}, 8, 1, 0.5, "bababcac"),
    ],
)
def test_dominant_trace_follows_spec(scores, num_steps, interval, fraction, expected):
    names = list(scores)
    order = frequency_order(names, scores, {}, [None] * len(names))
    refresh = refresh_steps(num_steps, interval)
    schedule = dominant_schedule(num_steps, set(refresh), order, end_of_early_phase(num_steps, fraction))
    assert names_of(schedule, names) == expected


def test_dominant_changes_only_at_refresh_steps_and_late_phase_starts_with_low_lora():
    names = ["char", "cloth", "style", "bg"]
    order = frequency_order(names, {"char": 0.9, "cloth": 0.8, "style": 0.7, "bg": 0.1}, {}, [None] * 4)
    assert (order.high, order.low) == ((0, 1, 2), (3,))
    refresh = set(refresh_steps(220))
    schedule = dominant_schedule(220, refresh, order, 120)
    assert all(schedule[i] == schedule[i - 1] for i in range(1, 220) if i not in refresh)
    assert names_of([schedule[i] for i in sorted(refresh) if i <= 120][:4], "ABCD") == "ABCA"
    late = [schedule[i] for i in sorted(refresh) if i > 120]
    assert late[:4] == [3, 1, 2, 3], "late: background first, then the high LoRAs but the first"


def test_dominant_weights_match_spec_table():
    table = {2: (0.600, 0.400), 3: (0.556, 0.222), 4: (0.538, 0.154), 5: (0.529, 0.118)}
    for num_loras, (dominant, other) in table.items():
        w_dom, w_non = dominant_weights(num_loras)
        assert (round(w_dom, 3), round(w_non, 3)) == (dominant, other)
        assert math.isclose(w_dom + (num_loras - 1) * w_non, 1.0)


# ------------------------------------------------------------------------------------ ordering


def test_ordering_by_scores_mean_threshold_ties_in_user_order():
    order = frequency_order(["a", "b", "c", "d"], {"a": 0.2, "b": 0.6, "c": 0.6, "d": 0.1}, {}, [None] * 4)
    assert order == FrequencyOrder(high=(1, 2), low=(0, 3), sources=("score",) * 4)


def test_ordering_hand_classes_override_scores_and_explicit_threshold():
    order = frequency_order(["a", "b", "c"], {"a": 0.9, "b": 0.5, "c": 0.4}, {"a": "low"}, [None] * 3, threshold=0.45)
    assert (order.high, order.low, order.sources) == ((1,), (0, 2), ("hand", "score", "score"))


def test_ordering_falls_back_to_category_only_without_score_or_class():
    order = frequency_order(["char", "bg", "x"], {}, {}, ["character", "background", None])
    assert (order.high, order.low, order.sources) == ((0, 2), (1,), ("category",) * 3)
    scored = frequency_order(["char", "bg"], {"char": 0.1, "bg": 0.9}, {}, ["character", "background"])
    assert (scored.high, scored.low) == ((1,), (0,)), "scores decide, not categories"


def test_switch_variant_switches_after_phase_and_respects_period_for_two_loras():
    order = frequency_order(["a", "b"], {"a": 0.9, "b": 0.1}, {}, [None, None])
    assert names_of(switch_active_schedule(10, order, 2, 5), "ab") == "aaaaaabbbb"
    order3 = frequency_order(["a", "b", "c"], {"a": 0.5, "b": 0.6, "c": 0.1}, {}, [None] * 3)
    assert names_of(switch_active_schedule(12, order3, 2, 6), "abc") == "bbaabbaccccc"


# ------------------------------------------------------------------------------------ profiling


def random_checkerboard(size: int, tile: int, rng: np.random.Generator) -> np.ndarray:
    """Black and white tiles at random: edges at every scale (a regular checkerboard's spectrum is
    a few spikes, which the ring mean of a log spectrum barely sees)."""
    cells = rng.integers(0, 2, (size // tile + 1, size // tile + 1)).astype(float)
    return np.repeat(np.kron(cells, np.ones((tile, tile)))[:size, :size, None], 3, axis=-1)


def gradient(size: int) -> np.ndarray:
    ramp = np.linspace(0.0, 1.0, size)
    return np.repeat((np.add.outer(ramp, ramp) / 2)[..., None], 3, axis=-1)


@pytest.mark.parametrize("size", [2, 8, 64, 100, 512])
def test_scores_are_finite_at_every_size_and_checkerboard_beats_gradient(size):
    rng = np.random.default_rng(0)
    noise = 0.01 * rng.random((size, size, 3))  # the same faint noise on both: no exact zeros in the spectrum
    board = high_frequency_score(random_checkerboard(size, 2, rng) + noise)
    smooth = high_frequency_score(gradient(size) + noise)
    assert math.isfinite(board) and math.isfinite(smooth)
    if size >= 8:
        assert board > smooth + 0.2
    assert math.isfinite(high_frequency_score(np.zeros((size, size, 3)))), "a flat image has no peak to divide by"


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    """An empty ``$LORACOMPOSE_HOME``, so a profile is cached by this test and no other."""
    monkeypatch.setenv("LORACOMPOSE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_profiling_generates_once_then_reads_the_cache(sd15_three, fresh_home, monkeypatch):
    pipe, specs = sd15_three
    settings = ProfileSettings(size=64, steps=2)
    calls = []
    generate = pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    first = profile_loras(pipe, specs[:2], settings)
    assert len(calls) == 2 and all(math.isfinite(score) for score in first.values())
    assert [entry["score"] for entry in cached_profiles(specs[0].path)] == [first[specs[0].path.stem]]
    assert profile_loras(pipe, specs[:2], settings) == first and len(calls) == 2
    profile_loras(pipe, specs[:1], ProfileSettings(size=64, steps=3))
    assert len(calls) == 3, "other settings are another key"

    method = CMLoRA(frequency_classes={specs[2].path.stem: "low"})
    method.profile_frequencies(pipe, specs, settings)
    assert len(calls) == 3 and set(method.frequency_scores) == {specs[0].path.stem, specs[1].path.stem}


def test_generate_profiles_the_loras_through_the_prepare_hook(sd15_three, fresh_home):
    """generate() calls the method's prepare: LoRAs with neither score nor class are profiled with the
    method's profile settings before the loop, so the scores decide their classes."""
    pipe, specs = sd15_three
    names = [spec.path.stem for spec in specs]
    method = CMLoRA(frequency_classes={names[2]: "low"}, profile_size=64, profile_steps=2)
    result = pipe.generate("a cat", specs, method, steps=2, output_type="latent", **COMMON)
    assert result.method["frequency_order"]["class_sources"] == {names[0]: "score", names[1]: "score", names[2]: "hand"}
    assert method.frequency_scores == profile_loras(pipe, specs[:2], ProfileSettings(size=64, steps=2))
    unprofiled = pipe.generate("a cat", specs, CMLoRA(profile=False), steps=2, output_type="latent", **COMMON)
    assert set(unprofiled.method["frequency_order"]["class_sources"].values()) == {"category"}


def test_profiles_live_under_home_keyed_by_content_and_never_beside_the_lora(sd15_three, fresh_home, tmp_path,
                                                                               monkeypatch):
    """A read-only LoRA folder gets no file and still caches; a copy of the same bytes elsewhere
    reuses the profile; changed bytes are profiled again."""
    pipe, specs = sd15_three
    settings = ProfileSettings(size=64, steps=2)
    calls = []
    generate = pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    folder = tmp_path / "read-only-loras"
    folder.mkdir()
    lora = LoraSpec(shutil.copy(specs[0].path, folder / "mine.safetensors"))
    folder.chmod(0o555)
    try:
        score = profile_loras(pipe, [lora], settings)["mine"]
    finally:
        folder.chmod(0o755)
    assert sorted(p.name for p in folder.iterdir()) == ["mine.safetensors"], "nothing written beside the LoRA"
    assert cache_folder() == fresh_home / "frequency-profiles" and len(list(cache_folder().iterdir())) == 1
    assert [entry["score"] for entry in cached_profiles(lora.path)] == [score] and len(calls) == 1

    moved = LoraSpec(shutil.copy(lora.path, tmp_path / "elsewhere.safetensors"), name="mine")
    assert profile_loras(pipe, [moved], settings) == {"mine": score} and len(calls) == 1, "same bytes, same profile"
    with safe_open(str(moved.path), framework="pt") as handle:
        metadata = {**(handle.metadata() or {}), "note": "the same weights in a different file"}
    save_file(load_file(moved.path), moved.path, metadata=metadata)
    profile_loras(pipe, [moved], settings)
    assert len(calls) == 2 and len(list(cache_folder().iterdir())) == 2, "the key is the file's sha256"


# ------------------------------------------------------------------------------------ the cache


@pytest.mark.parametrize("model", ["sd15", "sdxl", "sd15-layout"])
@pytest.mark.parametrize("batched", [True, False])
def test_shallow_pass_with_fresh_cache_equals_full_unet(
    model, batched, pipelines, tiny_sd15_dir, tiny_sdxl_dir, sd15_lora_files, sdxl_lora_files, sd15_layout_dir,
    sd15_layout_loras,
):
    model_dir, files = {"sd15": (tiny_sd15_dir, sd15_lora_files), "sdxl": (tiny_sdxl_dir, sdxl_lora_files),
                        "sd15-layout": (sd15_layout_dir, sd15_layout_loras)}[model]
    probe = ShallowProbe(batched=batched)
    size = 32 if model == "sd15-layout" else None  # full-resolution attention: keep it to 16 x 16 latents
    pipelines(model_dir).generate("a cat", [LoraSpec(p) for p in files], probe, steps=2, width=size, height=size,
                                  output_type="latent", **COMMON)
    assert max(probe.shallow_vs_full) <= 1e-5
    assert max(probe.full_vs_plain) == 0.0, "capturing the deep feature must not change the full pass"
    assert min(probe.stale_vs_full) > 1e-4, "a cache from another step must change the output"


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_interval_one_equals_uncached_weighted_composite(model, pipelines, tiny_sd15_dir, tiny_sdxl_dir, sd15_three,
                                                         sdxl_lora_files, tmp_path_factory):
    if model == "sd15":
        pipe, specs = sd15_three
    else:
        folder = tmp_path_factory.mktemp("sdxl-three")
        files = [*sdxl_lora_files, build_tiny_lora(tiny_sdxl_dir, folder / "park.safetensors", seed=7, init_scale=2.0)]
        pipe, specs = pipelines(tiny_sdxl_dir), [LoraSpec(p) for p in files]
    names = [spec.path.stem for spec in specs]
    classes = dict(zip(names, ["high", "high", "low"]))
    # T=6, phase 0.5 -> S=3; every step refreshes: early H=[0, 1] alternate, late cycle [2, 1].
    dominants = [0, 1, 0, 1, 2, 1]
    weights = tuple(tuple(5 / 9 if j == d else 2 / 9 for j in range(3)) for d in dominants)
    kwargs = dict(COMMON, steps=6, output_type="latent", seed=3)
    ours = pipe.generate("a cat", specs, CMLoRA(frequency_classes=classes, phase_fraction=0.5, cache_interval=1), **kwargs)
    reference = pipe.generate("a cat", specs, StepWeightedComposite(weights_per_step=weights), **kwargs)
    torch.testing.assert_close(ours.latents, reference.latents, atol=1e-4, rtol=0)
    assert (ours.stats.partial_unet_calls, ours.stats.unet_calls) == (0, 6)
    plain = pipe.generate("a cat", specs, Composite(), **kwargs)
    assert (ours.latents - plain.latents).abs().max() > 1e-3, "the dominant weights must matter"


def expected_counts(num_steps: int, num_loras: int, rows_per_branch: int = 2, batched: bool = True) -> dict[str, int]:
    """Passes per the cost table (docs/methods/cmlora.md): step 0 all full, refresh steps 1 full +
    N-1 shallow, other steps N shallow; one call per kind and step when batched."""
    refresh = set(spec_refresh_steps(num_steps))
    full = [num_loras if i == 0 else (1 if i in refresh else 0) for i in range(num_steps)]
    shallow = [num_loras - f for f in full]
    calls = (lambda n: sum(1 for k in n if k)) if batched else sum
    return {"unet_calls": calls(full), "unet_rows": rows_per_branch * sum(full),
            "partial_unet_calls": calls(shallow), "partial_unet_rows": rows_per_branch * sum(shallow)}


@pytest.mark.parametrize("num_loras,num_steps,batched", [(2, 10, True), (3, 10, True), (3, 13, False), (1, 6, True)])
def test_stats_count_full_and_partial_passes_exactly(sd15_three, num_loras, num_steps, batched):
    pipe, specs = sd15_three
    forwards = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    try:
        # profile=False: the hook counts this generation's forwards only, no profiling image's
        result = pipe.generate("a cat", specs[:num_loras], CMLoRA(batched=batched, profile=False), steps=num_steps,
                               output_type="latent", **COMMON)
    finally:
        handle.remove()
    stats = result.stats
    counts = {key: getattr(stats, key) for key in ("unet_calls", "unet_rows", "partial_unet_calls", "partial_unet_rows")}
    assert counts == expected_counts(num_steps, num_loras, batched=batched)
    assert (len(forwards), sum(forwards)) == (stats.unet_calls, stats.unet_rows), "shallow passes skip unet.forward"


def test_cached_batched_equals_sequential(sd15_three):
    pipe, specs = sd15_three
    kwargs = dict(COMMON, steps=10, output_type="latent", seed=1)
    batched = pipe.generate("a cat", specs, CMLoRA(), **kwargs)
    sequential = pipe.generate("a cat", specs, CMLoRA(batched=False), **kwargs)
    assert "batched" in batched.stats.execution and "sequential" in sequential.stats.execution
    torch.testing.assert_close(batched.latents, sequential.latents, atol=1e-4, rtol=0)


def test_sdxl_default_cmlora_runs_with_cache(pipelines, tiny_sdxl_dir, sdxl_lora_files):
    result = pipelines(tiny_sdxl_dir).generate("a cat", [LoraSpec(p) for p in sdxl_lora_files], CMLoRA(profile=False),
                                                   steps=6, output_type="np", **COMMON)
    assert result.stats.partial_unet_calls > 0 and np.isfinite(result.images[0]).all()
    assert result.method["frequency_order"]["class_sources"] == {"character": "category", "style": "category"}


def test_cmlora_switch_activates_the_scheduled_lora(sd15_three):
    pipe, specs = sd15_three
    names = [spec.path.stem for spec in specs]
    active = []

    def record(unet, args):
        probe = next(m for m in unet.modules() if hasattr(m, "lora_A") and len(m.lora_A))
        active.append(tuple(probe.active_adapters))

    handle = pipe.unet.register_forward_pre_hook(record)
    method = CMLoRASwitch(frequency_scores=dict(zip(names, [0.5, 0.6, 0.1])), phase_fraction=0.5, period=2)
    try:
        pipe.generate("a cat", specs, method, steps=12, output_type="latent", **COMMON)
    finally:
        handle.remove()
    expected = [names[i] for i in (1, 1, 0, 0, 1, 1, 0, 2, 2, 2, 2, 2)]
    assert active == [(name,) for name in expected]


@pytest.mark.parametrize(
    "method,message",
    [
        (CMLoRA(cache_interval=-1), "cache interval"),
        (CMLoRA(refresh_intervals=(2, 0, 2)), "refresh intervals"),
        (CMLoRA(refresh_breakpoints=(0.9, 0.5)), "breakpoints"),
        (CMLoRA(phase_fraction=1.5), "phase fraction"),
        (CMLoRA(frequency_classes={"character": "medium"}), "'high' or 'low'"),
        (CMLoRA(frequency_scores={"nobody": 0.3}), "not one of the LoRAs"),
        (CMLoRA(frequency_scores={"character": float("nan")}), "profile the LoRA again"),
        (CMLoRASwitch(period=0), "period"),
    ],
)
def test_bad_settings_raise_user_error(sd15_three, method, message):
    pipe, specs = sd15_three
    with pytest.raises(UserError, match=message):
        pipe.generate("a cat", specs, method, steps=2, **COMMON)


def test_cli_profiles_then_generates_with_cmlora(sd15_three, tiny_sd15_dir, tmp_path, capsys):
    from loracompose.cli.main import main

    _, specs = sd15_three
    out = tmp_path / "out"
    args = ["generate", "--model", tiny_sd15_dir, "--prompt", "a cat", "--method", "cmlora", "--steps", 6, "--quiet",
            "--cmlora-profile-size", 64, "--cmlora-profile-steps", 1, "--cmlora-class", f"{specs[2].path.stem}=low",
            "--out", out, *[arg for spec in specs for arg in ("--lora", spec.path)]]
    assert main([str(a) for a in args]) == 0
    record = json.loads((out / "cmlora-0.json").read_text())
    sources = record["method_settings"]["frequency_order"]["class_sources"]
    assert sources == {specs[0].path.stem: "score", specs[1].path.stem: "score", specs[2].path.stem: "hand"}
    assert record["stats"]["partial_unet_calls"] > 0
    assert main(["generate", "--model", str(tiny_sd15_dir), "--method", "cmlora", "--cmlora-class", "oops"]) == 2
    assert "--cmlora-class 'oops'" in capsys.readouterr().err
