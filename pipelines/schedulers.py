"""Samplers users can pick by name. DPM-Solver++ is the default, as in the composition papers."""

from __future__ import annotations

from typing import Any, Mapping

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from loracompose.errors import UserError

SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
}
DEFAULT_SCHEDULER = "dpmsolver++"


def make_scheduler(name: str, base_config: Mapping[str, Any]):
    """A fresh scheduler of the named kind, configured from the model's own scheduler config."""
    if name not in SCHEDULERS:
        raise UserError(f"scheduler {name!r} is not known; choose one of {', '.join(SCHEDULERS)}")
    scheduler_class, overrides = SCHEDULERS[name]
    return scheduler_class.from_config(dict(base_config), **overrides)
