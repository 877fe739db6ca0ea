"""``ragline serve --ray --replicas 2``: two model replicas on a local Ray Serve behind one endpoint, with the
small index and the tiny generator (saved as a folder, as a user's generator would be)."""

import asyncio
import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import running_server, write_jsonl

pytest.importorskip("ray.serve")

ASK = {"question": "Who wrote Candide?", "model": "rag-token", "decoding": "greedy", "k": 3, "max_new_tokens": 6}
QUESTIONS = ["Who wrote Candide?", "What is Art Deco?", "Where is the Eiffel Tower?", "Who painted the Mona Lisa?"]
DEADLINE_S = 30.0  # the endpoint's deadline here: under the client's 120 s, so a lost request shows as a 408


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_names(ray) -> list[str]:
    from ragline.serve.replicas import APP_NAME, DEPLOYMENT

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT}#")]


@pytest.fixture(scope="module")
def replicated(tmp_path_factory, small_index, ray_local):
    from ragline.models.tiny import save_tiny_causal
    from ragline.serve import replicas

    root = tmp_path_factory.mktemp("replicated")
    generator = save_tiny_causal(root / "tiny-llama")
    index = shutil.copytree(small_index, root / "index")  # a copy: a test adds to it
    settings = replicas.ReplicaSettings(index_dir=str(index), generator=str(generator), precision="fp32",
                                        threads=1)
    port = _free_port()
    replicas.start(settings, 2, port=port, cpus_per_replica=0.1,  # other tests' actors may hold the CPUs
                   request_timeout_s=DEADLINE_S)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client, settings, ray_local
    finally:
        replicas.stop()


def test_every_route_answers_through_the_replicas(replicated):
    client, _, ray = replicated
    assert len(_replica_names(ray)) == 2
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["generator"].endswith("tiny-llama")
    hits = client.post("/search", json={"question": "Art Deco architecture", "k": 4, "mode": "hybrid"}).json()
    assert [h["rank"] for h in hits["hits"]] == [1, 2, 3, 4]
    answer = client.post("/ask", json=ASK).json()
    assert answer["model"] == "rag-token" and len(answer["sources"]) == 3
    with client.stream("POST", "/ask/stream", json=ASK) as r:
        events = [line.split(": ", 1)[1] for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "passages" and events[-2:] == ["answer", "done"]
    model = client.get("/v1/models").json()["data"][0]["id"]
    chat = client.post("/v1/chat/completions", json={"model": model, "max_tokens": 6,
                                                     "messages": [{"role": "user", "content": "Who wrote Candide?"}]})
    assert chat.status_code == 200 and isinstance(chat.json()["choices"][0]["message"]["content"], str)

    async def mcp_tools():
        from mcp.client import Client

        async with Client(str(client.base_url).rstrip("/") + "/mcp") as c:  # stateless: each call any replica
            return await c.list_tools()

    assert {t.name for t in asyncio.run(mcp_tools()).tools} >= {"search", "ask"}
    assert client.get("/").status_code == 200
    swap = client.post("/indexes/active", json={"name": "other"})
    assert swap.status_code == 409 and "--index" in swap.json()["fix"]


def test_answers_equal_a_single_servers_at_fp32(replicated):
    """Whichever replica takes a question, its answer and sources are the single server's."""
    from ragline.serve.replicas import build_app

    client, settings, _ = replicated
    with running_server(build_app(settings)) as url, httpx.Client(base_url=url, timeout=120) as single:
        for q in QUESTIONS:
            for _ in range(2):  # twice: the two replicas are likely both asked
                body = {**ASK, "question": q}
                got, want = client.post("/ask", json=body).json(), single.post("/ask", json=body).json()
                assert got["text"] == want["text"] and got["logprob"] == pytest.approx(want["logprob"], abs=1e-4)
                assert [s["pid"] for s in got["sources"]] == [s["pid"] for s in want["sources"]]


def test_every_replica_follows_the_index_as_it_changes(replicated, tmp_path, encoders):
    """A document added to the index (a new generation, as `ragline add` writes it) is found by the next
    searches, whichever replica takes them."""
    from ragline.index.update import add_documents

    client, settings, _ = replicated
    doc = {"id": "replicated-new", "title": "Zorblax lighthouse",
           "text": "The Zorblax lighthouse was built of basalt in 1881 on the northern cape."}
    add_documents(settings.index_dir, [str(write_jsonl(tmp_path / "new.jsonl", [doc]))], encoder=encoders.passage,
                  log=lambda m: None)
    for _ in range(6):  # several requests: both replicas answer some
        hits = client.post("/search", json={"question": "Zorblax lighthouse basalt", "k": 3, "mode": "bm25"}).json()
        assert hits["hits"][0]["doc_id"] == "replicated-new", hits


def test_a_replica_killed_under_load_is_replaced_and_no_request_goes_unanswered(replicated):
    client, _, ray = replicated
    names = _replica_names(ray)

    def ask(i: int) -> tuple[int, dict]:
        r = client.post("/ask", json={**ASK, "question": QUESTIONS[i % len(QUESTIONS)]})
        return r.status_code, (r.json() if r.headers.get("content-type", "").startswith("application/json")
                                else {"body": r.text})

    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(ask, i) for i in range(48)]
        while sum(f.done() for f in pending) < 4:  # under way: then one replica dies
            time.sleep(0.05)
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        in_flight = sum(not f.done() for f in pending)
        done = [f.result(timeout=120) for f in pending]  # every request answered: no hang, no dropped socket
    assert in_flight >= 8, in_flight  # the kill came mid-load
    assert all(code in (200, 408) or code >= 500 for code, _ in done), done  # 408: one the proxy lost, by its deadline
    assert sum(code == 200 for code, _ in done) >= 24  # the live replica kept answering
    for code, body in done:
        if code != 200:
            assert json.dumps(body)  # an error response, with a body
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Ray Serve starts a new replica in the dead one's place
        alive = _replica_names(ray)
        if len(alive) == 2 and names[0] not in alive:
            break
        time.sleep(1)
    assert len(alive) == 2 and names[0] not in alive
    for _ in range(30):  # the replacement loads its models, then answers like the rest
        codes = [client.post("/ask", json=ASK).status_code for _ in range(4)]
        if codes == [200] * 4:
            break
        time.sleep(2)
    assert codes == [200] * 4


def test_the_endpoint_answers_by_the_deadline_it_was_given(replicated):
    """Ray Serve's proxy was started with the deadline (a request past it is answered 408, not left open)."""
    from ray.serve.context import _get_global_client

    assert _get_global_client().http_config.request_timeout_s == DEADLINE_S


@pytest.mark.parametrize("flag", [["--replicas", "2"], ["--request-timeout", "30"]])
def test_replica_options_need_ray(flag):
    from click.testing import CliRunner

    from ragline.cli import cli

    result = CliRunner().invoke(cli, ["serve", *flag])
    assert result.exit_code == 2 and f"{flag[0]} runs on Ray Serve: add --ray" in result.output
