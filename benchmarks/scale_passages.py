"""Scale on one machine: an index of N passages built, opened, searched and changed, each step measured.

    python3 benchmarks/scale.py --passages 1000000[,3000000] --work DIR [--types flat,hnsw,ivfpq,sq8]
                                [--queries 100] [--shards N]

For each N the corpus and its vectors come from benchmarks/scale_corpus.py (the bundled leads' real passages
as needles among distractors made of the leads' sentences). For each index type, in fresh processes, one at a
time (so that each peak is its own):

* ``ragline index --source corpus --embeddings vectors --index-type T``: seconds, peak resident memory (the
  process's, read at its exit), size on disk; the manifest's recall@10 against exact search for approximate
  types;
* ``ragline serve`` with the tiny generator: seconds from the command to its first answered ``/health``;
* the probe (this file with ``--probe``): seconds to open the index (``open_retriever``), single-query search
  latency p50 / p95 for dense, BM25 and hybrid over dev questions, batched queries per second, and
  ``eval-retrieval``'s recall@k of the dev questions (ids 0-7) whose page is among the needles;
* ``ragline add`` of 1,000 new documents, ``ragline delete`` of those 1,000, ``ragline compact`` (unless
  ``--no-compact``): seconds and peak memory each.

With ``--shards N`` each index is one sharded index of N shards built and searched on a local Ray
(``ragline index --ray --shards N --embeddings ...``): its memory is then the peak of the whole process tree
(the command, Ray's own processes and its workers, proportional set sizes summed, sampled every second), and
its recall@10 against exact search is the mean of the shards' own.

Prints one table row per (N, type) and, with ``--json``, every number.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# Runs ragline's CLI in a child and prints the child's peak resident memory (KiB) to stderr at its exit.
PEAK = ("import atexit, resource, runpy, sys\n"
        "atexit.register(lambda: print(f'PEAK_RSS_KB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}',"
        " file=sys.stderr))\n"
        "sys.argv = ['ragline', *sys.argv[1:]]\n"
        "runpy.run_module('ragline', run_name='__main__')\n")
HERE = Path(__file__).resolve().parent
ADDED = 1000
EXACT_QUERIES = 100  # dev questions whose dense top 10 is checked against exact search over every vector


def tree_peak(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd``; (its result, the peak over its run of the summed proportional set sizes of it and every
    process under it, GiB, sampled every second): Ray's processes and workers are counted, shared pages once."""
    import psutil

    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        root = psutil.Process(child.pid)
        while not stop.wait(1.0):
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_full_info().pss
            peak[0] = max(peak[0], total)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = child.communicate()
    stop.set()
    thread.join()
    return subprocess.CompletedProcess(cmd, child.returncode, out, err), peak[0] / 2**30


