"""The deployment files agree with the code: every KVWIRE_* variable they set is a setting, and parses.

`scripts/check_deploy.sh` validates the files themselves (docker-compose config, hadolint); this
checks their contents against ``ServiceSettings`` / ``StorageSettings`` without Docker.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvwire.server.config import ServiceSettings
from kvwire.server.storage.config import StorageSettings

ROOT = Path(__file__).resolve().parent.parent
_DEFAULT = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def _example_env() -> dict[str, str]:
    lines = (ROOT / "deploy.env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _resolve(value: Any) -> str:
    """Compose interpolation: ``${X:-d}`` -> d, ``${X:?msg}`` -> the value in deploy.env.example."""
    return _DEFAULT.sub(lambda m: m[3] if m[2] == "-" else _example_env()[m[1]], str(value))


def _compose_env(service: str) -> dict[str, str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["services"][service]["environment"]
    return {k: _resolve(v) for k, v in env.items() if k.startswith("KVWIRE_")}


def _dockerfile_env() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return dict(re.findall(r"\b(KVWIRE_\w+)=(\S+)", text))


def _fields() -> set[str]:
    return set(ServiceSettings.model_fields) | set(StorageSettings.model_fields)


@pytest.mark.parametrize("service", ["api", "worker"])
def test_compose_settings_exist_and_parse(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**_dockerfile_env(), **_compose_env(service)}
    unknown = {k for k in env if k.removeprefix("KVWIRE_").lower() not in _fields()}
    assert not unknown, f"not settings: {sorted(unknown)}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KVWIRE_CONFIG_FILE", raising=False)
    settings = ServiceSettings()
    assert settings.jobs_redis_url == "redis://redis-jobs:6379/0"
    assert settings.storage.store == "tiered" and settings.storage.s3_endpoint == "http://minio:9000"
    if service == "api":
        assert settings.grpc_port == 50051 and settings.auth_enabled and settings.host == "0.0.0.0"


def test_cache_redis_evicts_and_job_redis_does_not() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    cache = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy allkeys-lru" in cache and "--maxmemory" in cache
    assert "noeviction" in " ".join(services["redis-jobs"]["command"])
