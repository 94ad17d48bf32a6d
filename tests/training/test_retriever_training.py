"""Training the weight-encoding retriever (loracompose.training.retriever): recall on held-out prompts, the
file and tier-2 ranking, exact resuming, bad settings."""

from __future__ import annotations

import pytest
import torch

from helpers import HELD_OUT_TEMPLATES, SUBJECTS, assert_one_line_user_errors
from loracompose import UserError
from loracompose.library import open_library
from loracompose.retrieval import WeightRetriever, evaluate_retriever, load_retriever, rank_loras
from loracompose.training.retriever import RetrieverTrainingSettings, train_retriever


RETRIEVER = dict(width=64, depth=2, heads=4, mlp=128, batch_size=12, learning_rate=3e-3, temperature=0.07,
                 show_progress=False)


@pytest.fixture(scope="module")
def trained_retriever(library_dir, embedder, tmp_path_factory):
    out = tmp_path_factory.mktemp("retriever") / "retriever.safetensors"
    return train_retriever(RetrieverTrainingSettings(library_dir, out, steps=60, checkpoint_every=30, **RETRIEVER),
                           embedder=embedder)


def test_weight_retriever_recall_on_held_out_prompts_is_far_above_chance(trained_retriever, library_dir, embedder):
    library = open_library(library_dir)
    queries = {f"lora{index:02d}.safetensors": [template.format(subject) for template in HELD_OUT_TEMPLATES]
               for index, subject in enumerate(SUBJECTS)}
    report = evaluate_retriever(trained_retriever.retriever, library, embedder, queries, ks=(1, 3))
    untrained = evaluate_retriever(WeightRetriever(trained_retriever.retriever.config), library, embedder, queries)
    history = trained_retriever.history
    print(f"\nweight retriever: {report.loras} LoRAs, {report.queries} held-out prompts; "
          f"recall@1 {report.recall[1]:.3f} "
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
    expected = trained_retriever.retriever.embed_files(paths)
    torch.testing.assert_close(loaded.embed_files(paths), expected, rtol=0, atol=0)
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
                                                        checkpoint_every=3, resume=True, **RETRIEVER),
                              embedder=embedder)
    assert resumed.resumed_from == 3 and len(resumed.history) == 6
    straight_losses = [row["loss"] for row in straight.history]
    assert [row["loss"] for row in resumed.history] == pytest.approx(straight_losses, abs=1e-5)
    for key, value in straight.retriever.state_dict().items():
        torch.testing.assert_close(resumed.retriever.state_dict()[key], value, rtol=0, atol=1e-5)


def test_bad_retriever_training_settings_are_one_line_user_errors(library_dir, embedder, tmp_path):
    def settings(out, **extra):
        return RetrieverTrainingSettings(library_dir, tmp_path / out, **(RETRIEVER | extra))

    assert_one_line_user_errors([
        (lambda: train_retriever(settings("r.pt"), embedder), ".safetensors"),
        (lambda: train_retriever(settings("r.safetensors", batch_size=1), embedder), "--batch-size"),
        (lambda: train_retriever(settings("r.safetensors")), "--model"),
    ])
