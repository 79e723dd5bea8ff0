"""Cost of authentication and rate limiting per request: ``AccessControl.admit`` with no rate limit, an
in-process bucket, and a bucket shared through Redis (docs/reliability.md, "Security").

    redis-server --port 23917 --save "" --appendonly no &   # a Redis of your own, not a shared one
    python -m benchmarks.admit_cost redis://127.0.0.1:23917/0
"""

from __future__ import annotations

import functools
import sys
import timeit
from typing import Any

from kvwire.server.auth import AccessControl
from kvwire.server.config import ServiceSettings


def main(redis_url: str) -> None:
    keys = ",".join(f"t{i}:key-{i}" for i in range(10))
    cases: tuple[tuple[str, dict[str, Any]], ...] = (
        ("no rate limit", {}),
        ("in-process bucket", {"rate_limit_per_s": 1e9, "limits_shared": False}),
        ("shared bucket in Redis", {"rate_limit_per_s": 1e9, "limits_redis_url": redis_url}),
    )
    for name, extra in cases:
        access = AccessControl(ServiceSettings(api_keys=keys, **extra))  # type: ignore[arg-type]
        access.admit("Bearer key-3")
        call = functools.partial(access.admit, "Bearer key-3")
        best = min(timeit.repeat(call, number=20000, repeat=3)) / 20000
        print(f"{name}: {best * 1e6:.1f} us per admit")
        access.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
