"""The web UI end to end: gradio_client against the served app, and a real headless Chromium.

The app is served once for the module on 127.0.0.1 (free port) with the embedded default, as
``loracompose ui`` runs with no arguments; every generation uses 2 steps at 64x64.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from helpers import serve_tiny_ui
from PIL import Image

from loracompose import METHODS
from loracompose.errors import UserError
from loracompose.pipelines import load_pipeline
from loracompose.pipelines.schedulers import DEFAULT_SCHEDULER
from loracompose.ui import UiOptions, resolve_settings
from loracompose.ui.app import AppSettings, LoraComposeApp
from loracompose.library import open_library
from loracompose.ui.library import TABLE_HEADERS, UploadStore, safe_file_stem, scan_library

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
TWO_LORAS = {"character": 0.8, "outfit": 1.0}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Served:
    """The app under test: its handlers (for the method forms), settings and address."""

    app: LoraComposeApp
    blocks: Any
    settings: AppSettings
    url: str

    def client(self) -> Client:
        return Client(self.url, verbose=False)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """``loracompose ui`` with no model on the embedded tiny SD1.5 variant (64x64, SD1.5 layout) and
    its 3 demo LoRAs; the toy-world default is served by test_embedded_toyworld_is_the_ui_default."""
    assert os.environ.get("GRADIO_ANALYTICS_ENABLED") == "False"
    with serve_tiny_ui() as (app, blocks, settings, url):
        yield Served(app, blocks, settings, url)


# ------------------------------------------------------------------------------------ request helpers


def lora_table(served: Served, loras: Mapping[str, float]) -> dict[str, Any]:
    """The LoRA table with exactly ``loras`` ticked at these weights."""
    rows = [[row[1] in loras, row[1], loras.get(row[1], 1.0), *row[3:]] for row in served.app.initial_table()]
    return {"headers": TABLE_HEADERS, "data": rows}


def method_values(served: Served, settings: Mapping[str, Mapping[str, Any]] | None = None) -> list[Any]:
    """Every method panel's values: defaults, except ``settings[method][field]``."""
    settings = settings or {}
    values = []
    for panel in served.app.forms.panels.values():
        for control in panel.controls:
            chosen = settings.get(panel.name, {})
            values.append(control.show(chosen[control.field_name]) if control.field_name in chosen
                          else control.component.value)
    return values


def shared_args(served: Served, loras: Mapping[str, float], *, prompt: str = "a cat", seed: int = 0,
                width: int = 64, num_images: int = 1) -> list[Any]:
    return [prompt, "", lora_table(served, loras), seed, 2, 7.5, width, 64, num_images, DEFAULT_SCHEDULER, True, True]


def generate(client: Client, served: Served, loras: Mapping[str, float], method: str,
             settings: Mapping[str, Mapping[str, Any]] | None = None, **shared: Any) -> tuple:
    return client.predict(*shared_args(served, loras, **shared), method, *method_values(served, settings),
                          api_name="/generate_form")


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_image(first: str, second: str) -> None:
    assert np.abs(pixels(first) - pixels(second)).max() <= 1, "images differ by more than 1/255"


# ------------------------------------------------------------------------------------ client tests


def test_embedded_default_offers_the_demo_loras_and_all_methods(served):
    assert [entry.name for entry in served.settings.library] == ["character", "outfit", "style"]
    assert served.settings.upload_root.is_relative_to(Path(os.environ["LORACOMPOSE_HOME"]))
    assert all(row[0] for row in served.app.initial_table()), "the demo LoRAs start ticked"
    api = served.client().view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/generate", "/compare", "/upload_loras", "/reuse_settings", "/suggest_loras"} <= set(api)
    assert "/generate_form" not in api, "the page's form endpoint (one input per control) is undocumented"
    generate_params = {p["parameter_name"]: p for p in api["/generate"]["parameters"]}
    assert list(generate_params) == GENERATE_PARAMETERS
    assert set(generate_params["method"]["type"]["enum"]) == set(METHODS)
    assert generate_params["steps"]["parameter_default"] == served.settings.default_steps
    assert generate_params["width"]["parameter_default"] == 64


GENERATE_PARAMETERS = ["prompt", "loras", "method", "method_settings", "negative_prompt", "seed", "steps",
                       "guidance_scale", "width", "height", "num_images", "scheduler", "append_triggers",
                       "text_encoder_loras", "trigger_words", "region_masks"]


