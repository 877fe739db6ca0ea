"""Retrieval benchmark on the bundled corpus (English Wikipedia leads) and FanOutQA dev sub-questions.

How it measures and what it prints: docs/benchmarks.md (retrieval.py).

    python3 benchmarks/retrieval.py [--workdir DIR] [--limit N] [--types flat,hnsw,...]
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import faiss
import numpy as np

from ragline import paths, vocab
from ragline.evaluate.retrieval import evaluate_retrieval, load_retrieval_questions
from ragline.index.build import BuildOptions, build_index
from ragline.index.dense import DenseIndex
from ragline.index.directory import IndexDir
from ragline.models.encoders import BiEncoder
from ragline.retriever import Retriever
from ragline.vocab import INDEX_TYPES

K = 10
KS = vocab.RETRIEVAL_KS


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes moved per second by a large array copy (read + write), best of ``repeats``."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def timed_qps(fn, n_queries: int, min_seconds: float = 1.0) -> float:
    """Queries per second of ``fn`` (which answers ``n_queries``), repeated for at least min_seconds."""
    fn()  # warm-up
    done, t0 = 0, time.perf_counter()
    while True:
        fn()
        done += n_queries
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return done / elapsed


def single_qps(one, n: int, clients: int, min_seconds: float = 1.0) -> float:
    """Queries per second answering queries one at a time (``one(i)`` answers query i) from ``clients``
    threads at once: how a server uses several cores for single queries."""
    one(0)  # warm-up
    counts = [0] * clients
    t0 = time.perf_counter()

    def client(c: int) -> None:
        i = c
        while time.perf_counter() - t0 < min_seconds:
            one(i % n)
            counts[c] += 1
            i += clients

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def speeds(one, batch, n: int, set_threads) -> dict[str, float]:
    """single@Nt: N clients sending single queries; batch@Nt: all queries in one call on N threads."""
    out = {f"single@{c}t": single_qps(one, n, c) for c in (1, 2)}
    for t in (1, 2):
        set_threads(t)
        out[f"batch@{t}t"] = timed_qps(batch, n)
    set_threads(0)
    return out


def scaled_exact(emb: np.ndarray, n: int, seed: int = 0) -> faiss.Index:
    """An exact index of ``n`` vectors: the real ones repeated with noise, renormalised."""
    rng = np.random.default_rng(seed)
    reps = -(-n // len(emb))
    x = np.tile(emb, (reps, 1))[:n] + 0.05 * rng.standard_normal((n, emb.shape[1]), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(x)
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=paths.home() / "bench" / "retrieval")
    ap.add_argument("--limit", type=int, default=None, help="index only the first N documents")
    ap.add_argument("--types", default=",".join(INDEX_TYPES))
    ap.add_argument("--scaled", type=int, default=200_000, help="vectors in the memory-bound exact row (0: skip)")
    args = ap.parse_args()
    types = [t for t in args.types.split(",") if t]
    assert types[0] == "flat", "flat comes first: it is the reference and computes the embeddings"

    encoders = BiEncoder.load()
    built = {}
    for kind in types:
        out = args.workdir / kind
        if not (out / "manifest.json").is_file():
            build_index(BuildOptions(source="wiki-leads", out=out, index_type=kind, limit=args.limit,
                                     bm25=(kind == "flat")), encoders=encoders)
        built[kind] = IndexDir.open(out)
    flat = built["flat"]
    questions, note = load_retrieval_questions("fanoutqa-dev", flat)
    print(note)
    texts = [q.question for q in questions]
    qvec = encoders.question.encode(texts)  # (Q, d)

    bandwidth = copy_bandwidth()
    rows = []
    n = len(texts)

    def dense_threads(idx):
        def set_threads(t):
            idx.dense.threads = t or faiss.omp_get_max_threads()
        return set_threads

    for kind, idx in built.items():
        m = idx.manifest
        r = Retriever(idx, encoders.question)
        rec = evaluate_retrieval(r, questions, KS, "dense")
        sp = speeds(lambda i, idx=idx: idx.dense.search(qvec[i : i + 1], K), lambda idx=idx: idx.dense.search(qvec, K),
                    n, dense_threads(idx))
        rows.append({"index": f"dense {kind} ({m['dense']['factory']})",
                     "build_s": m["dense"]["build_seconds"],  # a flat index's vectors: embeddings.npy, counted
                     "mib": (m["dense"]["bytes"] + (idx.embeddings.nbytes if kind == "flat" else 0)) / 2**20,
                     "recall_vs_exact": m["dense"]["recall_at_10_vs_exact"], **sp, **rec})
    r = Retriever(flat, encoders.question)

    def all_threads(t):  # BM25 scores query by query on one thread
        flat.dense.threads = t or faiss.omp_get_max_threads()

    for mode in ("bm25", "hybrid"):
        rec = evaluate_retrieval(r, questions, KS, mode)
        sp = speeds(lambda i, mode=mode: r.retrieve(texts[i : i + 1], K, mode, qvec[i : i + 1]),
                    lambda mode=mode: r.retrieve(texts, K, mode, qvec), n, all_threads)
        label = "bm25 (bm25s scores, numpy top-k)" if mode == "bm25" else "hybrid (flat + bm25, weighted RRF)"
        row = {"index": label, **sp, **rec}
        if mode == "bm25":
            row.update(build_s=flat.manifest["bm25"]["build_seconds"], mib=flat.manifest["bm25"]["bytes"] / 2**20)
        rows.append(row)

    # peers measured in the same run: FAISS's own exact scan as shipped, and numpy brute force
    raw = flat.dense.index

    def faiss_threads(t):
        faiss.omp_set_num_threads(t or faiss.omp_get_max_threads())

    def faiss_one(i):
        faiss.omp_set_num_threads(1)
        raw.search(qvec[i : i + 1], K)

    rows.append({"index": "peer: FAISS IndexFlatIP.search", **speeds(faiss_one, lambda: raw.search(qvec, K), n,
                                                                      faiss_threads)})
    emb = np.ascontiguousarray(flat.embeddings)
    rows.append({"index": "peer: numpy brute force (emb @ q)",
                 "single@1t": single_qps(lambda i: np.argpartition(-(emb @ qvec[i]), K)[:K], n, 1),
                 "batch@1t": timed_qps(lambda: np.argpartition(-(qvec @ emb.T), K, axis=1)[:, :K], n)})

    print(f"\ncorpus: {len(flat)} passages; encoding took {flat.manifest['timing'].get('encode_seconds', 0):.0f} s "
          f"({len(flat) / max(flat.manifest['timing'].get('encode_seconds', 1), 1e-9):.0f} passages/s); "
          f"dev questions: {len(questions)}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    head = ["index", "build_s", "mib", "recall_vs_exact", "single@1t", "single@2t", "batch@1t", "batch@2t",
            "x_flat", "recall@1", "recall@5", "recall@20", "recall@100"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    base = rows[0]["single@1t"]
    for row in rows:
        row["x_flat"] = row["single@1t"] / base if row.get("single@1t") else None
        cells = []
        for h in head:
            v = row.get(h)
            cells.append("-" if v is None else v if isinstance(v, str) else f"{v:.3f}" if h.startswith("recall")
                         or h == "x_flat" else f"{v:.1f}" if h in ("build_s", "mib") else f"{v:,.0f}")
        print("| " + " | ".join(cells) + " |")
    print("\nsingle@Nt = N client threads each sending one query at a time; batch@Nt = all dev questions in "
          "one call on N threads; x_flat = single@1t relative to ragline's exact flat search; recall_vs_exact = "
          "recall@10 against exact search measured on build (tuned efSearch/nprobe, IVF-PQ with exact "
          "re-ranking); recall@k = gold page among the top-k passages for the dev questions. Question "
          "encoding is not included (q(x) computed once).")

    print("\nragline exact search against memory bandwidth (one query at a time, 1 thread):")
    print("| index | vectors | MB scanned per query | queries/s | GB/s scanned | fraction of copy bandwidth |")
    print("|---|---|---|---|---|---|")
    cases = [("bundled (cache-resident)", flat.dense.index)]
    if args.scaled:
        cases.append((f"scaled to {args.scaled:,} (memory-bound)", scaled_exact(emb, args.scaled)))
    for name, index in cases:
        di = DenseIndex(index, "flat")
        qps = single_qps(lambda i, di=di: di.search(qvec[i : i + 1], K), len(qvec), 1)
        scanned = index.ntotal * index.d * 4
        print(f"| {name} | {index.ntotal:,} | {scanned / 1e6:.1f} | {qps:,.0f} | {qps * scanned / 1e9:.1f} | "
              f"{qps * scanned / bandwidth:.2f} |")


if __name__ == "__main__":
    main()
