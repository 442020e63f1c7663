"""``deltatune`` command line: one module per command group, each thin over the library. A command's module is
imported only when that command runs, so ``deltatune eval --help`` does not load the training or serving code."""

from __future__ import annotations

import importlib
import sys

from deltatune.cli.train import train_config, train_parser
from deltatune.config import ConfigError

# command -> (module under deltatune.cli, function taking the command's own argv, returning the exit code)
COMMANDS = {
    "train": ("train", "cmd_train"),
    "eval": ("evaluate", "cmd_eval"),
    "generate": ("evaluate", "cmd_generate"),
    "export": ("export", "cmd_export"),
    "merge": ("merge", "cmd_merge"),
    "inspect": ("analyze", "cmd_inspect"),
    "serve": ("serve", "cmd_serve"),
    "analyze": ("analyze", "cmd_analyze"),
    "sweep": ("train", "cmd_sweep"),
}
__all__ = ["COMMANDS", "main", "train_config", "train_parser"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"deltatune: unknown command {argv[0]!r}", file=sys.stderr)
        print(
            f"usage: deltatune {{{','.join(COMMANDS)}}} [options]   (deltatune COMMAND --help for each)",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, function = COMMANDS[argv[0]]
    try:
        command = getattr(importlib.import_module(f"deltatune.cli.{module}"), function)
        return command(argv[1:])
    except (ConfigError, FileNotFoundError, ModuleNotFoundError) as err:
        message = err.args[0] if err.args else str(err)
        print(f"deltatune {argv[0]}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
