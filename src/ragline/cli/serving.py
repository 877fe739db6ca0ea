"""Commands that serve: ``serve`` (HTTP: native, OpenAI-compatible, MCP, the page) and ``mcp``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ragline import vocab
from ragline.cli import render
from ragline.cli.group import cli
from ragline.cli.options import (
    GENERATOR_HELP,
    PRIOR_HELP,
    device_option,
    from_run,
    index_option,
    precision_option,
    query_encoder_option,
)
from ragline.serve.budget import Budget
from ragline.serve.replicas import REQUEST_TIMEOUT_S


def _serving_options(f):
    """What ``serve`` and ``mcp`` share: the models, the work budget, the API key."""
    options = [
        index_option,
        click.option("--generator", default=vocab.DEFAULT_GENERATOR, show_default=True, help=GENERATOR_HELP),
        query_encoder_option,
        click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
                     help="Serve the models of a finished `ragline train rag` run, with the prior scale and index it "
                          "trained with unless given here."),
        click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 64),
                     help="Questions arriving together with the same settings are decoded in one batch of at most "
                          "this."),
        click.option("--prior-scale", default=None, type=float, help=PRIOR_HELP),
        click.option("--api-key", envvar="RAGLINE_API_KEY", default=None,
                     help="Require 'Authorization: Bearer KEY' on every HTTP route but the page (also from "
                          "RAGLINE_API_KEY)."),
        click.option("--max-request-tokens", default=Budget.max_request_tokens, show_default=True,
                     type=click.IntRange(1), help="Work one request may ask: generator rows (k x beams) x (prompt + "
                                                  "new tokens)."),
        click.option("--max-batch-tokens", default=Budget.max_batch_tokens, show_default=True,
                     type=click.IntRange(1), help="Work one batch may hold, in the same tokens."),
        click.option("--max-queue", default=Budget.max_queue, show_default=True, type=click.IntRange(1),
                     help="Requests waiting at most; more are refused (HTTP 503 with Retry-After)."),
        click.option("--max-running", default=Budget.max_running, show_default=True, type=click.IntRange(1, 16),
                     help="Batches of different settings decoded at once, taking turns on the model step by "
                          "step: a question with other settings than the batch decoding starts at that batch's next "
                          "step instead of after its last (1: one batch at a time)."),
        click.option("--kv-cache-mb", default=vocab.DEFAULT_KV_CACHE_MB, show_default=True,
                     type=click.FloatRange(0),
                     help="Memory for the key/value states of prompt blocks already read (system prompt, passages), "
                          "reused by later questions without recomputing them (decoder-only generators; 0: off)."),
        device_option,
        precision_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _serving_settings(ctx: click.Context, o: dict, host: str = "127.0.0.1", allowed_hosts: tuple[str, ...] = ()):
    """What ``serve`` and ``mcp`` open, from their options (and a training run's own settings)."""
    import dataclasses

    from ragline.serve.replicas import ReplicaSettings

    s = from_run(ctx, o["run_dir"], {"generator": o["generator"], "prior_scale": o["prior_scale"],
                                      "index_dir": o["index_dir"], "query_encoder": o["query_encoder"]})
    budget = Budget(max_request_tokens=o["max_request_tokens"], max_batch_tokens=o["max_batch_tokens"],
                    max_queue=o["max_queue"], max_running=o["max_running"])
    return ReplicaSettings(
        index_dir=str(s["index_dir"]) if s["index_dir"] else None, generator=str(s["generator"]),
        query_encoder=s["query_encoder"], prior_scale=s["prior_scale"], precision=o["precision"],
        device=o["device"], kv_cache_mb=o["kv_cache_mb"], max_batch=o["max_batch"],
        budget=dataclasses.asdict(budget), api_key=o["api_key"], host=host, allowed_hosts=tuple(allowed_hosts))


def _serving_model(ctx: click.Context, o: dict):
    """The RAG model ``serve`` and ``mcp`` answer with, and the worker that owns it (serve/replicas.py:
    open_served)."""
    from ragline.serve.replicas import open_served

    return open_served(_serving_settings(ctx, o), log=render.log)


def _warn_open(host: str, api_key: str | None) -> None:
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not api_key and not loopback:
        render.log(f"warning: serving on {host}, reachable from other machines, without an API key: anyone who "
                   "can reach it can ask questions, read the passages and switch the index; pass --api-key "
                   "(or set RAGLINE_API_KEY)")


@cli.command()
@_serving_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also answer requests whose Host header names NAME (repeatable; '*': any). Others than "
                   "localhost, 127.0.0.1, [::1] and --host are refused with 421 (DNS rebinding).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Answer with model replicas on Ray Serve behind one endpoint: on the cluster at ADDRESS ('auto' "
                   "finds a running one), or on a local Ray when no address is given.")
