"""The ``ragline`` command: :mod:`.commands` holds the commands, :mod:`.render` what they print."""

from ragline.cli.commands import cli, main

__all__ = ["cli", "main"]
