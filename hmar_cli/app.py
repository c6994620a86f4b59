"""Entry point of the `hmar` command: the Typer app, global options and error handling.

Errors the user can fix (`hmar.errors.HmarError`, bad parameters) print one line on stderr and exit
with 2 (usage) or 1 (runtime); a traceback only with --debug.
"""
from __future__ import annotations

import sys

import typer

from hmar_cli import bench, generate
from hmar_cli.state import state

app = typer.Typer(
    name="hmar",
    help="HMAR image generation and zero-shot editing.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("generate")(generate.generate)
app.add_typer(bench.app, name="bench")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    """HMAR image generation and zero-shot editing."""
    state.debug = debug


def main() -> None:
    from hmar.errors import HmarError

    try:
        app(standalone_mode=False)
    except HmarError as exc:
        _fail(exc, str(exc), exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _fail(None, "aborted", 1)
    except Exception as exc:  # usage errors (exit 2) and everything unexpected (a bug: exit 1)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            _fail(exc, exc.format_message(), exc.exit_code)
        _fail(exc, f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)


def _fail(exc: BaseException | None, message: str, code: int) -> None:
    if state.debug and exc is not None:
        import traceback

        traceback.print_exception(exc)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