@click.option("--replicas", default=None, type=click.IntRange(1),
              help="Model replicas with --ray (default 1), each with its own generator and batching, sharing the "
                   "index; a replica that dies is replaced.")
@click.option("--request-timeout", default=None, type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help=f"With --ray: the longest a request (a whole stream included) may take before the endpoint "
                   f"answers 408 (default {REQUEST_TIMEOUT_S:g}).")
@click.pass_context
def serve(ctx, host, port, allowed_hosts, ray_address, replicas, request_timeout, **o) -> None:
    """Serve the HTTP API (POST /ask, /ask/stream, /search; GET /passages/ID, /indexes, /health), the
    OpenAI-compatible routes (/v1/chat/completions, /v1/models, /v1/embeddings), MCP at /mcp and the page."""
    import uvicorn

    from ragline.serve.app import create_app

    _warn_open(host, o["api_key"])
    for flag, given in (("--replicas", replicas), ("--request-timeout", request_timeout)):
        if given is not None and ray_address is None:
            raise click.UsageError(f"{flag} runs on Ray Serve: add --ray (a local Ray) or --ray ADDRESS")
    if ray_address is not None:
        _serve_replicas(ctx, o, host, port, allowed_hosts, ray_address, replicas or 1,
                        REQUEST_TIMEOUT_S if request_timeout is None else request_timeout)
        return
    rag, worker = _serving_model(ctx, o)
    render.log(f"serving index {rag.retriever.index.name} on http://{host}:{port} (API schema at /docs; "
               f"OpenAI-compatible at http://{host}:{port}/v1; MCP at http://{host}:{port}/mcp)")
    app = create_app(rag, worker=worker, api_key=o["api_key"], host=host, allowed_hosts=allowed_hosts)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _serve_replicas(ctx: click.Context, o: dict, host: str, port: int, allowed_hosts: tuple[str, ...],
                    address: str, replicas: int, request_timeout_s: float) -> None:
    """``serve --ray``: the same app from ``replicas`` replicas on Ray Serve (serve/replicas.py), until Ctrl-C."""
    import signal
    import time

    from ragline.serve import replicas as served

    settings = _serving_settings(ctx, o, host, allowed_hosts)
    render.log(f"starting {replicas} replica(s) of {settings.generator} on Ray Serve")
    served.start(settings, replicas, address=address, port=port, request_timeout_s=request_timeout_s)
    render.log(f"serving on http://{host}:{port} from {replicas} replica(s) (API schema at /docs; OpenAI-compatible "
               f"at /v1; MCP at /mcp); Ctrl-C stops")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # as Ctrl-C: replicas and a local Ray taken down
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        served.stop()


@cli.command()
@_serving_options
@click.option("--transport", type=click.Choice(["stdio", "http"]), default="stdio", show_default=True,
              help="stdio: talk over stdin/stdout (what desktop MCP clients launch); http: streamable HTTP at /mcp.")
@click.option("--host", default="127.0.0.1", show_default=True, help="With --transport http.")
@click.option("--port", default=8001, show_default=True, type=click.IntRange(1, 65535), help="With --transport http.")
@click.pass_context
def mcp(ctx, transport, host, port, **o) -> None:
    """Serve the Model Context Protocol: tools `search` and `ask` with typed inputs and structured results."""
    import contextlib

    from ragline.serve.mcp_server import create_mcp, require_key

    if transport == "http":
        _warn_open(host, o["api_key"])
    with contextlib.redirect_stdout(sys.stderr):  # over stdio, stdout carries the protocol alone
        rag, worker = _serving_model(ctx, o)
    server = create_mcp(rag, worker)
    if transport == "stdio":
        render.log(f"MCP over stdio: index {rag.retriever.index.name}, tools search and ask")
        server.run("stdio")
        return
    import uvicorn

    app = server.streamable_http_app(host=host)
    render.log(f"MCP over streamable HTTP at http://{host}:{port}/mcp: index {rag.retriever.index.name}")
    uvicorn.run(require_key(app, o["api_key"]) if o["api_key"] else app, host=host, port=port, log_level="warning")
