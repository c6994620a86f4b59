"""Entry point of the `hmar` command."""
import typer

app = typer.Typer(name="hmar", help="HMAR image generation and zero-shot editing.", no_args_is_help=True)


@app.callback()
def _root() -> None:
    """HMAR image generation and zero-shot editing."""


def main() -> None:
    app()
