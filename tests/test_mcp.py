"""The MCP server (`ragline mcp`) driven by the official SDK's own client: over streamable HTTP in-process
(sharing one model worker with the native API, behind an API key), at `/mcp` of `ragline serve`, and over
stdio as a subprocess launched the way desktop clients launch it. Its tools give the answer and sources
``POST /ask`` gives."""

import asyncio
import os
import shutil
import sys

import httpx
import pytest
from conftest import running_server

mcp = pytest.importorskip("mcp", reason="the MCP SDK is a dependency: pip install -e .")
from mcp.client import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

KEY = "mcp-test-key"
QUESTION = "Who wrote Candide?"
ASK = {"question": QUESTION, "model": "rag-token", "decoding": "greedy", "k": 3, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def servers(tmp_path_factory, small_index, smollm2):
    """The native API and the MCP server (streamable HTTP, behind the key) over one RAG model and worker."""
    from ragline.rag.model import RagModel
    from ragline.retriever import Retriever
    from ragline.serve.app import create_app
    from ragline.serve.mcp_server import create_mcp, require_key
    from ragline.serve.worker import ModelWorker

    index = tmp_path_factory.mktemp("mcp") / "a"
    shutil.copytree(small_index, index)
    rag = RagModel(Retriever(index), smollm2, k=3)
    worker = ModelWorker(rag)
    mcp_app = require_key(create_mcp(rag, worker).streamable_http_app(), KEY)
    with running_server(create_app(rag, worker=worker)) as native, running_server(mcp_app) as url:
        yield native, url


def _native(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/ask", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _http_client(url: str, key: str = KEY) -> Client:
    import httpx2

    return Client(streamable_http_client(f"{url}/mcp", http_client=httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {key}"}, timeout=120)))


def _check_tools(tools) -> None:
    by_name = {t.name: t for t in tools.tools}
    assert set(by_name) == {"search", "ask"}
    ask = by_name["ask"].input_schema
    assert ask["required"] == ["question"]
    assert ask["properties"]["k"]["anyOf"][0]["maximum"] == 20
    assert set(ask["properties"]["model"]["enum"]) >= {"rag-sequence", "rag-token", "closed-book"}
    assert by_name["ask"].output_schema["properties"]["sources"]["type"] == "array"
    assert by_name["search"].annotations.read_only_hint


def _same_answer(got: dict, want: dict) -> None:
    assert got["text"] == want["text"] and got["text"]  # SmolLM2 answers words
    assert [s["pid"] for s in got["sources"]] == [s["pid"] for s in want["sources"]]
    assert [s["prior"] for s in got["sources"]] == pytest.approx([s["prior"] for s in want["sources"]], abs=1e-5)
    assert [s["posterior"] for s in got["sources"]] == pytest.approx([s["posterior"] for s in want["sources"]],
                                                                     abs=1e-4)
    assert got["citations"] == want["citations"]
    expected = "".join(r["text"] + " " + "".join(f"[{n}]" for n in r["passages"]) for r in want["citations"])
    assert got["marked"] == expected


def test_streamable_http_tools_answer_as_the_native_api(servers):
    native, url = servers
    want = _native(native, ASK)
    hits = httpx.post(f"{native}/search", json={"question": QUESTION, "k": 4, "mode": "hybrid"}, timeout=60).json()

    async def run():
        async with _http_client(url) as c:
            tools = await c.list_tools()
            answer = await c.call_tool("ask", {k: v for k, v in ASK.items()})
            found = await c.call_tool("search", {"question": QUESTION, "k": 4, "mode": "hybrid"})
            bad = await c.call_tool("ask", {"question": QUESTION, "model": "rag-sequence", "decoding": "greedy"})
            big = await c.call_tool("ask", {"question": QUESTION, "k": 50})
            return tools, answer, found, bad, big

    tools, answer, found, bad, big = asyncio.run(run())
    _check_tools(tools)
    assert not answer.is_error
    _same_answer(answer.structured_content, want)
    assert not found.is_error
    assert [h["pid"] for h in found.structured_content["hits"]] == [h["pid"] for h in hits["hits"]]
    assert bad.is_error and "no 'greedy' decoding" in bad.content[0].text and "thorough" in bad.content[0].text
    assert big.is_error and "k" in big.content[0].text


def test_streamable_http_requires_the_key(servers):
    _, url = servers

    async def run():
        async with _http_client(url, key="wrong") as c:
            await c.list_tools()

    with pytest.raises(Exception):  # noqa: B017 - the SDK wraps the 401 in its own exception group
        asyncio.run(run())
    r = httpx.post(f"{url}/mcp", json={}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["fix"]


def test_serve_also_speaks_mcp_at_slash_mcp(servers, tmp_path_factory, small_index):
    """`ragline serve` answers MCP at /mcp with the worker of its other routes, behind its API key."""
    from conftest import app_over_copies

    native, _ = servers
    want = _native(native, ASK)

    async def run():
        async with Client(f"{native}/mcp") as c:
            return await c.list_tools(), await c.call_tool("ask", ASK)

    tools, answer = asyncio.run(run())
    _check_tools(tools)
    _same_answer(answer.structured_content, want)
    with running_server(app_over_copies(tmp_path_factory.mktemp("mcp-key"), small_index, api_key=KEY)) as url:
        r = httpx.post(f"{url}/mcp", json={}, headers={"Accept": "application/json, text/event-stream"})
        assert r.status_code == 401 and r.json()["fix"]


@pytest.mark.slow
def test_stdio_server_launched_as_a_subprocess(servers, small_index):
    """`ragline mcp` over stdio, as a desktop client launches it: same tools, same answer."""
    native, _ = servers
    want = _native(native, ASK)
    params = StdioServerParameters(command=sys.executable, args=["-m", "ragline", "mcp", "--index", str(small_index),
                                                                 "--generator", "smollm2", "--precision", "fp32"],
                                   env=dict(os.environ))

    async def run():
        async with Client(params, read_timeout_seconds=300) as c:
            return await c.list_tools(), await c.call_tool("ask", ASK)

    tools, answer = asyncio.run(run())
    _check_tools(tools)
    assert not answer.is_error, answer.content
    _same_answer(answer.structured_content, want)
