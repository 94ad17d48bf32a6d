"""Shared test setup: offline mode, and tiny models and LoRA files built once per session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
# Every generate() checks that the shared model is as it was before (pipelines/patches.py).
os.environ["LORACOMPOSE_VERIFY_CLEAN"] = "1"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from loracompose.assets.tiny import build_tiny_lora, build_tiny_sd15, build_tiny_sdxl  # noqa: E402
from helpers import (  # noqa: E402
    CATEGORIES, ORACLE_PROMPT, ORACLE_SETTINGS, SUBJECTS, TRAINING_TEMPLATES, BagOfTokensEmbedder, with_metadata,
)

# The tiny models are far too small to gain from threads, and on a busy shared machine torch's
# OpenMP workers spin-wait: a 0.4 s generation took 5-12 s with 2 threads under load.
torch.set_num_threads(1)

# (file stem, trigger, category, seed) of the two LoRAs built for each tiny model.
LORA_RECIPES = (("character", "zkx", "character", 1), ("style", "qwv", "style", 2))
LORA_INIT_SCALE = 2.0


@pytest.fixture(scope="session", autouse=True)
def _isolated_loracompose_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the embedded default and other built files out of the user's real cache."""
    os.environ["LORACOMPOSE_HOME"] = str(tmp_path_factory.mktemp("loracompose-home"))


def _build_loras(model_dir: Path, out_dir: Path) -> list[Path]:
    return [
        build_tiny_lora(
            model_dir,
            out_dir / f"{stem}.safetensors",
            seed=seed,
            trigger_words=[trigger],
            category=category,
            init_scale=LORA_INIT_SCALE,
        )
        for stem, trigger, category, seed in LORA_RECIPES
    ]


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD1.5 diffusers folder (seed 0)."""
    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SDXL diffusers folder (seed 0)."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def sd15_lora_files(tiny_sd15_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two SD1.5 LoRAs: ``character.safetensors`` (trigger "zkx") and ``style.safetensors`` ("qwv")."""
    return _build_loras(tiny_sd15_dir, tmp_path_factory.mktemp("sd15-loras"))


@pytest.fixture(scope="session")
def sdxl_lora_files(tiny_sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two SDXL LoRAs: ``character.safetensors`` (trigger "zkx") and ``style.safetensors`` ("qwv")."""
    return _build_loras(tiny_sdxl_dir, tmp_path_factory.mktemp("sdxl-loras"))


@pytest.fixture(scope="session")
def specs(sd15_lora_files):
    """The two tiny SD1.5 LoRAs at weights 0.8 and 1.0."""
    from loracompose import LoraSpec

    return [LoraSpec(sd15_lora_files[0], 0.8), LoraSpec(sd15_lora_files[1], 1.0)]


@pytest.fixture(scope="session")
def fresh_merge(tiny_sd15_dir, specs) -> torch.Tensor:
    """Merge of ``specs`` (ORACLE_PROMPT, ORACLE_SETTINGS) on a pipeline nothing else ran on: the oracle the
    next Merge on a shared pipeline must equal, bit for bit, after a failing or hostile request."""
    from loracompose import Merge, load_pipeline

    return load_pipeline(tiny_sd15_dir).generate(ORACLE_PROMPT, specs, Merge(), **ORACLE_SETTINGS).latents


@pytest.fixture(scope="module")
def sd15(tiny_sd15_dir):
    """The tiny SD1.5 model through ``load_pipeline``, one per test module."""
    from loracompose import load_pipeline

    return load_pipeline(tiny_sd15_dir)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    """The tiny SDXL model through ``load_pipeline``, one per test module."""
    from loracompose import load_pipeline

    return load_pipeline(tiny_sdxl_dir)


@pytest.fixture(scope="module")
def library_dir(tiny_sd15_dir, tmp_path_factory) -> Path:
    """Twelve UNet-only LoRAs, one per subject, with trigger ``trg<k>``, a category, a description and captions."""
    folder = tmp_path_factory.mktemp("autolora-library")
    scratch = tmp_path_factory.mktemp("autolora-raw")
    for index, subject in enumerate(SUBJECTS):
        raw = build_tiny_lora(tiny_sd15_dir, scratch / f"{index}.safetensors", seed=40 + index, text_encoder=False,
                              trigger_words=[f"trg{index}"], category=CATEGORIES[index % 4], init_scale=2.0)
        captions = [template.format(subject) for template in TRAINING_TEMPLATES]
        metadata = {"loracompose.description": f"a lora of a {subject}", "loracompose.captions": json.dumps(captions)}
        with_metadata(raw, folder / f"lora{index:02d}.safetensors", metadata)
    return folder


@pytest.fixture(scope="module")
def embedder(sd15):
    """A bag-of-tokens text embedder over the tiny SD1.5 tokenizer (texts sharing words are close)."""
    return BagOfTokensEmbedder(sd15.tokenizer)
