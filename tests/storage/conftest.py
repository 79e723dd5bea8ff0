"""Fixtures that start real servers on free loopback ports and always stop them.

* ``redis_url``: one redis-server (no persistence, ``allkeys-lru`` under a 1 GiB ``maxmemory``);
* ``redis_cluster_url``: a 3-master Redis Cluster built with ``redis-cli --cluster create``;
* ``s3_endpoint``: moto's S3 server (``ThreadedMotoServer``) in this process;
* ``store``: a fresh, empty store of each backend, parametrized so one suite covers them all.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvwire.server.storage import LocalStore, Store

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
S3_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, with_cluster_bus: bool = False) -> int:
    """A free loopback port (and port + 10000, for a cluster node's bus, if asked)."""
    for _ in range(200):
        port = random.randint(20000, 39999)
        if _bindable(port) and (not with_cluster_bus or _bindable(port + 10000)):
            return port
    raise RuntimeError("no free port found")


def _ping(port: int) -> bool:
    try:
        out = subprocess.run(
            [REDIS_CLI or "redis-cli", "-h", "127.0.0.1", "-p", str(port), "PING"],
            capture_output=True,
            text=True,
            timeout=2,
        )
    except subprocess.TimeoutExpired:
        return False
    return out.stdout.strip() == "PONG"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def redis_server(workdir: Path, *extra: str, port: int | None = None) -> Iterator[int]:
    """Run one redis-server on a free port in ``workdir`` until the block ends; yield its port."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server / redis-cli not installed")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    cmd += ["--daemonize", "no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log"), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (workdir / "redis.log").read_text() if (workdir / "redis.log").exists() else ""
                raise RuntimeError(f"redis-server on port {port} did not start:\n{log[-2000:]}")
            time.sleep(0.05)
        yield port
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("redis")
    with redis_server(workdir, "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru") as port:
        yield f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def redis_cluster(root: Path, masters: int = 3) -> Iterator[list[int]]:
    """Run a Redis Cluster of ``masters`` nodes (no replicas) until the block ends; yield the ports."""
    ports: list[int] = []
    while len(ports) < masters:
        port = free_port(with_cluster_bus=True)
        if port not in ports:
            ports.append(port)
    with contextlib.ExitStack() as stack:
        for port in ports:
            node = root / str(port)
            args = ["--cluster-enabled", "yes", "--cluster-config-file", str(node / "nodes.conf")]
            args += ["--cluster-node-timeout", "2000", "--maxmemory", "512mb"]
            args += ["--maxmemory-policy", "allkeys-lru"]
            stack.enter_context(redis_server(node, *args, port=port))
        create = [REDIS_CLI or "redis-cli", "--cluster", "create"]
        create += [f"127.0.0.1:{p}" for p in ports] + ["--cluster-replicas", "0", "--cluster-yes"]
        out = subprocess.run(create, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
        deadline = time.monotonic() + 15
        for port in ports:
            while True:
                info = subprocess.run(
                    [REDIS_CLI or "redis-cli", "-p", str(port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    timeout=2,
                ).stdout
                if "cluster_state:ok" in info:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {port} never reached cluster_state:ok:\n{info}")
                time.sleep(0.1)
        yield ports


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as ports:
        yield f"redis://127.0.0.1:{ports[0]}/0"


def shutdown_redis(port: int) -> None:
    """Stop a redis-server started by these fixtures abruptly (its fixture still reaps the process)."""
    subprocess.run(
        [REDIS_CLI or "redis-cli", "-p", str(port), "SHUTDOWN", "NOSAVE"], capture_output=True, timeout=5
    )


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed")
    ThreadedMotoServer = moto_server.ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path, **options: Any) -> Store:
    """A fresh store of ``kind`` in its own namespace/prefix/directory (servers from the fixtures)."""
    tag = "t" + uuid.uuid4().hex[:12]
    if kind == "local":
        return LocalStore(tmp_path / "store", **options)
    if kind in ("redis", "redis-cluster"):
        from kvwire.server.storage.redis import RedisClusterStore, RedisStore

        if kind == "redis":
            return RedisStore(request.getfixturevalue("redis_url"), namespace=tag, **options)
        url = request.getfixturevalue("redis_cluster_url")
        return RedisClusterStore(url, namespace=tag, **options)
    if kind == "s3":
        from kvwire.server.storage.s3 import S3Store

        endpoint = request.getfixturevalue("s3_endpoint")
        return S3Store(
            "kvwire-test", endpoint_url=endpoint, prefix=tag, create_bucket=True, **S3_CREDENTIALS, **options
        )
    if kind == "tiered":
        from kvwire.server.storage.tiered import TieredStore

        hot = make_store("redis", request, tmp_path)
        cold = make_store("s3", request, tmp_path)
        return TieredStore(hot, cold, hot_ttl_s=60)
    raise ValueError(kind)


BACKENDS = [
    pytest.param("local", id="local"),
    pytest.param("redis", id="redis", marks=pytest.mark.integration),
    pytest.param("redis-cluster", id="redis-cluster", marks=pytest.mark.integration),
    pytest.param("s3", id="s3", marks=pytest.mark.integration),
    pytest.param("tiered", id="tiered", marks=pytest.mark.integration),
]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = make_store(request.param, request, tmp_path)
    try:
        yield s
    finally:
        try:
            s.delete_prefix("")  # frees server memory between tests; each store has its own namespace
        finally:
            s.close()
