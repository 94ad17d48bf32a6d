"""Regional LoRA and TARA on FLUX.1 and SD3 (tiny folders saved and loaded back through load_pipeline),
against their oracles: whole-image regions == Merge, empty regions == the base model, delta == latent
mode for one LoRA on the whole image, an explicit masked computation of one layer per stream; TARA with
all-ones token masks == Merge, its text K/V deltas off at every token that is not a trigger token;
exact transformer call/row counts; the CLI on both families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loracompose import LoraSpec, UserError, load_pipeline
from loracompose.assets.tiny import build_tiny_flux, build_tiny_lora, build_tiny_sd3
from loracompose.attention.dit_layers import stream_role, text_key_value_layers
from loracompose.attention.lora_deltas import active_adapters, adapter_delta
from loracompose.methods.merge import Merge
from loracompose.methods.regional import Regional
from loracompose.methods.tara import Tara

PROMPT = "a zkx beside a qwv"
SIZE = 32
STEPS = 2
WHOLE = (0.0, 0.0, 1.0, 1.0)
LEFT, RIGHT = (0.0, 0.0, 0.6, 0.75), (0.4, 0.0, 1.0, 0.75)
# The same sums through differently ordered adds / batched rows: float rounding only.
TOLERANCE = dict(rtol=0, atol=1e-5)
BUILDERS = {"flux": build_tiny_flux, "sd3": build_tiny_sd3}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def dits(tmp_path_factory) -> dict[str, tuple[Path, object, list[Path]]]:
    made = {}
    for name, build in BUILDERS.items():
        root = tmp_path_factory.mktemp(f"tiny-{name}")
        model = build(root / "model", seed=0)
        loras = [build_tiny_lora(model, root / f"{stem}.safetensors", seed=seed, trigger_words=[trigger],
                                 init_scale=2.0)
                 for stem, trigger, seed in (("character", "zkx", 1), ("other", "qwv", 2))]
        made[name] = (model, load_pipeline(model, device="cpu"), loras)
    return made


def _specs(loras, weights=(0.8, 1.0)) -> list[LoraSpec]:
    return [LoraSpec(path, weight, category="object") for path, weight in zip(loras, weights)]


def _generate(pipe, specs, method, **kwargs):
    options = dict(steps=STEPS, width=SIZE, height=SIZE, output_type="latent", append_triggers=False,
                   show_progress=False)
    return pipe.generate(PROMPT, specs, method, **{**options, **kwargs})


def _rows_per_image(family: str) -> int:
    return 1 if family == "flux" else 2  # FLUX: distilled guidance, no CFG halves


def _restored(module) -> bool:
    return not any("forward" in sub.__dict__ for sub in module.modules())


# ------------------------------------------------------------------------------------ regional


def test_regional_whole_image_is_merge_and_empty_regions_the_base_model(family, dits):
    _, pipe, loras = dits[family]
    specs = _specs(loras)
    merged = _generate(pipe, specs, Merge())
    whole = _generate(pipe, specs, Regional(boxes=[WHOLE, WHOLE]))
    torch.testing.assert_close(whole.latents, merged.latents, **TOLERANCE)
    rows = _rows_per_image(family)
    assert (whole.stats.unet_calls, whole.stats.unet_rows) == (STEPS, STEPS * rows)

    base = _generate(pipe, [], Merge())
    empty = [torch.zeros(4, 4), torch.zeros(4, 4)]
    torch.testing.assert_close(_generate(pipe, specs, Regional(masks=empty)).latents, base.latents, **TOLERANCE)
    assert torch.equal(_generate(pipe, specs, Regional(masks=empty, mode="latent")).latents, base.latents)
    assert (merged.latents - base.latents).abs().max() > 1e-2, "the LoRAs change the result"
    assert _restored(pipe.transformer), "PEFT forwards restored"


def test_regional_one_lora_on_the_whole_image_is_merge_in_both_modes(family, dits):
    _, pipe, loras = dits[family]
    spec = _specs(loras)[:1]
    merged = _generate(pipe, spec, Merge())
    latent = _generate(pipe, spec, Regional(boxes=[WHOLE], mode="latent"))
    delta = _generate(pipe, spec, Regional(boxes=[WHOLE]))
    assert torch.equal(latent.latents, merged.latents), "the base branch covers no token, so it is not run"
    torch.testing.assert_close(delta.latents, latent.latents, **TOLERANCE)
    assert latent.stats.unet_rows == delta.stats.unet_rows == STEPS * _rows_per_image(family)


def test_regional_boxes_cost_one_pass_or_n_plus_one_branches(family, dits):
    _, pipe, loras = dits[family]
    specs = _specs(loras)
    merged = _generate(pipe, specs, Merge())
    delta = _generate(pipe, specs, Regional(boxes=[LEFT, RIGHT]))
    latent = _generate(pipe, specs, Regional(boxes=[LEFT, RIGHT], mode="latent"))
    rows = _rows_per_image(family)
    assert (delta.stats.unet_calls, delta.stats.unet_rows) == (STEPS, STEPS * rows)
    assert (latent.stats.unet_calls, latent.stats.unet_rows) == (STEPS, STEPS * 3 * rows), "base + 2, batched"
    for result in (delta, latent):
        assert (result.latents - merged.latents).abs().max() > 1e-3
    assert (delta.latents - latent.latents).abs().max() > 1e-4


def test_regional_latent_couple_keeps_each_branch_in_its_tokens(family, dits):
    """Latent mode with boxes that tile the image: each half of the prediction is its LoRA's own."""
    _, pipe, loras = dits[family]
    specs = _specs(loras)
    halves = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    couple = _generate(pipe, specs, Regional(boxes=halves, mode="latent"), steps=1)
    alone = [_generate(pipe, [spec], Merge(), steps=1).latents for spec in specs]
    columns = couple.latents.shape[-1] if family == "sd3" else None
    if family == "sd3":  # (B, C, H, W): left half from the first LoRA, right half from the second
        torch.testing.assert_close(couple.latents[..., : columns // 2], alone[0][..., : columns // 2], **TOLERANCE)
        torch.testing.assert_close(couple.latents[..., columns // 2:], alone[1][..., columns // 2:], **TOLERANCE)
    else:  # packed tokens (B, rows*columns, C), row-major: the first half of each token row is left
        grid_columns = SIZE // pipe.vae_scale_factor // pipe.token_patch
        left = (torch.arange(couple.latents.shape[1]) % grid_columns) < grid_columns // 2
        torch.testing.assert_close(couple.latents[:, left], alone[0][:, left], **TOLERANCE)
        torch.testing.assert_close(couple.latents[:, ~left], alone[1][:, ~left], **TOLERANCE)


def _every_layer_lora(pipe, path: Path, seed: int, rank: int = 2) -> Path:
    """A diffusers-format LoRA on every Linear and Conv2d of the transformer: embeddings, modulations
    (vector outputs), both streams, FLUX's single blocks, SD3's patchify convolution."""
    from safetensors.torch import save_file

    from peft.tuners.lora import LoraLayer

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    wrapped = [name + "." for name, module in pipe.transformer.named_modules() if isinstance(module, LoraLayer)]
    for name, module in pipe.transformer.named_modules():
        if any(name.startswith(prefix) for prefix in wrapped):  # a LoRA layer's own parts
            continue
        module = module.get_base_layer() if isinstance(module, LoraLayer) else module
        if isinstance(module, torch.nn.Linear):
            shapes = (rank, module.in_features), (module.out_features, rank)
        elif isinstance(module, torch.nn.Conv2d):
            shapes = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
        else:
            continue
        for part, shape in zip(("lora_A", "lora_B"), shapes):
            tensors[f"transformer.{name}.{part}.weight"] = torch.randn(*shape, generator=generator) * 0.3
    save_file(tensors, str(path))
    return path


def _masked_layer_outputs(pipe, specs, method) -> dict[str, list]:
    """Per LoRA layer of the transformer, at its first call: [base(x), {adapter: Δ(x)}, output]."""
    seen: dict[str, list] = {}
    handles = []

    def hook(name):
        def record(layer, args, output):
            if name not in seen:
                x = args[0]
                deltas = {adapter: adapter_delta(layer, x, adapter) for adapter in active_adapters(layer)}
                seen[name] = [layer.get_base_layer()(x), deltas, output]
        return record

    pipe.prepare_loras(specs)  # the LoRA layers exist before the hooks go on
    for name, module in pipe.transformer.named_modules():
        if hasattr(module, "lora_A") and any(module.lora_A):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        _generate(pipe, specs, method, steps=1)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("lora_kind", ["attention", "every layer"])
def test_regional_layers_add_masked_deltas_per_stream(family, dits, lora_kind, tmp_path):
    """Each LoRA layer's output == base + Σ_k m_k ⊙ Δ_k: m_k the region on image tokens (and on the
    patchify convolution's map), 1 on text tokens and on vector outputs (both regions are non-empty)."""
    _, pipe, loras = dits[family]
    if lora_kind == "every layer":
        loras = [_every_layer_lora(pipe, tmp_path / f"every{seed}.safetensors", seed) for seed in (1, 2)]
    seen = _masked_layer_outputs(pipe, _specs(loras), Regional(boxes=[(0.0, 0.0, 0.5, 1.0), (0.0, 0.5, 1.0, 1.0)]))
    rows, columns = (SIZE // pipe.vae_scale_factor // pipe.token_patch,) * 2
    left = (torch.arange(rows * columns) % columns < columns // 2).float()
    bottom = (torch.arange(rows * columns) // columns >= rows // 2).float()
    names = [path.stem for path in loras]
    roles = set()
    for name, (base, deltas, output) in seen.items():
        role = "vector" if output.ndim == 2 else "conv" if output.ndim == 4 else stream_role(name)
        roles.add(role)
        masks = []
        for region in (left, bottom):
            if role == "vector":
                masks.append(torch.ones(()))
            elif role == "conv":
                masks.append(region.view(1, 1, rows, columns))
            else:  # image tokens: the region; FLUX's joint sequence puts text first
                mask = torch.ones(output.shape[1])
                if role != "text":
                    mask[output.shape[1] - rows * columns:] = region
                masks.append(mask.view(1, -1, 1))
        expected = base + deltas[names[0]] * masks[0] + deltas[names[1]] * masks[1]
        torch.testing.assert_close(output, expected, **TOLERANCE)
    expected_roles = {"image", "text", "joint"} if family == "flux" else {"image", "text"}
    if lora_kind == "every layer":
        expected_roles |= {"vector", "conv"} if family == "sd3" else {"vector"}
    assert roles == expected_roles


def test_regional_oracles_hold_with_loras_on_every_layer(family, dits, tmp_path):
    _, pipe, _ = dits[family]
    specs = _specs([_every_layer_lora(pipe, tmp_path / f"every{seed}.safetensors", seed) for seed in (3, 4)])
    merged = _generate(pipe, specs, Merge())
    torch.testing.assert_close(_generate(pipe, specs, Regional(boxes=[WHOLE, WHOLE])).latents, merged.latents,
                               **TOLERANCE)
    base = _generate(pipe, [], Merge())
    empty = [torch.zeros(2, 2), torch.zeros(2, 2)]
    torch.testing.assert_close(_generate(pipe, specs, Regional(masks=empty)).latents, base.latents, **TOLERANCE)
    assert (merged.latents - base.latents).abs().max() > 1e-2
    assert _restored(pipe.transformer)


def test_regional_refusals_on_dits_are_one_line(family, dits):
    _, pipe, loras = dits[family]
    with pytest.raises(UserError, match=r"^regional: region prompts on FLUX/SD3 need mode='latent'") as error:
        _generate(pipe, _specs(loras), Regional(boxes=[LEFT, RIGHT], region_prompts=["a zkx", ""]))
    assert "\n" not in str(error.value)
    wide = torch.ones(4, 8)
    with pytest.raises(UserError, match=r"the mask of LoRA character is 8x4"):
        _generate(pipe, _specs(loras)[:1], Regional(masks=[wide]))
    prompts = _generate(pipe, _specs(loras), Regional(boxes=[LEFT, RIGHT], region_prompts=["a zkx", "a qwv"],
                                                      mode="latent"))
    plain = _generate(pipe, _specs(loras), Regional(boxes=[LEFT, RIGHT], mode="latent"))
    assert (prompts.latents - plain.latents).abs().max() > 1e-4, "latent mode's branches take the region prompts"


# ------------------------------------------------------------------------------------ TARA


def _tara_specs(loras) -> list[LoraSpec]:
    return [LoraSpec(path, weight, trigger_words=[word])
            for path, weight, word in zip(loras, (0.8, 1.0), ("zkx", "qwv"))]


class AllTokensTara(Tara):
    """TARA whose token masks are all ones on every row: the masked layers must then be Merge's."""

    def start(self, run):
        super().start(run)
        # longer than any text sequence: the layers cut a mask to the encoded length, padding included
        self._token_masks.masks = {name: torch.ones(mask.shape[0], 4096)
                                   for name, mask in self._token_masks.masks.items()}


def _word_positions(tokenizer, word: str, length: int | None = None) -> list[int]:
    """Where the word's ids sit in the prompt's ids, found by plain sub-sequence search (the oracle)."""
    ids = tokenizer(PROMPT, truncation=True, max_length=length or 512).input_ids
    pieces = tokenizer(" " + word, add_special_tokens=False).input_ids
    return [start + k for start in range(len(ids) - len(pieces) + 1) if ids[start:start + len(pieces)] == pieces
            for k in range(len(pieces))]


def test_tara_with_all_ones_masks_is_merge(family, dits):
    _, pipe, loras = dits[family]
    specs = _tara_specs(loras)
    merged = _generate(pipe, specs, Merge())
    everywhere = _generate(pipe, specs, AllTokensTara())
    torch.testing.assert_close(everywhere.latents, merged.latents, **TOLERANCE)
    tara = _generate(pipe, specs, Tara())
    assert (tara.latents - merged.latents).abs().max() > 1e-4, "the masks change the result"
    rows = _rows_per_image(family)
    assert (tara.stats.unet_calls, tara.stats.unet_rows) == (STEPS, STEPS * rows)
    fused = _generate(pipe, specs, Tara(fuse=True))
    torch.testing.assert_close(fused.latents, tara.latents, rtol=0, atol=1e-4)
    assert _restored(pipe.transformer)


def test_tara_trigger_positions_come_from_the_joint_text_tokenizers(family, dits):
    _, pipe, loras = dits[family]
    method = Tara()
    _generate(pipe, _tara_specs(loras), method, steps=1)
    for word, name in (("zkx", loras[0].stem), ("qwv", loras[1].stem)):
        if family == "flux":  # the joint text stream is T5's
            expected = _word_positions(pipe.tokenizer_2, word)
        else:  # SD3: 77 CLIP positions (CLIP-L and CLIP-G share them), then T5's
            clip = set(_word_positions(pipe.tokenizer, word, 77)) | set(_word_positions(pipe.tokenizer_2, word, 77))
            expected = sorted(clip) + [77 + p for p in _word_positions(pipe.tokenizer_3, word)]
        assert expected and method.positions[name].positions == expected


def test_tara_text_kv_deltas_act_only_at_trigger_tokens(family, dits):
    """On every masked layer: non-trigger text tokens (and every unconditional row) get the base
    projection exactly, a LoRA's trigger tokens of the conditional rows its delta; image rows Merge's."""
    _, pipe, loras = dits[family]
    seen: dict[str, tuple] = {}
    handles = []

    def hook(name):
        def record(layer, args, output):
            x = args[0]
            deltas = {adapter: adapter_delta(layer, x, adapter) for adapter in active_adapters(layer)}
            seen.setdefault(name, (layer.get_base_layer()(x), deltas, output))
        return record

    method = Tara()
    pipe.prepare_loras(_tara_specs(loras))  # the LoRA layers exist before the hooks go on
    masked = text_key_value_layers(pipe.transformer)
    for name, layer in masked:
        handles.append(layer.register_forward_hook(hook(name)))
    try:
        _generate(pipe, _tara_specs(loras), method, steps=1)
    finally:
        for handle in handles:
            handle.remove()
    assert {stream_role(name) for name, _ in masked} == ({"text", "joint"} if family == "flux" else {"text"})
    trigger = sorted({p for found in method.positions.values() for p in found.positions})
    image_tokens = (SIZE // pipe.vae_scale_factor // pipe.token_patch) ** 2
    for name, (base, deltas, output) in seen.items():
        text = output.shape[1] - image_tokens if stream_role(name) == "joint" else output.shape[1]
        cond = slice(output.shape[0] // 2, None) if family == "sd3" else slice(None)  # SD3: [uncond, cond]
        other = [t for t in range(text) if t not in trigger]
        torch.testing.assert_close(output[cond][:, other], base[cond][:, other], rtol=0, atol=0)
        merged = base + sum(deltas.values())
        torch.testing.assert_close(output[cond][:, text:], merged[cond][:, text:], **TOLERANCE)  # image rows
        for adapter, found in method.positions.items():
            own = found.positions
            torch.testing.assert_close(output[cond][:, own], (base + deltas[adapter])[cond][:, own], **TOLERANCE)
            assert deltas[adapter][cond][:, own].abs().max() > 1e-3, "the LoRA's delta is not zero there"
        if family == "sd3":
            torch.testing.assert_close(output[:output.shape[0] // 2], base[:output.shape[0] // 2], rtol=0, atol=0)


def test_tara_refusals_on_dits_are_one_line(family, dits):
    _, pipe, loras = dits[family]
    with pytest.raises(UserError, match=r"^tara self_attention='off' is for SD1\.5/SDXL UNets; on FLUX/SD3"):
        _generate(pipe, _tara_specs(loras), Tara(self_attention="off"))
    with pytest.raises(UserError, match=r"^TARA: no trigger word of LoRA other \(vvv\)"):
        _generate(pipe, [_tara_specs(loras)[0], LoraSpec(loras[1], trigger_words=["vvv"])], Tara())


# ------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("method,extra", [
    ("regional", ["--box", "0,0,0.5,1", "--box", "0.5,0,1,1"]),
    ("regional", ["--box", "0,0,0.5,1", "--box", "0.5,0,1,1", "--regional-mode", "latent"]),
    ("tara", []),
])
def test_cli_runs_regional_and_tara_on_dits(family, dits, method, extra, tmp_path, capsys):
    from loracompose.cli.main import main

    model, _, loras = dits[family]
    out = tmp_path / "out"
    code = main(["generate", "--model", str(model), "--prompt", PROMPT, "--lora", f"{loras[0]}:0.8",
                 "--lora", str(loras[1]), "--method", method, *extra, "--width", str(SIZE), "--height", str(SIZE),
                 "--steps", "2", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / f"{method}-0.png").exists()
    assert f"{method}: 2 transformer calls" in captured.err


def test_cli_refuses_region_prompts_in_delta_mode_on_dits(family, dits, tmp_path, capsys):
    from loracompose.cli.main import main

    model, _, loras = dits[family]
    code = main(["generate", "--model", str(model), "--prompt", PROMPT, "--lora", str(loras[0]), "--method",
                 "regional", "--region-prompt", "a zkx", "--width", str(SIZE), "--height", str(SIZE), "--steps", "2",
                 "--quiet", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("loracompose: error: regional: region prompts on FLUX/SD3 need mode='latent'")


def test_tara_with_loras_on_every_layer(family, dits, tmp_path):
    """All-ones masks == Merge and fused == unfused when the LoRAs also adapt embeddings, modulations,
    feed-forwards and (SD3) the patchify convolution."""
    _, pipe, _ = dits[family]
    files = [_every_layer_lora(pipe, tmp_path / f"every{seed}.safetensors", seed) for seed in (5, 6)]
    specs = [LoraSpec(path, 0.7, trigger_words=[word]) for path, word in zip(files, ("zkx", "qwv"))]
    merged = _generate(pipe, specs, Merge())
    torch.testing.assert_close(_generate(pipe, specs, AllTokensTara()).latents, merged.latents, **TOLERANCE)
    tara = _generate(pipe, specs, Tara())
    torch.testing.assert_close(_generate(pipe, specs, Tara(fuse=True)).latents, tara.latents, rtol=0, atol=1e-4)
    assert (tara.latents - merged.latents).abs().max() > 1e-4


def test_regional_mask_images_place_like_boxes_on_the_token_grid(family, dits, tmp_path):
    """Grayscale mask files (any size with the image's aspect) give the same token masks as boxes."""
    from PIL import Image

    _, pipe, loras = dits[family]
    files = []
    for index, (x0, x1) in enumerate(((0, 40), (40, 80))):
        image = Image.new("L", (80, 80), 0)
        image.paste(255, (x0, 0, x1, 60))  # the boxes' halves, 3/4 of the height
        files.append(tmp_path / f"mask{index}.png")
        image.save(files[-1])
    boxes = [(0.0, 0.0, 0.5, 0.75), (0.5, 0.0, 1.0, 0.75)]
    by_masks = _generate(pipe, _specs(loras), Regional(masks=[str(path) for path in files]))
    torch.testing.assert_close(by_masks.latents, _generate(pipe, _specs(loras), Regional(boxes=boxes)).latents,
                               rtol=0, atol=0)


def test_t5_words_are_found_at_word_boundaries(dits):
    from loracompose.tokens import word_positions

    tokenizer = dits["flux"][1].tokenizer_2  # the tiny T5 tokenizer: "zkx" is three pieces, "▁z", "k", "x"
    ids = tokenizer("a zkx, zkxy and zkx").input_ids
    pieces = tokenizer(" zkx", add_special_tokens=False).input_ids
    starts = [s for s in range(len(ids)) if ids[s:s + len(pieces)] == pieces]
    assert len(starts) == 3, "the raw sub-sequence also matches inside zkxy"
    found = word_positions(tokenizer, ids, "zkx")
    expected = [s + k for s in (starts[0], starts[2]) for k in range(len(pieces))]
    assert found == expected


def test_flux_true_cfg_runs_regional_and_tara_with_two_rows_per_image(dits):
    """FLUX with true CFG ([uncond, cond] rows in one call): whole-image regional and all-ones TARA
    equal Merge; TARA runs one call of two rows per step."""
    _, pipe, loras = dits["flux"]
    specs = _tara_specs(loras)
    options = dict(true_cfg_scale=2.0, negative_prompt="blurry")
    merged = _generate(pipe, specs, Merge(), **options)
    whole = _generate(pipe, specs, Regional(boxes=[WHOLE, WHOLE]), **options)
    torch.testing.assert_close(whole.latents, merged.latents, **TOLERANCE)
    torch.testing.assert_close(_generate(pipe, specs, AllTokensTara(), **options).latents, merged.latents,
                               **TOLERANCE)
    tara = _generate(pipe, specs, Tara(), **options)
    assert (tara.stats.unet_calls, tara.stats.unet_rows) == (STEPS, 2 * STEPS)
    assert (tara.latents - merged.latents).abs().max() > 1e-4
