"""OpenAI-compatible routes on ``ragline serve``: what the ``openai`` client libraries, LangChain's and
LlamaIndex's OpenAI connectors and chat front ends speak. A thin adapter over the same model worker, budget
and API key as the native routes; retrieval and decoding are never redone here.

    GET  /v1/models                 one model per reader this server offers (``ragline-rag-sequence``,
                                    ``ragline-rag-token``, ``ragline-concat``, ``ragline-closed-book``, and
                                    ``ragline-fid`` over a seq2seq generator) and the question encoder
    POST /v1/chat/completions       an answer; ``stream: true`` sends ``chat.completion.chunk`` events, then
                                    ``[DONE]``
    POST /v1/embeddings             q(x) from the question encoder (``encoding_format`` float or base64)

**The question.** The last message must be the user's: it is the question. Earlier user and assistant turns
(up to ``history`` of them, the most recent first; as many as fit the question budget when not given) are
read with it, one line each, ``User: ...`` / ``Assistant: ...``, before the question, by the retriever and
the reader alike; the question as read is returned in ``ragline.question``. System and developer messages
are not read: the reader has its own prompt.

**Honoured:** ``max_tokens`` / ``max_completion_tokens``, ``n`` (the n best answers of beam search, best
first), ``stop`` (up to 4 strings; the text is cut before the first), ``temperature`` 0 (decoding is
deterministic), ``top_p`` 1, ``stream`` with ``stream_options.include_usage``; ``user``, ``seed``,
``metadata``, ``store`` and ``service_tier`` are accepted and have no effect. Anything else (sampling,
tools, logprobs, penalties, images) is refused with an OpenAI error object naming the parameter.

**ragline's own fields** ride in the request body (``extra_body`` in the ``openai`` client): ``k``,
``mode`` (dense, bm25, hybrid), ``filter`` (metadata conditions), ``decoding``, ``beams``, ``history`` and
``citations`` (true: numbered marks ``[n]`` after the words each passage supports, :mod:`ragline.rag.citations`).

**The sources.** Every completion carries the native answer structure (question, log p, sources with
title, pid, prior and posterior, RAG-Token's per-token passages, citations) in a ``ragline`` field: on the
completion, or on a stream's last chunk. A non-streamed completion also sends the sources' rank, pid, prior
and posterior (and where a passage comes from: file, page or section) as JSON in the ``X-Ragline-Sources``
header (LangChain's ``include_response_headers``).

**Streaming.** Greedy decoding sends the answer as it grows, one chunk per step; decodings whose best text
can still change (beam search, RAG-Sequence), concat (whose marks leave its text once decoded), several
answers (``n``), ``stop`` strings and ``citations`` send the answer whole in one chunk once decoded, since a
chunk cannot be taken back.

**Usage** counts the question's generator tokens (not the passages read with it) and the answer's tokens.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import anyio
import numpy as np
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ragline import vocab
from ragline.corpus.documents import locator
from ragline.errors import RaglineError
from ragline.models.seq2seq import Seq2SeqGenerator
from ragline.rag import citations as cite
from ragline.rag.decoding import stop_ids
from ragline.rag.model import Answer, RagModel
from ragline.serve import events
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

log = logging.getLogger("ragline.serve")

PREFIX = "/v1/"
MODEL_PREFIX = "ragline-"
ENCODER_MODEL = "ragline-question-encoder"
MAX_STOPS = 4  # as OpenAI
MAX_EMBED_INPUTS = 256
MAX_EMBED_CHARS = 8192
CHARS_PER_TOKEN = 32  # an earlier turn of more characters than this x the question budget is taken not to fit
SOURCES_HEADER = "X-Ragline-Sources"
MAX_SOURCES_HEADER = 8192  # bytes: the top-ranked sources that fit
# Accepted and without effect: they do not change a deterministic answer.
IGNORED = frozenset({"user", "seed", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"})
ROLES = {"user": "User", "assistant": "Assistant"}
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error", 500: "server_error",
               503: "server_error"}


class OpenAIError(RaglineError):
    """A refusal in OpenAI's terms: the HTTP status, the parameter at fault and a code."""

    def __init__(self, problem: str, fix: str, param: str | None = None, code: str | None = None,
                 status: int = 400) -> None:
        super().__init__(problem, fix)
        self.param, self.code, self.status = param, code, status


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(e: RaglineError, status: int, headers: dict | None = None) -> JSONResponse:
    """``e`` as an OpenAI error response (problem and fix in one message)."""
    return JSONResponse(error_body(status, f"{e.problem}; {e.fix}", getattr(e, "param", None),
                                   getattr(e, "code", None)), status_code=status, headers=headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``: OpenAI's fields that ragline honours, and its own."""

    model_config = ConfigDict(extra="allow")  # every other field is checked by name: ignored or refused

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_BEAMS)
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # ragline's own
    k: int | None = Field(None, ge=1, le=MAX_K)
    mode: Literal[vocab.MODES] = vocab.DEFAULT_MODE  # type: ignore[valid-type]
    decoding: Literal[vocab.ALL_DECODINGS] | None = None  # type: ignore[valid-type]
    beams: int = Field(vocab.DEFAULT_BEAMS, ge=1, le=MAX_BEAMS)
    history: int | None = Field(None, ge=0)
    citations: bool = False
    filter: list[str] = Field(default_factory=list, max_length=MAX_FILTERS)

    @field_validator("filter")
    @classmethod
    def _filters(cls, v: list[str]) -> list[str]:
        return list(check_filters(v))


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] | list[int] | list[list[int]]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


