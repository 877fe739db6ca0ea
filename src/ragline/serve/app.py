"""``ragline serve``: the HTTP API.

    POST /ask              answer, log p, passages with p(z|x) and posterior, RAG-Token per-token sources
    POST /ask/stream       the same as server-sent events: `passages`, then one `partial` per decoding step (the
                           best answer text so far: with greedy decoding it only grows, with beams it may be
                           rewritten), then `answer` (the full structure), then `done`
    POST /search           ranked passages
    GET  /passages/{pid}   one passage by id (``Title#n``); a browser asking for HTML gets the page showing it
    GET  /indexes          the index directories beside the active one
    POST /indexes/active   hot-swap to another index: requests in flight finish on the old one
    GET  /health           status, active index, generator, questions and batches decoded so far
    GET  /vocabulary       models, decodings, retrieval modes and defaults (read by the page)
    GET  /                 the web page: question box, streamed answer, ranked passages with their weights,
                           RAG-Token answer tokens coloured by the passage that produced them (no CDN)
    /v1/...                the OpenAI-compatible routes (:mod:`ragline.serve.openai_api`): chat completions,
                           models, embeddings, with OpenAI's error objects
    /mcp                   the Model Context Protocol over streamable HTTP (:mod:`ragline.serve.mcp_server`):
                           tools search and ask, as `ragline mcp` serves them

Bad requests get a 4xx with ``{"error": ..., "fix": ...}``: 422 for invalid fields (empty question, k out of
range, unknown model), 404 for an unknown index or passage, 413 for a request over the work budget (generator
rows x tokens, question tokens) or a body over 4 MiB, 401 without the API key when the server has one, 400
for other refusals; 503 with ``Retry-After`` when the queue is full. Model calls go through one worker thread
(:mod:`ragline.serve.worker`), which batches questions that arrive together within the budget; a request
whose client goes away is dropped (or its decoding stopped).

With an API key (``ragline serve --api-key``, or ``RAGLINE_API_KEY``), every route but the page itself
requires ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragline import vocab
from ragline.errors import RaglineError
from ragline.index import manifest as mf
from ragline.index.registry import list_indexes, open_index
from ragline.rag.model import RagModel
from ragline.serve import events, openai_api
from ragline.serve.auth import authorised, expected_header
from ragline.serve.budget import (
    MAX_BEAMS,
    MAX_BODY_BYTES,
    MAX_FILTERS,
    MAX_K,
    MAX_NEW_TOKENS,
    MAX_QUESTION_CHARS,
    Budget,
    Busy,
    Settings,
    TooLarge,
    check_filters,
    settings_k,
)
from ragline.serve.hosts import HostPolicy
from ragline.serve.mcp_server import create_mcp
from ragline.serve.worker import ModelWorker

log = logging.getLogger("ragline.serve")

class Question(BaseModel):
    """A question to search for (``POST /search``)."""

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    k: int | None = Field(None, ge=1, le=MAX_K)  # default: the server's (a RAG checkpoint's n_docs, else 5)
    mode: Literal[vocab.MODES] = vocab.DEFAULT_MODE  # type: ignore[valid-type]
    filter: list[str] = Field(default_factory=list, max_length=MAX_FILTERS)  # field=value, field!=value, field=p*

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the question is empty")
        return v.strip()

    @field_validator("filter")
    @classmethod
    def _filters(cls, v: list[str]) -> list[str]:
        return list(check_filters(v))


class AskRequest(Question):
    """A question to answer (``POST /ask``, ``POST /ask/stream``) with the reader and decoding settings."""

    model: Literal[vocab.MODELS] = vocab.DEFAULT_MODEL  # type: ignore[valid-type]
    decoding: Literal[vocab.ALL_DECODINGS] | None = None  # type: ignore[valid-type]
    beams: int = Field(vocab.DEFAULT_BEAMS, ge=1, le=MAX_BEAMS)
    max_new_tokens: int = Field(vocab.DEFAULT_MAX_NEW_TOKENS, ge=1, le=MAX_NEW_TOKENS)

    def settings(self, default_k: int = vocab.DEFAULT_K) -> Settings:
        vocab.check(self.model, self.decoding)
        return Settings(self.model, self.decoding, settings_k(self.model, self.k, default_k), self.mode,
                        self.beams, self.max_new_tokens, filters=tuple(self.filter))


class SwapRequest(BaseModel):
    """The index to make active (``POST /indexes/active``), by name under the server's index folder."""

    name: str = Field(min_length=1)


class NotFound(RaglineError):
    """A request for an index or passage that does not exist (404)."""


class Conflict(RaglineError):
    """A request this server cannot carry out as it runs (409)."""


STATUS = {NotFound: 404, Conflict: 409, TooLarge: 413, Busy: 503}
PUBLIC = frozenset({"/"})  # the page: everything it fetches carries the key
PASSAGES = "/passages/"


