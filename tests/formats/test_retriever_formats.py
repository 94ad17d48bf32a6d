"""The weight retriever reads every format the converter loads (loracompose.retrieval.read_unet_factors).

Oracle: the weight change computed by hand from each file's tensors (tests/formats/lora_files.py); the
retriever's factors must give it back as ``B @ A`` (B already scaled), layer by layer under the
diffusers module name, within 2e-5 absolute + 1e-5 relative (float32). Without a pipeline the names
resolve against meta-device skeletons of the base models; with the model's UNet the result is the same.
"""

from __future__ import annotations

import pytest
import torch
from lora_files import ATOL, RTOL, kohya_lora, lokr, loha, peft_dora, write

from helpers import assert_one_line_user_errors
from loracompose.retrieval import read_unet_factors

CASES = {
    "loha-sd15": lambda pipe: loha(pipe, "sd15", seed=1),
    "kohya-locon-sd15": lambda pipe: kohya_lora(pipe, "sd15", seed=2, conv=True, tucker=True),
    "kohya-sgm-sdxl": lambda pipe: kohya_lora(pipe, "sdxl", seed=3, conv=True),
    "lokr-sdxl": lambda pipe: lokr(pipe, "sdxl", seed=4, style="w2-decomposed"),
}


def _assert_factors_give(factors, deltas) -> None:
    unet_deltas = {module: delta for (component, module), delta in deltas.items() if component == "unet"}
    assert set(factors) == set(unet_deltas)  # text-encoder layers are left out, every UNet layer is named
    for module, delta in unet_deltas.items():
        down, up = factors[module]
        torch.testing.assert_close((up @ down).reshape(delta.shape), delta, atol=ATOL, rtol=RTOL,
                                   msg=lambda message, module=module: f"{module}: {message}")


@pytest.mark.parametrize("case", CASES)
def test_retriever_reads_each_format_as_its_weight_change(case, base_pipes, tmp_path):
    pipe = base_pipes[case.rsplit("-", 1)[1]]
    tensors, deltas = CASES[case](pipe)
    path = write(tmp_path / f"{case}.safetensors", tensors)
    _assert_factors_give(read_unet_factors(path), deltas)
    _assert_factors_give(read_unet_factors(path, unet=pipe.unet), deltas)


def test_retriever_refusals_are_one_line(base_pipes, tmp_path):
    pipe = base_pipes["sd15"]
    dora, _deltas, metadata = peft_dora(pipe, "sd15", seed=5)
    text_only = {key: value for key, value in loha(pipe, "sd15", seed=6)[0].items() if key.startswith("lora_te")}
    tensors, _ = loha(pipe, "sd15", seed=7)
    oft = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.oft_blocks": torch.ones(2, 2, 2)}
    assert_one_line_user_errors([
        (lambda: read_unet_factors(write(tmp_path / "dora.safetensors", dora, metadata)), "DoRA"),
        (lambda: read_unet_factors(write(tmp_path / "te.safetensors", text_only)), "adapts no UNet layer"),
        (lambda: read_unet_factors(write(tmp_path / "loha.safetensors", tensors), unet=base_pipes["sdxl"].unet),
         "made for this base model"),
        (lambda: read_unet_factors(write(tmp_path / "oft.safetensors", oft)), "OFT"),
    ])
