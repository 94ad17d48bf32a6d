"""AutoLoRA: the LoRA library index, both retrieval tiers, and gated fusion with its trainer (tiny models, CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loracompose import LoraSpec, Merge, UserError
from loracompose.methods.autolora import (
    AutoLoRA,
    GatedFusion,
    GateSet,
    GateTrainingSettings,
    LayerGate,
    lora_layer_channels,
    save_gates,
    train_gates,
)
from loracompose.library import INDEX_FILE, open_library
from loracompose.pipelines.adapters import AdapterController
from loracompose.retrieval import (
    OpenClipTextEmbedder,
    PipelineTextEmbedder,
    RankedLora,
    RetrieverTrainingSettings,
    WeightRetriever,
    auto_lora_specs,
    evaluate_retriever,
    format_ranking,
    load_retriever,
    parse_category_limits,
    rank_by_similarity,
    rank_loras,
    read_unet_factors,
    recall_at_k,
    train_retriever,
)
from loracompose.assets.tiny import build_tiny_lora

COMMON = dict(show_progress=False, output_type="latent", append_triggers=False)
PROMPT = "a zkx in qwv style"
SUBJECTS = ("red fox", "blue whale", "golden retriever", "snowy mountain", "neon city", "oil painting", "pixel art",
            "medieval castle", "cherry blossom", "desert dunes", "robot knight", "white cat")
CATEGORIES = ("character", "style", "background", "object")
TRAINING_TEMPLATES = ("{}", "a photo of a {}", "{}, detailed illustration")
HELD_OUT_TEMPLATES = ("a {} standing in the rain", "portrait of a {} at sunset")
PROBED_LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


# ------------------------------------------------------------------------------------ helpers and fixtures


def with_metadata(source: Path, out: Path, extra: dict[str, str] | None = None, zero=lambda key: False) -> Path:
    """A copy of a LoRA file with extra metadata and the lora_B weights of keys where ``zero(key)`` zeroed."""
    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = {key: torch.zeros_like(value) if "lora_B" in key and zero(key) else value
               for key, value in load_file(source).items()}
    save_file(tensors, str(out), metadata=metadata | (extra or {}))
    return out


class BagOfTokensEmbedder:
    """A lexical text embedder with known behaviour: the sum of fixed random vectors of a text's distinct
    CLIP tokens. Texts sharing words are close, so held-out prompts are answerable from the text side and
    the test measures what the weight encoder learned (the tiny model's random CLIP has no semantics)."""

    fingerprint = "bag-of-tokens-64"

    def __init__(self, tokenizer, dim: int = 64) -> None:
        self.tokenizer = tokenizer
        self.table = torch.randn(len(tokenizer), dim, generator=torch.Generator().manual_seed(0))

    def embed(self, texts):
        ids = [sorted(set(self.tokenizer(text, add_special_tokens=False).input_ids)) for text in texts]
        return torch.stack([self.table[row].sum(0) for row in ids])


@pytest.fixture(scope="module")
def library_dir(tiny_sd15_dir, tmp_path_factory) -> Path:
    """Twelve UNet-only LoRAs, one per subject, with trigger ``trg<k>``, a category, a description and captions."""
    folder = tmp_path_factory.mktemp("autolora-library")
    scratch = tmp_path_factory.mktemp("autolora-raw")
    for index, subject in enumerate(SUBJECTS):
        raw = build_tiny_lora(tiny_sd15_dir, scratch / f"{index}.safetensors", seed=40 + index, text_encoder=False,
                              trigger_words=[f"trg{index}"], category=CATEGORIES[index % 4], init_scale=2.0)
        captions = [template.format(subject) for template in TRAINING_TEMPLATES]
        with_metadata(raw, folder / f"lora{index:02d}.safetensors",
                      {"loracompose.description": f"a lora of a {subject}", "loracompose.captions": json.dumps(captions)})
    return folder


@pytest.fixture(scope="module")
def embedder(sd15):
    return BagOfTokensEmbedder(sd15.tokenizer)


RETRIEVER = dict(width=64, depth=2, heads=4, mlp=128, batch_size=12, learning_rate=3e-3, temperature=0.07,
                 show_progress=False)


@pytest.fixture(scope="module")
def trained_retriever(library_dir, embedder, tmp_path_factory):
    out = tmp_path_factory.mktemp("retriever") / "retriever.safetensors"
    return train_retriever(RetrieverTrainingSettings(library_dir, out, steps=60, checkpoint_every=30, **RETRIEVER),
                           embedder=embedder)


# ------------------------------------------------------------------------------------ the library index


def test_index_reads_metadata_and_follows_added_changed_removed_files(library_dir, sd15_lora_files, tmp_path):
    folder = tmp_path / "lib"
    (folder / "sub").mkdir(parents=True)
    first = with_metadata(library_dir / "lora00.safetensors", folder / "fox.safetensors")
    with_metadata(sd15_lora_files[0], folder / "sub" / "character.safetensors")
    library = open_library(folder)
    assert library.changes.rebuilt and sorted(library.changes.added) == ["fox.safetensors", "sub/character.safetensors"]
    fox = library.entries["fox.safetensors"]
    assert (fox.name, fox.trigger_words, fox.category, fox.architecture) == ("0", ("trg0",), "character", "sd15")
    assert fox.description == "a lora of a red fox" and fox.captions[0] == "red fox"
    assert "trg0" in fox.metadata_text() and "red fox" in fox.metadata_text()
    stored = json.loads((folder / INDEX_FILE).read_text())
    assert stored["format"] == 1 and set(stored["entries"]) == {"fox.safetensors", "sub/character.safetensors"}

    again = open_library(folder)
    assert not again.changes.any and again.entries == library.entries

    with_metadata(library_dir / "lora01.safetensors", folder / "whale.safetensors")
    with_metadata(first, first, {"loracompose.description": "a lora of a fennec fox"})
    os.utime(first, ns=(fox.mtime_ns + 10**9, fox.mtime_ns + 10**9))
    (folder / "sub" / "character.safetensors").unlink()
    changed = open_library(folder)
    assert changed.changes.added == ("whale.safetensors",) and changed.changes.updated == ("fox.safetensors",)
    assert changed.changes.removed == ("sub/character.safetensors",) and not changed.changes.rebuilt
    assert changed.entries["fox.safetensors"].description == "a lora of a fennec fox"
    assert set(json.loads((folder / INDEX_FILE).read_text())["entries"]) == {"fox.safetensors", "whale.safetensors"}
    assert not [path for path in folder.iterdir() if path.name.endswith(".tmp")], "the index is written atomically"


def test_corrupt_entries_are_reported_and_a_corrupt_index_is_rebuilt(library_dir, tmp_path):
    folder = tmp_path / "lib"
    folder.mkdir()
    good = with_metadata(library_dir / "lora00.safetensors", folder / "good.safetensors")
    (folder / "truncated.safetensors").write_bytes(good.read_bytes()[:-100])
    (folder / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    (folder / "pickled.ckpt").write_bytes(b"\x80\x04pickle")
    save_file({"weight": torch.zeros(2)}, str(folder / "no_lora.safetensors"))
    library = open_library(folder)
    assert list(library.entries) == ["good.safetensors"]
    assert set(library.corrupt) == {"truncated.safetensors", "garbage.safetensors", "pickled.ckpt", "no_lora.safetensors"}
    assert "truncated" in library.corrupt["truncated.safetensors"].reason
    assert "pickled" in library.corrupt["pickled.ckpt"].reason
    assert "no LoRA tensors" in library.corrupt["no_lora.safetensors"].reason
    assert all("\n" not in entry.reason for entry in library.corrupt.values())
    assert not open_library(folder).changes.any, "unchanged corrupt files are remembered, not re-read"

    (folder / INDEX_FILE).write_text("{ half-written")
    rebuilt = open_library(folder)
    assert rebuilt.changes.rebuilt and list(rebuilt.entries) == ["good.safetensors"] and len(rebuilt.corrupt) == 4
    assert json.loads((folder / INDEX_FILE).read_text())["format"] == 1


# ------------------------------------------------------------------------------------ tier 1: training-free


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


def test_read_only_library_is_used_without_its_index(library_dir, tmp_path, caplog):
    folder = tmp_path / "ro"
    folder.mkdir()
    with_metadata(library_dir / "lora00.safetensors", folder / "fox.safetensors")
    (tmp_path / "a-file").write_text("not a folder")
    library = open_library(folder, index_path=tmp_path / "a-file" / INDEX_FILE)
    assert list(library.entries) == ["fox.safetensors"] and "cannot write the LoRA library index" in caplog.text


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


# ------------------------------------------------------------------------------------ tier 2: weight encoder


def test_weight_retriever_recall_on_held_out_prompts_is_far_above_chance(trained_retriever, library_dir, embedder):
    library = open_library(library_dir)
    queries = {f"lora{index:02d}.safetensors": [template.format(subject) for template in HELD_OUT_TEMPLATES]
               for index, subject in enumerate(SUBJECTS)}
    report = evaluate_retriever(trained_retriever.retriever, library, embedder, queries, ks=(1, 3))
    untrained = evaluate_retriever(WeightRetriever(trained_retriever.retriever.config), library, embedder, queries)
    history = trained_retriever.history
    print(f"\nweight retriever: {report.loras} LoRAs, {report.queries} held-out prompts; recall@1 {report.recall[1]:.3f} "
          f"(chance {report.chance[1]:.3f}, untrained {untrained.recall[1]:.3f}), recall@3 {report.recall[3]:.3f} "
          f"(chance {report.chance[3]:.3f}); "
          f"InfoNCE {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f} in {len(history)} steps, "
          f"{trained_retriever.train_seconds:.1f} s")
    assert report.queries == 24 and report.chance[1] == pytest.approx(1 / 12)
    assert report.recall[1] >= 0.75, "recall@1 must be far above the 1/12 chance level"
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]


def test_retriever_file_round_trip_and_tier_two_ranking(trained_retriever, library_dir, embedder):
    library = open_library(library_dir)
    paths = [library.path_of(entry) for entry in library.sorted_entries()]
    loaded = load_retriever(trained_retriever.path)
    torch.testing.assert_close(loaded.embed_files(paths), trained_retriever.retriever.embed_files(paths), rtol=0, atol=0)
    ranked = rank_loras("a white cat sleeping on a sofa", library, embedder, top_k=1, retriever=loaded)
    assert ranked[0].entry.file == "lora11.safetensors" and not ranked[0].trigger_match
    assert [path.name for path in sorted(trained_retriever.work_dir.iterdir())] == ["step-000030", "step-000060"]


def test_retriever_resume_continues_the_same_run(library_dir, embedder, tmp_path):
    straight = train_retriever(RetrieverTrainingSettings(library_dir, tmp_path / "a.safetensors", steps=6,
                                                         checkpoint_every=3, **RETRIEVER), embedder=embedder)
    first = RetrieverTrainingSettings(library_dir, tmp_path / "b.safetensors", steps=3, checkpoint_every=3, **RETRIEVER)
    train_retriever(first, embedder=embedder)
    with pytest.raises(UserError, match="--resume"):
        train_retriever(RetrieverTrainingSettings(library_dir, tmp_path / "b.safetensors", steps=6, **RETRIEVER),
                        embedder=embedder)
    resumed = train_retriever(RetrieverTrainingSettings(library_dir, tmp_path / "b.safetensors", steps=6,
                                                        checkpoint_every=3, resume=True, **RETRIEVER), embedder=embedder)
    assert resumed.resumed_from == 3 and len(resumed.history) == 6
    assert [row["loss"] for row in resumed.history] == pytest.approx([row["loss"] for row in straight.history], abs=1e-5)
    for key, value in straight.retriever.state_dict().items():
        torch.testing.assert_close(resumed.retriever.state_dict()[key], value, rtol=0, atol=1e-5)


def test_lora_factors_carry_alpha_over_rank(sd15_lora_files, tmp_path):
    from loracompose.assets.tiny import write_kohya_lora

    factors = read_unet_factors(sd15_lora_files[0])
    kohya = read_unet_factors(write_kohya_lora(sd15_lora_files[0], tmp_path / "kohya.safetensors"))
    assert set(kohya) == set(factors) and len(factors) == 48
    state = load_file(sd15_lora_files[0])
    down, up = factors[PROBED_LAYER]
    torch.testing.assert_close(up, state[f"unet.{PROBED_LAYER}.lora_B.weight"] * 1.0)  # alpha = rank = 4
    torch.testing.assert_close(kohya[PROBED_LAYER][1], up)
    recall = recall_at_k(torch.eye(3), torch.eye(3)[[2, 1, 0]], [2, 1, 0], ks=(1, 2))
    assert recall.recall == {1: 1.0, 2: 1.0} and recall.chance == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}


