"""Command-line flags for attention patterns: ``--attention PATTERN`` and the chosen pattern's options
as flags of their own (``--attention sliding_window --window 512 --dilation 1 2``), made from the
pattern's options dataclass by the same mechanism as method options (deltatune.flags)."""

from __future__ import annotations

import argparse
from typing import Any

from deltatune import flags
from deltatune.attention import DEFAULT
from deltatune.attention.registry import pattern_named, registered


def attention_help() -> str:
    lines = ["attention pattern for long inputs (its options are flags of their own):", f"  {DEFAULT}: full attention"]
    lines += [f"  {p.name}: {p.summary}" for p in registered()]
    return "\n".join(lines)


def chosen_pattern(argv: list[str], default: str = DEFAULT) -> str:
    """``--attention``'s value, read before the full parser exists (it decides the option flags)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--attention")
    known, _ = pre.parse_known_args(argv)
    return known.attention or default


def add_attention_flags(
    parser: argparse.ArgumentParser, pattern: str, skip: set[str] = frozenset(), with_choice: bool = True
) -> set[str]:
    """Add ``--attention`` (unless ``with_choice`` is False: the caller has it) and ``pattern``'s options.
    Returns the option field names."""
    if with_choice:
        parser.add_argument(
            "--attention",
            default=DEFAULT,
            metavar="PATTERN",
            help=flags.escape(attention_help() + f"\n(default: {DEFAULT})"),
        )
    if pattern == DEFAULT:
        return set()
    record = pattern_named(pattern)
    group = parser.add_argument_group(f"{pattern} options (--attention {pattern})", record.summary)
    return flags.add_dataclass_flags(group, record.options_class, skip=set(skip))


def attention_options(args: dict[str, Any], names: set[str]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if k in names}
