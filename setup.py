"""Build hook: generate the gRPC stubs from proto/ before the packages are copied (see docs/grpc.md).

All metadata is in pyproject.toml. ``build_py`` runs for ``pip install .``, wheels, and (PEP 660)
``pip install -e .``; the stubs are written into ``kvwire/_proto/`` in the source tree, where an
editable install finds them and from where a regular build copies them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithGrpcStubs(build_py):
    def run(self) -> None:
        path = Path(__file__).resolve().parent / "server" / "grpc_codegen.py"
        spec = importlib.util.spec_from_file_location("_kvwire_grpc_codegen", path)
        assert spec is not None and spec.loader is not None
        codegen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(codegen)
        codegen.generate()
        super().run()


setup(cmdclass={"build_py": BuildPyWithGrpcStubs})
