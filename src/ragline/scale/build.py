"""``ragline index --ray``: build a sharded index on Ray.

Steps, all under the hidden build directory ``.NAME.building`` that becomes ``NAME`` in one rename at the
end (as a single index does, :mod:`ragline.index.build`):

1. The corpus in shards. A JSONL or KILT file is read in parallel: one Ray task per byte range of the file
   parses its lines and writes its shard's passage store (:mod:`ragline.scale.read`; the same parsing,
   errors and passage splitting as a single index). Other sources (a folder of text files, the bundled
   corpus, or any source with ``--limit``) are read by the driver and cut into ``shards`` equal ranges.
2. BM25 statistics of the whole corpus: one Ray task per shard counts its terms; the driver adds them up.
3. Per shard: Ray Data encodes its passages (``map_batches`` over an actor pool, each actor holding the
   passage encoder, one CPU and one torch thread each), or, with ``--embeddings``, the driver copies the
   shard's rows of the given vectors; a Ray task then builds the shard's FAISS index and its BM25 index with
   the whole corpus's statistics, and moves the shard into place complete with its manifest, while the next
   shard's vectors are made.
4. The sharded manifest is written last.

Resumable per shard: run the same command again after an interruption and the finished shards are kept (a
shard is finished when its directory holds a manifest); a changed corpus or changed settings start over.
Every node must see the output directory (one machine, or a shared filesystem).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ragline import atomic, vocab
from ragline.corpus.readers import ReadStats
from ragline.corpus.store import PassageStore, PassageStoreWriter
from ragline.errors import RaglineError
from ragline.index import dense_build
from ragline.index import manifest as mf
from ragline.index.build import (
    BuildOptions,
    embedding_files,
    encoder_entry,
    finish_index,
    ingest,
    new_manifest,
    open_embeddings,
    prepare_build,
    spot_check,
    write_embedding_rows,
)
from ragline.index.npy_rows import NpyRowWriter
from ragline.index.sparse import BM25Stats
from ragline.models.encoders import BiEncoder
from ragline.scale.cluster import connect
from ragline.scale.sharded import FORMAT, FORMAT_VERSION, SHARDS, shard_name
from ragline.version import __version__

STATE = "sharding.json"
STATS = "bm25-stats.json"


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous row ranges covering 0..n, sizes differing by at most one."""
    cuts = [round(i * n / shards) for i in range(shards + 1)]
    return list(zip(cuts, cuts[1:], strict=False))