# Parameters refused unless given at their no-op value: (name, accepted values, why).
NO_OP = (("logprobs", (None, False), "ragline returns the passages' posteriors, not token log-probabilities"),
         ("top_logprobs", (None, 0), "ragline returns no token log-probabilities"),
         ("presence_penalty", (None, 0, 0.0), "ragline's decoding has no penalties"),
         ("frequency_penalty", (None, 0, 0.0), "ragline's decoding has no penalties"),
         ("logit_bias", (None, {}), "ragline's decoding has no logit bias"),
         ("tools", (None, []), "ragline calls no tools"),
         ("functions", (None, []), "ragline calls no functions"),
         ("tool_choice", (None, "none"), "ragline calls no tools"),
         ("response_format", (None, {"type": "text"}), "ragline answers in text only"),
         ("modalities", (None, ["text"]), "ragline answers in text only"),
         ("audio", (None,), "ragline answers in text only"),
         ("prediction", (None,), "ragline takes no predicted output"),
         ("reasoning_effort", (None,), "ragline's readers do not reason in steps"),
         ("web_search_options", (None,), "ragline searches its own index only"))

NO_OP_NAMES = frozenset(name for name, _, _ in NO_OP)


def offered_models(rag: RagModel) -> list[str]:
    """The chat model ids this server answers with: every reader its generator can run."""
    return [MODEL_PREFIX + m for m in vocab.MODELS
            if m != vocab.FID or isinstance(rag.generator, Seq2SeqGenerator)]