# ------------------------------------------------------------------------------------ gated fusion


@pytest.mark.parametrize("model,files", [("sd15", "sd15_lora_files"), ("sdxl", "sdxl_lora_files")])
def test_open_gates_equal_merge_exactly(model, files, request):
    pipe = request.getfixturevalue(model)
    specs = [LoraSpec(path, weight) for path, weight in zip(request.getfixturevalue(files), (0.8, 1.0))]
    merged = pipe.generate(PROMPT, specs, Merge(), steps=2, **COMMON)
    gated = pipe.generate(PROMPT, specs, AutoLoRA(), steps=2, **COMMON)
    base = pipe.generate(PROMPT, [], Merge(), steps=2, **COMMON)
    assert torch.equal(gated.latents, merged.latents)
    assert (merged.latents - base.latents).abs().max() > 1e-2, "the LoRAs change the result"
    assert gated.stats.unet_calls == 2 and gated.method["name"] == "autolora"
    assert not any("forward" in module.__dict__ for module in pipe.unet.modules()), "PEFT forwards restored"


class OneClosedGate(AutoLoRA):
    """AutoLoRA with open gates except one (layer, LoRA) gate held at 0."""

    closed = (PROBED_LAYER, "a_char")

    def layer_gates(self, layer, adapters, base, deltas):
        gates = list(super().layer_gates(layer, adapters, base, deltas))
        if layer == self.closed[0]:
            gates[list(adapters).index(self.closed[1])] = torch.zeros(())
        return gates


