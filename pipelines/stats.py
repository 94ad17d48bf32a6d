"""What a generation cost: UNet calls and rows, time and peak memory."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class GenerationStats:
    """What a generation cost. ``unet_calls`` counts forward calls of the denoiser model (the UNet, or
    the transformer of a DiT), ``unet_rows`` the samples they evaluated; partial passes (feature
    caching) and backward passes are counted apart."""

    unet_calls: int = 0
    unet_rows: int = 0
    partial_unet_calls: int = 0
    partial_unet_rows: int = 0
    backward_passes: int = 0
    text_encoder_calls: int = 0
    execution: str = "single"
    execution_note: str = ""
    wall_seconds: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_source: str = ""

    @property
    def model_calls(self) -> int:
        """Denoiser-model calls (UNet or DiT transformer): ``unet_calls`` by its family-neutral name."""
        return self.unet_calls

    @property
    def model_rows(self) -> int:
        """Rows those calls evaluated: ``unet_rows`` by its family-neutral name."""
        return self.unet_rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MemoryMeter:
    """Peak memory of a run: CUDA allocator peak on GPU, else the process's peak RSS (which is a
    high-water mark over the process's life, not this run alone)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device

    def peak(self) -> tuple[int, str]:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated"
        return peak_rss_bytes(), "process_peak_rss"


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes.

    On Linux the memory map's own high-water mark (``VmHWM``): ``ru_maxrss`` also keeps the peak of the
    parent's memory when a subprocess was started with vfork + exec, so a small child of a large
    parent would read the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
