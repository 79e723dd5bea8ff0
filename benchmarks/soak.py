"""Soak test (issue 6, "Load"): N concurrent clients ingest and load contexts through REST and gRPC.

Usage: ``python benchmarks/soak.py [--clients 64] [--seconds 60] [--chunk-tokens 400] [--level 2]
[--model DIR] [--out FILE]`` (a random-weight model of a real shape: ``benchmarks/random_model.py``).

Starts its own redis-server on a free loopback port and a real ``kvwire serve`` subprocess (REST and
gRPC, Redis store, API keys for 4 tenants, the embedded worker with the bundled model unless
``--model`` is given), then:

1. *reference*: ingests ``--contexts`` contexts of ``--context-chunks`` chunks of random token ids
   (the model runs once per context) and fetches every chunk: its sha256 and its decode with
   ``kvwire.kernels.codec.decode_chunk`` (profile fetched from the server) are the reference;
2. *soak*: ``--clients`` clients (half REST with async httpx, half gRPC with ``grpc.aio``, one
   keep-alive connection each) loop for ``--seconds``: ingest (20%) one of the reference token
   sequences under a new context id (content-addressed, so the chunks are reused: the manifest must
   name the reference keys and checksums), or load (80%) one of their contexts: manifest, then every
   chunk one request each (REST ``GET .../chunks/i``, gRPC ``GetChunk``; one gRPC load in four uses
   ``StreamContext`` instead). Every chunk is checked: crc32 against the manifest (and the
   ``X-Kvwire-Checksum`` header), sha256 against the reference bytes; every ``--decode-every``-th
   chunk is also decoded and compared exactly with the reference decode;
3. *sweep*: every context acknowledged during the soak must still have its manifest (none lost).

Reports requests, errors (by kind), 5xx, lost and corrupted chunks, p50/p99 latency of single-chunk
requests and the server's peak RSS and thread count (psutil, sampled every 0.25 s). Prints JSON and a
Markdown table, and writes both to ``--out`` if given. ``run(SoakOptions(...))`` is the same from
Python (tests/faults/test_soak.py runs a short one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.processes import KvwireProcess, RedisProcess

TENANTS = ("t0", "t1", "t2", "t3")
CALL_TIMEOUT_S = 120.0  # per request; a saturated, shared machine can queue a request for many seconds


@dataclass
class SoakOptions:
    clients: int = 64
    seconds: float = 60.0
    chunk_tokens: int = 400  # ~1 MB chunks at level 2 with the bundled SmolLM2 (measured: see report)
    level: int = 2
    contexts: int = 4
    context_chunks: int = 3
    vocab: int = 30000  # token ids are drawn from [1, vocab)
    ingest_share: float = 0.2
    decode_every: int = 16
    model: str | None = None  # None: the bundled model
    workdir: Path | None = None
    startup_timeout_s: float = 1200.0  # the first start calibrates the model (minutes on a busy CPU)
    seed: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)  # more variables for `kvwire serve`


@dataclass
class Reference:
    """One reference context: its token ids and, per chunk, key, checksum, sha256, decoded tensor."""

    token_ids: list[int]
    keys: list[str]
    checksums: list[str]
    sha256: list[str]
    decoded: list[str]  # digest of the reference decode (see _decode_digest)
    nbytes: list[int]


@dataclass
class Stats:
    requests: int = 0
    chunks_verified: int = 0
    chunks_decoded: int = 0
    bytes_verified: int = 0
    ingests: int = 0
    loads: int = 0
    streams: int = 0
    status_5xx: int = 0
    lost: int = 0
    corrupted: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    chunk_latency_s: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def problem(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.problems) < 20:
            self.problems.append(f"{kind}: {detail}")


# ------------------------------------------------------------------------------------------ helpers


def addresses(keys: list[str]) -> list[str]:
    """Chunk keys without their tenant namespace (``t/<tenant>/``): the same text ingested by two
    tenants gets the same content address, under each tenant's own prefix."""
    return [k.split("/", 2)[2] if k.startswith("t/") else k for k in keys]


def crc(data: bytes) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


_DECODER: dict[str, Any] = {}


