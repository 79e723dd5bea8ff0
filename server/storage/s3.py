"""S3-compatible object storage (AWS S3, MinIO, Ceph RGW, moto, ...) through boto3.

Key ``k`` is the object ``<prefix>/k`` in ``bucket``. A PUT replaces an object atomically, so readers
see the old value or the new one. S3 has no per-object TTL (lifecycle rules work in whole days), so a
TTL is stored as object metadata ``kvwire-expires-at`` (Unix seconds) and honoured on read: an
expired object reads as missing and is deleted then. ``list_keys`` does not read metadata, so it may
list expired objects not yet read.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from kvwire.errors import BackendUnavailableError, InvalidInputError, NotFoundError
from kvwire.server.storage.base import (
    DEFAULT_MAX_VALUE_BYTES,
    Items,
    Store,
    iter_items,
    validate_key,
    validate_prefix,
    validate_ttl,
    validate_value,
)

_EXPIRES = "kvwire-expires-at"
_SESSION_LOCK = threading.Lock()
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


class S3Store(Store):
    """Values as objects in one bucket under an optional key prefix."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        prefix: str = "",
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        create_bucket: bool = False,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 30.0,
        retries: int = 2,
        concurrency: int = 8,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ):
        if not bucket:
            raise InvalidInputError("S3 bucket name must not be empty")
        self.bucket = bucket
        self.prefix = validate_prefix(prefix)
        self.max_value_bytes = max_value_bytes
        self.name = f"s3 bucket {bucket!r} at {endpoint_url or 'AWS'}"
        config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": retries + 1, "mode": "standard"},
            max_pool_connections=max(10, concurrency),
        )
        with _SESSION_LOCK:
            self._client: Any = _shared_session().client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                config=config,
            )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="kvwire-s3")
        if create_bucket:
            self._create_bucket(region)

    @contextlib.contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        """Map botocore failures: a missing object to NotFoundError, everything else to unavailable."""
        try:
            yield
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if key is not None and code in _MISSING_CODES:
                raise NotFoundError(f"{self.name}: no key {key!r}") from exc
            raise BackendUnavailableError(f"{self.name}: {code or 'error'}: {exc}") from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise BackendUnavailableError(f"{self.name}: {type(exc).__name__}: {exc}") from exc

    def _create_bucket(self, region: str) -> None:
        with self._errors():
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except botocore.exceptions.ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in _MISSING_CODES | {"NoSuchBucket"}:
                    raise
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                self._client.create_bucket(**kwargs)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                    raise

    def _object(self, key: str) -> str:
        key = validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key_of(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    # -- reading -------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        name = self._object(key)
        with self._errors(key):
            response = self._client.get_object(Bucket=self.bucket, Key=name)
            if _expired(response.get("Metadata", {})):
                response["Body"].close()
                self._client.delete_object(Bucket=self.bucket, Key=name)
                raise NotFoundError(f"{self.name}: no key {key!r}")
            data: bytes = response["Body"].read()
            return data

    def try_get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        keys = [validate_key(k) for k in keys]
        return list(self._pool.map(self._try_get, keys))

    def _try_get(self, key: str) -> bytes | None:
        try:
            return self.get(key)
        except NotFoundError:
            return None

    def exists(self, key: str) -> bool:
        name = self._object(key)
        try:
            with self._errors(key):
                response = self._client.head_object(Bucket=self.bucket, Key=name)
        except NotFoundError:
            return False
        return not _expired(response.get("Metadata", {}))

    # -- writing -------------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        name = self._object(key)
        validate_value(data, self.max_value_bytes)
        ttl = validate_ttl(ttl_s)
        metadata = {_EXPIRES: repr(time.time() + ttl)} if ttl else {}
        with self._errors():
            self._client.put_object(Bucket=self.bucket, Key=name, Body=bytes(data), Metadata=metadata)

    def put_many(self, items: Items, ttl_s: float | None = None) -> None:
        pairs = iter_items(items)
        for pair in pairs:
            self._object(pair[0])
        list(self._pool.map(lambda kv: self.put(kv[0], kv[1], ttl_s), pairs))

    # -- deleting and listing ------------------------------------------------------------------------

    def delete(self, key: str) -> bool:
        existed = self.exists(key)
        with self._errors():
            self._client.delete_object(Bucket=self.bucket, Key=self._object(key))
        return existed

    def delete_prefix(self, prefix: str) -> int:
        names = [self._object(k) for k in self.list_keys(prefix)]
        with self._errors():
            for start in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
                batch = names[start : start + 1000]
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": n} for n in batch], "Quiet": True}
                )
                if response.get("Errors"):
                    first = response["Errors"][0]
                    raise BackendUnavailableError(f"{self.name}: cannot delete {first.get('Key')!r}: {first}")
        return len(names)

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        prefix = validate_prefix(prefix)
        keys: list[str] = []
        with self._errors():
            if prefix and self.exists(prefix):
                keys.append(prefix)
            scope = "/".join(p for p in (self.prefix, prefix) if p)
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=scope + "/" if scope else ""):
                keys.extend(self._key_of(obj["Key"]) for obj in page.get("Contents", []))
        return iter([k for k in keys if _is_key(k)])  # skip objects other tools put there

    def health(self) -> None:
        with self._errors():
            self._client.head_bucket(Bucket=self.bucket)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with contextlib.suppress(Exception):
            self._client.close()


@cache
def _shared_session() -> boto3.session.Session:
    """One boto3 session per process: it caches the parsed service models, so each client is cheap."""
    return boto3.session.Session()


def _is_key(name: str) -> bool:
    try:
        validate_key(name)
    except InvalidInputError:
        return False
    return True


def _expired(metadata: dict[str, str]) -> bool:
    expires_at = metadata.get(_EXPIRES)
    return expires_at is not None and float(expires_at) <= time.time()
