"""``generate``'s method flags, derived from the methods' settings (:mod:`loracompose.methods.settings`).

Every setting of every registered method gets ``--METHOD-FIELD`` (``--clora-step-size``; a bool gets
``--no-...`` too), plus the spellings its field metadata adds (``flags``: ``--fuse``; ``flag_values``:
``--sequential`` sets ``batched`` to False). A spelling several methods declare is one flag that sets
each of them. Adding a method therefore adds its flags with no CLI code.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from loracompose.errors import UserError
from loracompose.methods.settings import Setting, build_method, method_settings

DEST_PREFIX = "method_flag:"  # namespace attributes of method flags, apart from generate's own options
TAKES_VALUE = object()  # FlagUse.const of a flag followed by a value


class UsageError(UserError):
    """A command line that cannot work (reported like argparse's own errors)."""


@dataclass(frozen=True)
class FlagUse:
    """One method setting that a flag sets: to the value given after it, or to ``const``."""

    method: str
    setting: Setting
    const: Any = TAKES_VALUE

    @property
    def takes_value(self) -> bool:
        return self.const is TAKES_VALUE


def derived_flag(method: str, setting: Setting) -> str:
    return f"--{method}-{setting.name.replace('_', '-')}"


def flag_uses(methods: Mapping[str, type]) -> dict[str, list[FlagUse]]:
    """Every method flag (in registry and field order) and the settings it sets."""
    uses: dict[str, list[FlagUse]] = {}
    for method, method_class in methods.items():
        for setting in method_settings(method_class):
            if value_kind(setting) is None:
                continue  # a type the command line cannot spell (the Python API and suites take it)
            for index, flag in enumerate(dict.fromkeys([derived_flag(method, setting), *setting.flags])):
                # A bool's own flag is --x/--no-x; its other spellings switch it on.
                const = True if setting.hint is bool and index else TAKES_VALUE
                uses.setdefault(flag, []).append(FlagUse(method, setting, const))
            for flag, value in setting.flag_values.items():
                uses.setdefault(flag, []).append(FlagUse(method, setting, value))
    return uses


def option_strings(methods: Mapping[str, type]) -> dict[str, list[str]]:
    """Each argparse option (by its first flag) and all its spellings: a value-taking spelling that
    only one setting declares joins that setting's own flag (``--composite-mixing-weights,
    --mixing-weights``); shared spellings and fixed-value flags stay options of their own."""
    uses = flag_uses(methods)
    options: dict[str, list[str]] = {}
    for flag, flag_use in uses.items():
        use = flag_use[0]
        own = derived_flag(use.method, use.setting)
        if len(flag_use) == 1 and use.takes_value and flag != own and len(uses.get(own, [])) == 1:
            options[own].append(flag)
        else:
            options[flag] = [flag]
    return options


def add_method_arguments(parser: argparse.ArgumentParser, methods: Mapping[str, type]) -> None:
    """One argument group per method with its flags, and one for flags several methods share."""
    groups = {}
    for name, method_class in methods.items():
        summary = (method_class.__doc__ or "").strip().split("\n\n")[0]
        groups[name] = parser.add_argument_group(f"{name} (--method {name})", " ".join(summary.split()) or None)
    shared = None
    uses = flag_uses(methods)
    for flag, spellings in option_strings(methods).items():
        owners = list(dict.fromkeys(use.method for use in uses[flag]))
        if len(owners) == 1:
            group = groups[owners[0]]
        else:
            shared = shared or parser.add_argument_group("settings of several methods")
            group = shared
        _add_flag(group, spellings, uses[flag], owners)


def method_from_args(args: argparse.Namespace, methods: Mapping[str, type]) -> Any:
    """The ``--method`` object with the settings its flags give (the dataclass defaults otherwise).
    A flag of another method is a UsageError: it would silently do nothing."""
    name = args.method
    values: dict[str, Any] = {}
    uses = flag_uses(methods)
    for flag, spellings in option_strings(methods).items():
        given = getattr(args, DEST_PREFIX + flag, None)
        if given is None:
            continue
        mine = [use for use in uses[flag] if use.method == name]
        if not mine:
            owners = ", ".join(dict.fromkeys(use.method for use in uses[flag]))
            raise UsageError(f"{'/'.join(spellings)} is a setting of {owners}, not of --method {name}")
        for use in mine:
            values.setdefault(use.setting.name, _field_value("/".join(spellings), use, given))
    return build_method(methods[name], values)


# ------------------------------------------------------------------------------------ flag kinds


def value_kind(setting: Setting) -> str | None:
    """How a setting is spelled on the command line: 'bool', 'scalar', 'numbers' (one or more,
    commas or spaces), 'items' (one per repeated flag), 'pairs' (NAME=VALUE, repeated), or None."""
    hint, item = setting.hint, setting.item_hint
    if hint is bool:
        return "bool"
    if setting.parse is not None and setting.origin not in (tuple, list):
        return "scalar"
    if hint in (int, float, str) or setting.origin is typing.Literal:
        return "scalar"
    if setting.origin in (tuple, list):
        if setting.parse is not None or item in (str, Any) or _optional_str(item):
            return "items"
        if item in (int, float) and all(arg in (int, float, Ellipsis) for arg in typing.get_args(hint)):
            return "numbers"
    if setting.origin is dict and typing.get_args(hint)[:1] == (str,) and setting.item_hint in (int, float, str):
        return "pairs"
    return None


def _optional_str(hint: Any) -> bool:
    return (typing.get_origin(hint) in (typing.Union, types.UnionType)
            and set(typing.get_args(hint)) == {str, type(None)})


def _add_flag(group: Any, spellings: list[str], uses: list[FlagUse], owners: list[str]) -> None:
    flag, first = spellings[0], uses[0]
    setting, kind = first.setting, value_kind(first.setting)
    if any((use.const, value_kind(use.setting), use.setting.hint) != (first.const, kind, setting.hint) for use in uses):
        raise TypeError(f"{flag}: the methods {', '.join(owners)} declare it for settings of different kinds")
    prefix = f"{', '.join(owners)}: " if len(owners) > 1 else ""
    options = {"dest": DEST_PREFIX + flag, "default": None}
    if not first.takes_value:
        own = derived_flag("METHOD" if prefix else first.method, setting)
        spelled = (f"--no-{own[2:]}" if first.const is False else own) if setting.hint is bool else \
            f"{own} {first.const}"
        text = f"{prefix}same as {spelled}" + (f" ({_escape(setting.help)})" if prefix and setting.help else "")
        group.add_argument(*spellings, action="store_const", const=first.const, help=text, **options)
        return
    text = prefix + _escape(setting.help) + ("" if "default" in setting.help else _default_text(setting))
    metavar = setting.metavar or setting.name.upper()
    if kind == "bool":
        group.add_argument(*spellings, action=argparse.BooleanOptionalAction, help=text, **options)
    elif kind == "scalar":
        group.add_argument(*spellings, choices=setting.choices, metavar=None if setting.choices else metavar, help=text,
                           **options)
    elif kind == "numbers":
        number = setting.metavar or ("N" if setting.item_hint is int else "X")
        group.add_argument(*spellings, nargs="+", metavar=number, help=text, **options)
    elif kind == "items":
        group.add_argument(*spellings, action="append", metavar=setting.metavar or "TEXT",
                           help=f"{text}; repeat the flag, one value each", **options)
    else:  # pairs
        group.add_argument(*spellings, action="append", metavar=setting.metavar or "NAME=VALUE",
                           help=f"{text}; repeatable", **options)


def _field_value(flag: str, use: FlagUse, given: Any) -> Any:
    """The field value from the text argparse collected for the flag (a bad one is a UsageError)."""
    setting, kind = use.setting, value_kind(use.setting)
    if not use.takes_value or kind == "bool":
        return given
    if kind == "scalar":
        return _scalar_parser(flag, setting)(given)
    if kind == "pairs":
        return dict(map(_pair_parser(flag, setting), given))
    if kind == "numbers":
        parse = _number_list_parser(flag, setting.item_hint)
        items = [number for text in given for number in parse(text)]
    else:
        items = list(map(_item_parser(flag, setting), given))
    length = setting.fixed_length
    if length is not None and len(items) != length:
        raise UsageError(f"{flag} takes {length} values, got {len(items)}")
    return tuple(items)


def _scalar_parser(flag: str, setting: Setting) -> Callable[[str], Any]:
    convert = setting.parse or (setting.hint if setting.hint in (int, float) else str)
    return _argument_type(flag, convert, {int: "a whole number", float: "a number"}.get(setting.hint, "a value"))


def _item_parser(flag: str, setting: Setting) -> Callable[[str], Any]:
    return _argument_type(flag, setting.parse or str, "a value")


def _number_list_parser(flag: str, kind: type) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [kind(part) for part in text.split(",") if part.strip()]

    return _argument_type(flag, parse, "numbers separated by commas or spaces, e.g. 0,10,20 ('' for none)")


def _pair_parser(flag: str, setting: Setting) -> Callable[[str], tuple[str, Any]]:
    kind, choices = setting.item_hint, setting.choices
    expected = f"NAME=VALUE with VALUE one of {', '.join(map(str, choices))}" if choices else \
        f"NAME=VALUE with VALUE {'a number' if kind in (int, float) else 'a word'}"

    def parse(text: str) -> tuple[str, Any]:
        name, sep, value = text.partition("=")
        if not sep or not name.strip() or (choices and value.strip() not in choices):
            raise ValueError(text)
        return name.strip(), kind(value.strip())

    return _argument_type(flag, parse, expected)


def _argument_type(flag: str, convert: Callable[[str], Any], expected: str) -> Callable[[str], Any]:
    """``convert`` with its failures as one-line UsageErrors naming the flag and the text."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except UserError as error:  # the method's own parser names the flag already
            raise UsageError(str(error)) from None
        except (TypeError, ValueError):
            raise UsageError(f"{flag} {text!r}: give {expected}") from None

    return parse


def _default_text(setting: Setting) -> str:
    default = setting.default
    if setting.hint is bool:
        return f" (default: {'on' if default else 'off'})"
    if default is None:
        return " (default: automatic)" if setting.optional else ""
    if isinstance(default, (tuple, list, dict)) and not default:
        return " (default: none)"
    if isinstance(default, (tuple, list)):
        return f" (default: {','.join(map(str, default))})"
    if isinstance(default, float):
        return f" (default: {default:g})"
    return _escape(f" (default: {default})")


def _escape(text: str) -> str:
    """Help text as argparse formats it (``%`` is its format character)."""
    return text.replace("%", "%%")