def _decoder_init(profile_bytes: bytes, fingerprint: str) -> None:
    from kvwire.kernels.profile import CalibrationProfile

    _DECODER["profile"] = CalibrationProfile.from_bytes(profile_bytes)
    _DECODER["fingerprint"] = fingerprint


def _decode_digest(data: bytes) -> str:
    """sha256 of the decoded tensor's bytes (runs in the decoder process)."""
    from kvwire.kernels import codec

    tensor = codec.decode_chunk(
        data, _DECODER["profile"], model_fingerprint=_DECODER["fingerprint"], device="cpu"
    )
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest() + f":{tuple(tensor.shape)}"


class Decoder:
    """Decodes chunks with the real codec and the server's profile in one separate process (so that
    decoding neither holds the clients' GIL nor takes more than one core); returns a digest of the
    decoded tensor, compared exactly with the reference decode's."""

    def __init__(self, profile_bytes: bytes, fingerprint: str):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_decoder_init,
            initargs=(profile_bytes, fingerprint),
        )

    async def digest(self, data: bytes) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._pool, _decode_digest, data)

    def close(self) -> None:
        self._pool.shutdown()


# ----------------------------------------------------------------------------------------- the soak


class Soak:
    def __init__(self, options: SoakOptions, server: KvwireProcess, keys: dict[str, str]):
        self.o = options
        self.server = server
        self.keys = keys
        self.stats = Stats()
        self.refs: list[Reference] = []
        self.decoder: Decoder | None = None
        self.acknowledged: list[tuple[str, str, int]] = []  # (tenant, context id, reference index)
        self.deadline = 0.0

    # -- reference

    async def build_reference(self) -> None:
        import httpx

        rng = random.Random(self.o.seed)
        n_tokens = self.o.chunk_tokens * self.o.context_chunks
        headers = {"Authorization": f"Bearer {self.keys[TENANTS[0]]}"}
        async with httpx.AsyncClient(base_url=self.server.base_url, headers=headers, timeout=600) as client:
            for i in range(self.o.contexts):
                ids = [rng.randrange(1, self.o.vocab) for _ in range(n_tokens)]
                r = await client.post("/v1/contexts", json={"token_ids": ids, "context_id": f"ref-{i}"})
                r.raise_for_status()
                manifest = r.json()
                entries = [self._entry(c) for c in manifest["chunks"]]
                if self.decoder is None:
                    profile = await client.get(f"/v1/profiles/{manifest['profile_digest']}")
                    profile.raise_for_status()
                    self.decoder = Decoder(profile.content, manifest["model_fingerprint"])
                datas = []
                for c, entry in enumerate(entries):
                    got = await client.get(f"/v1/contexts/ref-{i}/chunks/{c}", params={"level": self.o.level})
                    got.raise_for_status()
                    assert crc(got.content) == entry["checksum"], "reference chunk fails its checksum"
                    datas.append(got.content)
                decoded = [await self.decoder.digest(d) for d in datas]
                self.refs.append(
                    Reference(
                        token_ids=ids,
                        keys=[e["key"] for e in entries],
                        checksums=[e["checksum"] for e in entries],
                        sha256=[sha(d) for d in datas],
                        decoded=decoded,
                        nbytes=[len(d) for d in datas],
                    )
                )

    def _entry(self, chunk: dict[str, Any]) -> dict[str, Any]:
        for entry in chunk["levels"]:
            if entry["level"] == self.o.level:
                return dict(entry)
        raise RuntimeError(f"chunk {chunk['index']} has no level {self.o.level}")

    # -- verification

    async def verify(self, ref: Reference, index: int, data: bytes, checksum: str, where: str) -> None:
        s = self.stats
        s.chunks_verified += 1
        s.bytes_verified += len(data)
        if crc(data) != checksum or checksum != ref.checksums[index] or sha(data) != ref.sha256[index]:
            s.corrupted += 1
            s.problem("corrupted", f"{where} chunk {index}")
            return
        if self.decoder is not None and s.chunks_verified % self.o.decode_every == 0:
            decoded = await self.decoder.digest(data)
            s.chunks_decoded += 1
            if decoded != ref.decoded[index]:
                s.corrupted += 1
                s.problem("decoded-mismatch", f"{where} chunk {index}")

    def check_manifest(self, ref: Reference, keys: list[str], checksums: list[str], where: str) -> bool:
        if addresses(keys) != addresses(ref.keys) or checksums != ref.checksums:
            self.stats.corrupted += 1
            self.stats.problem("manifest-mismatch", where)
            return False
        return True

    # -- clients

    async def rest_client(self, n: int) -> None:
        import httpx

        tenant = TENANTS[n % len(TENANTS)]
        rng = random.Random(self.o.seed * 1000 + n)
        mine: list[tuple[str, int]] = []
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(
            base_url=self.server.base_url, headers=headers, timeout=CALL_TIMEOUT_S, limits=limits
        ) as client:
            seq = 0
            while time.monotonic() < self.deadline:
                try:
                    if not mine or rng.random() < self.o.ingest_share:
                        seq += 1
                        await self.rest_ingest(client, tenant, f"r{n}-{seq}", rng, mine)
                    else:
                        await self.rest_load(client, tenant, *rng.choice(mine))
                except httpx.HTTPError as exc:
                    self.stats.problem(f"rest-{type(exc).__name__}", str(exc)[:200])

    def _status(self, r: Any, what: str) -> bool:
        self.stats.requests += 1
        if r.status_code >= 500:
            self.stats.status_5xx += 1
        if r.status_code == 404:
            self.stats.lost += 1
        if r.status_code >= 300:
            self.stats.problem(f"http-{r.status_code}", f"{what}: {r.text[:200]}")
            return False
        return True

    async def rest_ingest(
        self, client: Any, tenant: str, cid: str, rng: random.Random, mine: list[Any]
    ) -> None:
        i = rng.randrange(len(self.refs))
        r = await client.post("/v1/contexts", json={"token_ids": self.refs[i].token_ids, "context_id": cid})
        if not self._status(r, f"ingest {cid}"):
            return
        manifest = r.json()
        entries = [self._entry(c) for c in manifest["chunks"]]
        self.stats.ingests += 1
        if self.check_manifest(
            self.refs[i], [e["key"] for e in entries], [e["checksum"] for e in entries], cid
        ):
            mine.append((cid, i))
            self.acknowledged.append((tenant, cid, i))

    async def rest_load(self, client: Any, tenant: str, cid: str, i: int) -> None:
        ref = self.refs[i]
        r = await client.get(f"/v1/contexts/{cid}")
        if not self._status(r, f"manifest {cid}"):
            return
        entries = [self._entry(c) for c in r.json()["chunks"]]
        if not self.check_manifest(ref, [e["key"] for e in entries], [e["checksum"] for e in entries], cid):
            return
        for index, entry in enumerate(entries):
            started = time.perf_counter()
            got = await client.get(f"/v1/contexts/{cid}/chunks/{index}", params={"level": self.o.level})
            elapsed = time.perf_counter() - started
            if not self._status(got, f"chunk {cid}/{index}"):
                continue
            self.stats.chunk_latency_s.append(elapsed)
            header = got.headers.get("X-Kvwire-Checksum", "")
            if header != entry["checksum"]:
                self.stats.corrupted += 1
                self.stats.problem("header-mismatch", f"{cid}/{index}")
            await self.verify(ref, index, got.content, entry["checksum"], f"rest {cid}")
        self.stats.loads += 1

    async def grpc_client(self, n: int) -> None:
        import grpc

        from kvwire._proto import CHANNEL_OPTIONS
        from kvwire._proto import kvwire_pb2 as pb
        from kvwire._proto import kvwire_pb2_grpc as pb_grpc

        tenant = TENANTS[n % len(TENANTS)]
        rng = random.Random(self.o.seed * 1000 + n)
        mine: list[tuple[str, int]] = []
        metadata = (("authorization", f"Bearer {self.keys[tenant]}"),)
        async with grpc.aio.insecure_channel(
            self.server.grpc_target, options=list(CHANNEL_OPTIONS)
        ) as channel:
            stub = pb_grpc.KvwireStub(channel)
            seq = 0
            while time.monotonic() < self.deadline:
                try:
                    if not mine or rng.random() < self.o.ingest_share:
                        seq += 1
                        i = rng.randrange(len(self.refs))
                        cid = f"g{n}-{seq}"
                        request = pb.CreateContextRequest(
                            context_id=cid, token_ids=pb.TokenIds(ids=self.refs[i].token_ids)
                        )
                        response = await stub.CreateContext(
                            request, metadata=metadata, timeout=CALL_TIMEOUT_S
                        )
                        self.stats.requests += 1
                        self.stats.ingests += 1
                        keys, sums = self._grpc_entries(response.manifest)
                        if self.check_manifest(self.refs[i], keys, sums, cid):
                            mine.append((cid, i))
                            self.acknowledged.append((tenant, cid, i))
                    else:
                        cid, i = rng.choice(mine)
                        if rng.random() < 0.25:
                            await self.grpc_stream(stub, pb, metadata, cid, i)
                        else:
                            await self.grpc_load(stub, pb, metadata, cid, i)
                except grpc.aio.AioRpcError as exc:
                    self.stats.requests += 1
                    code = exc.code()
                    if code == grpc.StatusCode.NOT_FOUND:
                        self.stats.lost += 1
                    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS):
                        self.stats.status_5xx += 1
                    self.stats.problem(f"grpc-{code.name}", (exc.details() or "")[:200])

    def _grpc_entries(self, manifest: Any) -> tuple[list[str], list[str]]:
        keys, sums = [], []
        for chunk in manifest.chunks:
            entry = next(e for e in chunk.levels if e.level == self.o.level)
            keys.append(entry.key)
            sums.append(entry.checksum)
        return keys, sums

    async def grpc_load(self, stub: Any, pb: Any, metadata: Any, cid: str, i: int) -> None:
        ref = self.refs[i]
        manifest = await stub.GetManifest(
            pb.GetManifestRequest(context_id=cid), metadata=metadata, timeout=CALL_TIMEOUT_S
        )
        self.stats.requests += 1
        keys, sums = self._grpc_entries(manifest)
        if not self.check_manifest(ref, keys, sums, cid):
            return
        for index, checksum in enumerate(sums):
            started = time.perf_counter()
            chunk = await stub.GetChunk(
                pb.GetChunkRequest(context_id=cid, index=index, level=self.o.level),
                metadata=metadata,
                timeout=CALL_TIMEOUT_S,
            )
            self.stats.chunk_latency_s.append(time.perf_counter() - started)
            self.stats.requests += 1
            if chunk.checksum != checksum:
                self.stats.corrupted += 1
                self.stats.problem("grpc-checksum-field", f"{cid}/{index}")
            await self.verify(ref, index, chunk.data, checksum, f"grpc {cid}")
        self.stats.loads += 1

    async def grpc_stream(self, stub: Any, pb: Any, metadata: Any, cid: str, i: int) -> None:
        ref = self.refs[i]
        request = pb.StreamRequest(context_id=cid, fixed_level=self.o.level)
        seen = 0
        async for message in stub.StreamContext(request, metadata=metadata, timeout=CALL_TIMEOUT_S):
            if message.index != seen:
                self.stats.corrupted += 1
                self.stats.problem("stream-order", f"{cid}: got {message.index}, expected {seen}")
            await self.verify(ref, message.index, message.data, message.checksum, f"stream {cid}")
            seen += 1
        self.stats.requests += 1
        if seen != len(ref.keys):
            self.stats.lost += len(ref.keys) - seen
            self.stats.problem("stream-short", f"{cid}: {seen} of {len(ref.keys)} chunks")
        self.stats.streams += 1
        self.stats.loads += 1

    async def sweep(self) -> int:
        """Every acknowledged context still has its manifest; returns how many were checked."""
        import httpx

        sem = asyncio.Semaphore(16)
        clients = {
            t: httpx.AsyncClient(
                base_url=self.server.base_url,
                headers={"Authorization": f"Bearer {k}"},
                timeout=CALL_TIMEOUT_S,
            )
            for t, k in self.keys.items()
        }

        async def one(tenant: str, cid: str, i: int) -> None:
            async with sem:
                r = await clients[tenant].get(f"/v1/contexts/{cid}")
                if r.status_code != 200:
                    self.stats.lost += 1
                    self.stats.problem(f"sweep-{r.status_code}", cid)
                    return
                keys = [self._entry(c)["key"] for c in r.json()["chunks"]]
                if addresses(keys) != addresses(self.refs[i].keys):
                    self.stats.corrupted += 1
                    self.stats.problem("sweep-mismatch", cid)

        try:
            await asyncio.gather(*(one(*a) for a in self.acknowledged))
        finally:
            for c in clients.values():
                await c.aclose()
        return len(self.acknowledged)

    async def run(self) -> dict[str, Any]:
        self.deadline = time.monotonic() + self.o.seconds
        started = time.monotonic()
        tasks = [self.grpc_client(n) if n % 2 else self.rest_client(n) for n in range(self.o.clients)]
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        swept = await self.sweep()
        return {"elapsed_s": elapsed, "swept_contexts": swept}


