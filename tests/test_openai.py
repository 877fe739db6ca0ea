"""The OpenAI-compatible routes driven by the official ``openai`` client (sync, async, streaming) and by
LangChain's ``ChatOpenAI``, against a running server with an API key and SmolLM2 (whose answers are words, so
equal texts mean something): each gets the answer and sources that ``POST /ask`` gives for the same question
and settings."""

import asyncio
import json

import httpx
import numpy as np
import pytest
from conftest import app_over_copies, running_server

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency: pip install -e '.[dev]'")

KEY = "sk-ragline-test"
QUESTION = "Who wrote Candide?"
# (model, decoding) pairs and their native settings; the tiny generator answers noise, quickly
CASES = [("rag-token", "greedy"), ("rag-sequence", "thorough"), ("concat", "greedy"), ("closed-book", "beam")]


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_index, smollm2):
    app = app_over_copies(tmp_path_factory.mktemp("openai"), small_index, generator=smollm2, api_key=KEY)
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def native(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
        def ask(**body):
            r = c.post("/ask", json={"question": QUESTION, "k": 3, "max_new_tokens": 6, **body})
            assert r.status_code == 200, r.text
            return r.json()
        yield ask


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(client, model, decoding, **extra):
    return client.chat.completions.create(model=f"ragline-{model}", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=6, extra_body={"decoding": decoding, "k": 3, **extra})


def _same_sources(extra: dict, answer: dict) -> None:
    assert [s["pid"] for s in extra["sources"]] == [s["pid"] for s in answer["sources"]]
    for got, want in zip(extra["sources"], answer["sources"], strict=True):
        assert got["prior"] == pytest.approx(want["prior"], abs=1e-5)
        assert (got["posterior"] is None) == (want["posterior"] is None)
        if want["posterior"] is not None:
            assert got["posterior"] == pytest.approx(want["posterior"], abs=1e-4)


def test_models_lists_every_reader_and_the_encoder(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["ragline-rag-sequence", "ragline-rag-token", "ragline-concat", "ragline-closed-book",
                   "ragline-question-encoder"]  # no fid: the tiny generator is decoder-only
    assert client.models.retrieve("ragline-rag-token").owned_by == "ragline"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("model, decoding", CASES)
def test_sync_client_gets_the_native_answer_and_sources(client, native, model, decoding):
    want = native(model=model, decoding=decoding)
    got = _chat(client, model, decoding)
    assert got.object == "chat.completion" and got.model == f"ragline-{model}" and len(got.choices) == 1
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want["text"]
    assert got.choices[0].finish_reason in ("stop", "length")
    extra = got.model_extra["ragline"]
    assert extra["text"] == want["text"] and extra["question"] == QUESTION and extra["history_turns"] == 0
    assert extra["token_sources"] is not None if model == "rag-token" else extra["token_sources"] is None
    _same_sources(extra, want)
    assert got.usage.completion_tokens == len(want["tokens"]) and got.usage.prompt_tokens > 0


def test_citation_marks_when_asked(client, native):
    want = native(model="rag-token", decoding="greedy")
    got = _chat(client, "rag-token", "greedy", citations=True).choices[0].message.content
    runs = want["citations"]
    assert want["text"] and runs and "".join(r["text"] for r in runs) == want["text"]
    expected = "".join(r["text"] + " " + "".join(f"[{n}]" for n in r["passages"]) for r in runs)
    assert got == expected and "[" in got
    seq = native(model="rag-sequence", decoding="thorough")
    marks = _chat(client, "rag-sequence", "thorough", citations=True).choices[0].message.content
    best = max(seq["sources"], key=lambda s: s["posterior"])["rank"]
    assert marks.startswith(seq["text"]) and f"[{best}]" in marks[len(seq["text"]):]


def test_async_client_gets_the_native_answer(server, native):
    want = native(model="rag-token", decoding="greedy")

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*[
                c.chat.completions.create(model="ragline-rag-token", max_tokens=6,
                                          messages=[{"role": "user", "content": QUESTION}],
                                          extra_body={"decoding": "greedy", "k": 3}) for _ in range(3)])

    for got in asyncio.run(run()):  # three at once: batched by the worker, each the same answer
        assert got.choices[0].message.content == want["text"]
        _same_sources(got.model_extra["ragline"], want)


@pytest.mark.parametrize("model, decoding", [("rag-token", "greedy"), ("rag-sequence", "thorough")])
def test_streaming_sends_chunks_then_the_sources(client, native, model, decoding):
    want = native(model=model, decoding=decoding)
    stream = client.chat.completions.create(model=f"ragline-{model}", stream=True, max_tokens=6,
                                            messages=[{"role": "user", "content": QUESTION}],
                                            stream_options={"include_usage": True},
                                            extra_body={"decoding": decoding, "k": 3})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want["text"]
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
    if decoding == "greedy" and len(want["tokens"]) > 2:
        assert len(pieces) > 1  # greedy text grows step by step
    else:
        assert len(pieces) <= 1  # beams may rewrite their best text: sent whole once decoded
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    _same_sources(last.model_extra["ragline"], want)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want["tokens"])


def test_raw_stream_ends_with_done(server):
    url, _ = server
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "ragline-rag-token", "stream": True, "max_tokens": 4, "decoding": "greedy",
                            "messages": [{"role": "user", "content": QUESTION}]}) as r:
        lines = [x for x in r.iter_lines() if x]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)
    json.loads(lines[-2][6:])  # every event before [DONE] is JSON


