"""Wire contracts: the protobuf modules generated from ``proto/dna/v1`` and the strict
decoding helper every codec uses.

Code outside ``dna_core.wire`` takes the generated modules from here, never from ``gen``
(whose layout is protoc's, not ours; tests/core/test_package_faces.py keeps services and
tools to that). The gRPC service modules (``*_pb2_grpc``) load on first use: they import
grpcio, which the crypto suite and the simulator do not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dna_core.wire.codec import decode_extensible, decode_message, encode_message
from dna_core.wire.gen.dna.v1 import (
    common_pb2,
    envelope_pb2,
    keystore_pb2,
    mailbox_pb2,
    overlay_pb2,
    records_pb2,
)

if TYPE_CHECKING:
    from dna_core.wire.gen.dna.v1 import mailbox_pb2_grpc, overlay_pb2_grpc

_SERVICES = {"mailbox_pb2_grpc", "overlay_pb2_grpc"}  # the protos that define gRPC services


def __getattr__(name: str) -> Any:
    """PEP 562: a ``*_pb2_grpc`` module is imported the first time it is asked for."""
    if name not in _SERVICES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"dna_core.wire.gen.dna.v1.{name}")


__all__ = [
    "common_pb2",
    "decode_extensible",
    "decode_message",
    "encode_message",
    "envelope_pb2",
    "keystore_pb2",
    "mailbox_pb2",
    "mailbox_pb2_grpc",
    "overlay_pb2",
    "overlay_pb2_grpc",
    "records_pb2",
]
