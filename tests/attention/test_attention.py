"""Oracles for loracompose.attention on tiny random UNets (CPU, fp32)."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import math

import peft
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from loracompose.attention import (
    AttentionStore,
    Box,
    ComposeAttnProcessor,
    LatentGrid,
    LoraTokenMasks,
    Region,
    RegionAttention,
    attention_kernel,
    attention_layers,
    attention_map_layers,
    available_backends,
    checkpoint_outside_layers,
    deepest_attention_level,
    install_processors,
    processors_for,
    select_layers,
    stop_after_layers,
    token_mask,
    token_masked_projection,
)
from loracompose.attention.kernels import dense_bias
from loracompose.attention.lora_deltas import check_adapters_loaded
from loracompose.errors import UserError

TOLERANCE = 1e-5
BACKENDS = [
    "sdpa",
    "flex",
    pytest.param("xformers", marks=pytest.mark.skipif(importlib.util.find_spec("xformers") is None,
                                                     reason="xformers is not installed")),
]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# -- tiny models ---------------------------------------------------------------------------------
def make_unet(kind: str, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    common = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    if kind == "sd15":
        unet = UNet2DConditionModel(**common, cross_attention_dim=32)
    else:
        unet = UNet2DConditionModel(**common, attention_head_dim=(2, 4), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                    cross_attention_dim=64)
    return unet.eval()


def add_lora(unet: UNet2DConditionModel, name: str, seed: int) -> None:
    torch.manual_seed(seed)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=LORA_TARGETS),
                     adapter_name=name)


def make_inputs(unet: UNet2DConditionModel, height: int = 16, width: int = 16, batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, height, width, generator=generator)
    states = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=generator),
                                      "time_ids": torch.randn(batch, 6, generator=generator)}
    return latents, states, extra


def run_unet(unet, latents, states, extra, **kwargs) -> torch.Tensor:
    return unet(latents, torch.tensor(10), states, **extra, **kwargs).sample


def install_everywhere(unet, layers, **processor_kwargs):
    return install_processors(unet, processors_for(layers, lambda _: ComposeAttnProcessor(**processor_kwargs)))


def record_layer_io(unet, names):
    """Forward hooks recording each named attention layer's (hidden_states, encoder_hidden_states, output)."""
    records, handles = {}, []
    for name in names:
        def hook(_module, args, kwargs, output, name=name):
            hidden = args[0] if args else kwargs["hidden_states"]
            records[name] = (hidden.detach(), kwargs.get("encoder_hidden_states"), output.detach())
        handles.append(unet.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    return records, handles


def linear64(layer, x: torch.Tensor, adapters=(), masks=None) -> torch.Tensor:
    """The layer in float64: base + Σ adapters' scaling·B·A·x, each optionally ⊙ a (B|1, T) token mask."""
    base = getattr(layer, "base_layer", layer)
    out = F.linear(x.double(), base.weight.double(), None if base.bias is None else base.bias.double())
    for name in adapters:
        delta = x.double() @ layer.lora_A[name].weight.double().T @ layer.lora_B[name].weight.double().T
        delta = delta * layer.scaling[name]
        if masks is not None and name in masks:
            delta = delta * masks[name].double().reshape(-1, x.shape[1])[..., None]
        out = out + delta
    return out


def heads(t: torch.Tensor, count: int) -> torch.Tensor:
    return t.view(t.shape[0], t.shape[1], count, -1).transpose(1, 2)


def probabilities64(attn, x, context, bias=None) -> torch.Tensor:
    q, k = heads(linear64(attn.to_q, x), attn.heads), heads(linear64(attn.to_k, context), attn.heads)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (scores if bias is None else scores + bias).softmax(-1)


def attention64(attn, x, context, q_adapters=(), kv_adapters=(), out_adapters=(), masks=None, bias=None):
    """Explicit float64 attention layer output."""
    q = heads(linear64(attn.to_q, x, q_adapters), attn.heads)
    k = heads(linear64(attn.to_k, context, kv_adapters, masks), attn.heads)
    v = heads(linear64(attn.to_v, context, kv_adapters, masks), attn.heads)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    weights = (scores if bias is None else scores + bias).softmax(-1)
    hidden = (weights @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return linear64(attn.to_out[0], hidden, out_adapters)


# -- equivalence with the stock processor ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_processors_match_stock_output(kind, backend):
    unet = make_unet(kind)
    latents, states, extra = make_inputs(unet, 12, 20)
    with torch.no_grad():
        stock = run_unet(unet, latents, states, extra)
        with install_everywhere(unet, attention_layers(unet), backend=backend):
            ours = run_unet(unet, latents, states, extra)
        restored = run_unet(unet, latents, states, extra)
    assert (ours - stock).abs().max() < TOLERANCE
    assert torch.equal(restored, stock)


@pytest.mark.parametrize("backend", BACKENDS)
def test_processors_honour_encoder_attention_mask(backend):
    unet = make_unet("sd15")
    latents, states, extra = make_inputs(unet, 12, 20)
    padding = torch.ones(2, 77)
    padding[:, 20:] = 0  # diffusers turns this into a -10000 key bias
    with torch.no_grad():
        stock = run_unet(unet, latents, states, extra, encoder_attention_mask=padding)
        unmasked = run_unet(unet, latents, states, extra)
        with install_everywhere(unet, attention_layers(unet), backend=backend):
            ours = run_unet(unet, latents, states, extra, encoder_attention_mask=padding)
    assert (stock - unmasked).abs().max() > 1e-4
    assert (ours - stock).abs().max() < TOLERANCE


def test_capture_does_not_change_output():
    unet = make_unet("sd15")
    latents, states, extra = make_inputs(unet)
    store = AttentionStore(token_indices=[1, 2])
    with torch.no_grad():
        stock = run_unet(unet, latents, states, extra)
        with install_everywhere(unet, attention_map_layers(unet), store=store):
            ours = run_unet(unet, latents, states, extra)
    assert (ours - stock).abs().max() < TOLERANCE


def test_stop_after_layers_keeps_the_maps_and_skips_the_rest():
    unet = make_unet("sd15")
    latents, states, extra = make_inputs(unet)
    layers = attention_map_layers(unet)
    store = AttentionStore(token_indices=[1, 2], requires_grad=True)
    later_calls = []
    hook = unet.conv_out.register_forward_hook(lambda *_: later_calls.append(1))
    try:
        with install_everywhere(unet, layers, store=store):
            full_latents = latents.clone().requires_grad_(True)
            run_unet(unet, full_latents, states, extra)
            full_maps = store.maps()
            (full_gradient,) = torch.autograd.grad(full_maps.square().sum(), full_latents)
            early_latents = latents.clone().requires_grad_(True)
            with stop_after_layers(unet, [layer.name for layer in layers]) as early:
                run_unet(unet, early_latents, states, extra)
            early_maps = store.maps()
            (early_gradient,) = torch.autograd.grad(early_maps.square().sum(), early_latents)
    finally:
        hook.remove()
    assert early.stopped and later_calls == [1], "conv_out ran in the full pass only"
    torch.testing.assert_close(early_maps, full_maps, atol=0, rtol=0)
    torch.testing.assert_close(early_gradient, full_gradient, atol=1e-6, rtol=1e-5)
    with stop_after_layers(unet, [layers[0].name]) as never:
        pass
    assert not never.stopped


def test_checkpoint_outside_layers_recomputes_the_other_units_and_keeps_the_gradient():
    unet = make_unet("sd15")
    latents, states, extra = make_inputs(unet, batch=1)
    layers = attention_map_layers(unet)
    names = [layer.name for layer in layers] + [layer.name.removesuffix("attn2") + "attn1" for layer in layers]
    store = AttentionStore(token_indices=[1, 2], requires_grad=True)
    units = {"outside": unet.down_blocks[0].resnets[0], "map block": unet.get_submodule(layers[0].name.removesuffix(".attn2"))}
    calls = dict.fromkeys(units, 0)
    hooks = [unit.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
             for name, unit in units.items()]

    def gradient(checkpointed: bool) -> tuple[torch.Tensor, dict[str, int]]:
        calls.update(dict.fromkeys(units, 0))
        x = latents.clone().requires_grad_(True)
        with checkpoint_outside_layers(unet, names) if checkpointed else contextlib.nullcontext():
            with stop_after_layers(unet, names):
                run_unet(unet, x, states, extra)
        (grad,) = torch.autograd.grad(store.maps().square().sum(), x)  # the backward runs after the block
        return grad, dict(calls)

    try:
        with install_everywhere(unet, layers, store=store):
            stored, stored_calls = gradient(checkpointed=False)
            recomputed, recomputed_calls = gradient(checkpointed=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert stored_calls == {"outside": 1, "map block": 1}
    assert recomputed_calls == {"outside": 2, "map block": 1}, "units outside the map blocks run again in the backward"
    torch.testing.assert_close(recomputed, stored, atol=1e-6, rtol=1e-5)
    assert not unet.is_gradient_checkpointing, "the UNet's own setting is restored"


def test_backend_errors():
    with pytest.raises(UserError, match="unknown"):
        attention_kernel("flash3")
    if "xformers" not in available_backends():
        with pytest.raises(UserError, match="xformers"):
            ComposeAttnProcessor("xformers")


def test_flex_refuses_backward_on_cpu():
    q = torch.randn(1, 2, 8, 8, requires_grad=True)
    with pytest.raises(UserError, match="sdpa"):
        attention_kernel("flex").attend(q, q, q, scale=1.0)


# -- install / restore / layer selection -----------------------------------------------------------
def test_install_only_named_layers_and_restore():
    unet = make_unet("sd15")
    before = unet.attn_processors
    layers = select_layers(unet, "cross", levels=[1], blocks=("down",))
    assert [layer.name for layer in layers] == [f"down_blocks.1.attentions.{i}.transformer_blocks.0.attn2" for i in (0, 1)]
    handle = install_everywhere(unet, layers)
    installed = unet.attn_processors
    assert {k for k, p in installed.items() if isinstance(p, ComposeAttnProcessor)} == {l.processor_key for l in layers}
    assert all(isinstance(p, AttnProcessor2_0) for k, p in installed.items() if k not in {l.processor_key for l in layers})
    handle.restore()
    handle.restore()
    assert all(unet.attn_processors[k] is p for k, p in before.items())
    with pytest.raises(UserError, match="no attention layer"):
        install_processors(unet, {"down_blocks.9.attn2": ComposeAttnProcessor()})
    shared = ComposeAttnProcessor()
    with pytest.raises(UserError, match="one per layer"):
        install_processors(unet, {layer.name: shared for layer in layers})


def test_map_layers_on_tiny_unets():
    sd15, sdxl = make_unet("sd15"), make_unet("sdxl")
    assert deepest_attention_level(sd15) == 1
    assert [l.name for l in attention_map_layers(sd15)] == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "down_blocks.1.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.2.transformer_blocks.0.attn2",
    ]
    assert len(attention_map_layers(sdxl)) == 5  # one of the 2 stacked blocks per module
    assert len(attention_map_layers(sdxl, layers_per_module=None)) == 10
    assert all(l.is_cross and l.level == 1 for l in attention_map_layers(sdxl))


def test_map_layers_on_real_configs():
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(cross_attention_dim=768)
        sdxl = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    assert [l.name.split(".transformer")[0] for l in attention_map_layers(sd15)] == [
        "down_blocks.2.attentions.0", "down_blocks.2.attentions.1",
        "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]
    assert len(select_layers(sdxl, "cross", levels=[2])) == 60
    sdxl_maps = attention_map_layers(sdxl)
    assert len(sdxl_maps) == 5 and all(".transformer_blocks.4.attn2" in l.name for l in sdxl_maps)


# -- attention maps ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("rows", ["all", "cond", "cfg_mean"])
def test_maps_equal_explicit_softmax(kind, rows):
    unet = make_unet(kind)
    latents, states, extra = make_inputs(unet, 13, 22)
    tokens = [0, 3, 7]
    layers = attention_map_layers(unet)
    store = AttentionStore(token_indices=tokens, rows=rows)
    records, hooks = record_layer_io(unet, [l.name for l in layers])
    with torch.no_grad(), install_everywhere(unet, layers, store=store):
        run_unet(unet, latents, states, extra)
    for hook in hooks:
        hook.remove()
    expected_layers = []
    for layer in layers:
        x, context, _ = records[layer.name]
        probs = probabilities64(unet.get_submodule(layer.name), x, context)[..., tokens].mean(1)
        if rows == "cond":
            probs = probs[1:]
        elif rows == "cfg_mean":
            probs = (probs[:1] + probs[1:]) / 2
        expected = probs.reshape(probs.shape[0], 7, 11, len(tokens))  # level 1 of a 13x22 latent
        expected_layers.append(expected)
        assert (store.layer_maps()[layer.name].double() - expected).abs().max() < TOLERANCE
    maps = store.maps()
    assert maps.shape == (1 if rows != "all" else 2, 7, 11, 3)
    assert (maps.double() - torch.stack(expected_layers).mean(0)).abs().max() < TOLERANCE


def test_maps_have_gradients_only_when_asked():
    unet = make_unet("sd15")
    latents, states, extra = make_inputs(unet)
    layers = attention_map_layers(unet)
    for requires_grad in (True, False):
        store = AttentionStore(token_indices=[1], rows="cond", requires_grad=requires_grad)
        latent = latents.clone().requires_grad_(True)
        with install_everywhere(unet, layers, store=store):
            run_unet(unet, latent, states, extra)
        maps = store.maps()
        assert maps.requires_grad is requires_grad
        if requires_grad:
            (gradient,) = torch.autograd.grad(maps.sum(), latent)
            assert gradient.abs().sum() > 0


def test_store_keeps_latest_call_and_resizes():
    unet = make_unet("sd15")
    layers = attention_map_layers(unet)
    store = AttentionStore(token_indices=[2])
    with torch.no_grad(), install_everywhere(unet, layers, store=store):
        run_unet(unet, *make_inputs(unet, 8, 8))
        run_unet(unet, *make_inputs(unet, 12, 16))
    assert store.maps().shape == (2, 6, 8, 1)
    assert store.maps(size=(12, 16)).shape == (2, 12, 16, 1)


def test_transformer_flattens_rows_first():
    """Attention queries are the level's cells in row-major (rows, columns) order, so maps are not transposed."""
    unet = make_unet("sd15")
    latents, states, extra = make_inputs(unet, 12, 20)
    transformer = unet.down_blocks[1].attentions[0]
    seen = {}
    transformer.register_forward_pre_hook(lambda m, args: seen.setdefault("grid", args[0].detach()))
    attn1 = transformer.transformer_blocks[0].attn1
    attn1.register_forward_pre_hook(lambda m, args: seen.setdefault("tokens", args[0].detach()))
    with torch.no_grad():
        run_unet(unet, latents, states, extra)
        grid = seen["grid"]
        assert grid.shape[-2:] == (6, 10)
        flat = transformer.proj_in(transformer.norm(grid)).permute(0, 2, 3, 1).reshape(2, 60, -1)
        expected = transformer.transformer_blocks[0].norm1(flat)
    assert (seen["tokens"] - expected).abs().max() < TOLERANCE


# -- token-masked LoRA K/V (TARA) -----------------------------------------------------------------
def lora_unet():
    unet = make_unet("sd15")
    add_lora(unet, "cat", seed=11)
    add_lora(unet, "dog", seed=12)
    unet.set_adapters(["cat", "dog"], [0.8, 1.3])
    return unet


def test_token_mask_all_ones_equals_unmasked_lora():
    unet = lora_unet()
    latents, states, extra = make_inputs(unet)
    masks = LoraTokenMasks({"cat": torch.ones(77), "dog": torch.ones(2, 77)})
    with torch.no_grad():
        plain = run_unet(unet, latents, states, extra)
        with install_everywhere(unet, select_layers(unet, "cross"), token_masks=masks):
            masked = run_unet(unet, latents, states, extra)
    assert (masked - plain).abs().max() < TOLERANCE


def test_token_mask_all_zeros_equals_no_lora_on_cross_kv():
    unet = lora_unet()
    latents, states, extra = make_inputs(unet)
    cross = select_layers(unet, "cross")
    masks = LoraTokenMasks({"cat": torch.zeros(77), "dog": torch.zeros(77)})
    with torch.no_grad():
        with install_everywhere(unet, cross, token_masks=masks):
            masked = run_unet(unet, latents, states, extra)
        for layer in cross:
            attn = unet.get_submodule(layer.name)
            attn.to_k.enable_adapters(False)
            attn.to_v.enable_adapters(False)
        no_kv_lora = run_unet(unet, latents, states, extra)
    assert (masked - no_kv_lora).abs().max() < TOLERANCE


def test_token_mask_changes_only_that_tokens_key_and_value():
    unet = lora_unet()
    attn = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2")
    context = torch.randn(2, 77, 32)
    j = 5
    masks = {"cat": token_mask([j]), "dog": torch.zeros(77)}
    with torch.no_grad():
        for projection in (attn.to_k, attn.to_v):
            masked = token_masked_projection(projection, context, masks).double()
            base = linear64(projection, context)
            with_cat = linear64(projection, context, ["cat"])
            assert (masked[:, j] - with_cat[:, j]).abs().max() < TOLERANCE
            others = [i for i in range(77) if i != j]
            assert (masked[:, others] - base[:, others]).abs().max() < TOLERANCE
            assert (with_cat[:, j] - base[:, j]).abs().max() > 1e-3


def test_token_masks_per_row_and_several_loras_match_formula():
    unet = lora_unet()
    name = "up_blocks.0.attentions.1.transformer_blocks.0.attn2"
    attn = unet.get_submodule(name)
    latents, states, extra = make_inputs(unet)
    masks = {"cat": torch.tensor([[0.0] * 77, [1.0] * 3 + [0.0] * 74]), "dog": token_mask([4, 6])}
    records, hooks = record_layer_io(unet, [name])
    with torch.no_grad(), install_everywhere(unet, select_layers(unet, "cross"), token_masks=LoraTokenMasks(masks)):
        run_unet(unet, latents, states, extra)
    hooks[0].remove()
    x, context, output = records[name]
    expected = attention64(attn, x, context, q_adapters=["cat", "dog"], kv_adapters=["cat", "dog"],
                           out_adapters=["cat", "dog"], masks=masks)
    assert (output.double() - expected).abs().max() < TOLERANCE


def test_token_mask_errors():
    unet = lora_unet()
    attn = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2")
    with pytest.raises(UserError, match="token mask for LoRA 'cat'"):
        token_masked_projection(attn.to_k, torch.randn(2, 77, 32), {"cat": torch.ones(76)})
    with pytest.raises(UserError, match="not loaded"):
        check_adapters_loaded(unet, ["cat", "bird"])
    with pytest.raises(UserError, match="0..76"):
        token_mask([77])


# -- regions (LoRA-Composer) ----------------------------------------------------------------------
def test_region_covering_image_equals_plain_attention_with_its_states():
    unet = make_unet("sd15")
    latents, states, extra = make_inputs(unet, 12, 20)
    region_states = torch.randn(1, 77, 32)
    regions = RegionAttention([Region(Box(0, 0, 1, 1), region_states)], isolate_self_attention=False)
    with torch.no_grad():
        plain = run_unet(unet, latents, region_states.expand(2, -1, -1), extra)
        with install_everywhere(unet, select_layers(unet, "cross"), regions=regions):
            regional = run_unet(unet, latents, states, extra)
    assert (regional - plain).abs().max() < TOLERANCE


def test_reused_region_key_values_equal_fresh_ones_and_are_built_once_per_layer(monkeypatch):
    import loracompose.attention.processor as processor_module

    unet = make_unet("sd15")
    add_lora(unet, "cat", seed=11)
    unet.disable_lora()
    cat_states = torch.randn(2, 77, 32)
    builds = []
    build = processor_module._region_key_value
    monkeypatch.setattr(processor_module, "_region_key_value", lambda *args: builds.append(1) or build(*args))

    def two_calls(reuse: bool) -> list[torch.Tensor]:
        regions = RegionAttention([Region(Box(0.0, 0.0, 0.6, 1.0), cat_states, "cat")], reuse_region_key_values=reuse)
        outputs = []
        with torch.no_grad(), install_everywhere(unet, select_layers(unet, "cross"), regions=regions):
            for seed in (1, 2):
                latents, states, extra = make_inputs(unet, 12, 20, seed=seed)
                outputs.append(run_unet(unet, latents, states, extra))
        return outputs

    fresh = two_calls(reuse=False)
    cross_layers = len(select_layers(unet, "cross"))
    assert len(builds) == 2 * cross_layers
    builds.clear()
    reused = two_calls(reuse=True)
    assert len(builds) == cross_layers
    assert all((a - b).abs().max() < TOLERANCE for a, b in zip(fresh, reused))
    assert (fresh[0] - fresh[1]).abs().max() > 1e-3


def test_region_cross_attention_matches_formula_with_overlap_and_adapters():
    unet = make_unet("sd15")
    add_lora(unet, "cat", seed=11)
    add_lora(unet, "dog", seed=12)
    unet.disable_lora()  # base model; regions add their concept's deltas themselves
    name = "down_blocks.1.attentions.1.transformer_blocks.0.attn2"
    attn = unet.get_submodule(name)
    latents, states, extra = make_inputs(unet, 12, 20)
    cat_states, dog_states = torch.randn(2, 77, 32), torch.randn(1, 77, 32)
    left, right = Box(0.0, 0.0, 0.6, 1.0), Box(0.4, 0.25, 1.0, 0.75)
    regions = RegionAttention([Region(left, cat_states, "cat"), Region(right, dog_states, "dog")])
    store = AttentionStore(token_indices=[1, 2])
    records, hooks = record_layer_io(unet, [name])
    with torch.no_grad(), install_everywhere(unet, select_layers(unet, "cross"), regions=regions, store=store):
        run_unet(unet, latents, states, extra)
    hooks[0].remove()
    x, context, output = records[name]
    grid = LatentGrid(12, 20)
    in_left, in_right = grid.box_mask(left, 1).flatten(), grid.box_mask(right, 1).flatten()
    with torch.no_grad():
        glob = attention64(attn, x, context)
        cat = attention64(attn, x, cat_states, kv_adapters=["cat"], out_adapters=["cat"])
        dog = attention64(attn, x, dog_states.expand(2, -1, -1), kv_adapters=["dog"], out_adapters=["dog"])
    cover = (in_left.double() + in_right.double())[None, :, None]
    expected = torch.where(cover == 0, glob, (cat * in_left[None, :, None] + dog * in_right[None, :, None]) / cover.clamp(min=1))
    assert (in_left & in_right).any() and (~(in_left | in_right)).any()
    assert (output.double() - expected).abs().max() < TOLERANCE
    # Composer's loss maps: each concept's tokens over the whole image, with that concept's keys
    q = heads(linear64(attn.to_q, x), attn.heads)
    k = heads(linear64(attn.to_k, cat_states, ["cat"]), attn.heads)
    cat_maps = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)[..., [1, 2]].mean(1)
    assert (store.layer_maps(source=0)[name].double() - cat_maps.reshape(2, 6, 10, 2)).abs().max() < TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_isolation_gives_zero_weight_to_other_regions(backend):
    grid = LatentGrid(12, 20)
    a, b = Box(0.0, 0.0, 0.45, 1.0), Box(0.55, 0.0, 1.0, 0.5)
    regions = RegionAttention([Region(a), Region(b)])
    kernel = attention_kernel(backend)
    length = 12 * 20
    mask = regions.isolation_mask(kernel, grid, 0, torch.float32, torch.device("cpu"))
    q, k = torch.randn(1, 2, length, 8), torch.randn(1, 2, length, 8)
    identity = torch.eye(length)[None, None].expand(1, 2, length, length)
    with torch.no_grad():
        weights = kernel.attend(q, k, identity.contiguous(), scale=8**-0.5, mask=mask)  # output = attention weights
    in_a, in_b = grid.box_mask(a).flatten(), grid.box_mask(b).flatten()
    background = ~(in_a | in_b)
    assert torch.all(weights[:, :, in_a][..., in_b] == 0)
    assert torch.all(weights[:, :, in_b][..., in_a] == 0)
    assert torch.all(weights[:, :, in_a][..., in_a | background] > 0)  # own region and background stay open
    assert torch.all(weights[:, :, background] > 0)  # background queries are unrestricted
    assert (weights.sum(-1) - 1).abs().max() < TOLERANCE


def test_grouped_isolation_equals_masked_softmax_with_overlaps_forward_and_backward():
    grid = LatentGrid(12, 20)
    boxes = [Box(0.0, 0.0, 0.45, 1.0), Box(0.35, 0.0, 0.75, 0.6), Box(0.7, 0.3, 1.0, 1.0)]
    regions = RegionAttention([Region(box) for box in boxes])
    kernel = attention_kernel("sdpa")
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 12 * 20, 8, generator=generator, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    codes = regions.codes(grid, 0, torch.device("cpu"))
    assert len(regions.isolation_groups(grid, 0, torch.device("cpu"))) == len(torch.unique(codes)) >= 6  # overlaps
    grouped = regions.isolated_attention(kernel, q, k, v, scale=0.3, grid=grid, level=0)
    masked = ((q @ k.transpose(-1, -2)) * 0.3 + dense_bias(None, codes, torch.float64)).softmax(-1) @ v
    assert (grouped - masked).abs().max() < TOLERANCE
    upstream = torch.randn(grouped.shape, generator=generator, dtype=torch.float64)
    grouped_grads = torch.autograd.grad(grouped, (q, k, v), upstream)
    masked_grads = torch.autograd.grad(masked, (q, k, v), upstream)
    assert all((a - b).abs().max() < TOLERANCE for a, b in zip(grouped_grads, masked_grads))


def test_isolation_processor_matches_masked_softmax():
    unet = make_unet("sd15")
    name = "up_blocks.0.attentions.0.transformer_blocks.0.attn1"
    attn = unet.get_submodule(name)
    latents, states, extra = make_inputs(unet, 12, 20)
    a, b = Box(0.0, 0.0, 0.5, 1.0), Box(0.5, 0.0, 1.0, 0.5)
    regions = RegionAttention([Region(a), Region(b)], inject_concepts=False)
    records, hooks = record_layer_io(unet, [name])
    with torch.no_grad(), install_everywhere(unet, select_layers(unet, "self"), regions=regions):
        run_unet(unet, latents, states, extra)
    hooks[0].remove()
    x, _, output = records[name]
    grid = LatentGrid(12, 20)
    in_a, in_b = grid.box_mask(a, 1).flatten(), grid.box_mask(b, 1).flatten()
    forbidden = (in_a[:, None] & in_b[None, :]) | (in_b[:, None] & in_a[None, :])
    bias = torch.zeros(forbidden.shape, dtype=torch.float64).masked_fill(forbidden, float("-inf"))
    with torch.no_grad():
        expected = attention64(attn, x, x, bias=bias)
    assert (output.double() - expected).abs().max() < TOLERANCE


# -- masks -------------------------------------------------------------------------------------
def test_box_masks_land_on_pixels_for_non_square_images():
    grid = LatentGrid.for_image(image_height=96, image_width=160)  # latent 12 rows x 20 columns
    box = Box.from_pixels(16, 32, 80, 64, image_width=160, image_height=96)  # x 16..80, y 32..64 px
    mask = grid.box_mask(box)
    assert mask.shape == (12, 20)
    expected = torch.zeros(12, 20, dtype=torch.bool)
    expected[4:8, 2:10] = True  # rows 32/8..64/8, columns 16/8..80/8
    assert torch.equal(mask, expected)
    level1 = grid.box_mask(box, 1)
    assert level1.shape == (6, 10) and torch.equal(level1, expected.reshape(6, 2, 10, 2).any(3).any(1))
    assert grid.level_size(3) == (2, 3)


def test_user_masks_and_rounding():
    grid = LatentGrid(13, 22)  # odd sizes: level cells are clipped at the far edge
    user = torch.zeros(104, 176)
    user[:52, 88:] = 1.0  # top-right quadrant in image pixels
    mask = grid.user_mask(user)
    assert mask.shape == (13, 22)
    assert mask[:6, 11:].all() and not mask[7:].any() and not mask[:, :11].any()
    assert grid.user_mask(user, 2).shape == grid.level_size(2) == (4, 6)
    half_cell = Box(0.0, 0.0, 1.5 / 22, 1.0)  # covers latent column 0 and half of column 1
    assert grid.box_mask(half_cell)[0].tolist()[:3] == [True, True, False]


def test_mask_input_errors():
    with pytest.raises(UserError, match="box"):
        Box(0.5, 0.0, 0.2, 1.0)
    with pytest.raises(UserError, match="multiples of 8"):
        LatentGrid.for_image(100, 512)
    with pytest.raises(UserError, match="2-D"):
        LatentGrid(8, 8).user_mask(torch.ones(1, 8, 8))


# -- processor kwargs ----------------------------------------------------------------------------
class KwargsOnlyProcessor(AttnProcessor2_0):
    def __init__(self):
        self.received = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        self.received.append(dict(kwargs))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_undeclared_kwargs_are_dropped_and_ours_arrive():
    unet = lora_unet()
    latents, states, extra = make_inputs(unet)
    cross = select_layers(unet, "cross")
    handler = ListHandler()
    logger = logging.getLogger("diffusers.models.attention_processor")
    logger.addHandler(handler)
    try:
        with torch.no_grad():
            spy = KwargsOnlyProcessor()
            with install_processors(unet, {cross[0].name: spy}):
                run_unet(unet, latents, states, extra, cross_attention_kwargs={"lora_token_masks": {}})
            assert spy.received == [{}]
            assert any("are not expected by KwargsOnlyProcessor and will be ignored" in m for m in handler.messages)

            assert {"lora_token_masks", "region_attention"} <= set(inspect.signature(ComposeAttnProcessor.__call__).parameters)
            handler.messages.clear()
            with install_everywhere(unet, attention_layers(unet)):
                plain = run_unet(unet, latents, states, extra)
                zeros = {"cat": torch.zeros(77), "dog": torch.zeros(77)}
                masked = run_unet(unet, latents, states, extra, cross_attention_kwargs={"lora_token_masks": zeros})
            assert not handler.messages
    finally:
        logger.removeHandler(handler)
    assert (masked - plain).abs().max() > 1e-4
