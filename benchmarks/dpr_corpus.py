"""Memory of reading DPR's passage file: peak resident memory of streaming a generated psgs_w100-style TSV into a
passage store (what `ragline index --source psgs_w100.tsv` does before encoding), at growing sizes.

How it measures and what it prints: docs/benchmarks.md (dpr_corpus.py).

    python3 benchmarks/dpr_corpus.py [--sizes 10000,100000,1000000] [--workdir DIR]

Each size runs in a fresh process (so peaks do not carry over); the floor is the same process importing ragline
and reading nothing. Flat peaks across sizes mean constant memory: the reader holds one batch of rows, and the
duplicate-id check keeps DPR's integer ids in a bitmap (1 bit each).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from pathlib import Path
from ragline.corpus.passages import split_documents
from ragline.corpus.readers import read_corpus
from ragline.corpus.store import PassageStoreWriter
src, out = sys.argv[1], Path(sys.argv[2])
t0 = time.perf_counter()
n = 0
if src != "-":
    with PassageStoreWriter(out) as w:
        w.add_all(split_documents(read_corpus(src)))
        n = w.count
print(json.dumps({"passages": n, "seconds": time.perf_counter() - t0,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_tsv(path: Path, n: int, seed: int = 0) -> None:
    """n passages of 100 words each, ids 1..n, DPR's header and quoting."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)] + ['"quoted"', "comma,", "tab-free"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "text", "title"])
        for i in range(1, n + 1):
            w.writerow([i, " ".join(rng.choices(words, k=100)), f"Title {i // 7}"])


def measure(src: str, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, src, str(out)], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        floor = measure("-", Path(tmp) / "none.arrow")
        print(f"{'passages':>10} {'TSV MiB':>8} {'seconds':>8} {'peak MiB':>9} {'over floor':>10}")
        print(f"{'(floor)':>10} {'':>8} {'':>8} {floor['peak_mib']:9.0f} {0:10.0f}")
        for n in sizes:
            tsv = Path(tmp) / f"psgs-{n}.tsv"
            t0 = time.perf_counter()
            write_tsv(tsv, n)
            gen = time.perf_counter() - t0
            r = measure(str(tsv), Path(tmp) / f"psgs-{n}.arrow")
            assert r["passages"] == n, r
            print(f"{n:>10} {tsv.stat().st_size / 2**20:8.0f} {r['seconds']:8.1f} {r['peak_mib']:9.0f} "
                  f"{r['peak_mib'] - floor['peak_mib']:10.0f}   (file written in {gen:.0f} s)", flush=True)
            tsv.unlink()


if __name__ == "__main__":
    main()
