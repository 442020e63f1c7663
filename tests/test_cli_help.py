"""One convention for help text (issue 26): every flag's help is its field's attribute docstring. Every config the
command line turns into flags documents each flag that way, and a flag described only another way (a comment,
``metadata``, the class docstring) is caught."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap

import pytest

from deltatune import flags, methods
from deltatune.attention.registry import registered
from deltatune.serving.config import ServeConfig
from deltatune.training.config import TrainConfig

CONFIGS = [*methods.CONFIGS.values(), TrainConfig, ServeConfig, *(p.options_class for p in registered())]


def declared_docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings read another way than flags.py does (lines, not ast): a ``name: type`` line at the
    class body's indent, then a triple-quoted string starting on the next line."""
    out = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = textwrap.dedent(inspect.getsource(klass)).splitlines()
        except (OSError, TypeError):
            continue
        for i in range(len(lines) - 1):
            field = re.match(r"    (\w+): ", lines[i])
            start = lines[i + 1].strip()
            if not field or not start.startswith('"""'):
                continue
            text, j = start[3:], i + 1
            while not text.endswith('"""'):
                j += 1
                text += " " + lines[j].strip()
            out[field.group(1)] = " ".join(text[:-3].split())
    return out


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_flag_has_an_attribute_docstring(cls):
    hidden = set(getattr(cls, "cli_hidden", ()))
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in hidden]
    assert flags.undocumented_fields(cls) == []
    helps = {k: " ".join(v.split()) for k, v in flags.field_help(cls).items()}
    expected = declared_docstrings(cls)
    assert {n: helps[n] for n in names} == {n: expected[n] for n in names}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_no_other_help_convention(cls):
    """No field carries ``metadata={"help": ...}`` and no field line ends in a comment meant as help."""
    assert not [f.name for f in dataclasses.fields(cls) if "help" in f.metadata]
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass) or klass.__module__.startswith("builtins"):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        lines = textwrap.dedent(inspect.getsource(klass)).splitlines()
        fields = {f.name for f in dataclasses.fields(cls)}
        for node in tree.body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in fields:
                assert "#" not in lines[node.end_lineno - 1].split("=")[-1], (klass.__name__, node.target.id)


def test_other_conventions_are_not_read():
    @dataclasses.dataclass
    class Mixed:
        """Options:
        listed: from an Options block"""

        meta: int = dataclasses.field(default=1, metadata={"help": "from metadata"})
        commented: int = 2  # from a comment
        listed: int = 3
        documented: int = 4
        """from the attribute docstring"""

    assert flags.field_help(Mixed) == {"documented": "from the attribute docstring"}
    assert flags.undocumented_fields(Mixed) == ["meta", "commented", "listed"]
    parser = argparse.ArgumentParser()
    flags.add_dataclass_flags(parser, Mixed)
    assert {a.dest: a.help for a in parser._actions}["documented"] == "from the attribute docstring (default: 4)"
