"""eval/: CLIPScore against explicit and torchmetrics formulas, the ComposLoRA testbed, suites,
resumable and sharded bench runs (SIGKILL mid-grid), CMLoRA in a run, resumable scoring of a
finished run (SIGKILL mid-way), and the report (t intervals, CSVs against the manifest, plots)."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from loracompose.cli.main import main
from loracompose.errors import UserError
from loracompose.eval import CONVENTIONS, ClipConvention, ClipScorer, convention_from, load_suite, parse_suite
from loracompose.eval import composlora
from loracompose.eval.manifest import ManifestWriter, read_lines, read_manifest
from loracompose.eval.runner import Shard
from loracompose.eval.scoring import read_records
from loracompose.eval.tiny_clip import build_tiny_clip
from loracompose.assets.tiny import build_tiny_lora

PROMPT = "masterpiece, zkx, qwv"
TRIGGERS = ["zkx", "qwv"]
TEXTS = ["a cat", "zkx, qwv", "a red house by the sea", "qwv", "lineart, hand-drawn style", "toast in mouth"]


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0)


@pytest.fixture(scope="module")
def scorer(tiny_clip):
    return ClipScorer.load(tiny_clip.name, tiny_clip.weights, config=tiny_clip.config, device="cpu")


def random_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(count)]


def explicit_cosines(scorer: ClipScorer, images, texts) -> list[float]:
    """The definition: normalised CLIP image and text embeddings, their dot product."""
    with torch.no_grad():
        image = scorer.model.encode_image(torch.stack([scorer.preprocess(im.convert("RGB")) for im in images]))
        text = scorer.model.encode_text(scorer.tokenizer(list(texts)))
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return [float(image[i] @ text[i]) for i in range(len(images))]


# ------------------------------------------------------------------------------------ CLIPScore


def test_tiny_clip_gives_cosines_of_both_signs(scorer):
    """The data below must exercise the clamps: some cosines negative, some positive."""
    cosines = explicit_cosines(scorer, random_images(len(TEXTS)), TEXTS)
    assert min(cosines) < 0 < max(cosines)


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_clipscore_equals_explicit_computation(scorer, name):
    convention = CONVENTIONS[name]
    scorer.convention = convention
    images = random_images(len(TEXTS))
    result = scorer.score(images, TEXTS)
    cosines = explicit_cosines(scorer, images, TEXTS)
    if convention.clamp == "per-sample":
        expected = [convention.scale * max(c, 0.0) for c in cosines]
        expected_mean = sum(expected) / len(expected)
    else:
        expected = [convention.scale * c for c in cosines]
        expected_mean = sum(expected) / len(expected)
        expected_mean = max(expected_mean, 0.0) if convention.clamp == "mean" else expected_mean
    assert result.cosines == pytest.approx(cosines, abs=1e-5)
    assert result.per_sample == pytest.approx(expected, abs=1e-4)
    assert result.mean == pytest.approx(expected_mean, abs=1e-4)


@pytest.mark.parametrize("name, text", [
    ("composlora", "zkx, qwv"),
    ("torchmetrics", PROMPT),
    ("clip-s", "A photo depicts " + PROMPT),
    ("raw", PROMPT),
])
def test_each_convention_scores_its_text(scorer, name, text):
    scorer.convention = CONVENTIONS[name]
    image = random_images(1, seed=3)
    result = scorer.score_generation(image, PROMPT, TRIGGERS)
    assert result.texts == [text]
    assert result.cosines == pytest.approx(explicit_cosines(scorer, image, [text]), abs=1e-5)


def test_default_convention_is_composloras():
    convention = ClipConvention()
    assert (convention.scale, convention.clamp, convention.prefix, convention.text_source) == (100.0, "per-sample", "", "triggers")
    assert convention.text("ignored prompt", ["kamado nezuko", "black hair", "toast"]) == "kamado nezuko, black hair, toast"
    assert convention_from({"scale": 2.5, "clamp": "none", "text": "prompt"}) == ClipConvention(2.5, "none", "", "prompt")


class OpenClipAsHF(torch.nn.Module):
    """The open_clip model behind the HF CLIPModel calls torchmetrics makes."""

    def __init__(self, scorer: ClipScorer):
        super().__init__()
        self.clip, self.config = scorer.model, type("Config", (), {})()

    def get_image_features(self, pixel_values):
        return self.clip.encode_image(pixel_values)

    def get_text_features(self, input_ids, attention_mask=None):
        return self.clip.encode_text(input_ids)


class OpenClipProcessor:
    """The open_clip preprocessing and tokenizer behind the HF CLIPProcessor calls torchmetrics makes."""

    def __init__(self, scorer: ClipScorer):
        self.scorer = scorer

    def __call__(self, images=None, text=None, **_):
        if images is not None:
            pil = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
            return {"pixel_values": torch.stack([self.scorer.preprocess(im) for im in pil])}
        ids = self.scorer.tokenizer(list(text))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def torchmetrics_clip_score(scorer: ClipScorer, images, texts) -> float:
    """torchmetrics' clip_score on the same model; its formula spelled out when it is not installed."""
    batch = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    try:
        from torchmetrics.functional.multimodal import clip_score
    except ImportError:
        cosines = explicit_cosines(scorer, images, texts)
        return max(sum(100 * c for c in cosines) / len(cosines), 0.0)  # torchmetrics 1.9.0 clip_score
    with torch.no_grad():
        score = clip_score(batch, list(texts), model_name_or_path=lambda: (OpenClipAsHF(scorer), OpenClipProcessor(scorer)))
    return float(score)


