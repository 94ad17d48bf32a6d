"""The UI's LoRA panel lists a library folder's LoRAs with display name, kind and trigger words.

Oracle: the names, kinds and trigger words written into each file by hand (kohya ``ss_output_name``,
``ss_tag_frequency``, ``ss_trigger_words``), and the kinds the converter reports when it loads the file.
"""

from __future__ import annotations

import json

import pytest
from lora_files import kohya_lora, lokr, loha, write

from loracompose.formats.convert import convert_lora, read_lora_tensors
from loracompose.ui import UiOptions, resolve_settings
from loracompose.ui.app import LoraComposeApp
from loracompose.ui.library import TABLE_HEADERS

COLUMN = {header: index for index, header in enumerate(TABLE_HEADERS)}


@pytest.fixture(scope="module")
def folder(base_pipes, tmp_path_factory):
    pipe, root = base_pipes["sd15"], tmp_path_factory.mktemp("panel")
    (root / "styles").mkdir()
    frequency = {"10_ink": {"inkwash": 10, "mountain": 4}, "5_more": {"inkwash": 5, "river": 5}}
    write(root / "styles" / "ink_v2.safetensors", loha(pipe, "sd15", seed=1)[0],
          {"ss_output_name": "Ink Wash Style", "ss_tag_frequency": json.dumps(frequency)})
    write(root / "hero.safetensors", kohya_lora(pipe, "sd15", seed=2, conv=True, dora="out")[0],
          {"ss_output_name": "Hero Character", "ss_trigger_words": "hrx, red cape"})
    write(root / "plain.safetensors", kohya_lora(pipe, "sd15", seed=3, conv=False)[0])
    write(root / "kron.safetensors", lokr(pipe, "sd15", seed=4, style="w2-decomposed")[0])
    return root


EXPECTED = {  # adapter name -> (display name, kind column, trigger words column)
    "ink_v2": ("Ink Wash Style", "LoHa", "inkwash"),
    "hero": ("Hero Character", "DoRA, LoCon, LoRA", "hrx, red cape"),  # LoCon: LoRA on linear layers too
    "plain": ("plain", "LoRA", ""),
    "kron": ("kron", "LoKr", ""),
}


def test_panel_lists_display_names_kinds_and_triggers(sd15, base_pipes, folder, tmp_path):
    _model, settings = resolve_settings(UiOptions(model=str(tmp_path), library=folder, out=tmp_path / "out"))
    rows = LoraComposeApp(sd15, settings).initial_table()
    listed = {row[COLUMN["LoRA"]]: (row[COLUMN["display name"]], row[COLUMN["kind"]], row[COLUMN["trigger words"]])
              for row in rows}
    assert listed == EXPECTED
    pipe = base_pipes["sd15"]
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    for entry in settings.library:  # the listing's kinds are the converter's
        assert ", ".join(convert_lora(entry.path, *read_lora_tensors(entry.path), components).kinds) == \
            listed[entry.name][1]
    details = next(entry for entry in settings.library if entry.name == "ink_v2").details()
    assert details["display_name"] == "Ink Wash Style" and details["kinds"] == ["LoHa"]
