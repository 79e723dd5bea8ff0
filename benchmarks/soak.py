"""Soak test (issue 6, "Load"): N concurrent clients ingest and load contexts through REST and gRPC.

Usage: ``python benchmarks/soak.py [--clients 64] [--seconds 60] [--chunk-tokens 400] [--level 2]
[--serve-workers N --ingest-workers M] [--client-processes P] [--model DIR] [--env KVWIRE_X=V]
[--out FILE]``
(a random-weight model of a real shape: ``benchmarks/random_model.py``).

Starts its own redis-server on a free loopback port and a real ``kvwire serve`` subprocess (REST and
gRPC, Redis store, API keys for 4 tenants), in one of two deployments:

* *embedded* (the default): one serving process with the embedded worker (the bundled model unless
  ``--model`` is given), ingests inline;
* *scaled* (``--ingest-workers M``, M >= 1): ``kvwire serve --workers N`` (``--serve-workers``: N
  processes sharing the REST and gRPC ports, no model) and M ``kvwire worker`` processes doing the
  ingests through the Redis job queue (``KVWIRE_JOBS_REDIS_URL``, the same redis-server, db 1); an
  ingest answers 202 + a job, which the client polls until it is done, then reads the manifest.

Then:

1. *reference*: tenant t0 ingests ``--contexts`` contexts of ``--context-chunks`` chunks of random token
   ids and fetches every chunk: its sha256 and its decode with ``kvwire.kernels.codec.decode_chunk``
   (profile fetched from the server) are the reference; every other tenant then ingests the same
   contexts once (chunk keys are per tenant), so that the model runs only in this phase;
2. *soak*: ``--clients`` clients (half REST with async httpx, half gRPC with ``grpc.aio``, one
   keep-alive connection each), spread over ``--client-processes`` processes (contiguous blocks, each
   with its own event loop and decoder process; results merged), loop for ``--seconds``: ingest (20%)
   one of the reference token sequences under a new context id (content-addressed, so the chunks are
   reused: the manifest must name the reference keys and checksums), or load (80%) one of their
   contexts: manifest, then every chunk one request each (REST ``GET .../chunks/i``, gRPC ``GetChunk``;
   one gRPC load in four uses ``StreamContext`` instead). Every chunk is checked: crc32 against the
   manifest (and the ``X-Kvwire-Checksum`` header), sha256 against the reference bytes (in a thread,
   off the event loop); every ``--decode-every``-th chunk is also decoded and compared exactly with the
   reference decode;
3. *sweep*: every context acknowledged during the soak must still have its manifest (none lost), then
   ``--settle`` seconds idle and a last memory sample.

Reports requests, errors (by kind), 5xx, lost and corrupted chunks, p50/p99 latency of single-chunk
requests (all, REST, gRPC ``GetChunk``) and the RSS and thread count of every serving process (the
``kvwire serve`` process tree and the ``kvwire worker`` processes; psutil, sampled every 0.25 s): sums
and the largest process. Prints JSON and a Markdown table, and writes both to ``--out`` if given.
``run(SoakOptions(...))`` is the same from Python (tests/faults/test_soak.py runs short ones).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import platform
import queue
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.processes import KvwireProcess, KvwireWorkerProcess, RedisProcess
from kvwire.kernels.format import crc32_hex

TENANTS = ("t0", "t1", "t2", "t3")
CALL_TIMEOUT_S = 120.0  # per request; a saturated, shared machine can queue a request for many seconds
JOB_POLL_S = (0.005, 0.05)  # first and longest pause between polls of a queued ingest job


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
    extra_env: dict[str, str] = field(default_factory=dict)  # more variables for every kvwire process
    # The scaled deployment: serve_workers API processes (kvwire serve --workers) and ingest_workers
    # kvwire worker processes on the Redis job queue. ingest_workers 0: one process, embedded worker.
    serve_workers: int = 1
    ingest_workers: int = 0
    client_processes: int = 1  # the clients are spread over this many processes
    settle_s: float = 5.0  # idle time after the sweep before the last memory sample

    def check(self) -> None:
        """Refuse combinations the deployment cannot run."""
        if self.serve_workers > 1 and self.ingest_workers < 1:
            raise ValueError("--serve-workers > 1 needs --ingest-workers >= 1 (the Redis job queue)")
        if not 1 <= self.client_processes <= max(1, self.clients):
            raise ValueError("--client-processes must be in [1, --clients]")

    @property
    def scaled(self) -> bool:
        return self.ingest_workers > 0

    @property
    def deployment(self) -> str:
        if self.scaled:
            return f"kvwire serve --workers {self.serve_workers} + {self.ingest_workers} kvwire worker"
        return "one kvwire serve process, embedded worker"


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
    rest_latency_s: list[float] = field(default_factory=list)  # single-chunk requests, REST GET
    grpc_latency_s: list[float] = field(default_factory=list)  # single-chunk requests, gRPC GetChunk
    problems: list[str] = field(default_factory=list)

    def problem(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.problems) < 20:
            self.problems.append(f"{kind}: {detail}")

    def merge(self, other: Stats) -> None:
        """Add another client process's counts, latencies and problems to these."""
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, Counter):
                mine.update(theirs)
            elif isinstance(mine, list):
                mine.extend(theirs)
            else:
                setattr(self, f.name, mine + theirs)
        del self.problems[20:]


