"""The UI on FLUX.1 and SD3: ``loracompose ui --model <tiny DiT folder> --library <its LoRAs>`` served on a
local port; /generate with no scheduler or guidance uses the family's own (flow-matching Euler, FLUX 3.5 /
SD3 7), the result equals the Python API's, and the method list holds only the methods that run on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from helpers import UNetOnlyMerge, serve_tiny_ui
from PIL import Image

from loracompose import METHODS, LoraSpec, Merge, load_pipeline
from loracompose.assets.tiny import build_tiny_flux, build_tiny_lora, build_tiny_sd3
from loracompose.pipelines.compose_pipeline import methods_for_family

BUILDERS = {"flux": build_tiny_flux, "sd3": build_tiny_sd3}
LORAS = {"character": 0.8, "style": 1.0}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def dit_model(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(family, model folder, LoRA library folder)."""
    root = tmp_path_factory.mktemp(f"ui-{request.param}")
    model = BUILDERS[request.param](root / "model")
    library = root / "library"
    library.mkdir()
    for seed, name in enumerate(LORAS, start=1):
        build_tiny_lora(model, library / f"{name}.safetensors", seed=seed, init_scale=2.0)
    return request.param, model, library


def test_generate_endpoint_uses_the_family_defaults_and_equals_the_python_api(dit_model):
    family, model, library = dit_model
    with serve_tiny_ui(model, library) as (app, _blocks, _settings, url):
        assert app.schedulers == ["euler"] and app.default_scheduler == "euler"
        assert set(app.methods) == set(methods_for_family(family)), "every method that runs on it, no other"
        images = Client(url, verbose=False).predict(prompt="a cat", loras=LORAS, method="merge", seed=3, steps=2,
                                                    width=32, height=32, api_name="/generate")
        pipe = app.pipe
        sidecar = json.loads(Path(images[0]["sidecar"]).read_text())
        assert sidecar["scheduler"] == "euler" and sidecar["guidance_scale"] == pipe.default_guidance_scale
        assert images[0]["unet_calls"] == 2
    specs = [LoraSpec(library / f"{name}.safetensors", weight, name=name) for name, weight in LORAS.items()]
    expected = load_pipeline(model, device="cpu").generate("a cat", specs, Merge(), seed=3, steps=2, width=32,
                                                           height=32, output_type="np", show_progress=False)
    with Image.open(images[0]["image"]) as image:
        served = np.asarray(image.convert("RGB"), dtype=np.int16)
    ours = np.round(np.clip(expected.images[0], 0, 1) * 255).astype(np.int16)
    assert np.abs(served - (ours if ours.shape[-1] == 3 else np.repeat(ours, 3, axis=-1))).max() <= 1


def test_methods_that_do_not_run_on_the_family_are_refused_in_one_line(dit_model, monkeypatch):
    family, model, library = dit_model
    monkeypatch.setitem(METHODS, UNetOnlyMerge.name, UNetOnlyMerge)  # every registered method runs on DiTs
    assert UNetOnlyMerge.name not in methods_for_family(family)
    with serve_tiny_ui(model, library) as (app, _blocks, _settings, url), pytest.raises(AppError) as error:
        assert UNetOnlyMerge.name not in app.methods
        Client(url, verbose=False).predict(prompt="a cat", loras=LORAS, method=UNetOnlyMerge.name, steps=1,
                                           width=32, height=32, api_name="/generate")
    message = str(error.value).strip()
    assert f"method {UNetOnlyMerge.name!r} is not available; choose one of " in message and "\n" not in message
