"""Build an index directory: corpus -> passages -> embeddings -> FAISS + BM25 -> manifest.

Everything is written into a hidden sibling ``.NAME.building/`` and moved onto ``NAME`` in one atomic step
at the end, so a crash never leaves a half index that loads and an existing index stays in use until its
replacement is complete. Embeddings are written in chunks; the build state file records how many rows are
done, so running the same command again after an interruption resumes where it stopped.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ragline import atomic, vocab
from ragline.corpus.passages import DEFAULT_WORDS, split_documents
from ragline.corpus.readers import ReadStats, detect_format, links_notice, read_corpus
from ragline.corpus.store import PassageStore, PassageStoreWriter
from ragline.errors import RaglineError
from ragline.index import dense_build
from ragline.index import manifest as mf
from ragline.index.dense import TUNE_K
from ragline.index.npy_rows import NpyRows, NpyRowWriter, NpyWriter
from ragline.index.registry import list_indexes
from ragline.index.sparse import BM25Index, BM25Stats
from ragline.models.encoders import BiEncoder, Encoder
from ragline.version import __version__

STATE = "build-state.json"


@dataclass
class BuildOptions:
    """Everything `ragline index` is asked to build: source, output, parts, encoders, resume chunks."""

    source: str
    out: Path
    fmt: str = "auto"
    index_type: str = vocab.DEFAULT_INDEX_TYPE  # or one of vocab.INDEX_TYPES
    encoder: str = "minilm"           # passage encoder (and question encoder unless given)
    question_encoder: str | None = None
    max_seq_length: int = 256
    passage_words: int = DEFAULT_WORDS
    batch_size: int = 64
    chunk_rows: int = 1024            # rows encoded between two saved checkpoints
    bm25: bool = True
    dense: bool = True
    force: bool = False
    skip_bad: bool = False
    limit: int | None = None
    embeddings: str | None = None     # precomputed d(z): a .npy file or a folder of .npy shards, in corpus order
    device: str | None = None         # where the encoders run (models/device.py; None: auto)
    target_recall: float = 0.95
    hnsw_m: int = 32
    progress: bool = True


def build_index(opts: BuildOptions, encoders: BiEncoder | None = None,
                log: Callable[[str], None] = print) -> Path:
    """Build (or resume building) the index described by ``opts``; returns the finished directory."""
    out, work, fmt = prepare_build(opts)
    with atomic.exclusive_lock(out.parent / f".{out.name}.lock"):
        t0 = time.perf_counter()
        work.mkdir(exist_ok=True)
        stats, fingerprint, n = ingest(opts, work)
        t_ingest = time.perf_counter() - t0
        log(f"corpus: {stats.documents} documents -> {n} passages of <= {opts.passage_words} words"
            + (f" ({stats.skipped} bad records skipped)" if stats.skipped else ""))
        if stats.links_skipped:
            log(links_notice(stats))
        if encoders is None and opts.dense:
            encoders = BiEncoder.load(opts.encoder, opts.question_encoder, opts.max_seq_length, opts.device)
        manifest = new_manifest(out.name, {
            "source": str(opts.source), "format": fmt, "fingerprint": fingerprint, "documents": stats.documents,
            "skipped": stats.skipped, "passages": n, "passage_words": opts.passage_words, "limit": opts.limit})
        manifest["timing"] = {"ingest_seconds": round(t_ingest, 2)}
        if opts.dense:
            assert encoders is not None
            manifest["encoder"] = encoder_entry(opts, encoders, out.name)
            t1 = time.perf_counter()
            if opts.embeddings:
                import_embeddings(Path(opts.embeddings), work, encoders.passage, n, log)
            else:
                _encode(opts, work, encoders, fingerprint, n, log)
            manifest["timing"]["encode_seconds"] = round(time.perf_counter() - t1, 2)
        finish_index(opts, work, out, manifest, log)
        log(f"index ready: {out} (fingerprint {manifest['fingerprint']}, {time.perf_counter() - t0:.1f} s, "
            f"peak memory {peak_rss_gib():.2f} GiB)")
        return out


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, GiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def prepare_build(opts: BuildOptions) -> tuple[Path, Path, str]:
    """Check the options and the target before any work: (index directory, build directory, corpus format)."""
    out = Path(opts.out).expanduser().resolve()
    check_target(out, opts.force)
    if not (opts.dense or opts.bm25):
        raise RaglineError("nothing to build: both dense and BM25 are off", "drop --no-dense or --no-bm25")
    if opts.dense and opts.index_type != vocab.AUTO_INDEX_TYPE:
        dense_build.factory_string(opts.index_type, 1000, 8)  # unknown types fail before any work
    fmt = detect_format(opts.source) if opts.fmt == "auto" else opts.fmt
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, out.parent / f".{out.name}.building", fmt


def new_manifest(name: str, corpus: dict) -> dict:
    """A manifest with its corpus entry; ``encoder``, ``dense`` and ``bm25`` are filled as parts are built."""
    return {"format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "ragline_version": __version__,
            "name": name, "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "corpus": corpus,
            "encoder": {"dim": 0, "passage": {"fingerprint": None, "name": None}}, "dense": None, "bm25": None}


def encoder_entry(opts: BuildOptions, encoders: BiEncoder, name: str) -> dict:
    """The manifest's ``encoder`` entry (checked against the question encoder before anything is encoded)."""
    p, q = encoders.passage, encoders.question
    if q.normalised != p.normalised:
        raise RaglineError(f"question encoder {q.name} ({q.kind}) and passage encoder {p.name} ({p.kind}) disagree on "
                           "normalisation, so q·d would mix cosines and raw inner products",
                           "pair encoders of one kind (a DPR question encoder with a DPR context encoder)")
    entry = {"dim": p.dim, "prior_scale": p.prior_scale, "passage": {**p.identity(), "source": opts.encoder},
             "question": {**q.identity(), "source": opts.question_encoder or opts.encoder,
                          "paired_with": q.paired_with}}
    mf.check_question_encoder({"name": name, "encoder": entry}, q.dim, q.paired_with, q.name,
                              fingerprint=q.fingerprint)
    if opts.embeddings:  # the passage vectors were given, not encoded here
        entry["passage"]["embeddings"] = str(Path(opts.embeddings).expanduser().resolve())
    return entry


