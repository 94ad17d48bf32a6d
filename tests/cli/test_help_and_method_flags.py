"""The command line's help is cheap and tidy, its usage errors are one line, and a method's flags come
from its dataclass fields alone (a new method needs no CLI code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
from PIL import Image

from loracompose.cli.main import COMMANDS, main
from loracompose.methods import METHODS
from loracompose.methods.merge import Merge

MODEL_STACK = ("torch", "diffusers", "transformers", "peft", "gradio", "open_clip")
FAST = ["--steps", "2", "--width", "64", "--height", "64", "--quiet"]


def run_python(code: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    return process, time.perf_counter() - started


def test_every_help_loads_no_model_stack_and_is_faster_than_importing_torch():
    commands = [[], *([name] for name in COMMANDS)]
    code = f"""
import sys
from loracompose.cli.main import main
for command in {commands!r}:
    try:
        main([*command, "--help"])
    except SystemExit as stop:
        assert stop.code == 0, (command, stop.code)
print(sorted(name for name in {MODEL_STACK!r} if name in sys.modules))
"""
    process, _ = run_python(code)
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip().splitlines()[-1] == "[]", "help imported the model stack"
    help_run, help_seconds = run_python("from loracompose.cli.main import main; main(['generate', '--help'])")
    torch_run, torch_seconds = run_python("import torch")
    assert help_run.returncode == 0 and "--merge-combine" in help_run.stdout
    assert torch_run.returncode == 0
    assert help_seconds < torch_seconds, f"generate --help: {help_seconds:.1f} s, import torch: {torch_seconds:.1f} s"


def test_console_module_help_exits_0():
    process = subprocess.run([sys.executable, "-m", "loracompose.cli", "--help"], capture_output=True, text=True,
                             timeout=300)
    assert process.returncode == 0 and "generate" in process.stdout


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--method", "nosuch"], "argument --method: invalid choice: 'nosuch'"),
    (["generate", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["generate", "--method", "cmlora", "--cmlora-class", "park=middle"],
     "--cmlora-class 'park=middle': give NAME=VALUE with VALUE one of high, low"),
    (["generate", "--method", "clora", "--clora-iterative-steps", "0,x"], "--clora-iterative-steps '0,x': give numbers"),
    (["generate", "--method", "switch", "--switch-period", "often"], "--switch-period 'often': give a whole number"),
    (["generate", "--method", "composer", "--box", "0,0,2,1"], "--box '0,0,2,1' is outside the image"),
    (["nosuch"], "argument COMMAND: invalid choice: 'nosuch'"),
])
def test_usage_errors_are_one_line_with_exit_2(argv, expected, capsys):
    try:
        code = main(argv)  # a method setting's text is checked after parsing
    except SystemExit as stop:  # argparse's own checks
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.endswith("(see --help)\n"), err
    assert err.startswith(f"loracompose{' generate' if argv[0] == 'generate' else ''}: error: ")
    assert expected in err


def test_a_flag_of_another_method_is_a_one_line_usage_error(capsys):
    assert main(["generate", "--method", "merge", "--box", "0,0,1,1"]) == 2
    err = capsys.readouterr().err
    assert err == "loracompose generate: error: --box is a setting of composer, tara, regional, not of " \
                  "--method merge (see --help)\n"


def test_generate_help_groups_flags_by_method_and_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = capsys.readouterr().out
    titles = ["generation:", *(f"{name} (--method {name}):" for name in METHODS), "settings of several methods:"]
    positions = [help_text.index(title) for title in titles]
    assert positions == sorted(positions)
    merge_group = help_text[help_text.index("merge (--method merge):"):help_text.index("switch (--method switch):")]
    assert "--merge-combine {sum,mean}" in merge_group and "(default: sum)" in merge_group
    assert "--seed SEED" in help_text and "(default: 0)" in help_text
    shared = help_text[help_text.index("settings of several methods:"):]
    for flag in ("--fuse", "--sequential", "--switch-period", "--cmlora-class", "--cmlora-threshold"):
        assert flag in shared


def test_readme_flags_keep_their_meaning():
    from loracompose.cli.main import build_method, build_parser

    def method(*argv: str):
        return build_method(build_parser().parse_args(["generate", *argv]))

    assert method("--method", "merge", "--fuse", "--merge-combine", "mean") == Merge(combine="mean", fuse=True)
    assert method("--method", "tara", "--fuse", "--tara-self-attention", "cond").fuse is True
    assert method("--method", "switch", "--switch-period", "3").period == 3
    assert method("--method", "cmlora-switch", "--switch-period", "2").period == 2
    cmlora = method("--method", "cmlora", "--sequential", "--cmlora-class", "a=high", "--cmlora-class", "b=low",
                    "--cmlora-cache-interval", "2")
    assert (cmlora.batched, cmlora.frequency_classes, cmlora.cache_interval) == (False, {"a": "high", "b": "low"}, 2)
    clora = method("--method", "clora", "--clora-no-update", "--clora-subject", "cat", "--clora-lora-prompt", "a, b",
                   "--clora-iterative-steps", "0,5")
    assert (clora.latent_update, clora.subjects, clora.prompts, clora.iterative_steps) == \
        (False, ("cat",), ("a, b",), (0, 5))
    composer = method("--method", "composer", "--box", "0,0,0.5,1", "--box", "0.5,0,1,1", "--region-prompt", "x",
                      "--region-prompt", "", "--composer-no-checkpointing")
    assert [(box.x0, box.y0, box.x1, box.y1) for box in composer.boxes] == [(0, 0, 0.5, 1), (0.5, 0, 1, 1)]
    assert (composer.region_prompts, composer.checkpoint_refinement) == (("x", ""), False)
    assert method("--method", "autolora", "--autolora-gates", "g.safetensors").gates == "g.safetensors"
    assert method("--method", "composite", "--mixing-weights", "1", "3").mixing_weights == (1.0, 3.0)


@dataclass
class Dimmed(Merge):
    """Merge with every LoRA's strength scaled (a method written for this test only)."""

    name: ClassVar[str] = "dimmed"
    scale: float = field(default=1.0, metadata={"help": "factor on every LoRA's strength"})

    def merged_branch(self):
        return self.branch(*self.loras, weights=[lora.weight * self.scale for lora in self.loras])


