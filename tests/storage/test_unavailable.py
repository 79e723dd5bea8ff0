"""A backend that is down fails fast with BackendUnavailableError naming it, never a raw client error."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvwire.errors import BackendUnavailableError
from kvwire.server.storage import LocalStore
from kvwire.server.storage.redis import RedisClusterStore, RedisStore
from kvwire.server.storage.s3 import S3Store
from kvwire.server.storage.tiered import TieredStore

from .conftest import S3_CREDENTIALS, free_port, redis_cluster, redis_server, shutdown_redis

pytestmark = pytest.mark.integration
LIMIT_S = 5.0


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections (into the backlog) but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


def test_redis_closed_port() -> None:
    port = free_port()
    store = RedisStore(f"redis://127.0.0.1:{port}/0", connect_timeout_s=1)
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError, match=f"redis at 127.0.0.1:{port}"):
        store.get("k")
    with pytest.raises(BackendUnavailableError):
        store.health()
    assert time.monotonic() - start < LIMIT_S


def test_redis_that_never_answers_times_out(silent_port: int) -> None:
    store = RedisStore(f"redis://127.0.0.1:{silent_port}/0", socket_timeout_s=0.5, connect_timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="Timeout"):
        store.put("k", b"v")
    assert time.monotonic() - start < LIMIT_S


def test_redis_killed_mid_session(tmp_path: Path) -> None:
    with redis_server(tmp_path / "doomed") as port:
        store = RedisStore(f"redis://127.0.0.1:{port}/0", connect_timeout_s=1)
        store.put("k", b"v")
        assert store.get("k") == b"v"
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError, match=str(port)):
        store.get("k")
    assert time.monotonic() - start < LIMIT_S


def test_redis_cluster_closed_port() -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError, match=f"redis-cluster at 127.0.0.1:{port}"):
        RedisClusterStore(f"redis://127.0.0.1:{port}/0", connect_timeout_s=1)
    assert time.monotonic() - start < LIMIT_S


def test_redis_cluster_node_killed_mid_session(tmp_path: Path) -> None:
    with redis_cluster(tmp_path) as ports:
        store = RedisClusterStore(f"redis://127.0.0.1:{ports[0]}/0", connect_timeout_s=1, socket_timeout_s=1)
        keys = [f"ctx-{i}/0" for i in range(30)]  # spread over all three masters
        store.put_many(dict.fromkeys(keys, b"v"))
        shutdown_redis(ports[1])
        start = time.monotonic()
        with pytest.raises(BackendUnavailableError, match="redis-cluster at"):
            store.get_many(keys)
        with pytest.raises(BackendUnavailableError):
            store.put_many(dict.fromkeys(keys, b"w"))
        assert time.monotonic() - start < LIMIT_S
        store.close()


def test_s3_closed_port() -> None:
    port = free_port()
    store = S3Store("b", endpoint_url=f"http://127.0.0.1:{port}", connect_timeout_s=1, **S3_CREDENTIALS)
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError, match=f"127.0.0.1:{port}"):
        store.get("k")
    with pytest.raises(BackendUnavailableError):
        store.put("k", b"v")
    assert time.monotonic() - start < LIMIT_S
    store.close()


def test_s3_missing_bucket_is_unavailable_not_not_found(s3_endpoint: str) -> None:
    store = S3Store("no-such-bucket", endpoint_url=s3_endpoint, **S3_CREDENTIALS)
    with pytest.raises(BackendUnavailableError, match="NoSuchBucket"):
        store.put("k", b"v")
    store.close()


def test_tiered_survives_a_down_hot_tier(tmp_path: Path) -> None:
    hot = RedisStore(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.5)
    store = TieredStore(hot, LocalStore(tmp_path), hot_ttl_s=10)
    store.put("k", b"v")
    assert store.get("k") == b"v"
    assert store.exists("k")
    store.health()
    assert store.delete("k")