def test_n_best_and_stop(client, native):
    got = client.chat.completions.create(
        model="ragline-rag-sequence", n=2, max_tokens=6, messages=[{"role": "user", "content": QUESTION}],
        extra_body={"k": 3, "beams": 3})
    want = native(model="rag-sequence", decoding="thorough", beams=3)
    assert len(got.choices) == 2 and [c.index for c in got.choices] == [0, 1]
    assert got.choices[0].message.content == want["text"]
    assert got.model_extra["ragline"]["alternatives"][0][0] == want["text"]
    text = want["text"]
    if len(text) > 2:
        stop = text[1:3]
        cut = client.chat.completions.create(
            model="ragline-rag-sequence", max_tokens=6, stop=[stop], messages=[{"role": "user", "content": QUESTION}],
            extra_body={"k": 3})
        assert cut.choices[0].message.content == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_earlier_turns_are_read_with_the_question(client):
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "Tell me about Voltaire."},
                {"role": "assistant", "content": "A French writer."},
                {"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    got = client.chat.completions.create(model="ragline-rag-token", messages=messages, max_tokens=4,
                                         extra_body={"decoding": "greedy", "k": 3})
    extra = got.model_extra["ragline"]
    assert extra["question"] == f"User: Tell me about Voltaire.\nAssistant: A French writer.\n{QUESTION}"
    assert extra["history_turns"] == 2
    only = client.chat.completions.create(model="ragline-rag-token", messages=messages, max_tokens=4,
                                          extra_body={"decoding": "greedy", "k": 3, "history": 0})
    assert only.model_extra["ragline"]["question"] == QUESTION and only.model_extra["ragline"]["history_turns"] == 0
    long = [{"role": "user", "content": "word " * 150}, {"role": "assistant", "content": "word " * 150},
            {"role": "user", "content": QUESTION}]  # earlier turns over the question budget: the oldest go first
    fit = client.chat.completions.create(model="ragline-rag-token", messages=long, max_tokens=4,
                                         extra_body={"decoding": "greedy", "k": 3})
    assert fit.model_extra["ragline"]["history_turns"] == 1


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 0.7}, "temperature"), ({"top_p": 0.5}, "top_p"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"logprobs": True}, "logprobs"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"max_tokens": 1000}, "max_tokens"), ({"n": 2, "extra_body": {"decoding": "greedy"}}, "n"),
    ({"extra_body": {"decoding": "thorough"}}, "decoding"), ({"extra_body": {"k": 0}}, "k"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}, {"role": "user", "content": "q"}]},
     "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x" * 1001}]}, "messages")])
def test_unsupported_requests_get_openai_errors(client, kwargs, param):
    body = {"model": "ragline-rag-token", "messages": [{"role": "user", "content": QUESTION}], **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    err = e.value.body
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err


def test_key_unknown_model_and_budget(server, client):
    bad = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": QUESTION}])
    assert e.value.body["code"] == "model_not_found" and "ragline-rag-token" in e.value.body["message"]
    with pytest.raises(openai.APIStatusError) as e:  # over the work budget, as on the native routes
        client.chat.completions.create(model="ragline-rag-sequence", messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=128, extra_body={"k": 20, "beams": 8})
    assert e.value.status_code == 413 and "lower k" in e.value.body["message"]


def test_request_bodies_are_bounded(server):
    url, _ = server
    from ragline.serve.budget import MAX_BODY_BYTES

    huge = {"model": "ragline-rag-token", "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]}
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/v1/chat/completions", json=huge, headers=auth, timeout=60)
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/ask", json={"question": "x" * MAX_BODY_BYTES}, headers=auth, timeout=60)
    assert r.status_code == 413 and r.json()["fix"]

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    r = httpx.post(f"{url}/ask", content=chunks(), headers={**auth, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413


def test_embeddings_are_the_question_encoders(server, client):
    _, app = server
    encoder = app.state.worker.rag.retriever.encoder
    texts = ["Who wrote Candide?", "Art Deco architecture"]
    want = encoder.encode(texts)
    got = client.embeddings.create(model="ragline-question-encoder", input=texts)  # base64 on the wire
    assert [d.index for d in got.data] == [0, 1]
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, atol=1e-6)
    floats = client.embeddings.create(model="ragline-question-encoder", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want[0], atol=1e-6)
    assert got.usage.prompt_tokens > 0
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="ragline-question-encoder", input="x", dimensions=7)
    assert e.value.body["param"] == "dimensions"


def test_langchain_chat_openai_gets_the_native_answer(server, native):
    lc = pytest.importorskip("langchain_openai", reason="langchain-openai is a dev dependency")
    want = native(model="rag-token", decoding="greedy")
    llm = lc.ChatOpenAI(base_url=f"{server[0]}/v1", api_key=KEY, model="ragline-rag-token", max_tokens=6,
                        max_retries=0, include_response_headers=True, extra_body={"decoding": "greedy", "k": 3})
    msg = llm.invoke(QUESTION)
    assert msg.content == want["text"]
    headers = {k.lower(): v for k, v in msg.response_metadata["headers"].items()}
    sources = json.loads(headers["x-ragline-sources"])
    assert [s["pid"] for s in sources] == [s["pid"] for s in want["sources"]]
    assert [s["prior"] for s in sources] == pytest.approx([s["prior"] for s in want["sources"]], abs=1e-5)
    streamed = "".join(chunk.content for chunk in llm.stream(QUESTION))
    assert streamed == want["text"]
    cited = lc.ChatOpenAI(base_url=f"{server[0]}/v1", api_key=KEY, model="ragline-rag-token", max_tokens=6,
                          max_retries=0, extra_body={"decoding": "greedy", "k": 3, "citations": True})
    assert cited.invoke(QUESTION).content.startswith(want["citations"][0]["text"])
