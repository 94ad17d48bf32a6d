"""Regional LoRA and TARA on FLUX.1 and SD3 (tiny folders saved and loaded back through load_pipeline),
against their oracles: whole-image regions == Merge, empty regions == the base model, delta == latent
mode for one LoRA on the whole image, an explicit masked computation of one layer per stream; TARA with
all-ones token masks == Merge, its text K/V deltas off at every token that is not a trigger token; TARA's
untokened deltas in regions: whole-image regions == untokened='global', an empty region leaves a LoRA only
its token-masked text K/V deltas, automatic regions per image; exact transformer call/row counts; the CLI
on both families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import DIT_FAMILIES, dit_rows_per_image, tiny_dits_with_two_loras, with_metadata
from loracompose import LoraSpec, UserError
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


@pytest.fixture(scope="module", params=DIT_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def dits(tmp_path_factory) -> dict[str, tuple[Path, object, list[Path]]]:
    return tiny_dits_with_two_loras(tmp_path_factory)


def _specs(loras, weights=(0.8, 1.0)) -> list[LoraSpec]:
    return [LoraSpec(path, weight, category="object") for path, weight in zip(loras, weights)]


def _generate(pipe, specs, method, **kwargs):
    options = dict(steps=STEPS, width=SIZE, height=SIZE, output_type="latent", append_triggers=False,
                   show_progress=False)
    return pipe.generate(PROMPT, specs, method, **{**options, **kwargs})


def _restored(module) -> bool:
    return not any("forward" in sub.__dict__ for sub in module.modules())


# ------------------------------------------------------------------------------------ regional


def test_regional_whole_image_is_merge_and_empty_regions_the_base_model(family, dits):
    _, pipe, loras = dits[family]
    specs = _specs(loras)
    merged = _generate(pipe, specs, Merge())
    whole = _generate(pipe, specs, Regional(boxes=[WHOLE, WHOLE]))
    torch.testing.assert_close(whole.latents, merged.latents, **TOLERANCE)
    rows = dit_rows_per_image(family)
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
    assert latent.stats.unet_rows == delta.stats.unet_rows == STEPS * dit_rows_per_image(family)


def test_regional_boxes_cost_one_pass_or_n_plus_one_branches(family, dits):
    _, pipe, loras = dits[family]
    specs = _specs(loras)
    merged = _generate(pipe, specs, Merge())
    delta = _generate(pipe, specs, Regional(boxes=[LEFT, RIGHT]))
    latent = _generate(pipe, specs, Regional(boxes=[LEFT, RIGHT], mode="latent"))
    rows = dit_rows_per_image(family)
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
    everywhere = _generate(pipe, specs, AllTokensTara(untokened="global"))
    torch.testing.assert_close(everywhere.latents, merged.latents, **TOLERANCE)
    tara = _generate(pipe, specs, Tara(untokened="global"))
    assert (tara.latents - merged.latents).abs().max() > 1e-4, "the masks change the result"
    rows = dit_rows_per_image(family)
    assert (tara.stats.unet_calls, tara.stats.unet_rows) == (STEPS, STEPS * rows)
    fused = _generate(pipe, specs, Tara(fuse=True, untokened="global"))
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
    projection exactly, a LoRA's trigger tokens of the conditional rows its delta; image rows Merge's
    (untokened='global': no regions)."""
    _, pipe, loras = dits[family]
    seen: dict[str, tuple] = {}
    handles = []

    def hook(name):
        def record(layer, args, output):
            x = args[0]
            deltas = {adapter: adapter_delta(layer, x, adapter) for adapter in active_adapters(layer)}
            seen.setdefault(name, (layer.get_base_layer()(x), deltas, output))
        return record

    method = Tara(untokened="global")
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


# ------------------------------------------------------------------------------------ TARA: untokened deltas in regions


def _is_text_kv(key: str) -> bool:
    """A LoRA key of a text K/V layer TARA token-masks (joint blocks' context K/V)."""
    return ".attn.add_k_proj." in key or ".attn.add_v_proj." in key


def _is_single_block_kv(key: str) -> bool:
    """FLUX's single-stream K/V: token-masked on their text rows, untokened on their image rows."""
    return key.startswith("transformer.single_transformer_blocks.") and (".attn.to_k." in key or ".attn.to_v." in key)


