"""`python -m pipeline` is the `vidlens` command."""

from pipeline.cli import command

command()
