"""Scale: with --passages, an index of millions of passages on one machine (benchmarks/scale_passages.py);
otherwise scale-out on Ray: encoding and search throughput of sharded indexes (1, 2 and 4 shards) against the local

How it measures and what it prints: docs/benchmarks.md (scale.py).

    python3 benchmarks/scale.py [--docs 3000] [--shards 1,2,4] [--queries 200] [--json FILE]
    python3 benchmarks/scale.py --passages 1000000[,3000000] --work DIR [--types flat,hnsw,...] [--queries 100]
                                [--no-compact] [--shards N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ragline import vocab

MODES = vocab.MODES


def time_search(retriever, questions: list[str], mode: str, batch: int, k: int = 10) -> tuple[float, float]:
    """(queries per second, mean seconds per call) over ``questions`` in batches of ``batch``."""
    retriever.retrieve(questions[:batch], k, mode)  # warm-up
    lat = []
    t0 = time.perf_counter()
    for lo in range(0, len(questions), batch):
        t = time.perf_counter()
        retriever.retrieve(questions[lo : lo + batch], k, mode)
        lat.append(time.perf_counter() - t)
    return len(questions) / (time.perf_counter() - t0), statistics.mean(lat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--shards", default=None, help="shard counts to compare (default 1,2,4); with --passages: build "
                    "each index as one sharded index of N shards on a local Ray (default: a single index)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--work", type=Path, default=None, help="Keep the indexes here (default: a temp folder).")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--passages", default=None, help="N[,N...]: an index of N passages on one machine (see above)")
    ap.add_argument("--types", default="flat", help="with --passages: the dense index types to build")
    ap.add_argument("--index", type=Path, default=None, help="with --passages: the index of the real passages "
                    "(default: the bundled one)")
    ap.add_argument("--no-compact", action="store_true", help="with --passages: skip `ragline compact` (a rebuild "
                    "of the whole index: an hour at 10M passages)")
    args = ap.parse_args()
    if args.passages:
        from scale_passages import run

        from ragline import paths

        if args.work is None:
            raise SystemExit("--passages needs --work DIR (the corpus, vectors and indexes take gigabytes)")
        run([int(n) for n in args.passages.split(",")], args.work, args.types.split(","),
            args.queries, args.index or paths.default_index_dir(), args.json, compact=not args.no_compact,
            shards=int(args.shards) if args.shards else None)
        return

    from ragline.index.build import BuildOptions, build_index
    from ragline.questions import load_fanoutqa
    from ragline.retriever import Retriever
    from ragline.scale.build import build_sharded
    from ragline.scale.cluster import connect

    work = args.work or Path(tempfile.mkdtemp(prefix="ragline-scale-"))
    questions = [q.question for q in load_fanoutqa("dev")][: args.queries]
    quiet = lambda m: None  # noqa: E731
    builds = {}

    out = work / "local"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    build_index(BuildOptions(source="wiki-leads", out=out, limit=args.docs, progress=False), log=quiet)
    builds["local"] = (out, time.perf_counter() - t0)
    ray = connect()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    for n in (int(x) for x in (args.shards or "1,2,4").split(",")):
        out = work / f"ray-{n}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        build_sharded(BuildOptions(source="wiki-leads", out=out, limit=args.docs, progress=False), shards=n, log=quiet)
        builds[f"ray {n}"] = (out, time.perf_counter() - t0)
        print(f"built ray {n} in {builds[f'ray {n}'][1]:.0f} s", file=sys.stderr)

    rows = []
    for name, (path, total) in builds.items():
        m = json.loads((path / "manifest.json").read_text())
        n_passages = m["corpus"]["passages"]
        row = {"system": name, "passages": n_passages, "build_s": total,
               "encode_per_s": n_passages / m["timing"]["encode_seconds"], "build_per_s": n_passages / total}
        r = Retriever(path)
        for mode in MODES:
            row[f"{mode}_qps1"], row[f"{mode}_lat1"] = time_search(r, questions, mode, 1)
            row[f"{mode}_qps32"], _ = time_search(r, questions, mode, 32)
        rows.append(row)
        print(f"searched {name}", file=sys.stderr)
        del r

    local = rows[0]
    print(f"\n{local['passages']} passages ({args.docs} documents), {len(questions)} questions, k=10, "
          f"{os.cpu_count()} cores ({cpus} Ray CPUs); ratios against the local path\n")
    print("| system | encode passages/s | build passages/s (with start-up) | "
          + " | ".join(f"{m} q/s (1 / 32 per call)" for m in MODES) + " |")
    print("|---|---|---|" + "---|" * len(MODES))
    for r in rows:
        cells = [f"{r['encode_per_s']:.0f} ({r['encode_per_s'] / local['encode_per_s']:.2f}x)",
                 f"{r['build_per_s']:.0f} ({r['build_per_s'] / local['build_per_s']:.2f}x)"]
        cells += [f"{r[f'{m}_qps1']:.0f} / {r[f'{m}_qps32']:.0f} ({r[f'{m}_qps32'] / local[f'{m}_qps32']:.2f}x)"
                  for m in MODES]
        print(f"| {r['system']} | " + " | ".join(cells) + " |")
    print("\nfan-out overhead per single query (sharded mean latency minus local), ms:\n")
    print("| system | " + " | ".join(MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    for r in rows[1:]:
        print(f"| {r['system']} | "
              + " | ".join(f"{1000 * (r[f'{m}_lat1'] - local[f'{m}_lat1']):.1f}" for m in MODES) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