def test_one_closed_gate_equals_the_run_without_that_lora_on_that_layer(sd15, sd15_lora_files, tmp_path):
    cut = with_metadata(sd15_lora_files[0], tmp_path / "cut.safetensors", zero=lambda key: PROBED_LAYER in key)
    style = LoraSpec(sd15_lora_files[1], name="b_style")
    closed = sd15.generate(PROMPT, [LoraSpec(sd15_lora_files[0], name="a_char"), style], OneClosedGate(), steps=2,
                           **COMMON)
    without = sd15.generate(PROMPT, [LoraSpec(cut, name="a_char_cut"), style], Merge(), steps=2, **COMMON)
    merged = sd15.generate(PROMPT, [LoraSpec(sd15_lora_files[0], name="a_char"), style], Merge(), steps=2, **COMMON)
    assert torch.equal(closed.latents, without.latents)
    assert (closed.latents - merged.latents).abs().max() > 1e-4, "that one layer matters"


def random_gates(channels, variant="full", seed=0) -> GateSet:
    gates = GateSet(channels, variant)
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in gates.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=rng))
    return gates


def layer_norm(value: torch.Tensor) -> torch.Tensor:
    mean = value.mean(-1, keepdim=True)
    return (value - mean) / torch.sqrt(((value - mean) ** 2).mean(-1, keepdim=True) + 1e-5)


