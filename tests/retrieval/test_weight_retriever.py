"""The weight-encoding retriever's inputs and file (loracompose.retrieval): LoRA factors, recall@k, bad files.
Its training, and ranking with a trained one: tests/training/test_retriever_training.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_one_line_user_errors
from loracompose.retrieval import load_retriever, read_unet_factors, recall_at_k

PROBED_LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


def test_lora_factors_carry_alpha_over_rank(sd15_lora_files, tmp_path):
    from loracompose.assets.tiny import write_kohya_lora

    factors = read_unet_factors(sd15_lora_files[0])
    kohya = read_unet_factors(write_kohya_lora(sd15_lora_files[0], tmp_path / "kohya.safetensors"))
    assert set(kohya) == set(factors) and len(factors) == 48
    state = load_file(sd15_lora_files[0])
    _down, up = factors[PROBED_LAYER]
    torch.testing.assert_close(up, state[f"unet.{PROBED_LAYER}.lora_B.weight"] * 1.0)  # alpha = rank = 4
    torch.testing.assert_close(kohya[PROBED_LAYER][1], up)
    recall = recall_at_k(torch.eye(3), torch.eye(3)[[2, 1, 0]], [2, 1, 0], ks=(1, 2))
    assert recall.recall == {1: 1.0, 2: 1.0} and recall.chance == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}


def test_bad_retriever_files_are_one_line_user_errors(sd15_lora_files, tmp_path):
    (tmp_path / "retriever.pt").write_bytes(b"x")
    assert_one_line_user_errors([
        (lambda: load_retriever(tmp_path / "retriever.pt"), "safetensors"),
        (lambda: load_retriever(sd15_lora_files[0]), "not a loracompose retriever"),
    ])