@pytest.mark.parametrize("texts", [TEXTS, ["zkx, qwv", "qwv", "a red house by the sea"]], ids=["mixed", "other"])
def test_clipscore_equals_torchmetrics_under_its_convention(scorer, texts):
    scorer.convention = convention_from("torchmetrics")
    images = random_images(len(texts), seed=1)
    ours = scorer.score(images, texts).mean
    assert ours == pytest.approx(torchmetrics_clip_score(scorer, images, texts), abs=1e-4)
    per_sample = ClipConvention(clamp="per-sample", text_source="prompt")
    if min(scorer.score(images, texts).cosines) < 0:  # the clamp position matters here
        assert per_sample.aggregate(per_sample.sample_scores(scorer.score(images, texts).cosines)) != pytest.approx(ours)


def test_concept_similarity_equals_explicit_cosines(scorer, tmp_path):
    image, *references = random_images(4, seed=5)
    paths = []
    for index, reference in enumerate(references):
        paths.append(tmp_path / f"ref{index}.png")
        reference.save(paths[-1])
    with torch.no_grad():
        embeddings = scorer.model.encode_image(torch.stack([scorer.preprocess(im) for im in [image, *references]]))
    embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
    cosines = [float(embeddings[0] @ embeddings[k]) for k in (1, 2, 3)]
    result = scorer.concept_similarity(image, {"girl": paths[:2], "park": [paths[2]]})
    assert result["girl"] == pytest.approx((cosines[0] + cosines[1]) / 2, abs=1e-5)
    assert result["park"] == pytest.approx(cosines[2], abs=1e-5)
    assert scorer.concept_similarity(image, {"girl": paths[:2]}, reduce="max")["girl"] == pytest.approx(max(cosines[:2]), abs=1e-5)


