"""The ``kvwire`` command: one thin function per subcommand, each calling into the package.

To add a subcommand, write ``_cmd_<name>(args)`` and register it in :func:`build_parser` with
``_add(subparsers, "<name>", _cmd_<name>, help=...)``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvwire._version import __version__
from kvwire.errors import KvwireError

if TYPE_CHECKING:
    from kvwire.server.config import ServiceSettings

Command = Callable[[argparse.Namespace], int]


def _service_settings(args: argparse.Namespace) -> ServiceSettings:
    """``ServiceSettings`` from the environment, overridden by the options given on the command line."""
    from pydantic import ValidationError

    from kvwire.errors import InvalidInputError
    from kvwire.server.config import ServiceSettings

    overrides = {
        name: getattr(args, name)
        for name in (
            "host",
            "port",
            "grpc_port",
            "model",
            "device",
            "jobs_redis_url",
            "tls_certfile",
            "tls_keyfile",
        )
        if getattr(args, name, None) is not None
    }
    try:
        return ServiceSettings(**overrides)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid settings: {exc}") from exc


def _cmd_serve(args: argparse.Namespace) -> int:
    """Run the REST API, and the gRPC API with --grpc-port (embedded defaults: local store, in-process
    queue and worker, bundled model)."""
    from kvwire.server.rest import serve

    serve(_service_settings(args))
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    """Run a standalone worker consuming the Redis job stream."""
    from kvwire.server.service import run_standalone_worker

    with contextlib.suppress(KeyboardInterrupt):
        run_standalone_worker(_service_settings(args))
    return 0


def _cmd_codec_demo(args: argparse.Namespace) -> int:
    """Prefill a real text, encode its KV cache at every level, report size and quality per level."""
    from kvwire.demo import codec_demo

    codec_demo(
        texts=args.text,
        context_tokens=args.tokens,
        continuation_tokens=args.continuation,
        model_path=args.model,
    )
    return 0


def _add_service_options(parser: argparse.ArgumentParser, *, http: bool) -> None:
    if http:
        parser.add_argument("--host", help="bind address (KVWIRE_HOST, default 127.0.0.1)")
        parser.add_argument("--port", type=int, help="port (KVWIRE_PORT, default 8080)")
        parser.add_argument(
            "--grpc-port",
            dest="grpc_port",
            type=int,
            help="also serve the gRPC API on this port (KVWIRE_GRPC_PORT)",
        )
        parser.add_argument(
            "--tls-certfile",
            dest="tls_certfile",
            help="PEM certificate chain: serve REST and gRPC over TLS only (KVWIRE_TLS_CERTFILE)",
        )
        parser.add_argument(
            "--tls-keyfile", dest="tls_keyfile", help="PEM private key of --tls-certfile (KVWIRE_TLS_KEYFILE)"
        )
    parser.add_argument("--model", help="model directory or .gguf (KVWIRE_MODEL; default: bundled SmolLM2)")
    parser.add_argument("--device", help="torch device (KVWIRE_DEVICE; default cuda if available, else cpu)")
    parser.add_argument(
        "--jobs-redis-url", dest="jobs_redis_url", help="Redis URL for the job queue (KVWIRE_JOBS_REDIS_URL)"
    )


def _add(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str, command: Command, help: str
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=help)
    parser.set_defaults(command=command)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvwire", description="Networked KV-cache streaming.")
    parser.add_argument("--version", action="version", version=f"kvwire {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    demo = _add(
        subparsers,
        "codec-demo",
        _cmd_codec_demo,
        help="encode a real context at every level, print size and quality",
    )
    demo.add_argument(
        "--text", nargs="+", default=["GPL-3"], help="files under /usr/share/common-licenses, concatenated"
    )
    demo.add_argument("--tokens", type=int, default=2048, help="context length in tokens")
    demo.add_argument("--continuation", type=int, default=64, help="continuation tokens scored for KL")
    demo.add_argument("--model", help="model directory or .gguf (default: bundled SmolLM2)")
    serve = _add(subparsers, "serve", _cmd_serve, help="run the REST (and gRPC) API server")
    _add_service_options(serve, http=True)
    worker = _add(subparsers, "worker", _cmd_worker, help="run a standalone ingest worker (Redis job queue)")
    _add_service_options(worker, http=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # kvwire never downloads models
    try:
        return int(args.command(args))
    except KvwireError as exc:
        print(f"kvwire: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
