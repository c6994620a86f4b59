"""User-facing errors. Each carries a one-line message that names the problem; the CLI prints it
without a traceback. Anything else escaping the engine is a bug.

A message that names one of the caller's arguments writes it as `arg(name)` (or `arg(name, value)`):
the library reads `expand` (`expand=0.5`), the command line `--expand` (`--expand 0.5`). `str(error)`
is the library's wording; `error.worded(spell)` names each argument as `spell(name)` says, which is
how the CLI shows its flags (its table of parameter names and flags is `hmar_cli.flags`); and
`error.params` lists the arguments a message names. Notes (what an edit prints beside its output)
name arguments the same way: `worded(note, spell)`.
"""
from __future__ import annotations

import re
from typing import Callable

# An argument's place in a message: control characters that no message text holds (user text in a
# message is shown through repr, which escapes them), around a parameter name and an optional value.
_START, _VALUE, _END = "\x02", "\x1f", "\x03"
_ARGUMENT = re.compile(f"{_START}([A-Za-z_][A-Za-z0-9_]*)(?:{_VALUE}([^{_START}{_END}]*))?{_END}")


def arg(name: str, value: object = None) -> str:
    """The caller's argument `name` (with `value`, as the caller gave it) in an error message."""
    return f"{_START}{name}{'' if value is None else _VALUE + str(value)}{_END}"


def worded(text: str, spell: Callable[[str, str | None], str]) -> str:
    """`text` (a message or a note) with each `arg` in it named by `spell(name, value)`."""
    return _ARGUMENT.sub(lambda match: spell(match[1], match[2]), text)


def library_spelling(name: str, value: str | None) -> str:
    """How a Python caller reads an argument: `expand`, or `expand=0.5`."""
    return name if value is None else f"{name}={value}"


class HmarError(Exception):
    """Base class: a problem the user can fix (bad input, missing model, bad checkpoint…)."""

    #: exit code the CLI uses: 2 for usage errors, 1 for runtime failures
    exit_code = 1

    def __init__(self, message: str = "", *args):
        message = str(message)
        self.template = message
        self.params = tuple(dict.fromkeys(match[1] for match in _ARGUMENT.finditer(message)))
        super().__init__(self.worded(library_spelling), *args)

    def worded(self, spell: Callable[[str, str | None], str]) -> str:
        """The message with each argument named by `spell(name, value)` (value None: the name alone)."""
        return worded(self.template, spell)


class ConfigError(HmarError):
    """A config.json or preset that does not describe a valid model."""

    exit_code = 2


class ScheduleError(HmarError):
    """A mask schedule or step count that does not fit the model's scales."""

    exit_code = 2


class CheckpointError(HmarError):
    """A weight file that is missing, unreadable or does not fit the model."""


class InputError(HmarError):
    """A bad user input (image, mask, class, box…)."""

    exit_code = 2


class DeviceError(HmarError):
    """A requested device that this machine does not have."""
