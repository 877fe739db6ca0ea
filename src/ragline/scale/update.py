"""``ragline add``, ``update``, ``delete`` and ``compact`` on a sharded index.

A new document goes to one shard: the shard that holds it already (an update; a document the sharded build cut
across two shards goes to the first), else the shard its id hashes to; a deletion or an update removes its
passages from every shard holding some. The shards change as single indexes do (:mod:`ragline.index.update`:
a delta segment and tombstones written beside their current state), but no shard's own manifest is switched:
the new states go into the sharded manifest (each shard's ``manifest``, rows, fingerprint and first global
row), which is written last and atomically, so every shard moves to the new generation at once and a crash
leaves the previous one whole. Compaction writes each shard anew into a new directory (``dir``), switched to
by the same manifest; the old directories are removed after the switch.

The manifest is read and the shards are opened here, without Ray: a change needs no cluster. A running
``Retriever`` over the sharded index takes the new generation up on its next search, opening new shard actors.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from ragline import atomic
from ragline.corpus.passages import Passage
from ragline.index import manifest as mf
from ragline.index.segments import live_bm25_stats, open_single
from ragline.index.sparse import BM25Stats
from ragline.index.update import (
    ADD,
    COMPACT,
    UPDATE,
    Change,
    clean_stale,
    compact_into,
    document_hash,
    ensure_term_counts,
    history_entry,
    live_passages_by_document,
    plan,
    plan_deletion,
    read_documents,
    stage_generation,
)
from ragline.models.encoders import Encoder
from ragline.scale.sharded import BM25_GENERATION, LIVING_VERSION, SHARDS, read_sharded_manifest, shard_dir


def home_shard(doc_id: str, shards: int) -> int:
    """The shard a new document goes to: a stable hash of its id."""
    return int(hashlib.blake2b(doc_id.encode(), digest_size=8).hexdigest(), 16) % shards


class _Shards:
    """A sharded index's shards opened locally (no Ray) as its manifest describes them, without their search
    parts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.manifest = read_sharded_manifest(path)
        self.entries = self.manifest["shards"]
        self.dirs = [shard_dir(path, s) for s in self.entries]
        self.indexes = [open_single(d, s.get("manifest"), search=False)  # a change searches none of them
                        for d, s in zip(self.dirs, self.entries, strict=True)]
        self.generation = int(self.manifest.get("generation", 0)) + 1

    def live(self, only: Collection[str] | None = None) -> dict[str, tuple[list[tuple[int, list[int]]], str]]:
        """The live documents (among ``only``, when given): id -> ((shard, its rows there) for each shard
        holding some of it, in shard order; the content hash of all its passages). A sharded build cuts the
        corpus by passages, so one document may straddle two shards. With ``only``, each shard is read no
        further than its document ids and these documents' passages: a change costs what it touches."""
        held: dict[str, list[tuple[int, list[tuple[int, Passage]]]]] = {}
        for i, index in enumerate(self.indexes):
            for doc, pairs in live_passages_by_document(index, only).items():
                held.setdefault(doc, []).append((i, pairs))
        return {d: ([(i, [r for r, _ in pairs]) for i, pairs in parts],
                    document_hash([p for _, pairs in parts for _, p in pairs])) for d, parts in held.items()}

    def commit(self, states: list[dict[str, Any]], change: Change, sources: Sequence[str],
               dirs: list[str] | None = None, compacted: bool = False) -> None:
        """Write the sharded manifest naming every shard's new state (``states``: its manifest), last;
        ``compacted``: every shard's BM25 was rebuilt with the live corpus's statistics."""
        m = json.loads(json.dumps(self.manifest))
        offset, shards = 0, []
        for i, (entry, state) in enumerate(zip(self.entries, states, strict=True)):
            rows = _rows(state)
            shards.append({**entry, "offset": offset, "passages": rows, "fingerprint": state["fingerprint"],
                           "dir": dirs[i] if dirs else entry.get("dir", entry["name"]),
                           "manifest": {k: v for k, v in state.items() if k != "history"}})
            offset += rows
        live = sum(mf.live_passages(s) for s in states)
        m.update(format_version=LIVING_VERSION, generation=self.generation, shards=shards, live={"passages": live})
        if compacted:
            m[BM25_GENERATION] = self.generation
        change.generation = self.generation
        m["history"] = [*m.get("history", []), history_entry(change, sources, live)]
        m["fingerprint"] = hashlib.blake2b(json.dumps(
            {"previous": self.manifest["fingerprint"], "generation": self.generation,
             "shards": [s["fingerprint"] for s in shards]}).encode(), digest_size=8).hexdigest()
        atomic.write_json(self.path / mf.MANIFEST, m)
        atomic.fsync_dir(self.path)


def _rows(state: dict[str, Any]) -> int:
    """Rows of a shard in the state ``state`` (its base and segments, deleted rows included)."""
    return int(state["corpus"]["passages"]) + sum(int(s["passages"]) for s in state.get("segments") or [])


def _clean(shards: _Shards) -> None:
    """What a crashed change left: segments and tombstones no state names, shard directories no entry names."""
    named = {s.get("dir", s["name"]) for s in shards.entries}
    for d in (shards.path / SHARDS).iterdir():
        if d.is_dir() and d.name not in named:
            shutil.rmtree(d, ignore_errors=True)
    for d, index in zip(shards.dirs, shards.indexes, strict=True):
        clean_stale(d, index.manifest)