def test_named_generate_equals_the_python_api(served):
    """``/generate`` called by the parameter names view_api() lists gives the Python API's image and
    sidecar for the same inputs (and the method settings reach the method)."""
    client = served.client()
    names = [p["parameter_name"] for p in client.view_api(print_info=False, return_format="dict")[
        "named_endpoints"]["/generate"]["parameters"]]
    chosen = {"prompt": "a cat", "loras": TWO_LORAS, "method": "composite", "method_settings": {"mixing_weights": [0.3, 0.7]},
              "seed": 4, "steps": 2, "guidance_scale": 6.0, "width": 64, "height": 64, "num_images": 2}
    assert set(chosen) <= set(names)
    images = client.predict(**{name: chosen[name] for name in names if name in chosen}, api_name="/generate")

    from loracompose import Composite, LoraSpec

    entries = {entry.name: entry for entry in served.settings.library}
    specs = [LoraSpec(entries[name].path, weight, name=name, trigger_words=entries[name].trigger_words,
                      category=entries[name].category) for name, weight in TWO_LORAS.items()]
    pipe = load_pipeline(served.settings.model_label)  # a pipeline of its own: the served one is the subject
    kwargs = dict(seed=4, steps=2, guidance_scale=6.0, width=64, height=64, show_progress=False)
    expected = pipe.generate("a cat", specs, Composite(mixing_weights=(0.3, 0.7)), num_images=2, **kwargs)
    default = pipe.generate("a cat", specs, Composite(), **kwargs)
    assert [item["seed"] for item in images] == [4, 5]
    for item, image in zip(images, expected.images):
        served_pixels, python_pixels = pixels(item["image"]), np.asarray(image.convert("RGB"), dtype=np.int16)
        assert np.abs(served_pixels - python_pixels).max() <= 1, "the served image differs from the Python API's"
        assert json.loads(Path(item["sidecar"]).read_text())["method_settings"]["mixing_weights"] == [0.3, 0.7]
    assert np.abs(pixels(images[0]["image"]) - np.asarray(default.images[0].convert("RGB"), dtype=np.int16)).max() > 1, \
        "the mixing weights should change the image"
    assert item["method_settings"]["mixing_weights"] == [0.3, 0.7] and "UNet calls" in item["caption"]


@pytest.mark.parametrize("arguments, message", [
    ({"method": "switch", "method_settings": {"perod": 3}}, "setting 'perod' is not known; use period"),
    ({"method": "switch", "method_settings": {"period": "3"}}, "method_settings.period: give a number"),
    ({"method": "composite", "method_settings": {"mixing_weights": [1, "x"]}}, "mixing_weights[1]: give a number"),
    ({"loras": {"nobody": 1.0}}, "LoRA 'nobody' is not in this server's library; use one of character"),
    ({"loras": {"character": 1.0}, "trigger_words": {"style": ["x"]}}, "trigger_words: style not in loras"),
    ({"width": 60}, "multiples of 8"),
])
def test_named_generate_refuses_bad_arguments_in_one_line(served, arguments, message):
    with pytest.raises(AppError) as error:
        served.client().predict(prompt="a cat", steps=2, **arguments, api_name="/generate")
    text = str(error.value)
    assert message in text and "Traceback" not in text and "\n" not in text.strip()


@pytest.mark.parametrize("method", list(METHODS))
def test_generate_with_two_loras_and_each_method(served, method):
    gallery, downloads, status, concepts = generate(served.client(), served, TWO_LORAS, method)
    assert len(gallery) == 1 and gallery[0]["caption"].startswith(method)
    assert "UNet calls" in gallery[0]["caption"] and "character:0.8" in gallery[0]["caption"]
    assert pixels(gallery[0]["image"]).shape == (64, 64, 3)
    png, sidecar = sorted(downloads, key=lambda path: Path(path).suffix != ".png")
    assert Path(png).read_bytes().startswith(PNG_SIGNATURE)
    record = json.loads(Path(sidecar).read_text())
    assert record["method"] == method and record["steps"] == 2
    assert [(lora["name"], lora["weight"]) for lora in record["loras"]] == [("character", 0.8), ("outfit", 1.0)]
    order = record["method_settings"].get("frequency_order")
    if order is not None:  # CMLoRA family: the UI profiled the LoRAs before generating, as the CLI does
        assert set(order["class_sources"].values()) == {"score"}
    assert method in status


def test_composer_boxes_reach_the_method_and_are_drawn(served):
    boxes = ((0.0, 0.0, 0.5, 1.0), (0.5, 0.25, 1.0, 0.75))
    gallery, downloads, status, concepts = generate(
        served.client(), served, TWO_LORAS, "composer", {"composer": {"boxes": boxes, "region_prompts": ("", "a red cloak")}})
    record = json.loads(Path(next(path for path in downloads if path.endswith(".json"))).read_text())
    assert [tuple(box.values()) for box in record["method_settings"]["boxes"]] == list(boxes)
    assert record["method_settings"]["region_prompts"] == [None, "a red cloak"]
    assert "Boxes: character: (0.00, 0.00, 0.50, 1.00); outfit: (0.50, 0.25, 1.00, 0.75)" in status
    (overlay,) = concepts
    drawn, image = pixels(overlay["image"]), pixels(gallery[0]["image"])
    changed = np.abs(drawn - image).max(axis=-1) > 0
    assert changed[:, 0].all() and changed[16:48, 32].all(), "box edges drawn at their pixel coordinates"
    assert not changed[40, 10], "inside of a box untouched"


