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
        self._batches = self.table.to_batches()  # zero-copy, as written (PassageStoreWriter: 8,192 rows each)
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])  # (batches + 1,) first row of each

    def __len__(self) -> int:
        return int(self._starts[-1])

    def get(self, rows: Sequence[int] | np.ndarray) -> list[Passage]:
        """Passages at the given row numbers, in that order. Rows are taken from each record batch apart:
        a take over the whole table concatenates its columns first, which fails once a column holds more than
        2 GiB of text (Arrow's 32-bit string offsets; met at 10M passages)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"passage rows out of range 0..{len(self) - 1}")
        out: list[Passage] = [None] * len(rows)  # type: ignore[list-item]
        batch = np.searchsorted(self._starts, rows, side="right") - 1  # (m,) the batch holding each row
        order = np.argsort(batch, kind="stable")
        cuts = np.flatnonzero(np.diff(batch[order])) + 1
        for at in np.split(order, cuts) if rows.size else []:  # the positions of one batch's rows
            b = int(batch[at[0]])
            taken = self._batches[b].take(pa.array(rows[at] - self._starts[b]))
            for j, p in zip(at.tolist(), _passages(taken.to_pydict()), strict=True):
                out[j] = p
        return out

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
        """(first row, passages) for consecutive slices of ``batch_rows`` passages from ``start``.

        A scan reads the record batches with file calls, not through the memory map: every mapped page a scan
        touches would count in the process's resident memory (the whole store by its end: 6 GiB at 10M
        passages), where read pages stay in the page cache, which the kernel reclaims as it needs."""
        if start >= len(self):
            return
        first = int(np.searchsorted(self._starts, start, side="right")) - 1  # the batch holding ``start``
        with pa.OSFile(str(self.path)) as f:
            reader = pa.ipc.open_file(f)
            held: list[pa.RecordBatch] = []
            rows, lo = 0, start
            for i in range(first, reader.num_record_batches):
                batch = reader.get_batch(i)
                if i == first:
                    batch = batch.slice(start - int(self._starts[first]))
                held.append(batch)
                rows += batch.num_rows
                while rows >= batch_rows:
                    table = pa.Table.from_batches(held, schema=batch.schema)
                    yield lo, _passages(table.slice(0, batch_rows).to_pydict())
                    rest = table.slice(batch_rows)
                    held, rows, lo = rest.to_batches(), rest.num_rows, lo + batch_rows
            if rows:
                yield lo, _passages(pa.Table.from_batches(held, schema=reader.schema).to_pydict())