def build_sharded(opts: BuildOptions, shards: int, address: str | None = None, actors: int | None = None,
                  num_cpus: int | None = None, log: Callable[[str], None] = print,
                  after_shard: Callable[[str], None] | None = None) -> Path:
    """Build (or resume) the sharded index described by ``opts`` on the Ray cluster at ``address`` (a local
    one with ``num_cpus`` when None); ``actors`` encoder actors (default: one per CPU of the cluster).
    ``after_shard`` is called with each shard's name once it is complete. Returns the index directory."""
    if shards < 1:
        raise RaglineError(f"--shards {shards} is not a positive number", "use --shards 1 or more")
    out, work, fmt = prepare_build(opts)
    with atomic.exclusive_lock(out.parent / f".{out.name}.lock"):
        t0 = time.perf_counter()
        work.mkdir(exist_ok=True)
        encoders = BiEncoder.load(opts.encoder, opts.question_encoder, opts.max_seq_length) if opts.dense else None
        encoder = encoder_entry(opts, encoders, out.name) if encoders is not None else None
        ray = connect(address, num_cpus)
        if fmt in ("jsonl", "kilt") and opts.limit is None:  # one file of lines: read in parallel
            state = _plan_parallel(ray, opts, work, fmt, shards, encoder, log)
            stats = ReadStats(state["corpus"]["documents"], state["corpus"]["skipped"])
            fingerprint, n = state["corpus"]["fingerprint"], state["corpus"]["passages"]
            log(f"corpus: {stats.documents} documents -> {n} passages, read in {shards} parallel shards")
        else:
            stats, fingerprint, n = ingest(opts, work)
            log(f"corpus: {stats.documents} documents -> {n} passages, in {shards} shards")
            if shards > n:
                raise RaglineError(f"{shards} shards for {n} passages", f"use --shards {n} or fewer")
            state = _plan(opts, work, fingerprint, shards, encoder, log)
        # given vectors are checked (count, size) before any statistics are counted or shard built
        arrays = open_embeddings(Path(opts.embeddings), encoders.passage, n) if encoders and opts.embeddings else None
        if opts.dense and opts.index_type == vocab.AUTO_INDEX_TYPE:  # one choice for the whole corpus
            kind, why = dense_build.choose_type(sum(s["passages"] for s in state["shards"]), encoder["dim"])
            log(f"index type {kind} (auto): {why}")
            opts = dataclasses.replace(opts, index_type=kind)
        actors = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        bm25_stats = _corpus_stats(ray, work, state) if opts.bm25 else None
        timing = {"ingest_seconds": round(time.perf_counter() - t0, 2), "encode_seconds": 0.0}
        todo = []
        for s in state["shards"]:
            if mf.is_index_dir(work / SHARDS / s["name"]):
                log(f"{s['name']}: complete, kept")
            else:
                todo.append(s)
        finish = ray.remote(num_cpus=1)(_finish_shard)
        running: dict = {}  # finishing task -> shard name

        def finished(ref) -> None:
            name = running.pop(ref)
            ray.get(ref)
            log(f"{name}: complete")
            if after_shard is not None:
                after_shard(name)

        def encoded(s: dict) -> None:  # all of a shard's passages encoded: build its indexes meanwhile
            part = work / SHARDS / f".{s['name']}.building"
            manifest = new_manifest(s["name"], {"source": str(opts.source), "format": fmt,
                                                "fingerprint": s["fingerprint"], "passages": s["passages"],
                                                "passage_words": opts.passage_words, "shard_of": out.name,
                                                "offset": s["offset"]})
            if encoder is not None:
                manifest["encoder"] = encoder
            running[finish.remote(opts, str(part), str(work / SHARDS / s["name"]), manifest, bm25_stats)] = s["name"]
            done, _ = ray.wait(list(running), timeout=0, num_returns=len(running))
            for ref in done:
                finished(ref)

        t1 = time.perf_counter()
        try:
            if encoder is not None and todo and opts.embeddings:
                assert encoders is not None and arrays is not None
                for s in todo:
                    part = work / SHARDS / f".{s['name']}.building"
                    write_embedding_rows(arrays, s["offset"], s["offset"] + s["passages"], part, encoder["dim"])
                    spot_check(part, encoders.passage, lambda m, name=s["name"]: log(f"{name}: {m}"))
                    encoded(s)
                timing["encode_seconds"] = time.perf_counter() - t1
                log(f"imported the vectors of {len(todo)} shards from {opts.embeddings} in "
                    f"{timing['encode_seconds']:.1f} s")
            elif encoder is not None and todo:
                _encode_shards(ray, opts, work, todo, encoder["dim"], actors, encoded)
                timing["encode_seconds"] = time.perf_counter() - t1
                log(f"{sum(s['passages'] for s in todo)} passages of {len(todo)} shards encoded by {actors} "
                    f"actors in {timing['encode_seconds']:.1f} s")
            else:
                for s in todo:
                    encoded(s)
            while running:
                finished(ray.wait(list(running), num_returns=1)[0][0])
        finally:  # interrupted: let shards being finished land (or fail) before the lock is released
            if running:
                ray.wait(list(running), num_returns=len(running))
        top = _manifest(opts, out.name, fmt, stats, fingerprint, n, encoder, work, state)
        top["timing"] = {**timing, "encode_seconds": round(timing["encode_seconds"], 2),
                         "total_seconds": round(time.perf_counter() - t0, 2)}
        for name in (mf.PASSAGES, STATE, STATS, "build-state.json"):  # the shards hold their own passages
            (work / name).unlink(missing_ok=True)
        atomic.write_json(work / mf.MANIFEST, top)
        atomic.replace_dir(work, out)
        log(f"sharded index ready: {out} ({shards} shards, fingerprint {top['fingerprint']}, "
            f"{time.perf_counter() - t0:.1f} s)")
        return out


def _plan(opts: BuildOptions, work: Path, fingerprint: str, shards: int, encoder: dict | None,
          log: Callable[[str], None]) -> dict:
    """The shards' ranges and passage stores; kept from an earlier run when nothing that shapes them changed."""
    key = _key(opts, shards, encoder, corpus_fingerprint=fingerprint)
    state = _kept_state(work, key, log)
    if state is not None:
        return state
    store = PassageStore(work / mf.PASSAGES)
    state = {"key": key, "shards": []}
    for i, (lo, hi) in enumerate(shard_ranges(len(store), shards)):
        part = work / SHARDS / f".{shard_name(i)}.building"
        part.mkdir(parents=True)
        with PassageStoreWriter(part / mf.PASSAGES) as w:
            for _, batch in store.iter_batches(8192, start=lo):
                w.add_all(batch[: hi - lo - w.count])
                if w.count >= hi - lo:
                    break
        state["shards"].append({"name": shard_name(i), "offset": lo, "passages": hi - lo,
                                "fingerprint": w.fingerprint})
    atomic.write_json(work / STATE, state)
    return state


