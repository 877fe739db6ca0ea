"""The HTTP API fuzzed from its own OpenAPI schema with schemathesis (property-based, valid and invalid inputs),
on the tiny generator: no request gets a 5xx, and every error body says what went wrong and how to fix it (in
OpenAI's error object on the OpenAI-compatible routes, /v1/...)."""

import pytest
import schemathesis
from conftest import app_over_copies
from hypothesis import HealthCheck, settings


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, small_index):
    app = app_over_copies(tmp_path_factory.mktemp("fuzz"), small_index)
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
