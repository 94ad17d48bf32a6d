"""Time loracompose attention processors against diffusers' stock ``AttnProcessor2_0``.

For each SD1.5 (512 px) and SDXL (1024 px) attention shape, self and cross, with a CFG batch of 2,
it times the stock processor and ``ComposeAttnProcessor`` per available backend in four modes:
``none`` (no extras), ``capture`` (maps of 4 tokens, cond rows; cross only), ``token_mask`` (2 LoRAs
on K/V with token masks; cross only; the stock baseline then runs the same 2 LoRAs unmasked) and
``region`` (2 overlapping boxes: concept injection with per-region states and LoRA on cross, the
region K/V computed once as LoRA-Composer does; isolation on self). Prints ratios to stock and writes JSON (``--out``, written atomically).

    python benchmarks/bench_attention.py --quick --out bench_out/attention.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import peft
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from loracompose.attention import (
    AttentionStore,
    Box,
    ComposeAttnProcessor,
    LoraTokenMasks,
    Region,
    RegionAttention,
    available_backends,
    token_mask,
)
from loracompose.attention.layers import AttentionLayer, UNetCall
from loracompose.outputs import atomic_write_text

TEXT_TOKENS = 77
MODES = ("none", "capture", "token_mask", "region")
EAGER_FLEX_SCORE_LIMIT = 512 * 2**20  # bytes of fp32 scores eager flex may materialise


@dataclass(frozen=True)
class Shape:
    model: str
    kind: str  # "self" | "cross"
    channels: int
    heads: int
    rows: int
    columns: int
    context_dim: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.kind} {self.heads}x{self.channels // self.heads} L={self.rows * self.columns}"


def shapes() -> list[Shape]:
    sd15 = [(320, 64), (640, 32), (1280, 16)]  # 8 heads: head_dim 40/80/160 at 512 px
    sdxl = [(640, 64), (1280, 32)]  # head_dim 64 at 1024 px
    out = []
    for kind in ("self", "cross"):
        out += [Shape("sd15", kind, c, 8, s, s, 768) for c, s in sd15]
        out += [Shape("sdxl", kind, c, c // 64, s, s, 2048) for c, s in sdxl]
    return out


def make_layer(shape: Shape, device: torch.device, dtype: torch.dtype) -> Attention:
    cross_dim = shape.context_dim if shape.kind == "cross" else None
    attn = Attention(shape.channels, cross_attention_dim=cross_dim, heads=shape.heads,
                     dim_head=shape.channels // shape.heads, out_bias=True)
    config = peft.LoraConfig(r=8, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    for name in ("a", "b"):
        attn = peft.inject_adapter_in_model(config, attn, adapter_name=name)
    for module in attn.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.set_adapter(["a", "b"])
    return attn.to(device=device, dtype=dtype).eval()


def set_lora_enabled(attn: Attention, enabled: bool) -> None:
    for module in attn.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.enable_adapters(enabled)


def bound(processor: ComposeAttnProcessor, shape: Shape) -> ComposeAttnProcessor:
    call = UNetCall()
    call.record(torch.empty(1, 1, shape.rows, shape.columns, device="meta"))
    processor.bind(AttentionLayer(f"bench.{shape.kind}", shape.kind == "cross", "down", 0), call)
    return processor


def regions(shape: Shape, context: torch.Tensor) -> RegionAttention:
    left, right = Box(0.0, 0.0, 0.6, 1.0), Box(0.4, 0.2, 1.0, 0.8)
    if shape.kind == "self":
        return RegionAttention([Region(left), Region(right)])
    return RegionAttention([Region(left, torch.randn_like(context), "a"), Region(right, torch.randn_like(context), "b")],
                           reuse_region_key_values=True)  # as LoRA-Composer runs it: region K/V once per generation


def processor_for(mode: str, backend: str, shape: Shape, context: torch.Tensor | None) -> ComposeAttnProcessor:
    if mode == "capture":
        return bound(ComposeAttnProcessor(backend, store=AttentionStore([1, 2, 3, 4], rows="cond")), shape)
    if mode == "token_mask":
        masks = LoraTokenMasks({"a": token_mask([2, 3]), "b": token_mask([5])})
        return bound(ComposeAttnProcessor(backend, token_masks=masks), shape)
    if mode == "region":
        return bound(ComposeAttnProcessor(backend, regions=regions(shape, context)), shape)
    return bound(ComposeAttnProcessor(backend), shape)


def time_rounds(candidates: dict, rounds: int, device: torch.device) -> dict:
    """Fastest seconds per candidate over the timed rounds. Candidates run interleaved (one call each per
    round, after a warm-up round) and the minimum is kept, the sample least disturbed by other load."""
    samples: dict = {name: [] for name in candidates}
    for round_index in range(rounds + 1):
        for name, function in candidates.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            function()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_index > 0:
                samples[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in samples.items()}


def skip_reason(mode: str, backend: str, shape: Shape, device: torch.device, batch: int) -> str | None:
    if mode in ("capture", "token_mask") and shape.kind == "self":
        return "cross only"
    keys = shape.rows * shape.columns if shape.kind == "self" else TEXT_TOKENS
    score_bytes = batch * shape.heads * shape.rows * shape.columns * keys * 4
    if backend == "flex" and device.type != "cuda" and score_bytes > EAGER_FLEX_SCORE_LIMIT:
        return "eager flex would materialise scores"
    return None


def bench_shape(shape: Shape, backends: list[str], device, dtype, batch: int, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    attn = make_layer(shape, device, dtype)
    hidden = torch.randn(batch, shape.rows * shape.columns, shape.channels, device=device, dtype=dtype)
    context = torch.randn(batch, TEXT_TOKENS, shape.context_dim, device=device, dtype=dtype) if shape.kind == "cross" else None

    def call(processor, lora_enabled: bool):
        def run() -> None:
            attn.set_processor(processor)
            set_lora_enabled(attn, lora_enabled)
            with torch.no_grad():
                attn(hidden, encoder_hidden_states=context)
        return run

    candidates = {("stock", "plain"): call(AttnProcessor2_0(), False)}
    rows = []
    for mode in MODES:
        for backend in backends:
            row = {"shape": asdict(shape), "label": shape.label, "mode": mode, "backend": backend}
            reason = skip_reason(mode, backend, shape, device, batch)
            if reason:
                row["skipped"] = reason
            else:
                if mode == "token_mask":
                    candidates[("stock", "lora")] = call(AttnProcessor2_0(), True)
                candidates[(mode, backend)] = call(processor_for(mode, backend, shape, context), mode == "token_mask")
            rows.append(row)
    seconds = time_rounds(candidates, rounds, device)
    for row in rows:
        if "skipped" not in row:
            stock = seconds[("stock", "lora" if row["mode"] == "token_mask" else "plain")]
            mine = seconds[(row["mode"], row["backend"])]
            row.update(seconds=mine, stock_seconds=stock, ratio=mine / stock)
    return rows


def print_table(results: list[dict], backends: list[str]) -> None:
    columns = [(mode, backend) for mode in MODES for backend in backends]
    short = {"none": "none", "capture": "capture", "token_mask": "tokmask", "region": "region"}
    header = f"{'shape':<32}{'stock ms':>9}" + "".join(f"{short[m] + '/' + b:>13}" for m, b in columns)
    print(header)
    for label in dict.fromkeys(r["label"] for r in results):
        rows = {(r["mode"], r["backend"]): r for r in results if r["label"] == label}
        plain = next((r["stock_seconds"] for r in rows.values() if r["mode"] == "none" and "ratio" in r), float("nan"))
        cells = ["-" if "ratio" not in rows.get(c, {}) else f"{rows[c]['ratio']:.2f}x" for c in columns]
        print(f"{label:<32}{plain * 1e3:>9.1f}" + "".join(f"{cell:>13}" for cell in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up round and 2 timed rounds (CPU-friendly)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 gives steadier ratios on a shared CPU)")
    parser.add_argument("--out", help="write results as JSON to this file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2, help="rows per call (2 = one image with CFG)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rounds = 2 if args.quick else 10
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = available_backends()
    results = []
    for shape in shapes():
        results += bench_shape(shape, backends, device, dtype, args.batch, rounds)
        print(f"done {shape.label}", file=sys.stderr, flush=True)
    print_table(results, backends)
    if args.out:
        meta = {"device": str(device), "dtype": str(dtype), "torch": torch.__version__, "backends": backends,
                "batch": args.batch, "timed_rounds": rounds, "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine()}
        atomic_write_text(Path(args.out), json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
