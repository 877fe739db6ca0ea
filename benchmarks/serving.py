"""Serving under load: a bounded load test of `ragline serve` on loopback with the tiny generator or the real
default one, and a soak with faults (the real default generator, index swaps, clients leaving mid-stream).

How it measures and what it prints: docs/benchmarks.md (serving.py).

    python3 benchmarks/serving.py [--index DIR] [--requests 200] [--concurrency 8] [--docs 300]
    python3 benchmarks/serving.py --real [--requests 16] [--generator qwen2.5-0.5b] [--max-batch 8] [--max-running 2]
    python3 benchmarks/serving.py --soak 300 [--generator qwen2.5-0.5b] [--index DIR]
    python3 benchmarks/serving.py --replicas 0,1,2 [--real] [--workloads ...] [--requests N]

``--replicas``: a fresh server per row, ``ragline serve`` (0) or ``ragline serve --ray --replicas N`` (Ray Serve's
proxy in front of N model replicas), each workload at --concurrency clients; what the proxy costs and what
replicas give on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

CHAT = "/v1/chat/completions"
WORKLOADS = {
    "search": ("/search", {"k": 5, "mode": "dense"}),
    "ask rag-token": ("/ask", {"model": "rag-token", "decoding": "greedy", "k": 5, "max_new_tokens": 16}),
    "ask rag-sequence": ("/ask", {"model": "rag-sequence", "decoding": "thorough", "beams": 2, "k": 5,
                                  "max_new_tokens": 16}),
    "stream rag-token": ("/ask/stream", {"model": "rag-token", "decoding": "greedy", "k": 5, "max_new_tokens": 16}),
    # the same answers through the OpenAI-compatible route: what the adapter costs
    "chat rag-token": (CHAT, {"model": "ragline-rag-token", "decoding": "greedy", "k": 5, "max_tokens": 16}),
    "chat stream rag-token": (CHAT, {"model": "ragline-rag-token", "decoding": "greedy", "k": 5, "max_tokens": 16,
                                     "stream": True}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, generator: Path | str, port: int, max_batch: int, log: Path,
                 max_running: int | None = None, replicas: int = 0) -> subprocess.Popen:
    """``ragline serve`` (with ``replicas``: ``--ray --replicas N``) in a process, once /health answers."""
    cmd = [sys.executable, "-m", "ragline", "serve", "--index", str(index), "--generator", str(generator),
           "--port", str(port), "--max-batch", str(max_batch)]
    if max_running is not None:
        cmd += ["--max-running", str(max_running)]
    if replicas:
        cmd += ["--ray", "--replicas", str(replicas)]
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
    if path == CHAT:
        return chat_request(client, body, t0)
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


def chat_request(client: httpx.Client, body: dict, t0: float) -> tuple[float, float | None, bool]:
    """One OpenAI chat completion (streamed when the body says so): (latency s, first content s, ok)."""
    body = dict(body)
    body["messages"] = [{"role": "user", "content": body.pop("question")}]
    if not body.get("stream"):
        r = client.post(CHAT, json=body)
        return time.perf_counter() - t0, None, r.status_code == 200 and bool(r.json().get("choices"))
    first, lines = None, []
    with client.stream("POST", CHAT, json=body) as r:
        ok = r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if first is None and line[6:].startswith("{") and any(
                        c.get("delta", {}).get("content") for c in json.loads(line[6:]).get("choices", [])):
                    first = time.perf_counter() - t0
    ok = ok and lines[-1:] == ["[DONE]"] and not any(x.startswith('{"error"') for x in lines)
    return time.perf_counter() - t0, first, ok


def load(url: str, path: str, body: dict, questions: list[str], n: int, concurrency: int) -> dict:
    """``n`` requests of one workload from ``concurrency`` clients: the row's figures."""
    return load_mixed(url, [(path, body)], questions, n, concurrency)[0]