def test_clora_shows_its_concept_masks(served):
    _, _, status, concepts = generate(served.client(), served, TWO_LORAS, "clora", {"clora": {"latent_update": False}})
    assert [item["caption"] for item in concepts] == ["concept masks at step 1", "character (step 1)", "outfit (step 1)"]
    assert "Mask shares at step 1: base " in status
    shares = [float(part.split()[-1].rstrip("%")) for part in status.split("Mask shares at step 1: ")[1].split(", ")]
    assert sum(shares) == pytest.approx(100, abs=2), "the masks partition the image"


def test_suggest_ticks_the_lora_whose_trigger_is_in_the_prompt(served):
    triggers = {row[1]: row[3] for row in served.app.initial_table()}
    prompt = f"a portrait, {triggers['style'].split(',')[0]}"
    table, message = served.client().predict(prompt, lora_table(served, {"character": 1.0}), 1, api_name="/suggest_loras")
    assert {row[1]: row[0] for row in table["data"]} == {"character": False, "outfit": False, "style": True}
    assert message.startswith("suggested: style (") and "trigger in prompt" in message


def test_box_layout_preview_draws_the_typed_boxes(served):
    from loracompose.ui.method_views import box_layout

    layout = served.client().predict("0,0,0.5,1; 0.5,0.25,1,0.75", api_name="/box_layout")
    drawn = pixels(layout["path"] if isinstance(layout, dict) else layout)
    assert drawn.shape == (256, 256, 3)
    assert (drawn[:, 0] != 240).any(axis=-1).all() and (drawn[64:192, 255] != 240).any(axis=-1).all()
    assert (drawn[20, 200] == 240).all(), "outside every box stays blank"
    assert box_layout("0,0,2,1") is None and box_layout("") is None


def test_box_editor_layers_become_boxes(served, tmp_path):
    from loracompose.ui.method_views import boxes_from_drawing

    first, second = np.zeros((256, 256, 4), np.uint8), np.zeros((256, 256, 4), np.uint8)
    first[10:120, 0:128, 3] = 255  # rows (y) 10..119, columns (x) 0..127
    second[64:192, 192:256, 3] = 255
    assert boxes_from_drawing({"layers": [first, np.zeros_like(first), second]}) == \
        "0,0.039,0.5,0.469; 0.75,0.25,1,0.75"
    files = []
    for index, layer in enumerate((np.full((256, 256, 4), 255, np.uint8), first, second)):
        Image.fromarray(layer, "RGBA").save(tmp_path / f"{index}.png")
        files.append(handle_file(str(tmp_path / f"{index}.png")))
    text = served.client().predict({"background": files[0], "layers": files[1:], "composite": None},
                                   api_name="/boxes_from_drawing")
    assert text == "0,0.039,0.5,0.469; 0.75,0.25,1,0.75"


def test_tara_shows_the_token_positions(served):
    _, _, status, concepts = generate(served.client(), served, TWO_LORAS, "tara", prompt="a cat")
    assert "Token positions: character: tokens [" in status and concepts == []


def test_concurrent_sessions_match_one_at_a_time(served):
    """Two browser sessions with different LoRAs, submitted together, see only their own adapters."""
    requests = [({"character": 1.0, "style": 0.7}, "composite", 5), ({"outfit": 1.2}, "merge", 5)]
    alone = [generate(served.client(), served, loras, method, seed=seed)[0][0]["image"]
             for loras, method, seed in requests]
    clients = [served.client() for _ in requests]
    jobs = [client.submit(*shared_args(served, loras, seed=seed), method, *method_values(served), api_name="/generate_form")
            for client, (loras, method, seed) in zip(clients, requests)]
    together = [job.result(timeout=120)[0][0]["image"] for job in jobs]
    for single, concurrent in zip(alone, together):
        assert_same_image(single, concurrent)
    assert np.abs(pixels(together[0]) - pixels(together[1])).max() > 1, "the two LoRA sets should differ"


