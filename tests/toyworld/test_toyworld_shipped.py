"""The shipped toy world: the embedded default model and concept LoRAs, judged by the detector.

These use the weights inside the package (a few samples each, seeded): they fail if the shipped
model stops drawing what its prompts ask for, if a LoRA stops adding its concept, or if loading
them through the user's code paths (load_pipeline, the CLI, bench suites) breaks offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from loracompose import LoraSpec
from loracompose.cli.main import main
from loracompose.assets.embedded import PACKAGED_TOYWORLD, embedded_default
from loracompose.pipelines import load_pipeline
from loracompose.toyworld.concepts import CONCEPTS, composition
from loracompose.toyworld.detector import detect

SAMPLES = 4
GUIDANCE, STEPS = 4.0, 20


@pytest.fixture(scope="module")
def toyworld():
    default = embedded_default()
    return default, load_pipeline(default.model_dir, device="cpu", dtype="fp32")


def samples(pipe, prompt, loras=()):
    return pipe.generate(prompt, list(loras), seed=0, num_images=SAMPLES, steps=STEPS, guidance_scale=GUIDANCE,
                         append_triggers=False, show_progress=False).images


def test_shipped_weights_are_small_safetensors_and_load_offline(toyworld):
    default, pipe = toyworld
    files = [path for path in PACKAGED_TOYWORLD.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) < 30 * 1024**2
    assert not [path for path in files if path.suffix in (".bin", ".pt", ".ckpt", ".pkl")]
    tara_trained = [f"{name}-tara" for name in ("moxel", "lunzor")]  # TARA's rows use these (train-tara)
    assert sorted(path.stem for path in (PACKAGED_TOYWORLD / "loras").iterdir()) == sorted([*CONCEPTS, *tara_trained])
    assert default.model_dir.is_relative_to(Path(os.environ["LORACOMPOSE_HOME"]))  # a copy, not the package
    assert pipe.unet.config.in_channels == 12 and samples(pipe, "a red circle")[0].size == (32, 32)


def test_manifest_lists_every_shipped_file_with_its_digest():
    from loracompose.toyworld.shipping import MANIFEST, weight_files

    manifest = json.loads((PACKAGED_TOYWORLD / MANIFEST).read_text())
    assert manifest["files"] == weight_files(PACKAGED_TOYWORLD)
    assert manifest["provenance"]["note"]


def test_shipping_writes_a_new_folder_and_the_embedded_copy_follows_the_digest(tmp_path, monkeypatch):
    from loracompose.assets import embedded
    from loracompose.toyworld.shipping import ship_weights

    dest = ship_weights(PACKAGED_TOYWORLD / "model", PACKAGED_TOYWORLD / "loras", tmp_path / "weights",
                        {"note": "test"})
    assert sorted(path.name for path in dest.iterdir()) == ["loras", "manifest.json", "model"]
    monkeypatch.setenv("LORACOMPOSE_HOME", str(tmp_path / "home"))
    shipped = embedded_default()
    monkeypatch.setattr(embedded, "PACKAGED_TOYWORLD", dest)
    copied = embedded_default()
    assert (copied.model_dir / "model_index.json").is_file() and not (copied.model_dir.parent / "gates.safetensors").exists()
    # Other weights (here: another provenance note, no gates) get their own folder, never the stale copy.
    assert copied.model_dir.parent.name.startswith("toyworld-") and copied.model_dir != shipped.model_dir


def test_base_model_draws_the_prompted_objects(toyworld):
    """Every shape x colour prompt once (36 samples): the acceptance measurement (README) at a
    quarter of its size, with a little slack under the measured rates."""
    from loracompose.toyworld.evaluate import evaluate_samples

    measured = evaluate_samples(toyworld[1], GUIDANCE, seeds=1, pairs=8, steps=STEPS)
    assert measured.color_right >= 0.9 and measured.shape_right >= 0.7, measured
    assert measured.pair_both_present >= 0.375, measured


@pytest.mark.parametrize("name", list(CONCEPTS))
def test_each_concept_lora_adds_its_concept_and_the_base_model_does_not(toyworld, name):
    concept, prompt = CONCEPTS[name], composition([name]).prompt
    lora = LoraSpec(str(PACKAGED_TOYWORLD / "loras" / f"{name}.safetensors"))
    with_lora = sum(concept.present(detect(image)) for image in samples(toyworld[1], prompt, [lora]))
    without = sum(concept.present(detect(image)) for image in samples(toyworld[1], prompt))
    assert with_lora >= SAMPLES - 1 and without <= 1, (with_lora, without)


def test_loras_carry_trigger_and_category_metadata(toyworld):
    from loracompose.lora import inspect_lora

    for name, concept in CONCEPTS.items():
        lora = inspect_lora(LoraSpec(str(PACKAGED_TOYWORLD / "loras" / f"{name}.safetensors")))
        assert lora.trigger_words == (name,) and lora.category == concept.kind


def test_cli_demo_with_no_arguments_draws_the_demo_concepts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    record = json.loads((tmp_path / "loracompose-out" / "auto-0.json").read_text())
    assert [lora["name"] for lora in record["loras"]] == ["moxel", "lunzor", "checkered"]
    assert (record["steps"], record["guidance_scale"], record["width"]) == (20, 4.0, 32)


def test_toyworld_bench_suite_records_which_concepts_each_image_shows(tmp_path, capsys):
    suite = tmp_path / "toy.yaml"
    suite.write_text(yaml.safe_dump({"toyworld": {"sizes": [2]}, "methods": ["merge", "composer"], "seeds": [0]}))
    out = tmp_path / "run"
    assert main(["bench", str(suite), "--out", str(out), "--only", "set=moxel+checkered", "--quiet"]) == 0
    records = [json.loads(line) for path in out.glob("manifest*.jsonl") for line in path.read_text().splitlines()]
    assert {record["method"] for record in records} == {"merge", "composer"}
    for record in records:
        assert set(record["concepts_present"]) == {"moxel", "checkered"}
        assert record["all_present"] == all(record["concepts_present"].values())
        with Image.open(out / record["image"]) as image:
            detection = detect(image)
        assert record["concepts_present"] == composition(["moxel", "checkered"]).present(detection)
    composer = next(record for record in records if record["method"] == "composer")
    assert composer["method_settings"]["boxes"][1] == {"x0": 0.0, "y0": 0.0, "x1": 1.0, "y1": 1.0}
    assert composer["method_settings"]["region_prompts"] == ["a moxel on the left", composer["prompt"]]
    merge = next(record for record in records if record["method"] == "merge")
    assert "boxes" not in merge["method_settings"]  # a set's boxes reach only methods that take them
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "all concepts present %" in page and "Each concept present" in page
    table = (out / "presence.md").read_text().splitlines()
    merge_row = next(line for line in table if line.startswith("| merge |"))
    expected = 100.0 * next(r["all_present"] for r in records if r["method"] == "merge")
    assert merge_row.startswith(f"| merge | {expected:.0f} ") and merge_row.endswith("(1) |")


def test_suite_method_file_settings_resolve_against_the_suite_folder(tmp_path, monkeypatch):
    import shutil

    from loracompose.eval.suite import load_suite

    (tmp_path / "suites").mkdir()
    shutil.copy(PACKAGED_TOYWORLD / "gates.safetensors", tmp_path / "gates.safetensors")
    suite_file = tmp_path / "suites" / "toy.yaml"
    suite_file.write_text(yaml.safe_dump({"toyworld": {"sizes": [2]}, "seeds": [0],
                                          "methods": [{"method": "autolora", "gates": "../gates.safetensors"}]}))
    monkeypatch.chdir("/")  # from here "../gates.safetensors" names nothing
    (method,) = load_suite(suite_file).methods
    assert Path(method.settings["gates"]) == tmp_path / "suites" / ".." / "gates.safetensors"
    assert method.build().gates is not None


@pytest.mark.parametrize("args, message", [
    (["eval-toyworld", "--seeds", "0"], "must be positive"),
    (["train-toyworld-loras", "--model", "m", "--out", "o", "--steps", "0"], "must be positive"),
    (["train-toyworld-loras", "--model", "m", "--out", "o", "--images", "0"], "must be positive"),
])
def test_toyworld_commands_refuse_bad_numbers(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_embedded_variant_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setenv("LORACOMPOSE_EMBEDDED", "huge")
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert "LORACOMPOSE_EMBEDDED='huge' is not known" in err and "\n" not in err
