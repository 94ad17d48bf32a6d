"""``<lora:NAME:W>`` prompt tags in the UI (its library folder) and in bench suites (``lora_dir:``).

Oracle: the same request with the LoRA given the explicit way (ticked in the UI's table; listed in the
suite's set), pixel for pixel on the tiny SD1.5 model, with no LORACOMPOSE_LORA_DIR set.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from helpers import assert_one_line_user_errors
from loracompose.errors import UserError
from loracompose.formats.prompt_tags import LORA_DIR_VARIABLE, split_lora_tags
from loracompose.pipelines.schedulers import DEFAULT_SCHEDULER


@pytest.fixture(scope="module")
def library(sd15_lora_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("library")
    shutil.copy(sd15_lora_files[0], folder / "character.safetensors")
    (folder / "styles").mkdir()
    shutil.copy(sd15_lora_files[1], folder / "styles" / "style.safetensors")
    return folder


@pytest.fixture(autouse=True)
def no_environment_folder(monkeypatch):
    monkeypatch.delenv(LORA_DIR_VARIABLE, raising=False)


def _ui_pixels(app, prompt, loras):
    images = app.generate_api(
        prompt=prompt, loras=loras, method="merge", method_settings={}, negative_prompt="", seed=3, steps=2,
        guidance_scale=7.5, width=64, height=64, num_images=1, scheduler=DEFAULT_SCHEDULER, append_triggers=True,
        text_encoder_loras=True, trigger_words={}, region_masks={})
    with Image.open(images[0]["image"]["path"]) as image:
        return np.asarray(image.convert("RGB"))


def test_ui_tags_pick_from_its_library_folder(sd15, library, tmp_path):
    from loracompose.ui import UiOptions, resolve_settings
    from loracompose.ui.app import LoraComposeApp

    _model, settings = resolve_settings(UiOptions(model=str(tmp_path), library=library, out=tmp_path / "out"))
    assert settings.lora_dir == library.resolve()
    app = LoraComposeApp(sd15, settings)
    tagged = _ui_pixels(app, "a cat <lora:character:0.7> <lora:style>", {})
    ticked = _ui_pixels(app, "a cat", {"character": 0.7, "style": 1.0})
    assert np.array_equal(tagged, ticked)
    assert not np.array_equal(tagged, _ui_pixels(app, "a cat", {})), "the tags' LoRAs change the image"
    with pytest.raises(UserError, match="inside the LoRA folder"):
        app.generate_api.__wrapped__(app, prompt="a cat <lora:../character:1>", loras={}, method="merge",
                                     method_settings={}, negative_prompt="", seed=3, steps=2, guidance_scale=7.5,
                                     width=64, height=64, num_images=1, scheduler=DEFAULT_SCHEDULER,
                                     append_triggers=True, text_encoder_loras=True, trigger_words={},
                                     region_masks={})


def _suite(tiny_sd15_dir, library, set_entry, lora_dir: str | None = "library", style_weight: float = 1.0):
    from loracompose.eval.suite import parse_suite

    data = {"model": str(tiny_sd15_dir),
            "loras": {"character": {"file": "character.safetensors"},
                      "style": {"file": "styles/style.safetensors", "weight": style_weight}},
            "sets": [set_entry], "methods": ["merge"], "seeds": [5], "steps": 2, "width": 64, "height": 64}
    if lora_dir is not None:
        data["lora_dir"] = lora_dir
    return parse_suite(data, base_dir=library)  # the suite file sits in the library folder


def test_suite_lora_dir_tags_equal_the_listed_loras(sd15, tiny_sd15_dir, library, tmp_path):
    from loracompose.eval.runner import run_job

    tagged = _suite(tiny_sd15_dir, library, {"id": "tagged", "loras": ["character"],
                                             "prompt": "a cat <lora:style:0.6>"}, lora_dir=".")
    listed = _suite(tiny_sd15_dir, library, {"id": "listed", "loras": ["character", "style"], "prompt": "a cat"},
                    lora_dir=None, style_weight=0.6)
    assert tagged.lora_dir == library / "."  # relative to the suite file, like every suite path
    images, prompts = [], []
    for suite in (tagged, listed):
        out_dir = tmp_path / suite.sets[0].id
        record = run_job(sd15, None, suite, suite.jobs()[0], out_dir)
        with Image.open(out_dir / record["image"]) as image:
            images.append(np.asarray(image.convert("RGB")))
        prompts.append(record["prompt"])
    assert np.array_equal(images[0], images[1])  # without the tag's LoRA the listed style would differ
    assert prompts[0] == prompts[1] and "<" not in prompts[0]


def test_suite_tag_errors_name_the_set(tiny_sd15_dir, library):
    assert_one_line_user_errors([
        (lambda: _suite(tiny_sd15_dir, library, {"id": "s1", "loras": ["character"], "prompt": "a <lora:nowhere:1>"},
                        lora_dir="."), "suite set 's1'.*no LoRA named 'nowhere'"),
        (lambda: _suite(tiny_sd15_dir, library, {"id": "s2", "loras": ["character"], "prompt": "a <lora:style:1>"},
                        lora_dir=None), "no LoRA folder is set"),
        (lambda: _suite(tiny_sd15_dir, library, {"id": "s3", "loras": ["character"], "prompt": "a <lora:style:1>"},
                        lora_dir="missing"), "is not a folder"),
    ])
    assert split_lora_tags("a <lora:styles/style:0.5>", library)[1][0].path == library / "styles/style.safetensors"
