"""Index formats by name: the manifest's ``format`` picks the implementation that opens a directory.

The single index format (:mod:`ragline.index.directory`) is built in. Other formats plug in without
``index/`` importing them: through the ``ragline.index_formats`` entry-point group (the sharded format of
``ragline.scale`` registers there in pyproject.toml), or with :func:`register` at run time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from ragline.errors import RaglineError
from ragline.index import manifest as mf
from ragline.index.protocol import Index
from ragline.index.segments import open_single

ENTRY_POINTS = "ragline.index_formats"


@dataclass(frozen=True)
class IndexFormat:
    """How to read one format's manifest (checking the directory is complete) and open it as an Index."""

    name: str
    read_manifest: Callable[[Path], dict[str, Any]]
    open: Callable[[Path], Index]


_FORMATS: dict[str, IndexFormat] = {mf.FORMAT: IndexFormat(mf.FORMAT, mf.read_manifest, open_single)}


def register(fmt: IndexFormat) -> None:
    """Make ``fmt`` openable by :func:`open_index` (replacing any format of the same name)."""
    _FORMATS[fmt.name] = fmt


def implementation(name: str, path: Path | None = None) -> IndexFormat:
    """The registered format ``name``, loading its entry point on first use."""
    if name not in _FORMATS:
        for ep in entry_points(group=ENTRY_POINTS):
            if ep.name == name:
                register(ep.load())
    if name not in _FORMATS:
        where = f"{path} is" if path else "this index is"
        raise RaglineError(f"{where} a {name!r} index, a format this installation cannot open",
                           "install ragline with its extras (`pip install ragline[scale]` for sharded indexes) "
                           "or rebuild the index with `ragline index`")
    return _FORMATS[name]


def format_of(path: Path) -> str:
    """The ``format`` named by ``path``'s manifest; the single format's own checks report a missing or broken
    manifest."""
    try:
        name = json.loads((Path(path) / mf.MANIFEST).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return mf.FORMAT
    return name if isinstance(name, str) and name in _FORMATS or _entry_point_named(name) else mf.FORMAT


def _entry_point_named(name: object) -> bool:
    return isinstance(name, str) and any(ep.name == name for ep in entry_points(group=ENTRY_POINTS))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of any index directory, checked by its format."""
    path = Path(path)
    return implementation(format_of(path), path).read_manifest(path)


def open_index(path: str | Path) -> Index:
    """Open the index directory at ``path``, whatever its format (single, sharded, ...)."""
    path = Path(path).expanduser().resolve()
    return implementation(format_of(path), path).open(path)


def list_indexes(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Complete index directories of any format directly under ``root`` with their manifests (hidden build
    directories and broken indexes are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.name.startswith(".") and mf.is_index_dir(p):
            try:
                out.append((p, read_manifest(p)))
            except RaglineError:
                continue
    return out
