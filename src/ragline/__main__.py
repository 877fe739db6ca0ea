"""``python -m ragline``: the ``ragline`` command."""

from ragline.cli import main

main()
