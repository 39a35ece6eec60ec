"""The `vaekit` command: a table of commands, each declaring its arguments and calling the API.

The commands themselves live in `commands` (training and the uses of a run) and `detection` (anomaly detection and
its benchmark); this module holds the table, builds the parser from it and maps errors to exit codes in one place.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from .. import __version__, stopping
from ..errors import VaekitError

EPILOG = "Run 'vaekit COMMAND --help' for a command's options. Docs and examples: README.md."


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


Arg = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **options: Any) -> Arg:
    """One argument of a command: argparse's add_argument arguments; a default is added to the help."""
    return flags, options


@dataclass(frozen=True)
class Command:
    """One `vaekit` command: examples, its arguments and the function that runs it, whose docstring is its help."""

    name: str
    examples: tuple[str, ...]
    arguments: tuple[Arg, ...]
    run: Callable[[argparse.Namespace], None]
    takes_run: bool  # its first argument is a run directory


COMMANDS: dict[str, Command] = {}
GROUPS = {
    "anomaly": "find anomalies: calibrate a threshold, score data, measure against labels",
    "benchmark": "measure vaekit against standard protocols and classical baselines",
}


# For the commands that read a run's data: where those are now.
RUN_DATA_DIR = arg(
    "--data-dir",
    metavar="DIR",
    help="where the run's data are now, if they moved: a built-in set is looked for under DIR, a file or folder by its "
    "own name in DIR; data other than those the run was trained on are refused",
)


def command(examples: tuple[str, ...], *arguments: Arg, takes_run: bool = True, name: str = "") -> Callable:
    """Add the decorated function to COMMANDS, under name (default: its own name without underscores); a name of two
    words ("anomaly score") is a command of a group."""

    def register(run: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
        key = name or run.__name__.strip("_")
        COMMANDS[key] = Command(key, examples, arguments, run, takes_run)
        return run

    return register


def _build() -> argparse.ArgumentParser:
    """The parser of every command in COMMANDS."""
    from . import commands, compression, detection  # noqa: F401 (importing them fills COMMANDS)

    p = _Parser(prog="vaekit", description="Train, inspect and use variational auto-encoders.", epilog=EPILOG)
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    p.add_argument("--version", action="version", version=f"vaekit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    groups: dict[str, Any] = {}
    raw = argparse.RawDescriptionHelpFormatter
    for c in COMMANDS.values():
        doc = inspect.cleandoc(c.run.__doc__ or "")
        summary = doc.splitlines()[0]
        epilog = "examples:\n  " + "\n  ".join(c.examples)
        short = (summary[0].lower() + summary[1:].rstrip(".")).replace("%", "%%")
        where, name = sub, c.name
        if " " in c.name:
            group, name = c.name.split(" ", 1)
            if group not in groups:
                text = GROUPS[group]
                parent = sub.add_parser(group, help=text, description=text[0].upper() + text[1:] + ".")
                groups[group] = parent.add_subparsers(dest=group, required=True, metavar="COMMAND")
            where = groups[group]
        parser = where.add_parser(name, help=short, description=doc, epilog=epilog, formatter_class=raw)
        if c.takes_run:
            parser.add_argument("run", metavar="RUN", help="a run directory made by 'vaekit train'")
        for flags, options in c.arguments:
            default = options.get("default")
            if (
                isinstance(default, (int, str))
                and not isinstance(default, bool)
                and default != ""
                and options.get("help")
            ):
                options = {**options, "help": f"{options['help']} (default: {default})"}
            parser.add_argument(*flags, **options)
        parser.set_defaults(handler=_with_run(c.run) if c.takes_run else c.run)
    return p


def _with_run(handler: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """handler, given the run opened (with its data looked for in --data-dir, where the command has one)."""

    def run(a: argparse.Namespace) -> None:
        from ..run import open_run

        a.run = open_run(a.run, data_dir=getattr(a, "data_dir", None))
        handler(a)

    return run


# How torch's allocators (CPU, CUDA, MPS) say that a requested size cannot be had.
_MEMORY_ERRORS = ("out of memory", "not enough memory", "can't allocate memory", "size calculation overflowed")


def _lost_the_others(e: BaseException) -> bool:
    """Whether e is a collective of several processes (torchrun) failing because another process has ended."""
    if os.environ.get("WORLD_SIZE", "1") == "1":
        return False
    return type(e).__name__.startswith("Dist") or any(word in str(e) for word in ("gloo", "NCCL", "Connection closed"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vaekit` command: run one command; user errors are one line on stderr and exit code 2;
    SIGINT and SIGTERM, from start-up to the last write, one line and exit code 130 or 143 (training's own handlers
    save a checkpoint first)."""
    debug = False
    try:
        with stopping.handled():
            args = _build().parse_args(argv)
            debug = args.debug
            args.handler(args)
    except VaekitError as e:
        if debug:
            raise
        print(f"vaekit: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not debug and _lost_the_others(e):
            print("vaekit: error: another process of this run stopped (its message says why), so this one stops",
                  file=sys.stderr)  # fmt: skip
            return 2
        # Sizes a user asked for (huge images, layers or sample counts) can exhaust memory: their error, not a bug.
        if debug or not (isinstance(e, MemoryError) or any(m in str(e) for m in _MEMORY_ERRORS)):
            raise
        detail = str(e).splitlines()[0] if str(e) else "allocation failed"
        print(f"vaekit: error: out of memory ({detail.split(' (Triggered internally')[0]})", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # training.Interrupted carries its exit code; a plain KeyboardInterrupt comes from a caller's own handler.
        print(f"vaekit: {str(e) or 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    return 0
