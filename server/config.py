"""Service configuration: one typed settings object, ``KVWIRE_*`` variables, with storage as a section.

Precedence: keyword arguments > environment (``KVWIRE_PORT=8080``, ...) > the ``[service]`` table of
the TOML file named by ``KVWIRE_CONFIG_FILE`` > defaults. Storage keeps its own variables and
``[storage]`` table (:class:`~kvwire.server.storage.config.StorageSettings`) and is reached as
``settings.storage``. The defaults run everything in one process with no other setup: local-disk
store, in-process job queue, the bundled model, no authentication. See docs/service.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from kvwire.errors import InvalidInputError
from kvwire.server.storage.config import StorageSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Tenant names become a storage key segment (``t/<tenant>/...``): never '.'-led, so never '.' or '..'.
_TENANT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
TENANT_RULE = "1-64 characters of [A-Za-z0-9._-], not led by '.'"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def hash_api_key(key: str) -> str:
    """The stored form of an API key: its sha256, lower-case hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_api_keys(spec: str | dict[str, str] | None) -> dict[str, str]:
    """Parse ``"tenant1:key1,tenant2:sha256:<hex>"`` into ``{sha256(key): tenant}``.

    Plain keys are hashed here, at load, so no plaintext key is kept in memory past this call. An
    entry ``tenant:sha256:<64 hex>`` is taken as already hashed. A dict (from TOML) maps tenant to
    key in either form.
    """
    if spec is None or spec == "":
        return {}
    pairs: list[tuple[str, str]]
    if isinstance(spec, dict):
        pairs = [(str(t), str(k)) for t, k in spec.items()]
    else:
        pairs = []
        for entry in spec.split(","):
            entry = entry.strip()
            if not entry:
                continue
            tenant, sep, key = entry.partition(":")
            if not sep or not key:
                raise InvalidInputError("KVWIRE_API_KEYS entries are 'tenant:key' or 'tenant:sha256:<hex>'")
            pairs.append((tenant.strip(), key.strip()))
    hashed: dict[str, str] = {}
    for tenant, key in pairs:
        if not _TENANT.fullmatch(tenant):
            raise InvalidInputError(f"tenant name {tenant!r} must be {TENANT_RULE}")
        if key.startswith("sha256:") and _SHA256_HEX.fullmatch(key[7:].lower()):
            digest = key[7:].lower()
        else:
            digest = hash_api_key(key)
        if digest in hashed and hashed[digest] != tenant:
            raise InvalidInputError("one API key is given to two tenants")
        hashed[digest] = tenant
    return hashed


