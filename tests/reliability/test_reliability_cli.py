"""Bad and hostile command lines: each is one ``error:`` line on stderr, exit status 2, no traceback, no
library chatter, and nothing written (issue 21's cases and more)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hostile_files import fifo, misshapen_lora, poisoned_lora, sparse_huge_lora
from PIL import Image

from loracompose.cli.main import main

FAST = ["--steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, sd15_lora_files) -> dict[str, Path]:
    """Every hostile file of the catalogue, built once."""
    folder = tmp_path_factory.mktemp("hostile")
    lora = sd15_lora_files[0]
    weird = folder / "weird:name.safetensors"
    shutil.copyfile(lora, weird)
    (folder / "a-folder.safetensors").mkdir()
    built = {
        "lora": lora, "second": sd15_lora_files[1], "weird": weird, "folder": folder / "a-folder.safetensors",
        "inf": poisoned_lora(lora, folder / "inf.safetensors", float("inf")),
        "nan": poisoned_lora(lora, folder / "nan.safetensors", float("nan")),
        "misshapen": misshapen_lora(lora, folder / "misshapen.safetensors"),
        "fifo": fifo(folder / "fifo.safetensors"),
        "sparse": sparse_huge_lora(folder / "huge.safetensors"),
    }
    return built


def cases(model: Path, files: dict[str, Path]) -> dict[str, tuple[list, str]]:
    """case -> (arguments, what the one error line says)."""
    base = ["generate", "--model", model, "--prompt", "a cat", "--method", "merge", *FAST]
    lora = files["lora"]
    two = ["generate", "--model", model, "--prompt", "a cat", *FAST, "--lora", lora, "--lora", files["second"]]
    return {
        "device tpu9": ([*base, "--device", "tpu9"], "device 'tpu9' is not a device name"),
        "seed 2**70": ([*base, "--seed", 2 ** 70], f"seed={2**70} is out of range; use 0 to"),
        "seed -1": ([*base, "--seed", -1], "seed=-1 is out of range"),
        "last seed overflows": ([*base, "--seed", 2 ** 64 - 1, "--num-images", 2], "is out of range; use 0 to"),
        "name in a sub-folder": ([*base, "--name", "sub/x"], "--name 'sub/x': give a plain file name"),
        "name climbing out": ([*base, "--name", "../../x"], "--name '../../x': give a plain file name"),
        "hidden name": ([*base, "--name", ".x"], "give a plain file name"),
        "empty name": ([*base, "--name", ""], "give a plain file name"),
        "fifo lora": ([*base, "--lora", files["fifo"]], "is not a regular file"),
        "fifo model": (["generate", "--model", files["fifo"], "--prompt", "x", *FAST], "is not a regular file"),
        "folder as lora": ([*base, "--lora", files["folder"]], "is a folder"),
        "misshapen lora": ([*base, "--lora", files["misshapen"]], "does not fit layer"),
        "model is a lora": (["generate", "--model", lora, "--prompt", "x", *FAST], "is a LoRA file, not a model"),
        "box with merge": ([*base, "--box", "0,0,0.5,1"], "--box is a setting of"),
        "width 0": ([*base, "--width", 0], "width=0: image sizes must be positive multiples of 8"),
        "height -8": ([*base, "--height", -8], "height=-8: image sizes must be positive multiples of 8"),
        "width 65": ([*base, "--width", 65], "multiples of 8"),
        "max batch rows 0": ([*base, "--max-batch-rows", 0], "max_batch_rows=0 is out of range"),
        "num images 0": ([*base, "--num-images", 0], "num_images=0 is out of range"),
        "steps -1": (["generate", "--model", model, "--prompt", "x", "--steps", -1], "steps=-1 is out of range"),
        "infinite lora": ([*base, "--lora", files["inf"]], "has NaN or infinite values"),
        "nan lora": ([*base, "--lora", files["nan"]], "has NaN or infinite values"),
        "weight inf": ([*base, "--lora", f"{lora}:inf"], "give a finite number"),
        "weight nan": ([*base, "--lora", f"{lora}:nan"], "give a finite number"),
        "weight -1e30": ([*base, "--lora", f"{lora}:-1e30"], "is out of range; use -100 to 100"),
        "guidance inf": ([*base, "--guidance", "inf"], "guidance=inf: give a finite number"),
        "guidance nan": ([*base, "--guidance", "nan"], "guidance=nan: give a finite number"),
        "guidance -1": ([*base, "--guidance", -1], "guidance=-1.0 is out of range"),
        "mixing weights nan": ([*two, "--method", "composite", "--mixing-weights", "nan", "1"], "give a finite number"),
        "mixing weights negative": ([*two, "--method", "composite", "--mixing-weights", "-1", "2"], "is out of range"),
        "width 99992": ([*base, "--width", 99992],
                        "width=99992 is over the image side limit 2048; raise it with --max-side"),
        "steps 100000": (["generate", "--model", model, "--prompt", "x", "--steps", 100000],
                         "steps=100000 is over the step limit 1000; raise it with --max-steps"),
        "profile size 99992": ([*two, "--method", "cmlora", "--cmlora-profile-size", 99992],
                               "--cmlora-profile-size=99992 is over the image side limit 2048; "
                               "raise it with --max-side"),
        "10000 images": ([*base, "--num-images", 10000], "is over the per-call limit 16777216"),
        "16384 square": ([*base, "--width", 16384, "--height", 16384, "--max-side", 16384],
                         "16384x16384 x 1 image(s) = 268435456 pixels is over the per-call limit"),
        "max side 0": ([*base, "--max-side", 0], "--max-side=0 is out of range"),
        "dtype fp8": ([*base, "--dtype", "fp8"], "dtype 'fp8' is not known"),
    }


CASE_NAMES = list(cases(Path("m"), {name: Path(name) for name in (
    "lora", "second", "weird", "folder", "inf", "nan", "misshapen", "fifo", "sparse")}))


def run_cli(args: list, capfd) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capfd.readouterr()  # file-descriptor level: library loggers and progress bars too
    return code, captured.out, captured.err


def assert_one_line_error(code: int, stdout: str, stderr: str, expected: str, out: Path) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith(("loracompose: error: ", "loracompose generate: error: ")), lines[0]
    assert expected in lines[0], lines[0]
    assert stdout == "" and "Traceback" not in stderr
    assert not out.exists() or not any(out.iterdir()), "nothing is written for a refused request"


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_command_line_is_one_line_and_exit_2(case, tiny_sd15_dir, files, tmp_path, capfd):
    args, expected = cases(tiny_sd15_dir, files)[case]
    out = tmp_path / "out"
    code, stdout, stderr = run_cli([*args, "--out", out], capfd)
    assert_one_line_error(code, stdout, stderr, expected, out)
    assert not (tmp_path.parent / "x.png").exists() and not (tmp_path / "x.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu(tiny_sd15_dir, tmp_path, capfd):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["generate", "--model", tiny_sd15_dir, "--prompt", "x", "--device", "cuda",
                                    "--out", out, *FAST], capfd)
    assert_one_line_error(code, stdout, stderr, "device 'cuda': no CUDA GPU is usable on this machine", out)


def test_sparse_file_promising_terabytes(tiny_sd15_dir, files, tmp_path, capfd):
    if files["sparse"] is None:
        pytest.skip("this file system cannot hold a 4 TiB sparse file")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["generate", "--model", tiny_sd15_dir, "--prompt", "x", "--lora", files["sparse"],
                                    "--out", out, *FAST], capfd)
    assert_one_line_error(code, stdout, stderr, "4096.0 GiB of tensors, more than the", out)


def test_a_colon_in_a_lora_file_name_is_part_of_the_name(tiny_sd15_dir, files, tmp_path, capfd):
    """``weird:name.safetensors`` is a file name, not ``weird`` at weight ``name.safetensors``."""
    out = tmp_path / "out"
    code, _stdout, stderr = run_cli(["generate", "--model", tiny_sd15_dir, "--prompt", "x", "--method", "merge",
                                    "--lora", files["weird"], "--name", "colon", "--out", out, *FAST], capfd)
    assert code == 0, stderr
    assert Image.open(out / "colon.png").size == (64, 64)
    assert '"name": "weird_name"' in (out / "colon.json").read_text()


def test_a_raised_limit_lets_the_request_through(tiny_sd15_dir, tmp_path, capfd):
    """The flag an error names does raise the limit: 8 images of 64x64 over a 16384-pixel cap, then raised."""
    args = ["generate", "--model", tiny_sd15_dir, "--prompt", "x", "--method", "merge", "--num-images", 8,
            "--max-pixels", 16384, "--out", tmp_path / "out", *FAST]
    code, _, stderr = run_cli(args, capfd)
    assert code == 2 and "raise it with --max-pixels" in stderr
    code, stdout, stderr = run_cli([*args, "--max-pixels", 8 * 64 * 64], capfd)
    assert code == 0, stderr
    assert len(stdout.splitlines()) == 8