@pytest.mark.parametrize("variant", ["full", "no_base", "no_cross"])
def test_gate_formula_equals_its_explicit_computation(variant):
    gate = random_gates({"layer": 16}, variant, seed=3).gate("layer")
    base, delta = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    h, d = layer_norm(base), layer_norm(delta)
    terms = {"full": gate.w_base * h + gate.w_lora * d + gate.w_cross * h * d, "no_base": gate.w_lora * d + gate.w_cross * h * d,
             "no_cross": gate.w_lora * d}[variant]
    expected = gate.w_out * torch.sigmoid(terms + gate.bias)
    torch.testing.assert_close(gate(base, delta), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(LayerGate(16)(base, delta), torch.ones(2, 5, 16)), "an untrained gate is exactly open"


def test_gated_layer_output_equals_h_plus_sum_of_gated_deltas(sd15, sd15_lora_files):
    loras = sd15.prepare_loras([LoraSpec(path) for path in sd15_lora_files])
    controller = AdapterController({"unet": sd15.unet})
    controller.activate({"character": 0.8, "style": 1.0})
    layer = sd15.unet.get_submodule(PROBED_LAYER)
    gates = random_gates(lora_layer_channels(sd15.unet), seed=5)
    fusion = GatedFusion(sd15.unet, lambda name, adapters, base, deltas: gates.gate(name).gates(base, deltas))
    try:
        x = torch.randn(2, 7, layer.in_features)
        with torch.no_grad():
            output = layer(x)
            h = x @ layer.base_layer.weight.T + (0 if layer.base_layer.bias is None else layer.base_layer.bias)
            expected = h.clone()
            for lora, weight in zip(loras, (0.8, 1.0)):
                a, b = layer.lora_A[lora.name].weight, layer.lora_B[lora.name].weight
                delta = weight * (4 / 4) * (x @ a.T @ b.T)
                g = gates.gate(PROBED_LAYER)
                expected += g.w_out * torch.sigmoid(g.w_base * layer_norm(h) + g.w_lora * layer_norm(delta)
                                                    + g.w_cross * layer_norm(h) * layer_norm(delta) + g.bias) * delta
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
    finally:
        fusion.restore()
        controller.activate({})


def test_gate_file_round_trip_changes_the_result(sd15, sd15_lora_files, tmp_path):
    specs = [LoraSpec(path) for path in sd15_lora_files]
    sd15.prepare_loras(specs)
    path = save_gates(random_gates(lora_layer_channels(sd15.unet, ["character", "style"]), seed=1),
                      tmp_path / "gates.safetensors")
    merged = sd15.generate(PROMPT, specs, Merge(), steps=2, **COMMON)
    gated = sd15.generate(PROMPT, specs, AutoLoRA(gates=str(path)), steps=2, **COMMON)
    again = sd15.generate(PROMPT, specs, AutoLoRA(gates=str(path)), steps=2, **COMMON)
    assert torch.equal(gated.latents, again.latents)
    assert (gated.latents - merged.latents).abs().max() > 1e-3
    assert gated.method["gates"] == str(path)


def test_train_gates_writes_loadable_gates_and_resumes(tiny_sd15_dir, sd15, sd15_lora_files, tmp_path):
    def settings(out, steps, **extra):
        return GateTrainingSettings(str(tiny_sd15_dir), sd15_lora_files, out, steps=steps, checkpoint_every=2,
                                    showcase_steps=1, learning_rate=1e-2, resolution=32, show_progress=False,
                                    **extra)

    straight = train_gates(settings(tmp_path / "a.safetensors", 4))
    assert len(straight.history) == 4 and {"loss", "mse", "hinge"} <= set(straight.history[-1])
    assert sorted(path.name for path in straight.work_dir.iterdir()) == ["showcase", "step-000002", "step-000004"]
    train_gates(settings(tmp_path / "b.safetensors", 2, work_dir=tmp_path / "b-work"))
    resumed = train_gates(settings(tmp_path / "b.safetensors", 4, work_dir=tmp_path / "b-work", resume=True))
    assert resumed.resumed_from == 2
    trained, again = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert trained.keys() == again.keys() and len(trained) == 5 * 48
    for key, value in trained.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6)
    specs = [LoraSpec(path) for path in sd15_lora_files]
    merged = sd15.generate(PROMPT, specs, Merge(), steps=2, **COMMON)
    gated = sd15.generate(PROMPT, specs, AutoLoRA(gates=str(straight.path)), steps=2, **COMMON)
    assert (gated.latents - merged.latents).abs().max() > 1e-5, "trained gates are no longer the plain sum"


