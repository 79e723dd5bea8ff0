"""``kvwire serve --workers N``: N serving processes that share the REST and gRPC ports.

One Python process serves REST and gRPC from one interpreter lock, which a loaded server saturates long
before the network or Redis (docs/serving-benchmark.md). With ``workers > 1`` the command becomes a
small supervisor: it starts N child processes (``spawn``), each the same single-process server that
``kvwire serve`` runs (:func:`kvwire.server.rest.serve_process`), bound to the same ports with
``SO_REUSEPORT`` so that the kernel spreads new connections over them. There is no shared listening
socket and no proxy: each child accepts its own connections.

What the children share lives outside them: the store, and the job queue, which must therefore be the
Redis one (``KVWIRE_JOBS_REDIS_URL``): a job queued by one process must be found by
``GET /v1/jobs/{id}`` in any other. With a Redis queue no serving process loads a model (as for a
single process); ``kvwire worker`` processes run the ingests. Per-process state stays per process: the
manifest cache (another process's delete is seen within ``KVWIRE_MANIFEST_CACHE_TTL_S``) and rate-limit
buckets (in-memory limits apply per process; Redis-backed ones are shared). Prometheus metrics are
summed over the children: the supervisor gives them a ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary
folder, or the one set in its environment, emptied first), so a scrape that reaches any one process
reports the counters of all.

If a child exits, the supervisor stops the others and exits with an error, leaving restarts to
whatever runs it (systemd, Kubernetes, docker compose), as it would for a single process. SIGTERM or
SIGINT to the supervisor is passed on to every child, which finishes its in-flight requests within
``KVWIRE_SHUTDOWN_GRACE_S``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from kvwire.errors import BackendUnavailableError, InvalidInputError
from kvwire.server.config import ServiceSettings

log = logging.getLogger(__name__)

#: How long after SIGTERM (beyond the shutdown grace) a child may take before it is killed.
KILL_MARGIN_S = 5.0


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT`` (not yet listening)."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise InvalidInputError("KVWIRE_WORKERS > 1 needs SO_REUSEPORT, which this platform lacks")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise InvalidInputError(f"cannot bind to {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise InvalidInputError(f"cannot bind to {host}:{port}: {exc}") from exc
    return sock


def check_workers(settings: ServiceSettings) -> None:
    """Refuse settings that N processes cannot serve correctly."""
    if settings.workers > 1 and not settings.jobs_redis_url:
        raise InvalidInputError(
            f"KVWIRE_WORKERS={settings.workers} needs KVWIRE_JOBS_REDIS_URL: the in-process job queue "
            "(and its worker) cannot be shared between serving processes"
        )


def _child(settings: ServiceSettings, parent_pid: int) -> None:
    """A child's entry point: one single-process server on the shared ports."""
    from kvwire.server.rest import serve_process

    _die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(message)s")
    serve_process(settings, reuse_port=True)


def serve_workers(settings: ServiceSettings) -> None:
    """Run ``settings.workers`` serving processes on the same ports until SIGTERM/SIGINT or a child exits.

    A port of 0 is resolved here first (a free port, reserved by a bound ``SO_REUSEPORT`` socket
    that this process holds and never listens on), so every child binds the same one.
    """
    check_workers(settings)
    reserved: list[socket.socket] = []
    try:
        updates: dict[str, object] = {"workers": 1}
        for field in ("port", "grpc_port"):
            port = getattr(settings, field)
            if port == 0:
                sock = reuse_port_socket(settings.host, 0)
                reserved.append(sock)
                updates[field] = int(sock.getsockname()[1])
        child_settings = settings.model_copy(update=updates)
        with shared_metrics_dir():
            _supervise(child_settings, settings.workers)
    finally:
        for sock in reserved:
            sock.close()


@contextlib.contextmanager
def shared_metrics_dir() -> Iterator[Path]:
    """``PROMETHEUS_MULTIPROC_DIR`` for the children (spawned ones read the environment at start).

    A folder the operator set is emptied of the previous run's files, which prometheus_client would
    otherwise add to this run's counters; one made here is removed afterwards.
    """
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="kvwire-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    try:
        yield path
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(path, ignore_errors=True)


def _supervise(settings: ServiceSettings, count: int) -> None:
    context = multiprocessing.get_context("spawn")  # no inherited threads, locks or client sockets
    children = [
        context.Process(target=_child, args=(settings, os.getpid()), name=f"kvwire-serve-{i}", daemon=False)
        for i in range(count)
    ]
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    failed: list[str] = []
    try:
        for child in children:
            child.start()
        log.info(
            "kvwire serving with %d processes (pids %s) on REST port %d%s",
            count,
            ", ".join(str(c.pid) for c in children),
            settings.port,
            "" if settings.grpc_port is None else f" and gRPC port {settings.grpc_port}",
        )
        sentinels = [c.sentinel for c in children]
        while not stopping.is_set():
            ready = multiprocessing.connection.wait(sentinels, timeout=0.5)
            if ready:
                # A ready sentinel is a child that exited; it may not be reapable yet (is_alive()
                # can still say True for a moment), so join it rather than poll it.
                dead = [c for c in children if c.sentinel in ready]
                for child in dead:
                    child.join(5)
                failed = [f"{c.name} (pid {c.pid}) exited with {c.exitcode}" for c in dead]
                break
    finally:
        _stop_all(children, settings.shutdown_grace_s + KILL_MARGIN_S)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if failed and not stopping.is_set():
        raise BackendUnavailableError("serving process stopped: " + "; ".join(failed))


def _stop_all(children: Sequence[multiprocessing.process.BaseProcess], timeout_s: float) -> None:
    """SIGTERM every live child, wait up to ``timeout_s`` for all, then SIGKILL the rest."""
    for child in children:
        if child.is_alive():
            with contextlib.suppress(ProcessLookupError, AttributeError):
                child.terminate()
    deadline = time.monotonic() + timeout_s
    for child in children:
        if child.pid is not None:
            child.join(max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.is_alive():
            log.warning("killing %s (pid %s): it did not stop in %.0f s", child.name, child.pid, timeout_s)
            child.kill()
            child.join(5)


def _die_with_parent(parent_pid: int) -> None:
    """On Linux, have the kernel send this process SIGTERM when the supervisor dies (even by SIGKILL),
    so that no serving process outlives it holding the ports."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