def routes(rag: RagModel, worker: ModelWorker) -> APIRouter:
    """The ``/v1`` routes over ``rag`` and its ``worker``."""
    router = APIRouter(prefix=PREFIX.rstrip("/"), tags=["OpenAI-compatible"])
    started = int(time.time())

    def model_entry(name: str) -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "ragline"}

    @router.get("/models")
    def models() -> dict:
        """The readers this server answers with, and the question encoder (for /v1/embeddings)."""
        return {"object": "list", "data": [model_entry(m) for m in [*offered_models(rag), ENCODER_MODEL]]}

    @router.get("/models/{name}")
    def model(name: str) -> dict:
        if name not in [*offered_models(rag), ENCODER_MODEL]:
            raise _unknown_model(name, rag)
        return model_entry(name)

    @router.post("/chat/completions", response_model=None)
    async def chat(req: ChatRequest) -> Response:
        """An answer with its sources, in OpenAI's chat-completion format (streamed with ``stream: true``)."""
        settings, stops = _settings(req, rag)
        # tokenising the history is work: off the event loop, so that other requests go on meanwhile
        question, turns = await anyio.to_thread.run_sync(_question, req, worker.question_tokens,
                                                         worker.budget.max_question_tokens)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model,
                "system_fingerprint": _fingerprint(rag)}
        if req.stream:
            return _stream(req, settings, stops, question, turns, worker, meta)
        answer: Answer = await events.result(worker.ask(question, settings))
        choices = _choices(answer, req, settings, stops, rag)
        body = {**meta, "object": "chat.completion",
                "choices": [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                             "finish_reason": reason, "logprobs": None} for i, (text, reason) in enumerate(choices)],
                "usage": _usage(answer, worker), "ragline": {**answer.to_dict(), "history_turns": turns}}
        return JSONResponse(body, headers={SOURCES_HEADER: _sources_header(answer)})

    @router.post("/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict:
        """q(x) of each input from the question encoder of the active index."""
        if req.model != ENCODER_MODEL:
            raise OpenAIError(f"no embedding model {req.model!r}", f"use model {ENCODER_MODEL!r}", "model",
                              "model_not_found", 404)
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or not all(isinstance(t, str) for t in texts):
            raise OpenAIError("input must be a string or a list of strings (token arrays are not read)",
                              "send the texts themselves", "input")
        if len(texts) > MAX_EMBED_INPUTS or any(not t or len(t) > MAX_EMBED_CHARS for t in texts):
            raise OpenAIError(f"input must hold 1 to {MAX_EMBED_INPUTS} non-empty texts of at most "
                              f"{MAX_EMBED_CHARS} characters", "split the request", "input")
        encoder = rag.retriever.encoder if rag.retriever else None
        if encoder is None:
            raise OpenAIError("this server's index has no question encoder (BM25 only)",
                              "serve an index with dense vectors", "model", status=400)
        vectors = np.asarray(await asyncio.wrap_future(worker.call(lambda: encoder.encode(texts))), dtype="<f4")
        # (N, dim): the encoder runs on the model thread, with the server's other torch work (turns.py), counted
        # against the line's bound
        if req.dimensions is not None and req.dimensions != vectors.shape[1]:
            raise OpenAIError(f"the question encoder gives {vectors.shape[1]} dimensions, not {req.dimensions}",
                              "leave dimensions out", "dimensions")
        tokens = await anyio.to_thread.run_sync(encoder.count_tokens, texts)  # 256 texts: off the event loop
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.tobytes()).decode() if req.encoding_format == "base64"
                 else v.tolist()} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": ENCODER_MODEL,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return router


def _unknown_model(name: str, rag: RagModel) -> OpenAIError:
    return OpenAIError(f"the model {name!r} does not exist on this server",
                       f"use one of {', '.join(offered_models(rag))} (GET /v1/models)", "model", "model_not_found", 404)


def _settings(req: ChatRequest, rag: RagModel) -> tuple[Settings, list[str]]:
    """The worker settings a chat request asks for, and its stop strings; refuses what ragline cannot honour."""
    for name in (req.model_extra or {}):
        if name not in IGNORED and name not in NO_OP_NAMES:
            raise OpenAIError(f"ragline does not support the parameter {name!r}",
                              "leave it out (ragline's own fields: k, mode, decoding, beams, history, citations)",
                              name, "unsupported_parameter")
    for name, allowed, why in NO_OP:
        if (req.model_extra or {}).get(name) not in allowed:
            raise OpenAIError(f"{name} is not supported: {why}", f"leave {name} out", name, "unsupported_parameter")
    if req.temperature not in (None, 0):
        raise OpenAIError(f"temperature {req.temperature} asks for sampling; ragline decodes deterministically "
                          "(beam search or greedy)", "send temperature 0 or leave it out", "temperature",
                          "unsupported_value")
    if req.top_p not in (None, 1):
        raise OpenAIError(f"top_p {req.top_p} asks for sampling; ragline decodes deterministically",
                          "send top_p 1 or leave it out", "top_p", "unsupported_value")
    if req.model not in offered_models(rag):
        raise _unknown_model(req.model, rag)
    reader = req.model.removeprefix(MODEL_PREFIX)
    decoding = req.decoding or vocab.default_decoding(reader)
    try:
        vocab.check(reader, decoding)
    except RaglineError as e:
        raise OpenAIError(e.problem, f"send decoding {' or '.join(vocab.DECODINGS[reader])}", "decoding") from None
    new_tokens = req.max_completion_tokens or req.max_tokens or vocab.DEFAULT_MAX_NEW_TOKENS
    if new_tokens > MAX_NEW_TOKENS:
        raise OpenAIError(f"max_tokens={new_tokens} is over this server's {MAX_NEW_TOKENS}",
                          f"send max_tokens of at most {MAX_NEW_TOKENS}", "max_tokens")
    if req.n > 1 and decoding == vocab.GREEDY:
        raise OpenAIError(f"n={req.n} needs beam search: greedy decoding finds one answer",
                          f"send decoding {vocab.DECODINGS[reader][0]!r}, or n 1", "n")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS or not all(stops):
        raise OpenAIError(f"stop takes up to {MAX_STOPS} non-empty strings", "send fewer stop strings", "stop")
    return Settings(reader, decoding, settings_k(reader, req.k, rag.k), req.mode, max(req.beams, req.n), new_tokens,
                    req.n, tuple(req.filter)), stops


