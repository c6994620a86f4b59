"""Entry point of the `hmar` command: the Typer app, global options and error handling.

Every failure ends the same way, whether the app runs as a process or under Typer's CliRunner: one
line `error: …` on stderr and exit code 2 for usage errors (bad flags, bad input) or 1 for runtime
failures; a traceback only with --debug.
"""
from __future__ import annotations

import sys
import traceback

import typer
from typer.core import TyperGroup

from hmar_cli import bench, editing, env, generate, models, train
from hmar_cli.state import state

# click's exception classes: Typer re-exports BadParameter from them (newer Typer vendors click)
click_errors = sys.modules[typer.BadParameter.__module__]


class HmarGroup(TyperGroup):
    """The root command: runs the app and turns every exception into one line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from hmar.errors import HmarError

        state.debug = False
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except HmarError as exc:
            _fail(str(exc), exc.exit_code, exc)
        except click_errors.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `hmar models`: that group's help
                if exc.format_message():  # click's message is the help (Typer prints it itself)
                    print(exc.format_message())
                sys.exit(exc.exit_code)
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            _fail(exc.format_message() + hint, exc.exit_code)
        except click_errors.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except typer.Abort:
            _fail("aborted", 1)
        except Exception as exc:  # anything else is a bug in hmar
            _fail(f"{type(exc).__name__}: {exc} (a bug in hmar; run with --debug for the traceback)", 1, exc)
        sys.exit(result if isinstance(result, int) else 0)  # an int here is a typer.Exit code


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
    app(prog_name="hmar")