def _key(opts: BuildOptions, shards: int, encoder: dict | None, **corpus) -> dict:
    """What shapes the shards: an earlier run's shards are kept only when this is unchanged."""
    return {**corpus, "shards": shards, "passage_words": opts.passage_words,
            "encoder": None if encoder is None else encoder["passage"]["fingerprint"],
            "embeddings": None if not opts.embeddings or encoder is None else _files_identity(opts.embeddings),
            "max_seq_length": opts.max_seq_length, "index_type": opts.index_type, "dense": opts.dense,
            "bm25": opts.bm25, "hnsw_m": opts.hnsw_m, "target_recall": opts.target_recall}


def _files_identity(path: str) -> list[list]:
    """Each given vectors file's path, size and modification time: other vectors start the shards over."""
    out = []
    for f in embedding_files(Path(path)):
        st = f.resolve().stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _kept_state(work: Path, key: dict, log: Callable[[str], None]) -> dict | None:
    """The recorded state of an interrupted build with this key, or None after clearing its shards."""
    try:
        state = json.loads((work / STATE).read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("key") == key:
        return state
    if (work / SHARDS).exists():
        log("the corpus or the settings changed since the interrupted build: starting the shards over")
    shutil.rmtree(work / SHARDS, ignore_errors=True)
    (work / STATS).unlink(missing_ok=True)
    return None


def _plan_parallel(ray, opts: BuildOptions, work: Path, fmt: str, shards: int, encoder: dict | None,
                   log: Callable[[str], None]) -> dict:
    """Shards read straight from byte ranges of the corpus file by Ray tasks (:mod:`ragline.scale.read`)."""
    from ragline.scale.read import read_in_shards

    source = Path(opts.source).expanduser().resolve()
    st = source.stat()
    key = _key(opts, shards, encoder, source=str(source), size=st.st_size, mtime_ns=st.st_mtime_ns, format=fmt,
               skip_bad=opts.skip_bad)
    state = _kept_state(work, key, log)
    if state is not None:
        return state
    parts = [work / SHARDS / f".{shard_name(i)}.building" for i in range(shards)]
    results = read_in_shards(ray, source, fmt, parts, opts.passage_words, opts.skip_bad)
    offsets = np.concatenate([[0], np.cumsum([r["passages"] for r in results])[:-1]]).astype(int).tolist()
    fingerprint = hashlib.blake2b("".join(r["fingerprint"] for r in results).encode(), digest_size=16).hexdigest()
    state = {"key": key, "corpus": {"fingerprint": fingerprint, "passages": sum(r["passages"] for r in results),
                                    "documents": sum(r["documents"] for r in results),
                                    "skipped": sum(r["skipped"] for r in results)},
             "shards": [{"name": shard_name(i), "offset": off, "passages": r["passages"],
                         "fingerprint": r["fingerprint"]} for i, (off, r) in enumerate(zip(offsets, results,
                                                                                             strict=True))]}
    atomic.write_json(work / STATE, state)
    return state


def _shard_stats(path: str) -> BM25Stats:
    return BM25Stats.of(PassageStore(Path(path)).text_chunks())


def _corpus_stats(ray, work: Path, state: dict) -> BM25Stats:
    """BM25 statistics of the whole corpus: one Ray task per shard, summed (kept for a resumed build)."""
    if (work / STATS).is_file():
        return BM25Stats.from_json(json.loads((work / STATS).read_text()))
    task = ray.remote(num_cpus=1)(_shard_stats)
    paths = [work / SHARDS / (s["name"] if mf.is_index_dir(work / SHARDS / s["name"]) else f".{s['name']}.building")
             / mf.PASSAGES for s in state["shards"]]
    total = BM25Stats()
    for part in ray.get([task.remote(str(p)) for p in paths]):
        total = total + part
    atomic.write_json(work / STATS, total.to_json())
    return total


class _EncodeBatch:
    """A Ray Data actor holding the passage encoder: (shard, row) pairs -> d(z)."""

    def __init__(self, stores: list[str], encoder: str, max_seq_length: int, batch_size: int) -> None:
        import torch

        from ragline.models.encoders import load_encoder

        torch.set_num_threads(1)  # one CPU per actor
        self.paths, self.stores, self.batch_size = stores, {}, batch_size
        self.encoder = load_encoder(encoder, max_seq_length=max_seq_length)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = batch["data"]  # (b, 2): shard, row within the shard
        titles: list[str] = [""] * len(pairs)
        texts: list[str] = [""] * len(pairs)
        for shard in np.unique(pairs[:, 0]).tolist():
            if shard not in self.stores:
                self.stores[shard] = PassageStore(Path(self.paths[shard]))
            pos = np.flatnonzero(pairs[:, 0] == shard)
            for i, p in zip(pos.tolist(), self.stores[shard].get(pairs[pos, 1]), strict=True):
                titles[i], texts[i] = p.title, p.text
        return {"data": pairs, "vec": self.encoder.encode_passages(titles, texts, batch_size=self.batch_size)}


def _encode_shards(ray, opts: BuildOptions, work: Path, todo: list[dict], dim: int, actors: int,
                   encoded: Callable[[dict], None]) -> None:
    """Fill each shard's ``embeddings.npy`` (n_i, dim) with one Ray Data pipeline over an actor pool;
    ``encoded(shard)`` is called as soon as a shard has all its vectors."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    parts = [work / SHARDS / f".{s['name']}.building" for s in todo]
    with contextlib.ExitStack() as files:  # every file closed, however the pipeline ends
        embs = [files.enter_context(NpyRowWriter(p / mf.EMBEDDINGS, s["passages"], dim))
                for p, s in zip(parts, todo, strict=True)]
        left = [s["passages"] for s in todo]
        blocks = [np.stack([np.full(hi - lo, i), np.arange(lo, hi)], axis=1).astype(np.int64)  # (rows, 2)
                  for i, s in enumerate(todo) for lo, hi in _chunks(s["passages"], opts.chunk_rows)]
        ds = ray.data.from_numpy(blocks).map_batches(  # in the object store already: no read tasks to schedule
            _EncodeBatch, fn_constructor_args=([str(p / mf.PASSAGES) for p in parts], opts.encoder,
                                               opts.max_seq_length, opts.batch_size),
            batch_size=min(opts.chunk_rows, 256), batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            pairs = batch["data"]
            for shard in np.unique(pairs[:, 0]).tolist():
                sel = pairs[:, 0] == shard
                embs[shard].write(pairs[sel, 1], batch["vec"][sel])  # (rows of this shard in the batch, dim)
                left[shard] -= int(sel.sum())
                if left[shard] == 0:
                    embs[shard].sync()
                    embs[shard].close()
                    encoded(todo[shard])
    if any(left):
        raise RaglineError(f"the encoders returned {sum(s['passages'] for s in todo) - sum(left)} of "
                           f"{sum(s['passages'] for s in todo)} passages", "run the same command again")


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _finish_shard(opts: BuildOptions, part: str, out: str, manifest: dict, bm25_stats: BM25Stats | None) -> dict:
    finish_index(opts, Path(part), Path(out), manifest, log=lambda m: None, bm25_stats=bm25_stats)
    return manifest


def _manifest(opts: BuildOptions, name: str, fmt: str, stats, fingerprint: str, n: int, encoder: dict | None,
              work: Path, state: dict) -> dict:
    shards = []
    for s in state["shards"]:
        m = mf.read_manifest(work / SHARDS / s["name"])
        shards.append({"name": s["name"], "offset": s["offset"], "passages": s["passages"],
                       "fingerprint": m["fingerprint"]})
    first = mf.read_manifest(work / SHARDS / shards[0]["name"])
    top = {"format": FORMAT, "format_version": FORMAT_VERSION, "ragline_version": __version__, "name": name,
           "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "corpus": {"source": str(opts.source), "format": fmt, "fingerprint": fingerprint,
                      "documents": stats.documents, "skipped": stats.skipped, "passages": n,
                      "passage_words": opts.passage_words, "limit": opts.limit},
           "encoder": encoder or first["encoder"],
           "dense": None if not first.get("dense") else {k: first["dense"].get(k) for k in ("type", "factory")},
           "bm25": None if not first.get("bm25") else {k: v for k, v in first["bm25"].items()
                                                       if k not in ("documents", "bytes", "build_seconds")},
           "shards": shards}
    key = json.dumps([mf.index_fingerprint(top), [s["fingerprint"] for s in shards]])
    top["fingerprint"] = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return top
