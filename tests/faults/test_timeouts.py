"""Stalled clients against a real ``kvwire serve``: they lose their connection, nobody else waits.

The server runs with 1-second timeouts and 4 gRPC threads, so that a handful of stalled clients would
exhaust it if the timeouts were missing.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from benchmarks.processes import KvwireProcess, RedisProcess
from kvwire._proto import kvwire_pb2 as pb

from .test_server_faults import (
    AUTH,
    GRPC_AUTH,
    fetch_all,
    grpc_stub,
    ingest,
    open_test_store,
    put_big_context,
    server_env,
    start_server,
)

pytestmark = pytest.mark.integration

BIG_CHUNK = 24 << 20  # more than loopback socket buffers hold, so an unread response stays in the server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model: Any) -> Iterator[KvwireProcess]:
    """One server for the module (each test leaves it as it found it)."""
    tmp_path = tmp_path_factory.mktemp("timeouts")
    redis = RedisProcess(tmp_path / "redis", persist=False)
    redis.start()
    env = server_env(
        "local",
        tmp_path,
        redis,
        KVWIRE_HTTP_READ_TIMEOUT_S="1",
        KVWIRE_HTTP_SEND_TIMEOUT_S="1",
        KVWIRE_GRPC_SEND_TIMEOUT_S="1",
        KVWIRE_GRPC_MAX_WORKERS="4",
    )
    store = open_test_store(env)
    ingest(store, model, tmp_path, "small")
    put_big_context(store, "big", chunks=1, nbytes=BIG_CHUNK)
    put_big_context(store, "many", chunks=8, nbytes=4 << 20)
    store.close()
    try:
        proc = start_server(tmp_path, env)
        try:
            yield proc
        finally:
            proc.kill()
    finally:
        redis.kill()


def closed_by_server(s: socket.socket, within_s: float) -> bool:
    """True if the server closes (EOF or reset) ``s`` within ``within_s`` seconds; drains what it sent."""
    s.settimeout(within_s)
    deadline = time.monotonic() + within_s
    try:
        while time.monotonic() < deadline:
            if not s.recv(1 << 20):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    return s


def test_half_requests_are_closed_and_others_served(server: KvwireProcess) -> None:
    silent = connect(server.port)  # connects, sends nothing
    headers = connect(server.port)
    headers.sendall(b"GET /v1/contexts/small HTTP/1.1\r\nHost: x\r\n")  # headers never end
    body = connect(server.port)
    body.sendall(b"POST /v1/contexts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    body.sendall(b'Authorization: Bearer alice-key\r\nContent-Length: 1000\r\n\r\n{"text": "')  # 990 short
    try:
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=5) as client:
            assert client.get("/v1/contexts/small").status_code == 200  # served meanwhile
        for s in (silent, headers, body):
            assert closed_by_server(s, within_s=5)
    finally:
        for s in (silent, headers, body):
            s.close()


def test_keep_alive_connection_with_a_half_next_request_is_closed(server: KvwireProcess) -> None:
    s = connect(server.port)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next request stalls half-way
        assert closed_by_server(s, within_s=5)
    finally:
        s.close()


def test_client_that_stops_reading_a_big_chunk_is_dropped(server: KvwireProcess) -> None:
    s = connect(server.port, rcvbuf=64 * 1024)
    try:
        s.sendall(
            b"GET /v1/contexts/big/chunks/0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-key\r\n\r\n"
        )
        time.sleep(3)  # reads nothing for 3 s; the server's send timeout is 1 s
        received = 0
        s.settimeout(5)
        try:
            while data := s.recv(1 << 20):
                received += len(data)
        except (ConnectionResetError, TimeoutError):
            pass
        assert received < BIG_CHUNK  # the server gave up and dropped the rest
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=10) as client:
            assert len(client.get("/v1/contexts/big/chunks/0").content) == BIG_CHUNK  # a reader gets it all
    finally:
        s.close()


def test_grpc_streams_nobody_reads_do_not_starve_the_server(server: KvwireProcess) -> None:
    """More stalled StreamContext calls than server threads: each is cancelled after the send timeout,
    and a Health / GetChunk call from another client is answered meanwhile."""
    stalled = []
    channels = []
    for _ in range(6):  # > KVWIRE_GRPC_MAX_WORKERS = 4
        channel, stub = grpc_stub(server)
        channels.append(channel)
        stalled.append(
            stub.StreamContext(pb.StreamRequest(context_id="many"), metadata=GRPC_AUTH, timeout=60)
        )
    try:
        channel, stub = grpc_stub(server)
        channels.append(channel)
        time.sleep(1.0)  # the streams fill their windows and block
        started = time.monotonic()
        assert stub.Health(pb.HealthRequest(), timeout=20).status == "ok"
        chunk = stub.GetChunk(pb.GetChunkRequest(context_id="small", index=0), metadata=GRPC_AUTH, timeout=20)
        assert chunk.data and time.monotonic() - started < 15
        # Every stream that got a thread and then stalled was cancelled by the server; the others
        # (queued behind them) were served once threads were free and the client read them.
        codes = []
        for call in stalled:
            try:
                assert sum(1 for _ in call) == 8
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}, codes
        assert codes.count(grpc.StatusCode.CANCELLED) >= 4, codes
    finally:
        for channel in channels:
            channel.close()


def test_small_context_still_served_over_rest(server: KvwireProcess, tmp_path: Path) -> None:
    from kvwire.manifest import ContextManifest

    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=10) as client:
        manifest = ContextManifest.from_json(client.get("/v1/contexts/small").content)
        assert len(fetch_all(client, manifest)) == len(manifest.chunks)