def bad_clip_weights(kind: str, tiny_clip, tmp_path: Path) -> dict:
    """ClipScorer.load arguments that must fail, by kind."""
    if kind == "pickled file":
        (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
        return dict(model=tiny_clip.name, pretrained=tmp_path / "open_clip_pytorch_model.bin")
    if kind == "weights of another model":
        save_file({"visual.proj": torch.zeros(3, 3)}, str(tmp_path / "foreign.safetensors"))
        return dict(model=tiny_clip.name, pretrained=tmp_path / "foreign.safetensors")
    return {
        "missing file": dict(model=tiny_clip.name, pretrained=tmp_path / "nope.safetensors"),
        "folder without weights": dict(model=tiny_clip.name, pretrained=tmp_path),
        "unknown model": dict(model="ViT-Nope-99", pretrained="openai"),
        "openai without quickgelu": dict(model="ViT-B-16", pretrained="openai"),
        "offline tag": dict(model="ViT-B-16-quickgelu", pretrained="openai"),
    }[kind]


@pytest.mark.parametrize("kind, fragment", [
    ("pickled file", "pickled"),
    ("weights of another model", "could not be loaded"),
    ("missing file", "not a file"),
    ("folder without weights", "holds none of"),
    ("unknown model", "not an open_clip architecture"),
    ("openai without quickgelu", "quickgelu"),
    ("offline tag", "download"),
])
def test_clip_loading_refuses_pickles_and_bad_inputs(tiny_clip, tmp_path, kind, fragment):
    with pytest.raises(UserError, match=fragment):
        ClipScorer.load(**bad_clip_weights(kind, tiny_clip, tmp_path), device="cpu")


def test_bad_conventions_are_user_errors():
    with pytest.raises(UserError, match="convention"):
        convention_from("nonsense")
    with pytest.raises(UserError, match="clamp"):
        ClipConvention(clamp="sometimes")
    with pytest.raises(UserError, match="scale"):
        convention_from({"scale": -1})


def test_clip_weights_folder_is_accepted(tiny_clip, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "open_clip_model.safetensors").write_bytes(tiny_clip.weights.read_bytes())
    scorer = ClipScorer.load(tiny_clip.name, folder, device="cpu")
    assert scorer.describe()["weights"].endswith("open_clip_model.safetensors")
    assert len(scorer.describe()["weights_sha256"]) == 64


# ------------------------------------------------------------------------------------ ComposLoRA


@pytest.mark.parametrize("style", composlora.STYLES)
def test_composlora_sets_match_the_testbed(style):
    loras = composlora.builtin_lora_info(style)
    assert len(loras) == 11 and composlora.categories(loras) == ["character", "clothing", "style", "background", "object"]
    counts = {n: len(composlora.composition_sets(loras, n)) for n in (2, 3, 4, 5)}
    assert counts == {2: 24, 3: 72, 4: 96, 5: 48}
    assert counts == {n: math.comb(4, n - 1) * 3 * 2 ** (n - 1) for n in (2, 3, 4, 5)}
    order = composlora.categories(loras)
    for n in (2, 3, 4, 5):
        sets = composlora.composition_sets(loras, n)
        assert len({s.id for s in sets}) == len(sets)
        for testbed_set in sets:
            cats = [lora.category for lora in testbed_set.loras]
            assert cats[0] == "character" and cats.count("character") == 1
            assert len(set(cats)) == len(cats) == n and cats == sorted(cats, key=order.index)
            triggers = [word for lora in testbed_set.loras for word in lora.trigger_words]
            assert composlora.prompt_for(style, testbed_set) == composlora.PROMPT_PREFIX[style] + ", " + ", ".join(triggers)


def test_composlora_set_order_follows_mlc():
    sets = composlora.composition_sets(composlora.builtin_lora_info("anime"), 2)
    assert [s.id for s in sets[:4]] == ["character_1+clothing_1", "character_1+clothing_2", "character_2+clothing_1",
                                         "character_2+clothing_2"]
    assert sets[6].id == "character_1+style_1" and sets[-1].id == "character_3+object_2"
    first = composlora.composition_sets(composlora.builtin_lora_info("anime"), 5)[0]
    assert composlora.prompt_for("anime", first) == (
        "masterpiece, best quality, kamado nezuko, black hair, pink eyes, forehead, gmuniform, blue thighhighs, "
        "long sleeves, lineart, hand-drawn style, bamboolight, outdoors, bamboo, two-handed burger, "
        "holding a huge burger with both hands")


def test_composlora_suite_expands_to_240_sets_per_style(tmp_path):
    for style, prefix in composlora.PROMPT_PREFIX.items():
        suite = parse_suite({"composlora": {"style": style, "lora_dir": "ComposLoRA"}, "methods": ["merge", "switch"]},
                            base_dir=tmp_path)
        assert len(suite.sets) == 240 and len(suite.jobs()) == 480
        assert suite.model == composlora.REFERENCE_SETTINGS[style]["model"] and suite.seeds == (111,)
        assert suite.negative_prompt == composlora.NEGATIVE_PROMPT[style]
        assert all(s.prompt.startswith(prefix + ", ") for s in suite.sets)
        assert suite.loras["character_1"].file == tmp_path / "ComposLoRA" / style / "character_1.safetensors"
        assert {lora.weight for lora in suite.loras.values()} == {0.8}
    anime = parse_suite({"composlora": {"lora_dir": "x", "sizes": [3]}, "methods": ["merge"], "steps": 5}, base_dir=tmp_path)
    assert len(anime.sets) == 72 and anime.steps == 5 and anime.guidance == 10.0


def test_composlora_reads_public_info_files(tmp_path):
    """A small synthetic ``anime_lora_info.json`` in MLC's format, and the built-in tables round-tripped."""
    info = {
        "character": [{"id": "character_1", "name": "A", "trigger": ["aa", "a hair"], "url": "u"},
                      {"id": "character_2", "name": "B", "trigger": ["bb"], "url": "u"}],
        "clothing": [{"id": "clothing_1", "name": "C", "trigger": ["cc"], "url": "u"}],
        "style": [{"id": "style_1", "name": "S", "trigger": ["ss"], "url": "u"},
                  {"id": "style_2", "name": "T", "trigger": ["tt"], "url": "u"}],
    }
    path = tmp_path / "anime_lora_info.json"
    path.write_text(json.dumps(info))
    loras = composlora.read_lora_info(path)
    assert [len(composlora.composition_sets(loras, n)) for n in (2, 3)] == [2 * 1 + 2 * 2, 2 * 1 * 2]
    suite = parse_suite({"composlora": {"info": "anime_lora_info.json", "lora_dir": "."}, "methods": ["merge"]}, base_dir=tmp_path)
    assert [s.id for s in suite.sets][:3] == ["character_1+clothing_1", "character_2+clothing_1", "character_1+style_1"]
    assert suite.sets[0].prompt == "masterpiece, best quality, aa, a hair, cc"
    for style in composlora.STYLES:
        public = tmp_path / f"{style}_lora_info.json"
        public.write_text(json.dumps(composlora.BUILTIN_LORA_INFO[style]))
        assert composlora.read_lora_info(public) == composlora.builtin_lora_info(style)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"clothing": info["clothing"]}))
    with pytest.raises(UserError, match="character"):
        composlora.read_lora_info(bad)
    with pytest.raises(UserError, match="size 4"):
        composlora.composition_sets(loras, 4)


# ------------------------------------------------------------------------------------ suites


@pytest.fixture(scope="module")
def bench_loras(tiny_sd15_dir, sd15_lora_files, tmp_path_factory):
    """Three LoRAs for the tiny SD1.5: character (zkx), style (qwv), background (bgk)."""
    background = build_tiny_lora(tiny_sd15_dir, tmp_path_factory.mktemp("bench-loras") / "background.safetensors",
                                 seed=3, trigger_words=["bgk"], category="background", init_scale=2.0)
    return [*sd15_lora_files, background]


