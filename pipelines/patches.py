"""The one owner of changes a generation makes to the shared model, and a check that none is left.

A pipeline serves many generations (the UI serves every user on one), so whatever a method changes on
the model for its generation (attention processors, forward hooks, a replaced ``forward``, LoRA deltas
folded into the weights) must be undone however the generation ends. Methods register each change on
the :class:`PatchStack` of their :class:`~loracompose.pipelines.denoiser.Denoiser` (``run.patches``)
while they make it; the loop unwinds the stack in reverse order after ``finish``, also when ``start``,
a step or ``finish`` failed. Methods never restore by hand.

:func:`fingerprint` and :func:`assert_unchanged` check that a model is back to how it was: the tests
take one before and after every generation (``ComposeMixin.verify_clean``).
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, ExitStack
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, TypeVar

import torch
from peft.tuners.lora import LoraLayer

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

T = TypeVar("T")


class PatchStack:
    """Changes made to a model, each with its undo; :meth:`unwind` (or leaving the ``with`` block)
    undoes them newest first. Every undo runs even if an earlier one fails (the first error is raised
    after all have run)."""

    def __init__(self) -> None:
        self._stack = ExitStack()

    # -- generic ------------------------------------------------------------------------------
    def on_unwind(self, undo: Callable[[], Any]) -> None:
        """Register the undo of a change just made (or about to be made)."""
        self._stack.callback(undo)

    def enter(self, context: AbstractContextManager[T]) -> T:
        """Enter a context manager that patches the model; it is exited on unwind."""
        return self._stack.enter_context(context)

    def hook(self, handle: Any) -> Any:
        """A hook handle (``register_forward_hook`` and friends), removed on unwind."""
        self.on_unwind(handle.remove)
        return handle

    # -- what methods patch -----------------------------------------------------------------------
    def processors(self, unet: torch.nn.Module, processors: Mapping[str, Any]) -> Any:
        """Install attention processors on the named layers (:func:`~loracompose.attention.
        install_processors`); the previous ones come back on unwind. Returns the handle."""
        from loracompose.attention.layers import install_processors

        handle = install_processors(unet, processors)
        self.on_unwind(handle.restore)
        return handle

    def module_processors(self, modules: Iterable[Attention], make: Callable[[Attention], Any]) -> None:
        """``module.set_processor(make(module))`` on each ``Attention`` module, without walking the
        whole UNet's processor tree as :meth:`processors` does; the old processors come back on unwind."""
        for module in modules:
            self.on_unwind(functools.partial(module.set_processor, module.processor))
            module.set_processor(make(module))

    def forward(self, module: torch.nn.Module, forward: Callable[..., Any]) -> None:
        """Replace one module's ``forward`` (an instance attribute); the class's comes back on unwind."""
        if "forward" in module.__dict__:
            raise RuntimeError(f"{type(module).__name__}.forward is already replaced; patches would not nest")
        self.on_unwind(lambda: module.__dict__.pop("forward", None))
        module.forward = forward

    def fuse(self, layers: Iterable[LoraLayer], adapters: Sequence[str]) -> int:
        """Fold the active deltas of ``adapters`` (at their current scales) into each layer's base
        weights. On unwind the weights are copied back from a saved copy: never unmerged by
        subtraction, which rounds (and turns an infinite delta into NaN weights for good).
        Returns how many layers were fused."""
        fused = 0
        for layer in layers:
            present = [name for name in adapters if name in layer.lora_A]
            if not present:
                continue
            self._save_base(layer)
            layer.merge(adapter_names=present)
            fused += 1
        return fused

    def _save_base(self, layer: LoraLayer) -> None:
        base = layer.get_base_layer()
        saved = {name: getattr(base, name).detach().to("cpu", copy=True)
                 for name in ("weight", "bias") if getattr(base, name, None) is not None}

        def restore() -> None:
            with torch.no_grad():
                for name, value in saved.items():
                    getattr(base, name).copy_(value)
            layer.merged_adapters.clear()  # PEFT's record of what is folded in: nothing, again

        self.on_unwind(restore)

    # -- unwinding -------------------------------------------------------------------------------
    def unwind(self) -> None:
        """Undo every registered change, newest first; the stack is empty afterwards."""
        self._stack.close()

    def __enter__(self) -> PatchStack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unwind()


