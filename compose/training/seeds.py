"""Seeded randomness of the trainers: every draw of step ``s`` comes from a generator seeded with
(seed, stream, s), so a resumed run draws exactly what the uninterrupted run would have."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

import torch


def derived_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for draw ``index`` of ``stream`` (step, epoch, probe, init) of a run seeded ``seed``."""
    digest = hashlib.sha256(f"{seed}:{stream}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, stream: str, index: int) -> torch.Generator:
    """A CPU generator for draw ``index`` of ``stream`` (device-independent draws)."""
    return torch.Generator("cpu").manual_seed(derived_seed(seed, stream, index))


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed torch's global RNG inside the block only (PEFT and torch.nn initialise weights from it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