def _text(message: dict[str, Any], i: int) -> str:
    """A message's text: a string, or a list of text parts (other parts are refused)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise OpenAIError(f"message {i} has content ragline cannot read (only text is read)",
                      "send the message's content as a string or as text parts", f"messages[{i}].content")


def _question(req: ChatRequest, count: Callable[[str], int], budget: int) -> tuple[str, int]:
    """The question as the retriever and reader read it, and how many earlier turns it holds: the last
    (user) message, after the most recent earlier user and assistant turns that fit ``budget`` tokens as
    ``count`` counts them (each turn counted once, so a long conversation costs one pass). A turn longer than
    ``budget`` x CHARS_PER_TOKEN characters is taken not to fit without tokenising it, so what is tokenised is
    bounded by the budget, not by the body."""
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(req.messages):
        role = m.get("role")
        if role in ("system", "developer"):
            continue
        if role not in ROLES:
            raise OpenAIError(f"message {i} has role {role!r}; ragline reads user, assistant, system and developer "
                              "messages", "leave tool and function messages out", f"messages[{i}].role")
        turns.append((role, _text(m, i).strip()))
    if not turns or turns[-1][0] != "user":
        raise OpenAIError("the last message must be the user's question", "end the messages with a user message",
                          "messages")
    last = turns.pop()[1]
    if not last:
        raise OpenAIError("the question (the last user message) is empty", "send a question", "messages")
    if len(last) > MAX_QUESTION_CHARS:
        raise OpenAIError(f"the question is {len(last)} characters long; this server takes at most "
                          f"{MAX_QUESTION_CHARS}", "ask a shorter question", "messages", "context_length_exceeded")
    earlier = [f"{ROLES[role]}: {' '.join(text.split())}" for role, text in turns if text]
    wanted = len(earlier) if req.history is None else min(req.history, len(earlier))
    used, n = count(last), 0
    for line in reversed(earlier[len(earlier) - wanted:]):  # the most recent first, while they fit
        if len(line) > budget * CHARS_PER_TOKEN:
            break
        used += count(line) + 1  # and the line break
        if used > budget:
            break
        n += 1
    while n > 0 and count(_joined(earlier, n, last)) > budget:  # tokens can merge across a line break
        n -= 1
    return _joined(earlier, n, last), n


def _joined(earlier: list[str], n: int, last: str) -> str:
    return "\n".join([*earlier[len(earlier) - n:], last])


def _choices(answer: Answer, req: ChatRequest, settings: Settings, stops: list[str], rag: RagModel
             ) -> list[tuple[str, str]]:
    """Each choice's text and finish reason: the answer (with its marks when asked), then the other n-best."""
    best = cite.marked(answer.citations) if req.citations and answer.citations else answer.text
    ended = bool(answer.tokens) and answer.tokens[-1] in set(stop_ids(rag.generator))
    out = [(best, "length" if not ended and len(answer.tokens) >= settings.max_new_tokens else "stop")]
    for text, _ in answer.alternatives[1 : req.n]:
        tokens = len(rag.generator.tokenizer(text, add_special_tokens=False)["input_ids"])
        out.append((text, "length" if tokens >= settings.max_new_tokens else "stop"))
    return [_cut(text, reason, stops) for text, reason in out]


