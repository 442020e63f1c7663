"""Command-line flags from dataclass configs, with help text taken from the configs' own documentation.

One convention: a field's help is its attribute docstring, the string literal right after it::

    batch_size: int = 8
    '''examples per micro-batch'''

(a base class's field keeps the docstring written under it). Nothing else is read: not comments, not
``field(metadata=...)``, not the class docstring. The default and any ``typing.Literal`` choices are added to it;
:func:`undocumented_fields` lists the fields without one (tests/test_contract.py and tests/test_cli_help.py keep
that list empty).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import json
import sys
import textwrap
import types
import typing
from typing import Any

_REGEX_CHARS = set("*[]()|\\^$+?")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, keeping the line breaks of help texts (the method list of ``--method``)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        lines = []
        for part in text.splitlines():
            indent = " " * (len(part) - len(part.lstrip()))
            lines += textwrap.wrap(part, width, initial_indent="", subsequent_indent=indent + "    ") or [""]
        return lines


# --- flags --------------------------------------------------------------------------------------
def _members(hint: Any) -> set[Any]:
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return set(typing.get_args(hint)) - {type(None)} if is_union else {hint}


def _literal_choices(hint: Any) -> tuple[Any, ...]:
    return tuple(v for a in _members(hint) if typing.get_origin(a) is typing.Literal for v in typing.get_args(a))


def flag_kwargs(hint: Any) -> dict[str, Any]:
    """argparse settings for a dataclass field's type hint (``Literal`` choices are shown in the help, and checked
    by the config, whose error says more than argparse's)."""
    args = _members(hint)
    if bool in args and str in args:  # e.g. init_lora_weights: true, false or a named init
        return {"type": bool_or_str, "metavar": "VALUE"}
    if bool in args:
        return {"action": argparse.BooleanOptionalAction}
    if any(typing.get_origin(a) is list for a in args):
        inner = next(typing.get_args(a)[0] for a in args if typing.get_origin(a) is list)
        return {"nargs": "+", "type": inner if inner in (int, float) else str}
    if any(typing.get_origin(a) is dict for a in args):
        return {"type": json.loads, "metavar": "JSON"}
    for simple in (int, float, str):
        if simple in args:
            return {"type": simple}
    return {"type": str}


def bool_or_str(text: str) -> bool | str:
    """``true``/``false`` (any case) as booleans, anything else as the string itself."""
    return {"true": True, "false": False}.get(text.lower(), text)


def add_dataclass_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    skip: set[str] = frozenset(),
    only: typing.Iterable[str] | None = None,
    choices: dict[str, typing.Sequence[str]] | None = None,
) -> set[str]:
    """Add a ``--field-name`` flag per init field of dataclass ``cls`` (but ``skip`` and ``cls.cli_hidden``;
    only those in ``only`` when given, in its order), with help from :func:`field_help`. Unset flags stay out
    of the parsed namespace. ``choices`` lists values to show in a flag's help. Returns the field names."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    skip = set(skip) | set(getattr(cls, "cli_hidden", ()))
    helps = field_help(cls)
    names = set()
    for name in only if only is not None else fields:
        if name in skip or name not in fields:
            continue
        kwargs = flag_kwargs(hints[name])
        text = describe(fields[name], hints[name], helps.get(name), (choices or {}).get(name))
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS, help=escape(text), **kwargs
        )
        names.add(name)
    return names


def escape(text: str) -> str:
    return text.replace("%", "%%")


def describe(f: dataclasses.Field, hint: Any, text: str | None, choices: typing.Sequence[str] | None = None) -> str:
    """A flag's help: the field's description (or its type), its choices and its default."""
    text = text or f"{f.name.replace('_', ' ')} ({_type_name(hint)})"
    text = " ".join(text.split())
    choices = choices or _literal_choices(hint)
    if choices:
        text += f"; choices: {', '.join(map(str, choices))}"
    default = _default(f)
    if default is not dataclasses.MISSING and "(default:" not in text:  # the text may say what the default means
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        if default is None or default in ({}, [], ()):
            shown = "none"
        elif isinstance(default, bool):
            shown = "on" if default else "off"
        text += f" (default: {shown})"
    return text


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _type_name(hint: Any) -> str:
    names = []
    for a in _members(hint):
        origin = typing.get_origin(a)
        if origin is list or origin is tuple:
            names.append("list")
        elif origin is dict:
            names.append("JSON mapping")
        else:
            names.append(getattr(a, "__name__", str(a)))
    return " or ".join(sorted(names))


def normalise_targets(values: dict[str, Any]) -> None:
    """``--target-modules all-linear`` or one regex means the string, not a one-item list."""
    targets = values.get("target_modules")
    single = targets[0] if isinstance(targets, list) and len(targets) == 1 else None
    if single and (single == "all-linear" or _REGEX_CHARS & set(single)):
        values["target_modules"] = targets[0]


# --- help text from a class's documentation ---------------------------------------------------------
def field_help(cls: type) -> dict[str, str]:
    """Each documented init field's attribute docstring, from the class (or base class) that declares it."""
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        source = _attribute_docstrings(klass)
        for name in fields:
            if name not in out and name in source:
                out[name] = source[name]
    return out


def undocumented_fields(cls: type) -> list[str]:
    """Flags of ``cls`` whose help is only their type: nothing in the class's documentation describes them."""
    hidden = set(getattr(cls, "cli_hidden", ()))
    helps = field_help(cls)
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in hidden and f.name not in helps]


@functools.cache
def _attribute_docstrings(klass: type) -> dict[str, str]:
    """The attribute docstrings of the fields a class body declares."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
    out: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            out[node.target.id] = inspect.cleandoc(after.value.value)
    return out


# --- the method list ----------------------------------------------------------------------------
def method_summaries() -> dict[str, str]:
    """Each method's name and one line: the first line of its module's docstring (else its config's)."""
    from deltatune import methods

    out = {}
    for name, cls in methods.CONFIGS.items():
        doc = getattr(sys.modules.get(cls.__module__), "__doc__", None) or cls.__doc__ or name
        out[name] = inspect.cleandoc(doc).splitlines()[0].strip()
    return out


def method_help() -> str:
    lines = ["the PEFT method (its options are listed below; --method NAME --help shows NAME's):"]
    lines += [f"  {name}: {summary}" for name, summary in method_summaries().items()]
    return "\n".join(lines)
