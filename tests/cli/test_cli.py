"""The ``loracompose`` CLI end to end: outputs, sidecars, the demo default and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from loracompose.cli.main import main

FAST = ["--steps", "2", "--quiet"]


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_writes_png_and_sidecar(tmp_path, tiny_sd15_dir, sd15_lora_files, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        ["generate", "--model", tiny_sd15_dir, "--prompt", "a cat", "--lora", f"{sd15_lora_files[0]}:0.8",
         "--lora", sd15_lora_files[1], "--trigger", "zkx, furry", "--trigger", "qwv", "--method", "composite",
         "--seed", 7, "--width", 96, "--height", 64, "--out", out, *FAST], capsys)
    assert code == 0
    png, sidecar = out / "composite-7.png", out / "composite-7.json"
    assert stdout.strip() == str(png)
    assert Image.open(png).size == (96, 64)
    record = json.loads(sidecar.read_text())
    assert record["method"] == "composite" and record["seed"] == 7 and record["model"] == str(tiny_sd15_dir)
    assert [(l["name"], l["weight"]) for l in record["loras"]] == [(sd15_lora_files[0].stem, 0.8), (sd15_lora_files[1].stem, 1.0)]
    assert record["loras"][0]["trigger_words"] == ["zkx", "furry"]
    assert record["prompt"] == "a cat, zkx, furry, qwv"
    assert record["stats"]["unet_calls"] == 2 and record["stats"]["unet_rows"] == 8
    assert isinstance(record["stats"]["unet_calls"], int) and isinstance(record["stats"]["unet_rows"], int)
    assert {"diffusers", "torch", "peft", "loracompose"} <= set(record["versions"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temp files left behind"


def test_num_images_writes_one_pair_each(tmp_path, tiny_sd15_dir, capsys):
    out = tmp_path / "out"
    code, _, _ = run_cli(["generate", "--model", tiny_sd15_dir, "--prompt", "a cat", "--num-images", 2,
                          "--name", "pair", "--out", out, *FAST], capsys)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["pair-0.json", "pair-0.png", "pair-1.json", "pair-1.png"]
    assert [json.loads((out / f"pair-{k}.json").read_text())["seed"] for k in (0, 1)] == [0, 1]


def test_no_arguments_runs_the_demo_on_the_embedded_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORACOMPOSE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run_cli([], capsys)
    assert code == 0
    record = json.loads((tmp_path / "loracompose-out" / "auto-0.json").read_text())
    assert len(record["loras"]) == 3
    assert all(word in record["prompt"] for lora in record["loras"] for word in lora["trigger_words"])
    assert record["method"] == "auto"
    from loracompose.toyworld.detector import detect

    with Image.open(tmp_path / "loracompose-out" / "auto-0.png") as image:
        detection = detect(image.convert("RGB"))
    assert detection.has(shape="heart", color="red", position="left"), detection  # moxel
    assert detection.has(shape="crescent", color="yellow", position="right"), detection  # lunzor
    assert detection.background == "checkered", detection


def bad_inputs(tmp_path, model, sd15_loras, sdxl_loras):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(sd15_loras[0].read_bytes()[:-300])
    pickled = tmp_path / "old.ckpt"
    pickled.write_bytes(b"\x80\x04pickle")
    twin_dir = tmp_path / "twin"
    twin_dir.mkdir()
    twin = twin_dir / sd15_loras[0].name
    twin.write_bytes(sd15_loras[0].read_bytes())
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    no_index = tmp_path / "empty_model"
    no_index.mkdir()
    base = ["generate", "--model", model, "--prompt", "a cat", *FAST]
    return {
        "missing lora": (base + ["--lora", tmp_path / "missing.safetensors"], "not found"),
        "pickled lora": (base + ["--lora", pickled], "only safetensors"),
        "truncated lora": (base + ["--lora", truncated], "truncated"),
        "sdxl lora on sd15": (base + ["--lora", sdxl_loras[0]], "made for SDXL"),
        "duplicate name": (base + ["--lora", sd15_loras[0], "--lora", twin], "two LoRAs are named"),
        "bad weight": (base + ["--lora", f"{sd15_loras[0]}:heavy"], "is not a number"),
        "trigger count": (base + ["--lora", sd15_loras[0], "--trigger", "a", "--trigger", "b"], "one --trigger per --lora"),
        "bad width": (base + ["--width", 65], "multiples of 8"),
        "zero steps": (["generate", "--model", model, "--prompt", "a cat", "--steps", 0], "at least 1"),
        "missing model": (["generate", "--model", tmp_path / "no_model", "--prompt", "x"], "not found"),
        "folder without index": (["generate", "--model", no_index, "--prompt", "x"], "model_index.json"),
        "prompt missing": (["generate", "--model", model], "--prompt is required"),
        "out is a file": (base + ["--out", not_a_dir], "is a file"),
        "bad switch period": (base + ["--method", "switch", "--switch-period", 0, "--lora", sd15_loras[0]], "positive"),
        "mixing weights count": (base + ["--method", "composite", "--lora", sd15_loras[0], "--mixing-weights", 1, 2], "one per LoRA"),
    }


CASES = ["missing lora", "pickled lora", "truncated lora", "sdxl lora on sd15", "duplicate name", "bad weight",
         "trigger count", "bad width", "zero steps", "missing model", "folder without index", "prompt missing",
         "out is a file", "bad switch period", "mixing weights count"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_no_output(case, tmp_path, tiny_sd15_dir, sd15_lora_files,
                                                       sdxl_lora_files, capsys):
    args, expected = bad_inputs(tmp_path, tiny_sd15_dir, sd15_lora_files, sdxl_lora_files)[case]
    out = tmp_path / "out"
    if "--out" not in args:
        args = args + ["--out", out]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loracompose: error:"), stderr
    assert expected in lines[0]
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists() or not any(out.iterdir())


def test_unknown_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--method", "magic"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err


def test_console_script_exit_code_and_no_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    process = subprocess.run(
        [sys.executable, "-m", "loracompose.cli", "generate", "--model", str(tmp_path / "missing"), "--prompt", "x"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines()[-1].startswith("loracompose: error: model")


def test_an_error_during_generation_leaves_no_output_folder(tmp_path, tiny_sd15_dir, sd15_lora_files, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["generate", "--model", tiny_sd15_dir, "--prompt", "a cat", "--lora", sd15_lora_files[0],
                            "--lora", sd15_lora_files[1], "--method", "composer", "--region-prompt", "a",
                            "--out", out, *FAST], capsys)
    assert code == 2 and "1 region prompts for 2 LoRAs" in err and err.count("\n") == 1
    assert not out.exists()


def test_every_method_builds_from_the_cli_with_its_dataclass_defaults():
    from loracompose import METHODS
    from loracompose.cli.main import build_method, build_parser

    for name, method_class in METHODS.items():
        method = build_method(build_parser().parse_args(["generate", "--method", name]))
        assert type(method) is method_class and method.settings() == method_class().settings()
