"""Imports deferred to first use, so ``loracompose --help`` and the method registry load no model stack.

Two tools:

* :func:`lazy_exports` gives a package ``__init__`` a PEP 562 ``__getattr__``: its public names are
  imported from their submodules when first asked for (``from loracompose import Merge`` works as
  before, but ``import loracompose`` imports neither torch nor diffusers).
* :class:`LazyImport` stands for a module, or a name in a module, that a module uses only inside its
  functions (``torch = LazyImport("torch")``): the import happens on the first attribute access,
  call, ``isinstance`` check or subclassing. Method modules use it so that their dataclasses (the
  settings every front-end reads) import in milliseconds.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


class LazyImport:
    """A module (``LazyImport("torch")``) or one of its names (``LazyImport("peft.tuners.lora",
    "LoraLayer")``), imported when first used."""

    __slots__ = ("_module", "_name", "_value")

    def __init__(self, module: str, name: str | None = None) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_name", name)

    def resolve(self) -> Any:
        """The module or object itself (imported now if it was not yet)."""
        try:
            return object.__getattribute__(self, "_value")
        except AttributeError:
            value = importlib.import_module(self._module)
            if self._name is not None:
                value = getattr(value, self._name)
            object.__setattr__(self, "_value", value)
            return value

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.resolve(), attribute)

    def __setattr__(self, attribute: str, value: Any) -> None:
        setattr(self.resolve(), attribute, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __instancecheck__(self, instance: Any) -> bool:
        return isinstance(instance, self.resolve())

    def __subclasscheck__(self, subclass: type) -> bool:
        return issubclass(subclass, self.resolve())

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.resolve(),)

    def __getitem__(self, key: Any) -> Any:
        return self.resolve()[key]

    def __repr__(self) -> str:
        target = self._module if self._name is None else f"{self._module}.{self._name}"
        return f"<lazy import of {target}>"


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package whose public names (``exports``: name -> the
    module defining it) are imported on first access (PEP 562) and then kept in the package."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(vars(importlib.import_module(package))))

    return __getattr__, __dir__