def load_mixed(url: str, kinds: list[tuple[str, dict]], questions: list[str], n: int, concurrency: int
               ) -> list[dict]:
    """``n`` requests from ``concurrency`` clients, request i of workload ``kinds[i % len(kinds)]``: the figures
    of each workload (its answers per second over the whole run's time)."""
    results: list[tuple[int, tuple[float, float | None, bool]]] = []
    lock, counter = threading.Lock(), iter(range(n))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                path, body = kinds[i % len(kinds)]
                try:
                    res = one_request(client, path, {**body, "question": questions[i % len(questions)]})
                except httpx.HTTPError:
                    res = (0.0, None, False)
                with lock:
                    results.append((i % len(kinds), res))

    before = httpx.get(f"{url}/health").json()["decoded"]  # one replica's, behind Ray Serve
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = httpx.get(f"{url}/health").json()["decoded"]
    batches = after["batches"] - before["batches"]
    rows = []
    for kind in range(len(kinds)):
        mine = [r for k, r in results if k == kind]
        lat = sorted(r[0] for r in mine if r[2])
        firsts = sorted(r[1] for r in mine if r[1] is not None)
        rows.append({"requests": len(mine), "errors": sum(not r[2] for r in mine), "rps": len(mine) / wall,
                     "p50": statistics.median(lat) if lat else float("nan"),
                     "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan"),
                     "first_token_p50": statistics.median(firsts) if firsts else None,
                     "per_batch": (after["questions"] - before["questions"]) / batches if batches else None})
    return rows


# --real: the default answer settings a user of the page gets (RAG-Sequence thorough, k=5, 4 beams)
REAL_WORKLOADS = {
    "ask rag-sequence": ("/ask", {"model": "rag-sequence", "decoding": "thorough", "k": 5, "beams": 4,
                                  "max_new_tokens": 24}),
    "ask rag-token": ("/ask", {"model": "rag-token", "decoding": "greedy", "k": 5, "max_new_tokens": 24}),
}
# --real's mixed row: the clients' requests alternate between these (batches of different settings at once)
MIXED = ("ask rag-sequence", "ask rag-token")

SOAK_ASK = {"model": "rag-token", "decoding": "greedy", "k": 3, "max_new_tokens": 16}
SOAK_KINDS = ("ask", "stream", "search", "stream, client leaves")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(url: str, names: list[str], questions: list[str], seconds: float, concurrency: int, swap_every: float,
         seed: int = 0) -> dict:
    """``concurrency`` clients send mixed requests for ``seconds``: ask, stream, search, and streams whose client
    leaves after the first partial answer; meanwhile the index is swapped every ``swap_every`` seconds."""
    stop = time.monotonic() + seconds
    stats = {k: {"ok": 0, "failed": 0, "latency": []} for k in SOAK_KINDS}
    swaps = {"ok": 0, "failed": 0}
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(base_url=url, timeout=900) as c:
            n = 0
            while time.monotonic() < stop:
                kind = SOAK_KINDS[(i + n) % len(SOAK_KINDS)]
                n += 1
                body = {**SOAK_ASK, "question": questions[rng.randrange(len(questions))]}
                t0 = time.perf_counter()
                try:
                    if kind == "search":
                        ok = c.post("/search", json={"question": body["question"], "k": 5}).status_code == 200
                    elif kind == "ask":
                        ok = c.post("/ask", json=body).status_code == 200
                    elif kind == "stream":
                        ok = one_request(c, "/ask/stream", body)[2]
                    else:  # the client goes away mid-stream: the server must stop decoding for it, and nothing else
                        with c.stream("POST", "/ask/stream", json=body) as r:
                            ok = r.status_code == 200
                            for line in r.iter_lines():
                                if line == "event: partial":
                                    break
                except httpx.HTTPError:
                    ok = False
                with lock:
                    stats[kind]["ok" if ok else "failed"] += 1
                    if ok:
                        stats[kind]["latency"].append(time.perf_counter() - t0)

    def swapper() -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            i = 0
            while time.monotonic() + swap_every < stop:
                time.sleep(swap_every)
                i += 1
                r = c.post("/indexes/active", json={"name": names[i % len(names)]})
                swaps["ok" if r.status_code == 200 else "failed"] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    threads.append(threading.Thread(target=swapper))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"kinds": stats, "swaps": swaps, "health": httpx.get(f"{url}/health", timeout=60).json()}


