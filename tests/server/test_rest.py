"""REST API tests through FastAPI's TestClient (httpx): auth, tenants, limits, errors, chunks, metrics."""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kvwire.server.config import ServiceSettings
from kvwire.server.jobs import InProcessJobQueue
from kvwire.server.rest import create_app
from kvwire.server.service import KvwireService
from kvwire.server.storage import Store

from .conftest import make_settings

ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}


@pytest.fixture
def client(service: KvwireService, settings: ServiceSettings) -> Iterator[TestClient]:
    with TestClient(create_app(service, settings), raise_server_exceptions=False) as c:
        yield c


def ingest(client: TestClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    r = client.post("/v1/contexts", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def assert_error(r: Any, status: int, type_: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"type", "message"} and err["message"]
    assert "Traceback" not in r.text
    if type_:
        assert err["type"] == type_
    return err


def test_health_needs_no_auth(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic alice-key"},
        {"Authorization": "Bearer"},
    ],
)
def test_auth_required(client: TestClient, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/v1/contexts/x"), ("POST", "/v1/contexts"), ("GET", "/v1/jobs/j")]:
        r = client.request(method, path, headers=headers, json={"text": "a"})
        assert_error(r, 401, "AuthError")
        assert r.headers["www-authenticate"] == "Bearer"


def test_ingest_manifest_chunk_round_trip(client: TestClient, service: KvwireService) -> None:
    manifest = ingest(client, ALICE, token_ids=list(range(100)), context_id="ctx-1")
    assert manifest["context_id"] == "ctx-1" and manifest["tenant"] == "alice"
    assert manifest["total_tokens"] == 100 and len(manifest["chunks"]) == 2
    assert client.get("/v1/contexts/ctx-1", headers=ALICE).json() == manifest

    entry = manifest["chunks"][1]["levels"][0]
    r = client.get("/v1/contexts/ctx-1/chunks/1", params={"level": entry["level"]}, headers=ALICE)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert f"{zlib.crc32(r.content):08x}" == entry["checksum"] == r.headers["x-kvwire-checksum"]
    assert r.headers["etag"] == f'"{entry["checksum"]}"' and len(r.content) == entry["nbytes"]
    assert r.content == service.store.get(entry["key"])

    again = client.get(
        "/v1/contexts/ctx-1/chunks/1",
        params={"level": 0},
        headers={**ALICE, "If-None-Match": r.headers["etag"]},
    )
    assert again.status_code == 304 and again.content == b""
    other = client.get(
        "/v1/contexts/ctx-1/chunks/1", params={"level": 0}, headers={**ALICE, "If-None-Match": '"0"'}
    )
    assert other.status_code == 200

    default = client.get("/v1/contexts/ctx-1/chunks/0", headers=ALICE)
    assert default.headers["x-kvwire-level"] == str(manifest["default_level"])

    profile = client.get(f"/v1/profiles/{manifest['profile_digest']}", headers=ALICE)
    assert profile.status_code == 200 and profile.content.startswith(b"FAKEPROFILE")


@pytest.mark.parametrize("blocks", [False, True])
def test_auth_runs_on_the_event_loop_unless_it_waits_on_redis(
    service: KvwireService, settings: ServiceSettings, monkeypatch: pytest.MonkeyPatch, blocks: bool
) -> None:
    """A chunk request takes one thread hop (its store read), not a second one for the key check;
    a check that waits on a shared Redis rate limit still goes to the thread pool."""
    app = create_app(service, settings)
    access = app.state.access
    threads: list[str] = []
    admit = access.admit
    monkeypatch.setattr(type(access), "admit_blocks", property(lambda self: blocks))
    monkeypatch.setattr(
        access, "admit", lambda h: threads.append(threading.current_thread().name) or admit(h)
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        manifest = ingest(client, ALICE, token_ids=[1, 2, 3], context_id="hop")
        loop_thread = client.portal.call(lambda: threading.current_thread().name)  # type: ignore[union-attr]
        r = client.get("/v1/contexts/hop/chunks/0", headers=ALICE)
        assert r.status_code == 200 and len(r.content) == manifest["chunks"][0]["levels"][0]["nbytes"]
        assert_error(client.get("/v1/contexts/hop/chunks/0", headers={"Authorization": "Bearer x"}), 401)
    assert len(threads) == 3
    assert all((name != loop_thread) == blocks for name in threads), (threads, loop_thread)


def test_text_ingest(client: TestClient) -> None:
    manifest = ingest(client, BOB, text="The quick brown fox. " * 4)
    assert manifest["context_id"].startswith("ctx-") and manifest["tenant"] == "bob"
    assert "".join(c["text"] for c in manifest["chunks"]) == "The quick brown fox. " * 4


def test_tenants_are_isolated(client: TestClient) -> None:
    manifest = ingest(client, ALICE, token_ids=[1, 2, 3], context_id="secret")
    assert_error(client.get("/v1/contexts/secret", headers=BOB), 404, "NotFoundError")
    assert_error(client.get("/v1/contexts/secret/chunks/0", headers=BOB), 404)
    assert_error(client.delete("/v1/contexts/secret", headers=BOB), 404)
    assert client.get("/v1/contexts/secret", headers=ALICE).json() == manifest
    # Bob may use the same id for his own context.
    ingest(client, BOB, token_ids=[4, 5], context_id="secret")
    assert client.get("/v1/contexts/secret", headers=ALICE).json()["total_tokens"] == 3


def test_async_job(client: TestClient) -> None:
    r = client.post("/v1/contexts", json={"token_ids": [7] * 300, "context_id": "long"}, headers=ALICE)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert_error(client.get(f"/v1/jobs/{job['id']}", headers=BOB), 404)
    deadline = time.monotonic() + 20
    while job["state"] not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.02)
        job = client.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()
    assert job["state"] == "done" and job["chunks_done"] == job["chunks_total"] == 5
    assert client.get("/v1/contexts/long", headers=ALICE).json()["total_tokens"] == 300


def test_unknown_ids_are_404(client: TestClient) -> None:
    ingest(client, ALICE, token_ids=[1, 2, 3], context_id="c")
    for path in [
        "/v1/contexts/nope",
        "/v1/contexts/nope/chunks/0",
        "/v1/contexts/c/chunks/5",
        "/v1/jobs/job-nope",
        "/v1/profiles/" + "0" * 64,
        "/v1/profiles/not-hex",
        "/v1/no-such-route",
    ]:
        assert_error(client.get(path, headers=ALICE), 404, "NotFoundError")
    assert_error(client.get("/v1/contexts/c/chunks/0", params={"level": 9}, headers=ALICE), 404)
    assert client.get("/v1/contexts/c/chunks/0", headers=ALICE).status_code == 200  # manifest now cached
    assert client.delete("/v1/contexts/c", headers=ALICE).status_code == 204
    assert_error(client.get("/v1/contexts/c", headers=ALICE), 404)
    assert_error(client.get("/v1/contexts/c/chunks/0", headers=ALICE), 404)
    again = ingest(client, ALICE, token_ids=list(range(100)), context_id="c")  # re-ingested, replaced
    assert client.get("/v1/contexts/c", headers=ALICE).json() == again
    assert client.get("/v1/contexts/c/chunks/1", headers=ALICE).status_code == 200


def test_bad_input_is_400(client: TestClient) -> None:
    for body in [{}, {"text": "a", "token_ids": [1]}, {"token_ids": []}, {"token_ids": ["x"]}, {"text": 5}]:
        assert_error(client.post("/v1/contexts", json=body, headers=ALICE), 400, "InvalidInputError")
    assert_error(client.post("/v1/contexts", json={"text": "a", "context_id": "a/b"}, headers=ALICE), 400)
    assert_error(client.post("/v1/contexts", json={"token_ids": [1, 100000]}, headers=ALICE), 400)
    r = client.post(
        "/v1/contexts", content=b"{not json", headers={**ALICE, "Content-Type": "application/json"}
    )
    assert_error(r, 400)
    assert_error(client.get("/v1/contexts/c/chunks/x", headers=ALICE), 400)


def test_size_limits_are_413(client: TestClient, settings: ServiceSettings) -> None:
    big = {"text": "x" * (settings.max_request_bytes + 1)}
    assert_error(client.post("/v1/contexts", json=big, headers=ALICE), 413, "LimitExceededError")

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield b'{"text": "'
        for _ in range(settings.max_request_bytes // 1000 + 1):
            yield b"y" * 1000
        yield b'"}'

    r = client.post("/v1/contexts", content=chunked(), headers={**ALICE, "Content-Type": "application/json"})
    assert_error(r, 413, "LimitExceededError")
    # Within the byte limit but over the token limit.
    assert_error(client.post("/v1/contexts", json={"token_ids": [1] * 2001}, headers=ALICE), 413)
    assert_error(client.post("/v1/contexts", json={"text": "z" * 2001}, headers=ALICE), 413)
    assert 'route="unmatched",status="413"} 2.0' in client.get("/metrics").text  # refused, still counted


def test_queue_full_is_429(store: Store, worker: Any, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_pending_jobs=1)
    service = KvwireService(store, InProcessJobQueue(max_pending=1), settings, worker)  # no worker thread
    with TestClient(create_app(service, settings)) as client:
        assert client.post("/v1/contexts", json={"token_ids": [1] * 300}, headers=ALICE).status_code == 202
        r = client.post("/v1/contexts", json={"token_ids": [1] * 300}, headers=ALICE)
        assert_error(r, 429, "RateLimitError")
        assert r.headers["retry-after"]


def test_backend_down_is_503(worker: Any, tmp_path: Path) -> None:
    from kvwire.server.storage.redis import RedisStore

    from ..storage.conftest import free_port

    settings = make_settings(tmp_path)
    down = RedisStore(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.5, retries=0)
    service = KvwireService(down, InProcessJobQueue(), settings, worker=None)
    with TestClient(create_app(service, settings)) as client:
        err = assert_error(client.get("/v1/contexts/c", headers=ALICE), 503, "BackendUnavailableError")
        assert "redis at 127.0.0.1" in err["message"]
        assert_error(client.get("/readyz"), 503, "BackendUnavailableError")
        assert client.get("/healthz").status_code == 200


def test_metrics(client: TestClient) -> None:
    manifest = ingest(client, ALICE, token_ids=list(range(10)), context_id="m")
    chunk = client.get("/v1/contexts/m/chunks/0", headers=ALICE)
    text = client.get("/metrics").text
    assert (
        'kvwire_http_requests_total{method="GET",route="/v1/contexts/{context_id}/chunks/{index}",status="200"}'
        in text
    )
    assert f"kvwire_chunk_bytes_served_total {float(len(chunk.content))}" in text
    assert 'kvwire_ingest_requests_total{outcome="inline"} 1.0' in text
    assert 'kvwire_ingest_jobs{state="done"}' in text
    assert "kvwire_http_request_seconds_bucket" in text
    assert manifest["chunks"]


def test_openapi_documents_binary_chunks(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    chunk = spec["paths"]["/v1/contexts/{context_id}/chunks/{index}"]["get"]
    assert chunk["responses"]["200"]["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    assert "304" in chunk["responses"] and "404" in chunk["responses"]
    post = spec["paths"]["/v1/contexts"]["post"]["responses"]
    assert {"201", "202", "400", "401", "413", "429", "503"} <= set(post)
    assert "ContextManifest" in spec["components"]["schemas"] and "Job" in spec["components"]["schemas"]
