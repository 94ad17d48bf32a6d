"""A method's settings are its dataclass fields: the one reading of them that every front-end uses.

The CLI derives its flags (``loracompose.cli.method_flags``), the UI its forms (``ui/method_forms.py``)
and bench suites their method keys (``eval/suite.py``) from :func:`method_settings`, and all of them
build methods with :func:`build_method`. A field needs nothing beyond its type and default; its
``field(metadata={...})`` may add:

* ``help``: one line describing it (else its entry in the class docstring's ``Attributes:`` or
  ``Args:`` section is used);
* ``choices``: the values it takes (a ``Literal`` type gives them too);
* ``flags``: more CLI spellings of it, e.g. ``("--fuse",)`` (the derived one is ``--METHOD-FIELD``);
  several methods may share a spelling;
* ``flag_values``: CLI flags that set it to a fixed value, e.g. ``{"--sequential": False}``;
* ``parse``: text -> one value (of a tuple field: one item), for types beyond numbers and words;
* ``metavar``: how the CLI help names its value.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import operator
import re
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from loracompose.errors import UserError


@dataclass(frozen=True)
class Setting:
    """One setting of a method: a dataclass field and what front-ends need to show and parse it."""

    name: str
    hint: Any  # the field's type without ``| None`` (Any where it cannot be resolved)
    optional: bool  # None is a valid value
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    flags: tuple[str, ...] = ()
    flag_values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    suggestions: tuple[str, ...] = ()  # values the docstring quotes (``"keep"``): a form's dropdown

    @property
    def origin(self) -> Any:
        """``tuple``, ``list``, ``dict``, ``Literal``... of the hint (None for a plain class)."""
        return typing.get_origin(self.hint)

    @property
    def item_hint(self) -> Any:
        """The item type of a ``tuple[X, ...]``/``list[X]`` (of a dict: the value type)."""
        args = typing.get_args(self.hint)
        if self.origin is dict:
            return args[1] if len(args) == 2 else Any
        return args[0] if args else Any

    @property
    def fixed_length(self) -> int | None:
        """The length of a ``tuple[X, Y]`` (None for variable-length types)."""
        args = typing.get_args(self.hint)
        return len(args) if self.origin is tuple and args and args[-1] is not Ellipsis else None


def method_settings(method_class: type) -> list[Setting]:
    """The settings of a method class: its init fields, in declaration order."""
    docs = field_help(method_class)
    settings = []
    for field in dataclasses.fields(method_class):
        if not field.init:
            continue
        optional, hint = strip_optional(field_type(method_class, field))
        meta = field.metadata
        choices = meta.get("choices") or (tuple(typing.get_args(hint)) if typing.get_origin(hint) is typing.Literal
                                          else None)
        settings.append(Setting(
            name=field.name, hint=hint, optional=optional, default=default_of(field),
            help=meta.get("help") or plain_text(docs.get(field.name, "")), choices=choices,
            flags=tuple(meta.get("flags", ())), flag_values=dict(meta.get("flag_values", {})),
            parse=meta.get("parse"), metavar=meta.get("metavar"),
            suggestions=tuple(doc_choices(docs.get(field.name, ""))),
        ))
    return settings


def build_method(method_class: type, values: Mapping[str, Any], label: str | None = None) -> Any:
    """``method_class(**values)`` with the values checked against its settings: an unknown key or a
    value the method refuses is a one-line UserError naming ``label`` (default: the method's name)."""
    label = label or getattr(method_class, "name", method_class.__name__)
    known = {setting.name: setting for setting in method_settings(method_class)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"method {label}: setting {unknown[0]!r} is not known; use "
                        f"{', '.join(known) or 'none (it has no settings)'}")
    try:
        return method_class(**{key: _as_field_value(value, known[key]) for key, value in values.items()})
    except (TypeError, ValueError) as error:
        if isinstance(error, UserError):
            raise
        raise UserError(f"method {label}: {error}; check its settings") from None


def _as_field_value(value: Any, setting: Setting) -> Any:
    """Lists (from YAML, JSON or a form) as the tuples a tuple field holds."""
    if setting.origin is tuple and isinstance(value, list):
        return tuple(tuple(item) if isinstance(item, list) else item for item in value)
    return value


# ------------------------------------------------------------------------------------ reading fields


def field_type(method_class: type, field: dataclasses.Field) -> Any:
    """The field's type, resolved in the module that declares it (Any if it names something that
    only exists for type checkers)."""
    hint = field.type
    if not isinstance(hint, str):
        return hint
    owner = next((klass for klass in method_class.__mro__ if field.name in inspect.get_annotations(klass)),
                 method_class)
    namespace = {**vars(typing), **vars(sys.modules[owner.__module__])}
    try:  # the class's own annotation text, evaluated as typing.get_type_hints does
        return eval(hint, namespace)
    except Exception:  # a name only imported under TYPE_CHECKING
        return Any


def strip_optional(hint: Any) -> tuple[bool, Any]:
    """(whether None is allowed, the hint without None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) < len(typing.get_args(hint)):
            return True, args[0] if len(args) == 1 else functools.reduce(operator.or_, args)
    return False, hint


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def field_help(method_class: type) -> dict[str, str]:
    """Field descriptions from the ``Attributes:``/``Args:`` sections of the class docstrings
    (base classes first, so a subclass's text wins); ``a / b: text`` describes both fields."""
    found: dict[str, str] = {}
    for klass in reversed(method_class.__mro__):
        section = re.split(r"^\s*(?:Attributes|Args):\s*$", klass.__dict__.get("__doc__") or "", maxsplit=1,
                           flags=re.MULTILINE)
        if len(section) < 2:
            continue
        for match in re.finditer(r"^( +)([\w /]+?):\s+(.+(?:\n\1 {2,}\S.*)*)", section[1], flags=re.MULTILINE):
            text = " ".join(match.group(3).split())
            for name in match.group(2).split("/"):
                found[name.strip()] = text
    return found


def plain_text(help_text: str) -> str:
    """A docstring fragment without reST markup: ``"keep"`` -> "keep", :meth:`x` -> x."""
    return re.sub(r":\w+:`([^`]*)`", r"\1", help_text).replace("``", "")


def doc_choices(help_text: str) -> list[str]:
    """The quoted values a field's docstring entry lists (``"keep"``, ``"cond"``...), in order."""
    return list(dict.fromkeys(re.findall(r'``"([^"`]+)"``', help_text)))
