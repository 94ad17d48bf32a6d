"""eval/: CLIPScore against explicit and torchmetrics formulas, the ComposLoRA testbed, suites,
resumable and sharded bench runs (SIGKILL mid-grid), and the report."""

from __future__ import annotations

import csv
import json
import math
import os
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

from loracompose.cli import main
from loracompose.errors import UserError
from loracompose.eval import CONVENTIONS, ClipConvention, ClipScorer, convention_from, load_suite, parse_suite
from loracompose.eval import composlora
from loracompose.eval.manifest import ManifestWriter, read_lines, read_manifest
from loracompose.eval.runner import Shard
from loracompose.eval.tiny_clip import build_tiny_clip
from loracompose.tiny import build_tiny_lora

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