def write_suite(folder: Path, model: Path, lora_files, tiny_clip, **overrides) -> Path:
    character, style, background = lora_files
    suite = {
        "name": "tiny",
        "model": str(model),
        "loras": {"girl": {"file": str(character), "weight": 0.8},
                  "ink": {"file": str(style), "triggers": "qwv, ink"},
                  "park": str(background)},
        "sets": [["girl", "ink"], {"id": "trio", "loras": ["girl", "ink", "park"], "prompt": "a photo, {triggers}"}],
        "prompt": "masterpiece, {triggers}",
        "methods": ["merge", {"method": "switch", "period": 1}],
        "seeds": [1, 2],
        "width": 64, "height": 64, "steps": 2,
        "clipscore": {"model": tiny_clip.name, "pretrained": str(tiny_clip.weights), "config": str(tiny_clip.config)},
        **overrides,
    }
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def test_suite_file_is_parsed_with_defaults_and_metadata(tmp_path, tiny_sd15_dir, bench_loras, tiny_clip):
    suite = load_suite(write_suite(tmp_path, tiny_sd15_dir, bench_loras, tiny_clip))
    assert [s.id for s in suite.sets] == ["girl+ink", "trio"]
    assert suite.loras["girl"].trigger_words == ("zkx",) and suite.loras["girl"].category == "character"
    assert suite.loras["park"].trigger_words == ("bgk",) and suite.loras["park"].weight == 1.0
    assert suite.sets[0].prompt == "masterpiece, zkx, qwv, ink" and suite.sets[1].prompt == "a photo, zkx, qwv, ink, bgk"
    jobs = suite.jobs()
    assert len(jobs) == 8 and len({job.id for job in jobs}) == 8
    assert [job.id.split("--")[:3] for job in jobs[:3]] == [["girl+ink", "merge", "s1"], ["girl+ink", "switch", "s1"],
                                                            ["girl+ink", "merge", "s2"]]
    again = load_suite(write_suite(tmp_path, tiny_sd15_dir, bench_loras, tiny_clip))
    assert [job.id for job in again.jobs()] == [job.id for job in jobs], "ids are deterministic"
    changed = load_suite(write_suite(tmp_path, tiny_sd15_dir, bench_loras, tiny_clip, steps=3))
    assert not {job.id for job in changed.jobs()} & {job.id for job in jobs}, "a changed setting makes new ids"


