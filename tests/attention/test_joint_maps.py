"""Text-to-image maps from joint attention (attention/joint_maps.py) on tiny FLUX.1, SD3 and SD3.5
transformers.

Oracle: the attention the processor really computes. ``scaled_dot_product_attention`` is wrapped to
keep the queries and keys it receives (after norms and FLUX's rotary embedding); the full softmax over
all keys is formed explicitly, its image-query x chosen-text-key block taken, and (``"text"``
normaliser) renormalised over the text keys. Captured maps equal it within 1e-6 (float32; the capture
uses logsumexp in chunks, the oracle one softmax). Installing the recorder leaves the transformer's
output bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from loracompose.assets.tiny import tiny_flux_pipeline, tiny_sd3_pipeline
from loracompose.attention.joint_maps import (JointMapRecorder, default_map_blocks, joint_map_blocks,
                                              text_to_image_maps)
from loracompose.errors import UserError

GRID = (4, 5)  # image tokens (rows, columns): not square, so a transposed grid would show
TEXT = 7
TOKENS = [1, 3, 6]
ROWS = 2
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def transformers() -> dict[str, torch.nn.Module]:
    return {"flux": tiny_flux_pipeline(seed=0).transformer, "sd3": tiny_sd3_pipeline(seed=0).transformer,
            "sd35": tiny_sd3_pipeline(seed=0, sd35=True).transformer}


def _inputs(family: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    if family == "flux":
        return {"hidden_states": noise(ROWS, GRID[0] * GRID[1], 4), "encoder_hidden_states": noise(ROWS, TEXT, 32),
                "pooled_projections": noise(ROWS, 32), "timestep": torch.tensor([0.7] * ROWS),
                "guidance": torch.tensor([3.5] * ROWS), "txt_ids": torch.zeros(TEXT, 3),
                "img_ids": FluxPipeline._prepare_latent_image_ids(ROWS, *GRID, "cpu", torch.float32)}
    return {"hidden_states": noise(ROWS, 4, *GRID), "encoder_hidden_states": noise(ROWS, TEXT, 32),
            "pooled_projections": noise(ROWS, 64), "timestep": torch.tensor([700.0] * ROWS)}


def _forward(transformer: torch.nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**_inputs(family), return_dict=False)[0]


def _explicit_maps(transformer: torch.nn.Module, family: str, monkeypatch, normaliser: str) -> list[torch.Tensor]:
    """Per joint block, in forward order: the oracle maps (rows, image tokens, TOKENS)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def keeping(query, key, value, *args, **kwargs):
        if key.shape[2] == GRID[0] * GRID[1] + TEXT:  # joint attention (not SD3.5's image-only attn2)
            seen.append((query.detach().clone(), key.detach().clone()))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", keeping)
    _forward(transformer, family)
    monkeypatch.undo()
    image, text = GRID[0] * GRID[1], TEXT
    text_first = family == "flux"
    maps = []
    for query, key in seen:
        probabilities = (query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(dim=-1)
        rows = slice(text, text + image) if text_first else slice(0, image)
        columns = slice(0, text) if text_first else slice(image, image + text)
        block = probabilities[:, :, rows, columns]
        if normaliser == "text":
            block = block / block.sum(dim=-1, keepdim=True)
        maps.append(block[..., TOKENS].mean(dim=1))
    return maps


@pytest.mark.parametrize("normaliser", ["text", "joint"])
@pytest.mark.parametrize("family", ["flux", "sd3", "sd35"])
def test_captured_maps_equal_the_explicit_attention_block_by_block(transformers, family, normaliser, monkeypatch):
    transformer = transformers[family]
    expected = _explicit_maps(transformer, family, monkeypatch, normaliser)
    blocks = joint_map_blocks(transformer)
    assert len(blocks) == len(expected) == 2
    for block, oracle in zip(blocks, expected):
        recorder = JointMapRecorder(transformer, GRID, TOKENS, blocks=[block], normaliser=normaliser)
        try:
            _forward(transformer, family)
            captured = recorder.last_call()
        finally:
            recorder.remove()
        assert captured.shape == (ROWS, *GRID, len(TOKENS))
        torch.testing.assert_close(captured, oracle.reshape(ROWS, *GRID, len(TOKENS)), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("family", ["flux", "sd3", "sd35"])
def test_capture_leaves_the_output_unchanged_and_the_processors_restored(transformers, family):
    transformer = transformers[family]
    before = {name: transformer.get_submodule(name).processor for name in joint_map_blocks(transformer)}
    plain = _forward(transformer, family)
    recorder = JointMapRecorder(transformer, GRID, TOKENS, blocks=joint_map_blocks(transformer))
    captured = _forward(transformer, family)
    recorder.remove()
    recorder.remove()  # twice is safe
    assert torch.equal(plain, captured)
    assert {name: transformer.get_submodule(name).processor for name in before} == before


def test_recorder_sums_calls_averages_blocks_and_keeps_the_conditional_half(transformers):
    transformer = transformers["flux"]
    blocks = joint_map_blocks(transformer)
    per_block = []
    for block in blocks:
        recorder = JointMapRecorder(transformer, GRID, TOKENS, blocks=[block])
        _forward(transformer, "flux")
        per_block.append(recorder.last_call())
        recorder.remove()
    both = JointMapRecorder(transformer, GRID, TOKENS, blocks=blocks)
    _forward(transformer, "flux")
    _forward(transformer, "flux")
    torch.testing.assert_close(both.last_call(), (per_block[0] + per_block[1]) / 2, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(both.maps(), 2 * both.last_call(), atol=TOLERANCE, rtol=0)
    assert both.token_columns([[6], [1, 3]]) == [[2], [0, 1]]
    both.remove()
    cond = JointMapRecorder(transformer, GRID, TOKENS, blocks=blocks, conditional_rows=True)
    _forward(transformer, "flux")
    torch.testing.assert_close(cond.last_call(), both.last_call()[ROWS // 2:], atol=TOLERANCE, rtol=0)
    cond.remove()


def test_chunked_scores_equal_one_chunk():
    generator = torch.Generator().manual_seed(0)
    queries, text_keys, image_keys = (torch.randn(2, 3, n, 8, generator=generator) for n in (50, 9, 50))
    for normaliser in ("text", "joint"):
        whole = text_to_image_maps(queries, text_keys, [0, 4], image_keys=image_keys, normaliser=normaliser)
        chunked = text_to_image_maps(queries, text_keys, [0, 4], image_keys=image_keys, normaliser=normaliser,
                                     chunk_elements=2 * 3 * 59 * 7)
        torch.testing.assert_close(chunked, whole, atol=1e-7, rtol=0)


def test_default_blocks_are_the_later_joint_blocks_and_bad_names_are_refused(transformers):
    assert default_map_blocks(transformers["flux"]) == ["transformer_blocks.0.attn"]
    assert default_map_blocks(transformers["sd3"]) == ["transformer_blocks.1.attn"]
    with pytest.raises(UserError, match="not joint attention blocks"):
        JointMapRecorder(transformers["sd35"], GRID, TOKENS, blocks=["transformer_blocks.0.attn2"])
    with pytest.raises(UserError, match="normaliser"):
        JointMapRecorder(transformers["flux"], GRID, TOKENS, normaliser="image")


def test_fused_projections_are_refused_in_one_line():
    transformer = tiny_flux_pipeline(seed=0).transformer
    transformer.fuse_qkv_projections()
    recorder = JointMapRecorder(transformer, GRID, TOKENS, blocks=["transformer_blocks.0.attn"])
    with pytest.raises(UserError, match="separate query/key projections"):
        _forward(transformer, "flux")
    recorder.remove()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_maps_with_requires_grad_give_the_explicit_attentions_gradient(transformers, family, monkeypatch):
    """d(weighted sum of the maps) / d(image input) through the capture equals it through the explicit
    full attention of the SDPA inputs (text normaliser, every joint block)."""
    transformer = transformers[family]
    weights = torch.randn(ROWS, GRID[0] * GRID[1], len(TOKENS), generator=torch.Generator().manual_seed(1))

    def gradient(maps_of) -> torch.Tensor:
        inputs = _inputs(family)
        image = inputs["hidden_states"].requires_grad_(True)
        maps = maps_of(inputs)
        return torch.autograd.grad((maps.reshape(ROWS, -1, len(TOKENS)) * weights).sum(), image)[0]

    def captured(inputs):
        recorder = JointMapRecorder(transformer, GRID, TOKENS, blocks=joint_map_blocks(transformer),
                                    requires_grad=True)
        transformer(**inputs, return_dict=False)
        recorder.remove()
        return recorder.last_call()

    def explicit(inputs):
        seen = []
        original = torch.nn.functional.scaled_dot_product_attention

        def keeping(query, key, value, *args, **kwargs):
            seen.append((query, key))
            return original(query, key, value, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", keeping)
        transformer(**inputs, return_dict=False)
        monkeypatch.undo()
        image, text_first = GRID[0] * GRID[1], family == "flux"
        blocks = []
        for query, key in seen:
            probabilities = (query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(dim=-1)
            rows = slice(TEXT, TEXT + image) if text_first else slice(0, image)
            columns = slice(0, TEXT) if text_first else slice(image, image + TEXT)
            block = probabilities[:, :, rows, columns]
            blocks.append((block / block.sum(dim=-1, keepdim=True))[..., TOKENS].mean(dim=1))
        return torch.stack(blocks).mean(dim=0)

    through_capture, through_attention = gradient(captured), gradient(explicit)
    assert float(through_attention.abs().max()) > 0
    torch.testing.assert_close(through_capture, through_attention, atol=1e-5, rtol=1e-4)


def test_maps_without_requires_grad_keep_no_graph(transformers):
    inputs = _inputs("flux")
    inputs["hidden_states"].requires_grad_(True)
    recorder = JointMapRecorder(transformers["flux"], GRID, TOKENS)
    transformers["flux"](**inputs, return_dict=False)
    recorder.remove()
    assert not recorder.last_call().requires_grad