def _cut(text: str, reason: str, stops: list[str]) -> tuple[str, str]:
    """``text`` cut before the first stop string in it (finish reason ``stop``)."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:at], "stop") if at >= 0 else (text, reason)


def _usage(answer: Answer, worker: ModelWorker) -> dict:
    prompt = worker.question_tokens(answer.question)
    return {"prompt_tokens": prompt, "completion_tokens": len(answer.tokens),
            "total_tokens": prompt + len(answer.tokens)}


def _fingerprint(rag: RagModel) -> str:
    ix = rag.retriever.index if rag.retriever else None
    return f"ragline-{ix.fingerprint[:12]}" if ix is not None else "ragline"


def _sources_header(answer: Answer) -> str:
    """The sources' rank, pid, prior and posterior as ASCII JSON, the top-ranked that fit the header's bound."""
    rows = [{"rank": s.rank, "pid": s.pid, "prior": s.prior, "posterior": s.posterior,
             **({"where": locator(s.meta)} if locator(s.meta) else {})} for s in answer.sources]
    while True:
        text = json.dumps(rows, ensure_ascii=True, separators=(",", ":"))
        if len(text) <= MAX_SOURCES_HEADER or not rows:
            return text
        rows.pop()


def _stream(req: ChatRequest, settings: Settings, stops: list[str], question: str, turns: int, worker: ModelWorker,
            meta: dict) -> StreamingResponse:
    """The answer as ``chat.completion.chunk`` server-sent events, then ``[DONE]``."""
    # greedy text only grows; concat's partial text still holds the marks its answer drops
    growing = (settings.decoding == vocab.GREEDY and settings.model != vocab.CONCAT and req.n == 1 and not stops
               and not req.citations)
    job = events.JobEvents(worker, question, settings, steps=growing)
    usage = req.stream_options is not None and req.stream_options.include_usage

    def chunk(choices: list[dict], **extra) -> str:
        return _data({**meta, "object": "chat.completion.chunk", "choices": choices, **extra})

    def delta(i: int, content: str | None = None, role: bool = False, finish: str | None = None) -> dict:
        d = {"role": "assistant", "content": ""} if role else ({"content": content} if content else {})
        return {"index": i, "delta": d, "finish_reason": finish, "logprobs": None}

    async def stream() -> AsyncIterator[str]:
        yield chunk([delta(i, role=True) for i in range(req.n)])
        sent = ""
        async for kind, data in job:
            if kind == events.PARTIAL:
                data = data.rstrip("\ufffd")  # a character whose bytes are not all decoded yet waits for them
                if data.startswith(sent) and len(data) > len(sent):
                    yield chunk([delta(0, data[len(sent):])])
                    sent = data
            elif kind == events.END:
                try:
                    answer: Answer = data.result()
                except RaglineError as e:
                    yield _data(error_body(getattr(e, "status", 400), f"{e.problem}; {e.fix}"))
                    break
                except BaseException as e:  # noqa: BLE001 - the stream always ends with an error object
                    yield _data(error_body(500, f"the server failed on this request ({type(e).__name__}); retry"))
                    break
                choices = _choices(answer, req, settings, stops, worker.rag)
                if sent and not choices[0][0].startswith(sent):
                    log.warning("a streamed answer changed after it was sent: %r, then %r", sent, choices[0][0])
                for i, (text, _) in enumerate(choices):
                    rest = text[len(sent):] if i == 0 and text.startswith(sent) else text
                    if rest:
                        yield chunk([delta(i, rest)])
                yield chunk([delta(i, finish=reason) for i, (_, reason) in enumerate(choices)],
                            ragline={**answer.to_dict(), "history_turns": turns})
                if usage:
                    yield chunk([], usage=_usage(answer, worker))
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _data(obj: dict) -> str:
    return f"data: {events.event_json(obj)}\n\n"

