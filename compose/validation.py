"""Checks of what users give: numbers, sizes, seeds, names, files, weights, and the limits of one call.

The CLI, the Python API (``generate``), the web UI and the benchmark suites all call these functions,
so a bad value gets the same one-line :class:`~loracompose.errors.UserError` wherever it comes from.
A number must be finite and in range; a file must be a regular file (a FIFO or device would block a
reader forever); tensors read from a file must be finite (one Inf in a LoRA turns every image of a
shared pipeline black); a request must fit the :class:`Limits` (image side, pixels per call, steps)
and the memory that is free, checked before anything is allocated.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from loracompose.errors import UserError

if TYPE_CHECKING:
    import torch

# torch.Generator.manual_seed takes 0 .. 2**64 - 1; image k of a call uses seed + k.
MAX_SEED = 2**64 - 1
SIZE_MULTIPLE = 8
GIB = 1024**3


@dataclass(frozen=True)
class Limits:
    """The largest request one call may make; each has a CLI flag (and a UI server flag) raising it.

    Attributes:
        max_side: largest image width or height in pixels (SD1.5 and SDXL are trained at 512 and 1024).
        max_pixels: width x height x images of one call (four 2048x2048 images by default).
        max_steps: denoising steps (the schedulers are trained on 1000 timesteps).
        check_memory: refuse a request whose estimated peak memory exceeds the free memory.
    """

    max_side: int = 2048
    max_pixels: int = 4 * 2048 * 2048
    max_steps: int = 1000
    check_memory: bool = True

    def __post_init__(self) -> None:
        for name in ("max_side", "max_pixels", "max_steps"):
            whole_number(getattr(self, name), LIMIT_FLAGS[name], low=1)


# The flag that raises each limit (the same spelling on `generate`, `bench` and `ui`).
LIMIT_FLAGS = {"max_side": "--max-side", "max_pixels": "--max-pixels", "max_steps": "--max-steps",
               "check_memory": "--no-memory-check"}


def limit_names() -> list[str]:
    return [item.name for item in fields(Limits)]


# ------------------------------------------------------------------------------------ numbers


def finite_number(value: Any, label: str, *, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a finite float in ``[low, high]``, or a UserError naming ``label``."""
    if isinstance(value, bool):
        raise UserError(f"{label}={value!r}: give a number, not a yes/no value")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{label}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise UserError(f"{label}={value!r}: give a finite number")
    if (low is not None and number < low) or (high is not None and number > high):
        raise UserError(f"{label}={value!r} is out of range; use {_range_text(low, high)}")
    return number