# ------------------------------------------------------------------------------------------ helpers


def addresses(keys: list[str]) -> list[str]:
    """Chunk keys without their tenant namespace (``t/<tenant>/``): the same text ingested by two
    tenants gets the same content address, under each tenant's own prefix."""
    return [k.split("/", 2)[2] if k.startswith("t/") else k for k in keys]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _checks(data: bytes) -> tuple[str, str]:
    """(crc32 hex, sha256 hex) of a chunk; both release the GIL, so they run in a thread."""
    return crc32_hex(data), sha(data)


def say(message: str) -> None:
    """A progress line on stderr (a run cut short by a timeout still shows how far it got)."""
    print(f"soak {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


_DECODER: dict[str, Any] = {}


def _decoder_init(profile_bytes: bytes, fingerprint: str) -> None:
    import torch

    from kvwire.kernels.profile import CalibrationProfile

    torch.set_num_threads(1)  # one core: the decoder must not take the serving processes' cores

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
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_decoder_init,
            initargs=(profile_bytes, fingerprint),
        )

    async def digest(self, data: bytes) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._pool, _decode_digest, data)

    def digest_now(self, data: bytes) -> str:
        """:meth:`digest`, waiting: the first call starts the process and loads the decoder."""
        return str(self._pool.submit(_decode_digest, data).result())

    def close(self) -> None:
        self._pool.shutdown()


class JobFailed(Exception):
    """A queued ingest ended ``failed`` or did not end in time (already recorded as a problem)."""


# ----------------------------------------------------------------------------------------- the soak


