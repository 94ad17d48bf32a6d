"""LoRA files in each format users have, with the real key names, for the tiny SD1.5 and SDXL models,
and the weight change each file makes, computed by hand from its tensors (the tests' oracle).

Module names are written out by hand (kohya's flattened names, sgm names for SDXL's UNet, the
``text_model.`` level kohya assumes) rather than derived by the code under test.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

# (component, diffusers module name in the tiny model) -> the key prefix a kohya/LyCORIS file uses.
SD15_LINEAR = {
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"):
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
    ("unet", "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_k"):
        "lora_unet_up_blocks_0_attentions_2_transformer_blocks_0_attn2_to_k",
    ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"):
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
    ("text_encoder", "encoder.layers.0.self_attn.q_proj"): "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    ("text_encoder", "encoder.layers.3.mlp.fc2"): "lora_te_text_model_encoder_layers_3_mlp_fc2",
}
SD15_CONV = {
    ("unet", "down_blocks.0.resnets.1.conv1"): "lora_unet_down_blocks_0_resnets_1_conv1",
    ("unet", "up_blocks.1.resnets.2.conv2"): "lora_unet_up_blocks_1_resnets_2_conv2",
    ("unet", "down_blocks.1.attentions.1.proj_in"): "lora_unet_down_blocks_1_attentions_1_proj_in",  # 1x1
}
SDXL_LINEAR = {
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"):
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q",
    ("unet", "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_k"):
        "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_k",
    ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2"):
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2",
    ("unet", "down_blocks.1.attentions.1.proj_in"): "lora_unet_input_blocks_5_1_proj_in",
    ("unet", "time_embedding.linear_1"): "lora_unet_time_embed_0",
    ("text_encoder", "encoder.layers.0.self_attn.q_proj"): "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc1"): "lora_te2_text_model_encoder_layers_1_mlp_fc1",
}
SDXL_CONV = {
    ("unet", "down_blocks.0.resnets.1.conv1"): "lora_unet_input_blocks_2_0_in_layers_2",
    ("unet", "up_blocks.1.resnets.2.conv2"): "lora_unet_output_blocks_5_0_out_layers_3",
    ("unet", "down_blocks.0.downsamplers.0.conv"): "lora_unet_input_blocks_3_0_op",
    ("unet", "up_blocks.0.upsamplers.0.conv"): "lora_unet_output_blocks_2_2_conv",
    ("unet", "down_blocks.1.resnets.0.conv_shortcut"): "lora_unet_input_blocks_4_0_skip_connection",
}
TARGETS = {"sd15": (SD15_LINEAR, SD15_CONV), "sdxl": (SDXL_LINEAR, SDXL_CONV)}

Deltas = dict[tuple[str, str], torch.Tensor]
ATOL, RTOL = 2e-5, 1e-5  # float32 weights after fusing
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def layer_weights(pipe) -> dict[tuple[str, str], torch.Tensor]:
    """Every Linear/Conv2d weight of the pipeline's models, by (component, module); a PEFT layer by its own
    name, with its (fused) base weight."""
    weights = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if ".base_layer" in name or ".lora_" in name:
                continue
            layer = getattr(module, "base_layer", module)
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                weights[(component, name)] = layer.weight.detach().clone()
    return weights


def assert_weights(actual, expected, changed: set) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=ATOL, rtol=RTOL,
                                   msg=lambda message, key=key: f"{key}: {message}")
    assert changed, "the file changes some layer"




def weight_of(pipe, component: str, module: str) -> torch.Tensor:
    return getattr(pipe, component).get_submodule(module).weight.detach()


def _randn(generator: torch.Generator, *shape: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * scale


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata=metadata or {})
    return path


def kohya_lora(pipe, arch: str, *, seed: int, conv: bool, tucker: bool = False, dora: str | None = None,
               alpha: float | None = 3.0) -> tuple[dict[str, torch.Tensor], Deltas]:
    """kohya/LyCORIS LoRA (LoCon with ``conv``, Tucker ``lora_mid`` with ``tucker``, DoRA with ``dora``
    "out" or "in"): tensors and the weight change of each layer."""
    generator = torch.Generator().manual_seed(seed)
    linear, convs = TARGETS[arch]
    tensors, deltas = {}, {}
    for (component, module), prefix in {**linear, **(convs if conv else {})}.items():
        weight = weight_of(pipe, component, module)
        out_features, in_features = weight.shape[:2]
        rank = 4
        if weight.ndim == 2:
            down, up = _randn(generator, rank, in_features), _randn(generator, out_features, rank)
            delta = up @ down
        elif tucker and weight.shape[-1] > 1:
            down = _randn(generator, rank, in_features, 1, 1)
            mid = _randn(generator, rank, rank, *weight.shape[2:])
            up = _randn(generator, out_features, rank, 1, 1)
            tensors[f"{prefix}.lora_mid.weight"] = mid
            delta = torch.einsum("or,rmhw,mi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0])
        else:
            down = _randn(generator, rank, in_features, *weight.shape[2:])
            up = _randn(generator, out_features, rank, 1, 1)
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        tensors[f"{prefix}.lora_down.weight"], tensors[f"{prefix}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{prefix}.alpha"] = torch.tensor(alpha)
        delta = delta * ((alpha / rank) if alpha is not None else 1.0)
        if dora:
            magnitude, delta = _dora(weight, delta, dora, generator)
            tensors[f"{prefix}.dora_scale"] = magnitude
        deltas[(component, module)] = delta
    return tensors, deltas


def _dora(weight: torch.Tensor, delta: torch.Tensor, axis: str, generator: torch.Generator):
    """LyCORIS DoRA: W' = dora_scale * (W + dW) / ||W + dW|| (norm per output row or per input column)."""
    merged = weight + delta
    if axis == "out":
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
        magnitude = (weight.flatten(1).norm(dim=1) * (1 + 0.5 * torch.rand(weight.shape[0], generator=generator)))
        magnitude = magnitude.reshape(norm.shape)
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.ndim - 2))
        magnitude = torch.rand(norm.shape, generator=generator) + 0.5
    return magnitude, magnitude * merged / norm - weight