def whole_number(value: Any, label: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (a float must be whole), or a UserError naming ``label``."""
    if isinstance(value, bool):
        raise UserError(f"{label}={value!r}: give a whole number, not a yes/no value")
    if isinstance(value, int):
        number = value
    else:
        as_float = finite_number(value, label)
        if as_float != int(as_float):
            raise UserError(f"{label}={value!r}: give a whole number")
        number = int(as_float)
    if (low is not None and number < low) or (high is not None and number > high):
        raise UserError(f"{label}={value!r} is out of range; use {_range_text(low, high)}")
    return number


def _range_text(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"{low:g} to {high:g}"
    return f"at least {low:g}" if low is not None else f"at most {high:g}"


def check_seed(seed: Any, count: int = 1, label: str = "seed") -> int:
    """A seed such that ``seed .. seed + count - 1`` are all valid torch seeds."""
    return whole_number(seed, label, low=0, high=MAX_SEED - (count - 1))


def check_lora_weight(weight: Any, label: str) -> float:
    """A LoRA strength: finite, |weight| <= 100 (a larger one only saturates the image)."""
    return finite_number(weight, f"weight of {label}", low=-100.0, high=100.0)


def check_mixing_weights(weights: Any, label: str, count: int | None = None) -> tuple[float, ...]:
    """Finite non-negative mixing weights with a positive sum (one per LoRA when ``count`` is given)."""
    values = tuple(finite_number(value, label, low=0.0) for value in weights)
    if count is not None and len(values) != count:
        raise UserError(f"{label}: got {len(values)} weights for {count} LoRAs; give one per LoRA")
    if values and sum(values) <= 0:
        raise UserError(f"{label}: the weights sum to 0; give at least one positive weight")
    return values


# ------------------------------------------------------------------------------------ sizes and limits


def check_image_side(value: Any, label: str, limits: Limits) -> int:
    """A positive multiple of 8 no larger than ``limits.max_side``."""
    side = whole_number(value, label)
    if side < SIZE_MULTIPLE or side % SIZE_MULTIPLE:
        raise UserError(f"{label}={value!r}: image sizes must be positive multiples of {SIZE_MULTIPLE} pixels")
    if side > limits.max_side:
        raise UserError(f"{label}={side} is over the image side limit {limits.max_side}; "
                        f"raise it with {LIMIT_FLAGS['max_side']}")
    return side


def check_request_size(width: int, height: int, num_images: int, steps: int, limits: Limits) -> None:
    """Pixels x images per call and steps within ``limits``."""
    pixels = width * height * num_images
    if pixels > limits.max_pixels:
        raise UserError(f"{width}x{height} x {num_images} image(s) = {pixels} pixels is over the per-call limit "
                        f"{limits.max_pixels}; ask for fewer or smaller images, or raise it with "
                        f"{LIMIT_FLAGS['max_pixels']}")
    if steps > limits.max_steps:
        raise UserError(f"steps={steps} is over the step limit {limits.max_steps}; "
                        f"raise it with {LIMIT_FLAGS['max_steps']}")


def check_batch_rows(value: Any) -> int | None:
    """``max_batch_rows``: None (no cap) or a whole number >= 1."""
    return None if value is None else whole_number(value, "max_batch_rows", low=1)


@dataclass(frozen=True)
class GenerationNumbers:
    """The numbers of one generate call, checked (sizes stay None for the model's native size)."""

    steps: int
    guidance_scale: float
    num_images: int
    seed: int
    width: int | None
    height: int | None
    max_batch_rows: int | None


def check_generation_numbers(*, steps: Any, guidance_scale: Any, num_images: Any, seed: Any, width: Any = None,
                             height: Any = None, max_batch_rows: Any = None,
                             limits: Limits | None = None) -> GenerationNumbers:
    """Every number of a generate call finite, whole where it counts something, and within ``limits``
    (the CLI calls this before loading a model, ``generate`` again with the pipeline's limits)."""
    limits = limits or Limits()
    checked = GenerationNumbers(
        steps=whole_number(steps, "steps", low=1),
        guidance_scale=finite_number(guidance_scale, "guidance", low=0.0),
        num_images=whole_number(num_images, "num_images", low=1),
        seed=0, width=None if width is None else check_image_side(width, "width", limits),
        height=None if height is None else check_image_side(height, "height", limits),
        max_batch_rows=check_batch_rows(max_batch_rows),
    )
    checked = GenerationNumbers(**{**checked.__dict__, "seed": check_seed(seed, checked.num_images)})
    if checked.steps > limits.max_steps:
        check_request_size(1, 1, 1, checked.steps, limits)
    if checked.width is not None and checked.height is not None:
        check_request_size(checked.width, checked.height, checked.num_images, checked.steps, limits)
    return checked


# ------------------------------------------------------------------------------------ memory


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still get on ``device`` (None where it cannot be told)."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        return _linux_available_memory()
    return None


def _linux_available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_generation_bytes(pipe: Any, width: int, height: int, num_images: int, rows_per_image: int) -> int:
    """A rough lower bound of a generation's peak activation memory: the UNet's largest level (its
    first block's channels at latent resolution, about a dozen live tensors with the skip connections)
    for every row of one call, or the VAE decoder's last levels at full resolution (about six tensors
    of its first block's channels), whichever is larger."""
    element = pipe.unet.dtype.itemsize
    scale = pipe.vae_scale_factor
    latent_positions = (height // scale) * (width // scale)
    unet_channels = int(pipe.unet.config.block_out_channels[0])
    unet = 12 * rows_per_image * num_images * latent_positions * unet_channels * element
    vae_channels = int(pipe.vae.config.block_out_channels[0])
    vae = 6 * num_images * height * width * vae_channels * pipe.vae.dtype.itemsize
    return max(unet, vae)


def check_memory(needed: int, device: torch.device, what: str, advice: str) -> None:
    """Refuse ``what`` if it needs more than the free memory of ``device``."""
    free = available_memory_bytes(device)
    if free is not None and needed > free:
        raise UserError(f"{what} needs about {needed / GIB:.1f} GiB but {free / GIB:.1f} GiB is free on "
                        f"{device.type}; {advice} (or skip this estimate with {LIMIT_FLAGS['check_memory']})")


# ------------------------------------------------------------------------------------ names, devices, files


def plain_file_name(name: Any, label: str) -> str:
    """A file name without folders (``x``, not ``sub/x`` or ``../x``), for outputs written into a folder."""
    text = str(name)
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text or text.startswith("."):
        raise UserError(f"{label} {text!r}: give a plain file name (no folders, not starting with '.'); "
                        "choose the folder with --out")
    return text


def check_device(device: Any) -> torch.device:
    """``auto`` (CUDA if present) or a torch device that exists on this machine."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"device {device!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r}: no CUDA GPU is usable on this machine; use --device cpu or auto")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                            "use cuda:0 or auto")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r}: MPS is not available here; use --device cpu or auto")
    elif chosen.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {device!r} is not supported; use auto, cpu, cuda or mps")
    return chosen


def regular_file(path: Path, label: str) -> Path:
    """``path`` if it is a regular file (followed through links); a FIFO, socket or device would block
    or never end when read, a folder is not a file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{label} not found: {path}; check the path") from None
    except OSError as error:
        raise UserError(f"{label} {path} cannot be read ({error.strerror}); check the path") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{label} {path} is a folder; pass the .safetensors file inside it")
    if not stat.S_ISREG(mode):
        raise UserError(f"{label} {path} is not a regular file (a pipe, socket or device); pass a .safetensors file")
    return path


def check_tensor_bytes_fit(path: Path, tensor_bytes: int, label: str) -> None:
    """Refuse a file whose tensors would not fit in the free memory (a sparse file can promise any size)."""
    free = _linux_available_memory()
    if free is not None and tensor_bytes > free:
        raise UserError(f"{label} {path} holds {tensor_bytes / GIB:.1f} GiB of tensors, more than the "
                        f"{free / GIB:.1f} GiB of free memory; it cannot be a usable LoRA")


def check_finite_tensors(tensors: Mapping[str, torch.Tensor], label: str) -> None:
    """Every floating-point tensor finite (no NaN, no Inf), or a UserError naming the first bad one."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise UserError(f"{label} has NaN or infinite values (in {key}); the file is corrupt, re-download "
                            "or retrain it")
