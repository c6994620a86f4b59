"""`python -m hmar_cli …` runs the `hmar` command (for machines where the entry point is not installed)."""
from hmar_cli.app import main

main()
