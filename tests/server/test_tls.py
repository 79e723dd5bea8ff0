"""TLS end to end: a real ``kvwire serve`` process with a certificate from a CA made in the test.

The server runs as an API-only role (jobs to a Redis queue the test starts), so it loads no model. An
https request that trusts the CA succeeds; a plaintext request, and one that does not trust the CA,
fail; gRPC works over a secure channel with the CA and not over an insecure one.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import trustme

from kvwire._proto import kvwire_pb2 as pb
from kvwire._proto import kvwire_pb2_grpc as pb_grpc
from kvwire.errors import InvalidInputError
from kvwire.server.config import ServiceSettings
from kvwire.server.rest import check_tls_files

from ..storage.conftest import free_port, redis_server

pytestmark = pytest.mark.integration

KEY = "tls-test-key"


@dataclass
class TlsServer:
    rest_url: str
    grpc_target: str
    ca: trustme.CA
    ca_file: Path


def _trusting(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def _wait_ready(proc: subprocess.Popen[bytes], url: str, ca_file: Path, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"kvwire serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            # /readyz: also waits for the gRPC API's planner warm-up (kvwire.server.grpc_server).
            if httpx.get(f"{url}/readyz", verify=_trusting(ca_file), timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"kvwire serve did not answer over TLS:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    root = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = root / "server.pem", root / "server.key", root / "ca.pem"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key_file.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    port, grpc_port = free_port(), free_port()
    with redis_server(root / "redis") as redis_port:
        env = {
            **os.environ,
            "KVWIRE_API_KEYS": f"alice:{KEY}",
            "KVWIRE_JOBS_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "KVWIRE_DATA_DIR": str(root / "store"),
            "KVWIRE_CONFIG_FILE": "",
        }
        kvwire = Path(sys.executable).with_name("kvwire")
        command = [str(kvwire)] if kvwire.exists() else [sys.executable, "-m", "kvwire.cli"]
        command += ["serve", "--port", str(port), "--grpc-port", str(grpc_port)]
        command += ["--tls-certfile", str(cert_file), "--tls-keyfile", str(key_file)]
        log = root / "serve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_ready(proc, f"https://127.0.0.1:{port}", ca_file, log)
            yield TlsServer(f"https://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", ca, ca_file)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def test_rest_over_tls(tls_server: TlsServer) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    trusting = _trusting(tls_server.ca_file)
    with httpx.Client(base_url=tls_server.rest_url, verify=trusting, timeout=10) as client:
        assert client.get("/readyz").json() == {"status": "ready"}
        assert client.get("/v1/contexts", headers=headers).json() == {"context_ids": [], "next_after": None}
        assert client.get("/v1/contexts").status_code == 401
    # Not trusting the CA (the system store only): the handshake is refused.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_server.rest_url}/healthz", timeout=10)
    # Plaintext HTTP to the TLS port gets no HTTP answer at all.
    plain = tls_server.rest_url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain}/healthz", timeout=10)


def test_grpc_over_tls(tls_server: TlsServer) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_server.ca.cert_pem.bytes())
    with grpc.secure_channel(tls_server.grpc_target, credentials) as channel:
        stub = pb_grpc.KvwireStub(channel)
        assert stub.Health(pb.HealthRequest(ready=True), timeout=10).status == "ready"
        page = stub.ListContexts(
            pb.ListContextsRequest(), metadata=(("authorization", f"Bearer {KEY}"),), timeout=10
        )
        assert list(page.context_ids) == []
    with grpc.insecure_channel(tls_server.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.KvwireStub(channel).Health(pb.HealthRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    other_ca = trustme.CA()  # a channel that trusts another CA
    untrusted = grpc.ssl_channel_credentials(root_certificates=other_ca.cert_pem.bytes())
    with (
        grpc.secure_channel(tls_server.grpc_target, untrusted) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        pb_grpc.KvwireStub(channel).Health(pb.HealthRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVWIRE_TLS_CERTFILE", str(tmp_path / "cert.pem"))
    monkeypatch.setenv("KVWIRE_TLS_KEYFILE", str(tmp_path / "key.pem"))
    assert ServiceSettings().tls_certfile == tmp_path / "cert.pem" and ServiceSettings().tls_enabled
    monkeypatch.setenv("KVWIRE_TLS_CERTFILE", "")  # empty: unset, as compose files pass it
    monkeypatch.setenv("KVWIRE_TLS_KEYFILE", "")
    assert not ServiceSettings().tls_enabled
    monkeypatch.delenv("KVWIRE_TLS_CERTFILE")
    monkeypatch.delenv("KVWIRE_TLS_KEYFILE")
    with pytest.raises(ValueError, match="both"):
        ServiceSettings(tls_certfile=tmp_path / "cert.pem")
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    bad = ServiceSettings(tls_certfile=tmp_path / "cert.pem", tls_keyfile=tmp_path / "key.pem")
    with pytest.raises(InvalidInputError, match="cannot load TLS certificate"):
        check_tls_files(bad)
    check_tls_files(ServiceSettings())  # no TLS: nothing to check