def _wants_page(request: Request) -> bool:
    """A browser opening a passage's link (it asks for HTML): it gets the page, which fetches the passage as
    JSON with the key; the page holds no passage itself, so it needs no key."""
    return request.url.path.startswith(PASSAGES) and "text/html" in request.headers.get("accept", "")


def _status(e: RaglineError) -> int:
    return getattr(e, "status", None) or next((code for kind, code in STATUS.items() if isinstance(e, kind)), 400)


def _refusal(path: str, status: int, e: RaglineError, headers: dict | None = None) -> JSONResponse:
    """A refusal in the shape its route's clients read: OpenAI's error object under /v1/, else ragline's."""
    if path.startswith(openai_api.PREFIX):
        return openai_api.error_response(e, status, headers)
    return JSONResponse({"error": e.problem, "fix": e.fix}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware refusing (413) a request body over ``max_bytes``: by its Content-Length before it is
    read; a body sent without one (chunked) is read here first, at most ``max_bytes`` of it, then replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = TooLarge(f"the request body is over {self.max_bytes} bytes", "send a smaller request")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _refusal(scope["path"], 413, refused)(scope, receive, send)
        if length or b"chunked" not in headers.get(b"transfer-encoding", b""):
            return await self.app(scope, receive, send)
        messages: list[Message] = []
        seen, more = 0, True
        while more:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            more = message["type"] == "http.request" and message.get("more_body", False)
            if seen > self.max_bytes:
                return await _refusal(scope["path"], 413, refused)(scope, receive, send)

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


class HostCheck:
    """ASGI middleware answering 421 to a request whose ``Host`` header names a host the server was not bound
    for (:mod:`ragline.serve.hosts`: DNS rebinding), on every route."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = next((v for k, v in scope.get("headers") or [] if k == b"host"), None)
            if not self.policy.accepts(None if header is None else header.decode("latin-1")):
                refused = RaglineError("this server does not answer for the host named in the request's Host header",
                                       "use the address the server was started on, or start it with "
                                       "--allowed-host NAME")
                return await _refusal(scope["path"], 421, refused)(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(rag: RagModel, index_root: Path | None = None, max_batch: int = 8, budget: Budget | None = None,
               api_key: str | None = None, worker: ModelWorker | None = None, host: str = "127.0.0.1",
               allowed_hosts: Sequence[str] = (), replicated: bool = False) -> FastAPI:
    """The API over ``rag`` (its retriever's index is the active one; ``index_root`` holds the others), with
    the work ``budget`` and, when given, an ``api_key`` every route but the page requires; ``worker`` (one
    owning ``rag``) replaces the one made from ``max_batch`` and ``budget``. ``host`` is where it is served:
    requests naming another host than it, loopback or ``allowed_hosts`` are refused (DNS rebinding).
    ``replicated``: one of several replicas (serve/replicas.py), which refuses to switch its index alone."""
    worker = worker or ModelWorker(rag, max_batch=max_batch, budget=budget)
    # /mcp: the MCP tools over the same worker; stateless among replicas (a session would live on one of them)
    mcp = create_mcp(rag, worker).streamable_http_app(host=host, stateless_http=replicated)
    app = FastAPI(title="ragline", version="1", description="Retrieval-Augmented Generation with cited passages.",
                  lifespan=lambda _: mcp.router.lifespan_context(mcp))  # runs MCP's session manager
    app.router.routes.extend(mcp.routes)
    root = Path(index_root) if index_root else rag.retriever.index.path.parent
    app.state.worker = worker
    app.add_middleware(BodyLimit)
    app.add_middleware(HostCheck, policy=HostPolicy(host, allowed_hosts))  # outermost: checked first

    def retriever():
        if rag.retriever is None:
            raise RaglineError("this server has no index", "start it with --index")
        return rag.retriever


    if api_key:
        expected = expected_header(api_key)

        @app.middleware("http")
        async def _require_key(request: Request, call_next):
            if request.url.path in PUBLIC or _wants_page(request) or authorised(request.scope, expected):
                return await call_next(request)
            return _refusal(request.url.path, 401, RaglineError("this server requires an API key",
                                                                "send the header Authorization: Bearer <key>"),
                            {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RaglineError)
    async def _ragline_error(request: Request, e: RaglineError) -> JSONResponse:
        headers = {"Retry-After": str(Busy.retry_after)} if isinstance(e, Busy) else None
        return _refusal(request.url.path, _status(e), e, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}"
                             for err in e.errors())
        if request.url.path.startswith(openai_api.PREFIX):  # OpenAI answers invalid parameters with 400
            param = ".".join(str(x) for x in e.errors()[0]["loc"][1:]) if e.errors() else None
            return JSONResponse(openai_api.error_body(400, f"{problems}; see the request schema at /docs", param),
                                status_code=400)
        return JSONResponse({"error": problems, "fix": "see the request schema at /docs"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:  # unknown route, wrong method
        return _refusal(request.url.path, e.status_code, RaglineError(str(e.detail), "see the API schema at /docs"),
                        getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _refusal(request.url.path, 500, RaglineError(f"the server failed on this request ({type(e).__name__})",
                                                           "retry; if it fails again, report it with the server's log"))

    def submit(req: AskRequest, **callbacks) -> Any:
        return worker.ask(req.question, req.settings(rag.k), **callbacks)

    page = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> str:
        return page

    @app.get("/vocabulary")
    def vocabulary() -> dict:
        """Models, decodings, retrieval modes and defaults: what the page's controls offer."""
        return {**vocab.as_dict(), "k": rag.k}  # the server's default k (a RAG checkpoint's n_docs)

    @app.get("/health")
    async def health() -> JSONResponse:  # on the event loop: answers however busy the thread pool is
        """Status (503 when the model worker is down), the active index, the worker's queue and budget."""
        ix = rag.retriever.index if rag.retriever else None
        w = app.state.worker
        body = {"status": "ok" if w.alive else "down", "generator": rag.generator.name,
                "index": None if ix is None else {"name": ix.name, "fingerprint": ix.fingerprint,
                                                  "passages": ix.live_passages,
                                                  "generation": ix.manifest.get("generation", 0),
                                                  "modes": list(ix.modes)},
                "decoded": {"batches": w.batch_count, "questions": w.question_count}, "worker": w.status()}
        return JSONResponse(body, status_code=200 if w.alive else 503)

    @app.post("/search")
    async def search(req: Question) -> dict:
        # on the model thread, which encodes the question (turns.py: one thread runs the server's torch work),
        # counted against the line's bound and awaited without holding a thread
        hits = await asyncio.wrap_future(worker.call(lambda: retriever().search(
            [req.question], k=req.k or rag.k, mode=req.mode, filters=req.filter)[0]))
        return {"question": req.question, "hits": [h.__dict__ for h in hits]}

    @app.get("/passages/{pid:path}", response_model=None)
    def passage(pid: str, request: Request) -> dict | HTMLResponse:
        """One passage as JSON; a browser (asking for HTML) gets the page, which shows it."""
        if _wants_page(request):
            return HTMLResponse(page)
        ix = retriever().index
        row = ix.store.row_of(pid)
        if row is None:
            raise NotFound(f"no passage {pid!r} in index {ix.name}", "use a pid from /search (Title#n)")
        return ix.store.get([row])[0].__dict__

    @app.get("/indexes")
    def indexes() -> dict:
        active = rag.retriever.index.path.resolve() if rag.retriever else None
        return {"root": str(root), "indexes": [
            {"name": p.name, "fingerprint": m["fingerprint"], "passages": mf.live_passages(m),
             "generation": m.get("generation", 0),
             "dense": (m.get("dense") or {}).get("factory"), "bm25": bool(m.get("bm25")),
             "active": p.resolve() == active} for p, m in list_indexes(root)]}

    @app.post("/indexes/active")
    def swap(req: SwapRequest) -> dict:
        if replicated:
            raise Conflict("a server of several replicas (--replicas) cannot switch its index: it would switch "
                           "one replica only", "restart it with --index NAME")
        names = {p.name: p for p, _ in list_indexes(root)}  # only an index listed here, never a path
        if req.name not in names:
            raise NotFound(f"no index {req.name!r} under {root}", "pick a name from GET /indexes")
        old = retriever().swap(open_index(names[req.name]))
        return {"active": req.name, "previous": old.name}

    @app.post("/ask")
    async def ask(req: AskRequest) -> dict:
        return (await events.result(submit(req))).to_dict()

    @app.post("/ask/stream")
    async def ask_stream(req: AskRequest) -> StreamingResponse:
        job = events.JobEvents(worker, req.question, req.settings(rag.k))

        async def stream():
            async for kind, data in job:
                if kind == events.PASSAGES:
                    yield _sse("passages", {"passages": [asdict(x) for x in data]})
                elif kind == events.PARTIAL:
                    yield _sse("partial", {"text": data})
                else:
                    try:
                        yield _sse("answer", data.result().to_dict())
                    except RaglineError as e:
                        yield _sse("error", {"error": e.problem, "fix": e.fix})
                    except BaseException as e:  # noqa: BLE001 - the stream always ends with error and done
                        log.exception("a streamed answer failed")
                        yield _sse("error", {"error": f"the server failed on this request ({type(e).__name__})",
                                             "fix": "retry; if it fails again, report it with the server's log"})
                    yield _sse("done", {})

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app.include_router(openai_api.routes(rag, worker))
    return app


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {events.event_json(data)}\n\n"
