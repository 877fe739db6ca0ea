"""Reading a JSONL or KILT corpus file in shards: one Ray task per byte range of the file.

The file is cut into ``shards`` byte ranges at line starts. A first round of tasks counts each range's lines
(so that every task knows the file line number of its first line: errors and default ids are the same as
when one process reads the file); a second round parses its range, splits the documents into passages and
writes the shard's passage store. The driver then checks that document ids are unique across shards (from
8-byte hashes of the ids) and lays the shards end to end: shard i's first row is the passages of shards
before it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ragline.corpus.passages import split_documents
from ragline.corpus.readers import ReadStats, Span, read_span
from ragline.corpus.store import PassageStoreWriter
from ragline.errors import RaglineError
from ragline.index import manifest as mf

CHUNK = 1 << 24  # bytes read at a time when counting lines


def line_ranges(path: Path, parts: int) -> list[tuple[int, int]]:
    """``parts`` byte ranges of ``path`` covering it, each starting at a line start (some may be empty)."""
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        for i in range(1, parts):
            f.seek(max(cuts[-1], i * size // parts))
            if f.tell() > 0:
                f.seek(f.tell() - 1)
                f.readline()  # to the start of the next line
            cuts.append(min(f.tell(), size))
    cuts.append(size)
    return list(zip(cuts, cuts[1:], strict=False))


def count_lines(path: str, start: int, end: int) -> int:
    n = 0
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            buf = f.read(min(CHUNK, left))
            if not buf:
                break
            n += buf.count(b"\n")
            left -= len(buf)
    return n


def read_part(path: str, fmt: str, span: Span, out: str, passage_words: int, skip_bad: bool) -> dict:
    """Parse one span into the passage store ``out``; its counts, fingerprint and the ids' 8-byte hashes."""
    stats = ReadStats()
    tmp = Path(out + ".new")
    ids: list[bytes] = []

    def docs():
        for d in read_span(path, fmt, span, skip_bad=skip_bad, stats=stats):
            ids.append(hashlib.blake2b(d.id.encode(), digest_size=8).digest())
            yield d

    try:
        with PassageStoreWriter(tmp) as w:
            w.add_all(split_documents(docs(), passage_words))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return {"passages": w.count, "fingerprint": w.fingerprint, "documents": stats.documents,
            "skipped": stats.skipped, "problems": stats.problems,
            "ids": np.frombuffer(b"".join(ids), dtype=np.uint64)}


def read_in_shards(ray, source: Path, fmt: str, parts: list[Path], passage_words: int, skip_bad: bool) -> list[dict]:
    """Write ``parts[i]/passages.arrow`` from the i-th byte range of ``source``; the shards' read results."""
    ranges = line_ranges(source, len(parts))
    count = ray.remote(num_cpus=1)(count_lines)
    lines = ray.get([count.remote(str(source), lo, hi) for lo, hi in ranges])
    first = np.concatenate([[1], 1 + np.cumsum(lines)[:-1]]).astype(int).tolist()
    task = ray.remote(num_cpus=1)(read_part)
    for p in parts:
        p.mkdir(parents=True, exist_ok=True)
    refs = [task.remote(str(source), fmt, Span(lo, hi, n), str(p / mf.PASSAGES), passage_words, skip_bad)
            for (lo, hi), n, p in zip(ranges, first, parts, strict=True)]
    try:
        results = ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(getattr(e, "cause", None), RaglineError):
            raise e.cause from None
        raise
    ids = np.concatenate([r.pop("ids") for r in results])
    repeated = len(ids) - len(np.unique(ids))
    if repeated:
        raise RaglineError(f"{source}: {repeated} document ids appear more than once",
                           "give every document a unique id (index the file without --ray to see the first "
                           "repeated one with its line)")
    empty = [p.name for p, r in zip(parts, results, strict=True) if r["passages"] == 0]
    if empty:
        raise RaglineError(f"{source} is too small for {len(parts)} shards ({', '.join(empty)} got no passage)",
                           "use fewer --shards")
    return results