class Sampler:
    """Samples the server's RSS and thread count every ``interval_s`` in a thread; keeps the peaks."""

    def __init__(self, server: KvwireProcess, interval_s: float = 0.25):
        self.server = server
        self.interval_s = interval_s
        self.peak_rss = 0
        self.peak_threads = 0
        self.samples: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):
                rss, threads = self.server.rss_and_threads()
                self.samples.append((rss, threads))
                self.peak_rss = max(self.peak_rss, rss)
                self.peak_threads = max(self.peak_threads, threads)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(options: SoakOptions) -> dict[str, Any]:
    """Start redis-server and ``kvwire serve``, run the soak, stop both; return the report."""
    with contextlib.ExitStack() as stack:
        workdir = options.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="kvwire-soak-"))
        )
        keys = {t: f"{t}-key-{os.urandom(6).hex()}" for t in TENANTS}
        redis = RedisProcess(workdir / "redis", persist=False)
        redis.start()
        stack.callback(redis.kill)
        env = {
            "KVWIRE_STORE": "redis",
            "KVWIRE_REDIS_URL": redis.url,
            "KVWIRE_API_KEYS": ",".join(f"{t}:{k}" for t, k in keys.items()),
            "KVWIRE_CHUNK_TOKENS": str(options.chunk_tokens),
            "KVWIRE_LEVELS": str(options.level),
            "KVWIRE_INLINE_MAX_TOKENS": str(options.chunk_tokens * options.context_chunks),
            "KVWIRE_GRPC_MAX_WORKERS": "32",
        }
        if options.model:
            env["KVWIRE_MODEL"] = options.model
        env.update(options.extra_env)
        server = KvwireProcess(workdir / "server", env)
        server.start(timeout_s=options.startup_timeout_s)
        stack.callback(server.stop)
        soak = Soak(options, server, keys)
        rss_idle, threads_idle = server.rss_and_threads()
        asyncio.run(soak.build_reference())
        rss_ready, threads_ready = server.rss_and_threads()
        stack.callback(lambda: soak.decoder.close() if soak.decoder else None)
        with Sampler(server) as sampler:
            timing = asyncio.run(soak.run())
        log_text = server.log_path.read_text(errors="replace")
        timeouts_fired = {
            "http_connections_closed": log_text.count("closing HTTP connection"),
            "grpc_streams_cancelled": log_text.count("cancelling a gRPC stream"),
        }
        s = soak.stats
        lat = s.chunk_latency_s
        chunk_bytes = [n for ref in soak.refs for n in ref.nbytes]
        return {
            "options": {
                k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(options).items()
            },
            "elapsed_s": round(timing["elapsed_s"], 1),
            "requests": s.requests,
            "requests_per_s": round(s.requests / timing["elapsed_s"], 1),
            "ingests": s.ingests,
            "loads": s.loads,
            "streams": s.streams,
            "chunks_verified": s.chunks_verified,
            "chunk_mb_verified": round(s.bytes_verified / 1e6, 1),
            "chunks_decoded_and_compared": s.chunks_decoded,
            "errors": sum(s.errors.values()),
            "errors_by_kind": dict(s.errors),
            "status_5xx": s.status_5xx,
            "lost": s.lost,
            "corrupted": s.corrupted,
            "swept_contexts": timing["swept_contexts"],
            "chunk_requests_timed": len(lat),
            "chunk_bytes_mean": int(sum(chunk_bytes) / max(1, len(chunk_bytes))),
            "chunk_bytes_min": min(chunk_bytes, default=0),
            "chunk_latency_p50_ms": round(percentile(lat, 50) * 1e3, 2),
            "chunk_latency_p99_ms": round(percentile(lat, 99) * 1e3, 2),
            "server_rss_idle_mb": round(rss_idle / 2**20, 1),
            "server_rss_after_reference_mb": round(rss_ready / 2**20, 1),
            "server_rss_peak_mb": round(sampler.peak_rss / 2**20, 1),
            "server_rss_end_mb": round((sampler.samples[-1][0] if sampler.samples else 0) / 2**20, 1),
            "server_threads_idle": threads_idle,
            "server_threads_ready": threads_ready,
            "server_threads_peak": sampler.peak_threads,
            "server_timeouts_fired": timeouts_fired,
            "problems": s.problems,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        }


