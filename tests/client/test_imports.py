"""The client installs without the server: importing it loads no kvwire.server module and no settings."""

from __future__ import annotations

import json
import subprocess
import sys

SERVER_SIDE = ("pydantic_settings", "fastapi", "redis")
PROBE = f"""
import json, sys
import kvwire.client, kvwire.client.grpc_transport, kvwire.client.transport
loaded = [m for m in sys.modules if m.startswith("kvwire.server") or m.split(".")[0] in {SERVER_SIDE!r}]
print(json.dumps(sorted(loaded)))
"""


def test_the_client_imports_nothing_of_the_server() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