# ------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_are_one_line_user_errors(sd15, sd15_lora_files, library_dir, embedder, tmp_path):
    specs = [LoraSpec(path) for path in sd15_lora_files]
    library = open_library(library_dir)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "gates.pt").write_bytes(b"x")
    other_model_gates = save_gates(GateSet({"not.a.layer": 4}), tmp_path / "other.safetensors")
    cases = [
        (lambda: open_library(tmp_path / "missing"), "--library"),
        (lambda: open_library(tmp_path / "file.txt"), "is a file"),
        (lambda: rank_loras("a cat", library, embedder, top_k=0), "--top"),
        (lambda: rank_loras("  ", library, embedder), "prompt is empty"),
        (lambda: load_retriever(tmp_path / "gates.pt"), "safetensors"),
        (lambda: load_retriever(sd15_lora_files[0]), "not a loracompose retriever"),
        (lambda: sd15.generate(PROMPT, specs, AutoLoRA(gates=str(tmp_path / "gates.pt")), steps=1, **COMMON), "safetensors"),
        (lambda: sd15.generate(PROMPT, specs, AutoLoRA(gates=str(sd15_lora_files[0])), steps=1, **COMMON), "gate file"),
        (lambda: sd15.generate(PROMPT, specs, AutoLoRA(gates=str(other_model_gates)), steps=1, **COMMON), "no gate for"),
        (lambda: sd15.generate(PROMPT, [], AutoLoRA(), steps=1, **COMMON), "at least 1 LoRA"),
        (lambda: GateSet({"a": 2}, "sideways"), "variant"),
        (lambda: train_retriever(RetrieverTrainingSettings(library_dir, tmp_path / "r.pt", **RETRIEVER), embedder), ".safetensors"),
        (lambda: train_retriever(RetrieverTrainingSettings(library_dir, tmp_path / "r.safetensors",
                                                           **(RETRIEVER | {"batch_size": 1})), embedder), "--batch-size"),
        (lambda: train_retriever(RetrieverTrainingSettings(library_dir, tmp_path / "r.safetensors", **RETRIEVER)), "--model"),
        (lambda: train_gates(GateTrainingSettings("m", sd15_lora_files, tmp_path / "g.safetensors", variant="x")), "variant"),
        (lambda: train_gates(GateTrainingSettings("m", sd15_lora_files, tmp_path / "g.safetensors", caption_dropout=1)),
         "--caption-dropout"),
    ]
    for call, match in cases:
        with pytest.raises(UserError, match=match) as caught:
            call()
        assert "\n" not in str(caught.value)
    assert not any("forward" in module.__dict__ for module in sd15.unet.modules())


def test_ranked_lora_json(library_dir):
    entry = open_library(library_dir).sorted_entries()[0]
    assert RankedLora(entry, 2.5, 0.5, True).to_json() == {
        "file": "lora00.safetensors", "name": "0", "category": "character", "score": 2.5, "similarity": 0.5,
        "trigger_match": True}


# ------------------------------------------------------------------------------------ command line


def test_cli_retrieve_and_generate_with_auto_loras(tiny_sd15_dir, library_dir, tmp_path, capsys):
    from loracompose.cli.main import main

    model = ["--model", str(tiny_sd15_dir)]
    assert main(["retrieve", "a photo of trg3 at dusk", "--library", str(library_dir), "--top", "2", "--json", *model]) == 0
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
