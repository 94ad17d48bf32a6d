"""Fast adapter switching and per-row (mixed-batch) adapters on PEFT LoRA layers.

diffusers' ``set_adapters`` walks every module of the model on each call, which is
a real cost when a method switches adapters every step. :class:`AdapterController` finds the PEFT
tuner layers once and flips active adapters and scales on them directly, doing only what changed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
from peft.tuners.lora import LoraLayer

from .values import BASE_ROW  # noqa: F401  (re-exported: benchmarks import it from here)


class AdapterController:
    """Activate adapter sets on the LoRA layers of a group of modules (UNet, text encoders)."""

    def __init__(self, modules: Mapping[str, torch.nn.Module | None]):
        self.layers: dict[str, list[LoraLayer]] = {
            component: [m for m in module.modules() if isinstance(m, LoraLayer)]
            for component, module in modules.items()
            if module is not None
        }
        self._state: dict[str, tuple[tuple[str, float], ...] | None] = dict.fromkeys(self.layers)

    def activate(self, weights: Mapping[str, float], components: Sequence[str] | None = None) -> None:
        """Make exactly these adapters active, each at its weight (strength), on the components."""
        wanted = tuple(sorted((name, float(weight)) for name, weight in weights.items()))
        for component in components or list(self.layers):
            if self._state.get(component) == wanted:
                continue
            for layer in self.layers.get(component, []):
                for name, weight in wanted:
                    layer.set_scale(name, weight)
                layer.set_adapter([name for name, _ in wanted], inference_mode=True)
                layer.enable_adapters(True)
            self._state[component] = wanted

    def set_weights(self, weights: Mapping[str, float], components: Sequence[str] | None = None) -> None:
        """Set scales without changing which adapters are active (used by mixed batches)."""
        for component in components or list(self.layers):
            for layer in self.layers.get(component, []):
                for name, weight in weights.items():
                    layer.set_scale(name, float(weight))
            self._state[component] = None

    @contextmanager
    def rows(self, component: str, row_adapters: Sequence[str]) -> Iterator[None]:
        """Route batch row i through adapter ``row_adapters[i]`` on every LoRA layer of the component.

        PEFT layers accept ``adapter_names`` in forward; diffusers models do not pass it, so a forward
        pre-hook adds it. Each adapter runs at the scale set by :meth:`set_weights`.
        """
        names = list(row_adapters)

        def add_adapter_names(_module, args, kwargs):
            kwargs["adapter_names"] = names
            return args, kwargs

        handles = [
            layer.register_forward_pre_hook(add_adapter_names, with_kwargs=True)
            for layer in self.layers.get(component, [])
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def any_merged(self) -> bool:
        return any(layer.merged for layers in self.layers.values() for layer in layers)
