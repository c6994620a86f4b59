"""The hmar command-line tool (Typer). Nothing imports this package."""