def test_a_new_method_gets_flags_and_runs_from_the_cli_without_cli_code(tmp_path, tiny_sd15_dir, sd15_lora_files,
                                                                      monkeypatch, capsys):
    monkeypatch.setitem(METHODS, Dimmed.name, Dimmed)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = capsys.readouterr().out
    group = help_text[help_text.index("dimmed (--method dimmed):"):]
    assert "--dimmed-scale SCALE" in group and "factor on every LoRA's strength (default: 1)" in group
    assert "--dimmed-combine {sum,mean}" in group  # inherited settings come along

    base = ["generate", "--model", tiny_sd15_dir, "--prompt", "a zkx cat", "--out", tmp_path, *FAST]
    assert main([str(a) for a in [*base, "--lora", sd15_lora_files[0], "--method", "dimmed", "--dimmed-scale", "0.5",
                                  "--name", "dimmed"]]) == 0
    assert main([str(a) for a in [*base, "--lora", f"{sd15_lora_files[0]}:0.5", "--method", "merge",
                                  "--name", "merge"]]) == 0
    dimmed, merged = Image.open(tmp_path / "dimmed.png"), Image.open(tmp_path / "merge.png")
    assert list(dimmed.getdata()) == list(merged.getdata()), "scale 0.5 is Merge at half strength"
    assert main([str(a) for a in [*base, "--lora", sd15_lora_files[0], "--method", "dimmed", "--name", "full"]]) == 0
    assert list(Image.open(tmp_path / "full.png").getdata()) != list(merged.getdata())
    record = json.loads((tmp_path / "dimmed.json").read_text())
    assert record["method"] == "dimmed" and record["method_settings"]["scale"] == 0.5
