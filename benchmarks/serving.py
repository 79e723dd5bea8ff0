"""Serving benchmark (issue 4): stored chunks over loopback, per backend, next to raw redis-py GETs.

Usage: ``python benchmarks/serving.py [--seconds 1.5] [--chunks 8] [--concurrency 1,8] --out FILE``.

Starts its own redis-server on a free loopback port, moto's S3 server (``ThreadedMotoServer``) and a
local store in a temp dir; seeds, per payload size, a context of ``--chunks`` random chunks (a real
``ContextManifest`` under ``manifest_key``, no model); serves each backend (local, redis, s3, tiered
= redis over s3) with the REST app under uvicorn in this process (API keys on, as deployed) and
drives it from a client *process* (so client and server do not share a GIL) with 1 and 8 threads,
one keep-alive httpx connection each. Raw redis-py GETs of the same payloads run from the same
client process at the same concurrency. Prints a Markdown table and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TENANT, API_KEY = "bench", "bench-key"
LEVEL = 2
CHUNK_TOKENS = 256
SIZES = {"64KiB": 64 * 1024, "1MiB": 1024 * 1024, "8MiB": 8 * 1024 * 1024}
S3_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}


@dataclass(frozen=True)
class Cell:
    """One measured row: ``requests`` requests of ``nbytes`` each in ``seconds``."""

    backend: str
    transport: str
    size: str
    concurrency: int
    requests: int
    nbytes: int
    seconds: float
    raw_rps: float | None = None  # raw redis-py GETs of the same size and concurrency, run just before

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def mb_s(self) -> float:
        return self.requests * self.nbytes / self.seconds / 1e6


# ------------------------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[int]:
    """Our own redis-server (no persistence) on a free loopback port, stopped when the block ends."""
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    cmd += ["--dir", str(workdir), "--logfile", str(workdir / "redis.log")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.05)
        client.close()
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per S3 request

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def rest_server(store: Any, http: str = "auto") -> Iterator[str]:
    """The REST app over ``store`` under uvicorn in a background thread; yields its base URL."""
    import uvicorn

    from kvwire.server.config import ServiceSettings
    from kvwire.server.jobs import InProcessJobQueue
    from kvwire.server.rest import create_app
    from kvwire.server.service import KvwireService

    settings = ServiceSettings(api_keys=f"{TENANT}:{API_KEY}")
    service = KvwireService(store, InProcessJobQueue(), settings, worker=None)
    port = free_port()
    config = uvicorn.Config(
        create_app(service, settings),
        host="127.0.0.1",
        port=port,
        http=http,  # type: ignore[arg-type]
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def grpc_server(store: Any) -> Iterator[str]:
    """The gRPC API over ``store`` (``kvwire.server.grpc_server``) on a free port; yields its address."""
    from kvwire.server.config import ServiceSettings
    from kvwire.server.grpc_server import serve_grpc
    from kvwire.server.jobs import InProcessJobQueue
    from kvwire.server.service import KvwireService

    settings = ServiceSettings(api_keys=f"{TENANT}:{API_KEY}")
    service = KvwireService(store, InProcessJobQueue(), settings, worker=None)
    server = serve_grpc(service, settings, 0)
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(grace_s=None)


# ------------------------------------------------------------------------------------ seeding


def seed(store: Any, payloads: dict[str, list[bytes]], manifest_chunks: int) -> None:
    """Per size, a context ``bench-<size>`` of ``manifest_chunks`` chunks (at level ``LEVEL``) whose
    bitstreams cycle through ``payloads[size]``: a long context's manifest without its storage."""
    from kvwire.manifest import ChunkEntry, ContextManifest, LevelEntry
    from kvwire.server.service import chunk_key, crc32_hex, manifest_key

    rng = random.Random(0)
    for size, chunks in payloads.items():
        keys = [
            chunk_key(TENANT, "f" * 64, f"{size.lower()}{i:06d}".ljust(32, "0"), 1, LEVEL)
            for i in range(len(chunks))
        ]
        store.put_many(zip(keys, chunks, strict=True))
        entries = []
        for i in range(manifest_chunks):
            key, data = keys[i % len(chunks)], chunks[i % len(chunks)]
            ids = [rng.randrange(49152) for _ in range(CHUNK_TOKENS)]  # a realistic manifest size
            entries.append(
                ChunkEntry(
                    index=i,
                    token_start=i * CHUNK_TOKENS,
                    token_end=(i + 1) * CHUNK_TOKENS,
                    token_ids=ids,
                    text="x" * (4 * CHUNK_TOKENS),
                    levels=[LevelEntry(LEVEL, key, len(data), crc32_hex(data))],
                )
            )
        manifest = ContextManifest(
            context_id=f"bench-{size}",
            tenant=TENANT,
            model_fingerprint="f" * 64,
            profile_digest="0" * 64,
            codec_version=1,
            chunk_tokens=CHUNK_TOKENS,
            total_tokens=manifest_chunks * CHUNK_TOKENS,
            levels=[LEVEL],
            default_level=LEVEL,
            chunks=entries,
        )
        store.put(manifest_key(TENANT, manifest.context_id), manifest.to_json())


