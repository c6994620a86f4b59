"""Groups of options that several commands share, written once.

Typer reads a command's options from its signature, so a group is a function whose parameters are
the options; `option_group` appends them to each command's own and hands the command what the
group function makes of them, as one argument.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable


def option_group(provider: Callable, parameter: str) -> Callable:
    """A decorator that gives a command `provider`'s options as parameters after its own; the
    command receives `provider(**those options)` as its argument named `parameter`."""
    # eval_str: the annotations are strings (postponed evaluation) and Typer needs the types
    extra = list(inspect.signature(provider, eval_str=True).parameters.values())

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != parameter]

        @functools.wraps(command)
        def wrapper(**kwargs):
            made = provider(**{p.name: kwargs.pop(p.name) for p in extra})
            return command(**{parameter: made}, **kwargs)

        wrapper.__signature__ = inspect.Signature(own + extra)
        return wrapper

    return decorate
