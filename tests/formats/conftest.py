"""Fixtures of the LoRA file format tests."""

from __future__ import annotations

import pytest

from loracompose.assets.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def base_pipes():
    return {"sd15": tiny_sd15_pipeline(seed=0), "sdxl": tiny_sdxl_pipeline(seed=0)}