def finish_index(opts: BuildOptions, work: Path, out: Path, manifest: dict, log: Callable[[str], None],
                 bm25_stats: BM25Stats | None = None) -> None:
    """From a build directory holding the passages (and, for a dense index, all embeddings): build the FAISS
    and BM25 parts, write the manifest last and move the directory onto ``out`` in one step."""
    if opts.dense:
        manifest["dense"] = _build_dense(opts, work, log)
    if opts.bm25:
        manifest["bm25"] = _build_bm25(work, log, bm25_stats)
    manifest["fingerprint"] = mf.index_fingerprint(manifest)
    (work / STATE).unlink(missing_ok=True)
    for stale in work.glob("*.new*"):
        stale.unlink()
    atomic.write_json(work / mf.MANIFEST, manifest)  # last: its presence marks a complete index
    atomic.replace_dir(work, out)


def check_target(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if mf.is_index_dir(out):
        if not force:
            raise RaglineError(f"index {out} already exists",
                               "pass --force to replace it (it stays usable until the new one is complete) "
                               "or choose another --out")
        return
    if out.is_file() or any(out.iterdir()):
        raise RaglineError(f"{out} exists and is not a ragline index", "choose another --out; nothing was changed")
    out.rmdir()  # an empty directory: take its place


def ingest(opts: BuildOptions, work: Path) -> tuple[ReadStats, str, int]:
    """Write the passage store to ``work``; keep the previous one (and its embeddings) when identical."""
    stats = ReadStats()
    new = work / (mf.PASSAGES + ".new")
    try:
        with PassageStoreWriter(new) as w:
            docs = read_corpus(opts.source, opts.fmt, skip_bad=opts.skip_bad, limit=opts.limit, stats=stats)
            w.add_all(split_documents(docs, opts.passage_words))
    except BaseException:
        new.unlink(missing_ok=True)
        if not any(work.iterdir()):
            work.rmdir()  # nothing to resume: leave no trace
        raise
    state = _read_state(work)
    if state.get("corpus_fingerprint") == w.fingerprint and (work / mf.PASSAGES).is_file():
        new.unlink()
    else:  # a different corpus (or a first run): start over
        for name in (mf.EMBEDDINGS, STATE, mf.DENSE):
            (work / name).unlink(missing_ok=True)
        shutil.rmtree(work / mf.BM25, ignore_errors=True)
        os.replace(new, work / mf.PASSAGES)
        atomic.write_json(work / STATE, {"corpus_fingerprint": w.fingerprint, "passages": w.count})
    return stats, w.fingerprint, w.count


def _read_state(work: Path) -> dict:
    try:
        return json.loads((work / STATE).read_text())
    except (OSError, ValueError):
        return {}


def _encode(opts: BuildOptions, work: Path, encoders: BiEncoder, fingerprint: str, n: int,
            log: Callable[[str], None]) -> None:
    """Fill ``embeddings.npy`` (n, dim) chunk by chunk, resuming from the build state."""
    p = encoders.passage
    state = _read_state(work)
    path = work / mf.EMBEDDINGS
    key = {"encoder_fingerprint": p.fingerprint, "max_seq_length": p.max_seq_length}
    done = state.get("encoded_rows", 0) if all(state.get(k) == v for k, v in key.items()) else 0
    if done == 0 and _reuse_sibling_embeddings(opts, fingerprint, p.fingerprint, p.max_seq_length, path, log):
        done = n
    elif done and path.is_file():
        log(f"resuming the encoding at passage {done} of {n}")
    else:
        done = 0
    if done == 0 or not path.is_file():
        # a new file, never the old inode: the old one may be a sibling index's embeddings, hard-linked by a
        # reuse that this rerun (with other encoder settings) no longer wants; writing it would overwrite theirs
        path.unlink(missing_ok=True)
        NpyRowWriter(path, n, p.dim).close()
        done = 0
    elif done < n and path.stat().st_nlink > 1:  # resuming into a file shared with another index: copy it first
        _unshare(path)
    state.update(key, encoded_rows=done)
    atomic.write_json(work / STATE, state)
    if done >= n:
        return
    store = PassageStore(work / mf.PASSAGES)
    with NpyRowWriter(path) as emb, tqdm(total=n, initial=done, desc="encoding passages", unit="passage",
                                         disable=not opts.progress, smoothing=0.1) as bar:
        for lo, batch in store.iter_batches(opts.chunk_rows, start=done):
            vecs = p.encode_passages([x.title for x in batch], [x.text for x in batch], batch_size=opts.batch_size)
            emb.write(lo, vecs)  # (chunk, dim) at rows lo..
            emb.sync()
            state["encoded_rows"] = lo + len(batch)
            atomic.write_json(work / STATE, state)  # after the sync: a recorded row is on disk
            bar.update(len(batch))


def embedding_files(path: Path) -> list[Path]:
    """The ``.npy`` file ``path``, or the ``.npy`` shards of the folder ``path`` in natural name order (shard_2
    before shard_10)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise RaglineError(f"embeddings {path} do not exist", "give a .npy file or a folder of .npy shards")
    files = sorted(path.glob("*.npy"), key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
    if not files:
        raise RaglineError(f"folder {path} holds no .npy file", "save the vectors with numpy.save, one file per shard")
    return files


def open_embeddings(path: Path, encoder: Encoder, n: int) -> list[NpyRows]:
    """The vectors a user already has (float32 or float16, in corpus order: a ``.npy`` file or a folder of
    ``.npy`` shards), each file checked against the encoder's size and their count against the corpus's ``n``
    passages; read through file calls, not a memory map, so that a build's memory stays a slice."""
    arrays = []
    for f in embedding_files(path):
        a = NpyRows(f)
        if a.dtype not in (np.float32, np.float16):
            raise RaglineError(f"{f} holds a {a.dtype} array of shape {a.shape}",
                               "give 2-d float32 or float16 arrays, one row per passage")
        if a.shape[1] != encoder.dim:
            raise RaglineError(f"{f} holds {a.shape[1]}-d vectors but passage encoder {encoder.name} gives "
                               f"{encoder.dim}-d vectors", "give the vectors of this encoder, or the encoder of "
                               "these vectors (--encoder)")
        arrays.append(a)
    total = sum(len(a) for a in arrays)
    if total != n:
        raise RaglineError(f"the embeddings hold {total} vectors but the corpus has {n} passages",
                           "give one vector per passage, in corpus order (the same --limit and --passage-words)")
    return arrays


def write_embedding_rows(arrays: list[NpyRows], lo: int, hi: int, work: Path, dim: int,
                         chunk_rows: int = 65536) -> None:
    """Write rows ``lo..hi`` of ``arrays`` laid end to end as ``work``'s ``embeddings.npy`` (hi - lo, dim)
    float32, through a temporary file renamed into place."""
    dst, tmp = work / mf.EMBEDDINGS, work / (mf.EMBEDDINGS + ".new")
    with NpyWriter(tmp, hi - lo, dim) as out:
        start = 0  # the first row of array a among all rows
        for a in arrays:
            for s in range(max(lo, start), min(hi, start + len(a)), chunk_rows):
                out.write(a[s - start : min(s + chunk_rows, hi, start + len(a)) - start])  # (chunk, dim) as float32
            start += len(a)
    dst.unlink(missing_ok=True)  # never write through a hard link into a sibling index's file
    os.replace(tmp, dst)


def import_embeddings(path: Path, work: Path, encoder: Encoder, n: int, log: Callable[[str], None],
                      chunk_rows: int = 65536) -> None:
    """Write ``embeddings.npy`` (n, dim) float32 from vectors a user already has (:func:`open_embeddings`); a
    few passages are re-encoded to warn when the vectors do not look like this encoder's."""
    write_embedding_rows(open_embeddings(path, encoder, n), 0, n, work, encoder.dim, chunk_rows)
    spot_check(work, encoder, log)
    log(f"imported {n} passage vectors from {path}")


def spot_check(work: Path, encoder: Encoder, log: Callable[[str], None], rows: int = 8) -> None:
    """Re-encode ``rows`` passages of the build directory ``work`` spread over it and warn when its given
    ``embeddings.npy`` differs from them by more than 1% of their scale."""
    emb = NpyRows(work / mf.EMBEDDINGS)
    picks = np.unique(np.linspace(0, len(emb) - 1, min(rows, len(emb))).astype(np.int64))
    passages = PassageStore(work / mf.PASSAGES).get(picks)
    ours = encoder.encode_passages([p.title for p in passages], [p.text for p in passages])  # (r, dim)
    given = np.asarray(emb[picks], dtype=np.float32)
    err = float(np.max(np.abs(ours - given)) / (np.max(np.abs(given)) + 1e-12))
    if err > 1e-2:
        log(f"warning: {len(picks)} passages re-encoded with {encoder.name} differ from the given vectors by up to "
            f"{err:.0%} of their scale: check that the vectors are this encoder's and in corpus order")


def _unshare(path: Path) -> None:
    """Give ``path`` its own inode (a copy), so that writing it cannot change another hard link's file."""
    tmp = path.with_name(f".{path.name}.unshare-{os.getpid()}")
    shutil.copyfile(path, tmp)
    os.replace(tmp, path)


def _reuse_sibling_embeddings(opts: BuildOptions, corpus_fp: str, encoder_fp: str, max_len: int, dst: Path,
                              log: Callable[[str], None]) -> bool:
    """Take the embeddings of a sibling index with the same corpus and passage encoder (hard link or copy)."""
    for path, man in list_indexes(Path(opts.out).expanduser().resolve().parent):
        enc = (man.get("encoder") or {}).get("passage") or {}
        if (man.get("dense") and man["corpus"]["fingerprint"] == corpus_fp and enc.get("fingerprint") == encoder_fp
                and enc.get("max_seq_length") == max_len and (path / mf.EMBEDDINGS).is_file()):
            dst.unlink(missing_ok=True)
            try:
                os.link(path / mf.EMBEDDINGS, dst)
            except OSError:
                shutil.copyfile(path / mf.EMBEDDINGS, dst)
            log(f"reusing the passage embeddings of {path.name} (same corpus and encoder)")
            return True
    return False


def _build_dense(opts: BuildOptions, work: Path, log: Callable[[str], None]) -> dict:
    emb = NpyRows(work / mf.EMBEDDINGS)  # read in slices by file calls (index/npy_rows.py)
    kind, why = dense_build.resolve_type(opts.index_type, *emb.shape)
    if why:
        log(f"index type {kind} ({opts.index_type}): {why}")
    index, rep = dense_build.build(emb, kind, hnsw_m=opts.hnsw_m, target_recall=opts.target_recall,
                                   fill_flat=False)  # saved without its vectors: they are embeddings.npy
    tmp = work / (mf.DENSE + ".new")
    index.save(tmp)
    os.replace(tmp, work / mf.DENSE)
    info = {"type": rep.kind, "factory": rep.factory, "search_param": rep.search_param,
            "search_value": rep.search_value, "rerank": rep.rerank, "recall_at_10_vs_exact": rep.recall_at_10,
            "build_seconds": round(rep.seconds, 2), "bytes": (work / mf.DENSE).stat().st_size}
    if why:
        info["chosen"] = f"{opts.index_type}: {why}"
    if rep.kind == "flat":
        msg = (f"dense index {rep.factory}: exact search over {mf.EMBEDDINGS} "
               f"({(work / mf.EMBEDDINGS).stat().st_size / 2**20:.1f} MiB, read into memory when the index opens)")
    else:
        msg = f"dense index {rep.factory}: {info['bytes'] / 2**20:.1f} MiB, built in {rep.seconds:.1f} s"
    if rep.recall_at_10 is not None:
        msg += f"; recall@10 vs exact {rep.recall_at_10:.3f}"
        if rep.search_param:
            msg += f" at {rep.search_param}={rep.search_value}"
        if rep.rerank:
            msg += f" with exact re-ranking of the best {rep.rerank * TUNE_K:,} candidates (for k <= {TUNE_K})"
        if rep.recall_at_10 < opts.target_recall:
            msg += f" (below the {opts.target_recall} target even at the largest setting)"
    log(msg)
    return info


def _build_bm25(work: Path, log: Callable[[str], None], corpus_stats: BM25Stats | None = None) -> dict:
    t0 = time.perf_counter()
    store = PassageStore(work / mf.PASSAGES)
    tmp = work / (mf.BM25 + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    bm = BM25Index.build(store.text_chunks(), tmp, corpus_stats=corpus_stats)
    shutil.rmtree(work / mf.BM25, ignore_errors=True)
    os.replace(tmp, work / mf.BM25)
    size = sum(f.stat().st_size for f in (work / mf.BM25).iterdir())
    secs = time.perf_counter() - t0
    log(f"BM25 index: {size / 2**20:.1f} MiB, built in {secs:.1f} s")
    return {**bm.params, "build_seconds": round(secs, 2), "bytes": size}
