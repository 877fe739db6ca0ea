"""The HTTP API against a running server (uvicorn on loopback) with the small index and a tiny generator."""

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import httpx
import pytest
from conftest import running_server, tiny_generator


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_index):
    """The app over two copies of the small index ('a' active, 'b') with the tiny generator."""
    from ragline.rag.model import RagModel
    from ragline.retriever import Retriever
    from ragline.serve.app import create_app

    root = tmp_path_factory.mktemp("served")
    for name in ("a", "b"):
        shutil.copytree(small_index, root / name)
    return create_app(RagModel(Retriever(root / "a"), tiny_generator(), k=3), root)


@pytest.fixture(scope="module")
def server(served):
    with running_server(served) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client, served


ASK = {"question": "Who wrote Candide?", "model": "rag-token", "decoding": "greedy", "k": 3, "max_new_tokens": 6}


def test_health_search_passages_and_indexes(server):
    client, _ = server
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["index"]["name"] in ("a", "b") and h["generator"] == "tiny-llama"
    hits = client.post("/search", json={"question": "Art Deco architecture", "k": 4, "mode": "hybrid"}).json()["hits"]
    assert len(hits) == 4 and [x["rank"] for x in hits] == [1, 2, 3, 4]
    p = client.get(f"/passages/{quote(hits[0]['pid'], safe='')}")  # ids hold '#': URL-encode them
    assert p.status_code == 200 and p.json()["text"] == hits[0]["text"]
    missing = client.get(f"/passages/{quote('No such page#0', safe='')}")
    assert missing.status_code == 404 and "no passage" in missing.json()["error"] and missing.json()["fix"]
    names = {x["name"]: x for x in client.get("/indexes").json()["indexes"]}
    assert set(names) == {"a", "b"} and sum(x["active"] for x in names.values()) == 1
    assert client.get("/openapi.json").json()["paths"]["/ask"]
    page = client.get("/")
    assert page.status_code == 200 and "/ask/stream" in page.text and "http" not in page.text.split("<script>")[1]


def test_ask_returns_the_answer_with_its_sources(server):
    client, _ = server
    r = client.post("/ask", json=ASK)
    assert r.status_code == 200
    a = r.json()
    assert a["model"] == "rag-token" and a["decoding"] == "greedy" and len(a["sources"]) == 3
    assert abs(sum(s["prior"] for s in a["sources"]) - 1) < 1e-4
    assert abs(sum(s["posterior"] for s in a["sources"]) - 1) < 1e-4
    assert a["token_sources"] is not None and len(a["token_sources"]) >= 1
    closed = client.post("/ask", json={**ASK, "model": "closed-book"}).json()
    assert closed["sources"] == []


@pytest.mark.parametrize("body, where", [
    ({"question": ""}, "question"), ({"question": "   "}, "question is empty"), ({}, "question"),
    ({"question": "x" * 1001}, "question"), ({"question": "q", "k": 0}, "k"), ({"question": "q", "k": 21}, "k"),
    ({"question": "q", "model": "gpt"}, "model"), ({"question": "q", "mode": "fuzzy"}, "mode"),
    ({"question": "q", "max_new_tokens": 1000}, "max_new_tokens")])
def test_validation_errors_are_clear_4xx(server, body, where):
    client, _ = server
    r = client.post("/ask", json=body)
    assert r.status_code == 422 and where in r.json()["error"] and r.json()["fix"]


def test_refusals(server):
    client, _ = server
    r = client.post("/ask", json={**ASK, "model": "rag-sequence", "decoding": "greedy"})
    assert r.status_code == 400 and "no 'greedy' decoding" in r.json()["error"]
    r = client.post("/indexes/active", json={"name": "nope"})
    assert r.status_code == 404 and "no index 'nope'" in r.json()["error"]
    assert client.post("/indexes/active", json={"name": "../a"}).status_code == 404


def _events(text):
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


@pytest.mark.parametrize("model, decoding", [("rag-token", "greedy"), ("rag-sequence", "thorough")])
def test_streaming_sends_passages_then_tokens_then_the_answer(server, model, decoding):
    client, _ = server
    with client.stream("POST", "/ask/stream", json={**ASK, "model": model, "decoding": decoding}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.read().decode())
    kinds = [k for k, _ in events]
    assert kinds[0] == "passages" and kinds[-2:] == ["answer", "done"] and "partial" in kinds
    assert set(kinds[1:-2]) == {"partial"} and len(events[0][1]["passages"]) == 3
    streamed, final = events[0][1]["passages"], events[-2][1]["sources"]  # the passages decoded, prior known
    assert [(x["pid"], x["prior"]) for x in streamed] == [(x["pid"], x["prior"]) for x in final]
    assert all(x["posterior"] is None for x in streamed)
    if decoding == "greedy":  # one event per decoded token; the text only grows and ends as the answer
        partials = [d["text"] for k, d in events if k == "partial"]
        assert len(partials) == len(events[-2][1]["tokens"])
        assert all(b.startswith(a.rstrip()) for a, b in zip(partials, partials[1:], strict=False))
        assert partials[-1] == events[-2][1]["text"]


def test_questions_arriving_together_are_decoded_in_one_batch(server):
    client, app = server
    questions = [f"What is page number {i}?" for i in range(6)]
    alone = [client.post("/ask", json={**ASK, "question": q}).json()["text"] for q in questions]
    before = client.get("/health").json()["decoded"]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda q: client.post("/ask", json={**ASK, "question": q}).json()["text"], questions))
    assert together == alone  # batching changes nothing in the answers
    after = client.get("/health").json()["decoded"]
    assert after["questions"] - before["questions"] == 6 and after["batches"] - before["batches"] < 6


def test_streams_arriving_together_are_decoded_in_one_batch_each_with_its_own_events(server):
    client, _ = server
    questions = [f"Which river flows through city {i}?" for i in range(4)]

    def stream(q):
        with client.stream("POST", "/ask/stream", json={**ASK, "question": q}) as r:
            return _events(r.read().decode())

    alone = {q: stream(q) for q in questions}
    before = client.get("/health").json()["decoded"]
    with ThreadPoolExecutor(4) as pool:
        together = dict(zip(questions, pool.map(stream, questions), strict=True))
    after = client.get("/health").json()["decoded"]
    assert after["batches"] - before["batches"] < 4
    def shape(events):  # (event, passage ids or text) with the priors rounded: batching the encoder moves floats
        return [(kind, [(x["pid"], round(x["prior"], 3)) for x in d["passages"]] if kind == "passages"
                 else d.get("text")) for kind, d in events]

    for q in questions:  # each stream gets its own question's passages, steps and answer, as when alone
        assert together[q][-2][1]["question"] == q
        assert shape(together[q]) == shape(alone[q])


def test_hot_swap_under_load_fails_no_request(server):
    client, _ = server
    stop = threading.Event()
    statuses = []

    def load():
        while not stop.is_set():
            statuses.append(client.post("/search", json={"question": "Roman emperor", "k": 3}).status_code)
            statuses.append(client.post("/ask", json={**ASK, "max_new_tokens": 2}).status_code)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(8):
        r = client.post("/indexes/active", json={"name": "ab"[i % 2]})
        assert r.status_code == 200
        time.sleep(0.15)
    stop.set()
    for t in threads:
        t.join()
    assert len(statuses) > 10 and set(statuses) == {200}
