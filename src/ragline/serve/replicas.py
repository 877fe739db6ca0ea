"""``ragline serve --ray [ADDRESS] --replicas N``: the same HTTP API answered by N model replicas on Ray Serve.

Each replica is a Ray Serve deployment replica (a Ray actor) that opens the RAG system as ``ragline serve`` does:
its own generator and question encoder, its own reader of the index on disk (single or sharded) following the
index's generations as ``add``/``update``/``delete`` write them, and its own worker batching the questions it
is sent (serve/worker.py). It serves the very app ``ragline serve`` serves (serve/app.py: /ask, /ask/stream,
/search, the OpenAI routes, MCP at /mcp, the page), so every route answers alike whichever replica takes it.
Ray Serve's HTTP proxy is the one endpoint: it sends each request to a replica (the less loaded of two
picked at random), and Ray Serve replaces a replica that dies; a request that was on it gets an error response
(HTTP 5xx), not silence. The proxy also answers every request by a deadline (``REQUEST_TIMEOUT_S``, ``serve
--request-timeout``: HTTP 408 past it, streams included): with Ray 2.60 a request the proxy was routing away
from a replica as it died was once left unanswered (seen in CI, not reproduced in the runs after).

MCP at /mcp runs stateless here (each request stands alone, as the protocol allows), since a session kept by
one replica would be unknown to the others. What a replicated server does not do: switch its index
(``POST /indexes/active`` answers 409), since that would change one replica of N; restart it with another
``--index`` instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from ragline import vocab
from ragline.errors import RaglineError
from ragline.serve.budget import Budget

APP_NAME = "ragline"
DEPLOYMENT = "RaglineReplica"
REQUEST_TIMEOUT_S = 600.0  # the proxy's deadline for one request, a whole stream included (HTTP 408 past it)


@dataclass(frozen=True)
class ReplicaSettings:
    """What every replica opens and serves: the models, the index, the work budget and the HTTP policy."""

    index_dir: str | None = None
    generator: str = vocab.DEFAULT_GENERATOR
    query_encoder: str | None = None
    prior_scale: float | None = None
    precision: str = vocab.DEFAULT_PRECISION
    device: str = vocab.DEFAULT_DEVICE
    kv_cache_mb: float = vocab.DEFAULT_KV_CACHE_MB
    max_batch: int = 8
    budget: dict = field(default_factory=lambda: dataclasses.asdict(Budget()))
    api_key: str | None = None
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    threads: int | None = None  # torch threads of each replica (default: its share of the CPUs)


def open_served(s: ReplicaSettings, log: Callable[[str], None] = lambda m: None):
    """(the RAG model, the worker that owns it) as ``s`` names them: the model loads on the worker's model
    thread, which runs all of the server's torch work (serve/turns.py: one thread calling into OpenMP, or every
    operation pays for waking its threads). What ``ragline serve``, ``ragline mcp`` and every replica answer with."""
    from ragline.serve.turns import Turns
    from ragline.serve.worker import ModelWorker
    from ragline.system import open as open_system

    def load():
        if s.threads:
            import torch

            torch.set_num_threads(s.threads)
        log(f"loading the generator {s.generator}")
        system = open_system(s.index_dir, s.generator, precision=s.precision, device=s.device,
                             query_encoder=s.query_encoder, prior_scale=s.prior_scale, kv_cache_mb=s.kv_cache_mb,
                             log=log)
        if system.opened.precision != vocab.FP32:
            log(f"the generator answers in {system.opened.precision}")
        return system.model

    turns = Turns()
    rag = turns.call(load)
    return rag, ModelWorker(rag, max_batch=s.max_batch, budget=Budget(**s.budget), turns=turns)


def build_app(s: ReplicaSettings, log: Callable[[str], None] = lambda m: None):
    """The app ``ragline serve`` serves, as one of several replicas, over the system :func:`open_served` opens."""
    from ragline.serve.app import create_app

    rag, worker = open_served(s, log)
    return create_app(rag, worker=worker, api_key=s.api_key, host=s.host, allowed_hosts=s.allowed_hosts,
                      replicated=True)


class RaglineReplica:
    """One replica: the app over its own models, built when Ray Serve starts the replica."""

    def __init__(self, settings: dict) -> None:
        settings = {**settings, "allowed_hosts": tuple(settings.get("allowed_hosts", ()))}
        self._app = build_app(ReplicaSettings(**settings))

    def __serve_build_asgi_app__(self):  # Ray Serve: the ASGI app this replica serves
        return self._app


def start(settings: ReplicaSettings, replicas: int, address: str | None = None, port: int = 8000,
          cpus_per_replica: float | None = None, request_timeout_s: float = REQUEST_TIMEOUT_S):
    """Join Ray at ``address`` (None or 'local': start a local Ray), start Ray Serve's HTTP proxy on
    ``settings.host``:``port``, answering each request within ``request_timeout_s`` (an error, 408, past it),
    and deploy ``replicas`` replicas; returns once every replica is ready (the ``ray`` module)."""
    from ragline.scale.cluster import connect

    if replicas < 1:
        raise RaglineError(f"--replicas {replicas} serves nothing", "give --replicas 1 or more")
    if not request_timeout_s > 0:
        raise RaglineError(f"--request-timeout {request_timeout_s} answers nothing",
                           "give a positive number of seconds")
    try:
        from ray import serve
    except ImportError as e:
        raise RaglineError(f"Ray Serve is not installed ({e})", "pip install 'ray[serve]' (or pip install -e "
                                                                "'.[scale]')") from None
    ray = connect(None if address in (None, "local") else address)
    cpus = cpus_per_replica
    if cpus is None:  # the cluster's CPUs shared out, no more than one machine holds
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
        cpus = max(1.0, min(largest, ray.cluster_resources().get("CPU", 1) // replicas))
    threads = settings.threads or max(1, int(cpus))
    serve.start(http_options={"host": settings.host, "port": port, "request_timeout_s": request_timeout_s})
    budget = Budget(**settings.budget)
    deployment = serve.deployment(
        name=DEPLOYMENT, num_replicas=replicas, ray_actor_options={"num_cpus": cpus},
        # the replica's own queue refuses past max_queue (503): let that many reach it, and the streams
        max_ongoing_requests=budget.max_queue + budget.max_running * settings.max_batch,
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
    )(serve.ingress()(RaglineReplica))
    serve.run(deployment.bind(dataclasses.asdict(dataclasses.replace(settings, threads=threads))), name=APP_NAME,
              route_prefix="/", blocking=False)
    return ray


def stop() -> None:
    """Take the replicas and Ray Serve down (the Ray session stays)."""
    from ray import serve

    serve.shutdown()
