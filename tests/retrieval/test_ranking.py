"""Ranking a library's LoRAs for a prompt (loracompose.retrieval): the training-free tier with each text
embedder, category limits, the CLI-facing helpers and ``retrieve``."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_one_line_user_errors, with_metadata
from loracompose import UserError
from loracompose.library import open_library
from loracompose.retrieval import (
    OpenClipTextEmbedder,
    PipelineTextEmbedder,
    RankedLora,
    auto_lora_specs,
    format_ranking,
    parse_category_limits,
    rank_by_similarity,
    rank_loras,
)


def test_training_free_tier_ranks_the_exact_trigger_match_first(sd15, library_dir):
    library = open_library(library_dir)
    embedder = PipelineTextEmbedder(sd15)
    for index in (3, 7, 10):
        ranked = rank_loras(f"a picture in the evening, trg{index}", library, embedder, top_k=3, architecture="sd15")
        assert ranked[0].entry.file == f"lora{index:02d}.safetensors" and ranked[0].trigger_match
        assert ranked[0].score == pytest.approx(ranked[0].similarity + 2.0)
        assert not any(other.trigger_match for other in ranked[1:])
    # "trg1" inside another word is no match; with no trigger, every score is a plain cosine
    plain = rank_loras("trg10x in the rain", library, embedder, top_k=12, category_limits={})
    assert len(plain) == 12 and all(-1.0 <= r.score <= 1.0 and r.score == r.similarity for r in plain)
    assert [r.score for r in plain] == sorted((r.score for r in plain), reverse=True)
    assert rank_loras("anything", library, embedder, architecture="sdxl") == []


def test_open_clip_text_tower_ranks_too(library_dir, tmp_path):
    import open_clip

    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
    (tmp_path / "autolora-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "autolora-tiny-clip.json")
    embedder = OpenClipTextEmbedder("autolora-tiny-clip")
    ranked = rank_loras("trg5 on a hill", open_library(library_dir), embedder, top_k=2)
    assert ranked[0].entry.file == "lora05.safetensors" and embedder.embed(["a"]).shape == (1, 32)
    with pytest.raises(UserError, match="open_clip model"):
        OpenClipTextEmbedder("no-such-model")


def test_sdxl_embeds_with_both_text_encoders_and_skips_sd15_loras(sdxl, sdxl_lora_files, library_dir, tmp_path):
    embedder = PipelineTextEmbedder(sdxl)
    vectors = embedder.embed(["a zkx", "a qwv", "a zkx"])
    assert vectors.shape == (3, 64) and torch.equal(vectors[0], vectors[2])
    torch.testing.assert_close(vectors[:, :32].norm(dim=-1), torch.ones(3))  # each encoder normalised
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in (*sdxl_lora_files, library_dir / "lora00.safetensors"):
        with_metadata(path, folder / f"{path.parent.name[:4]}-{path.name}")
    specs, ranked = auto_lora_specs(sdxl, "a zkx", folder, 3)
    assert len(specs) == 2 and ranked[0].entry.trigger_words == ("zkx",)
    assert all(item.entry.architecture == "sdxl" for item in ranked)


def test_auto_lora_specs_and_the_retrieve_listing(sd15, library_dir):
    specs, ranked = auto_lora_specs(sd15, "trg2 and trg6 at dawn", library_dir, 2)
    assert sorted(spec.path.name for spec in specs) == ["lora02.safetensors", "lora06.safetensors"]
    assert {spec.name: spec.trigger_words for spec in specs} == {"lora02": ("trg2",), "lora06": ("trg6",)}
    listing = format_ranking(ranked)
    assert len(listing.splitlines()) == 3 and listing.count("[trigger in prompt]") == 2
    assert "lora02.safetensors; background" in listing
    assert parse_category_limits("character=2,Style=0") == {"character": 2, "style": 0, "background": 1}
    assert parse_category_limits(None) is None
    with pytest.raises(UserError, match="--category-limit"):
        parse_category_limits("character:2")


def test_category_limits_keep_one_character_unless_asked(library_dir):
    entries = open_library(library_dir).sorted_entries()[:5]  # characters: lora00, lora04
    similarities = torch.tensor([0.9, 0.1, 0.2, 0.3, 0.8])
    picked = rank_by_similarity("a scene", similarities, entries, top_k=3)
    assert [r.entry.file for r in picked] == ["lora00.safetensors", "lora03.safetensors", "lora02.safetensors"]
    unlimited = rank_by_similarity("a scene", similarities, entries, top_k=3, category_limits={})
    assert [r.entry.file for r in unlimited][:2] == ["lora00.safetensors", "lora04.safetensors"]
    both = rank_by_similarity("trg0 meets trg4", similarities, entries, top_k=3)
    assert [r.entry.file for r in both][:2] == ["lora00.safetensors", "lora04.safetensors"], "the prompt asks for both"


def test_ranked_lora_json(library_dir):
    entry = open_library(library_dir).sorted_entries()[0]
    assert RankedLora(entry, 2.5, 0.5, True).to_json() == {
        "file": "lora00.safetensors", "name": "0", "category": "character", "score": 2.5, "similarity": 0.5,
        "trigger_match": True}


def test_cli_retrieve_and_generate_with_auto_loras(tiny_sd15_dir, library_dir, tmp_path, capsys):
    from loracompose.cli.main import main

    model = ["--model", str(tiny_sd15_dir)]
    assert main(["retrieve", "a photo of trg3 at dusk", "--library", str(library_dir), "--top", "2", "--json",
                 *model]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert len(listing) == 2 and listing[0]["trigger_in_prompt"] and listing[0]["file"].endswith("3.safetensors")
    out = tmp_path / "out"
    assert main(["generate", *model, "--prompt", "a photo of trg3", "--auto-loras", "1", "--library", str(library_dir),
                 "--method", "autolora", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    record = json.loads((out / "autolora-0.json").read_text())
    assert [lora["path"] for lora in record["loras"]] == [listing[0]["file"]]
    capsys.readouterr()
    bad_library = tmp_path / "bad-library"
    bad_library.mkdir()
    (bad_library / "broken.safetensors").write_bytes(b"junk")
    assert main(["retrieve", "x", "--library", str(bad_library), *model]) == 0
    assert "warning: skipped broken.safetensors: " in capsys.readouterr().err
    for args, message in [(["generate", *model, "--prompt", "x", "--auto-loras", "1"], "--auto-loras needs --library"),
                          (["retrieve", "x", "--library", str(library_dir), "--top", "0", *model], "--top 0"),
                          (["retrieve", "x", "--library", str(tmp_path / "none"), *model], "none")]:
        assert main([*args, "--out", str(tmp_path / "bad")] if args[0] == "generate" else args) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_bad_ranking_requests_are_one_line_user_errors(library_dir, embedder):
    library = open_library(library_dir)
    assert_one_line_user_errors([
        (lambda: rank_loras("a cat", library, embedder, top_k=0), "--top"),
        (lambda: rank_loras("  ", library, embedder), "prompt is empty"),
    ])
