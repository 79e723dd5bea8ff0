"""The gRPC wire: stubs generated from ``proto/kvwire.proto``, and the limits both ends configure.

``kvwire_pb2`` (messages), ``kvwire_pb2_grpc`` (service stub and servicer) and ``kvwire_pb2.pyi`` are
generated at build/install time (docs/grpc.md), git-ignored and never edited by hand; regenerate them
with ``python -m kvwire.server.grpc_codegen``. The constants here import nothing, so a client can use
them without the server's dependencies.
"""

#: Largest message either side sends or accepts (a chunk bitstream travels in one message).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Channel (and server) options: a client needs them to receive chunks as large as the server sends.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
