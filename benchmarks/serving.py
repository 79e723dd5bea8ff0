"""Serving benchmark (issue 4): stored chunks over loopback, per backend, next to raw redis-py GETs.

Usage: ``python benchmarks/serving.py [--seconds 1.0] [--chunks 8] [--concurrency 1,8] [--workers 4]
--out FILE``.

Starts its own redis-server on a free loopback port, moto's S3 server (a subprocess) and a local store
in a temp dir; seeds, per payload size, a context of ``--chunks`` random chunks (a real
``ContextManifest`` under ``manifest_key``, no model); serves each backend (local, redis, s3, tiered
= redis over s3, tiered-local = redis over local disk) with the REST app under uvicorn in this
process, with the protocol, timeouts and malloc thresholds ``kvwire serve`` uses (API keys on), then
with the gRPC server, and drives each from client
*processes*: N connections are N processes with one keep-alive connection each (``http.client``,
the lightest Python HTTP client, or a grpcio channel), so that no client interpreter lock is the
bottleneck. Raw redis-py GETs of the same payloads run from the same client processes at the same
concurrency, just before each service cell. With ``--workers N`` a real ``kvwire serve --workers N``
(N processes sharing the ports, Redis store) is measured too. Prints a Markdown table and writes it
(and a JSON list of the cells) to ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import platform
import random
import shutil
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

from benchmarks.processes import KvwireProcess, MotoProcess, RedisProcess, free_port

TENANT, API_KEY = "bench", "bench-key"
LEVEL = 2
CHUNK_TOKENS = 256
SIZES = {"64KiB": 64 * 1024, "1MiB": 1024 * 1024, "8MiB": 8 * 1024 * 1024}
S3_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}


@dataclass(frozen=True)
class Cell:
    """One measured row: ``rps`` responses of ``nbytes`` each per second, over ``concurrency`` connections."""

    backend: str
    transport: str
    size: str
    concurrency: int
    rps: float
    nbytes: int
    raw_rps: float | None = None  # raw redis-py GETs of the same size and concurrency

    @property
    def mb_s(self) -> float:
        return self.rps * self.nbytes / 1e6


# ------------------------------------------------------------------------------------ servers


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[int]:
    """Our own redis-server (no persistence) on a free loopback port, stopped when the block ends."""
    server = RedisProcess(workdir / "redis", persist=False)
    server.start(timeout_s=10)
    try:
        yield server.port
    finally:
        server.stop()


@contextlib.contextmanager
def s3_server(workdir: Path) -> Iterator[str]:
    """moto's S3 server as a subprocess (not a thread of this process, whose interpreter lock the
    in-process REST and gRPC servers use)."""
    server = MotoProcess(workdir / "moto")
    server.start(timeout_s=60)
    try:
        yield server.endpoint
    finally:
        server.stop()


@contextlib.contextmanager
def kvwire_workers(workdir: Path, redis_url: str, workers: int) -> Iterator[tuple[str, str]]:
    """A real ``kvwire serve --workers N`` (Redis store and job queue, no model) on free ports;
    yields its REST base URL and gRPC address."""
    env = {
        "KVWIRE_STORE": "redis",
        "KVWIRE_REDIS_URL": redis_url,
        "KVWIRE_REDIS_NAMESPACE": "bench-workers",
        "KVWIRE_JOBS_REDIS_URL": redis_url,
        "KVWIRE_JOBS_NAMESPACE": "bench-jobs",
        "KVWIRE_API_KEYS": f"{TENANT}:{API_KEY}",
        "KVWIRE_WORKERS": str(workers),
    }
    server = KvwireProcess(workdir / f"kvwire-{workers}", env)
    server.start(timeout_s=300)
    try:
        # The supervisor answers once one child does: wait until every child listens and is idle.
        server.wait_serving(workers, timeout_s=300)
        yield server.base_url, server.grpc_target
    finally:
        server.stop()


@contextlib.contextmanager
def rest_server(store: Any, http: str = "deployed") -> Iterator[str]:
    """The REST app over ``store`` under uvicorn in a background thread; yields its base URL.

    ``http="deployed"``: the protocol class and timeouts ``kvwire serve`` runs
    (``kvwire.server.timeouts.uvicorn_options``); else uvicorn's own ``h11`` or ``httptools``."""
    import uvicorn

    from kvwire.server.config import ServiceSettings
    from kvwire.server.jobs import InProcessJobQueue
    from kvwire.server.rest import create_app
    from kvwire.server.service import KvwireService
    from kvwire.server.timeouts import uvicorn_options

    settings = ServiceSettings(api_keys={TENANT: API_KEY})
    service = KvwireService(store, InProcessJobQueue(), settings, worker=None)
    port = free_port()
    options: dict[str, Any] = uvicorn_options(settings) if http == "deployed" else {"http": http}
    config = uvicorn.Config(
        create_app(service, settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        **options,
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
    from kvwire.controller import warm_up
    from kvwire.server.config import ServiceSettings
    from kvwire.server.grpc_server import serve_grpc
    from kvwire.server.jobs import InProcessJobQueue
    from kvwire.server.service import KvwireService

    warm_up()  # serve_grpc compiles the planner in a thread: ~10 s of this process's CPU when fresh
    settings = ServiceSettings(api_keys={TENANT: API_KEY})
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


def ready(malloc_threshold: int = 0) -> int:
    """Run in each client process once, first: import the clients, set its malloc thresholds as a
    serving process does when ``malloc_threshold`` (``--client-malloc kvwire``), and hold the
    process a moment, so that the pool starts one process per connection."""
    import grpc  # noqa: F401
    import redis  # noqa: F401

    from kvwire.server.allocator import keep_freed_memory

    keep_freed_memory(malloc_threshold)
    time.sleep(1.0)
    return os.getpid()


def drive(
    kind: str, target: str, keys: list[str], nbytes: int, start_at: float, warmup_s: float, seconds: float
) -> float:
    """Run in a client process: one connection GETs ``keys`` round-robin (from a random offset) from
    wall-clock ``start_at``; return its rate: the responses of ``nbytes`` bytes begun in the window
    [``start_at + warmup_s``, ``+ seconds``), divided by the time from the window's start to the end
    of the last of them. (Counting only responses that also end inside the window undercounts
    responses that are long next to the window: an 8 MiB one can take a large part of it.)"""
    import redis

    if kind == "REST":
        client: Any = RestClient(target)
        fetch = client.get
    elif kind in ("gRPC", "gRPC-stream"):
        client, fetch = grpc_fetch(kind, target)
    else:
        client = redis.Redis.from_url(target)
        fetch = client.get
    with client:
        i = random.randrange(len(keys))
        fetch(keys[i % len(keys)])  # connect before the clock starts
        time.sleep(max(0.0, start_at - time.time()))
        measure_from, measure_to = start_at + warmup_s, start_at + warmup_s + seconds
        count, last_end = 0, measure_from
        while True:
            began = time.time()
            if began >= measure_to:
                return count / max(last_end - measure_from, 1e-9)
            data = fetch(keys[i % len(keys)])
            i += 1
            if len(data) != nbytes:
                raise RuntimeError(f"got {len(data)} bytes, expected {nbytes}")
            if began >= measure_from:
                count, last_end = count + 1, time.time()


class RestClient:
    """One keep-alive HTTP/1.1 connection (``http.client``) that GETs a path with the API key."""

    def __init__(self, base_url: str):
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        self.headers = {"Authorization": f"Bearer {API_KEY}"}

    def get(self, path: str) -> bytes:
        self.conn.request("GET", path, headers=self.headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {data[:200]!r}")
        return data

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


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
    """The HTTP implementation uvicorn runs for ``--http choice``."""
    if choice == "deployed":
        from kvwire.server.config import ServiceSettings
        from kvwire.server.timeouts import uvicorn_options

        return f"{uvicorn_options(ServiceSettings())['http'].__name__} (as `kvwire serve`)"
    return choice


def table(cells: list[Cell]) -> str:
    lines = [
        "| backend | transport | size | concurrency | req/s | MB/s | raw Redis req/s | overhead vs raw "
        "Redis |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        raw, overhead = "—", "—"
        if c.raw_rps is not None:
            raw, overhead = f"{c.raw_rps:,.0f}", f"{c.raw_rps / c.rps - 1:+.0%}" if c.rps else "—"
        row = f"| {c.backend} | {c.transport} | {c.size} | {c.concurrency} | {c.rps:,.0f} | {c.mb_s:,.0f} |"
        lines.append(f"{row} {raw} | {overhead} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=0.25, help="unmeasured seconds before each cell")
    parser.add_argument("--chunks", type=int, default=8, help="distinct stored chunks per size")
    parser.add_argument(
        "--context-tokens", type=int, default=32768, help=f"manifest length ({CHUNK_TOKENS}-token chunks)"
    )
    parser.add_argument(
        "--concurrency", default="1,8", help="connections (one client process each), comma-separated"
    )
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"payload sizes among {list(SIZES)}")
    parser.add_argument(
        "--backends",
        default="local,redis,s3,tiered",
        help="among local, redis, s3, tiered (Redis over S3) and tiered-local (Redis over local disk)",
    )
    parser.add_argument("--transports", default="REST,gRPC,gRPC-stream")
    parser.add_argument(
        "--http",
        default="deployed",
        choices=["deployed", "h11", "httptools"],
        help="the in-process REST server's HTTP protocol (deployed: as `kvwire serve` runs it)",
    )
    parser.add_argument(
        "--workers",
        default="",
        help="also measure `kvwire serve --workers N` (Redis backend) for each N, comma-separated",
    )
    parser.add_argument(
        "--raw",
        choices=["each", "once"],
        default="each",
        help="raw redis-py GETs before each service cell (each), or once per size and concurrency at the "
        "start and again at the end (once: half the time, for an otherwise idle machine)",
    )
    parser.add_argument(
        "--client-malloc",
        choices=["default", "kvwire"],
        default="default",
        help="glibc malloc thresholds of the client processes: glibc's defaults, or those `kvwire serve` "
        "sets (KVWIRE_MALLOC_MMAP_THRESHOLD_BYTES; kvwire.server.allocator). The servers always run "
        "with kvwire's",
    )
    parser.add_argument("--out", type=Path, help="write the Markdown table (and run notes) here")
    parser.add_argument("--json", type=Path, help="write the cells as JSON here")
    args = parser.parse_args(argv)
    manifest_chunks = max(1, args.context_tokens // CHUNK_TOKENS)
    if shutil.which("redis-server") is None:
        parser.error("redis-server is not installed")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    sizes = [s for s in args.sizes.split(",") if s]
    backends = [b for b in args.backends.split(",") if b]
    transports = [t for t in args.transports.split(",") if t]
    workers = [int(w) for w in args.workers.split(",") if w]
    rng = random.Random(1)
    payloads = {s: [rng.randbytes(SIZES[s]) for _ in range(args.chunks)] for s in sizes}

    from kvwire.server.allocator import keep_freed_memory
    from kvwire.server.config import ServiceSettings
    from kvwire.server.storage import LocalStore, TieredStore
    from kvwire.server.storage.redis import RedisStore

    # The in-process REST and gRPC servers run with the malloc thresholds `kvwire serve` sets.
    malloc_threshold = ServiceSettings().malloc_mmap_threshold_bytes
    server_malloc = keep_freed_memory(malloc_threshold)
    load_before = load_average()
    began = time.perf_counter()
    cells: list[Cell] = []
    spawn = multiprocessing.get_context("spawn")
    n_clients = max(concurrency)
    with (
        tempfile.TemporaryDirectory(prefix="kvwire-servebench-") as tmp,
        redis_server(Path(tmp)) as redis_port,
        s3_server(Path(tmp)) if {"s3", "tiered"} & set(backends) else contextlib.nullcontext("") as s3_url,
        concurrent.futures.ProcessPoolExecutor(n_clients, mp_context=spawn) as clients,
    ):
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        client_threshold = malloc_threshold if args.client_malloc == "kvwire" else 0
        pids = list(clients.map(ready, [client_threshold] * n_clients))  # one process per connection
        if len(set(pids)) < n_clients:
            raise RuntimeError(f"{len(set(pids))} client processes started, {n_clients} needed")

        def measure(backend: str, transport: str, target: str, keys: list[str], size: str, n: int) -> Cell:
            raw_rps = None
            if transport != "redis-py" and args.raw == "each":  # a loaded machine's speed drifts
                raw_rps = measure("redis", "redis-py", redis_url, raw_keys[size], size, n).rps
            elif transport != "redis-py":
                raw_rps = raw_first[size, n]
            start_at = time.time() + 0.15  # every client connected by then
            futures = [
                clients.submit(
                    drive, transport, target, keys, SIZES[size], start_at, args.warmup, args.seconds
                )
                for _ in range(n)
            ]
            cell = Cell(backend, transport, size, n, sum(f.result() for f in futures), SIZES[size], raw_rps)
            print(
                f"  {backend:14} {transport:11} {size:6} c={n}: {cell.rps:8,.0f} req/s {cell.mb_s:8,.0f} MB/s"
                + ("" if raw_rps is None else f"  (raw {raw_rps:,.0f} req/s)"),
                flush=True,
            )
            return cell

        # Raw redis-py GETs of the same payloads: the baseline.
        import redis

        with redis.Redis.from_url(redis_url) as r:
            for size, chunks in payloads.items():
                for i, data in enumerate(chunks):
                    r.set(f"raw:{size}:{i}", data)
        raw_keys = {size: [f"raw:{size}:{i}" for i in range(args.chunks)] for size in sizes}
        raw_first: dict[tuple[str, int], float] = {}
        for size in sizes:
            for n in concurrency:
                cells.append(measure("redis", "redis-py", redis_url, raw_keys[size], size, n))
                raw_first[size, n] = cells[-1].rps

        def open_backend(name: str) -> Any:
            def s3(prefix: str) -> Any:
                from kvwire.server.storage.s3 import S3Store  # boto3: only for the S3 backends

                return S3Store("kvwire-bench", endpoint_url=s3_url, prefix=prefix, create_bucket=True,
                               access_key_id=S3_CREDENTIALS["access_key_id"],
                               secret_access_key=S3_CREDENTIALS["secret_access_key"],
                               region=S3_CREDENTIALS["region"])  # fmt: skip

            if name == "local":
                return LocalStore(Path(tmp) / "local")
            if name == "redis":
                return RedisStore(redis_url, namespace="bench-redis")
            if name == "s3":
                return s3("s3")
            if name == "tiered":
                return TieredStore(RedisStore(redis_url, namespace="bench-tiered"), s3("tiered"))
            if name == "tiered-local":  # the same hot tier over local disk: no S3 server needed
                hot = RedisStore(redis_url, namespace="bench-tiered-local")
                return TieredStore(hot, LocalStore(Path(tmp) / "tiered-cold"))
            raise SystemExit(f"unknown backend {name!r}")

        def measure_servers(name: str, rest_url: str | None, grpc_address: str | None) -> None:
            for size in sizes:
                paths = [f"/v1/contexts/bench-{size}/chunks/{i}" for i in range(manifest_chunks)]
                keys = [f"bench-{size}/{i}" for i in range(manifest_chunks)]
                for transport in transports:
                    target = rest_url if transport == "REST" else grpc_address
                    if target is None:
                        continue
                    for n in concurrency:
                        cells.append(
                            measure(name, transport, target, paths if transport == "REST" else keys, size, n)
                        )

        for name in backends:
            with open_backend(name) as store:
                seed(store, payloads, manifest_chunks)
                if "REST" in transports:
                    with rest_server(store, args.http) as url:
                        measure_servers(name, url, None)
                if {"gRPC", "gRPC-stream"} & set(transports):
                    with grpc_server(store) as address:
                        measure_servers(name, None, address)
        for n_workers in workers:
            with RedisStore(redis_url, namespace="bench-workers") as store:
                seed(store, payloads, manifest_chunks)
            with kvwire_workers(Path(tmp), redis_url, n_workers) as (url, address):
                measure_servers(f"redis, {n_workers} procs", url, address)
        if args.raw == "once":  # the baseline again: how far did it drift over the run?
            for size in sizes:
                for n in concurrency:
                    cells.append(measure("redis (end)", "redis-py", redis_url, raw_keys[size], size, n))
    load_after = load_average()
    command = " ".join(["python", "benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])])
    notes = [
        f"- Command: `{command}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; load average (1/5/15 min) "
        f"before {load_before}, after {load_after}; {time.perf_counter() - began:.0f} s in all.",
        f"- Contexts: {manifest_chunks} chunks of {CHUNK_TOKENS} tokens in the manifest, cycling through "
        f"{args.chunks} distinct random payloads per size. Clients: N connections = N client processes, "
        "one keep-alive connection each (`http.client` for REST, a grpcio channel, or redis-py with "
        f"hiredis: {_hiredis()}); each cell {args.warmup} s warm-up, {args.seconds} s measured. "
        f"Server: uvicorn {uvicorn_http(args.http)}, in a thread of the benchmark process, API key "
        "auth, no access log; the gRPC server likewise; redis-server and moto's S3 server are "
        "subprocesses on loopback.",
        f"- malloc: the serving processes keep freed buffers up to {malloc_threshold:,} bytes "
        f"(kvwire.server.allocator; applied here: {'yes' if server_malloc else 'no'}); the client "
        f"processes run with "
        + ("the same thresholds." if args.client_malloc == "kvwire" else "glibc's default thresholds."),
        "- overhead vs raw Redis = raw redis-py req/s / service req/s − 1, the raw GETs (same size and "
        "concurrency, same client processes) run "
        + (
            "just before each service cell."
            if args.raw == "each"
            else "once per size and concurrency at the start (`redis` rows; the `redis (end)` rows "
            "repeat them after every service cell, to show the drift)."
        ),
        "- gRPC: `GetChunk` per chunk (sync grpcio server, thread pool, API key auth); gRPC-stream: "
        "chunks received per second from `StreamContext` at a fixed level, each connection one stream "
        "at a time, reopened when it ends.",
    ]
    if workers:
        notes.append(
            "- `redis, N procs`: a real `kvwire serve --workers N` subprocess (Redis store and job "
            "queue, no model), N processes sharing the REST and gRPC ports through SO_REUSEPORT."
        )
    text = table(cells) + "\n\n" + "\n".join(notes) + "\n"
    print()
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(
            json.dumps([{**dataclasses.asdict(c), "rps": c.rps, "mb_s": c.mb_s} for c in cells])
        )
    return 0


def _hiredis() -> str:
    from redis.utils import HIREDIS_AVAILABLE

    return "yes" if HIREDIS_AVAILABLE else "no"


if __name__ == "__main__":
    raise SystemExit(main())
