"""The LoRA library index (loracompose.library) that retrieval ranks: metadata, changes, corrupt files, bad folders."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from helpers import assert_one_line_user_errors, with_metadata
from loracompose.library import INDEX_FILE, open_library


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
    assert set(library.corrupt) == {"truncated.safetensors", "garbage.safetensors", "pickled.ckpt",
                                    "no_lora.safetensors"}
    assert "truncated" in library.corrupt["truncated.safetensors"].reason
    assert "pickled" in library.corrupt["pickled.ckpt"].reason
    assert "no LoRA tensors" in library.corrupt["no_lora.safetensors"].reason
    assert all("\n" not in entry.reason for entry in library.corrupt.values())
    assert not open_library(folder).changes.any, "unchanged corrupt files are remembered, not re-read"

    (folder / INDEX_FILE).write_text("{ half-written")
    rebuilt = open_library(folder)
    assert rebuilt.changes.rebuilt and list(rebuilt.entries) == ["good.safetensors"] and len(rebuilt.corrupt) == 4
    assert json.loads((folder / INDEX_FILE).read_text())["format"] == 1


def test_read_only_library_is_used_without_its_index(library_dir, tmp_path, caplog):
    folder = tmp_path / "ro"
    folder.mkdir()
    with_metadata(library_dir / "lora00.safetensors", folder / "fox.safetensors")
    (tmp_path / "a-file").write_text("not a folder")
    library = open_library(folder, index_path=tmp_path / "a-file" / INDEX_FILE)
    assert list(library.entries) == ["fox.safetensors"] and "cannot write the LoRA library index" in caplog.text


def test_bad_library_folders_are_one_line_user_errors(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    assert_one_line_user_errors([
        (lambda: open_library(tmp_path / "missing"), "--library"),
        (lambda: open_library(tmp_path / "file.txt"), "is a file"),
    ])
