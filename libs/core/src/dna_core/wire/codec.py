"""Strict, bounded protobuf decoding: the one gate between network bytes and our code.

Protobuf parsing is lenient (unknown fields are kept, fields may repeat or come in
any order), so two different byte strings can decode to the same message. For
formats whose bytes are authenticated that leniency would let a tampered byte go
unnoticed, so we accept only the canonical encoding: the input must be exactly
what re-serializing the parsed message (with unknown fields dropped) gives back.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from dna_core.errors import MalformedError

M = TypeVar("M", bound=Message)


def decode_message(cls: type[M], data: bytes, *, max_size: int, what: str) -> M:
    """Parse ``data`` as ``cls`` or raise MalformedError; refuses more than ``max_size`` bytes."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise MalformedError(f"{what}: {len(data)} bytes exceeds the {max_size}-byte cap")
    msg = cls()
    try:
        msg.ParseFromString(bytes(data))
    except (DecodeError, RecursionError, ValueError) as exc:
        raise MalformedError(f"{what}: not a valid protobuf encoding") from exc
    msg.DiscardUnknownFields()
    if msg.SerializeToString(deterministic=True) != data:
        raise MalformedError(f"{what}: non-canonical encoding or unknown fields")
    return msg


def encode_message(msg: Message) -> bytes:
    """Serialize in the canonical form that ``decode_message`` accepts."""
    return msg.SerializeToString(deterministic=True)
