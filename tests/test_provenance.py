"""Trained and shipped files name their inputs by name and digest, never by the training machine's paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loracompose.assets.embedded import PACKAGED_TOYWORLD
from loracompose.errors import UserError
from loracompose.pipelines import load_pipeline
from loracompose.provenance import machine_specific_strings, model_fingerprint, portable_name, weights_sha256
from loracompose.retrieval.text import PipelineTextEmbedder
from loracompose.toyworld.model import TINY, build_pipeline
from loracompose.toyworld.scenes import make_scene
from loracompose.toyworld.shipping import ship_weights
from loracompose.training.gates import GateTrainingSettings, train_gates
from loracompose.training.trainer import LoraTrainingSettings, train_lora


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


@pytest.mark.parametrize("text, found", [
    ('{"model": "/tmp/final/model"}', ["/tmp/final/model"]),
    ('["0000.png", "cat.JPG"]', ["0000.png", "cat.JPG"]),
    ('{"model": "C:\\\\Users\\\\me\\\\sd15"}', ["C:\\\\Users\\\\me\\\\sd15"]),
    ("~/models/sd15", ["~/models/sd15"]),
    ("tmpab12cd", ["tmpab12cd"]),
    ("pytest-12", ["pytest-12"]),
    ("runwayml/stable-diffusion-v1-5", []),
    ("stable-diffusion-v1/lora", []),
    ('{"target_modules": ["to_out.0"], "temperature": 0.07}', []),
    ("a moxel on the left on a dotted background", []),
])
def test_machine_specific_strings_finds_paths_temp_folders_and_image_names(text: str, found: list[str]) -> None:
    assert machine_specific_strings({"key": text}) == [f"key: {match}" for match in found]


def test_no_shipped_file_names_a_path_a_temp_folder_or_an_image() -> None:
    weights = sorted(PACKAGED_TOYWORLD.rglob("*.safetensors"))
    assert len(weights) >= 8, "the model's three weight files, four LoRAs and the gates"
    configs = [path for path in PACKAGED_TOYWORLD.rglob("*.json") if path.name != "tokenizer.json"]
    found = {path.relative_to(PACKAGED_TOYWORLD).as_posix(): machine_specific_strings(metadata_of(path))
             for path in weights}
    found |= {path.relative_to(PACKAGED_TOYWORLD).as_posix(): machine_specific_strings({"text": path.read_text()})
              for path in configs}
    assert {name: hits for name, hits in found.items() if hits} == {}


def test_shipped_training_records_name_the_base_model_by_its_digest() -> None:
    pipe = load_pipeline(PACKAGED_TOYWORLD / "model", device="cpu", dtype="fp32")
    base = {"name": "toyworld", "digest": model_fingerprint(pipe)}
    loras = {path.stem: path for path in sorted((PACKAGED_TOYWORLD / "loras").glob("*.safetensors"))}
    for path in loras.values():
        training = json.loads(metadata_of(path)["loracompose.training"])
        images = training["images"] - training.get("prior_images", 0)  # TARA's: plus its regularisation images
        assert training["model"] == base and images == 256 and "captions" not in training
    gates = json.loads(metadata_of(PACKAGED_TOYWORLD / "gates.safetensors")["loracompose.training"])
    assert gates["model"] == base
    ordinary = {name: path for name, path in loras.items() if not name.endswith("-tara")}  # gates: the four concepts
    assert {lora["name"]: lora["weights_sha256"] for lora in gates["loras"]} == {
        name: weights_sha256(path) for name, path in ordinary.items()}


def test_trained_lora_records_the_model_name_and_digest_and_an_image_count(tmp_path: Path) -> None:
    build_pipeline(TINY, seed=0).save_pretrained(tmp_path / "base-model", safe_serialization=True)
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(3):
        make_scene(seed)[0].save(images / f"scene{seed}.png")
    out = tmp_path / "glyph.safetensors"
    train_lora(LoraTrainingSettings(model=str(tmp_path / "base-model"), images=images, out=out, prompt="a zqx glyph",
                                    steps=1, device="cpu", probe_timesteps=0, show_progress=False))
    metadata = metadata_of(out)
    training = json.loads(metadata["loracompose.training"])
    digest = model_fingerprint(load_pipeline(tmp_path / "base-model", device="cpu", dtype="fp32"))
    assert training["model"] == {"name": "base-model", "digest": digest}
    assert training["images"] == 3 and len(training["captions_sha256"]) == 64 and training["steps"] == 1
    assert machine_specific_strings(metadata) == []
    assert not [value for value in metadata.values() if str(tmp_path) in value or "scene0" in value]


def test_trained_gates_record_the_model_and_loras_by_name_and_digest(tiny_sd15_dir, sd15_lora_files, tmp_path) -> None:
    out = tmp_path / "gates.safetensors"
    train_gates(GateTrainingSettings(str(tiny_sd15_dir), sd15_lora_files, out, steps=1, showcase_steps=1,
                                     resolution=32, show_progress=False, work_dir=tmp_path / "work"))
    metadata = metadata_of(out)
    training = json.loads(metadata["loracompose.training"])
    digest = model_fingerprint(load_pipeline(tiny_sd15_dir, device="cpu", dtype="fp32"))
    assert training["model"] == {"name": tiny_sd15_dir.name, "digest": digest}
    assert training["loras"] == [{"name": path.stem, "weights_sha256": weights_sha256(path)} for path in sd15_lora_files]
    assert machine_specific_strings(metadata) == []
    assert not [value for value in metadata.values() if str(tiny_sd15_dir.parent) in value]


def test_shipping_refuses_a_lora_whose_metadata_names_a_path(tmp_path: Path) -> None:
    loras = Path(shutil.copytree(PACKAGED_TOYWORLD / "loras", tmp_path / "loras"))
    moxel = loras / "moxel.safetensors"
    training = {**json.loads(metadata_of(moxel)["loracompose.training"]), "model": "/home/me/toyworld"}
    save_file(load_file(moxel), moxel, metadata={**metadata_of(moxel), "loracompose.training": json.dumps(training)})
    with pytest.raises(UserError, match="moxel.safetensors.*/home/me/toyworld"):
        ship_weights(PACKAGED_TOYWORLD / "model", loras, tmp_path / "weights", {"note": "test"})
    assert not (tmp_path / "weights").exists()


def test_weights_digest_ignores_metadata_and_sees_every_tensor(tmp_path: Path) -> None:
    source = PACKAGED_TOYWORLD / "loras" / "lunzor.safetensors"
    tensors = load_file(source)
    save_file(tensors, tmp_path / "same.safetensors", metadata={"note": "other metadata"})
    first = sorted(tensors)[0]
    save_file({**tensors, first: tensors[first] + 1}, tmp_path / "changed.safetensors")
    save_file({**tensors, first: tensors[first].to(torch.float16)}, tmp_path / "half.safetensors")
    digests = {path.name: weights_sha256(path) for path in sorted(tmp_path.iterdir())}
    assert digests["same.safetensors"] == weights_sha256(source)
    assert len({weights_sha256(source), digests["changed.safetensors"], digests["half.safetensors"]}) == 3


def test_text_embedder_fingerprint_names_the_model_not_its_folder(tmp_path: Path) -> None:
    """Retriever files record their text embedder's fingerprint: the same for a moved copy of the model."""
    build_pipeline(TINY, seed=0).save_pretrained(tmp_path / "a" / "toy", safe_serialization=True)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first, moved = (PipelineTextEmbedder(load_pipeline(tmp_path / side / "toy", device="cpu")).fingerprint
                    for side in ("a", "b"))
    assert first == moved and first.startswith("pipeline-eos:toy@")
    assert str(tmp_path) not in first and machine_specific_strings({"fingerprint": first}) == []


def test_portable_name_keeps_names_and_replaces_local_paths(tmp_path: Path) -> None:
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"weights")
    assert portable_name("ViT-B-32") == "ViT-B-32" and portable_name("hf-hub:org/clip") == "hf-hub:org/clip"
    assert portable_name(f"local-dir:{tmp_path}") == f"local-dir:{tmp_path.name}"
    assert portable_name(str(weights)).startswith("clip.safetensors@") and str(tmp_path) not in portable_name(str(weights))