@pytest.mark.parametrize("override, fragment", [
    ({"methods": ["nonsense"]}, "method 'nonsense' is not known"),
    ({"methods": [{"method": "switch", "periodd": 3}]}, "periodd"),
    ({"methods": ["merge", "merge"]}, "label 'merge' appears twice"),
    ({"sets": [["girl", "ghost"]]}, "'ghost' is not defined"),
    ({"sets": [["girl", "girl"]]}, "appears twice"),
    ({"seeds": [-1]}, "seeds"),
    ({"width": 63}, "multiple of 8"),
    ({"steps": 0}, "steps"),
    ({"scheduler": "magic"}, "scheduler"),
    ({"colour": "red"}, "'colour' is not known"),
    ({"clipscore": {"convention": {"clamp": "always"}}}, "clamp"),
    ({"composlora": {"lora_dir": "x"}}, "not both"),
    ({"toyworld": {}}, "not both"),
    ({"sets": [{"loras": ["girl", "ink"], "boxes": [[0, 0, 0.5, 1]]}]}, "one \\[x0, y0, x1, y1\\]"),
    ({"sets": [{"loras": ["girl", "ink"], "boxes": [[0, 0, 2, 1], [0, 0, 1, 1]]}], "methods": ["composer"]},
     "set 'girl\\+ink' with method 'composer'.*not inside the image"),
    ({"sets": [{"loras": ["girl", "ink"], "region_prompts": ["a girl"]}]}, "one text per LoRA"),
])
def test_bad_suites_are_one_line_user_errors(tmp_path, tiny_sd15_dir, bench_loras, tiny_clip, override, fragment, capsys):
    path = write_suite(tmp_path, tiny_sd15_dir, bench_loras, tiny_clip, **override)
    with pytest.raises(UserError, match=fragment):
        load_suite(path)
    assert main(["bench", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loracompose: error: ") and "\n" not in err


def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing.yaml")]) == 2
    assert main(["bench", "report", str(tmp_path / "nothing")]) == 2
    assert main(["bench", "report"]) == 2
    with pytest.raises(UserError, match="shard"):
        Shard.parse("2/2")
    assert Shard.from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Shard(3, 4)
    assert Shard.from_environment({}) == Shard(0, 1)


# ------------------------------------------------------------------------------------ manifest


def test_manifest_ignores_and_repairs_a_partial_last_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b'{"job_id": "a", "image": "x"}\n{"job_id": "b", "ima')
    assert [r["job_id"] for r in read_lines(path)] == ["a"]
    with ManifestWriter(path) as writer:
        writer.append({"job_id": "c", "image": "y"})
        with pytest.raises(UserError, match="another bench process"):
            ManifestWriter(path).__enter__()
    assert path.read_bytes() == b'{"job_id": "a", "image": "x"}\n{"image": "y", "job_id": "c"}\n'
    assert list(read_manifest(tmp_path)) == ["a", "c"]


# ------------------------------------------------------------------------------------ runs


def bench_env() -> dict[str, str]:
    """A subprocess environment: offline, one thread (the tiny model gains nothing from more)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def bench_process(suite: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "loracompose.cli", "bench", str(suite), "--out", str(out), "--quiet", *extra]
    return subprocess.Popen(command, env=env or bench_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def manifest_lines(out: Path) -> list[str]:
    """Every line of every manifest file, raw (a partial last line included)."""
    return [line for path in sorted(out.glob("manifest*.jsonl")) for line in path.read_text().splitlines(keepends=True)]


def assert_every_job_once(out: Path, suite: Path) -> None:
    expected = {job.id for job in load_suite(suite).jobs()}
    lines = manifest_lines(out)
    assert all(line.endswith("\n") for line in lines), "no partial line once the run is finished"
    ids = [json.loads(line)["job_id"] for line in lines]
    assert sorted(ids) == sorted(expected), "every job exactly once"
    assert_images_intact(out)
    assert sorted(p.stem for p in (out / "images").glob("*.png")) == sorted(expected)
    assert not list((out / "images").glob(".*")), "no temp files left"


def assert_images_intact(out: Path) -> None:
    for png in (out / "images").glob("*.png"):
        with Image.open(png) as image:
            image.load()
        json.loads(png.with_suffix(".json").read_text())


def test_run_report_and_rerun(tmp_path, tiny_sd15_dir, bench_loras, tiny_clip, capsys):
    references = tmp_path / "girl-refs"
    references.mkdir()
    for index, image in enumerate(random_images(2, seed=9)):
        image.save(references / f"ref{index}.png")
    loras = {"girl": {"file": str(bench_loras[0]), "references": str(references)}, "ink": str(bench_loras[1]),
             "park": str(bench_loras[2])}
    suite = write_suite(tmp_path, tiny_sd15_dir, bench_loras, tiny_clip, loras=loras,
                        sets=[["girl", "ink"], ["girl", "park"]], seeds=[1],
                        methods=["merge", {"method": "composite", "label": "composite-seq", "batched": False}])
    out = tmp_path / "run"
    assert main(["bench", str(suite), "--out", str(out), "--only", "method=merge", "--limit", "1", "--quiet"]) == 0
    assert [json.loads(line)["method"] for line in manifest_lines(out)] == ["merge"]
    assert main(["bench", str(suite), "--out", str(out), "--quiet", "--report"]) == 0
    assert "3 run now" in capsys.readouterr().err
    assert_every_job_once(out, suite)
    records = read_manifest(out)
    for record in records.values():
        assert record["clip"]["convention"] == ClipConvention().to_dict()
        assert record["clip_text"] == ", ".join(w for lora in record["loras"] for w in load_suite(suite).loras[lora].trigger_words)
        assert record["clipscore"] == pytest.approx(100 * max(record["clip_cosine"], 0.0))
        assert set(record["concept_similarity"]) == {"girl"} and -1 <= record["concept_similarity"]["girl"] <= 1
        sidecar = json.loads((out / record["sidecar"]).read_text())
        assert sidecar["seed"] == record["seed"] and sidecar["stats"] == record["stats"]
    assert main(["bench", str(suite), "--out", str(out), "--quiet"]) == 0
    assert "0 run now" in capsys.readouterr().err
    assert len(manifest_lines(out)) == 4

    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["job_id"] for row in rows) == sorted(records)
    for row in rows:
        record = records[row["job_id"]]
        assert (row["method"], row["set_id"], int(row["seed"]), int(row["n"])) == \
            (record["method"], record["set_id"], record["seed"], record["n"])
        assert float(row["clipscore"]) == pytest.approx(record["clipscore"])
        assert int(row["unet_calls"]) == record["stats"]["unet_calls"]
        assert float(row["wall_seconds"]) == pytest.approx(record["stats"]["wall_seconds"])
        assert row["image"] == record["image"] and row["prompt"] == record["prompt"]
    with open(out / "summary.csv", newline="") as handle:
        summary = {row["method"]: row for row in csv.DictReader(handle)}
    for method in ("merge", "composite-seq"):
        mine = [r for r in records.values() if r["method"] == method]
        assert int(summary[method]["jobs"]) == len(mine) == int(summary[method]["planned"]) == 2
        assert float(summary[method]["clipscore_mean"]) == pytest.approx(sum(r["clipscore"] for r in mine) / 2)
        assert float(summary[method]["unet_calls_mean"]) == pytest.approx(sum(r["stats"]["unet_calls"] for r in mine) / 2)
        concept = [r["concept_similarity"]["girl"] for r in mine]
        assert float(summary[method]["concept_similarity_mean"]) == pytest.approx(sum(concept) / 2)
    assert float(summary["composite-seq"]["unet_calls_mean"]) == 2 * float(summary["merge"]["unet_calls_mean"])  # N = 2 calls per step

    page = (out / "report.html").read_text()
    assert page.count('src="data:image/jpeg;base64,') == 4
    assert "composite-seq" in page and "CLIPScore" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page, "self-contained"
    assert main(["bench", "report", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(out / "report.html")


def test_sigkill_mid_grid_then_rerun_finishes_every_job_once(tmp_path, tiny_sd15_dir, bench_loras, tiny_clip):
    suite = write_suite(tmp_path, tiny_sd15_dir, bench_loras, tiny_clip, seeds=[1, 2, 3])
    out = tmp_path / "run"
    process = bench_process(suite, out)
    deadline = time.monotonic() + 240
    while len(manifest_lines(out)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it could be killed: {process.communicate()[1][-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = manifest_lines(out)
    assert 2 <= len(done) < 12, "killed mid-grid"
    for line in done[:-1]:
        json.loads(line)
    assert done[-1].endswith("\n") or len(list(read_lines(out / "manifest.jsonl"))) == len(done) - 1
    assert_images_intact(out)
    assert main(["bench", str(suite), "--out", str(out), "--quiet"]) == 0
    assert_every_job_once(out, suite)


def test_two_shards_in_parallel_cover_the_grid_once(tmp_path, tiny_sd15_dir, bench_loras, tiny_clip, monkeypatch):
    """Shard 0/2 by flag in a subprocess while this process runs shard 1 as accelerate would start it."""
    suite = write_suite(tmp_path, tiny_sd15_dir, bench_loras, tiny_clip)
    out = tmp_path / "run"
    process = bench_process(suite, out, "--shard", "0/2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["bench", str(suite), "--out", str(out), "--quiet"]) == 0
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert sorted(p.name for p in out.glob("manifest*.jsonl")) == ["manifest.shard-0-of-2.jsonl", "manifest.shard-1-of-2.jsonl"]
    shards = {path.name: {r["job_id"] for r in read_lines(path)} for path in out.glob("manifest*.jsonl")}
    first, second = shards.values()
    assert len(first) == len(second) == 4 and not first & second
    assert_every_job_once(out, suite)


# ------------------------------------------------------------------------------------ score, report


TABLE_T_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 10: 2.2281, 30: 2.0423}  # Student t, two-sided 95%


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_sd15_dir, bench_loras):
    """A finished unscored run: sets of N = 2, 2, 2, 3 x merge and cmlora (8 jobs), on copies of the
    LoRAs, with an empty ``$LORACOMPOSE_HOME`` of its own (CMLoRA's profile cache), progress bar on."""
    import contextlib
    import io
    import shutil

    folder = tmp_path_factory.mktemp("finished-run")
    copies = [Path(shutil.copy(path, folder / path.name)) for path in bench_loras]
    references = folder / "girl-refs"
    references.mkdir()
    for index, image in enumerate(random_images(2, seed=9)):
        image.save(references / f"ref{index}.png")
    suite = {
        "name": "finished", "model": str(tiny_sd15_dir),
        "loras": {"girl": {"file": str(copies[0]), "references": str(references)}, "ink": str(copies[1]),
                  "park": str(copies[2])},
        "sets": [["girl", "ink"], ["girl", "park"], ["ink", "park"], {"id": "trio", "loras": ["girl", "ink", "park"]}],
        "prompt": "masterpiece, {triggers}",
        "methods": ["merge", {"method": "cmlora", "profile": {"size": 64, "steps": 2}}],
        "seeds": [1], "width": 64, "height": 64, "steps": 2,
    }
    suite_path = folder / "suite.yaml"
    suite_path.write_text(yaml.safe_dump(suite, sort_keys=False))
    out = folder / "run"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORACOMPOSE_HOME", str(folder / "home"))
        assert main(["bench", str(suite_path), "--out", str(out)]) == 0
    return {"suite": suite_path, "out": out, "loras": copies, "references": references, "stderr": stderr.getvalue(),
            "home": folder / "home"}


def copy_run(finished_run, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(finished_run["out"], tmp_path / "run"))


def clip_flags(tiny_clip) -> list[str]:
    return ["--clip-model", tiny_clip.name, "--clip-weights", str(tiny_clip.weights), "--clip-config", str(tiny_clip.config)]


def score_lines(run: Path) -> list[str]:
    path = run / "metrics" / "clipscore.jsonl"
    return path.read_text().splitlines(keepends=True) if path.exists() else []


def test_bench_runs_cmlora_and_profiles_its_loras(finished_run):
    """The runner calls CMLoRA's profile_frequencies: each LoRA is profiled once into the cache under
    ``$LORACOMPOSE_HOME`` (nothing beside the LoRAs), and the order the method used is built from those scores."""
    from loracompose.frequency import cached_profiles

    records = read_manifest(finished_run["out"])
    cmlora = [r for r in records.values() if r["method"] == "cmlora"]
    assert len(records) == 8 and len(cmlora) == 4
    loras = finished_run["loras"]
    assert sorted(p.name for p in loras[0].parent.glob("*.safetensors*")) == sorted(p.name for p in loras)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORACOMPOSE_HOME", str(finished_run["home"]))
        for lora in loras:
            profiles = cached_profiles(lora)
            assert [(p["settings"]["size"], p["settings"]["steps"]) for p in profiles] == [(64, 2)], "profiled once"
    for record in cmlora:
        order = record["method_settings"]["frequency_order"]
        assert sorted(order["high"] + order["low"]) == sorted(record["loras"])
        assert set(order["class_sources"]) == set(record["loras"])
    assert all("frequency_order" not in r["method_settings"] for r in records.values() if r["method"] == "merge")


def test_bench_progress_bar_shows_eta(finished_run):
    bar = finished_run["stderr"].replace("\r", "\n").splitlines()
    assert any(re.search(r"\b4/8 \[\d\d:\d\d<\d\d:\d\d", line) for line in bar), "done/total [elapsed<remaining"
    assert any(re.search(r"\b8/8 \[", line) for line in bar), finished_run["stderr"][-500:]


def test_score_adds_clipscore_resumably_and_rescores_only_when_asked(finished_run, tiny_clip, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    manifest_before = (run / "manifest.jsonl").read_bytes()
    # A suite that gained a clipscore: section: rerunning bench generates nothing, stores the CLIP setup in run.json.
    suite = yaml.safe_load(finished_run["suite"].read_text())
    suite["clipscore"] = {"model": tiny_clip.name, "pretrained": str(tiny_clip.weights), "config": str(tiny_clip.config)}
    suite_path = tmp_path / "suite.yaml"
    suite_path.write_text(yaml.safe_dump(suite))
    assert main(["bench", str(suite_path), "--out", str(run), "--quiet"]) == 0
    assert "0 run now" in capsys.readouterr().err

    assert main(["score", str(run), "--quiet"]) == 0
    assert "8 scored now" in capsys.readouterr().err
    assert (run / "manifest.jsonl").read_bytes() == manifest_before, "the manifest is never rewritten"
    records = read_records(run)
    scorer = ClipScorer.load(tiny_clip.name, tiny_clip.weights, config=tiny_clip.config, device="cpu")
    triggers = {"girl": "zkx", "ink": "qwv", "park": "bgk"}
    for record in records.values():
        text = ", ".join(triggers[name] for name in record["loras"])
        with Image.open(run / record["image"]) as image:
            cosine = explicit_cosines(scorer, [image], [text])[0]
        assert record["clip_text"] == text and record["clip_cosine"] == pytest.approx(cosine, abs=1e-5)
        assert record["clipscore"] == pytest.approx(100 * max(cosine, 0.0), abs=1e-4)
        assert record["clip"]["convention"] == ClipConvention().to_dict() and record["clip"]["model"] == tiny_clip.name
        if "girl" in record["loras"]:  # the one concept with reference images
            references = sorted(finished_run["references"].glob("*.png"))
            expected = scorer.concept_similarity(run / record["image"], {"girl": references})
            assert record["concept_similarity"] == pytest.approx(expected, abs=1e-5)
        else:
            assert "concept_similarity" not in record
    lines = score_lines(run)
    assert sorted(json.loads(line)["job_id"] for line in lines) == sorted(records)

    assert main(["score", str(run), "--quiet"]) == 0
    assert "8 already scored, 0 scored now" in capsys.readouterr().err and score_lines(run) == lines
    assert main(["score", str(run), "--convention", "raw", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "0 scored now" in err and "8 jobs were scored under another" in err and "--rescore" in err
    assert score_lines(run) == lines, "another convention only with --rescore"
    assert main(["score", str(run), "--convention", "{scale: 1, clamp: none, text: prompt}", "--rescore", "--quiet"]) == 0
    assert "8 scored now" in capsys.readouterr().err and len(score_lines(run)) == 16
    for job_id, record in read_records(run).items():
        assert record["clip"]["convention"] == CONVENTIONS["raw"].to_dict()
        assert record["clip_text"] == record["prompt"] != records[job_id]["clip_text"]
        assert record["clipscore"] == pytest.approx(record["clip_cosine"])

    # A job generated again (its image deleted, bench rerun) drops its old score and is scored again.
    victim = sorted(records)[0]
    (run / records[victim]["image"]).unlink()
    assert main(["score", str(run), "--convention", "raw", "--quiet"]) == 0
    assert "1 jobs have no image" in capsys.readouterr().err
    assert main(["bench", str(suite_path), "--out", str(run), "--quiet"]) == 0
    assert "1 run now" in capsys.readouterr().err
    assert "clip" in read_records(run)[victim], "bench scored it inline (the suite has clipscore:)"
    assert read_records(run)[victim]["clip"]["convention"] == ClipConvention().to_dict(), "not the old image's raw score"
    assert main(["report", str(run)]) == 0
    assert "1 jobs scored under another CLIP model, weights or convention are left out" in (run / "report.html").read_text()
    with open(run / "by_size.csv", newline="") as handle:
        assert sum(int(row["scored"]) for row in csv.DictReader(handle)) == 7, "the 7 raw scores, not the other one"


def slow_scoring(argv: list[str]) -> None:
    """A forked child's work: ``loracompose score`` with each image taking a quarter second more."""
    score = ClipScorer.score_generation
    ClipScorer.score_generation = lambda *args, **kwargs: time.sleep(0.25) or score(*args, **kwargs)
    sys.exit(main(argv))


def test_score_sigkill_then_rerun_scores_every_job_once(finished_run, tiny_clip, tmp_path, capsys):
    """SIGKILL a scoring process mid-way (forked from this one: a fresh interpreter would spend
    most of the test importing torch and diffusers), rerun: every job scored exactly once."""
    import multiprocessing

    run = copy_run(finished_run, tmp_path)
    process = multiprocessing.get_context("fork").Process(
        target=slow_scoring, args=(["score", str(run), *clip_flags(tiny_clip), "--quiet"],))
    process.start()
    deadline = time.monotonic() + 240
    while len(score_lines(run)) < 3 and process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.is_alive(), f"scoring ended before it could be killed (exit code {process.exitcode})"
    process.kill()
    process.join()
    assert process.exitcode == -signal.SIGKILL
    done = score_lines(run)
    assert 3 <= len(done) < 8, "killed mid-way"
    with open(run / "metrics" / "clipscore.jsonl", "a") as handle:
        handle.write('{"job_id": "half a line')  # what a kill inside a write could leave
    assert main(["score", str(run), *clip_flags(tiny_clip), "--quiet"]) == 0
    already = len([line for line in done if line.endswith("\n")])
    assert f"{already} already scored, {8 - already} scored now" in capsys.readouterr().err
    lines = score_lines(run)
    assert all(line.endswith("\n") for line in lines) and lines[:already] == done[:already]
    assert sorted(json.loads(line)["job_id"] for line in lines) == sorted(read_manifest(run)), "every job exactly once"


def test_t_quantiles_match_the_table_and_scipy():
    from loracompose.eval.confidence import mean_interval, t_quantile

    for df, value in TABLE_T_975.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 17, 60, 250):
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)
    assert mean_interval([]) is None and mean_interval([3.0])[1:] == (None, None, 1)


def test_report_has_ci_table_matching_manifest_and_embedded_plots(finished_run, tiny_clip, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    assert main(["score", str(run), *clip_flags(tiny_clip), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(run / name) for name in
                                                    ("report.html", "results.csv", "by_size.csv", "summary.csv")]
    records = read_records(run)

    def rows(name):
        with open(run / name, newline="") as handle:
            return list(csv.DictReader(handle))

    results = rows("results.csv")
    assert sorted(row["job_id"] for row in results) == sorted(records)
    for row in results:
        record = records[row["job_id"]]
        assert float(row["clipscore"]) == pytest.approx(record["clipscore"])
        assert (int(row["n"]), int(row["unet_calls"])) == (record["n"], record["stats"]["unet_calls"])

    by_size = rows("by_size.csv")
    assert [(row["n"], row["method"]) for row in by_size] == [("2", "merge"), ("2", "cmlora"), ("3", "merge"), ("3", "cmlora")]
    for row in by_size:
        mine = [r for r in records.values() if r["method"] == row["method"] and r["n"] == int(row["n"])]
        assert int(row["jobs"]) == int(row["scored"]) == len(mine) == (3 if row["n"] == "2" else 1)
        if len(mine) == 1:  # no interval from one image
            assert float(row["clipscore_mean"]) == pytest.approx(mine[0]["clipscore"]) and row["clipscore_ci_low"] == ""
            continue
        for column, values in (("clipscore", [r["clipscore"] for r in mine]),
                               ("wall_seconds", [r["stats"]["wall_seconds"] for r in mine]),
                               ("concept_similarity", [r["concept_similarity"]["girl"] for r in mine if "girl" in r["loras"]])):
            mean = sum(values) / len(values)
            half = TABLE_T_975[len(values) - 1] * float(np.std(values, ddof=1)) / math.sqrt(len(values))
            assert float(row[f"{column}_mean"]) == pytest.approx(mean, abs=1e-9)
            # the table's t has 5 significant digits
            assert float(row[f"{column}_ci_low"]) == pytest.approx(mean - half, abs=1e-4 * half + 1e-12)
            assert float(row[f"{column}_ci_high"]) == pytest.approx(mean + half, abs=1e-4 * half + 1e-12)
        assert float(row["unet_calls_mean"]) == pytest.approx(sum(r["stats"]["unet_calls"] for r in mine) / len(mine))

    page = (run / "report.html").read_text()
    plots = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="plot: ([^"]+)"', page)
    assert [title for _, title in plots] == ["CLIPScore vs N", "Time per image vs N", "UNet calls per image vs N"]
    for data, _ in plots:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
    assert page.count('src="data:image/jpeg;base64,') == 8, "every image in the set x method grid"
    assert "Student t" in page and "95%" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page, "self-contained"
    assert main(["bench", "report", str(run)]) == 0, "the old spelling stays an alias"
    assert rows("by_size.csv") == by_size


def test_score_and_report_bad_inputs_are_one_line_errors(finished_run, tiny_clip, tmp_path, capsys, monkeypatch):
    run = copy_run(finished_run, tmp_path)
    (tmp_path / "empty").mkdir()
    bad = [
        ["score"], ["score", str(tmp_path / "missing")], ["score", str(tmp_path / "empty")],
        ["score", str(run), "--convention", "nonsense"], ["score", str(run), "--convention", "{clamp: always}"],
        ["score", str(run), "--convention", "{scale: [1"],
        ["score", str(run), "--clip-model", "ViT-Nope-99"],
        ["score", str(run), "--clip-model", tiny_clip.name, "--clip-config", str(tiny_clip.config),
         "--clip-weights", str(tmp_path / "nope.safetensors")],
        ["report"], ["report", str(tmp_path / "missing")], ["report", str(tmp_path / "empty")],
        ["report", str(run), "--thumbnails", "0"],
    ]
    for argv in bad:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("loracompose: error: ") and "\n" not in err, (argv, err)
    assert not (run / "metrics").exists() and not (run / "report.html").exists(), "nothing written"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "matplotlib is not installed" in err and "\n" not in err
    assert not (run / "report.html").exists() and not (run / "results.csv").exists()
