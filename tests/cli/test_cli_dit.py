"""Every registered method from the CLI on both DiT families (tiny FLUX.1 and SD3 folders on disk), with
exact transformer calls and rows: a method added to ``METHODS`` without a row in ``CHEAPEST`` fails here.

Settings are each method's cheapest that still run its DiT code path (2 steps, 2 LoRAs, 32 px, no
profiling). Counts follow the methods' cost formulas (README, "On FLUX.1 and SD3"); ``r`` is a
branch's rows per step: 1 on FLUX (guidance-distilled), 2 on SD3 (CFG)."""

from __future__ import annotations

import json

import pytest

from helpers import DIT_FAMILIES, dit_rows_per_image, tiny_dits_with_two_loras
from loracompose.cli.main import main
from loracompose.methods import METHODS

STEPS, LORAS, SIZE = 2, 2, 32
TWO_BOXES = ["--box", "0,0,0.5,1", "--box", "0.5,0,1,1"]

# method: (extra CLI flags, (transformer calls, rows) as a function of r)
CHEAPEST = {
    "merge": ([], lambda r: (STEPS, STEPS * r)),
    "switch": ([], lambda r: (STEPS, STEPS * r)),
    "composite": ([], lambda r: (STEPS, STEPS * LORAS * r)),  # one batched call of N branches
    # at 2 steps both steps refresh: one batched full call of N branches each, no shallow pass
    "cmlora": (["--no-cmlora-profile"], lambda r: (STEPS, STEPS * LORAS * r)),
    "cmlora-switch": (["--no-cmlora-switch-profile"], lambda r: (STEPS, STEPS * r)),
    # one latent update at step 0 (a forward of the N+1 conditional rows), then per step a map pass of
    # the N+1 conditional rows and one regional pass
    "clora": (["--clora-iterative-steps", "", "--clora-max-update-step", "1", "--clora-schedule-steps", "0"],
              lambda r: (1 + 2 * STEPS, (LORAS + 1) + STEPS * (LORAS + 1 + r))),
    "composer": ([*TWO_BOXES, "--composer-no-refine", "--composer-no-reinit"], lambda r: (STEPS, STEPS * r)),
    "tara": (["--tara-untokened", "global"], lambda r: (STEPS, STEPS * r)),
    "autolora": ([], lambda r: (STEPS, STEPS * r)),
    "regional": (TWO_BOXES, lambda r: (STEPS, STEPS * r)),
    "auto": (["--auto-probe-steps", "1"], lambda r: (1 + STEPS, (1 + STEPS) * r)),  # its 1-step probe first
}


@pytest.fixture(scope="module")
def dits(tmp_path_factory):
    return tiny_dits_with_two_loras(tmp_path_factory)


@pytest.mark.parametrize("family", DIT_FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_from_the_cli_on_both_dit_families(method, family, dits, tmp_path, capsys):
    extra, expected = CHEAPEST[method]
    model, _, loras = dits[family]
    out = tmp_path / "out"
    code = main(["generate", "--model", str(model), "--prompt", "a cat on a mat", "--lora", str(loras[0]),
                 "--lora", str(loras[1]), "--method", method, *extra, "--width", str(SIZE), "--height", str(SIZE),
                 "--steps", str(STEPS), "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / f"{method}-0.png").exists()
    stats = json.loads((out / f"{method}-0.json").read_text())["stats"]
    calls, rows = expected(dit_rows_per_image(family))
    assert (stats["unet_calls"], stats["unet_rows"]) == (calls, rows)
    assert f"{method}: {calls} transformer calls, {rows} rows" in captured.err