@pytest.mark.parametrize("lora_kind", ["attention", "every layer"])
def test_tara_whole_image_regions_equal_global_tara(family, dits, lora_kind, tmp_path):
    _, pipe, loras = dits[family]
    if lora_kind == "every layer":
        loras = [_every_layer_lora(pipe, tmp_path / f"every{seed}.safetensors", seed) for seed in (7, 8)]
    specs = _tara_specs(loras)
    regions = _generate(pipe, specs, Tara(boxes=[WHOLE, WHOLE]))
    plain = _generate(pipe, specs, Tara(untokened="global"))
    torch.testing.assert_close(regions.latents, plain.latents, **TOLERANCE)
    assert regions.method["regions"] == "given" and plain.method["regions"] == "none"
    rows = dit_rows_per_image(family)
    assert (regions.stats.unet_calls, regions.stats.unet_rows) == (STEPS, STEPS * rows), "one pass, no probe"
    halves = _generate(pipe, specs, Tara(boxes=[LEFT, RIGHT]))
    assert (halves.latents - plain.latents).abs().max() > 1e-4, "regions that are not the whole image matter"
    assert _restored(pipe.transformer)


def test_tara_empty_region_leaves_only_the_token_masked_text_kv(family, dits, tmp_path):
    """A LoRA whose region is empty acts only through its token-masked text K/V deltas (and its text-encoder
    deltas, which no region touches): as global TARA with the LoRA cut down to those. FLUX's single-stream
    K/V (token-masked text rows, untokened image rows) cannot be cut apart in a file, so the LoRA here has
    none (zeroed in both runs); the next test covers them."""
    _, pipe, loras = dits[family]
    source = with_metadata(loras[0], tmp_path / "zkx.safetensors", zero=_is_single_block_kv)
    cut = with_metadata(loras[0], tmp_path / "zkx_kv.safetensors",
                        zero=lambda key: key.startswith("transformer.") and not _is_text_kv(key))
    spec = [LoraSpec(source, 0.8, name="zkx", trigger_words=["zkx"])]
    empty = _generate(pipe, spec, Tara(masks=(torch.zeros(4, 4),)))
    oracle = _generate(pipe, [LoraSpec(cut, 0.8, name="zkx", trigger_words=["zkx"])], Tara(untokened="global"))
    torch.testing.assert_close(empty.latents, oracle.latents, **TOLERANCE)
    assert empty.method["regions"] == "given"
    full = _generate(pipe, spec, Tara(untokened="global"))
    assert (full.latents - oracle.latents).abs().max() > 1e-3, "the untokened deltas matter here"


def test_tara_lora_with_an_empty_region_and_no_trigger_leaves_no_trace(family, dits):
    """A LoRA with an empty region and its trigger absent (missing_trigger='warn': no K/V deltas) adds
    nothing anywhere, FLUX's single-stream K/V image rows included: the run equals TARA with the other
    LoRA alone (text-encoder LoRAs off: they act whatever the regions)."""
    _, pipe, loras = dits[family]
    character, other = (LoraSpec(loras[0], 0.8, trigger_words=["zkx"]), LoraSpec(loras[1], trigger_words=["vvv"]))
    options = dict(text_encoder_loras=False)
    with pytest.warns(UserWarning, match="no trigger word of LoRA other"):
        both = _generate(pipe, [character, other], Tara(masks=(torch.ones(4, 4), torch.zeros(4, 4)),
                                                       missing_trigger="warn"), **options)
    alone = _generate(pipe, [character], Tara(untokened="global"), **options)
    torch.testing.assert_close(both.latents, alone.latents, **TOLERANCE)
    with pytest.warns(UserWarning):
        everywhere = _generate(pipe, [character, other], Tara(untokened="global", missing_trigger="warn"), **options)
    assert (everywhere.latents - alone.latents).abs().max() > 1e-3, "the other LoRA's untokened deltas matter"


