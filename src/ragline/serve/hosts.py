"""Which ``Host`` headers a server answers: a guard against DNS rebinding.

A web page on ``attacker.example`` whose name the attacker then points at 127.0.0.1 is, to the browser, still
``attacker.example``: it may read what it fetches there. A server on loopback without an API key would give
it the passages and answers. Such a request names the attacker's host in its ``Host`` header, so the server
answers only the hosts it was bound for: ``localhost``, ``127.0.0.1`` and ``[::1]``, the ``--host`` given, and
the ``--allowed-host`` names (``*`` allows any). A server bound to every address (``0.0.0.0``, ``::``) also
answers any IP address, since a page loaded from an IP address is that address's own (no rebinding is
possible without a name). A request without a ``Host`` header (HTTP/1.0 tools; browsers always send one) is
answered.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY = "*"
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def host_name(header: str) -> str:
    """The host of a ``Host`` header (no port, no brackets around IPv6, lower case, no trailing dot)."""
    h = header.strip().lower()
    if h.startswith("["):  # [::1]:8000
        h = h[1 : h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostPolicy:
    """The hosts a server bound to ``bind`` answers, with the ``allowed`` extra names (``*``: any)."""

    def __init__(self, bind: str, allowed: Iterable[str] = ()) -> None:
        extra = {host_name(a) if a != ANY else ANY for a in allowed}
        self.any = ANY in extra
        self.any_ip = host_name(bind) in WILDCARD_BINDS
        self.names = frozenset({*LOOPBACK_NAMES, host_name(bind), *extra} - {ANY, ""})

    def accepts(self, header: str | None) -> bool:
        """Whether a request with this ``Host`` header (None: none sent) is answered."""
        if header is None or self.any:
            return True
        name = host_name(header)
        return name in self.names or (self.any_ip and _is_ip(name))
