"""The README stays a newcomer's page: short, and its examples name commands, flags and functions that exist.

Commands are checked through the ``deltatune`` entry point (``python -m deltatune ... --help``), never through the
command line's internal modules, so the test holds whatever shape the command-line package takes.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import deltatune as dt

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 300
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
# a positional {a,b,...} (commands), not an option's choices: the word before it is not a flag
CHOICES = re.compile(r"(?:^|\s)(?!\[?-[^\s\]]*\s)\S+\s+\{([a-z][a-z0-9_-]*(?:,[a-z][a-z0-9_-]*)+)\}", re.M)
SHELL_ENDS = {"--", "|", "||", "&&", ";", ">", ">>", "<", "&"}

# Runs `deltatune ARGV... --help` for every ARGV in one interpreter (one import of torch, not one per command),
# through the package's own `python -m deltatune` entry, and prints {argv: {"code", "text"}} as JSON.
HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys
answers = {}
for argv in json.loads(sys.argv[1]):
    text, code = io.StringIO(), None
    sys.argv = ["deltatune", *argv, "--help"]
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
        try:
            runpy.run_module("deltatune", run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            code = stop.code
    answers[" ".join(argv)] = {"code": code, "text": text.getvalue()}
print(json.dumps(answers))
"""


def code_blocks(text: str, languages: set[str]) -> list[str]:
    return [body for lang, body in BLOCK.findall(text) if lang in languages]


def shell_commands(text: str) -> list[list[str]]:
    """Every `deltatune ...` call in the shell blocks (``bash``, ``sh``, unlabelled), as its words after
    `deltatune` up to the end of the command (a comment, a pipe, `&&`, or `--` before passed-on flags)."""
    calls = []
    for block in code_blocks(text, {"bash", "sh", "shell", "console", ""}):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                words = line.split()
            for i, word in enumerate(words):
                if word == "deltatune" or word.endswith("/deltatune"):
                    rest = words[i + 1 :]
                    end = next((j for j, w in enumerate(rest) if w in SHELL_ENDS), len(rest))
                    calls.append(rest[:end])
    return calls


_HELP: dict[str, dict] = {}  # "argv words" -> {"code", "text"}, shared by the tests of one session


def help_texts(argvs: list[list[str]]) -> dict[str, dict]:
    """`deltatune ARGV --help` for each ARGV, from one interpreter for all that were not asked before."""
    todo = [a for a in argvs if " ".join(a) not in _HELP]
    if todo:
        script = [sys.executable, "-c", HELP_RUNNER, json.dumps(todo)]
        done = subprocess.run(script, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert done.returncode == 0, f"the help runner failed:\n{done.stderr[-3000:]}"
        _HELP.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return {" ".join(a): _HELP[" ".join(a)] for a in argvs}


def subcommands(top_help: str) -> set[str]:
    found = CHOICES.search(top_help)
    assert found, f"`deltatune --help` lists no {{command,...}} choices:\n{top_help}"
    return set(found.group(1).split(","))


def help_argv(call: list[str], nested: dict[str, set[str]]) -> list[str]:
    """The words whose --help lists this call's flags: the command, a nested command (`analyze subspace`),
    and `--method M` (a method's options are flags only once the method is named)."""
    argv = call[:1]
    if len(call) > 1 and call[1] in nested.get(call[0], set()):
        argv.append(call[1])
    if "--method" in call and call.index("--method") + 1 < len(call):
        argv += ["--method", call[call.index("--method") + 1]]
    return argv


def problems(text: str) -> list[str]:
    """What in ``text``'s shell blocks the real command line does not know: commands and flags."""
    calls = [c for c in shell_commands(text) if c]
    named = sorted({c[0] for c in calls})
    answers = help_texts([[], *([c] for c in named if not c.startswith("-"))])
    known = subcommands(answers[""]["text"])
    found = [f"`deltatune {c[0]}`: no such command (known: {sorted(known)})" for c in calls if c[0] not in known]
    calls = [c for c in calls if c[0] in known]
    nested = {c: subcommands(answers[c]["text"]) for c in named if c in known and CHOICES.search(answers[c]["text"])}
    answers = help_texts([list(a) for a in sorted({tuple(help_argv(c, nested)) for c in calls})])
    for call in calls:
        key = " ".join(help_argv(call, nested))
        answer = answers[key]
        if answer["code"] not in (0, None):
            found.append(f"`deltatune {key} --help` exits {answer['code']}: {answer['text'][-300:]}")
            continue
        flags = set(FLAG.findall(answer["text"]))
        found += [f"`deltatune {' '.join(call)}`: no flag {f}" for f in FLAG.findall(" ".join(call)) if f not in flags]
    return found


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines (at most {MAX_LINES}): move details into docs/"


def test_every_readme_command_and_flag_exists():
    text = README.read_text(encoding="utf-8")
    assert len(shell_commands(text)) >= 10, "the README's tour lost its command examples"
    found = problems(text)
    assert not found, "README.md names commands or flags the command line does not have:\n" + "\n".join(found)


def test_a_misspelt_command_or_flag_is_caught():
    text = "```bash\ndeltatune trian --data x.jsonl\ndeltatune eval --adapter a \\\n    --num-beam 5   # typo\n```\n"
    found = problems(text)
    assert any("deltatune trian" in p for p in found), found
    assert any("--num-beam" in p and "no flag" in p for p in found), found


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("```bash\ntorchrun --nproc_per_node 2 -m deltatune train --fsdp  # x\n```\n", [["train", "--fsdp"]]),
        ("```bash\ndeltatune sweep --ranks 1 -- --data t.jsonl\n```\n", [["sweep", "--ranks", "1"]]),
        ("```python\nimport deltatune as dt\n```\n", []),
        ("```bash\nbash scripts/setup.sh && .venv/bin/deltatune train\n```\n", [["train"]]),
    ],
)
def test_shell_commands_are_read_as_a_shell_would(text, expected):
    assert shell_commands(text) == expected


def test_every_name_the_python_examples_use_exists():
    """`dt.NAME` is public in deltatune, and `model.NAME(` is a DeltaModel method."""
    python = "\n".join(code_blocks(README.read_text(encoding="utf-8"), {"python"}))
    missing = [n for n in re.findall(r"\bdt\.(\w+)", python) if n not in dt.__all__]
    missing += [f"model.{n}" for n in re.findall(r"\bmodel\.(\w+)\(", python) if not hasattr(dt.DeltaModel, n)]
    assert not missing, f"README.md's Python examples use names that do not exist: {missing}"