def test_tara_automatic_regions_on_dits_are_per_image(family, dits):
    """Without boxes, the regions come from auto's probe of the joint attention's maps (2 calls here, the
    steps being fewer than its 3, all images in each), then one pass per image and step; image k of a
    two-image call equals its one-image run (seed + k)."""
    _, pipe, loras = dits[family]
    specs = _tara_specs(loras)
    method = Tara()
    both = _generate(pipe, specs, method, seed=5, num_images=2)
    rows = dit_rows_per_image(family)
    probe = min(3, STEPS)
    assert both.method["regions"] == "automatic"
    assert both.stats.unet_calls == probe + STEPS * 2 and both.stats.unet_rows == (probe + STEPS) * 2 * rows
    grid = (SIZE // pipe.vae_scale_factor // pipe.token_patch,) * 2
    assert all(isinstance(area, torch.Tensor) and tuple(area.shape) == grid for area in method.region_masks.areas)
    alone = [_generate(pipe, specs, Tara(), seed=seed) for seed in (5, 6)]
    for image, single in enumerate(alone):
        torch.testing.assert_close(both.latents[image:image + 1], single.latents, **TOLERANCE)
        assert (single.stats.unet_calls, single.stats.unet_rows) == (probe + STEPS, (probe + STEPS) * rows)
    plain = _generate(pipe, specs, Tara(untokened="global"), seed=5, num_images=2)
    assert (both.latents - plain.latents).abs().max() > 1e-4
    assert _restored(pipe.transformer)


def test_tara_region_settings_errors_on_dits(family, dits):
    _, pipe, loras = dits[family]
    specs = _tara_specs(loras)
    for settings, match in [({"fuse": True}, r"^tara fuse folds the untokened deltas"),
                            ({"boxes": (WHOLE, WHOLE, WHOLE)}, r"3 boxes for 2 LoRAs"),
                            ({"masks": (torch.ones(4, 8), torch.ones(4, 4))}, r"the mask of LoRA character is 8x4")]:
        with pytest.raises(UserError, match=match):
            _generate(pipe, specs, Tara(**settings), steps=1)
    assert _restored(pipe.transformer)
    alone = _generate(pipe, specs[:1], Tara(fuse=True), steps=1)  # one LoRA: nothing to keep apart
    assert alone.method["regions"] == "none"


def test_tara_style_lora_keeps_its_text_kv_deltas_on_every_token(family, dits):
    """global_kinds='every_token' on DiTs too: a style LoRA's text K/V masks are all ones on the conditional
    rows (FLUX: every row, so it equals all-ones masks), unlike its trigger-only masks."""
    _, pipe, loras = dits[family]
    spec = [LoraSpec(loras[1], trigger_words=["qwv"], category="style")]
    style = Tara()
    default = _generate(pipe, spec, style)
    assert style.every_token == [loras[1].stem]
    trigger = _generate(pipe, spec, Tara(global_kinds="trigger"))
    assert (trigger.latents - default.latents).abs().max() > 1e-4
    if family == "flux":
        torch.testing.assert_close(default.latents, _generate(pipe, spec, AllTokensTara()).latents, **TOLERANCE)


# ------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("method,extra,calls", [
    ("regional", ["--box", "0,0,0.5,1", "--box", "0.5,0,1,1"], 2),
    ("regional", ["--box", "0,0,0.5,1", "--box", "0.5,0,1,1", "--regional-mode", "latent"], 2),
    ("tara", [], 4),  # automatic regions: the probe's 2 calls (steps 2 < its 3) and then 2 steps
    ("tara", ["--tara-untokened", "global"], 2),
])
def test_cli_runs_regional_and_tara_on_dits(family, dits, method, extra, calls, tmp_path, capsys):
    from loracompose.cli.main import main

    model, _, loras = dits[family]
    out = tmp_path / "out"
    code = main(["generate", "--model", str(model), "--prompt", PROMPT, "--lora", f"{loras[0]}:0.8",
                 "--lora", str(loras[1]), "--method", method, *extra, "--width", str(SIZE), "--height", str(SIZE),
                 "--steps", "2", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / f"{method}-0.png").exists()
    assert f"{method}: {calls} transformer calls" in captured.err


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
    torch.testing.assert_close(_generate(pipe, specs, AllTokensTara(untokened="global")).latents, merged.latents,
                               **TOLERANCE)
    tara = _generate(pipe, specs, Tara(untokened="global"))
    torch.testing.assert_close(_generate(pipe, specs, Tara(fuse=True, untokened="global")).latents, tara.latents,
                               rtol=0, atol=1e-4)
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


def test_flux_true_cfg_runs_regional_and_tara_with_twodit_rows_per_image(dits):
    """FLUX with true CFG ([uncond, cond] rows in one call): whole-image regional and all-ones TARA
    equal Merge; TARA runs one call of two rows per step."""
    _, pipe, loras = dits["flux"]
    specs = _tara_specs(loras)
    options = dict(true_cfg_scale=2.0, negative_prompt="blurry")
    merged = _generate(pipe, specs, Merge(), **options)
    whole = _generate(pipe, specs, Regional(boxes=[WHOLE, WHOLE]), **options)
    torch.testing.assert_close(whole.latents, merged.latents, **TOLERANCE)
    torch.testing.assert_close(_generate(pipe, specs, AllTokensTara(untokened="global"), **options).latents,
                               merged.latents, **TOLERANCE)
    tara = _generate(pipe, specs, Tara(untokened="global"), **options)
    assert (tara.stats.unet_calls, tara.stats.unet_rows) == (STEPS, 2 * STEPS)
    assert (tara.latents - merged.latents).abs().max() > 1e-4
