"""The timeout settings and the uvicorn/gRPC options built from them, read from the environment."""

from __future__ import annotations

import pytest

from kvwire.server.config import ServiceSettings
from kvwire.server.timeouts import GuardedH11Protocol, grpc_server_options, uvicorn_options


def test_timeouts_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVWIRE_HTTP_READ_TIMEOUT_S", "2.5")
    monkeypatch.setenv("KVWIRE_HTTP_SEND_TIMEOUT_S", "7")
    monkeypatch.setenv("KVWIRE_HTTP_KEEP_ALIVE_S", "3")
    monkeypatch.setenv("KVWIRE_GRPC_KEEPALIVE_S", "12")
    settings = ServiceSettings()
    options = uvicorn_options(settings)
    protocol = options["http"]
    assert issubclass(protocol, GuardedH11Protocol)
    assert (protocol.read_timeout_s, protocol.send_timeout_s) == (2.5, 7.0)
    assert options["timeout_keep_alive"] == 3
    assert ("grpc.keepalive_time_ms", 12000) in grpc_server_options(settings)


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_bad_timeout_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("KVWIRE_HTTP_READ_TIMEOUT_S", value)
    with pytest.raises(ValueError, match="http_read_timeout_s"):
        ServiceSettings()


@pytest.mark.parametrize(("value", "levels"), [("2", (2,)), ("0,2,4", (0, 2, 4))])
def test_levels_from_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, levels: tuple[int, ...]
) -> None:
    monkeypatch.setenv("KVWIRE_LEVELS", value)  # a single level used to fail: "2" is decoded as JSON
    assert ServiceSettings().levels == levels
