"""Generate the gRPC Python stubs in ``kvwire/_proto/`` from ``proto/kvwire.proto`` with grpcio-tools.

Run by the build (``setup.py``'s ``build_py``, so ``pip install .`` and ``pip install -e .`` both
generate) and by hand during development::

    python -m kvwire.server.grpc_codegen          # or: python server/grpc_codegen.py

Standard library and ``grpc_tools`` only: the build loads this file by path, before kvwire or its
dependencies are importable.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "kvwire" / "_proto"
PROTOS = ("kvwire.proto",)

# protoc writes `import kvwire_pb2 as kvwire__pb2` (a top-level module); the stubs live in a package.
_ABSOLUTE_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def generate(proto_dir: Path = PROTO_DIR, out_dir: Path = OUT_DIR) -> list[Path]:
    """Write ``<name>_pb2.py``, ``<name>_pb2.pyi`` and ``<name>_pb2_grpc.py`` for every proto; return them."""
    from importlib.resources import files

    from grpc_tools import protoc

    if not (proto_dir / PROTOS[0]).is_file():
        raise FileNotFoundError(f"{proto_dir / PROTOS[0]} not found: generate from a source checkout")
    well_known = str(files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PROTOS:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={proto_dir}",
            f"--proto_path={well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto_dir / name),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_dir / name}")
        stem = name.removesuffix(".proto")
        grpc_module = out_dir / f"{stem}_pb2_grpc.py"
        grpc_module.write_text(_ABSOLUTE_IMPORT.sub(r"from . import \1 as \2", grpc_module.read_text()))
        written += [out_dir / f"{stem}_pb2.py", out_dir / f"{stem}_pb2.pyi", grpc_module]
    return written


def main() -> int:
    for path in generate():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