def markdown(report: dict[str, Any]) -> str:
    o = report["options"]
    rows = [
        (
            "clients (REST + gRPC)",
            f"{o['clients']} ({o['clients'] - o['clients'] // 2} + {o['clients'] // 2})",
        ),
        ("duration", f"{report['elapsed_s']} s"),
        ("requests served", f"{report['requests']} ({report['requests_per_s']}/s)"),
        (
            "ingests / loads (of which gRPC streams)",
            f"{report['ingests']} / {report['loads']} ({report['streams']})",
        ),
        (
            "chunks verified (crc32 + sha256)",
            f"{report['chunks_verified']} ({report['chunk_mb_verified']} MB)",
        ),
        ("chunks decoded and compared", str(report["chunks_decoded_and_compared"])),
        (
            "errors / 5xx / lost / corrupted",
            f"{report['errors']} / {report['status_5xx']} / {report['lost']} / {report['corrupted']}",
        ),
        ("contexts swept after the run", str(report["swept_contexts"])),
        ("chunk size (mean, min)", f"{report['chunk_bytes_mean']:,} B, {report['chunk_bytes_min']:,} B"),
        (
            "single-chunk latency p50 / p99",
            f"{report['chunk_latency_p50_ms']} ms / {report['chunk_latency_p99_ms']} ms",
        ),
        (
            "server RSS idle / after reference / peak / end",
            f"{report['server_rss_idle_mb']} / {report['server_rss_after_reference_mb']} / "
            f"{report['server_rss_peak_mb']} / {report['server_rss_end_mb']} MiB",
        ),
        ("server threads idle / peak", f"{report['server_threads_idle']} / {report['server_threads_peak']}"),
    ]
    lines = ["| measure | value |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = SoakOptions()
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--chunk-tokens", type=int, default=defaults.chunk_tokens)
    parser.add_argument("--level", type=int, default=defaults.level, help="the one level encoded and loaded")
    parser.add_argument("--contexts", type=int, default=defaults.contexts)
    parser.add_argument("--context-chunks", type=int, default=defaults.context_chunks)
    parser.add_argument("--decode-every", type=int, default=defaults.decode_every)
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: bundled SmolLM2)")
    parser.add_argument("--out", type=Path, help="write the JSON report and Markdown table here")
    parser.add_argument(
        "--workdir", type=Path, help="keep the servers' data and logs here (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    options = SoakOptions(
        clients=args.clients,
        seconds=args.seconds,
        chunk_tokens=args.chunk_tokens,
        level=args.level,
        contexts=args.contexts,
        context_chunks=args.context_chunks,
        decode_every=args.decode_every,
        model=args.model,
        workdir=args.workdir,
    )
    report = run(options)
    text = json.dumps(report, indent=2) + "\n\n" + markdown(report) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    ok = report["lost"] == 0 and report["corrupted"] == 0 and report["status_5xx"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
