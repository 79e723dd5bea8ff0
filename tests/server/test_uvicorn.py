"""The REST app behind a real uvicorn server on a loopback port, driven by plain httpx."""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from kvwire.server.config import ServiceSettings
from kvwire.server.rest import create_app
from kvwire.server.service import KvwireService

from ..storage.conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def base_url(service: KvwireService, settings: ServiceSettings) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(create_app(service, settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_over_tcp(base_url: str, settings: ServiceSettings) -> None:
    headers = {"Authorization": "Bearer alice-key"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=10) as client:
        r = client.post("/v1/contexts", json={"text": "over the wire " * 5, "context_id": "tcp"})
        assert r.status_code == 201, r.text
        entry = r.json()["chunks"][0]["levels"][-1]
        chunk = client.get("/v1/contexts/tcp/chunks/0", params={"level": entry["level"]})
        assert chunk.status_code == 200 and f"{zlib.crc32(chunk.content):08x}" == entry["checksum"]

        def body() -> Iterator[bytes]:  # streamed without Content-Length
            yield b'{"text": "'
            for _ in range(settings.max_request_bytes // 4096 + 1):
                yield b"q" * 4096
            yield b'"}'

        big = client.post("/v1/contexts", content=body(), headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and big.json()["error"]["type"] == "LimitExceededError"
        assert client.get("/healthz", headers={"Authorization": ""}).status_code == 200
        assert client.get("/v1/contexts/tcp", headers={"Authorization": "Bearer nope"}).status_code == 401