# ------------------------------------------------------------------------------------ the check


def fingerprint(modules: Mapping[str, torch.nn.Module | None], weights: bool = True,
                structure: bool = True) -> dict[str, Any]:
    """What a generation may change on these modules and must put back: (``structure``) attention
    processors (by identity), replaced ``forward`` methods, hooks, folded LoRA adapters and gradient
    checkpointing; gradient flags; (``weights``) two float64 sums of every parameter and buffer.

    Leave ``structure`` off for modules that add hooks of their own on first use (transformers'
    text encoders install an output-capturing hook the first time hidden states are asked for)."""
    state: dict[str, Any] = {}
    for label, root in modules.items():
        if root is None:
            continue
        processors = getattr(root, "attn_processors", None)  # diffusers models: every attention processor
        if structure and processors is not None:
            state[f"{label}:processors"] = {key: id(value) for key, value in processors.items()}
        for name, module in root.named_modules() if structure else ():
            state[f"{label}:{name}:module"] = _module_state(module)
        for name, parameter in root.named_parameters():
            if ".lora_" not in name:  # PEFT sets the adapters' own flags whenever it activates them
                state[f"{label}:{name}:requires_grad"] = parameter.requires_grad
            if weights:
                state[f"{label}:{name}"] = _checksum(parameter)
        if weights:
            for name, buffer in root.named_buffers():
                state[f"{label}:{name}"] = _checksum(buffer)
    return state


QUICK_SAMPLE = 4096  # elements per weight that quick_fingerprint reads


def quick_fingerprint(modules: Mapping[str, torch.nn.Module | None]) -> dict[str, Any]:
    """A cheap :func:`fingerprint` for every request of a shared pipeline (the UI): the full structure
    (processors, hooks, replaced forwards, folded adapters) and, for the base weights of the LoRA
    layers only (the only weights a generation may change: by fusing), a checksum of an evenly strided
    sample of at most ``QUICK_SAMPLE`` elements. A fused delta changes nearly every element, and a
    NaN or Inf anywhere in the sample makes the checksum differ."""
    state = fingerprint(modules, weights=False)
    for label, root in modules.items():
        if root is None:
            continue
        for name, module in root.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                flat = weight.detach().reshape(-1)
                stride = max(1, flat.numel() // QUICK_SAMPLE)
                state[f"{label}:{name}:base-sample"] = _checksum(flat[::stride])
    return state


def _module_state(module: torch.nn.Module) -> tuple:
    hooks = tuple(len(getattr(module, attribute, {})) for attribute in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
    merged = tuple(getattr(module, "merged_adapters", ()))
    return ("forward" in module.__dict__, hooks, merged, bool(getattr(module, "gradient_checkpointing", False)))


def _checksum(tensor: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        values = tensor.detach().double()
        # A plain sum misses swapped values; the weighted one does not. NaN != NaN flags poisoned weights.
        weights = torch.arange(1, values.numel() + 1, device=values.device, dtype=torch.float64)
        return float(values.sum()), float((values.flatten() * weights).sum())


class PatchLeak(AssertionError):
    """A generation left the shared model changed."""


def assert_unchanged(before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    """Raise :class:`PatchLeak` naming the first few entries that differ between two fingerprints."""
    changed = [key for key in before.keys() | after.keys() if before.get(key) != after.get(key)]
    if changed:
        shown = ", ".join(sorted(changed)[:5])
        raise PatchLeak(f"the model was left changed in {len(changed)} place(s): {shown}")
