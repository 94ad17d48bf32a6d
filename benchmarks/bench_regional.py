"""``regional`` (one UNet pass per step) against Merge and plain diffusers, for N = 2..4 LoRAs.

SD1.5's own UNet (random weights, :func:`bench_common.build_sd15_unet_model`) at ``--latent`` cells a
side (64 = SD1.5 at 512 px; the tiny VAE decodes), random LoRAs on to_q/k/v/out of every attention
layer (the diffusers default targets), DPM-Solver++, CFG 7.5. Configurations, timed round-robin after
one warm-up round (``bench_common.interleaved``), median wall and process CPU seconds:

* ``plain``: stock diffusers, no LoRA;
* ``merge N``: ``generate`` with Merge of N LoRAs;
* ``regional N``: ``generate`` with ``Regional()`` (the N LoRAs side by side in full-height columns).

The target (issue 19) is ``regional N / merge N <= 1.15``.

    python benchmarks/bench_regional.py --latent 32 --steps 2 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from loracompose import LoraSpec, Merge, load_pipeline  # noqa: E402
from loracompose.assets.tiny import build_tiny_lora  # noqa: E402
from loracompose.methods.regional import Regional  # noqa: E402

from bench_common import build_sd15_unet_model, interleaved, machine_info, stock_pipeline, write_json  # noqa: E402

PROMPT = "a photo of a cat and a dog"
RESULTS = Path(__file__).parent / "results"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="latent cells a side (64: SD1.5 at 512 px)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up")
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "regional-cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        model = build_sd15_unet_model(Path(scratch) / "sd15-unet", latent_size=args.latent)
        loras = [build_tiny_lora(model, Path(scratch) / f"lora{k}.safetensors", seed=10 + k, text_encoder=False,
                                 category="object") for k in range(args.max_loras)]
        pipe, stock = load_pipeline(model), stock_pipeline(model)
        size = 2 * args.latent  # the tiny VAE's factor
        common = dict(steps=args.steps, width=size, height=size, show_progress=False, output_type="latent")
        runners = {"plain": lambda: stock(PROMPT, num_inference_steps=args.steps, width=size, height=size,
                                          output_type="latent")}
        for count in range(2, args.max_loras + 1):
            specs = [LoraSpec(path) for path in loras[:count]]
            runners[f"merge {count}"] = lambda specs=specs: pipe.generate(PROMPT, specs, Merge(), **common)
            runners[f"regional {count}"] = lambda specs=specs: pipe.generate(PROMPT, specs, Regional(), **common)
        wall, cpu = interleaved(runners, args.rounds)
    rows = {name: {"wall_s": statistics.median(wall[name]), "cpu_s": statistics.median(cpu[name])} for name in runners}
    print(f"SD1.5 UNet, latent {args.latent}x{args.latent}, {args.steps} steps, median of {args.rounds}")
    print("| config | wall s | cpu s | cpu / merge |\n|---|---|---|---|")
    for name, row in rows.items():
        merge = rows.get(name.replace("regional", "merge")) if name.startswith("regional") else None
        ratio = f"{row['cpu_s'] / merge['cpu_s']:.3f}" if merge else ""
        row["cpu_ratio_to_merge"] = float(ratio) if ratio else None
        print(f"| {name} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | {ratio} |")
    write_json(args.out, {"settings": vars(args) | {"out": str(args.out)}, "machine": machine_info(), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