def test_concurrent_threads_do_not_mix_sessions(served):
    """Threads sharing nothing but the server: each session's gallery holds only its own results."""
    results: dict[str, list] = {}

    def run(name: str, loras: Mapping[str, float]) -> None:
        client = served.client()
        for seed in (1, 2):
            gallery, _, _, _ = generate(client, served, loras, "merge", seed=seed)
        results[name] = gallery

    threads = [threading.Thread(target=run, args=(name, loras))
               for name, loras in (("a", {"character": 1.0}), ("b", {"style": 1.0}))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert [len(results["a"]), len(results["b"])] == [2, 2]
    assert all("character:1" in item["caption"] and "style" not in item["caption"] for item in results["a"])
    assert all("style:1" in item["caption"] and "character" not in item["caption"] for item in results["b"])


def test_compare_runs_every_method_on_one_seed(served):
    side_by_side, stats, gallery, _ = served.client().predict(
        *shared_args(served, TWO_LORAS, seed=3), list(METHODS), *method_values(served), api_name="/compare")
    assert [item["caption"].split(" ")[0] for item in side_by_side] == list(METHODS)
    assert all("UNet calls" in item["caption"] and " s · " in item["caption"] for item in side_by_side)
    assert [row[0] for row in stats["data"]] == list(METHODS)
    assert all(row[2] >= 2 for row in stats["data"]), "at least one UNet call per step"
    assert all("seed 3" in item["caption"] for item in gallery[: len(METHODS)])


def test_reuse_settings_puts_a_result_back_into_the_controls(served):
    client = served.client()
    generate(client, served, {"style": 0.5}, "switch", {"switch": {"period": 3}}, prompt="a dog", seed=9)
    values = client.predict(lora_table(served, {}), api_name="/reuse_settings")
    prompt, negative, table, seed, steps = values[:5]
    assert (prompt, seed, steps) == ("a dog", 9, 2)
    assert {row[1]: (row[0], row[2]) for row in table["data"]}["style"] == (True, 0.5)
    assert values[12] == "switch"
    assert 3 in values, "the switch period comes back"


@pytest.mark.parametrize("change, message", [
    ({"width": 63}, "multiples of 8"),
    ({"weight": "heavy"}, "give a number such as 0.8"),
    ({"lora": "../../etc/passwd"}, "is not in the library"),
    ({"switch_period": 0}, "must be a positive number"),
    ({"mixing_weights": "1, x"}, "is not a valid float"),
    ({"boxes": "0,0,2,1"}, "--box '0,0,2,1' is outside the image"),
])
def test_bad_inputs_give_a_one_line_message(served, change, message):
    args = shared_args(served, TWO_LORAS, width=change.get("width", 64))
    rows = args[2]["data"]
    if "weight" in change:
        rows[0][2] = change["weight"]
    if "lora" in change:
        rows[0][1] = change["lora"]
    method, field = next(((method, field) for key, method, field in (
        ("switch_period", "switch", "period"), ("mixing_weights", "composite", "mixing_weights"),
        ("boxes", "composer", "boxes")) if key in change), ("merge", None))
    values = method_values(served)
    if field is not None:
        index = [(panel.name, control.field_name) for panel in served.app.forms.panels.values()
                 for control in panel.controls].index((method, field))
        values[index] = next(value for key, value in change.items() if key in ("switch_period", "mixing_weights", "boxes"))
    with pytest.raises(AppError) as error:
        served.client().predict(*args, method, *values, api_name="/generate_form")
    text = str(error.value)
    assert message in text and "Traceback" not in text and "\n" not in text.strip()


# ------------------------------------------------------------------------------------ regional and auto


def painted_layers(tmp_path: Path, size: tuple[int, int] = (256, 256), count: int = 2) -> list[np.ndarray]:
    """Editor layers (RGBA, height x width) painted over the left 60% and the right 60% (overlapping
    in the middle, the bottom quarter unpainted); more layers repeat them."""
    width, height = size
    layers = []
    for index in range(count):
        layer = np.zeros((height, width, 4), np.uint8)
        columns = slice(0, int(width * 0.6)) if index % 2 == 0 else slice(int(width * 0.4), width)
        layer[: int(height * 0.75), columns] = (230, 57, 70, 255)
        layers.append(layer)
    return layers


def editor_payload(tmp_path: Path, layers: list[np.ndarray]) -> dict[str, Any]:
    """The image editor's value as a client sends it: background and layers as uploaded files."""
    height, width = layers[0].shape[:2]
    paths = []
    for index, layer in enumerate([np.full((height, width, 4), 255, np.uint8), *layers]):
        path = tmp_path / f"layer-{index}.png"
        Image.fromarray(layer, "RGBA").save(path)
        paths.append(handle_file(str(path)))
    return {"background": paths[0], "layers": paths[1:], "composite": None}


def mask_files(tmp_path: Path, layers: list[np.ndarray]) -> list[Path]:
    """Each layer's painted pixels as a grayscale mask file (white = painted), as a Python API user gives them."""
    files = []
    for index, layer in enumerate(layers):
        files.append(tmp_path / f"mask-{index}.png")
        Image.fromarray((layer[..., -1] > 0).astype(np.uint8) * 255, "L").save(files[-1])
    return files


def form_values(served: Served, method: str, values: Mapping[str, Any]) -> list[Any]:
    """Every panel's default values with the raw component ``values`` of ``method``'s fields."""
    flat = method_values(served)
    fields = [(panel.name, control.field_name) for panel in served.app.forms.panels.values()
              for control in panel.controls]
    for field, value in values.items():
        flat[fields.index((method, field))] = value
    return flat


def python_api_image(served: Served, method: Any, **kwargs: Any) -> np.ndarray:
    """The first image of the Python API on a pipeline of its own, with the page's settings (a cat,
    character 0.8 and outfit 1.0, seed 0, 2 steps, CFG 7.5, 64x64)."""
    from loracompose import LoraSpec

    entries = {entry.name: entry for entry in served.settings.library}
    specs = [LoraSpec(entries[name].path, weight, name=name, trigger_words=entries[name].trigger_words,
                      category=entries[name].category) for name, weight in TWO_LORAS.items()]
    pipe = load_pipeline(served.settings.model_label)
    options = dict(seed=0, steps=2, guidance_scale=7.5, width=64, height=64, show_progress=False) | kwargs
    result = pipe.generate("a cat", specs, method, **options)
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


def test_painted_regional_masks_equal_the_python_api_with_the_same_masks(served, tmp_path):
    from loracompose.methods.regional import Regional

    layers = painted_layers(tmp_path)
    values = form_values(served, "regional", {"masks": editor_payload(tmp_path, layers)})
    gallery, downloads, status, concepts = served.client().predict(
        *shared_args(served, TWO_LORAS), "regional", *values, api_name="/generate_form")
    expected = python_api_image(served, Regional(masks=mask_files(tmp_path, layers)))
    assert np.abs(pixels(gallery[0]["image"]) - expected).max() <= 1, "the page's image differs from the Python API's"
    default = python_api_image(served, Regional())
    assert np.abs(expected - default).max() > 1, "the painted masks should change the image (default: side by side)"
    record = json.loads(Path(next(path for path in downloads if path.endswith(".json"))).read_text())
    saved = record["method_settings"]["masks"]
    assert len(saved) == 2 and all(np.array_equal(np.asarray(Image.open(path)) > 0, layer[..., -1] > 0)
                                   for path, layer in zip(saved, layers)), "the sidecar names the painted masks"
    assert [item["caption"].split(" ")[0] for item in concepts] == ["character", "outfit"], "one region per LoRA"
    assert status.count("Regions: character ") == 1


def test_reuse_settings_puts_painted_masks_back_on_the_canvas(served, tmp_path):
    layers = painted_layers(tmp_path)
    client = served.client()
    client.predict(*shared_args(served, TWO_LORAS), "regional",
                   *form_values(served, "regional", {"masks": editor_payload(tmp_path, layers)}),
                   api_name="/generate_form")
    values = client.predict(lora_table(served, {}), api_name="/reuse_settings")
    (canvas,) = [value for value in values if isinstance(value, dict) and "layers" in value]  # the mask canvas
    shown = [np.asarray(Image.open(layer["path"] if isinstance(layer, dict) else layer))[..., -1] > 0
             for layer in canvas["layers"]]
    assert len(shown) == 2 and all(np.array_equal(mask, layer[..., -1] > 0) for mask, layer in zip(shown, layers))


def test_the_mask_canvas_takes_the_image_shape_and_such_masks_work(served, tmp_path):
    from loracompose.methods.regional import Regional
    from loracompose.ui.method_forms import fit_mask_canvas

    assert fit_mask_canvas(64, 32, {"layers": []})["background"].shape == (128, 256, 4)
    assert fit_mask_canvas(64, 32, {"layers": painted_layers(tmp_path)}).get("__type__") == "update", \
        "a painted canvas is kept"
    width_changes = [fn for fn in served.blocks.fns.values() if fn.name == "fit_mask_canvas"]
    assert {block.elem_id for fn in width_changes for block in fn.inputs} >= {"width", "height", "regional-masks"}
    layers = painted_layers(tmp_path, (256, 128))
    args = shared_args(served, TWO_LORAS)
    args[7] = 32  # height
    gallery, _, _, _ = served.client().predict(
        *args, "regional", *form_values(served, "regional", {"masks": editor_payload(tmp_path, layers)}),
        api_name="/generate_form")
    expected = python_api_image(served, Regional(masks=mask_files(tmp_path, layers)), height=32)
    assert expected.shape == (32, 64, 3) and np.abs(pixels(gallery[0]["image"]) - expected).max() <= 1


def test_regional_boxes_typed_in_the_page_equal_the_python_api(served):
    from loracompose.methods.regional import Regional

    values = form_values(served, "regional", {"boxes": "0,0,0.6,1; 0.4,0,1,1"})
    gallery, _, _, concepts = served.client().predict(*shared_args(served, TWO_LORAS), "regional", *values,
                                                      api_name="/generate_form")
    expected = python_api_image(served, Regional(boxes=["0,0,0.6,1", "0.4,0,1,1"]))
    assert np.abs(pixels(gallery[0]["image"]) - expected).max() <= 1
    assert len(concepts) == 2


def test_named_generate_takes_region_masks_as_uploaded_files(served, tmp_path):
    from loracompose.methods.regional import Regional

    files = mask_files(tmp_path, painted_layers(tmp_path))
    images = served.client().predict(
        prompt="a cat", loras=TWO_LORAS, method="regional", seed=0, steps=2, guidance_scale=7.5, width=64, height=64,
        region_masks={name: handle_file(str(path)) for name, path in zip(TWO_LORAS, files)}, api_name="/generate")
    expected = python_api_image(served, Regional(masks=files))
    assert np.abs(pixels(images[0]["image"]) - expected).max() <= 1, "/generate's image differs from the Python API's"
    assert len(images[0]["method_settings"]["masks"]) == 2


def test_auto_shows_its_automatic_mask_for_each_lora(served):
    loras = {**TWO_LORAS, "style": 1.0}
    _, _, status, concepts = generate(served.client(), served, loras, "auto")
    captions = [item["caption"] for item in concepts]
    assert [caption.split(" ")[0] for caption in captions] == list(loras), "one image per LoRA, in LoRA order"
    assert all("(step " in caption and "%)" in caption for caption in captions), "each with its step and share"
    assert "Automatic masks at step" in status and "style: style -> whole image" in status
    style = pixels(concepts[2]["image"])
    assert (np.abs(style - pixels(concepts[0]["image"])).max(axis=-1) > 0).any(), "the overlays differ"


def test_named_generate_returns_the_automatic_masks_of_the_first_image(served):
    loras = {**TWO_LORAS, "style": 1.0}
    images = served.client().predict(prompt="a cat", loras=loras, method="auto", steps=2, width=64, height=64,
                                     num_images=2, api_name="/generate")
    first, second = images
    assert [item["caption"].split(" ")[0] for item in first["concepts"]] == list(loras), "one image per LoRA"
    assert second["concepts"] == [], "the view is of the first image"
    for item in first["concepts"]:
        assert Path(item["image"]).read_bytes().startswith(PNG_SIGNATURE) and pixels(item["image"]).shape == (64, 64, 3)
    assert np.abs(pixels(first["concepts"][0]["image"]) - pixels(first["image"])).max() > 0, "the mask is tinted in"


@pytest.mark.parametrize("values, message", [
    ({"boxes": "0,0,2,1"}, "--box '0,0,2,1' is outside the image"),
    ({"boxes": "0.5,0,0.5,1; 0,0,1,1"}, "has zero area"),
    ({"boxes": "0,0,1,1; 0,0,1,1; 0,0,1,1"}, "3 boxes for 2 LoRAs"),
    ({"masks": 3}, "3 masks for 2 LoRAs; give at most one per LoRA"),
    ({"masks": (64, 32)}, "(width x height, 2:1) but the image's aspect is 1:1"),
    ({"masks": 2, "boxes": "0,0,1,1; 0,0,1,1"}, "either boxes or masks"),
])
def test_bad_regions_in_the_page_give_a_one_line_message(served, tmp_path, values, message):
    if "masks" in values:
        shape = values["masks"]
        layers = painted_layers(tmp_path, shape) if isinstance(shape, tuple) else painted_layers(tmp_path, count=shape)
        values = {**values, "masks": editor_payload(tmp_path, layers)}
    with pytest.raises(AppError) as error:
        served.client().predict(*shared_args(served, TWO_LORAS), "regional", *form_values(served, "regional", values),
                                api_name="/generate_form")
    text = str(error.value)
    assert message in text and "Traceback" not in text and "\n" not in text.strip()


@pytest.mark.parametrize("arguments, message", [
    ({"method": "merge", "region_masks": {"character": "left"}}, "method merge takes no masks"),
    ({"region_masks": {"style": "left"}}, "style not in loras"),
    ({"region_masks": {"character": "left"}}, "no mask for outfit"),
    ({"region_masks": {"character": "left", "outfit": "left"}, "method_settings": {"masks": ["x.png"]}},
     "both given"),
    ({"region_masks": {"character": "notes", "outfit": "left"}}, "is not an image"),
    ({"method_settings": {"boxes": [[0, 0, 1.5, 1], [0, 0, 1, 1]]}}, "is not inside the image"),
    ({"method_settings": {"boxes": [[0, 0, 1]]}}, "give four relative numbers"),
])
def test_named_generate_refuses_bad_regions_in_one_line(served, tmp_path, arguments, message):
    (tmp_path / "notes.png").write_text("not an image")
    (left,) = mask_files(tmp_path, painted_layers(tmp_path, count=1))
    files = {"left": handle_file(str(left)), "notes": handle_file(str(tmp_path / "notes.png"))}
    if "region_masks" in arguments:
        arguments = {**arguments, "region_masks": {name: files[key] for name, key in arguments["region_masks"].items()}}
    arguments = {"method": "regional", "loras": TWO_LORAS, **arguments}
    with pytest.raises(AppError) as error:
        served.client().predict(prompt="a cat", steps=2, width=64, height=64, **arguments, api_name="/generate")
    text = str(error.value)
    assert message in text and "Traceback" not in text and "\n" not in text.strip()
    assert str(tmp_path) not in text, "no server path in the message"


# ------------------------------------------------------------------------------------ uploads


def files_outside(root: Path, upload_root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file() and not path.is_relative_to(upload_root)}


def test_upload_adds_a_lora_and_refuses_bad_files(served, sd15_lora_files, tmp_path):
    client = served.client()
    renamed = tmp_path / "my style (v2).safetensors"
    shutil.copyfile(sd15_lora_files[1], renamed)
    table, _, status = client.predict(lora_table(served, {}), [handle_file(renamed)], api_name="/upload_loras")
    row = table["data"][-1]
    assert row[1] == "my_style_v2" and row[0] is True and row[6] == "upload" and "my_style_v2" in status
    stored = list(served.settings.upload_root.rglob("my_style_v2.safetensors"))
    assert len(stored) == 1 and stored[0].read_bytes() == sd15_lora_files[1].read_bytes()

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    for bad, message in ((garbage, "not a valid safetensors file"), (notes, ".safetensors")):
        with pytest.raises(AppError, match=message.replace(".", r"\.")):
            client.predict(lora_table(served, {}), [handle_file(bad)], api_name="/upload_loras")
    assert not list(served.settings.upload_root.rglob("garbage*"))
    assert not [p for p in served.settings.upload_root.iterdir() if p.name.startswith(".staging")]


def test_upload_named_like_a_path_writes_nothing_outside_the_upload_folder(served, sd15_lora_files, tmp_path):
    """A client that sends ``../../etc/passwd`` as the file name gets a refusal; nothing escapes."""
    home = Path(os.environ["LORACOMPOSE_HOME"])
    before = files_outside(home, served.settings.upload_root)
    client = served.client()
    for name, content, refused in (("../../etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n", True),
                                   ("../../../evil.safetensors", sd15_lora_files[0].read_bytes(), False)):
        response = httpx.post(f"{served.url}gradio_api/upload", files=[("files", (name, content))], timeout=30)
        response.raise_for_status()
        server_path = response.json()[0]
        assert "/etc/" not in server_path and "/../" not in server_path
        file_data = {"path": server_path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}
        if refused:
            with pytest.raises(AppError, match=r"\.safetensors"):
                client.predict(lora_table(served, {}), [file_data], api_name="/upload_loras")
        else:
            table, _, _ = client.predict(lora_table(served, {}), [file_data], api_name="/upload_loras")
            assert table["data"][-1][1] == "evil"
    assert files_outside(home, served.settings.upload_root) == before
    assert [p.parent.parent for p in served.settings.upload_root.rglob("evil.safetensors")] == [served.settings.upload_root]
    assert not (tmp_path.parent / "evil.safetensors").exists()


def test_upload_store_sanitises_names_and_checks_size(sd15_lora_files, tmp_path):
    store = UploadStore(tmp_path / "uploads", max_bytes=sd15_lora_files[0].stat().st_size)
    for hostile in ("../../etc/passwd.safetensors", "..\\..\\x.safetensors", "/abs/path/ok.safetensors"):
        stored = store.store(sd15_lora_files[0], hostile)
        assert stored.resolve().is_relative_to((tmp_path / "uploads").resolve())
        assert stored.name == f"{safe_file_stem(hostile)}.safetensors" and "/" not in safe_file_stem(hostile)
    assert safe_file_stem("../../etc/passwd.safetensors") == "passwd"
    with pytest.raises(UserError, match="only .safetensors"):
        store.store(sd15_lora_files[0], "../../etc/passwd")
    with pytest.raises(UserError, match="upload limit"):
        UploadStore(tmp_path / "small", max_bytes=10).store(sd15_lora_files[0], "big.safetensors")
    assert not (tmp_path / "small").exists() and not (tmp_path / "etc").exists()


def test_library_scan_finds_what_the_library_index_finds_and_skips_bad_files(sd15_lora_files, tmp_path, caplog):
    library = tmp_path / "library"
    (library / "people").mkdir(parents=True)
    (library / ".trash").mkdir()
    shutil.copy(sd15_lora_files[0], library / "people" / "hero.safetensors")
    shutil.copy(sd15_lora_files[1], library / ".trash" / "old.safetensors")  # hidden: skipped, as by the index
    (library / "broken.safetensors").write_bytes(b"not a safetensors file")
    (library / "pickled.ckpt").write_bytes(b"\x80\x04")
    entries = scan_library(library)
    assert [(entry.name, entry.path) for entry in entries] == [("hero", library / "people" / "hero.safetensors")]
    assert "broken.safetensors" in caplog.text and "pickled.ckpt" in caplog.text
    assert [entry.file for entry in open_library(library, write=False).entries.values()] == ["people/hero.safetensors"]
    with pytest.raises(UserError, match="--library .*not found"):
        scan_library(tmp_path / "missing")


def test_ui_command_parses_and_serves_with_options(monkeypatch):
    from loracompose import ui
    from loracompose.cli.main import main

    seen = []
    monkeypatch.setattr(ui, "serve", lambda options: seen.append(options))
    assert main(["ui", "--port", "7999", "--host", "0.0.0.0", "--max-upload-mb", "64"]) == 0
    assert (seen[0].port, seen[0].host, seen[0].model, seen[0].max_upload_mb) == (7999, "0.0.0.0", None, 64)


@pytest.mark.parametrize("options, message", [(UiOptions(port=70000), "--port 70000"),
                                              (UiOptions(max_upload_mb=0), "--max-upload-mb 0")])
def test_bad_ui_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message) as error:
        resolve_settings(options)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------ browser


