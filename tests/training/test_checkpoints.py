"""Checkpoints shared by every trainer (loracompose.training): optimizer state through safetensors."""

from __future__ import annotations

import pytest
import torch

from loracompose import UserError
from loracompose.training.trainer import flatten_optimizer_state, unflatten_optimizer_state


def test_optimizer_state_round_trips_through_safetensors():
    weights = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(weights, lr=1e-2)
    (weights[0].sum() + weights[1].square().sum()).backward()
    optimizer.step()
    tensors, metadata = flatten_optimizer_state(optimizer, ["a", "b"])
    assert all(isinstance(value, str) for value in metadata.values())
    fresh = torch.optim.AdamW([torch.nn.Parameter(w.detach().clone()) for w in weights], lr=1e-2)
    fresh.load_state_dict(unflatten_optimizer_state(tensors, metadata, ["a", "b"]))
    for index in (0, 1):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state_dict()["state"][index][key], optimizer.state_dict()["state"][index][key])
    with pytest.raises(UserError, match="other LoRA layers"):
        unflatten_optimizer_state(tensors, metadata, ["b", "a"])
