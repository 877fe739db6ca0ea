"""Where ragline keeps per-user state: default indexes and model caches.

``RAGLINE_HOME`` overrides the default ``~/.cache/ragline``; ``RAGLINE_MODELS`` overrides where converted
model weights are kept (default ``<RAGLINE_HOME>/models``).
"""

import os
from pathlib import Path


def home() -> Path:
    root = os.environ.get("RAGLINE_HOME")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ragline"


def default_index_dir() -> Path:
    """The index the CLI uses when ``--index`` is not given: the bundled Wikipedia leads."""
    return home() / "indexes" / "wiki-leads"


def models_dir() -> Path:
    """Converted (dequantised) bundled generators, one folder each."""
    root = os.environ.get("RAGLINE_MODELS")
    return Path(root).expanduser() if root else home() / "models"
