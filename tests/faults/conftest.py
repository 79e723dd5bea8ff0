"""Fixtures for the fault tests: restartable servers, a tiny-model worker, and a store consistency check.

Every server here is a real process on a free loopback port that the test starts, kills and restarts
itself (``benchmarks/processes.py``); none is shared with other tests or with the machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.processes import MotoProcess, ProxyProcess, RedisProcess
from kvwire.manifest import ContextManifest
from kvwire.server.storage import Store

from ..server.conftest import tiny_llama

S3_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisProcess]:
    """A persistent redis-server (AOF, fsync always) of this test only, stopped at the end."""
    proc = RedisProcess(tmp_path / "redis", persist=True)
    proc.start()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture
def moto_proc(tmp_path: Path) -> Iterator[MotoProcess]:
    pytest.importorskip("moto.server", reason="moto[server] not installed")
    proc = MotoProcess(tmp_path / "moto")
    proc.start()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture
def s3_proxy(moto_proc: MotoProcess, tmp_path: Path) -> Iterator[ProxyProcess]:
    """A TCP proxy in front of ``moto_proc``: killing it makes S3 unreachable while its objects stay."""
    proc = ProxyProcess(tmp_path / "proxy", target_port=moto_proc.port)
    proc.start()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture(scope="session")
def model() -> Any:
    return tiny_llama()


def s3_store(endpoint: str, **options: Any) -> Store:
    from kvwire.server.storage.s3 import S3Store

    options = {"connect_timeout_s": 1.0, "read_timeout_s": 5.0, "retries": 1, **options}
    return S3Store("kvwire-faults", endpoint_url=endpoint, create_bucket=True, **S3_CREDENTIALS, **options)


def redis_store(url: str, **options: Any) -> Store:
    from kvwire.server.storage.redis import RedisStore

    options = {"socket_timeout_s": 2.0, "connect_timeout_s": 1.0, **options}
    return RedisStore(url, namespace="faults", **options)


def check_manifests(store: Store) -> list[ContextManifest]:
    """Every manifest in ``store`` parses and every chunk key it names exists; return the manifests."""
    manifests = []
    for key in store.list_keys("t"):
        if "/contexts/" not in key:
            continue
        manifest = ContextManifest.from_json(store.get(key))
        missing = [lv.key for c in manifest.chunks for lv in c.levels if not store.exists(lv.key)]
        assert not missing, f"manifest {key} points at missing chunks: {missing[:3]}"
        assert store.exists(f"profiles/{manifest.profile_digest}"), f"manifest {key}: profile missing"
        manifests.append(manifest)
    return manifests


def on_nth_put(store: Store, n: int, action: Callable[[], None]) -> list[int]:
    """Run ``action`` just before the ``n``-th ``put_many`` on ``store`` (1-based) goes through.

    The worker writes one ``put_many`` per chunk and the manifest last (``put``), so ``n`` picks the
    chunk during whose write the fault lands. Returns a list holding the number of calls so far.
    """
    calls = [0]
    inner = store.put_many

    def put_many(items: Any, ttl_s: float | None = None) -> None:
        calls[0] += 1
        if calls[0] == n:
            action()
        inner(items, ttl_s)

    store.put_many = put_many  # type: ignore[method-assign]
    return calls
