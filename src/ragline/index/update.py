"""Change an index in place, one generation at a time: ``ragline add``, ``update``, ``delete`` and ``compact``.

A generation is written beside the current one and switched to by its manifest, written last and atomically
(:mod:`ragline.index.segments` describes the layout):

1. new passages go to a staging directory ``segments/.gNNNNNN.building`` (passages, embeddings from the index's
   own passage encoder, an exact flat FAISS index, BM25 term counts), which is renamed into place when complete;
2. deleted rows (all of them so far) go to ``tombstones/gNNNNNN.npy`` through a temporary name;
3. the new manifest (segments, tombstone file, live counts, fingerprint, history) replaces the old one.

A crash before step 3 leaves the previous generation whole and loadable; the next change removes what the
crashed one left. Readers of the previous generation keep working: nothing they read is modified, and the
previous generation's tombstone file is kept until the next change. ``compact`` writes a plain index over the
live passages (no re-encoding: the stored vectors are copied) and replaces the directory in one step.

Documents are matched by id. A document whose passages hash the same as the live ones is unchanged, so adding
it again is a no-op; ``add`` refuses a known id with other content (that is ``update``), ``update`` replaces it
(and adds ids it does not know), ``delete`` removes every live passage of the ids given.
"""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ragline import atomic
from ragline.corpus.passages import Passage, encoder_text, split_documents
from ragline.corpus.readers import ReadStats, links_notice, read_corpus
from ragline.corpus.store import PassageStore, PassageStoreWriter, meta_text
from ragline.errors import RaglineError
from ragline.index import dense_build
from ragline.index import manifest as mf
from ragline.index.npy_rows import NpyRows, NpyWriter
from ragline.index.registry import read_manifest
from ragline.index.segments import SegmentedEmbeddings, SegmentedStore, live_rows, open_single, segment_dir
from ragline.index.sparse import TermCounts
from ragline.models.encoders import Encoder, load_encoder

HISTORY_IDS = 100  # document ids listed per change in the manifest's history (the rest are counted)
ADD, UPDATE, DELETE, COMPACT = "add", "update", "delete", "compact"


@dataclass
class Change:
    """What one command changed: document ids added, replaced, left unchanged and deleted; passage counts."""

    action: str
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    passages_added: int = 0
    passages_deleted: int = 0
    generation: int | None = None  # the generation written; None when nothing changed
    skipped: int = 0               # malformed records skipped (--skip-bad)
    links_skipped: list[str] = field(default_factory=list)  # links out of a source folder, not followed

    @property
    def changed(self) -> bool:
        return bool(self.passages_added or self.passages_deleted)

    def summary(self) -> str:
        parts = [f"{len(v)} {k}" for k, v in (("added", self.added), ("replaced", self.replaced),
                                               ("deleted", self.deleted), ("unchanged", self.unchanged)) if v]
        what = ", ".join(parts) or "no"
        tail = (f" -> generation {self.generation} (+{self.passages_added} / -{self.passages_deleted} passages)"
                if self.changed else ": nothing to write")
        return (f"documents: {what}{tail}" + (f"; {self.skipped} bad records skipped" if self.skipped else "")
                + (f"; {links_notice(ReadStats(links_skipped=self.links_skipped))}" if self.links_skipped else ""))


def document_hash(passages: Sequence[Passage]) -> str:
    """The content of one document as its passages hold it (title, text and metadata, in order)."""
    h = hashlib.blake2b(digest_size=16)
    for p in passages:
        for part in (p.title, p.text, meta_text(p.meta)):
            h.update(part.encode())
            h.update(b"\0")
    return h.hexdigest()


def live_passages_by_document(index, only: Collection[str] | None = None) -> dict[str, list[tuple[int, Passage]]]:
    """Every live document of ``index`` (or those of ``only`` that are live): id -> its (row, passage) pairs in
    row order. With ``only``, the index is read no further than its document ids and those documents'
    passages: a change costs what it touches, not what the index holds."""
    doc_ids = index.store.values("doc_id")
    rows = live_rows(index).tolist()
    if only is not None:
        wanted = set(only)
        rows = [r for r in rows if doc_ids[r] in wanted]
    by_doc: dict[str, list[tuple[int, Passage]]] = {}
    for r, p in zip(rows, index.store.get(rows) if rows else [], strict=True):
        by_doc.setdefault(p.doc_id, []).append((r, Passage("", p.doc_id, p.title, p.text, p.meta)))
    return by_doc


