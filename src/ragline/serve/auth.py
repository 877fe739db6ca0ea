"""The API key check every HTTP protocol shares (``serve``'s routes and ``ragline mcp --transport http``).

A key is compared as bytes: the ``Authorization`` header's raw bytes, as the client sent them, against
``Bearer <key>`` in UTF-8, in constant time. (Decoding the header first, as Starlette does with Latin-1, would
make a non-ASCII key sent in UTF-8 fail on one route and pass on another.)
"""

from __future__ import annotations

import hmac

from starlette.types import Scope


def expected_header(api_key: str) -> bytes:
    """The ``Authorization`` header value that carries ``api_key``, as bytes."""
    return f"Bearer {api_key}".encode()


def authorised(scope: Scope, expected: bytes) -> bool:
    """Whether the request of ``scope`` sends exactly ``expected`` as its Authorization header."""
    given = next((v for k, v in scope.get("headers") or [] if k.lower() == b"authorization"), b"")
    return hmac.compare_digest(given, expected)