def change_sharded(path: str | Path, sources: Sequence[str], *, replace: bool = False, fmt: str = "auto",
                   skip_bad: bool = False, encoder: Encoder | None = None, batch_size: int = 64,
                   device: str | None = None, log: Callable[[str], None] = print) -> Change:
    """``ragline add`` / ``update`` on a sharded index: each document to its shard, one new generation."""
    path = Path(path).expanduser().resolve()
    with atomic.exclusive_lock(path.parent / f".{path.name}.lock"):
        shards = _Shards(path)
        _clean(shards)
        change = Change(UPDATE if replace else ADD)
        docs = read_documents(sources, fmt, skip_bad, change, shards.manifest)
        live = shards.live(only=[d for d, _ in docs])
        new = plan({d: ([], h) for d, (_, h) in live.items()}, docs, change, replace, path.name)
        n = len(shards.indexes)
        added: list[list[Passage]] = [[] for _ in range(n)]
        dead: list[list[int]] = [[] for _ in range(n)]
        for doc_id, passages in new:
            held = live[doc_id][0] if doc_id in live else []
            added[held[0][0] if held else home_shard(doc_id, n)].extend(passages)  # where it is, else its hash's
            for shard, rows in held:
                dead[shard].extend(rows)
        change.passages_added, change.passages_deleted = sum(map(len, added)), sum(map(len, dead))
        if change.changed:
            states = _stage(shards, added, dead, change, sources, encoder, batch_size, device, log)
            shards.commit(states, change, sources)
        log(change.summary())
        return change


def delete_sharded(path: str | Path, doc_ids: Sequence[str], log: Callable[[str], None] = print) -> Change:
    """``ragline delete`` on a sharded index."""
    path = Path(path).expanduser().resolve()
    with atomic.exclusive_lock(path.parent / f".{path.name}.lock"):
        shards = _Shards(path)
        _clean(shards)
        live = shards.live(only=doc_ids)
        change = plan_deletion({d: ([], h) for d, (_, h) in live.items()}, doc_ids, path.name)
        dead: list[list[int]] = [[] for _ in shards.indexes]
        for d in change.deleted:
            for shard, rows in live[d][0]:
                dead[shard].extend(rows)
        change.passages_deleted = sum(map(len, dead))
        states = _stage(shards, [[] for _ in dead], dead, change, [], None, 64, None, log)
        shards.commit(states, change, [])
        log(change.summary())
        return change


def compact_sharded(path: str | Path, log: Callable[[str], None] = print) -> Change:
    """``ragline compact`` on a sharded index: every shard rewritten over its live passages into a new
    directory, its BM25 built with the whole live corpus's statistics (so that BM25 scores in one round again,
    as after a build), all switched to by one manifest; the old directories are removed afterwards."""
    from ragline.index.build import finish_index

    path = Path(path).expanduser().resolve()
    with atomic.exclusive_lock(path.parent / f".{path.name}.lock"):
        shards = _Shards(path)
        _clean(shards)
        change = Change(COMPACT, generation=shards.generation)
        bm25_stats = _live_bm25_stats(shards, log) if shards.manifest.get("bm25") else None
        states, dirs = [], []
        for i, entry in enumerate(shards.entries):
            name = f"{entry['name']}.c{shards.generation:06d}"
            work = path / SHARDS / f".{name}.building"
            state, opts = compact_into(shards.indexes[i], work, change)
            shards.indexes[i] = None  # its maps (store, vectors) go before its new parts are built,
            gc.collect()  # as a single index's compact does: one shard's memory at a time, not every shard's
            finish_index(opts, work, path / SHARDS / name, state, log=lambda m: None, bm25_stats=bm25_stats)
            states.append(state)
            dirs.append(name)
        old = list(shards.dirs)
        shards.commit(states, change, [], dirs, compacted=True)
        for d in old:
            shutil.rmtree(d, ignore_errors=True)
        log(f"compacted index {path.name}: {sum(mf.live_passages(s) for s in states)} live passages in "
            f"{len(states)} shards (generation {shards.generation})")
        return change


def _live_bm25_stats(shards: _Shards, log: Callable[[str], None]) -> BM25Stats:
    """The BM25 statistics of the whole live corpus: every shard's, from its term counts, summed."""
    total = BM25Stats()
    for d, index in zip(shards.dirs, shards.indexes, strict=True):
        ensure_term_counts(d, index.manifest, log)
        total = total + live_bm25_stats(index)
    return total


def _stage(shards: _Shards, added: list[list], dead: list[list[int]], change: Change, sources: Sequence[str],
           encoder: Encoder | None, batch_size: int, device: str | None, log: Callable[[str], None]) -> list[dict]:
    """Every shard's next state: changed shards staged (segment, tombstones), the others as they are; all with
    BM25 term counts, which live statistics across shards need."""
    states = []
    for d, index, new, gone in zip(shards.dirs, shards.indexes, added, dead, strict=True):
        ensure_term_counts(d, index.manifest, log)
        if new or gone:
            states.append(stage_generation(d, index, new, gone, change, sources, shards.generation, encoder,
                                           batch_size, device, log))
        else:
            states.append(index.manifest)
    return states


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` holds a sharded index (its manifest's format, as the registry reads it)."""
    from ragline.index.registry import format_of
    from ragline.scale.sharded import FORMAT

    return format_of(Path(path)) == FORMAT