class Soak:
    """The reference, the clients and the sweep against one deployment (``base_url``: REST,
    ``grpc_target``: gRPC); one per client process, holding that process's :class:`Stats`."""

    def __init__(self, options: SoakOptions, base_url: str, grpc_target: str, keys: dict[str, str]):
        self.o = options
        self.base_url = base_url
        self.grpc_target = grpc_target
        self.keys = keys
        self.stats = Stats()
        self.refs: list[Reference] = []
        self.decoder: Decoder | None = None
        self.profile_bytes = b""
        self.fingerprint = ""
        self.first_chunk = b""  # reference 0's chunk 0: warms up each client process's decoder
        self.acknowledged: list[tuple[str, str, int]] = []  # (tenant, context id, reference index)
        self.deadline = 0.0

    # -- reference

    async def build_reference(self) -> None:
        """Every tenant ingests the reference contexts (all at once, so that every ingest worker is
        busy; chunk keys are per tenant, so each tenant's first ingest runs the model, and the soak's
        ingests then all reuse stored chunks); t0's chunks are fetched and decoded: the reference.
        Raises if anything went wrong; the soak's counts start from zero afterwards."""
        import httpx

        rng = random.Random(self.o.seed)
        n_tokens = self.o.chunk_tokens * self.o.context_chunks
        contexts = [[rng.randrange(1, self.o.vocab) for _ in range(n_tokens)] for _ in range(self.o.contexts)]
        wait_s = self.o.startup_timeout_s
        done = 0

        async def ingest(client: Any, tenant: str, i: int) -> dict[str, Any] | None:
            nonlocal done
            manifest = await self.rest_create(client, contexts[i], f"ref-{i}", wait_s)
            done += 1
            say(f"reference ingest {done} of {len(TENANTS) * len(contexts)} done ({tenant} ref-{i})")
            return manifest

        async def ingest_all(tenant: str) -> list[dict[str, Any] | None]:
            headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
            async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=600) as client:
                return list(await asyncio.gather(*(ingest(client, tenant, i) for i in range(len(contexts)))))

        manifests = await asyncio.gather(*(ingest_all(t) for t in TENANTS))
        if self.stats.errors:
            raise RuntimeError(f"reference ingests failed: {self.stats.problems}")
        headers = {"Authorization": f"Bearer {self.keys[TENANTS[0]]}"}
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=600) as client:
            for i, (ids, manifest) in enumerate(zip(contexts, manifests[0], strict=True)):
                assert manifest is not None
                entries = [self._entry(c) for c in manifest["chunks"]]
                if self.decoder is None:
                    profile = await client.get(f"/v1/profiles/{manifest['profile_digest']}")
                    profile.raise_for_status()
                    self.profile_bytes = profile.content
                    self.fingerprint = manifest["model_fingerprint"]
                    self.decoder = Decoder(self.profile_bytes, self.fingerprint)
                datas = []
                for c, entry in enumerate(entries):
                    got = await client.get(f"/v1/contexts/ref-{i}/chunks/{c}", params={"level": self.o.level})
                    got.raise_for_status()
                    assert crc32_hex(got.content) == entry["checksum"], "reference chunk fails its checksum"
                    datas.append(got.content)
                decoded = [await self.decoder.digest(d) for d in datas]
                self.first_chunk = self.first_chunk or datas[0]
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
        for tenant, theirs in zip(TENANTS[1:], manifests[1:], strict=True):
            for i, (ref, manifest) in enumerate(zip(self.refs, theirs, strict=True)):
                assert manifest is not None
                entries = [self._entry(c) for c in manifest["chunks"]]
                keys, sums = [e["key"] for e in entries], [e["checksum"] for e in entries]
                self.check_manifest(ref, keys, sums, f"{tenant} ref-{i}")
        if self.stats.errors:
            raise RuntimeError(f"building the reference failed: {self.stats.problems}")
        self.stats = Stats()

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
        got_crc, got_sha = await asyncio.to_thread(_checks, data)
        if got_crc != checksum or checksum != ref.checksums[index] or got_sha != ref.sha256[index]:
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

    # -- REST clients

    async def rest_client(self, n: int) -> None:
        import httpx

        tenant = TENANTS[n % len(TENANTS)]
        rng = random.Random(self.o.seed * 1000 + n)
        mine: list[tuple[str, int]] = []
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=CALL_TIMEOUT_S, limits=limits
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

    async def rest_create(
        self, client: Any, token_ids: list[int], cid: str, wait_s: float = CALL_TIMEOUT_S
    ) -> dict[str, Any] | None:
        """``POST /v1/contexts``; if the ingest was queued (202), poll its job until it is done and
        read the manifest. The manifest's JSON, or None after recording what went wrong."""
        r = await client.post("/v1/contexts", json={"token_ids": token_ids, "context_id": cid})
        if not self._status(r, f"ingest {cid}"):
            return None
        if r.status_code != 202:
            return dict(r.json())
        job_id = r.json()["id"]
        deadline, pause = time.monotonic() + wait_s, JOB_POLL_S[0]
        while True:
            await asyncio.sleep(pause)
            pause = min(2 * pause, JOB_POLL_S[1])
            j = await client.get(f"/v1/jobs/{job_id}")
            if not self._status(j, f"job {job_id} of {cid}"):
                return None
            job = j.json()
            if job["state"] == "done":
                break
            if job["state"] == "failed":
                self.stats.problem("job-failed", f"{cid}: {job['error']}")
                return None
            if time.monotonic() > deadline:
                self.stats.problem("job-timeout", f"{cid}: {job['state']} after {wait_s} s")
                return None
        m = await client.get(f"/v1/contexts/{cid}")
        return dict(m.json()) if self._status(m, f"manifest {cid}") else None

    async def rest_ingest(
        self, client: Any, tenant: str, cid: str, rng: random.Random, mine: list[Any]
    ) -> None:
        i = rng.randrange(len(self.refs))
        manifest = await self.rest_create(client, self.refs[i].token_ids, cid)
        if manifest is None:
            return
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
            self.stats.rest_latency_s.append(elapsed)
            header = got.headers.get("X-Kvwire-Checksum", "")
            if header != entry["checksum"]:
                self.stats.corrupted += 1
                self.stats.problem("header-mismatch", f"{cid}/{index}")
            await self.verify(ref, index, got.content, entry["checksum"], f"rest {cid}")
        self.stats.loads += 1

    # -- gRPC clients

    async def grpc_client(self, n: int) -> None:
        import grpc

        from kvwire._proto import CHANNEL_OPTIONS
        from kvwire._proto import kvwire_pb2 as pb
        from kvwire._proto import kvwire_pb2_grpc as pb_grpc

        tenant = TENANTS[n % len(TENANTS)]
        rng = random.Random(self.o.seed * 1000 + n)
        mine: list[tuple[str, int]] = []
        metadata = (("authorization", f"Bearer {self.keys[tenant]}"),)
        async with grpc.aio.insecure_channel(self.grpc_target, options=list(CHANNEL_OPTIONS)) as channel:
            stub = pb_grpc.KvwireStub(channel)
            seq = 0
            while time.monotonic() < self.deadline:
                try:
                    if not mine or rng.random() < self.o.ingest_share:
                        seq += 1
                        i = rng.randrange(len(self.refs))
                        cid = f"g{n}-{seq}"
                        manifest = await self.grpc_create(stub, pb, metadata, self.refs[i].token_ids, cid)
                        self.stats.ingests += 1
                        keys, sums = self._grpc_entries(manifest)
                        if self.check_manifest(self.refs[i], keys, sums, cid):
                            mine.append((cid, i))
                            self.acknowledged.append((tenant, cid, i))
                    else:
                        cid, i = rng.choice(mine)
                        if rng.random() < 0.25:
                            await self.grpc_stream(stub, pb, metadata, cid, i)
                        else:
                            await self.grpc_load(stub, pb, metadata, cid, i)
                except JobFailed:
                    pass
                except grpc.aio.AioRpcError as exc:
                    self.stats.requests += 1
                    code = exc.code()
                    if code == grpc.StatusCode.NOT_FOUND:
                        self.stats.lost += 1
                    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS):
                        self.stats.status_5xx += 1
                    self.stats.problem(f"grpc-{code.name}", (exc.details() or "")[:200])

    async def grpc_create(self, stub: Any, pb: Any, metadata: Any, token_ids: list[int], cid: str) -> Any:
        """``CreateContext``; if the ingest was queued, poll ``GetJob`` until it is done, then
        ``GetManifest``. The manifest message; ``JobFailed`` if the job failed or took too long."""
        request = pb.CreateContextRequest(context_id=cid, token_ids=pb.TokenIds(ids=token_ids))
        response = await stub.CreateContext(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        self.stats.requests += 1
        if response.WhichOneof("result") == "manifest":
            return response.manifest
        job_id = response.job.id
        deadline, pause = time.monotonic() + CALL_TIMEOUT_S, JOB_POLL_S[0]
        while True:
            await asyncio.sleep(pause)
            pause = min(2 * pause, JOB_POLL_S[1])
            job = await stub.GetJob(
                pb.GetJobRequest(job_id=job_id), metadata=metadata, timeout=CALL_TIMEOUT_S
            )
            self.stats.requests += 1
            if job.state == pb.JOB_STATE_DONE:
                break
            if job.state == pb.JOB_STATE_FAILED:
                self.stats.problem("job-failed", f"{cid}: {job.error.type}: {job.error.message}")
                raise JobFailed(cid)
            if time.monotonic() > deadline:
                self.stats.problem("job-timeout", f"{cid}: state {job.state} after {CALL_TIMEOUT_S} s")
                raise JobFailed(cid)
        manifest = await stub.GetManifest(
            pb.GetManifestRequest(context_id=cid), metadata=metadata, timeout=CALL_TIMEOUT_S
        )
        self.stats.requests += 1
        return manifest

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
            self.stats.grpc_latency_s.append(time.perf_counter() - started)
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

    # -- the sweep

    async def sweep(self) -> int:
        """Every acknowledged context still has its manifest; returns how many were checked."""
        import httpx

        sem = asyncio.Semaphore(16)
        clients = {
            t: httpx.AsyncClient(
                base_url=self.base_url, headers={"Authorization": f"Bearer {k}"}, timeout=CALL_TIMEOUT_S
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

    async def run_clients(self, indices: range) -> None:
        """Clients ``indices`` (odd: gRPC, even: REST) until ``seconds`` from now, then their last
        operation."""
        self.deadline = time.monotonic() + self.o.seconds
        await asyncio.gather(*(self.grpc_client(n) if n % 2 else self.rest_client(n) for n in indices))


def client_blocks(clients: int, processes: int) -> list[range]:
    """Client indices per process, in contiguous blocks (so each holds REST and gRPC clients)."""
    return [range(p * clients // processes, (p + 1) * clients // processes) for p in range(processes)]


def _client_process(soak: Soak, indices: range, barrier: Any, results: Any) -> None:
    """A client process's entry point: its own decoder (started and checked on a reference chunk, so
    that no client waits for it during the soak), wait for every process, run ``indices``, send back
    ``(stats, acknowledged)``."""
    soak.decoder = Decoder(soak.profile_bytes, soak.fingerprint)
    try:
        try:
            if soak.decoder.digest_now(soak.first_chunk) != soak.refs[0].decoded[0]:
                raise RuntimeError("a client process's decoder disagrees with the reference decode")
        except BaseException:
            barrier.abort()  # the parent and the other processes stop waiting
            raise
        barrier.wait(timeout=300)
        asyncio.run(soak.run_clients(indices))
        results.put((soak.stats, soak.acknowledged))
    finally:
        soak.decoder.close()


def run_clients(soak: Soak) -> float:
    """Every client of the soak, in this process or spread over ``client_processes`` (each pickles
    a copy of ``soak`` without its decoder); counts and acknowledged contexts merged into ``soak``.
    Returns the seconds from the clients' start (once every process is ready) to the last one's end."""
    o = soak.o
    if o.client_processes <= 1:
        started = time.monotonic()
        asyncio.run(soak.run_clients(range(o.clients)))
        return time.monotonic() - started
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(o.client_processes + 1)
    results = context.Queue()
    decoder, soak.decoder = soak.decoder, None  # a pool does not travel; each process starts its own
    try:
        processes = [
            context.Process(
                target=_client_process, args=(soak, block, barrier, results), name=f"soak-clients-{p}"
            )
            for p, block in enumerate(client_blocks(o.clients, o.client_processes))
        ]
        for process in processes:
            process.start()
        barrier.wait(timeout=300)  # every process imported its libraries and started its decoder
        started = time.monotonic()
        deadline = started + o.seconds + 2 * CALL_TIMEOUT_S + 60
        for _ in processes:
            while True:
                try:
                    stats, acknowledged = results.get(timeout=1)
                    break
                except queue.Empty:
                    failed = [p.name for p in processes if p.exitcode not in (None, 0)]
                    if failed or time.monotonic() > deadline:
                        raise RuntimeError(f"client processes failed or hung: {failed}") from None
            soak.stats.merge(stats)
            soak.acknowledged.extend(acknowledged)
        elapsed = time.monotonic() - started
        for process in processes:
            process.join(30)
        return elapsed
    finally:
        soak.decoder = decoder


# ------------------------------------------------------------------------------------------ memory


@dataclass
class MemorySample:
    """RSS (bytes) summed over the API processes and over the ingest workers, the largest single
    process, and threads summed over all."""

    api_rss: int
    worker_rss: int
    max_rss: int
    threads: int

    @property
    def rss(self) -> int:
        return self.api_rss + self.worker_rss


def sample_memory(api: list[Any], workers: list[Any]) -> MemorySample:
    """One :class:`MemorySample` of the serving processes (psutil processes)."""
    api_rss = [int(p.memory_info().rss) for p in api]
    worker_rss = [int(p.memory_info().rss) for p in workers]
    threads = sum(int(p.num_threads()) for p in [*api, *workers])
    return MemorySample(sum(api_rss), sum(worker_rss), max(api_rss + worker_rss), threads)


class Sampler:
    """Samples the serving processes' memory every ``interval_s`` in a thread; keeps the peaks."""

    def __init__(self, api: list[Any], workers: list[Any], interval_s: float = 0.25):
        self.api = api
        self.workers = workers
        self.interval_s = interval_s
        self.samples: list[MemorySample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):
                self.samples.append(sample_memory(self.api, self.workers))

    def peak(self, what: str) -> int:
        return max((getattr(s, what) for s in self.samples), default=0)

    def quarters(self, what: str) -> list[int]:
        """``what`` at the end of each quarter of the sampled time: growth that levels off is the
        allocator's and the caches' high-water mark, growth that goes on is a leak."""
        n = len(self.samples)
        return [getattr(self.samples[max(0, n * k // 4 - 1)], what) for k in range(1, 5)] if n else []

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def _ms(values: list[float], q: float) -> float:
    return round(percentile(values, q) * 1e3, 2)


def run(options: SoakOptions) -> dict[str, Any]:
    """Start redis-server, ``kvwire serve`` (and ``kvwire worker``s), run the soak, stop them all;
    return the report."""
    options.check()
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
        if options.scaled:
            env["KVWIRE_JOBS_REDIS_URL"] = redis.url[:-1] + "1"
            env["KVWIRE_WORKERS"] = str(options.serve_workers)
        env.update(options.extra_env)
        server = KvwireProcess(workdir / "server", env)
        stack.callback(server.stop)
        # Each worker's torch gets its share of the cores: M workers prefilling at once with a thread
        # per core each oversubscribe the machine (OMP_NUM_THREADS in --env overrides).
        threads = str(max(1, (os.cpu_count() or 1) // max(1, options.ingest_workers)))
        worker_env = {"OMP_NUM_THREADS": threads, **env}
        workers = [
            KvwireWorkerProcess(workdir / f"worker-{w}", worker_env) for w in range(options.ingest_workers)
        ]
        for worker in workers:
            stack.callback(worker.stop)
        say(f"starting {options.deployment}")
        with concurrent.futures.ThreadPoolExecutor(max(1, len(workers))) as pool:
            starting = [pool.submit(server.start, timeout_s=options.startup_timeout_s)]
            if workers:  # the first alone: it calibrates the model if no profile is cached
                workers[0].start(timeout_s=options.startup_timeout_s)
            starting += [pool.submit(w.start, timeout_s=options.startup_timeout_s) for w in workers[1:]]
            for future in starting:
                future.result()
        import psutil

        api = server.wait_serving(options.serve_workers if options.scaled else 1, options.startup_timeout_s)
        worker_processes = [psutil.Process(w.pid) for w in workers]
        say(f"{len(api)} API and {len(workers)} worker processes ready; building the reference")
        soak = Soak(options, server.base_url, server.grpc_target, keys)
        idle = sample_memory(api, worker_processes)
        asyncio.run(soak.build_reference())
        ready = sample_memory(api, worker_processes)
        stack.callback(lambda: soak.decoder.close() if soak.decoder else None)
        say(f"reference built; {options.clients} clients for {options.seconds} s")
        with Sampler(api, worker_processes) as sampler:
            elapsed = run_clients(soak)
        end = sampler.samples[-1] if sampler.samples else ready
        say(f"clients done after {elapsed:.1f} s; sweeping {len(soak.acknowledged)} contexts")
        swept = asyncio.run(soak.sweep())
        time.sleep(options.settle_s)
        settled = sample_memory(api, worker_processes)
        say("done; stopping the servers")
        log_text = "".join(p.log_path.read_text(errors="replace") for p in [server, *workers])
        timeouts_fired = {
            "http_connections_closed": log_text.count("closing HTTP connection"),
            "grpc_streams_cancelled": log_text.count("cancelling a gRPC stream"),
        }
        s = soak.stats
        lat = s.rest_latency_s + s.grpc_latency_s
        chunk_bytes = [n for ref in soak.refs for n in ref.nbytes]
        return {
            "options": {
                k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(options).items()
            },
            "deployment": options.deployment,
            "elapsed_s": round(elapsed, 1),
            "requests": s.requests,
            "requests_per_s": round(s.requests / elapsed, 1),
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
            "swept_contexts": swept,
            "chunk_requests_timed": len(lat),
            "chunk_requests_timed_rest": len(s.rest_latency_s),
            "chunk_requests_timed_grpc": len(s.grpc_latency_s),
            "chunk_bytes_mean": int(sum(chunk_bytes) / max(1, len(chunk_bytes))),
            "chunk_bytes_min": min(chunk_bytes, default=0),
            "chunk_bytes_max": max(chunk_bytes, default=0),
            "chunk_latency_p50_ms": _ms(lat, 50),
            "chunk_latency_p99_ms": _ms(lat, 99),
            "chunk_latency_max_ms": round(max(lat, default=float("nan")) * 1e3, 2),
            "rest_chunk_latency_p50_ms": _ms(s.rest_latency_s, 50),
            "rest_chunk_latency_p99_ms": _ms(s.rest_latency_s, 99),
            "grpc_chunk_latency_p50_ms": _ms(s.grpc_latency_s, 50),
            "grpc_chunk_latency_p99_ms": _ms(s.grpc_latency_s, 99),
            "server_processes": {"api": len(api), "ingest_workers": len(worker_processes)},
            # RSS summed over every serving process (API processes and ingest workers)
            "server_rss_idle_mb": _mib(idle.rss),
            "server_rss_after_reference_mb": _mib(ready.rss),
            "server_rss_peak_mb": _mib(sampler.peak("rss")),
            "server_rss_end_mb": _mib(end.rss),
            "server_rss_settled_mb": _mib(settled.rss),
            "api_rss_after_reference_mb": _mib(ready.api_rss),
            "api_rss_peak_mb": _mib(sampler.peak("api_rss")),
            "api_rss_settled_mb": _mib(settled.api_rss),
            "worker_rss_after_reference_mb": _mib(ready.worker_rss),
            "worker_rss_peak_mb": _mib(sampler.peak("worker_rss")),
            "worker_rss_settled_mb": _mib(settled.worker_rss),
            "largest_process_rss_peak_mb": _mib(sampler.peak("max_rss")),
            "server_rss_by_quarter_mb": [_mib(v) for v in sampler.quarters("rss")],
            "api_rss_by_quarter_mb": [_mib(v) for v in sampler.quarters("api_rss")],
            "server_threads_idle": idle.threads,
            "server_threads_ready": ready.threads,
            "server_threads_peak": sampler.peak("threads"),
            "server_threads_settled": settled.threads,
            "server_timeouts_fired": timeouts_fired,
            "problems": s.problems,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        }


def markdown(report: dict[str, Any]) -> str:
    o = report["options"]
    procs = report["server_processes"]
    rows = [
        ("deployment", report["deployment"]),
        (
            "clients (REST + gRPC), client processes",
            f"{o['clients']} ({o['clients'] - o['clients'] // 2} + {o['clients'] // 2}), "
            f"{o['client_processes']}",
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
        (
            "chunk size (mean, min, max)",
            f"{report['chunk_bytes_mean']:,} B, {report['chunk_bytes_min']:,} B, "
            f"{report['chunk_bytes_max']:,} B",
        ),
        (
            f"single-chunk latency p50 / p99 / max (all, {report['chunk_requests_timed']})",
            f"{report['chunk_latency_p50_ms']} / {report['chunk_latency_p99_ms']} / "
            f"{report['chunk_latency_max_ms']} ms",
        ),
        (
            f"REST `GET .../chunks/i` p50 / p99 ({report['chunk_requests_timed_rest']})",
            f"{report['rest_chunk_latency_p50_ms']} / {report['rest_chunk_latency_p99_ms']} ms",
        ),
        (
            f"gRPC `GetChunk` p50 / p99 ({report['chunk_requests_timed_grpc']})",
            f"{report['grpc_chunk_latency_p50_ms']} / {report['grpc_chunk_latency_p99_ms']} ms",
        ),
        (
            f"server RSS, sum of {procs['api']} API + {procs['ingest_workers']} worker processes: "
            "idle / after reference / peak / end of load / settled",
            f"{report['server_rss_idle_mb']} / {report['server_rss_after_reference_mb']} / "
            f"{report['server_rss_peak_mb']} / {report['server_rss_end_mb']} / "
            f"{report['server_rss_settled_mb']} MiB",
        ),
        (
            "API processes' RSS: after reference / peak / settled",
            f"{report['api_rss_after_reference_mb']} / {report['api_rss_peak_mb']} / "
            f"{report['api_rss_settled_mb']} MiB",
        ),
        (
            "ingest workers' RSS: after reference / peak / settled",
            f"{report['worker_rss_after_reference_mb']} / {report['worker_rss_peak_mb']} / "
            f"{report['worker_rss_settled_mb']} MiB",
        ),
        (
            "API processes' RSS at the end of each quarter of the load",
            " / ".join(str(v) for v in report["api_rss_by_quarter_mb"]) + " MiB",
        ),
        ("largest single process RSS, peak", f"{report['largest_process_rss_peak_mb']} MiB"),
        (
            "server threads idle / peak / settled",
            f"{report['server_threads_idle']} / {report['server_threads_peak']} / "
            f"{report['server_threads_settled']}",
        ),
    ]
    lines = ["| measure | value |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    defaults = SoakOptions()
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--chunk-tokens", type=int, default=defaults.chunk_tokens)
    parser.add_argument("--level", type=int, default=defaults.level, help="the one level encoded and loaded")
    parser.add_argument("--contexts", type=int, default=defaults.contexts)
    parser.add_argument("--context-chunks", type=int, default=defaults.context_chunks)
    parser.add_argument("--decode-every", type=int, default=defaults.decode_every)
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: bundled SmolLM2)")
    parser.add_argument(
        "--serve-workers",
        type=int,
        default=defaults.serve_workers,
        help="API processes: kvwire serve --workers N (more than 1 needs --ingest-workers)",
    )
    parser.add_argument(
        "--ingest-workers",
        type=int,
        default=defaults.ingest_workers,
        help="kvwire worker processes on the Redis job queue (0: the embedded worker, ingests inline)",
    )
    parser.add_argument(
        "--client-processes", type=int, default=defaults.client_processes, help="processes the clients run in"
    )
    parser.add_argument(
        "--settle", type=float, default=defaults.settle_s, help="idle seconds before the last RSS"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KVWIRE_X=VALUE",
        help="a setting for every kvwire process (repeatable; KVWIRE_* variables of this shell are not "
        "passed on), e.g. --env KVWIRE_DEVICE=cpu",
    )
    parser.add_argument("--out", type=Path, help="write the JSON report and Markdown table here")
    parser.add_argument(
        "--workdir", type=Path, help="keep the servers' data and logs here (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.env):
        parser.error("--env takes KEY=VALUE")
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
        serve_workers=args.serve_workers,
        ingest_workers=args.ingest_workers,
        client_processes=args.client_processes,
        settle_s=args.settle,
        extra_env=dict(item.split("=", 1) for item in args.env),
    )
    try:
        options.check()
    except ValueError as exc:
        parser.error(str(exc))
    report = run(options)
    text = json.dumps(report, indent=2) + "\n\n" + markdown(report) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    ok = report["lost"] == 0 and report["corrupted"] == 0 and report["status_5xx"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    # Run as benchmarks.soak, not __main__: the client processes (spawn) unpickle its classes by name.
    from benchmarks.soak import main as _main

    sys.exit(_main())
