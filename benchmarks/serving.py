"""Serving under load: a bounded load test of `ragline serve` on loopback with the tiny generator.

How it measures and what it prints: docs/benchmarks.md (serving.py).

    python3 benchmarks/serving.py [--index DIR] [--requests 200] [--concurrency 8] [--docs 300]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

WORKLOADS = {
    "search": ("/search", {"k": 5, "mode": "dense"}),
    "ask rag-token": ("/ask", {"model": "rag-token", "decoding": "greedy", "k": 5, "max_new_tokens": 16}),
    "ask rag-sequence": ("/ask", {"model": "rag-sequence", "decoding": "thorough", "beams": 2, "k": 5,
                                  "max_new_tokens": 16}),
    "stream rag-token": ("/ask/stream", {"model": "rag-token", "decoding": "greedy", "k": 5, "max_new_tokens": 16}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, generator: Path, port: int, max_batch: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ragline", "serve", "--index", str(index), "--generator", str(generator),
           "--port", str(port), "--max-batch", str(max_batch)]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; its output is in {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not answer /health within 300 s; its output is in {log}")


def one_request(client: httpx.Client, path: str, body: dict) -> tuple[float, float | None, bool]:
    """(latency s, time to the first streamed token s or None, ok)."""
    t0 = time.perf_counter()
    if not path.endswith("/stream"):
        r = client.post(path, json=body)
        return time.perf_counter() - t0, None, r.status_code == 200
    first, ok, events = None, True, []
    with client.stream("POST", path, json=body) as r:
        ok = r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
                if line == "event: partial" and first is None:
                    first = time.perf_counter() - t0
    ok = ok and events[:1] == ["passages"] and events[-2:] == ["answer", "done"] and "error" not in events
    return time.perf_counter() - t0, first, ok


def load(url: str, path: str, body: dict, questions: list[str], n: int, concurrency: int) -> dict:
    results: list[tuple[float, float | None, bool]] = []
    lock, counter = threading.Lock(), iter(range(n))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                try:
                    res = one_request(client, path, {**body, "question": questions[i % len(questions)]})
                except httpx.HTTPError:
                    res = (0.0, None, False)
                with lock:
                    results.append(res)

    before = httpx.get(f"{url}/health").json()["decoded"]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = httpx.get(f"{url}/health").json()["decoded"]
    lat = sorted(r[0] for r in results if r[2])
    firsts = sorted(r[1] for r in results if r[1] is not None)
    batches = after["batches"] - before["batches"]
    return {"requests": len(results), "errors": sum(not r[2] for r in results), "rps": len(results) / wall,
            "p50": statistics.median(lat) if lat else float("nan"),
            "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan"),
            "first_token_p50": statistics.median(firsts) if firsts else None,
            "per_batch": (after["questions"] - before["questions"]) / batches if batches else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=None, help="An index to serve (default: build a slice).")
    ap.add_argument("--docs", type=int, default=300, help="Documents in the slice index built when --index is unset.")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = ap.parse_args()

    from ragline.index.build import BuildOptions, build_index
    from ragline.models.tiny import save_tiny_causal
    from ragline.questions import load_fanoutqa

    work = Path(tempfile.mkdtemp(prefix="ragline-serving-"))
    index = args.index
    if index is None:
        print(f"building an index of the first {args.docs} documents", file=sys.stderr)
        index = build_index(BuildOptions(source="wiki-leads", out=work / "index", limit=args.docs, progress=False),
                            log=lambda m: None)
    generator = save_tiny_causal(work / "tiny-llama")
    questions = [q.question for q in load_fanoutqa("dev")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(index, generator, port, args.max_batch, work / "server.log")
    rows = []
    try:
        for name in args.workloads.split(","):
            path, body = WORKLOADS[name]
            load(url, path, body, questions, min(16, args.requests), args.concurrency)  # warm-up
            for conc in (args.concurrency, 1):
                row = {"workload": name, "concurrency": conc,
                       **load(url, path, body, questions, args.requests, conc)}
                rows.append(row)
                print(f"{name:18s} c={conc}: {row['rps']:.1f} req/s, p50 {1000 * row['p50']:.0f} ms, "
                      f"errors {row['errors']}", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=30)

    serial = {r["workload"]: r["rps"] for r in rows if r["concurrency"] == 1}
    print(f"\n{args.requests} requests per row on loopback; tiny generator; {os.cpu_count()} cores\n")
    print("| workload | concurrency | req/s | vs one at a time | p50 ms | p95 ms | first token p50 ms | "
          "questions per batch | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        first = "–" if r["first_token_p50"] is None else f"{1000 * r['first_token_p50']:.0f}"
        per_batch = "–" if r["per_batch"] is None else f"{r['per_batch']:.1f}"
        print(f"| {r['workload']} | {r['concurrency']} | {r['rps']:.1f} | {r['rps'] / serial[r['workload']]:.2f}x | "
              f"{1000 * r['p50']:.0f} | {1000 * r['p95']:.0f} | {first} | {per_batch} | {r['errors']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if any(r["errors"] for r in rows):
        raise SystemExit("some requests failed")


if __name__ == "__main__":
    main()