def run_soak(args: argparse.Namespace) -> None:
    from ragline import paths
    from ragline.index.build import BuildOptions, build_index
    from ragline.index.manifest import is_index_dir
    from ragline.questions import load_fanoutqa

    work = Path(tempfile.mkdtemp(prefix="ragline-soak-"))
    source = args.index or paths.default_index_dir()
    if not is_index_dir(source):
        print(f"building an index of the first {args.docs} documents", file=sys.stderr)
        source = build_index(BuildOptions(source="wiki-leads", out=work / "built", limit=args.docs, progress=False),
                             log=lambda m: None)
    names = ["a", "b"]
    for name in names:  # two copies: the swaps alternate between them
        shutil.copytree(source, work / "indexes" / name)
    questions = [q.question for q in load_fanoutqa("dev")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(work / "indexes" / "a", args.generator, port, args.max_batch, work / "server.log",
                          args.max_running)
    try:
        load(url, "/ask", SOAK_ASK, questions, 2, 1)  # warm-up
        t0 = time.perf_counter()
        res = soak(url, names, questions, args.soak, args.concurrency, args.swap_every)
        wall = time.perf_counter() - t0
        peak = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    w = res["health"]["worker"]
    print(f"\nsoak: {args.concurrency} clients for {wall:.0f} s on loopback, generator {args.generator}, "
          f"{os.cpu_count()} cores; index swapped every {args.swap_every:.0f} s\n")
    print("| requests | completed | failed | p50 s | p95 s |")
    print("|---|---|---|---|---|")
    for kind, st in res["kinds"].items():
        lat = sorted(st["latency"])
        p50 = f"{statistics.median(lat):.1f}" if lat else "–"
        p95 = f"{lat[min(len(lat) - 1, int(0.95 * len(lat)))]:.1f}" if lat else "–"
        print(f"| {kind} | {st['ok']} | {st['failed']} | {p50} | {p95} |")
    print(f"\nindex swaps: {res['swaps']['ok']} ok, {res['swaps']['failed']} failed; questions decoded "
          f"{res['health']['decoded']['questions']} in {res['health']['decoded']['batches']} batches; "
          f"abandoned by their clients {w['abandoned']}; worker alive at the end: {w['alive']}, failed batches "
          f"{w['failed_batches']}, restarts {w['restarts']}; server peak RSS {peak:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({**res, "wall": wall, "peak_rss_mb": peak}, indent=1, default=str))
    stayed = sum(st["failed"] for kind, st in res["kinds"].items() if kind != "stream, client leaves")
    if stayed or res["swaps"]["failed"] or not w["alive"]:
        raise SystemExit("the soak failed: requests of clients that stayed failed, a swap failed or the worker died")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=None, help="An index to serve (default: build a slice).")
    ap.add_argument("--docs", type=int, default=300, help="Documents in the slice index built when --index is unset.")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-running", type=int, default=None,
                    help="The server's --max-running (batches decoded at once, taking turns); default: its own.")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    ap.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                    help="Run the soak with faults for this long instead of the load rows.")
    ap.add_argument("--generator", default="qwen2.5-0.5b", help="The soak's and --real's generator.")
    ap.add_argument("--real", action="store_true",
                    help="Load rows with the real generator over the bundled index (default answer settings; "
                         "the dev questions' first --requests, 16 unless given), in place of the tiny one.")
    ap.add_argument("--swap-every", type=float, default=20.0, help="Seconds between index swaps in the soak.")
    ap.add_argument("--replicas", default=None, metavar="LIST",
                    help="Rows per server: 0 for `ragline serve`, N for `serve --ray --replicas N` (module docstring).")
    args = ap.parse_args()
    if args.soak:
        run_soak(args)
        return

    from ragline import paths
    from ragline.index.build import BuildOptions, build_index
    from ragline.models.tiny import save_tiny_causal
    from ragline.questions import load_fanoutqa

    work = Path(tempfile.mkdtemp(prefix="ragline-serving-"))
    workloads = REAL_WORKLOADS if args.real else WORKLOADS
    if args.real:
        args.requests = args.requests if args.requests != 200 else 16
        args.workloads = args.workloads if args.workloads != ",".join(WORKLOADS) else ",".join([*REAL_WORKLOADS,
                                                                                                  "mixed"])
    index = args.index or (paths.default_index_dir() if args.real else None)
    if index is None:
        print(f"building an index of the first {args.docs} documents", file=sys.stderr)
        index = build_index(BuildOptions(source="wiki-leads", out=work / "index", limit=args.docs, progress=False),
                            log=lambda m: None)
    generator = args.generator if args.real else save_tiny_causal(work / "tiny-llama")
    questions = [q.question for q in load_fanoutqa("dev")]
    rows = []
    if args.replicas is not None:
        for replicas in [int(x) for x in args.replicas.split(",")]:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            t0 = time.perf_counter()
            server = start_server(index, generator, port, args.max_batch, work / "server.log", args.max_running,
                                  replicas)
            ready = time.perf_counter() - t0
            try:
                for name in args.workloads.split(","):
                    path, body = workloads[name]
                    load(url, path, body, questions[-1:], 2 * max(1, replicas), max(1, replicas))  # warm-up
                    row = load(url, path, body, questions, args.requests, args.concurrency)
                    row["per_batch"] = None if replicas else row["per_batch"]  # /health is one replica's
                    rows.append({"workload": f"{name}, {replicas} replica(s)" if replicas else f"{name}, serve",
                                 "concurrency": args.concurrency, **row})
                    print(f"{rows[-1]['workload']}: {row['rps']:.2f} req/s, p50 {row['p50']:.2f} s (ready in "
                          f"{ready:.0f} s)", file=sys.stderr)
            finally:
                server.terminate()
                server.wait(timeout=120)
    elif args.real:  # a fresh server per row: every row starts with the same (empty) passage cache
        for name in args.workloads.split(","):
            # the mixed row: requests alternate between the workloads of MIXED, from --concurrency clients only
            names = list(MIXED) if name == "mixed" else [name]
            kinds = [workloads[n] for n in names]
            for conc in (args.concurrency,) if name == "mixed" else (1, args.concurrency):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                server = start_server(index, generator, port, args.max_batch, work / "server.log", args.max_running)
                try:
                    for path, body in kinds:
                        load(url, path, body, questions[-1:], 1, 1)  # warm-up on a question no row asks
                    got = load_mixed(url, kinds, questions, args.requests, conc)
                finally:
                    server.terminate()
                    server.wait(timeout=60)
                for n, row in zip(names, got, strict=True):
                    rows.append({"workload": f"{n} (mixed)" if name == "mixed" else n, "concurrency": conc, **row})
                    print(f"{rows[-1]['workload']:18s} c={conc}: {row['rps']:.2f} req/s, p50 {row['p50']:.1f} s",
                          file=sys.stderr)
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(index, generator, port, args.max_batch, work / "server.log", args.max_running)
        try:
            for name in args.workloads.split(","):
                path, body = workloads[name]
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
    running = "" if args.max_running is None else f", --max-running {args.max_running}"
    print(f"\n{args.requests} requests per row on loopback; "
          f"{'generator ' + str(generator) if args.real else 'tiny generator'}; {os.cpu_count()} cores; "
          f"--max-batch {args.max_batch}{running}\n")
    print("| workload | concurrency | req/s | vs one at a time | p50 ms | p95 ms | first token p50 ms | "
          "questions per batch | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        first = "–" if r["first_token_p50"] is None else f"{1000 * r['first_token_p50']:.0f}"
        per_batch = "–" if r["per_batch"] is None else f"{r['per_batch']:.1f}"
        alone = serial.get(r["workload"].removesuffix(" (mixed)"))
        ratio = "–" if alone is None else f"{r['rps'] / alone:.2f}x"
        print(f"| {r['workload']} | {r['concurrency']} | {r['rps']:.1f} | {ratio} | "
              f"{1000 * r['p50']:.0f} | {1000 * r['p95']:.0f} | {first} | {per_batch} | {r['errors']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if any(r["errors"] for r in rows):
        raise SystemExit("some requests failed")


if __name__ == "__main__":
    main()
