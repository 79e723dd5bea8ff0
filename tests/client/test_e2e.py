"""End to end: `kvwire serve` as a subprocess (REST + gRPC, local store, bundled SmolLM2), the SDK
ingesting a real text and loading it back into the test process's own copy of the model.

One server and one ingested context (~700 tokens, 3 chunks) are shared by the module. The server's
profile directory is seeded with the calibration profile cached on this machine, so the subprocess
does not calibrate again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvwire.client import Client, RetryPolicy
from kvwire.client.sdk import Answer, LoadedContext, generate_answer
from kvwire.controller import Mode
from kvwire.manifest import ContextManifest
from kvwire.model import cache_to_tensor

from ..storage.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

API_KEY = "e2e-key"
QUESTION = "\n\nQuestion: What is the name of this license?\nAnswer:"
NEW_TOKENS = 16


@dataclass
class ServerProcess:
    """`kvwire serve` in a subprocess, restartable on the same ports and data directory."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout_s: float = 300.0) -> None:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "KVWIRE_DATA_DIR": str(self.data_dir),
            "KVWIRE_STORE": "local",
            "KVWIRE_API_KEYS": f"alice:{API_KEY}",
            "KVWIRE_DEVICE": "cpu",
        }
        env.pop("KVWIRE_JOBS_REDIS_URL", None)
        cmd = [sys.executable, "-m", "kvwire.cli", "serve", "--port", str(self.port)]
        cmd += ["--grpc-port", str(self.grpc_port)]
        log = open(self.data_dir / "server.log", "ab")  # noqa: SIM115 - the process keeps it
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"kvwire serve exited: {(self.data_dir / 'server.log').read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.rest_url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("kvwire serve did not become ready")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def model_and_profile() -> tuple[Any, Any, Path]:
    """The bundled model in this process, and its calibration profile file on this machine."""
    import torch

    from kvwire.calibration import load_or_calibrate, profile_cache_path
    from kvwire.model import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model()
    profile = load_or_calibrate(model, tokenizer)
    return model, tokenizer, profile_cache_path(profile.model_fingerprint)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_and_profile: Any) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("kvwire-e2e")
    profile_path = model_and_profile[2]
    (data_dir / "profiles").mkdir()
    shutil.copy(profile_path, data_dir / "profiles" / profile_path.name)
    server = ServerProcess(data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Context:
    manifest: ContextManifest
    reference: Answer  # greedy answer of a full prefill of context + question


@pytest.fixture(scope="module")
def context(server: ServerProcess, model_and_profile: Any) -> Context:
    model, tokenizer, _ = model_and_profile
    text = Path("/usr/share/common-licenses/GPL-3").read_text()[:3000]
    with Client(server.rest_url, API_KEY, timeout_s=600) as client:  # inline: prefill + encode, slow here
        manifest = client.ingest(text, context_id="gpl3")
    assert 512 <= manifest.total_tokens <= 1024 and len(manifest.chunks) >= 3
    ids = [t for c in manifest.chunks for t in c.token_ids]
    question = list(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    return Context(manifest, generate_answer(model, tokenizer, ids + question, max_new_tokens=NEW_TOKENS))


def client_for(server: ServerProcess, transport: str, **kw: Any) -> Client:
    url = server.rest_url if transport == "rest" else server.grpc_target
    return Client(url, API_KEY, transport=transport, **kw)  # type: ignore[arg-type]


def answer(loaded: LoadedContext, model_and_profile: Any) -> Answer:
    model, tokenizer, _ = model_and_profile
    return loaded.generate(model, tokenizer, QUESTION, max_new_tokens=NEW_TOKENS)


@pytest.mark.parametrize(("transport", "push"), [("rest", False), ("grpc", False), ("grpc", True)])
def test_best_level_answers_like_a_full_prefill(
    server: ServerProcess,
    context: Context,
    model_and_profile: Any,
    tmp_path: Path,
    transport: str,
    push: bool,
) -> None:
    model, tokenizer, _ = model_and_profile
    with client_for(server, transport, profile_dir=tmp_path) as client:
        loaded = client.load(model, "gpl3", tokenizer=tokenizer, mode=Mode.fixed_level(0), push=push)
    assert loaded.token_ids == [t for c in context.manifest.chunks for t in c.token_ids]
    assert cache_to_tensor(loaded.cache).shape[3] == context.manifest.total_tokens
    assert [r.level for r in loaded.chunks] == [0] * len(context.manifest.chunks)
    got = answer(loaded, model_and_profile)
    assert got.token_ids == context.reference.token_ids, (got.text, context.reference.text)


def test_adaptive_meets_its_slo_under_a_throttled_link(
    server: ServerProcess, context: Context, model_and_profile: Any, tmp_path: Path
) -> None:
    """On a 1 Mbit/s link the best level takes longer than the SLO just to arrive; adaptive mode lowers
    levels (or recomputes text) and is ready within the SLO. The SLO is set from a measured load at the
    smallest level, since this machine's decode speed varies with its load (and that load also gives
    the client its measured decode cost)."""
    model, tokenizer, _ = model_and_profile
    rate = 1e6 / 8
    with client_for(server, "rest", throttle="1mbps", profile_dir=tmp_path) as client:
        smallest = client.load(model, "gpl3", tokenizer=tokenizer, mode=Mode.fixed_level(4))
        slo_s = 1.3 * smallest.timings.total_s + 1.0
        level0_s = sum(c.level(0).nbytes for c in context.manifest.chunks) / rate
        loaded = client.load(
            model,
            "gpl3",
            tokenizer=tokenizer,
            mode=Mode.adaptive(slo_s, margin=0.2),
            bandwidth_hint_bytes_per_s=rate,
        )
    choices = [(r.kind, r.level, round(r.fetch_s, 3), round(r.compute_s, 3)) for r in loaded.chunks]
    assert loaded.slo_met, (slo_s, loaded.timings, choices)
    # Only on a CPU so loaded that decoding the smallest level takes longer than moving the best one
    # could the best level fit; otherwise (the usual case: 27 s of level 0 on the wire) it must adapt.
    if level0_s > slo_s:
        assert any(r.kind == "text" or r.level != 0 for r in loaded.chunks), choices


def test_server_killed_and_restarted_mid_load(
    server: ServerProcess, context: Context, model_and_profile: Any, tmp_path: Path
) -> None:
    """The server dies after the first chunk arrived and comes back on the same port and store:
    the load retries, resumes from the chunk it was on and completes the same cache."""
    model, tokenizer, _ = model_and_profile
    restarted = threading.Event()

    def kill_and_restart(done: int, total: int) -> None:
        if done == 1 and not restarted.is_set():
            restarted.set()
            server.kill()
            threading.Thread(target=server.start, daemon=True).start()

    retry = RetryPolicy(max_attempts=1000, initial_backoff_s=0.2, max_backoff_s=2.0, total_timeout_s=300)
    # throttled so that chunk 2 is still in flight when chunk 0 has been decoded (~10 s per chunk)
    with client_for(server, "rest", retry=retry, throttle="1mbps", profile_dir=tmp_path) as client:
        loaded = client.load(
            model,
            "gpl3",
            tokenizer=tokenizer,
            mode=Mode.fixed_level(0),
            prefetch=1,
            progress=kill_and_restart,
        )
    assert restarted.is_set() and loaded.timings.retries > 0
    assert [r.index for r in loaded.chunks] == list(range(len(context.manifest.chunks)))
    assert answer(loaded, model_and_profile).token_ids == context.reference.token_ids
    # the restarted server is the module's server again
    deadline = time.monotonic() + 300
    while httpx.get(f"{server.rest_url}/healthz", timeout=2).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_a_stopped_server_fails_clearly_within_bounded_time(
    server: ServerProcess, context: Context, model_and_profile: Any, tmp_path: Path
) -> None:
    """No server on the port: the load gives up after its retry budget with a typed error."""
    from kvwire.errors import ServerUnavailableError

    model, tokenizer, _ = model_and_profile
    retry = RetryPolicy(max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.2, total_timeout_s=2)
    client = Client(f"http://127.0.0.1:{free_port()}", API_KEY, retry=retry, profile_dir=tmp_path)
    with client, pytest.raises(ServerUnavailableError, match="manifest of 'gpl3': gave up"):
        client.load(model, "gpl3", tokenizer=tokenizer)
