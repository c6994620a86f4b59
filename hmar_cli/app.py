"""Entry point of the `hmar` command: the Typer app, global options and error handling.

Every failure ends the same way, whether the app runs as a process or under Typer's CliRunner: one
line `error: …` on stderr and exit code 2 for usage errors (bad flags, bad input) or 1 for runtime
failures; a traceback only with --debug. Ctrl-C (SIGINT) and SIGTERM stop any command the same way:
the exception they raise unwinds it (so no temporary or half-written file stays behind, see
`hmar.atomic`), then one line and exit code 128 + the signal's number (130, 143), as shells report a
process a signal ended. Every number option must be finite: NaN and infinity are refused while the
command line is read, for every command (`finite_numbers`).
"""
from __future__ import annotations

import functools
import math
import os
import signal
import sys
import threading
import traceback

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _install(handler) -> dict:
    """Handle the stop signals with `handler`; the handlers it replaced (none outside the main
    thread, where Python delivers no signals)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def _restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _leave_at_once(signum, frame) -> None:
    """While the program starts nothing has been written yet: leave with one line instead of a
    KeyboardInterrupt traceback from inside some import. (The commands import torch and the engine in
    their bodies, under `_stop`.)"""
    os.write(2, f"error: stopped by {signal.Signals(signum).name}\n".encode())
    os._exit(128 + signum)


_previous = _install(_leave_at_once)
try:
    import typer
    from typer.core import TyperGroup

    from hmar_cli import bench, editing, env, generate, models, train
    from hmar_cli.flags import message
    from hmar_cli.state import state
finally:
    _restore(_previous)

# click's exception classes: Typer re-exports BadParameter from them (newer Typer vendors click)
click_errors = sys.modules[typer.BadParameter.__module__]


class Stopped(BaseException):
    """Raised by the first stop signal. Not an Exception, so that no `except Exception` in the
    engine swallows it; every `finally` and context manager on the way out still runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum, frame) -> None:
    _install(_leave_at_once)  # a second signal while the first unwinds: leave at once
    raise Stopped(signum)


def finite_numbers(command) -> None:
    """Make every command under `command` refuse a float option that is NaN or infinite before it
    runs: Typer reads "nan" and "inf" as floats, and an option without bounds would pass them on.
    The command's callback is wrapped: it sees the options after parsing, before the command body."""
    callback = command.callback
    if callback is not None:
        options = {param.name: param for param in command.params}

        @functools.wraps(callback)
        def checked(*args, **kwargs):
            for name, value in kwargs.items():
                for number in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(number, float) and not math.isfinite(number):
                        raise click_errors.BadParameter(f"{number} is not a finite number", param=options.get(name))
            return callback(*args, **kwargs)

        command.callback = checked
    for sub in getattr(command, "commands", {}).values():
        finite_numbers(sub)


class HmarGroup(TyperGroup):
    """The root command: runs the app and turns every exception into one line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from hmar.errors import HmarError

        state.debug = False
        finite_numbers(self)
        previous = _install(_stop)
        try:
            try:
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except Stopped as exc:
                _fail(f"stopped by {exc}", 128 + exc.signum)
            except HmarError as exc:
                _fail(message(exc), exc.exit_code, exc)
            except click_errors.UsageError as exc:
                if type(exc).__name__ == "NoArgsIsHelpError":  # `hmar models`: that group's help
                    if exc.format_message():  # click's message is the help (Typer prints it itself)
                        print(exc.format_message())
                    sys.exit(exc.exit_code)
                hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
                _fail(exc.format_message() + hint, exc.exit_code)
            except click_errors.ClickException as exc:
                _fail(exc.format_message(), exc.exit_code)
            except typer.Abort:  # end of input at a prompt
                _fail("aborted", 1)
            except Exception as exc:  # anything else is a bug in hmar
                _fail(f"{type(exc).__name__}: {exc} (a bug in hmar; run with --debug for the traceback)", 1, exc)
            sys.exit(result if isinstance(result, int) else 0)  # an int here is a typer.Exit code
        finally:
            _restore(previous)


def _fail(message: str, code: int, exc: BaseException | None = None) -> None:
    if state.debug and exc is not None:
        traceback.print_exception(exc)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


HELP = ("HMAR image generation and zero-shot editing.\n\n"
        "First try, offline with the bundled model: hmar generate --model hmar-tiny --class star --out star.png "
        "(its classes: hmar models info hmar-tiny).")

app = typer.Typer(
    name="hmar",
    cls=HmarGroup,
    help=HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("generate")(generate.generate)
app.command("inpaint")(editing.inpaint)
app.command("outpaint")(editing.outpaint)
app.command("edit")(editing.edit)
app.add_typer(models.app, name="models")
app.command("env")(env.env)
app.add_typer(bench.app, name="bench")
app.add_typer(train.app, name="train")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    state.debug = debug


def main() -> None:
    _install(_leave_at_once)  # until HmarGroup.main takes over: Typer builds the commands first
    app(prog_name="hmar")
