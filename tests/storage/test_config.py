"""StorageSettings from environment and TOML file, and open_store for each kind."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kvwire.server.storage import LocalStore, StorageSettings, open_store


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("KVWIRE_") or name == "XDG_DATA_HOME":
            monkeypatch.delenv(name)


def test_defaults_give_a_local_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    settings = StorageSettings()
    assert settings.store == "local" and settings.data_dir == tmp_path / "kvwire"
    store = open_store(settings)
    assert isinstance(store, LocalStore) and store.root == (tmp_path / "kvwire").resolve()


def test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVWIRE_STORE", "redis")
    monkeypatch.setenv("KVWIRE_REDIS_URL", "redis://10.1.2.3:7000/1")
    monkeypatch.setenv("KVWIRE_REDIS_PART_BYTES", "1048576")
    monkeypatch.setenv("KVWIRE_S3_SECRET_ACCESS_KEY", "hunter2")
    s = StorageSettings()
    assert (s.store, s.redis_url, s.redis_part_bytes) == ("redis", "redis://10.1.2.3:7000/1", 1 << 20)
    assert "hunter2" not in repr(s)


def test_toml_file_with_env_taking_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "kvwire.toml"
    config.write_text('[storage]\nstore = "s3"\ns3_bucket = "from-file"\ns3_prefix = "chunks"\n')
    monkeypatch.setenv("KVWIRE_CONFIG_FILE", str(config))
    monkeypatch.setenv("KVWIRE_S3_BUCKET", "from-env")
    s = StorageSettings()
    assert (s.store, s.s3_bucket, s.s3_prefix) == ("s3", "from-env", "chunks")


def test_unknown_store_kind_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVWIRE_STORE", "floppy")
    with pytest.raises(ValidationError):
        StorageSettings()


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["redis", "redis-cluster", "s3", "tiered"])
def test_open_store_for_each_kind(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = request.getfixturevalue("redis_cluster_url" if kind == "redis-cluster" else "redis_url")
    settings = StorageSettings.model_validate(
        {
            "store": kind,
            "redis_url": url,
            "redis_namespace": "cfg-test",
            "s3_endpoint": request.getfixturevalue("s3_endpoint"),
            "s3_bucket": "kvwire-config-test",
            "s3_create_bucket": True,
            "s3_access_key_id": "testing",
            "s3_secret_access_key": "testing",
        }
    )
    with open_store(settings) as store:
        store.put("x", b"y", ttl_s=30)
        assert store.get("x") == b"y"
        assert store.delete("x")


def test_local_default_imports_no_backend_client_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, kvwire.server.storage as s; "
        "assert not {'redis', 'boto3', 'botocore'} & set(sys.modules), sorted(sys.modules); "
        "assert s.RedisStore.__name__ == 'RedisStore'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
