"""Updating an index in place against rebuilding it, and searching with delta segments against a compacted index.

How it measures and what it prints: docs/benchmarks.md (updates.py).

    python3 benchmarks/updates.py [--workdir DIR] [--passages 1000] [--skip-rebuild]

1. The bundled index (built by `ragline demo`, or here) less its last documents holding about ``--passages``
   passages is made with `ragline delete` + `ragline compact` (no re-encoding).
2. Those documents are added back with `ragline add` (timed, MiniLM on this CPU), against `ragline index` of
   the whole corpus (timed in the same run).
3. Copies with the same documents added in 1, 5 and 20 segments (20 documents also deleted in each) are searched
   with the FanOutQA dev questions, one question at a time, dense (q(x) precomputed), BM25 and hybrid, against
   the compacted index; every copy's results are checked equal to the compacted index's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ragline import paths
from ragline.corpus.passages import encoder_text
from ragline.index.build import BuildOptions, build_index
from ragline.index.registry import open_index
from ragline.index.update import add_documents, compact_index, delete_documents, live_documents
from ragline.models.encoders import BiEncoder
from ragline.questions.fanoutqa import load_fanoutqa
from ragline.retriever import Retriever

K = 10
SEGMENTS = (1, 5, 20)
DELETED = 20


class CachedPassages:
    """The passage encoder with vectors looked up by (title, text) when already known (copies re-add the same
    passages; only the first add is timed with real encoding)."""

    def __init__(self, encoder, known: dict[str, np.ndarray]) -> None:
        self.encoder, self.known, self.name = encoder, known, encoder.name

    def encode_passages(self, titles, texts, batch_size: int = 64) -> np.ndarray:
        keys = [encoder_text(a, b) for a, b in zip(titles, texts, strict=True)]
        missing = [i for i, k in enumerate(keys) if k not in self.known]
        if missing:
            vecs = self.encoder.encode_passages([titles[i] for i in missing], [texts[i] for i in missing], batch_size)
            self.known.update({keys[i]: v for i, v in zip(missing, vecs, strict=True)})
        return np.stack([self.known[k] for k in keys])


def quiet(_: str) -> None:
    pass


def per_question_ms(retriever: Retriever, questions: list[str], vectors: np.ndarray, mode: str) -> float:
    index = retriever.index
    t0 = time.perf_counter()
    for i, q in enumerate(questions):
        if mode == "dense":
            index.dense.search(vectors[i:i + 1], K)
        elif mode == "bm25":
            index.bm25.search([q], K)
        else:
            retriever.retrieve([q], K, "hybrid", question_vectors=vectors[i:i + 1])
    return 1000 * (time.perf_counter() - t0) / len(questions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--passages", type=int, default=1000, help="passages to add")
    ap.add_argument("--questions", type=int, default=300, help="FanOutQA dev questions searched per row")
    ap.add_argument("--skip-rebuild", action="store_true", help="do not time a full rebuild")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ragline-updates-"))
    work.mkdir(parents=True, exist_ok=True)
    enc = BiEncoder.load("minilm")
    bundled = paths.default_index_dir()
    if not (bundled / "manifest.json").is_file():
        build_index(BuildOptions(source="wiki-leads", out=bundled, progress=False), encoders=enc, log=quiet)

    # 1. the base: the bundled index less its last documents (about --passages passages)
    full = open_index(bundled)
    docs = live_documents(full)
    tail, n = [], 0
    for doc_id, (rows, _) in reversed(list(docs.items())):
        if n >= args.passages:
            break
        tail.append(doc_id)
        n += len(rows)
    tail.reverse()
    records = []
    for doc_id in tail:
        ps = full.store.get(docs[doc_id][0])
        records.append({"id": doc_id, "title": ps[0].title, "text": " ".join(p.text for p in ps)})
    src = work / "added.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    base = work / "base"
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(bundled, base)
    delete_documents(base, tail, log=quiet)
    compact_index(base, log=quiet)

    # 2. add them back (timed) vs a full rebuild (timed)
    added = work / "added-1"
    shutil.rmtree(added, ignore_errors=True)
    shutil.copytree(base, added)
    t0 = time.perf_counter()
    change = add_documents(added, [str(src)], encoder=enc.passage, log=quiet)
    t_add = time.perf_counter() - t0
    t_rebuild = None
    if not args.skip_rebuild:
        t0 = time.perf_counter()
        build_index(BuildOptions(source="wiki-leads", out=work / "rebuilt", force=True, progress=False),
                    encoders=enc, log=quiet)
        t_rebuild = time.perf_counter() - t0
    print(f"\nadd {change.passages_added} passages ({len(tail)} documents) to a {len(open_index(base))}-passage "
          f"index on this CPU (MiniLM)\n")
    print(f"{'operation':<34}{'seconds':>10}")
    print(f"{'ragline add':<34}{t_add:>10.1f}")
    if t_rebuild is not None:
        print(f"{'ragline index (full rebuild)':<34}{t_rebuild:>10.1f}")
        print(f"{'speed-up':<34}{t_rebuild / t_add:>9.1f}x")

    # 3. search with 1, 5, 20 segments (and DELETED documents deleted) against the compacted index
    done = open_index(added)  # the vectors the timed add computed, reused by the copies
    new_rows = np.arange(len(open_index(base)), len(done))
    cache = CachedPassages(enc.passage, {encoder_text(p.title, p.text): v for p, v in
                                         zip(done.store.get(new_rows), done.embeddings[new_rows], strict=True)})
    victims = [d for d in list(docs)[:: max(1, (len(docs) - len(tail)) // DELETED)] if d not in tail][:DELETED]
    copies = {}
    for segs in SEGMENTS:
        d = work / f"segments-{segs}"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(base, d)
        for part in np.array_split(np.arange(len(records)), segs):
            p = work / f"part-{segs}-{part[0]}.jsonl"
            p.write_text("".join(json.dumps(records[i]) + "\n" for i in part))
            add_documents(d, [str(p)], encoder=cache, log=quiet)
        delete_documents(d, victims, log=quiet)
        copies[segs] = d
    compacted = work / "compacted"
    shutil.rmtree(compacted, ignore_errors=True)
    shutil.copytree(copies[SEGMENTS[-1]], compacted)
    compact_index(compacted, log=quiet)

    questions = [q.question for q in load_fanoutqa("dev")][: args.questions]
    vectors = enc.question.encode(questions)
    ref = Retriever(compacted, enc.question, follow=False)
    rows = [("compacted (1 part)", ref)] + [(f"{s} delta segment{'s' if s > 1 else ''} + deletions",
                                             Retriever(copies[s], enc.question, follow=False)) for s in SEGMENTS]
    for _, r in rows[1:]:
        for mode in ("dense", "bm25", "hybrid"):
            a = r.retrieve(questions[:50], K, mode, question_vectors=vectors[:50])
            b = ref.retrieve(questions[:50], K, mode, question_vectors=vectors[:50])
            pa = [[p.pid for p in r.index.store.get(x[x >= 0])] for x in a.rows]
            pb = [[p.pid for p in ref.index.store.get(x[x >= 0])] for x in b.rows]
            same = sum(x == y for x, y in zip(pa, pb, strict=True))
            if same < len(pa):
                print(f"note: {mode}: {len(pa) - same} of {len(pa)} rankings differ from the compacted index's")
    print(f"\nsearch, ms per question (one at a time, k={K}, {len(questions)} FanOutQA dev questions; dense with "
          "q(x) precomputed)\n")
    print(f"{'index':<34}{'dense':>9}{'bm25':>9}{'hybrid':>9}")
    for name, r in rows:
        ms = [per_question_ms(r, questions, vectors, m) for m in ("dense", "bm25", "hybrid")]
        print(f"{name:<34}" + "".join(f"{x:>9.2f}" for x in ms))
    print(f"\nworkdir: {work}")


if __name__ == "__main__":
    main()
