"""Storage configuration: one typed settings object read from ``KVWIRE_*`` variables and a TOML file.

Precedence: keyword arguments > environment (``KVWIRE_STORE=redis``, ...) > the ``[storage]`` table of
the TOML file named by ``KVWIRE_CONFIG_FILE`` > defaults. The defaults give a local-disk store in
``$KVWIRE_DATA_DIR`` (else ``$XDG_DATA_HOME/kvwire``, else ``~/.local/share/kvwire``) with no other
setup. See docs/storage.md for every variable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from kvwire.errors import InvalidInputError
from kvwire.server.storage.base import DEFAULT_MAX_VALUE_BYTES, DEFAULT_PART_BYTES, Store

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

StoreKind = Literal["local", "redis", "redis-cluster", "s3", "tiered"]


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/kvwire``, else ``~/.local/share/kvwire``."""
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "kvwire"


class StorageSettings(BaseSettings):
    """Which backend to open and how; every field is ``KVWIRE_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="KVWIRE_", extra="ignore")

    store: StoreKind = "local"
    max_value_bytes: int = Field(default=DEFAULT_MAX_VALUE_BYTES, gt=0)

    data_dir: Path = Field(default_factory=default_data_dir)

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_namespace: str = "kvwire"
    redis_part_bytes: int = Field(default=DEFAULT_PART_BYTES, gt=0)
    redis_socket_timeout_s: float = Field(default=5.0, gt=0)
    redis_connect_timeout_s: float = Field(default=2.0, gt=0)
    redis_retries: int = Field(default=1, ge=0)

    s3_bucket: str = "kvwire"
    s3_endpoint: str | None = None
    s3_prefix: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_create_bucket: bool = False
    s3_connect_timeout_s: float = Field(default=2.0, gt=0)
    s3_read_timeout_s: float = Field(default=30.0, gt=0)
    s3_retries: int = Field(default=2, ge=0)

    tiered_hot: Literal["redis", "redis-cluster"] = "redis"
    tiered_cold: Literal["s3", "local"] = "s3"
    tiered_hot_ttl_s: float = Field(default=3600.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlStorageTable(settings_cls))


class _TomlStorageTable(PydanticBaseSettingsSource):
    """The ``[storage]`` table of the TOML file named by ``KVWIRE_CONFIG_FILE`` (if set)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole table

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("KVWIRE_CONFIG_FILE")
        if not path:
            return {}
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f).get("storage", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInputError(f"cannot read KVWIRE_CONFIG_FILE {path!r}: {exc}") from exc
        if not isinstance(table, dict):
            raise InvalidInputError(f"{path}: [storage] must be a table")
        return table


def open_store(settings: StorageSettings | None = None, *, kind: StoreKind | None = None) -> Store:
    """Open the store ``settings`` describe (read from the environment if not given)."""
    s = settings or StorageSettings()
    kind = kind or s.store
    if kind == "local":
        from kvwire.server.storage.local import LocalStore

        return LocalStore(s.data_dir, max_value_bytes=s.max_value_bytes)
    if kind in ("redis", "redis-cluster"):
        from kvwire.server.storage.redis import RedisClusterStore, RedisStore

        cls = RedisClusterStore if kind == "redis-cluster" else RedisStore
        return cls(
            s.redis_url,
            namespace=s.redis_namespace,
            part_bytes=s.redis_part_bytes,
            socket_timeout_s=s.redis_socket_timeout_s,
            connect_timeout_s=s.redis_connect_timeout_s,
            retries=s.redis_retries,
            max_value_bytes=s.max_value_bytes,
        )
    if kind == "s3":
        from kvwire.server.storage.s3 import S3Store

        return S3Store(
            s.s3_bucket,
            endpoint_url=s.s3_endpoint,
            prefix=s.s3_prefix,
            region=s.s3_region,
            access_key_id=s.s3_access_key_id,
            secret_access_key=s.s3_secret_access_key.get_secret_value() if s.s3_secret_access_key else None,
            create_bucket=s.s3_create_bucket,
            connect_timeout_s=s.s3_connect_timeout_s,
            read_timeout_s=s.s3_read_timeout_s,
            retries=s.s3_retries,
            max_value_bytes=s.max_value_bytes,
        )
    if kind == "tiered":
        from kvwire.server.storage.tiered import TieredStore

        cold = open_store(s, kind=s.tiered_cold)
        try:
            hot = open_store(s, kind=s.tiered_hot)
        except BaseException:
            cold.close()
            raise
        return TieredStore(hot, cold, hot_ttl_s=s.tiered_hot_ttl_s)
    raise InvalidInputError(f"unknown store kind {kind!r}")