def live_documents(index, only: Collection[str] | None = None) -> dict[str, tuple[list[int], str]]:
    """Every live document of ``index`` (or of ``only``): id -> (its rows, :func:`document_hash` of its
    passages)."""
    return {d: ([r for r, _ in ps], document_hash([p for _, p in ps]))
            for d, ps in live_passages_by_document(index, only).items()}


def add_documents(path: str | Path, sources: Sequence[str], *, replace: bool = False, fmt: str = "auto",
                  skip_bad: bool = False, encoder: Encoder | None = None, batch_size: int = 64,
                  device: str | None = None, log: Callable[[str], None] = print) -> Change:
    """``ragline add`` (``replace=False``) or ``ragline update`` (``replace=True``): the documents of
    ``sources`` into the index at ``path`` as a new generation."""
    path = _index_path(path)
    with atomic.exclusive_lock(path.parent / f".{path.name}.lock"):
        index = _open_for_change(path)
        clean_stale(path, index.manifest)
        change = Change(UPDATE if replace else ADD)
        docs = read_documents(sources, fmt, skip_bad, change, index.manifest)
        live = live_documents(index, only=[d for d, _ in docs])
        new = plan(live, docs, change, replace, path.name)
        dead = [r for d in change.replaced for r in live[d][0]]
        passages = [p for _, ps in new for p in ps]
        change.passages_added, change.passages_deleted = len(passages), len(dead)
        if change.changed:
            gen = int(index.manifest.get("generation", 0)) + 1
            commit(path, stage_generation(path, index, passages, dead, change, sources, gen, encoder, batch_size,
                                          device, log))
        log(change.summary())
        return change


def delete_documents(path: str | Path, doc_ids: Sequence[str], log: Callable[[str], None] = print) -> Change:
    """``ragline delete``: every live passage of the documents ``doc_ids``, in a new generation."""
    path = _index_path(path)
    with atomic.exclusive_lock(path.parent / f".{path.name}.lock"):
        index = _open_for_change(path)
        clean_stale(path, index.manifest)
        live = live_documents(index, only=doc_ids)
        change = plan_deletion(live, doc_ids, path.name)
        dead = [r for d in change.deleted for r in live[d][0]]
        change.passages_deleted = len(dead)
        gen = int(index.manifest.get("generation", 0)) + 1
        commit(path, stage_generation(path, index, [], dead, change, [], gen, None, 64, None, log))
        log(change.summary())
        return change


def compact_index(path: str | Path, log: Callable[[str], None] = print) -> Change:
    """``ragline compact``: one plain index over the live passages in row order, replacing the directory
    atomically; the stored vectors are copied, the dense index is rebuilt with the base's type and BM25 anew."""
    from ragline.index.build import finish_index

    path = _index_path(path)
    with atomic.exclusive_lock(path.parent / f".{path.name}.lock"):
        index = _open_for_change(path)
        gen = int(index.manifest.get("generation", 0)) + 1
        change = Change(COMPACT, generation=gen)
        work = path.parent / f".{path.name}.building"
        manifest, opts = compact_into(index, work, change)
        del index  # its maps (store, vectors) go before the new parts are built
        gc.collect()
        finish_index(opts, work, path, manifest, log)
        log(f"compacted index {path.name}: {manifest['corpus']['passages']} live passages in one segment "
            f"(generation {gen})")
        return change


# --- deciding what changes ----------------------------------------------------------------------------------

def plan(live: dict[str, tuple[list[int], str]], docs: Iterable[tuple[str, list[Passage]]], change: Change,
         replace: bool, name: str) -> list[tuple[str, list[Passage]]]:
    """The documents to write, (id, passages), of ``docs`` against the ``live`` ones (:func:`live_documents`);
    ``change`` records which are added, replaced and unchanged. A known id with other content is refused
    unless ``replace`` (nothing is written then)."""
    new, refused = [], []
    for doc_id, passages in docs:
        known = live.get(doc_id)
        if known is not None and known[1] == document_hash(passages):
            change.unchanged.append(doc_id)
        elif known is not None and not replace:
            refused.append(doc_id)
        else:
            (change.replaced if known is not None else change.added).append(doc_id)
            new.append((doc_id, passages))
    if refused:
        raise RaglineError(f"{len(refused)} document(s) are already in index {name} with other content: "
                           f"{_ids(refused)}", "use `ragline update` to replace them; nothing was changed")
    return new


