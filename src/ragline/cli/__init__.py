"""The ``ragline`` command. :mod:`.group` holds the group and its entry point, :mod:`.options` the options the
commands share, one module per family of commands (indexing, answering, evaluating, serving, training) the
commands, and :mod:`.render` what they print."""

from ragline.cli import answering, evaluating, indexing, serving, training  # noqa: F401 - each registers its commands
from ragline.cli.group import cli, main

__all__ = ["cli", "main"]