# ------------------------------------------------------------------------------------- client


def drive(kind: str, target: str, keys: list[str], nbytes: int, threads: int, seconds: float) -> int:
    """Run in the client process: ``threads`` threads GET ``keys`` round-robin for ``seconds``
    (after a short warm-up); return the number of complete responses of ``nbytes`` bytes."""
    import httpx
    import redis

    start = threading.Barrier(threads + 1)
    counts = [0] * threads
    errors: list[BaseException] = []
    warmup_end = [0.0]
    deadline = [0.0]

    def run(n: int) -> None:
        try:
            if kind == "REST":
                client: Any = httpx.Client(
                    base_url=target, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
                )
                fetch = lambda key: client.get(key).content  # noqa: E731
            elif kind in ("gRPC", "gRPC-stream"):
                client, fetch = grpc_fetch(kind, target)
            else:
                client = redis.Redis.from_url(target)
                fetch = client.get
            with client:
                i = n
                fetch(keys[i % len(keys)])
                start.wait()
                while time.perf_counter() < warmup_end[0]:
                    fetch(keys[i % len(keys)])
                    i += 1
                while time.perf_counter() < deadline[0]:
                    data = fetch(keys[i % len(keys)])
                    if len(data) != nbytes:
                        raise RuntimeError(f"got {len(data)} bytes, expected {nbytes}")
                    counts[n] += 1
                    i += 1
        except BaseException as exc:
            errors.append(exc)
            with contextlib.suppress(threading.BrokenBarrierError):
                start.abort()

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    now = time.perf_counter()
    warmup_end[0], deadline[0] = now + min(0.3, seconds / 4), now + min(0.3, seconds / 4) + seconds
    with contextlib.suppress(threading.BrokenBarrierError):
        start.wait()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return sum(counts)


def grpc_fetch(kind: str, target: str) -> tuple[Any, Any]:
    """A channel and ``fetch(key) -> bytes`` for keys ``<context_id>/<index>``: ``GetChunk`` per key,
    or (``gRPC-stream``) the next message of a ``StreamContext`` at ``LEVEL``, reopened at its end."""
    import grpc

    from kvwire._proto import CHANNEL_OPTIONS
    from kvwire._proto import kvwire_pb2 as pb
    from kvwire._proto import kvwire_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    stub = pb_grpc.KvwireStub(channel)
    auth = (("authorization", f"Bearer {API_KEY}"),)
    if kind == "gRPC":

        def get_chunk(key: str) -> bytes:
            context_id, index = key.rsplit("/", 1)
            request = pb.GetChunkRequest(context_id=context_id, index=int(index), level=LEVEL)
            data: bytes = stub.GetChunk(request, metadata=auth).data
            return data

        return channel, get_chunk
    stream: list[Any] = []

    def next_message(key: str) -> bytes:
        context_id = key.rsplit("/", 1)[0]
        while True:
            if not stream:
                request = pb.StreamRequest(context_id=context_id, fixed_level=LEVEL)
                stream.append(stub.StreamContext(request, metadata=auth))
            message = next(stream[0], None)
            if message is not None:
                data: bytes = message.data
                return data
            stream.clear()

    return channel, next_message


# --------------------------------------------------------------------------------------- main


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def uvicorn_http(choice: str) -> str:
    """The HTTP implementation uvicorn runs for ``--http choice`` (auto: httptools if installed)."""
    import importlib.util

    if choice == "auto":
        choice = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return choice


def grpc_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("kvwire.server.grpc_server") is not None


