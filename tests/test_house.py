"""Method knowledge lives in deltatune/methods/ only: no other module of the library imports a method's
config or layer class, names one of a method's tensor stores (``lora_A``, ``ia3_l``, ...), or compares
against a method's peft_type. The rest of deltatune asks the method's record (``method_for(config)``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import deltatune
from deltatune import methods
from deltatune.config import DeltaConfig
from deltatune.methods import base

PACKAGE = Path(deltatune.__file__).parent
# The public facade re-exports every config class (``from deltatune import LoraConfig``): the one place
# outside methods/ that may name them.
FACADE = {"__init__.py"}
PENDING: set[str] = set()  # files still to move their method knowledge into the method records: none


def method_vocabulary() -> tuple[set[str], set[str], set[str]]:
    """(class names, tensor store names, peft_types) that belong to the methods, read off the registry."""
    shared_layers = {c for c in vars(base).values() if isinstance(c, type)}
    classes, stores = set(), set()
    for module in {m.inject.__module__ for m in methods.registered()} | {"deltatune.methods.prompt_learning"}:
        namespace = vars(__import__(module, fromlist=["_"]))
        for value in namespace.values():
            if not isinstance(value, type) or value in shared_layers or value is DeltaConfig:
                continue
            if issubclass(value, DeltaConfig) or issubclass(value, base.DeltaLayer):
                classes.add(value.__name__)
    for method in methods.registered():
        for layer in method.layer_classes:
            if layer not in shared_layers:
                stores.update(layer.adapter_attrs)
    return classes, stores, {m.peft_type for m in methods.registered()}


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose may name a tensor to explain a layout)."""
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for stmt in body:
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                    out.add(id(stmt.value))
    return out


def violations(source: str, classes: set[str], stores: set[str], peft_types: set[str]) -> list[str]:
    tree = ast.parse(source)
    skip = docstrings(tree)
    word = re.compile(r"\b(" + "|".join(map(re.escape, sorted(stores))) + r")\b")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deltatune.methods"):
            found += [f"line {node.lineno}: imports {a.name}" for a in node.names if a.name in classes]
        elif isinstance(node, ast.Attribute) and (node.attr in stores or node.attr in classes):
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in classes:
            found.append(f"line {node.lineno}: {node.id}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if node.value in peft_types:
                found.append(f"line {node.lineno}: peft_type {node.value!r}")
            elif word.search(node.value):
                found.append(f"line {node.lineno}: {node.value!r}")
    return found


def outside_methods() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "methods" not in p.relative_to(PACKAGE).parts)


def test_no_method_knowledge_outside_methods():
    classes, stores, peft_types = method_vocabulary()
    assert {"LoraConfig", "PromptLearningConfig", "LoraLinear"} <= classes and {"lora_A", "ia3_l"} <= stores
    bad = {}
    for path in outside_methods():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in FACADE or rel in PENDING:
            continue
        found = violations(path.read_text(), classes, stores, peft_types)
        if found:
            bad[rel] = found
    assert not bad, f"method knowledge outside deltatune/methods/ (ask the method's record instead): {bad}"


@pytest.mark.parametrize(
    "source",
    [
        "from deltatune.methods.prompt_learning import PromptLearningConfig\n",
        "from deltatune.methods.lora import LoraLinear as L\n",
        "def f(layer):\n    return layer.lora_A\n",
        "SUFFIXES = ('.lora_A.weight', '.lora_embedding_A')\n",
        "def f(config):\n    return config.peft_type == 'LORA'\n",
    ],
)
def test_the_check_catches(source):
    """The check itself: each of these is method knowledge it must find."""
    assert violations(source, *method_vocabulary())


def test_the_check_allows_prose_and_the_record():
    source = '"""Keys like ``q_proj.lora_A.weight``."""\nfrom deltatune.methods import method_for\n'
    assert not violations(source, *method_vocabulary())
