"""Per-block strengths: the set_adapters dict form equals plain diffusers' set_adapters; lbw vectors."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_files import assert_weights, kohya_lora, layer_weights, write

from loracompose.errors import UserError
from loracompose.formats import load_lora_file
from loracompose.formats.block_weights import lbw_block_weights
from loracompose.lora import LoraSpec

BLOCKS = {
    "sd15": {"down": {"block_1": [0.3, 0.7]}, "mid": 0.5, "up": {"block_0": [0.0, 1.5, 0.2]}},
    "sdxl": {"down": 0.4, "mid": 0.0, "up": {"block_0": [1.0, 0.25, 2.0]}},
}


def _fused(pipe, name="file"):
    pipe.fuse_lora(components=["unet"], adapter_names=[name])
    return layer_weights(pipe)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_dict_form_equals_diffusers_set_adapters(base_pipes, tmp_path, arch):
    base = base_pipes[arch]
    tensors, deltas = kohya_lora(base, arch, seed=31, conv=True)
    # UNet only (diffusers cannot read the text-encoder keys), and not the time embedding (diffusers'
    # set_adapters cannot place a layer outside the blocks under a dict weight).
    tensors = {key: value for key, value in tensors.items()
               if key.startswith("lora_unet_") and "time_embed" not in key}
    path = write(tmp_path / "locon.safetensors", tensors)
    reference = copy.deepcopy(base)
    reference.load_lora_weights(str(path), adapter_name="file")
    reference.set_adapters(["file"], adapter_weights=[{"unet": BLOCKS[arch]}])
    ours = copy.deepcopy(base)
    load_lora_file(ours, path, "file", block_weights={"unet": BLOCKS[arch]})
    changed = {key for key in deltas if key[0] == "unet" and "time_embedding" not in key[1]}
    assert_weights(_fused(ours), _fused(reference), changed)
    plain = copy.deepcopy(base)
    load_lora_file(plain, path, "file")
    assert any(not torch.equal(a, b) for a, b in zip(_fused(plain).values(), layer_weights(ours).values()))


def test_text_encoder_block_weight(base_pipes, tmp_path):
    """The text encoder's value scales its layers' deltas (oracle: the hand deltas times the value)."""
    base = base_pipes["sd15"]
    tensors, deltas = kohya_lora(base, "sd15", seed=32, conv=False)
    path = write(tmp_path / "lora.safetensors", tensors)
    ours = copy.deepcopy(base)
    load_lora_file(ours, path, "file", block_weights={"text_encoder": 0.3})
    ours.fuse_lora(components=["unet", "text_encoder"], adapter_names=["file"])
    expected = layer_weights(base)
    for key, delta in deltas.items():
        expected[key] = expected[key] + delta * (0.3 if key[0] == "text_encoder" else 1.0)
    assert_weights(layer_weights(ours), expected, set(deltas))


def test_lbw_vectors_give_every_block_of_the_unet_a_strength():
    """As the extension fills a 17/12-value vector: the listed blocks their values, the others 0."""
    sd15 = lbw_block_weights("0.5,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16", "test")
    assert sd15 == {"BASE": 0.5, "IN00": 0, "IN01": 1, "IN02": 2, "IN03": 0, "IN04": 3, "IN05": 4, "IN06": 0,
                    "IN07": 5, "IN08": 6, "IN09": 0, "IN10": 0, "IN11": 0, "MID": 7, "OUT00": 0, "OUT01": 0,
                    "OUT02": 0, "OUT03": 8, "OUT04": 9, "OUT05": 10, "OUT06": 11, "OUT07": 12, "OUT08": 13,
                    "OUT09": 14, "OUT10": 15, "OUT11": 16}
    sdxl = lbw_block_weights("1,0,0,1,1,0.5,1,1,1,0,0,0", "test")
    assert sdxl == {"BASE": 1, "IN00": 0, "IN01": 0, "IN02": 0, "IN03": 0, "IN04": 0, "IN05": 0, "IN06": 0,
                    "IN07": 1, "IN08": 1, "MID": 0.5, "OUT00": 1, "OUT01": 1, "OUT02": 1, "OUT03": 0, "OUT04": 0,
                    "OUT05": 0, "OUT06": 0, "OUT07": 0, "OUT08": 0}
    # the extension's full forms: every block written out, the unlisted ones at 0 here
    assert lbw_block_weights("0.5,0,1,2,0,3,4,0,5,6,0,0,0,7,0,0,0,8,9,10,11,12,13,14,15,16", "test") == sd15
    assert lbw_block_weights("1,0,0,0,0,0,0,0,1,1,0.5,1,1,1,0,0,0,0,0,0", "test") == sdxl
    spec = LoraSpec.parse("style.safetensors:0.8:lbw=1,0,0,1,1,0.5,1,1,1,0,0,0")
    assert spec.weight == 0.8 and str(spec.path) == "style.safetensors" and spec.block_weights == sdxl
    with pytest.raises(UserError, match=r"--lora 'x.safetensors:lbw=1,2': lbw='1,2' must be a preset name") as caught:
        LoraSpec.parse("x.safetensors:lbw=1,2")
    assert "\n" not in str(caught.value)


def test_generate_uses_block_weights(sd15, sd15_lora_files):
    """Through generate: zero blocks everywhere is the base image; a changed block weight changes it."""
    import numpy as np

    zero = {"unet": {"down": 0.0, "mid": 0.0, "up": 0.0}, "text_encoder": 0.0}

    def run(loras):
        result = sd15.generate("a cat", loras, steps=2, seed=1, output_type="np", append_triggers=False)
        return np.asarray(result.images)

    base = run([])
    spec = LoraSpec(sd15_lora_files[0], 1.0, block_weights=zero)
    np.testing.assert_allclose(run([spec]), base, atol=1e-6, rtol=0)
    half = LoraSpec(sd15_lora_files[0], 1.0, block_weights={"unet": {"mid": 0.0}})
    assert not np.allclose(run([half]), run([LoraSpec(sd15_lora_files[0], 1.0)]), atol=1e-4)
