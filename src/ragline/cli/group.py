"""The ``ragline`` command group and its entry point; the commands register on it from their modules.

Every bad input ends in one line on stderr, ``error: <problem>; <fix>``, and exit code 2.
"""

from __future__ import annotations

import sys

import click

from ragline.cli import render
from ragline.errors import RaglineError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ragline")
def cli() -> None:
    """ragline: Retrieval-Augmented Generation on CPU."""


def main() -> None:
    """The ``ragline`` entry point: run a command, turning refusals into one line and exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except RaglineError as e:
        render.error(str(e))
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        render.log("interrupted; run the same command again to resume")
        sys.exit(130)
