"""The HTTP API fuzzed from its own OpenAPI schema with schemathesis (property-based, valid and invalid inputs),
on the tiny generator: no request gets a 5xx, and every error body says what went wrong and how to fix it (in
OpenAI's error object on the OpenAI-compatible routes, /v1/...)."""

import pytest
import schemathesis
from conftest import app_over_copies
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, small_index):
    app = app_over_copies(tmp_path_factory.mktemp("fuzz"), small_index, allowed_hosts=("testserver",))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_every_error_says_what_and_how(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        if case.path.startswith("/v1/"):
            err = body["error"]
            assert err["message"] and "; " in err["message"] and err["type"], response.text[:300]
        else:
            assert {"error", "fix"} <= set(body) and body["error"] and body["fix"], response.text[:300]


@pytest.fixture(scope="module")
def client(tmp_path_factory, small_index):
    from fastapi.testclient import TestClient

    app = app_over_copies(tmp_path_factory.mktemp("fuzz-shapes"), small_index)
    with TestClient(app, base_url="http://localhost") as c:
        yield c


_FIELD = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="=!"), min_size=1, max_size=40)


@given(host=st.one_of(st.sampled_from(["localhost", "127.0.0.1:8000", "[::1]", "attacker.example", "", "a" * 300]),
                      st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=60)),
       fields=st.lists(st.tuples(_FIELD, st.text(max_size=20), st.sampled_from(["=", "!="])), max_size=16),
       history=st.lists(st.tuples(st.sampled_from(["user", "assistant"]), st.integers(0, 400_000)), max_size=6))
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_host_headers_filter_fields_and_long_histories(client, host, fields, history):
    """The request shapes the second hardening pass added refusals for: any Host header (421 unless it is one
    the server was bound for), filters on invented fields (422 naming the fields there are), and chat histories
    of turns up to 400 KB (weighed off the event loop, never tokenised whole). No 5xx, every error says how."""
    r = client.post("/search", json={"question": "Rome", "k": 2, "filter": [f"{f}{op}{v}" for f, v, op in fields]},
                    headers={"Host": host})
    assert r.status_code in (200, 421, 422), (host, fields, r.text[:300])
    if r.status_code >= 400:
        assert r.json()["error"] and r.json()["fix"]
    messages = [{"role": role, "content": "word " * (n // 5)} for role, n in history]
    r = client.post("/v1/chat/completions", json={"model": "ragline-rag-token", "decoding": "greedy", "k": 2,
                                                  "max_tokens": 1, "messages": [*messages, {"role": "user",
                                                                                            "content": "Who?"}]})
    assert r.status_code in (200, 413), r.text[:300]
    if r.status_code == 200:
        assert r.json()["ragline"]["history_turns"] <= len(history)
