"""Python stubs generated from ``proto/kvwire.proto`` at build/install time (see docs/grpc.md).

``kvwire_pb2`` (messages), ``kvwire_pb2_grpc`` (service stub and servicer) and ``kvwire_pb2.pyi`` are
git-ignored and never edited by hand; regenerate them with ``python -m kvwire.server.grpc_codegen``.
"""