def loha(pipe, arch: str, *, seed: int, tucker: bool = False, alpha: float | None = 2.0
         ) -> tuple[dict[str, torch.Tensor], Deltas]:
    """LyCORIS LoHa: dW = (w1a w1b) * (w2a w2b) * alpha / dim, dim = rows of hada_w1_b (Tucker cores on
    3x3 convolutions with ``tucker``)."""
    generator = torch.Generator().manual_seed(seed)
    linear, convs = TARGETS[arch]
    tensors, deltas = {}, {}
    for (component, module), prefix in {**linear, **convs}.items():
        weight = weight_of(pipe, component, module)
        out_features, in_features = weight.shape[:2]
        dim = 3
        scale = alpha / dim if alpha is not None else 1.0
        if tucker and weight.ndim == 4 and weight.shape[-1] > 1:
            parts = {"w1_a": _randn(generator, dim, out_features), "w1_b": _randn(generator, dim, in_features),
                     "w2_a": _randn(generator, dim, out_features), "w2_b": _randn(generator, dim, in_features),
                     "t1": _randn(generator, dim, dim, *weight.shape[2:]),
                     "t2": _randn(generator, dim, dim, *weight.shape[2:])}
            rebuild1 = torch.einsum("ijhw,jr,ip->prhw", parts["t1"], parts["w1_b"], parts["w1_a"])
            rebuild2 = torch.einsum("ijhw,jr,ip->prhw", parts["t2"], parts["w2_b"], parts["w2_a"])
            delta = rebuild1 * rebuild2
        else:
            flat_in = weight[0].numel()
            parts = {"w1_a": _randn(generator, out_features, dim), "w1_b": _randn(generator, dim, flat_in),
                     "w2_a": _randn(generator, out_features, 2), "w2_b": _randn(generator, 2, flat_in)}
            delta = ((parts["w1_a"] @ parts["w1_b"]) * (parts["w2_a"] @ parts["w2_b"])).reshape(weight.shape)
        tensors |= {f"{prefix}.hada_{name}": value for name, value in parts.items()}
        if alpha is not None:
            tensors[f"{prefix}.alpha"] = torch.tensor(alpha)
        deltas[(component, module)] = delta * scale
    return tensors, deltas


def _split(size: int) -> tuple[int, int]:
    """A factorisation size = a * b with a <= b, a as large as possible (as LyCORIS picks by default)."""
    a = max(d for d in range(1, int(size ** 0.5) + 1) if size % d == 0)
    return a, size // a