def chromium_path() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or next((path for path in CHROMIUM_PATHS if Path(path).is_file()), None)


def test_browser_generates_and_shows_errors_in_the_page(served, tmp_path):
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium installed (apt-get install chromium); the browser test needs one")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tempfile.mkdtemp(dir=tmp_path), executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = context.new_page()
            page.goto(served.url, timeout=60_000)
            page.locator("#prompt textarea").fill("a red cloak in the rain")
            set_number(page, "#steps input[type=number]", "2")
            page.locator("#generate").click()
            page.locator("#gallery img").first.wait_for(timeout=90_000)
            shot = tmp_path / "ui.png"
            page.screenshot(path=str(shot), full_page=True)
            set_number(page, "#width input", "60")
            page.locator("#generate").click()
            page.get_by_text("multiples of 8").first.wait_for(timeout=60_000)
            assert "Traceback" not in page.content()
        finally:
            context.close()
    assert shot.read_bytes().startswith(PNG_SIGNATURE) and shot.stat().st_size > 1000
    assert min(pixels(str(shot)).shape[:2]) > 100


def set_number(page: Any, selector: str, value: str) -> None:
    """Type into a number box and leave it, so Gradio sees the change."""
    box = page.locator(selector).first
    box.fill(value)
    box.press("Tab")


def test_embedded_toyworld_is_the_ui_default():
    """With no model and no variant chosen, the UI offers the toy world's demo LoRAs, ticked, with the
    toy model's own steps and guidance."""
    model, settings = resolve_settings(UiOptions())
    assert Path(model).name == "model" and "toyworld" in Path(model).parent.name
    assert [entry.name for entry in settings.library] == ["moxel", "lunzor", "checkered"]
    assert settings.preselect_library and "moxel" in settings.default_prompt
    assert (settings.default_steps, settings.default_guidance) == (20, 4.0)


def test_the_default_method_comes_first_in_the_form_and_the_api():
    from loracompose.methods import DEFAULT_METHOD
    from loracompose.ui.api import generate_signature
    from loracompose.ui.app import default_first

    ordered = default_first(METHODS)
    assert next(iter(ordered)) == DEFAULT_METHOD == "auto" and sorted(ordered) == sorted(METHODS)
    signature = generate_signature(list(ordered), {"steps": 20, "guidance_scale": 4.0, "width": 32, "height": 32})
    assert signature.parameters["method"].default == "auto"
    assert list(default_first({"merge": METHODS["merge"]})) == ["merge"], "a UI without auto keeps its own first method"
