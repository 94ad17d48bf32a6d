"""The composition methods, one file per paper, and the registry every front-end reads.

Adding a method: write ``<name>.py`` with a :class:`~loracompose.methods.base.CompositionMethod`
subclass and add it to :data:`METHODS` below.
"""

from loracompose.methods.auto import Auto
from loracompose.methods.autolora import AutoLoRA
from loracompose.methods.base import CompositionMethod
from loracompose.methods.clora import CLoRA
from loracompose.methods.cmlora import CMLoRA, CMLoRASwitch
from loracompose.methods.composer import Composer
from loracompose.methods.composite import Composite
from loracompose.methods.merge import Merge
from loracompose.methods.regional import Regional
from loracompose.methods.switch import Switch
from loracompose.methods.tara import Tara

METHODS: dict[str, type[CompositionMethod]] = {
    method.name: method for method in (Merge, Switch, Composite, CMLoRA, CMLoRASwitch, CLoRA, Composer, Tara, AutoLoRA,
                                  Regional, Auto)
}
# The method the CLI, the web UI and the demo use unless told otherwise: on the toy world it draws both
# objects at their sides without being told where (benchmarks/results/toyworld-auto-report.md: 97%, Merge 0%).
DEFAULT_METHOD = "auto"

__all__ = ["DEFAULT_METHOD", "METHODS", "Auto", "AutoLoRA", "CLoRA", "CMLoRA", "CMLoRASwitch", "Composer", "Composite",
           "CompositionMethod", "Merge", "Regional", "Switch", "Tara"]
