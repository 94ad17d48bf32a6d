"""`loracompose bench` on FLUX.1 and SD3: a suite without a scheduler or guidance runs with the family's own
sampler (flow-matching Euler) and guidance (FLUX 3.5, SD3 7, SD1.5 7.5) and its job equals the Python API's
generation; a suite that states guidance keeps it; a suite without a scheduler keeps the job ids it had when
the default was written out as DPM-Solver++ (SD1.5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from loracompose import LoraSpec, load_pipeline
from loracompose.assets.tiny import build_tiny_flux, build_tiny_lora, build_tiny_sd3
from loracompose.cli.main import main
from loracompose.eval import load_suite
from loracompose.eval.manifest import read_manifest
from loracompose.methods import METHODS

BUILDERS = {"flux": build_tiny_flux, "sd3": build_tiny_sd3}


def _write_suite(folder: Path, model: Path, loras: list[Path], **overrides) -> Path:
    suite = {"name": "dit", "model": str(model),
             "loras": {path.stem: {"file": str(path), "triggers": path.stem} for path in loras},
             "sets": [[path.stem for path in loras]], "prompt": "a photo, {triggers}",
             "methods": ["cmlora"], "seeds": [5], "width": 32, "height": 32, "steps": 4, **overrides}
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_one_suite_job_runs_on_a_dit_with_its_own_sampler(family, tmp_path, monkeypatch):
    monkeypatch.setenv("LORACOMPOSE_HOME", str(tmp_path / "home"))
    model = BUILDERS[family](tmp_path / "model")
    loras = [build_tiny_lora(model, tmp_path / f"{name}.safetensors", seed=seed, init_scale=2.0)
             for seed, name in enumerate(("girl", "ink"), start=1)]
    suite = _write_suite(tmp_path, model, loras)
    out = tmp_path / "run"
    assert main(["bench", str(suite), "--out", str(out), "--quiet"]) == 0
    [record] = read_manifest(out).values()
    assert record["scheduler"] == "euler" and record["method_name"] == "cmlora"
    assert record["guidance_scale"] == {"flux": 3.5, "sd3": 7.0}[family]
    assert record["stats"]["unet_calls"] >= 1 and record["stats"]["partial_unet_calls"] >= 1
    pipe = load_pipeline(model, device="cpu")
    specs = [LoraSpec(path, name=path.stem, trigger_words=[path.stem]) for path in loras]
    expected = pipe.generate("a photo, girl, ink", specs, METHODS["cmlora"](), seed=5, steps=4, width=32, height=32,
                             guidance_scale=record["guidance_scale"], output_type="np", show_progress=False)
    sidecar = json.loads((out / record["sidecar"]).read_text())
    assert sidecar["stats"]["unet_calls"] == expected.stats.unet_calls
    with Image.open(out / record["image"]) as image:
        written = np.asarray(image.convert("RGB"), dtype=np.int16)
    ours = np.round(np.clip(expected.images[0], 0, 1) * 255).astype(np.int16)
    assert np.abs(written - (ours if ours.shape[-1] == 3 else np.repeat(ours, 3, axis=-1))).max() <= 1


@pytest.mark.parametrize(("family", "guidance", "expected"), [
    ("flux", None, 3.5), ("flux", 5.0, 5.0), ("flux", 7.5, 7.5), ("sd15", None, 7.5), ("sd15", 5.0, 5.0)])
def test_a_suite_runs_with_its_guidance_or_else_the_familys(family, guidance, expected, tmp_path, monkeypatch,
                                                            tiny_sd15_dir, sd15_lora_files):
    monkeypatch.setenv("LORACOMPOSE_HOME", str(tmp_path / "home"))
    if family == "flux":
        model = build_tiny_flux(tmp_path / "model")
        loras = [build_tiny_lora(model, tmp_path / "girl.safetensors", seed=1, init_scale=2.0)]
    else:
        model, loras = tiny_sd15_dir, sd15_lora_files[:1]
    overrides = {"methods": ["merge"], "steps": 2} | ({} if guidance is None else {"guidance": guidance})
    suite = _write_suite(tmp_path, model, loras, **overrides)
    assert load_suite(suite).guidance == guidance
    out = tmp_path / "run"
    assert main(["bench", str(suite), "--out", str(out), "--quiet"]) == 0
    [record] = read_manifest(out).values()
    assert record["guidance_scale"] == expected
    assert json.loads((out / record["sidecar"]).read_text())["guidance_scale"] == expected


def test_a_suite_without_guidance_does_not_share_ids_with_a_stated_one(tmp_path, tiny_sd15_dir, sd15_lora_files):
    def ids(**overrides):
        suite = load_suite(_write_suite(tmp_path, tiny_sd15_dir, sd15_lora_files, **overrides))
        return {job.id for job in suite.jobs()}

    implicit = ids()
    assert implicit == ids(guidance=None)
    assert not implicit & ids(guidance=7.5) and not implicit & ids(guidance=3.5)


def test_a_suite_without_a_scheduler_keeps_its_job_ids(tmp_path, tiny_sd15_dir, sd15_lora_files):
    implicit = load_suite(_write_suite(tmp_path, tiny_sd15_dir, sd15_lora_files))
    ids = [job.id for job in implicit.jobs()]
    explicit = load_suite(_write_suite(tmp_path, tiny_sd15_dir, sd15_lora_files, scheduler="dpmsolver++"))
    other = load_suite(_write_suite(tmp_path, tiny_sd15_dir, sd15_lora_files, scheduler="ddim"))
    assert implicit.scheduler is None and explicit.scheduler == "dpmsolver++"
    assert [job.id for job in explicit.jobs()] == ids and not {job.id for job in other.jobs()} & set(ids)
