"""``ragline mcp``: a Model Context Protocol server (the official ``mcp`` SDK) giving agents two tools over
the same model worker, budget and answer structure as ``ragline serve``:

* ``search(question, k, mode)``: the index's passages ranked for the question (rank, pid, title, text,
  retrieval score);
* ``ask(question, model, decoding, k, mode, beams, max_new_tokens, citations)``: the answer with its
  sources (prior p(z|x), posterior p(z|x,y)), RAG-Token's per-token passages and the citation runs: the
  structure ``POST /ask`` returns, plus ``marked``, the answer with its citation marks [n].

Both have typed inputs (JSON schema with bounds and the vocabulary's names) and structured results (an
output schema). Bad input is a tool error naming the problem and the fix. Transports: stdio (what desktop
clients launch) and streamable HTTP (``--transport http``, at ``/mcp``, with ``--api-key`` required as
``Authorization: Bearer KEY`` when given).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, fields
from functools import partial
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ragline import vocab
from ragline.errors import RaglineError
from ragline.rag import citations as cite
from ragline.rag.model import Answer, RagModel
from ragline.retriever import Hit
from ragline.serve import events
from ragline.serve.auth import authorised, expected_header
from ragline.serve.budget import (
    MAX_BEAMS,
    MAX_FILTERS,
    MAX_K,
    MAX_NEW_TOKENS,
    MAX_QUESTION_CHARS,
    Settings,
    check_filters,
    settings_k,
)
from ragline.serve.worker import ModelWorker
from ragline.version import __version__

INSTRUCTIONS = ("ragline answers questions from its own passage index (Retrieval-Augmented Generation) and says "
                "which passages each answer came from. Use `search` to read the passages on a topic, `ask` for an "
                "answer with its sources; cite sources by their pid.")

QuestionArg = Annotated[str, Field(min_length=1, max_length=MAX_QUESTION_CHARS, description="The question.")]
KArg = Annotated[int | None, Field(ge=1, le=MAX_K, description="Passages to retrieve (default: the server's).")]
ModeArg = Annotated[Literal[vocab.MODES], Field(description="Retrieval: dense, bm25 or hybrid.")]  # type: ignore[valid-type]
FilterArg = Annotated[list[str] | None, Field(max_length=MAX_FILTERS, description=(
    "Metadata conditions the passages must meet: field=value, field!=value, or field=prefix* (e.g. "
    "source=reports/*); fields: pid, doc_id, title, source, page, section and the corpus's own metadata."))]
ModelArg = Annotated[Literal[vocab.MODELS], Field(  # type: ignore[valid-type]
    description="The reader: rag-sequence and rag-token marginalise over the passages, concat reads them in one "
                "prompt, fid fuses them (seq2seq generators), closed-book reads none.")]
DecodingArg = Annotated[Literal[vocab.ALL_DECODINGS] | None, Field(  # type: ignore[valid-type]
    description="rag-sequence: thorough or fast; the others: beam or greedy (default: the reader's first).")]


@dataclass
class Passages:
    """``search``'s result: the question and its ranked passages."""

    question: str
    hits: list[Hit]


@dataclass
class Answered(Answer):
    """``ask``'s result: the answer structure of ``POST /ask`` and its text with citation marks."""

    marked: str = ""


def create_mcp(rag: RagModel, worker: ModelWorker | None = None) -> MCPServer:
    """The MCP server over ``rag``, answering through ``worker`` (a new one when not given)."""
    worker = worker or ModelWorker(rag)
    server = MCPServer(name="ragline", title="ragline", instructions=INSTRUCTIONS, version=__version__,
                       log_level="WARNING")  # not the SDK's INFO lines (sessions, tool errors the client gets)
    read_only = ToolAnnotations(readOnlyHint=True, idempotentHint=True, openWorldHint=False)

    @server.tool(annotations=read_only)
    async def search(question: QuestionArg, k: KArg = None, mode: ModeArg = vocab.DEFAULT_MODE,
                     filter: FilterArg = None) -> Passages:  # noqa: A002 - the HTTP field's name
        """The passages of the index that best match the question, best first, with their retrieval scores."""
        question = _question(question)
        filters = _filters(filter)
        if rag.retriever is None:
            raise ToolError("this server has no index; start it with --index")
        try:
            hits = await asyncio.wrap_future(worker.call(partial(  # encoded on the model thread, bounded
                rag.retriever.search, [question], k=k or rag.k, mode=mode, filters=filters)))
        except RaglineError as e:
            raise ToolError(f"{e.problem}; {e.fix}") from None
        return Passages(question, hits[0])

    @server.tool(annotations=read_only)
    async def ask(question: QuestionArg, model: ModelArg = vocab.DEFAULT_MODEL, decoding: DecodingArg = None,
                  k: KArg = None, mode: ModeArg = vocab.DEFAULT_MODE,
                  beams: Annotated[int, Field(ge=1, le=MAX_BEAMS)] = vocab.DEFAULT_BEAMS,
                  max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] = vocab.DEFAULT_MAX_NEW_TOKENS,
                  filter: FilterArg = None) -> Answered:  # noqa: A002 - the HTTP field's name
        """Answer the question from the index's passages: the answer, its log-probability, the passages read
        (rank, pid, title, text, prior and posterior), per-token passages (rag-token) and citation runs;
        ``marked`` is the answer with citation marks [n] (n: a passage's rank)."""
        question = _question(question)
        filters = _filters(filter)
        try:
            vocab.check(model, decoding)
            settings = Settings(model, decoding, settings_k(model, k, rag.k), mode, beams, max_new_tokens,
                                filters=filters)
            answer: Answer = await events.result(worker.ask(question, settings))
        except RaglineError as e:
            raise ToolError(f"{e.problem}; {e.fix}") from None
        return Answered(**{**_fields(answer), "marked": cite.marked(answer.citations) or answer.text})

    return server


def _filters(specs: list[str] | None) -> tuple[str, ...]:
    try:
        return check_filters(specs)
    except ValueError as e:
        raise ToolError(str(e)) from None


def _question(text: str) -> str:
    if not text.strip():
        raise ToolError("the question is empty; send a question")
    return text.strip()


def _fields(answer: Answer) -> dict[str, Any]:
    """``answer``'s fields, nested dataclasses kept as they are (no deep copy)."""
    return {f.name: getattr(answer, f.name) for f in fields(answer)}


def require_key(app: ASGIApp, api_key: str) -> ASGIApp:
    """``app`` answering 401 to HTTP requests without ``Authorization: Bearer <api_key>``."""
    expected = expected_header(api_key)

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not authorised(scope, expected):
            await JSONResponse({"error": "this server requires an API key",
                                "fix": "send the header Authorization: Bearer <key>"}, status_code=401,
                               headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await app(scope, receive, send)

    return guarded

