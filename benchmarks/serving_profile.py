"""Where a served chunk's time goes: CPU time and page faults per request, in the server and its clients.

Usage: ``python benchmarks/serving_profile.py [--transport REST|gRPC|gRPC-stream] [--connections 1]
[--size 1MiB] [--seconds 3] [--server-malloc kvwire|default] [--client-malloc default|kvwire]
[--py-spy FILE]``.

One server (the REST app under uvicorn, or the gRPC server, as ``benchmarks/serving.py`` runs them)
over the Redis store, in this process, driven by ``--connections`` client processes (that
benchmark's ``drive``). Over the measured window it reads this process's CPU time and minor page
faults (``getrusage``) and each client's, and prints them per request next to the wall time per
request. ``--server-malloc default`` leaves glibc's malloc thresholds as they are instead of setting
them as ``kvwire serve`` does (``kvwire.server.allocator``), to see what that costs. ``--py-spy FILE``
also records this process's threads with py-spy (``pip install py-spy``; not a kvwire dependency) in
its raw format, one line per stack with its sample count. docs/serving-benchmark.md, "Where the time
of a 1 MiB request goes".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import serving


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def drive_measured(
    kind: str, target: str, keys: list[str], nbytes: int, start_at: float, warmup_s: float, seconds: float
) -> tuple[float, float, int]:
    """``serving.drive`` in a client process, plus that process's CPU seconds and minor page faults
    over the measured window: (requests per second, CPU s, faults)."""
    window: dict[str, float] = {}

    def sample() -> None:
        time.sleep(max(0.0, start_at + warmup_s - time.time()))
        window["cpu0"], window["faults0"] = time.process_time(), _faults()
        time.sleep(seconds)
        window["cpu1"], window["faults1"] = time.process_time(), _faults()

    sampler = threading.Thread(target=sample)
    sampler.start()
    rate = serving.drive(kind, target, keys, nbytes, start_at, warmup_s, seconds)
    sampler.join()
    return rate, window["cpu1"] - window["cpu0"], int(window["faults1"] - window["faults0"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["REST", "gRPC", "gRPC-stream"], default="REST")
    parser.add_argument("--connections", type=int, default=1, help="client processes, one connection each")
    parser.add_argument("--size", choices=list(serving.SIZES), default="1MiB")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")
    parser.add_argument("--server-malloc", choices=["kvwire", "default"], default="kvwire")
    parser.add_argument("--client-malloc", choices=["default", "kvwire"], default="default")
    parser.add_argument("--py-spy", type=Path, help="record the server's threads with py-spy into this file")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        parser.error("redis-server is not installed")
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if args.py_spy and py_spy is None:
        parser.error("--py-spy needs py-spy (pip install py-spy)")

    from kvwire.server.allocator import keep_freed_memory
    from kvwire.server.config import ServiceSettings
    from kvwire.server.storage.redis import RedisStore

    threshold = ServiceSettings().malloc_mmap_threshold_bytes
    if args.server_malloc == "kvwire":
        keep_freed_memory(threshold)
    nbytes = serving.SIZES[args.size]
    rng = random.Random(1)
    payloads = {args.size: [rng.randbytes(nbytes) for _ in range(8)]}
    chunks = 128
    n = args.connections
    spawn = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="kvwire-serveprof-") as tmp,
        serving.redis_server(Path(tmp)) as port,
        RedisStore(f"redis://127.0.0.1:{port}/0", namespace="profile") as store,
        concurrent.futures.ProcessPoolExecutor(n, mp_context=spawn) as clients,
    ):
        serving.seed(store, payloads, chunks)
        client_threshold = threshold if args.client_malloc == "kvwire" else 0
        list(clients.map(serving.ready, [client_threshold] * n))
        if args.transport == "REST":
            server: Any = serving.rest_server(store)
            keys = [f"/v1/contexts/bench-{args.size}/chunks/{i}" for i in range(chunks)]
        else:
            server = serving.grpc_server(store)
            keys = [f"bench-{args.size}/{i}" for i in range(chunks)]
        with server as target:
            start_at = time.time() + 0.3
            futures = [
                clients.submit(
                    drive_measured, args.transport, target, keys, nbytes, start_at, args.warmup, args.seconds
                )
                for _ in range(n)
            ]
            time.sleep(max(0.0, start_at + args.warmup - time.time()))
            cpu0, faults0 = os.times(), _faults()
            spy = None
            if args.py_spy:
                spy = subprocess.Popen(
                    [
                        str(py_spy),
                        "record",
                        "--pid",
                        str(os.getpid()),
                        "--duration",
                        str(max(1, int(args.seconds))),
                        "--rate",
                        "300",
                        "--format",
                        "raw",
                        "--output",
                        str(args.py_spy),
                        "--threads",
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                )
            time.sleep(args.seconds)
            cpu1, faults1 = os.times(), _faults()
            results = [f.result() for f in futures]
            if spy is not None:
                spy.wait()
    rps = sum(r for r, _, _ in results)
    requests = rps * args.seconds
    server_cpu = cpu1.user + cpu1.system - cpu0.user - cpu0.system
    client_cpu = sum(c for _, c, _ in results)
    client_faults = sum(f for _, _, f in results)
    print(
        f"{args.transport} {args.size} x{n} connections (server malloc {args.server_malloc}, client malloc "
        f"{args.client_malloc}): {rps:,.0f} req/s, wall {n / rps * 1e3:.3f} ms per request per connection; "
        f"per request: server CPU {server_cpu / requests * 1e3:.3f} ms, {(faults1 - faults0) / requests:.0f} "
        f"page faults; clients CPU {client_cpu / requests * 1e3:.3f} ms, {client_faults / requests:.0f} "
        "page faults"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
