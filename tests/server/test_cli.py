"""The ``kvwire`` command: subcommands parse and call into the package with typed settings."""

from __future__ import annotations

from typing import Any

import pytest

from kvwire import cli
from kvwire.errors import InvalidInputError
from kvwire.server.config import ServiceSettings


def test_serve_passes_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvwire.server.rest

    seen: list[ServiceSettings] = []
    monkeypatch.setattr(kvwire.server.rest, "serve", lambda settings: seen.append(settings))
    monkeypatch.setenv("KVWIRE_CHUNK_TOKENS", "128")
    assert cli.main(["serve", "--port", "9123", "--host", "0.0.0.0"]) == 0
    assert seen[0].port == 9123 and seen[0].host == "0.0.0.0" and seen[0].chunk_tokens == 128


def test_serve_tls_options(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import kvwire.server.rest

    seen: list[ServiceSettings] = []
    monkeypatch.setattr(kvwire.server.rest, "serve", lambda settings: seen.append(settings))
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    assert cli.main(["serve", "--tls-certfile", str(cert), "--tls-keyfile", str(key)]) == 0
    assert seen[0].tls_certfile == cert and seen[0].tls_keyfile == key and seen[0].tls_enabled
    # One without the other is a clear error, not a traceback.
    assert cli.main(["serve", "--tls-certfile", str(cert)]) == 2
    assert "tls_certfile and tls_keyfile" in capsys.readouterr().err


def test_serve_refuses_anonymous_public_bind(capsys: pytest.CaptureFixture[str]) -> None:
    from kvwire.server.rest import serve

    with pytest.raises(InvalidInputError, match="KVWIRE_API_KEYS"):
        serve(ServiceSettings(host="0.0.0.0", api_keys=""))


def test_worker_needs_redis(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVWIRE_JOBS_REDIS_URL", raising=False)
    assert cli.main(["worker"]) == 2
    assert "KVWIRE_JOBS_REDIS_URL" in capsys.readouterr().err


def test_worker_passes_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvwire.server.service

    seen: list[Any] = []
    monkeypatch.setattr(kvwire.server.service, "run_standalone_worker", lambda s: seen.append(s))
    assert cli.main(["worker", "--jobs-redis-url", "redis://h:1/0", "--device", "cpu"]) == 0
    assert seen[0].jobs_redis_url == "redis://h:1/0" and seen[0].device == "cpu"


def test_subcommand_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main([])
    assert "COMMAND" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "serve" in out and "worker" in out
