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
from typing import TYPE_CHECKING, Any

from kvwire._version import __version__
from kvwire.errors import InvalidInputError, KvwireError

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
            "workers",
        )
        if getattr(args, name, None) is not None
    }
    try:
        return ServiceSettings(**overrides)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid settings: {exc}") from exc


def _cmd_serve(args: argparse.Namespace) -> int:
    """Run the REST API, and the gRPC API with --grpc-port (embedded defaults: local store, in-process
    queue and worker, bundled model); with --workers N, N such processes on the same ports."""
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


# --------------------------------------------------------------------------------------- client side


def _client(args: argparse.Namespace) -> Any:
    from kvwire.client import Client

    url = (
        args.url
        or os.environ.get("KVWIRE_URL")
        or ("127.0.0.1:50051" if args.transport == "grpc" else "http://127.0.0.1:8080")
    )
    api_key = args.api_key or os.environ.get("KVWIRE_API_KEY")
    return Client(url, api_key, transport=args.transport, throttle=args.bandwidth, timeout_s=args.timeout)


def _progress_bar(desc: str, unit: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A tqdm bar driven by ``progress(done, total)`` callbacks, and a function that closes it."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, leave=False, disable=None)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar.close


def _cmd_ingest(args: argparse.Namespace) -> int:
    """Ingest a text file; print the context id (for ``kvwire generate --context``)."""
    from pathlib import Path

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read {args.file}: {exc}") from exc
    with _client(args) as client:
        update, close = _progress_bar("ingesting", "chunk")
        try:
            manifest = client.ingest(text, context_id=args.context_id, progress=update)
        finally:
            close()
    stored = sum(e.nbytes for c in manifest.chunks for e in c.levels)
    print(f"context {manifest.context_id}: {manifest.total_tokens} tokens, {len(manifest.chunks)} chunks, "
          f"levels {manifest.levels}, {stored:,} bytes stored")  # fmt: skip
    print(manifest.context_id)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    """Load a stored context into the local model, answer a question, print TTFT and decisions."""
    from kvwire.client import parse_mode
    from kvwire.client.loader import iter_records
    from kvwire.model import load_model

    mode = parse_mode(args.mode, args.slo)
    model, tokenizer = load_model(args.model, device=args.device)
    with _client(args) as client:
        update, close = _progress_bar("loading", "chunk")
        try:
            loaded = client.load(
                model,
                args.context,
                tokenizer=tokenizer,
                mode=mode,
                policy=args.policy,
                push=args.push,
                bandwidth_hint_bytes_per_s=_rate_hint(args.bandwidth),
                progress=update,
            )
        finally:
            close()
    answer = loaded.generate(model, tokenizer, args.question, max_new_tokens=args.max_new_tokens)
    t = loaded.timings
    print(f"answer: {answer.text.strip()}")
    print(
        f"TTFT {t.total_s + answer.first_token_s:.3f} s = load {t.total_s:.3f} s "
        f"(manifest {t.manifest_s:.3f}, profile {t.profile_s:.3f}, fetch {t.fetch_s:.3f}, "
        f"decode {t.decode_s:.3f}, recompute {t.recompute_s:.3f}; overlapped) "
        f"+ question and first token {answer.first_token_s:.3f} s"
        + ("" if loaded.slo_met is None else f"; SLO {mode.slo_s} s {'met' if loaded.slo_met else 'MISSED'}")
    )
    for line in iter_records(loaded.chunks):
        print(line)
    return 0


def _rate_hint(spec: str | None) -> float | None:
    """The throttle's starting rate as the controller's first throughput guess (None: its default)."""
    from kvwire.client.throttle import parse_throttle

    config = parse_throttle(spec) if spec else None
    return None if config is None else config.trace.rate_at(0.0)


def _cmd_demo(args: argparse.Namespace) -> int:
    """The end-to-end demo: serve in-process, ingest a real text, load it back, compare TTFTs."""
    from kvwire.demo import service_demo

    service_demo(
        text=args.text,
        context_tokens=args.tokens,
        bandwidth=args.bandwidth,
        transport=args.transport,
        slo_s=args.slo,
        max_new_tokens=args.max_new_tokens,
    )
    return 0


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="server: http://host:port (REST) or host:port (gRPC) (KVWIRE_URL)")
    parser.add_argument("--api-key", dest="api_key", help="API key (KVWIRE_API_KEY)")
    parser.add_argument("--transport", choices=("rest", "grpc"), default="rest", help="wire protocol")
    parser.add_argument(
        "--bandwidth",
        help="emulated link: '1gbps', '100MB/s', 'trace:step-down', 'trace:FILE.csv' (default: none)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")


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
            "--workers",
            type=int,
            help="serving processes sharing the ports (KVWIRE_WORKERS, default 1; more than 1 needs "
            "--jobs-redis-url)",
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
    ingest = _add(subparsers, "ingest", _cmd_ingest, help="ingest a text file into a kvwire server")
    ingest.add_argument("file", help="UTF-8 text file")
    ingest.add_argument("--context-id", dest="context_id", help="id to store it under (default: generated)")
    _add_client_options(ingest)
    generate = _add(
        subparsers, "generate", _cmd_generate, help="answer a question from a stored context; print TTFT"
    )
    generate.add_argument("question", help="appended to the context as is (e.g. '\\nQ: ...\\nA:')")
    generate.add_argument("--context", required=True, help="context id (from kvwire ingest)")
    generate.add_argument(
        "--mode", default="adaptive", help="text | level:N | adaptive (default; needs --slo)"
    )
    generate.add_argument("--slo", type=float, default=1.0, help="TTFT target in seconds (adaptive mode)")
    generate.add_argument("--policy", choices=("robust", "lookahead", "cachegen"), default="robust")
    generate.add_argument(
        "--push", action="store_true", help="gRPC: the server chooses levels (StreamContext)"
    )
    generate.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=32)
    generate.add_argument("--model", help="model directory or .gguf (default: bundled SmolLM2)")
    generate.add_argument("--device", help="torch device of the model (default cpu)")
    _add_client_options(generate)
    full = _add(
        subparsers,
        "demo",
        _cmd_demo,
        help="end to end: serve in-process, ingest a real text, load it under emulated bandwidth, "
        "answer a question, compare TTFT of text recompute and kvwire",
    )
    full.add_argument("--text", default="GPL-3", help="file under /usr/share/common-licenses")
    full.add_argument("--tokens", type=int, default=2048, help="context length in tokens")
    full.add_argument("--bandwidth", default="1gbps", help="emulated link (see kvwire generate --help)")
    full.add_argument("--transport", choices=("rest", "grpc"), default="rest")
    full.add_argument("--slo", type=float, help="adaptive mode's TTFT target (default: 1/3 of text's)")
    full.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=16)
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
    if not args.verbose:  # one line per HTTP request or chunk decision: the CLI prints its own summary
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("kvwire.controller").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # kvwire never downloads models
    try:
        return int(args.command(args))
    except KvwireError as exc:
        print(f"kvwire: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
