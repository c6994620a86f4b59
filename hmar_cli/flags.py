"""The command line's names for the library's arguments, in the errors it prints.

The engine's errors name the caller's arguments as the library spells them (`expand`, `feather=40`;
see `hmar.errors.arg`); the CLI prints them with the flags that set them (`--expand`, `--feather 40`).
A flag is its parameter's name with `--` and hyphens for underscores, except where `FLAGS` says.
"""
from __future__ import annotations

from hmar.errors import HmarError, worded

#: parameters whose flag is not `--` + the name with hyphens
FLAGS = {"label": "--class", "labels": "--class"}


def flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def cli_spelling(name: str, value: str | None) -> str:
    """`--feather 40`; a switch (value True) is the flag alone: giving it is its value."""
    return flag(name) if value in (None, "True") else f"{flag(name)} {value}"


def message(exc: BaseException) -> str:
    """An error's one line as the command line shows it."""
    return exc.worded(cli_spelling) if isinstance(exc, HmarError) else str(exc)


def text(line: str) -> str:
    """A note of the engine's (which names arguments as errors do) as the command line shows it."""
    return worded(line, cli_spelling)
