"""Samplers users can pick by name. DPM-Solver++ is the default, as in the composition papers."""

from __future__ import annotations

from typing import Any, Mapping

from loracompose.errors import UserError

# name -> (diffusers scheduler class name, config overrides); the class is imported when one is made,
# so the names (CLI choices) cost no diffusers import.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}
DEFAULT_SCHEDULER = "dpmsolver++"


def make_scheduler(name: str, base_config: Mapping[str, Any]):
    """A fresh scheduler of the named kind, configured from the model's own scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"scheduler {name!r} is not known; choose one of {', '.join(SCHEDULERS)}")
    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(dict(base_config), **overrides)
