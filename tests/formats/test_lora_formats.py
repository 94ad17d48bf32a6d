"""Each LoRA file format loads as exactly the weight change its tensors define.

Oracle: the delta computed by hand from the file's tensors (tests/formats/lora_files.py) added to a
plain diffusers model's weights, compared with the loaded adapter fused into the same model
(tolerance 2e-5 absolute + 1e-5 relative, float32), and plain diffusers' own loading where it loads the
format.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from lora_files import (COMPONENTS, Deltas, assert_weights, attn_processor_lora, kohya_lora, layer_weights, lokr,
                        loha, peft_dora, peft_lokr, write)

from loracompose.errors import UserError
from loracompose.formats import load_lora_file



def _expected(base, deltas: Deltas) -> dict[tuple[str, str], torch.Tensor]:
    weights = layer_weights(base)
    for key, delta in deltas.items():
        weights[key] = weights[key] + delta
    return weights


def _loaded_and_fused(base, path: Path, name: str = "file") -> dict[tuple[str, str], torch.Tensor]:
    pipe = copy.deepcopy(base)
    load_lora_file(pipe, path, name)
    components = [component for component in COMPONENTS if getattr(pipe, component, None) is not None]
    pipe.fuse_lora(components=components, adapter_names=[name])
    return layer_weights(pipe)


CASES = {
    "kohya LoRA with text encoder": lambda pipe, arch: kohya_lora(pipe, arch, seed=1, conv=False),
    "kohya LoRA without alpha (scale 1)": lambda pipe, arch: kohya_lora(pipe, arch, seed=2, conv=False, alpha=None),
    "LoCon": lambda pipe, arch: kohya_lora(pipe, arch, seed=3, conv=True),
    "LoCon with lora_mid (Tucker)": lambda pipe, arch: kohya_lora(pipe, arch, seed=4, conv=True, tucker=True),
    "LoHa": lambda pipe, arch: loha(pipe, arch, seed=5),
    "LoHa without alpha": lambda pipe, arch: loha(pipe, arch, seed=6, alpha=None),
    "LoHa with hada_t1/t2 (Tucker)": lambda pipe, arch: loha(pipe, arch, seed=7, tucker=True),
    "LoKr lokr_w1 + lokr_w2_a/b": lambda pipe, arch: lokr(pipe, arch, seed=8, style="w2-decomposed"),
    "LoKr both factors decomposed": lambda pipe, arch: lokr(pipe, arch, seed=9, style="both-decomposed"),
    "LoKr full factors (scale 1)": lambda pipe, arch: lokr(pipe, arch, seed=10, style="full"),
    "LoKr with lokr_t2 (Tucker)": lambda pipe, arch: lokr(pipe, arch, seed=11, style="tucker"),
    "DoRA dora_scale per output": lambda pipe, arch: kohya_lora(pipe, arch, seed=12, conv=True, dora="out"),
    "DoRA dora_scale per input": lambda pipe, arch: kohya_lora(pipe, arch, seed=13, conv=False, dora="in"),
}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("case", list(CASES))
def test_file_loads_as_the_hand_computed_delta(base_pipes, tmp_path, arch, case):
    base = base_pipes[arch]
    tensors, deltas = CASES[case](base, arch)
    path = write(tmp_path / "lora.safetensors", tensors)
    assert_weights(_loaded_and_fused(base, path), _expected(base, deltas), set(deltas))


# ---------------------------------------------------------------------------------- against plain diffusers


def _diffusers_fused(base, path: Path, name: str = "file", unet_only: bool = False):
    """Layer weights after plain diffusers loads ``path`` and fuses it (``unet_only``: the UNet's own
    ``load_lora_adapter``, the only diffusers entry point for LoKr on these pipelines)."""
    pipe = copy.deepcopy(base)
    if unet_only:
        pipe.unet.load_lora_adapter(load_file(str(path)), prefix="unet", adapter_name=name)
    else:
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.fuse_lora(components=["unet"], adapter_names=[name])
    return layer_weights(pipe)


def _unet_only(tensors: dict[str, torch.Tensor], deltas: Deltas):
    return ({key: value for key, value in tensors.items() if key.startswith("lora_unet_")},
            {key: value for key, value in deltas.items() if key[0] == "unet"})


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_kohya_locon_equals_plain_diffusers(base_pipes, tmp_path, arch):
    """diffusers loads kohya UNet files (LoRA and LoCon, sgm names on SDXL) but not their text-encoder keys."""
    base = base_pipes[arch]
    tensors, deltas = _unet_only(*kohya_lora(base, arch, seed=21, conv=True))
    path = write(tmp_path / "locon.safetensors", tensors)
    ours = _loaded_and_fused(base, path)
    assert_weights(ours, _diffusers_fused(base, path), set(deltas))
    assert_weights(ours, _expected(base, deltas), set(deltas))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_peft_dora_equals_plain_diffusers(base_pipes, tmp_path, arch):
    base = base_pipes[arch]
    tensors, deltas, metadata = peft_dora(base, arch, seed=22)
    path = write(tmp_path / "dora.safetensors", tensors, metadata)
    ours = _loaded_and_fused(base, path)
    assert_weights(ours, _diffusers_fused(base, path), set(deltas))
    assert_weights(ours, _expected(base, deltas), set(deltas))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_peft_lokr_equals_plain_diffusers(base_pipes, tmp_path, arch):
    base = base_pipes[arch]
    tensors, deltas = peft_lokr(base, arch, seed=23)
    path = write(tmp_path / "lokr.safetensors", tensors)
    ours = _loaded_and_fused(base, path)
    assert_weights(ours, _diffusers_fused(base, path, unet_only=True), set(deltas))
    assert_weights(ours, _expected(base, deltas), set(deltas))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_old_attention_processor_file(base_pipes, tmp_path, arch):
    base = base_pipes[arch]
    tensors, deltas = attn_processor_lora(base, arch, seed=24)
    path = write(tmp_path / "attn-procs.safetensors", tensors)
    ours = _loaded_and_fused(base, path)
    assert_weights(ours, _expected(base, deltas), set(deltas))
    assert_weights(ours, _diffusers_fused(base, path), set(deltas))


# ---------------------------------------------------------------------------------- refusals

_TO_Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
REFUSALS = {
    "OFT": ({f"{_TO_Q}.oft_blocks": torch.zeros(4, 16, 16), f"{_TO_Q}.alpha": torch.tensor(1.0)}, r"OFT format"),
    "BOFT": ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.boft_R": torch.zeros(1, 4, 16, 16)},
             r"BOFT format"),
    "GLoRA": ({f"{_TO_Q}.a1.weight": torch.zeros(4, 64), f"{_TO_Q}.a2.weight": torch.zeros(64, 4)}, r"GLoRA format"),
    "full diff": ({f"{_TO_Q}.diff": torch.zeros(64, 64)}, r"full weight difference"),
    "unknown key": ({f"{_TO_Q}.lora_down.weight": torch.zeros(4, 64), f"{_TO_Q}.mystery": torch.zeros(1)},
                    r"key in no format loracompose knows \('.*mystery'\)"),
    "layer the model lacks": ({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64),
                               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 4)},
                              r"adapts layer 'down_blocks_7_attentions_0_proj_in' of the unet, which this model"),
    "wrong shape": ({f"{_TO_Q}.lora_down.weight": torch.zeros(4, 48), f"{_TO_Q}.lora_up.weight": torch.zeros(64, 4)},
                    r"does not fit layer down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q "
                    r".*weight \(64, 64\)"),
    "SDXL text encoder on SD1.5": ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
                                    "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(37, 4)},
                                   r"weights for a text_encoder_2 this model does not have"),
    "LoHa part missing": ({f"{_TO_Q}.hada_w1_a": torch.zeros(64, 2), f"{_TO_Q}.hada_w1_b": torch.zeros(2, 64)},
                          r"does not fit layer .*missing 'w2_a'"),
    "two formats on one layer": ({f"{_TO_Q}.lora_down.weight": torch.zeros(4, 64),
                                  f"{_TO_Q}.lokr_w1": torch.zeros(8, 8)}, r"has LoKr, LoRA weights for layer"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_naming_file_and_reason(base_pipes, tmp_path, case):
    tensors, reason = REFUSALS[case]
    path = write(tmp_path / f"{case.replace(' ', '-')}.safetensors", tensors)
    pipe = copy.deepcopy(base_pipes["sd15"])
    with pytest.raises(UserError, match=reason) as caught:
        load_lora_file(pipe, path, "file")
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert not pipe.get_list_adapters().get("unet"), "nothing is loaded"


def test_non_finite_values_refused_by_the_converter(base_pipes, tmp_path):
    tensors, _ = kohya_lora(base_pipes["sd15"], "sd15", seed=41, conv=False)
    key = next(key for key in tensors if key.endswith(".lora_up.weight"))
    tensors[key][0, 0] = float("nan")
    path = write(tmp_path / "nan.safetensors", tensors)
    pipe = copy.deepcopy(base_pipes["sd15"])
    with pytest.raises(UserError, match=r"nan\.safetensors") as caught:
        load_lora_file(pipe, path, "file")
    assert "\n" not in str(caught.value) and not pipe.get_list_adapters().get("unet")