class ServiceSettings(BaseSettings):
    """Everything the service, worker and REST API read; every field is ``KVWIRE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="KVWIRE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # {sha256(key) hex: tenant}. Empty: no authentication, every request is tenant ``default_tenant``.
    api_keys: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    default_tenant: str = "default"
    allow_anonymous: bool = False  # serve without API keys on a non-loopback address
    grpc_port: int | None = Field(default=None, ge=0, le=65535)  # None: `kvwire serve` runs no gRPC API
    grpc_max_workers: int = Field(default=16, gt=0)  # concurrent gRPC calls (threads)
    # Serving processes sharing the REST and gRPC ports (SO_REUSEPORT; kvwire.server.supervisor).
    # More than 1 needs jobs_redis_url: jobs must be visible to every process.
    workers: int = Field(default=1, ge=1, le=256)

    model: str | None = None  # model directory or .gguf; None = the bundled SmolLM2-135M-Instruct
    device: str | None = None  # None = cuda if available, else cpu
    chunk_tokens: int = Field(default=256, gt=0, le=65536)
    levels: tuple[int, ...] | None = None  # None = every codec level

    max_context_tokens: int = Field(default=131072, gt=0)
    max_request_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    inline_max_tokens: int = Field(default=1024, ge=0)  # contexts up to this many tokens ingest inline
    max_pending_jobs: int = Field(default=1000, gt=0)
    max_jobs_per_tenant: int = Field(default=100, gt=0)  # one tenant's queued + running jobs
    # Per API key (per tenant when auth is off) token bucket over every authenticated request:
    # refilled at rate_limit_per_s, holding at most rate_limit_burst. 0 = no rate limit.
    rate_limit_per_s: float = Field(default=0.0, ge=0)
    rate_limit_burst: int = Field(default=0, ge=0)  # 0 = max(1, ceil(rate_limit_per_s))
    # Limits shared by every server process (rate-limit buckets, per-tenant job slots) live in Redis:
    # the URL named here, else the job queue's Redis, else the store's (redis, redis-cluster, tiered
    # hot tier). No Redis, or limits_shared=false: per process. See kvwire.server.limits.
    limits_redis_url: str | None = None
    limits_shared: bool = True
    limits_redis_timeout_s: float = Field(default=0.5, gt=0)  # then this process's own state decides
    limits_redis_retry_s: float = Field(default=5.0, gt=0)  # how long Redis is skipped after a failure
    # /metrics: open (None) for a Prometheus scraper on a private network, or only for
    # ``Authorization: Bearer <token>``. Kept as its sha256 like the API keys (``sha256:<hex>`` accepted).
    metrics_token: str | None = None

    # TLS for REST and gRPC: both files (PEM) or neither.
    tls_certfile: Path | None = None  # certificate chain, leaf first
    tls_keyfile: Path | None = None
    # Parsed manifests kept per process (0 = none), and at most this much memory of them (a
    # manifest holds every token id: ~5 MB for a 131,072-token context); another process's delete
    # or re-ingest of a context is seen here after at most manifest_cache_ttl_s.
    manifest_cache_size: int = Field(default=1024, ge=0)
    manifest_cache_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    manifest_cache_ttl_s: float = Field(default=5.0, ge=0)
    # glibc malloc of a serving process: buffers up to this size come from the heap, and up to twice
    # it stays free there for the next request instead of going back to the kernel (each page of a
    # fresh buffer costs a page fault). 0 = glibc's defaults. kvwire.server.allocator.
    malloc_mmap_threshold_bytes: int = Field(default=32 * 1024 * 1024, ge=0, le=32 * 1024 * 1024)

    jobs_redis_url: str | None = None  # None = in-process queue and worker thread
    jobs_namespace: str = "kvwire"
    jobs_claim_idle_s: float = Field(default=60.0, gt=0)  # reclaim a job whose worker went silent
    jobs_max_deliveries: int = Field(default=3, gt=0)
    jobs_ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0)  # job records expire (Redis queue)

    # Timeouts and limits of the servers themselves (docs/service.md, "Timeouts"): no client, however
    # slow or stalled, holds a connection, thread or buffer for longer than these.
    http_read_timeout_s: float = Field(default=10.0, gt=0)  # a request's headers; each pause in its body
    http_send_timeout_s: float = Field(default=30.0, gt=0)  # a client that reads nothing of its response
    # Idle keep-alive connections. Longer than clients keep idle connections (httpx: 5 s, browsers and
    # load balancers up to 60 s), so the server never closes one just as a client reuses it.
    http_keep_alive_s: int = Field(default=75, gt=0)
    http_backlog: int = Field(default=2048, gt=0)
    shutdown_grace_s: int = Field(default=10, ge=0)  # in-flight requests finish on SIGTERM
    grpc_max_concurrent_rpcs: int = Field(default=256, gt=0)  # more get RESOURCE_EXHAUSTED
    grpc_send_timeout_s: float = Field(default=30.0, gt=0)  # a stream the client stops reading
    grpc_keepalive_s: float = Field(default=60.0, gt=0)  # ping idle connections; drop dead peers
    grpc_max_connection_idle_s: float = Field(default=300.0, gt=0)
    # A connection is closed (GOAWAY; clients reconnect) after this, its calls given the grace to end:
    # the bound on how long an unread unary response can stay buffered in the server.
    grpc_max_connection_age_s: float = Field(default=3600.0, gt=0)
    grpc_max_connection_age_grace_s: float = Field(default=300.0, gt=0)

    storage: StorageSettings = Field(default_factory=StorageSettings)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _hash_keys(cls, value: Any) -> dict[str, str]:
        if isinstance(value, dict) and all(_SHA256_HEX.fullmatch(str(k)) for k in value):
            return {str(k): str(v) for k, v in value.items()}  # already {hash: tenant}
        return parse_api_keys(value)

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _hash_metrics_token(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        value = str(value).strip()
        if value.startswith("sha256:") and _SHA256_HEX.fullmatch(value[7:].lower()):
            return value[7:].lower()
        return hash_api_key(value)

    @field_validator("default_tenant")
    @classmethod
    def _check_tenant(cls, value: str) -> str:
        if not _TENANT.fullmatch(value):
            raise ValueError(f"default_tenant {value!r} must be {TENANT_RULE}")
        return value

    @field_validator("tls_certfile", "tls_keyfile", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value  # KVWIRE_TLS_CERTFILE= (empty) means no TLS

    @model_validator(mode="after")
    def _check_tls(self) -> ServiceSettings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("set both tls_certfile and tls_keyfile (or neither)")
        return self

    @field_validator("levels", mode="before")
    @classmethod
    def _parse_levels(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(int(v) for v in value.split(",") if v.strip()) or None
        if isinstance(value, int) and not isinstance(value, bool):  # KVWIRE_LEVELS=2 arrives JSON-decoded
            return (value,)
        return value

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_certfile is not None

    @property
    def rate_limited(self) -> bool:
        return self.rate_limit_per_s > 0

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlServiceTable(settings_cls))


class _TomlServiceTable(PydanticBaseSettingsSource):
    """The ``[service]`` table of the TOML file named by ``KVWIRE_CONFIG_FILE`` (if set)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole table

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("KVWIRE_CONFIG_FILE")
        if not path:
            return {}
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f).get("service", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInputError(f"cannot read KVWIRE_CONFIG_FILE {path!r}: {exc}") from exc
        if not isinstance(table, dict):
            raise InvalidInputError(f"{path}: [service] must be a table")
        return table