def table(cells: list[Cell], todo: list[str]) -> str:
    lines = [
        "| backend | transport | size | concurrency | req/s | MB/s | raw Redis req/s | overhead vs raw "
        "Redis |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        raw, overhead = "—", "—"
        if c.raw_rps is not None:
            raw, overhead = f"{c.raw_rps:,.0f}", f"{c.raw_rps / c.rps - 1:+.0%}"
        row = f"| {c.backend} | {c.transport} | {c.size} | {c.concurrency} | {c.rps:,.0f} | {c.mb_s:,.0f} |"
        lines.append(f"{row} {raw} | {overhead} |")
    lines += [f"| {t} | gRPC | — | — | TODO | TODO | TODO | TODO |" for t in todo]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="measured seconds per cell")
    parser.add_argument("--chunks", type=int, default=8, help="distinct stored chunks per size")
    parser.add_argument(
        "--context-tokens", type=int, default=32768, help=f"manifest length ({CHUNK_TOKENS}-token chunks)"
    )
    parser.add_argument("--concurrency", default="1,8", help="client threads (connections), comma-separated")
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"payload sizes among {list(SIZES)}")
    parser.add_argument("--backends", default="local,redis,s3,tiered")
    parser.add_argument(
        "--http", default="auto", choices=["auto", "h11", "httptools"], help="uvicorn's HTTP implementation"
    )
    parser.add_argument("--out", type=Path, help="write the Markdown table (and run notes) here")
    args = parser.parse_args(argv)
    manifest_chunks = max(1, args.context_tokens // CHUNK_TOKENS)
    if shutil.which("redis-server") is None:
        parser.error("redis-server is not installed")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    sizes = [s for s in args.sizes.split(",") if s]
    backends = [b for b in args.backends.split(",") if b]
    rng = random.Random(1)
    payloads = {s: [rng.randbytes(SIZES[s]) for _ in range(args.chunks)] for s in sizes}

    from kvwire.server.storage import LocalStore, TieredStore
    from kvwire.server.storage.redis import RedisStore
    from kvwire.server.storage.s3 import S3Store

    load_before = load_average()
    began = time.perf_counter()
    cells: list[Cell] = []
    spawn = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="kvwire-servebench-") as tmp,
        redis_server(Path(tmp)) as redis_port,
        s3_server() as s3_url,
        concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as client,
    ):
        redis_url = f"redis://127.0.0.1:{redis_port}/0"

        def measure(backend: str, transport: str, target: str, keys: list[str], size: str, n: int) -> Cell:
            raw_rps = None
            if transport != "redis-py":  # pair every cell with a raw run: the machine's load drifts
                raw_rps = measure("redis", "redis-py", redis_url, raw_keys[size], size, n).rps
            count = client.submit(drive, transport, target, keys, SIZES[size], n, args.seconds).result()
            cell = Cell(backend, transport, size, n, count, SIZES[size], args.seconds, raw_rps)
            print(
                f"  {backend:7} {transport:9} {size:6} c={n}: {cell.rps:8,.0f} req/s {cell.mb_s:8,.0f} MB/s"
            )
            return cell

        # Raw redis-py GETs of the same payloads: the baseline.
        import redis

        with redis.Redis.from_url(redis_url) as r:
            for size, chunks in payloads.items():
                for i, data in enumerate(chunks):
                    r.set(f"raw:{size}:{i}", data)
        raw_keys = {size: [f"raw:{size}:{i}" for i in range(args.chunks)] for size in sizes}
        for size in sizes:
            for n in concurrency:
                cells.append(measure("redis", "redis-py", redis_url, raw_keys[size], size, n))

        def open_backend(name: str) -> Any:
            def s3(prefix: str) -> S3Store:
                return S3Store("kvwire-bench", endpoint_url=s3_url, prefix=prefix, create_bucket=True,
                               **S3_CREDENTIALS)  # fmt: skip

            if name == "local":
                return LocalStore(Path(tmp) / "local")
            if name == "redis":
                return RedisStore(redis_url, namespace="bench-redis")
            if name == "s3":
                return s3("s3")
            if name == "tiered":
                return TieredStore(RedisStore(redis_url, namespace="bench-tiered"), s3("tiered"))
            raise SystemExit(f"unknown backend {name!r}")

        for name in backends:
            with open_backend(name) as store:
                seed(store, payloads, manifest_chunks)
                with rest_server(store, args.http) as url:
                    for size in sizes:
                        paths = [f"{url}/v1/contexts/bench-{size}/chunks/{i}" for i in range(manifest_chunks)]
                        for n in concurrency:
                            cells.append(measure(name, "REST", url, paths, size, n))
                if grpc_available():
                    with grpc_server(store) as address:
                        for size in sizes:
                            keys = [f"bench-{size}/{i}" for i in range(manifest_chunks)]
                            for transport in ("gRPC", "gRPC-stream"):
                                for n in concurrency:
                                    cells.append(measure(name, transport, address, keys, size, n))
        todo = [] if grpc_available() else [f"{b} (GetChunk, StreamContext)" for b in backends]
    load_after = load_average()
    notes = [
        f"- Command: `python benchmarks/serving.py --seconds {args.seconds} --chunks {args.chunks} "
        f"--context-tokens {args.context_tokens} --concurrency {args.concurrency} --http {args.http}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; load average (1/5/15 min) "
        f"before {load_before}, after {load_after}; {time.perf_counter() - began:.0f} s in all.",
        f"- Contexts: {manifest_chunks} chunks of {CHUNK_TOKENS} tokens in the manifest, cycling through "
        f"{args.chunks} distinct random payloads per size. Client: one separate process, N threads with "
        f"one keep-alive connection each; server: uvicorn {uvicorn_http(args.http)} (in-process "
        "thread, API key auth, no access log); redis-server and moto S3 (in-process) on loopback.",
        "- overhead vs raw Redis = raw redis-py req/s / service req/s − 1, the raw GETs (same size and "
        "concurrency) run just before each service cell, since the machine's load drifts.",
        "- gRPC: `GetChunk` per chunk (sync grpcio server, in-process thread pool, API key auth); "
        "gRPC-stream: chunks received per second from `StreamContext` at a fixed level, each client "
        "thread one stream at a time, reopened when it ends.",
    ]
    if todo:
        notes.append(
            "- TODO: gRPC GetChunk and StreamContext: `kvwire.server.grpc_server` is not on main yet; "
            "rerun after `git merge main`."
        )
    text = table(cells, todo) + "\n\n" + "\n".join(notes) + "\n"
    print()
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