def measured(args: list[str], what: str, tree: bool = False) -> dict:
    """Run ``ragline ARGS`` in a child: its seconds and peak memory (GiB: the child's own, or with ``tree`` its
    whole process tree's, :func:`tree_peak`); fails loudly."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-c", PEAK, *args]
    if tree:
        done, tree_gib = tree_peak(cmd)
    else:
        done = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    kb = [int(x) for x in re.findall(r"PEAK_RSS_KB=(\d+)", done.stderr)]
    peak = tree_gib if tree else kb[-1] / 2**20
    print(f"  {what}: {secs:.1f} s, peak {peak:.2f} GiB", file=sys.stderr)
    return {"seconds": secs, "peak_gib": peak, "log": done.stderr[-2000:]}


def probe(index: Path, queries: int) -> dict:
    """Open the index and search it (run in a fresh process by :func:`run`); prints JSON."""
    import resource

    import numpy as np

    from ragline import vocab
    from ragline.evaluate.retrieval import evaluate_retrieval, load_retrieval_questions
    from ragline.questions import load_fanoutqa
    from ragline.retriever import open_retriever

    t0 = time.perf_counter()
    r = open_retriever(index, None, log=lambda m: None)
    out = {"open_s": time.perf_counter() - t0}
    qs = [q.question for q in load_fanoutqa("dev") if q.id[0] in "01234567"][:queries]
    r.retrieve(qs[:2], 10, vocab.DENSE)  # the encoder's first call
    for mode in vocab.MODES:
        lat = []
        for q in qs:
            t = time.perf_counter()
            r.retrieve([q], 10, mode)
            lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        for lo in range(0, len(qs), 32):
            r.retrieve(qs[lo : lo + 32], 10, mode)
        out[mode] = {"p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * float(np.percentile(lat, 95)),
                     "batched_qps": len(qs) / (time.perf_counter() - t)}
    dev, _ = load_retrieval_questions("fanoutqa-dev", r.index)
    for mode in vocab.MODES:
        m = evaluate_retrieval(r, dev, (1, 5, 20), mode)
        out[mode].update({f"recall@{k}": m[f"recall@{k}"] for k in (1, 5, 20)}, questions=len(dev))
    if r.index.dense is not None:
        res = r.retrieve(qs[:EXACT_QUERIES], 10, vocab.DENSE)
        out["dense"]["recall10_vs_exact_dev"] = exact_recall(index, res.question_vectors, res.rows)
    out["probe_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def exact_recall(index: Path, queries, rows) -> float:
    """Recall@k of the dense search's ``rows`` (B, k) against the exact top k of ``queries`` (B, dim) over every
    stored vector: each shard's ``embeddings.npy`` (the index's own, unsharded) streamed by the build's
    ``exact_top_k``, the shards' top k merged as a search merges them. Read with file calls (``NpyRows``), not
    a second map of the file the index maps: the probe's peak resident size is then the search's own."""
    import numpy as np

    from ragline.index.dense_build import exact_top_k, recall_of
    from ragline.index.npy_rows import NpyRows
    from ragline.index.topk import merge_top_k
    from ragline.scale.sharded import shard_dir

    man = json.loads((index / "manifest.json").read_text())
    parts = [(shard_dir(index, s) / "embeddings.npy", s["offset"]) for s in man.get("shards", [])]
    k, found = rows.shape[1], []
    for path, offset in parts or [(index / "embeddings.npy", 0)]:
        emb = NpyRows(path)
        top = exact_top_k(emb, queries, k)  # (B, k) rows of this part
        vecs = np.asarray(emb[top.reshape(-1)], dtype=np.float32).reshape(*top.shape, -1)  # (B, k, dim)
        found.append((np.einsum("bkd,bd->bk", vecs, queries), top + offset))
    return recall_of(rows, merge_top_k(found, k)[1], k)


def serve_ready(index: Path, work: Path) -> float:
    """Seconds from ``ragline serve`` (the tiny generator, so that the index is what is timed) to its first
    answered /health (serving.py's start_server, which polls it every 0.5 s)."""
    from serving import free_port, start_server

    from ragline.models.tiny import save_tiny_causal

    generator = work / "tiny-llama"
    if not (generator / "config.json").is_file():
        save_tiny_causal(generator)
    t0 = time.perf_counter()
    server = start_server(index, generator, free_port(), 8, work / "serve.log")
    ready = time.perf_counter() - t0
    server.terminate()
    server.wait(timeout=60)
    return ready


def _added_docs(path: Path, corpus: Path) -> Path:
    """``ADDED`` new documents (the corpus's first distractors' texts under new ids), as JSONL."""
    lines = []
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["id"].startswith("mix-"):
                lines.append(json.dumps({"id": f"added-{len(lines)}", "title": f"Added {len(lines)}",
                                         "text": rec["text"]}))
                if len(lines) == ADDED:
                    break
    path.write_text("\n".join(lines) + "\n")
    return path


def run(passages: list[int], work: Path, types: list[str], queries: int, index_dir: Path, json_out: Path | None,
        compact: bool = True, shards: int | None = None) -> None:
    from scale_corpus import make

    from ragline.scale.sharded import shard_dir

    rows = []
    for n in passages:
        corpus, vectors = make(n, work, index_dir, log=lambda m: print(m, file=sys.stderr))
        for kind in types:
            out = work / (f"index-{n}-{kind}" + (f"-{shards}shards" if shards else ""))
            row = {"passages": n, "type": kind, "shards": shards}
            print(f"{n:,} passages, {kind}" + (f", {shards} shards on Ray" if shards else "") + ":", file=sys.stderr)
            ray = ["--ray", "--shards", str(shards)] if shards else []
            row["build"] = measured(["index", "--source", str(corpus), "--embeddings", str(vectors), "--out", str(out),
                                     "--index-type", kind, "--force", *ray], "build", tree=bool(shards))
            man = json.loads((out / "manifest.json").read_text())
            row["disk_gib"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30
            parts = [json.loads((shard_dir(out, s) / "manifest.json").read_text())
                     for s in man.get("shards", [])] or [man]
            recalls = [(m.get("dense") or {}).get("recall_at_10_vs_exact") for m in parts]
            row["recall10_vs_exact"] = None if None in recalls else statistics.mean(recalls)
            cmd = [sys.executable, str(Path(__file__)), "--probe", str(out), "--queries", str(queries)]
            done, tree_gib = tree_peak(cmd) if shards else (subprocess.run(cmd, capture_output=True, text=True), None)
            if done.returncode != 0:
                raise SystemExit(f"probe failed:\n{done.stderr[-3000:]}")
            row["probe"] = json.loads(done.stdout.strip().splitlines()[-1])
            if tree_gib is not None:
                row["probe"]["probe_tree_peak_gib"] = tree_gib
            row["dense_type"] = (man.get("dense") or {}).get("type")  # what auto picked
            row["serve_ready_s"] = serve_ready(out, work)
            added = _added_docs(work / "added.jsonl", corpus)
            row["add"] = measured(["add", "--index", str(out), str(added)], f"add {ADDED}", tree=bool(shards))
            doc_args = [a for i in range(ADDED) for a in ("--doc", f"added-{i}")]
            row["delete"] = measured(["delete", "--index", str(out), *doc_args], f"delete {ADDED}", tree=bool(shards))
            if compact:
                row["compact"] = measured(["compact", "--index", str(out)], "compact", tree=bool(shards))
            for part in ("build", "add", "delete", "compact"):
                if part in row:
                    row[part].pop("log")
            rows.append(row)
    print(f"\none machine ({os.cpu_count()} cores), vectors given (--embeddings); latency over {queries} dev "
          "questions, k=10\n")
    print("| passages | type | build s | build peak GiB | disk GiB | recall@10 vs exact | open s | serve ready s | "
          "dense p50 / p95 ms | BM25 p50 / p95 ms | hybrid p50 / p95 ms | hybrid q/s batched | "
          "dev recall@20 dense / hybrid | add 1,000 s (GiB) | delete 1,000 s | compact s (GiB) |")
    print("|" + "---|" * 16)
    for r in rows:
        p = r["probe"]
        lat = " | ".join(f"{p[m]['p50_ms']:.0f} / {p[m]['p95_ms']:.0f}" for m in ("dense", "bm25", "hybrid"))
        exact = "-" if r["recall10_vs_exact"] is None else f"{r['recall10_vs_exact']:.3f}"
        if p["dense"].get("recall10_vs_exact_dev") is not None:
            exact += f" (dev {p['dense']['recall10_vs_exact_dev']:.3f})"
        kind = r["type"] if r["dense_type"] == r["type"] else f"{r['type']} ({r['dense_type']})"
        kind += f", {r['shards']} shards (Ray)" if r.get("shards") else ""
        print(f"| {r['passages']:,} | {kind} | {r['build']['seconds']:.0f} | {r['build']['peak_gib']:.2f} | "
              f"{r['disk_gib']:.2f} | {exact} | {p['open_s']:.1f} | {r['serve_ready_s']:.1f} | {lat} | "
              f"{p['hybrid']['batched_qps']:.0f} | "
              f"{p['dense']['recall@20']:.3f} / {p['hybrid']['recall@20']:.3f} | "
              f"{r['add']['seconds']:.0f} ({r['add']['peak_gib']:.2f}) | {r['delete']['seconds']:.0f} | "
              + (f"{r['compact']['seconds']:.0f} ({r['compact']['peak_gib']:.2f}) |" if "compact" in r else "- |"))
    if json_out:
        json_out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--probe":
        queries = int(sys.argv[sys.argv.index("--queries") + 1]) if "--queries" in sys.argv else 100
        print(json.dumps(probe(Path(sys.argv[2]), queries)))
    else:
        raise SystemExit("run through benchmarks/scale.py --passages N")
