"""Passages in a memory-mapped Arrow IPC file: columns pid, doc_id, title, text and meta (a JSON object as
text: source, page or section, the document's metadata; stores written before it existed have no meta column
and read as empty metadata); row number = passage id in the indexes. Opening maps the file, so a corpus of
tens of millions of passages is never copied into Python lists; rows are fetched on demand.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from ragline.corpus.passages import Passage, encoder_text
from ragline.errors import RaglineError

LEGACY_SCHEMA = pa.schema([("pid", pa.string()), ("doc_id", pa.string()), ("title", pa.string()),
                           ("text", pa.string())])
SCHEMA = LEGACY_SCHEMA.append(pa.field("meta", pa.string()))
COLUMNS = tuple(SCHEMA.names)


def meta_text(meta: dict) -> str:
    """A passage's metadata as the store keeps it: compact JSON with sorted keys, or "" for none."""
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")) if meta else ""


def _passages(cols: dict[str, list]) -> list[Passage]:
    """Passages from columns as ``to_pydict`` gives them (a legacy store has no meta column)."""
    metas = cols.get("meta") or [""] * len(cols["pid"])
    return [Passage(p, d, t, x, json.loads(m) if m else {})
            for p, d, t, x, m in zip(cols["pid"], cols["doc_id"], cols["title"], cols["text"], metas, strict=True)]


class PassageStoreWriter:
    """Append passages in record batches; ``fingerprint`` hashes every passage in order."""

    def __init__(self, path: Path, batch_rows: int = 8192) -> None:
        self.path = Path(path)
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)
        self._batch: list[Passage] = []
        self._batch_rows = batch_rows
        self._hash = hashlib.blake2b(digest_size=16)
        self.count = 0

    def add(self, p: Passage) -> None:
        self._batch.append(p)
        meta = meta_text(p.meta)
        for part in (p.pid, p.title, p.text) + ((meta,) if meta else ()):  # no metadata: earlier fingerprints
            self._hash.update(part.encode())
            self._hash.update(b"\0")
        self.count += 1
        if len(self._batch) >= self._batch_rows:
            self._flush()

    def add_all(self, passages: Iterable[Passage]) -> None:
        for p in passages:
            self.add(p)

    def _flush(self) -> None:
        if self._batch:
            cols = [[p.pid for p in self._batch], [p.doc_id for p in self._batch], [p.title for p in self._batch],
                    [p.text for p in self._batch], [meta_text(p.meta) for p in self._batch]]
            self._writer.write_batch(pa.record_batch(cols, schema=SCHEMA))
            self._batch = []

    @property
    def fingerprint(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()

    def __enter__(self) -> PassageStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PassageStore:
    """Read-only, memory-mapped view of a passage file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise RaglineError(f"passage store {self.path} is missing", "rebuild the index with `ragline index`")
        self._source = pa.memory_map(str(self.path), "r")
        self.table = pa.ipc.open_file(self._source).read_all()  # zero-copy over the mapping
        if self.table.schema not in (SCHEMA, LEGACY_SCHEMA):
            raise RaglineError(f"{self.path} is not a ragline passage store", "rebuild the index")
        self._rows: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.table.num_rows

    def get(self, rows: Sequence[int] | np.ndarray) -> list[Passage]:
        """Passages at the given row numbers, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"passage rows out of range 0..{len(self) - 1}")
        return _passages(self.table.take(pa.array(rows)).to_pydict())

    def row_of(self, pid: str) -> int | None:
        """The row of passage ``pid``, or None (a pid -> row map is built on the first call)."""
        if self._rows is None:
            self._rows = {p: i for i, p in enumerate(self.values("pid"))}
        return self._rows.get(pid)

    def values(self, column: str) -> list[str]:
        """One column (``pid``, ``doc_id``, ``title``, ``text`` or ``meta``, as JSON text) for every row, in row
        order."""
        if column not in COLUMNS:
            raise KeyError(f"no column {column!r} in a passage store (it has {', '.join(COLUMNS)})")
        if column not in self.table.schema.names:  # meta in a legacy store
            return [""] * len(self)
        return self.table.column(column).to_pylist()

    def text_chunks(self, batch_rows: int = 16384) -> Iterator[list[str]]:
        """Every passage as the encoders and BM25 see it (title and text), in chunks of ``batch_rows``."""
        for _, batch in self.iter_batches(batch_rows):
            yield [encoder_text(x.title, x.text) for x in batch]

    def iter_batches(self, batch_rows: int = 4096, start: int = 0) -> Iterator[tuple[int, list[Passage]]]:
        """(first row, passages) for consecutive slices of the store from ``start``."""
        for lo in range(start, len(self), batch_rows):
            yield lo, _passages(self.table.slice(lo, batch_rows).to_pydict())