def plan_deletion(live: dict[str, tuple[list[int], str]], doc_ids: Sequence[str], name: str) -> Change:
    """The deletion of ``doc_ids``, every one of which must be live."""
    if not doc_ids:
        raise RaglineError("no document id given", "pass --doc ID (repeatable)")
    unknown = [d for d in dict.fromkeys(doc_ids) if d not in live]
    if unknown:
        raise RaglineError(f"index {name} holds no live document {_ids(unknown)}",
                           "check the ids (`ragline search` shows a passage's doc_id); nothing was changed")
    return Change(DELETE, deleted=list(dict.fromkeys(doc_ids)))


def compact_into(index, work: Path, change: Change) -> tuple[dict, Any]:
    """Write the live passages of ``index`` (and their stored vectors) into the build directory ``work``:
    (the plain index's manifest, the BuildOptions that finish it with :func:`ragline.index.build.finish_index`)."""
    from ragline.index.build import BuildOptions

    m = index.manifest
    rows = live_rows(index)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with PassageStoreWriter(work / mf.PASSAGES) as w:
        w.add_all(_scan_rows(index.store, rows))
    dense = m.get("dense") or {}
    if dense:  # read and written with file calls, not memory maps: the process holds a chunk, not the file
        source = _unmapped(index.embeddings)
        with NpyWriter(work / mf.EMBEDDINGS, len(rows), m["encoder"]["dim"]) as out:
            for lo in range(0, len(rows), 65536):
                out.write(source[rows[lo:lo + 65536]])  # (chunk, dim)
    manifest = {k: v for k, v in m.items() if k not in ("segments", "tombstones", "live")}
    manifest["format_version"] = mf.FORMAT_VERSION
    documents = pc.count_distinct(PassageStore(work / mf.PASSAGES).table.column("doc_id")).as_py()
    manifest["corpus"] = {**m["corpus"], "fingerprint": w.fingerprint, "passages": w.count, "documents": documents}
    manifest["generation"] = change.generation
    manifest["history"] = [*m.get("history", []), history_entry(change, [], w.count)]
    opts = BuildOptions(source=str(m["corpus"].get("source")), out=index.path, index_type=dense.get("type", "flat"),
                        dense=bool(dense), bm25=bool(m.get("bm25")), progress=False)
    return manifest, opts


def _scan_rows(store, rows: np.ndarray, batch_rows: int = 16384) -> Iterator[Passage]:
    """The passages of ``store`` (a passage store, or the base's and segments' together) at ``rows``
    (ascending), read by a scan of each store (:meth:`PassageStore.iter_batches`: file calls, not the memory
    map, so the process never holds the whole store)."""
    stores = store.stores if isinstance(store, SegmentedStore) else [store]
    offsets = store.offsets if isinstance(store, SegmentedStore) else np.zeros(1, dtype=np.int64)
    for part, first in zip(stores, offsets.tolist(), strict=True):
        local = rows[(rows >= first) & (rows < first + len(part))] - first  # (live rows of this part,) ascending
        if not local.size:
            continue
        for lo, batch in part.iter_batches(batch_rows, start=int(local[0])):
            a, b = np.searchsorted(local, [lo, lo + len(batch)])  # this batch's share of the rows
            yield from (batch[i] for i in (local[a:b] - lo).tolist())
            if b == len(local):
                break


def _unmapped(embeddings):
    """The stored vectors ``embeddings`` (a memory map, or the base's and segments' together) read by file
    calls instead (:class:`NpyRows`)."""
    if isinstance(embeddings, SegmentedEmbeddings):
        return SegmentedEmbeddings([_unmapped(p) for p in embeddings.parts])
    if isinstance(embeddings, np.memmap) and embeddings.filename:
        return NpyRows(Path(embeddings.filename))
    return embeddings


# --- writing a generation ---------------------------------------------------------------------------------

