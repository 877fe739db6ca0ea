"""Connecting to Ray: a running cluster at an address, or a local one started on this machine."""

from __future__ import annotations

import os

from ragline.errors import RaglineError

# Ray Serve's HTTP proxy must answer its readiness check within 5 s, three times, or is killed and started
# again; on a busy 2-core machine its process (niced, like every Ray worker) spends longer than that importing,
# and the proxy never came up (`serve --ray` beside a running benchmark). A local Ray gets a minute.
LOCAL_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def ray_module():
    try:
        import ray
    except ImportError:
        raise RaglineError("Ray is not installed",
                           "pip install 'ray[data,serve]' (or pip install -e '.[scale]')") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None):
    """Join the cluster at ``address`` ('auto' finds the local one; RAY_ADDRESS is read when unset), or start
    a local Ray with ``num_cpus``; a session already connected is kept. Returns the ``ray`` module."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    messages_to_stderr(ray)
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            for name, value in LOCAL_ENV.items():  # the local raylet, and every worker it starts, inherit them
                os.environ.setdefault(name, value)
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise RaglineError(f"cannot start or join {where} ({e})",
                           "check the address (`ray status` on the head node) or leave it out to run locally"
                           ) from None
    return ray


def messages_to_stderr(ray) -> None:
    """Send what Ray's driver prints of the cluster's messages to stderr, keeping stdout for ragline's output.

    The driver prints the raylet's warnings (such as "14 PYTHON worker processes have been started on node
    ...") to stdout whatever ``log_to_driver`` says (``ray._private.worker.listen_error_messages``, Ray 2.x),
    so a line of it could land in the middle of `ragline ask --json`'s JSON (seen in a test run). Ray has no
    setting for this; its printing function is wrapped to mark every message as an error message, which it
    writes to stderr. Where that function is missing (another Ray version), nothing changes."""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or hasattr(printer, "wrapped"):  # missing, or wrapped already
        return

    def to_stderr(data: dict, *args, **kwargs):
        return printer({**data, "is_err": True}, *args, **kwargs)

    to_stderr.wrapped = printer
    worker.print_to_stdstream = to_stderr