def lokr(pipe, arch: str, *, seed: int, style: str, alpha: float = 4.0) -> tuple[dict[str, torch.Tensor], Deltas]:
    """LyCORIS LoKr: dW = kron(W1, W2) * scale. ``style``: "w2-decomposed" (lokr_w1 + lokr_w2_a/_b),
    "both-decomposed" (lokr_w1_a/_b + lokr_w2_a/_b), "full" (lokr_w1 + lokr_w2: scale 1 whatever alpha)
    or "tucker" (lokr_t2 on 3x3 convolutions). Scale alpha / dim only where a factor is decomposed."""
    generator = torch.Generator().manual_seed(seed)
    linear, convs = TARGETS[arch]
    tensors, deltas = {}, {}
    for (component, module), prefix in {**linear, **convs}.items():
        weight = weight_of(pipe, component, module)
        (a, c), (b, d) = _split(weight.shape[0]), _split(weight.shape[1])
        kernel = tuple(weight.shape[2:])
        rank = 2
        parts: dict[str, torch.Tensor] = {}
        if style == "both-decomposed":
            parts["lokr_w1_a"], parts["lokr_w1_b"] = _randn(generator, a, rank), _randn(generator, rank, b)
            w1 = parts["lokr_w1_a"] @ parts["lokr_w1_b"]
        else:
            parts["lokr_w1"] = w1 = _randn(generator, a, b)
        if style == "full":
            parts["lokr_w2"] = w2 = _randn(generator, c, d, *kernel)
        elif style == "tucker" and kernel and kernel[0] > 1:
            parts["lokr_w2_a"], parts["lokr_w2_b"] = _randn(generator, rank, c), _randn(generator, rank, d)
            parts["lokr_t2"] = _randn(generator, rank, rank, *kernel)
            w2 = torch.einsum("ijhw,jr,ip->prhw", parts["lokr_t2"], parts["lokr_w2_b"], parts["lokr_w2_a"])
        else:
            flat_d = d * (kernel[0] * kernel[1] if kernel else 1)
            parts["lokr_w2_a"], parts["lokr_w2_b"] = _randn(generator, c, rank), _randn(generator, rank, flat_d)
            w2 = (parts["lokr_w2_a"] @ parts["lokr_w2_b"]).reshape(c, d, *kernel)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        scale = 1.0 if style == "full" else alpha / rank
        tensors |= {f"{prefix}.{name}": value for name, value in parts.items()}
        tensors[f"{prefix}.alpha"] = torch.tensor(alpha)
        deltas[(component, module)] = torch.kron(w1.contiguous(), w2.contiguous()).reshape(weight.shape) * scale
    return tensors, deltas


def _unet_linear(arch: str) -> list[str]:
    return [module for (component, module) in TARGETS[arch][0] if component == "unet"]


def peft_dora(pipe, arch: str, *, seed: int) -> tuple[dict[str, torch.Tensor], Deltas, dict[str, str]]:
    """A diffusers/PEFT DoRA file (``lora_magnitude_vector``) written by PEFT itself, with the weight change
    ``m * (W + s B A) / ||W + s B A|| - W`` (norm per output row, s = alpha / r)."""
    import copy
    import json

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    modules = _unet_linear(arch)
    rank, alpha = 4, 8.0
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, use_dora=True, init_lora_weights=False,
                                target_modules=modules), adapter_name="dora")
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for module in modules:
            layer = unet.get_submodule(module)
            magnitude = layer.lora_magnitude_vector["dora"].weight
            magnitude.mul_(1 + 0.5 * torch.rand(magnitude.shape, generator=generator))
            weight = layer.get_base_layer().weight
            merged = weight + (alpha / rank) * layer.lora_B["dora"].weight @ layer.lora_A["dora"].weight
            deltas[("unet", module)] = magnitude[:, None] * merged / merged.norm(dim=1, keepdim=True) - weight
    state = get_peft_model_state_dict(unet, adapter_name="dora")
    config = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.use_dora": True, "unet.target_modules": modules}
    return ({f"unet.{key}": value.clone() for key, value in state.items()}, deltas,
            {"lora_adapter_metadata": json.dumps(config)})


def peft_lokr(pipe, arch: str, *, seed: int) -> tuple[dict[str, torch.Tensor], Deltas]:
    """LoKr in diffusers/PEFT naming (``unet.<module>.lokr_w1``, ``lokr_w2_a``, ``lokr_w2_b``; no alpha)."""
    generator = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for module in _unet_linear(arch):
        weight = weight_of(pipe, "unet", module)
        (a, c), (b, d) = _split(weight.shape[0]), _split(weight.shape[1])
        w1, w2_a, w2_b = _randn(generator, a, b), _randn(generator, c, 2), _randn(generator, 2, d)
        tensors |= {f"unet.{module}.lokr_w1": w1, f"unet.{module}.lokr_w2_a": w2_a, f"unet.{module}.lokr_w2_b": w2_b}
        deltas[("unet", module)] = torch.kron(w1, w2_a @ w2_b)
    return tensors, deltas


def attn_processor_lora(pipe, arch: str, *, seed: int) -> tuple[dict[str, torch.Tensor], Deltas]:
    """The old diffusers attention-processor format: ``unet.<attention>.processor.to_q_lora.down.weight``."""
    generator = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for module in _unet_linear(arch):
        attention, _, projection = module.rpartition(".")
        if projection not in ("to_q", "to_k", "to_v"):
            continue
        weight = weight_of(pipe, "unet", module)
        down, up = _randn(generator, 4, weight.shape[1]), _randn(generator, weight.shape[0], 4)
        tensors[f"unet.{attention}.processor.{projection}_lora.down.weight"] = down
        tensors[f"unet.{attention}.processor.{projection}_lora.up.weight"] = up
        deltas[("unet", module)] = up @ down
        out = f"{attention}.to_out.0"
        out_weight = weight_of(pipe, "unet", out)
        down, up = _randn(generator, 4, out_weight.shape[1]), _randn(generator, out_weight.shape[0], 4)
        tensors[f"unet.{attention}.processor.to_out_lora.down.weight"] = down
        tensors[f"unet.{attention}.processor.to_out_lora.up.weight"] = up
        deltas[("unet", out)] = up @ down
    return tensors, deltas