def stage_generation(path: Path, index, new: list[Passage], dead: list[int], change: Change,
                     sources: Sequence[str], gen: int, encoder: Encoder | None = None, batch_size: int = 64,
                     device: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Write generation ``gen`` of the single index ``index`` at ``path`` beside the current one: the segment of
    the ``new`` passages and the tombstones of all deleted rows (``dead`` added); its manifest, to be
    switched to with :func:`commit` (or, for a shard, inside its sharded index's manifest)."""
    m = index.manifest
    manifest = json.loads(json.dumps(m))  # a deep copy: the open index keeps its own
    manifest["format_version"] = mf.LIVING_VERSION
    manifest["generation"] = gen
    segments = list(m.get("segments") or [])
    ensure_term_counts(path, m, log)
    if new:
        segments.append(_write_segment(path, f"g{gen:06d}", new, m, encoder, batch_size, device, log))
    manifest["segments"] = segments
    total = len(index) + len(new)
    previous = np.flatnonzero(~index.alive) if getattr(index, "alive", None) is not None else np.zeros(0, np.int64)
    all_dead = np.union1d(previous, np.asarray(dead, dtype=np.int64)).astype(np.int64)
    if len(all_dead):
        rel = f"{mf.TOMBSTONES}/g{gen:06d}.npy"
        (path / mf.TOMBSTONES).mkdir(exist_ok=True)
        tmp = path / mf.TOMBSTONES / f".g{gen:06d}.tmp.npy"
        np.save(tmp, all_dead)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path / rel)
        atomic.fsync_dir(path / mf.TOMBSTONES)  # the rename itself is durable before a manifest names the file
        manifest["tombstones"] = {"file": rel, "rows": len(all_dead)}
    else:
        manifest["tombstones"] = None
    live = total - len(all_dead)
    manifest["live"] = {"passages": live}
    change.generation = gen
    manifest["history"] = [*m.get("history", []), history_entry(change, sources, live)]
    manifest["fingerprint"] = hashlib.blake2b(json.dumps(
        {"previous": m["fingerprint"], "generation": gen, "segments": [s["fingerprint"] for s in segments],
         "dead": hashlib.blake2b(all_dead.tobytes(), digest_size=8).hexdigest()}, sort_keys=True).encode(),
        digest_size=8).hexdigest()
    atomic.fsync_dir(path)
    return manifest


def commit(path: Path, manifest: dict) -> None:
    """Switch the index at ``path`` to the generation ``manifest`` describes (one atomic rename)."""
    atomic.write_json(path / mf.MANIFEST, manifest)
    atomic.fsync_dir(path)


def ensure_term_counts(path: Path, manifest: dict, log: Callable[[str], None] = print) -> None:
    """Count the BM25 terms of the base passages of the index at ``path`` if an earlier ragline built it
    without them (live BM25 statistics need them)."""
    if manifest.get("bm25") and not TermCounts.saved_in(path / mf.BM25):
        log(f"counting the BM25 terms of {path.name} (once)")
        TermCounts.build_into(PassageStore(path / mf.PASSAGES).text_chunks(), path / mf.BM25,
                              manifest["bm25"].get("stemmer", "english"))


def _write_segment(path: Path, name: str, passages: list[Passage], m: dict, encoder: Encoder | None,
                   batch_size: int, device: str | None, log: Callable[[str], None]) -> dict:
    """Write the new passages' segment (staged, then renamed into place); its manifest entry."""
    (path / mf.SEGMENTS).mkdir(exist_ok=True)
    final = segment_dir(path, name)
    work = final.with_name(f".{name}.building")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    with PassageStoreWriter(work / mf.PASSAGES) as w:
        w.add_all(passages)
    if m.get("dense"):
        enc = encoder or _passage_encoder(m, device)
        log(f"encoding {len(passages)} new passages with {enc.name}")
        vecs = enc.encode_passages([p.title for p in passages], [p.text for p in passages],
                                   batch_size=batch_size).astype(np.float32)  # (n, dim)
        np.save(work / mf.EMBEDDINGS, vecs)
        dense, _ = dense_build.build(vecs, "flat", fill_flat=False)  # saved only: its vectors are the file above
        dense.save(work / mf.DENSE)
    if m.get("bm25"):
        (work / mf.BM25).mkdir()
        TermCounts.build([[encoder_text(p.title, p.text) for p in passages]],  # the texts just written
                         m["bm25"].get("stemmer", "english")).save(work / mf.BM25)
    atomic.fsync_tree(work)
    os.rename(work, final)
    atomic.fsync_dir(final.parent)  # the rename itself is durable before a manifest names the segment
    return {"name": name, "passages": w.count, "fingerprint": w.fingerprint,
            "dense": {"type": "flat", "factory": "Flat"} if m.get("dense") else None}


def _passage_encoder(m: dict, device: str | None) -> Encoder:
    """The index's own passage encoder, checked to be the one its vectors came from."""
    p = m["encoder"]["passage"]
    enc = load_encoder(p.get("source") or p["name"], max_seq_length=p.get("max_seq_length", 256), device=device)
    if enc.fingerprint != p["fingerprint"]:
        raise RaglineError(f"the passage encoder {p.get('source') or p['name']} is not the one index {m['name']} was "
                           f"built with (weights {enc.fingerprint[:12]}, the index says {p['fingerprint'][:12]})",
                           "restore that encoder, or rebuild the index with `ragline index --force`")
    return enc


def history_entry(change: Change, sources: Sequence[str], live: int) -> dict:
    """The manifest's record of one change: generation, action, time, live passages, what was added and
    deleted (the first HISTORY_IDS document ids of each kind, and their count)."""
    entry = {"generation": change.generation, "action": change.action,
             "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "live_passages": live,
             "passages": {"added": change.passages_added, "deleted": change.passages_deleted}}
    if sources:
        entry["sources"] = [str(s) for s in sources]
    for key in ("added", "replaced", "deleted"):
        ids = getattr(change, key)
        if ids:
            entry[key] = {"documents": len(ids), "ids": ids[:HISTORY_IDS]}
    return entry


# --- checks and reading -----------------------------------------------------------------------------------

def _index_path(path: str | Path) -> Path:
    path = Path(path).expanduser().resolve()
    if not mf.is_index_dir(path):
        raise RaglineError(f"index {path} does not exist", f"build it first with `ragline index --out {path}`")
    return path


def _open_for_change(path: Path):
    """The single index at ``path`` opened for a change: its manifest, store, vectors and tombstones, not the
    search parts (FAISS, BM25) that no change reads (:func:`ragline.index.segments.open_single`)."""
    manifest = read_manifest(path)  # any format's: a sharded one is refused by name below
    if manifest.get("format") != mf.FORMAT:
        raise RaglineError(f"index {path.name} is a {manifest.get('format')} index, not a single one",
                           "use the ragline add / update / delete / compact commands, which route a sharded index "
                           "to ragline.scale.update")
    return open_single(path, manifest, search=False)


def clean_stale(path: Path, manifest: dict) -> None:
    """Remove what a crashed change left (staging directories, segments and tombstone files no manifest names),
    keeping the previous generation's tombstones for readers still opening it."""
    named = {s["name"] for s in manifest.get("segments") or []}
    for d in (path / mf.SEGMENTS).glob("*") if (path / mf.SEGMENTS).is_dir() else []:
        if d.name not in named:
            shutil.rmtree(d, ignore_errors=True)
    current = (manifest.get("tombstones") or {}).get("file")
    gen = int(manifest.get("generation", 0))
    for f in (path / mf.TOMBSTONES).glob("*") if (path / mf.TOMBSTONES).is_dir() else []:
        rel = f"{mf.TOMBSTONES}/{f.name}"
        if rel != current and f.name != f"g{gen - 1:06d}.npy":
            f.unlink(missing_ok=True)


def read_documents(sources: Sequence[str], fmt: str, skip_bad: bool, change: Change, manifest: dict
                   ) -> list[tuple[str, list[Passage]]]:
    """(document id, its passages) for every document of ``sources``, split as the index's corpus was; ids
    must be unique across the sources."""
    docs = _read_sources(sources, fmt, skip_bad, change)
    return list(_split(docs, int(manifest["corpus"].get("passage_words") or 100)))


def _read_sources(sources: Sequence[str], fmt: str, skip_bad: bool, change: Change) -> list:
    if not sources:
        raise RaglineError("no source given", "pass one or more files or folders of documents")
    docs, seen = [], {}
    for src in sources:
        stats = ReadStats()
        for d in read_corpus(src, fmt, skip_bad=skip_bad, stats=stats):
            if d.id in seen:
                raise RaglineError(f"document id {d.id!r} is in both {seen[d.id]} and {src}",
                                   "give every document one id across the sources; nothing was changed")
            seen[d.id] = src
            docs.append(d)
        change.skipped += stats.skipped
        change.links_skipped += stats.links_skipped
    return docs


def _split(docs: Iterable, words: int) -> Iterable[tuple[str, list[Passage]]]:
    """(document id, its passages) for each document, split as the index's corpus was; records that are one
    passage each (DPR's) group under their document, as the index holds them."""
    by_doc: dict[str, list[Passage]] = {}
    for p in split_documents(docs, words):
        by_doc.setdefault(p.doc_id, []).append(p)
    return by_doc.items()


def _ids(ids: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")
