"""Timeouts on HTTP connections that uvicorn leaves open-ended, so a stalled client cannot pin a connection.

uvicorn (h11) times out only an idle keep-alive connection. It waits forever for a client that
connects and sends nothing, sends half a request line or half its headers, stops sending a body it
announced, or stops reading a response (the unsent bytes then stay buffered in the server). Each such
connection holds a socket and its buffers until the client goes away, which a slow-loris client never
does. :class:`GuardedH11Protocol` adds two timers per connection:

* **read**: while the server waits for the client's request (from connect, or from the first byte of a
  keep-alive connection's next request, until its headers are complete) for more than
  ``read_timeout_s``, or while it waits for more of a request body for more than ``read_timeout_s``
  without any byte arriving, the connection is aborted;
* **send**: while the transport's write buffer stays above its high-water mark (the client is not
  reading) for more than ``send_timeout_s``, the connection is aborted and the buffer dropped.

Abort is what a client disconnect looks like to the app, so a request being served ends as if the
client had gone. This subclasses uvicorn's own ``H11Protocol`` (``uvicorn.Config(http=...)`` takes a
protocol class) and relies on its ``conn`` (the h11 connection), ``transport`` and
``timeout_keep_alive_task`` attributes; tests/faults/test_timeouts.py checks each behaviour against
the installed uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from kvwire.server.config import ServiceSettings

log = logging.getLogger(__name__)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a read (request) timeout and a send (slow reader) timeout."""

    read_timeout_s: float = 10.0
    send_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._read_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._watch_reading(progress=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_reading(progress=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_reading(progress=False)

    # -- read timer

    def _waiting_for_client(self) -> bool:
        """True while the next step is the client's: headers of a request, or more of its body."""
        if self.transport.is_closing():
            return False
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            return True
        # IDLE with the keep-alive timer armed is an idle connection, which uvicorn times out itself.
        return state is h11.IDLE and self.timeout_keep_alive_task is None

    def _cancel_read(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _watch_reading(self, *, progress: bool) -> None:
        if not self._waiting_for_client():
            self._cancel_read()
            return
        # A body may trickle (re-armed on each byte); headers must complete within the timeout of
        # their first byte (a slow loris cannot stretch them by dribbling).
        if progress and self.conn.their_state is h11.SEND_BODY:
            self._cancel_read()
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self._waiting_for_client():
            log.info(
                "closing HTTP connection from %s: no complete request in %.0f s",
                self.client,
                self.read_timeout_s,
            )
            self.transport.abort()

    # -- send timer

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        log.info(
            "closing HTTP connection to %s: it read nothing for %.0f s", self.client, self.send_timeout_s
        )
        self.transport.abort()


def guarded_protocol(read_timeout_s: float, send_timeout_s: float) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass with these timeouts (uvicorn instantiates the class)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"read_timeout_s": read_timeout_s, "send_timeout_s": send_timeout_s},
    )


def uvicorn_options(settings: ServiceSettings) -> dict[str, Any]:
    """The uvicorn ``Config`` keyword arguments for the timeouts and limits in ``settings``."""
    return {
        "http": guarded_protocol(settings.http_read_timeout_s, settings.http_send_timeout_s),
        "timeout_keep_alive": settings.http_keep_alive_s,
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "backlog": settings.http_backlog,
    }


# ---------------------------------------------------------------------------------------------- gRPC


class SendWatchdog:
    """Cancels a gRPC streaming call whose client has not taken a message within ``timeout_s``.

    grpcio's sync server sends each streamed message from the handler's pool thread and blocks that
    thread until HTTP/2 flow control lets the message out; a client that stops reading would keep
    the thread (one of ``grpc_max_workers``) forever, and a few such clients would stall the server.
    The handler wraps each ``yield`` in :meth:`guard`; one daemon thread cancels calls whose guard is
    older than ``timeout_s``, which fails the blocked send and frees the thread.
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._pending: dict[int, tuple[float, Any]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.cancelled = 0

    @contextlib.contextmanager
    def guard(self, context: Any) -> Iterator[None]:
        """Cancel ``context``'s call if the block (one message send) lasts longer than ``timeout_s``."""
        with self._lock:
            token = self._next
            self._next += 1
            self._pending[token] = (time.monotonic() + self.timeout_s, context)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvwire-grpc-watchdog", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._pending.pop(token, None)

    def _run(self) -> None:
        interval = min(1.0, self.timeout_s / 4)
        while not self._wake.wait(interval):
            now = time.monotonic()
            with self._lock:
                expired = [(t, c) for t, (deadline, c) in self._pending.items() if deadline <= now]
                for token, _ in expired:
                    del self._pending[token]
            for _, context in expired:
                self.cancelled += 1
                log.info("cancelling a gRPC stream whose client took no message for %.0f s", self.timeout_s)
                context.cancel()

    def close(self) -> None:
        self._wake.set()


def grpc_server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Channel arguments of the gRPC server for the keepalive and idle limits in ``settings``."""
    return [
        ("grpc.keepalive_time_ms", int(settings.grpc_keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.max_connection_idle_ms", int(settings.grpc_max_connection_idle_s * 1000)),
        ("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.grpc_max_connection_age_grace_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
    ]
