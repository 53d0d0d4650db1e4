"""Strict, bounded protobuf decoding: the one gate between network bytes and our code.

Protobuf parsing is lenient (unknown fields are kept, fields may repeat or come in
any order), so two different byte strings can decode to the same message. For
formats whose bytes are authenticated that leniency would let a tampered byte go
unnoticed, so we accept only the canonical encoding: the input must be exactly
what re-serializing the parsed message (with unknown fields dropped) gives back.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError, Message

from dna_core.errors import MalformedError

M = TypeVar("M", bound=Message)


def decode_message(cls: type[M], data: bytes, *, max_size: int, what: str) -> M:
    """Parse ``data`` as ``cls`` or raise MalformedError; refuses more than ``max_size`` bytes."""
    msg = _parsed(cls, data, max_size, what)
    msg.DiscardUnknownFields()
    if msg.SerializeToString(deterministic=True) != data:
        raise MalformedError(f"{what}: non-canonical encoding or unknown fields")
    return msg


def decode_extensible(
    cls: type[M],
    data: bytes,
    *,
    max_size: int,
    what: str,
    closed: frozenset[str] = frozenset(),
) -> M:
    """Parse ``data``, signed bytes a newer writer may have added fields to, as ``cls``.

    The forward-compatibility rule (docs/protocol.md): a field this version does not know
    is accepted and ignored (dropped from the message returned, so nothing reads, stores
    or forwards it), but only where the caller checks a signature over exactly ``data``
    (nothing unauthenticated is added), and only after every known field: the input must
    be what re-serializing the parsed message with its unknown fields gives back, so the
    known fields are canonical and one message still has one accepted encoding per set of
    unknown fields (a newer writer, which numbers new fields above the old ones and writes
    canonically, puts them last). A message type named in ``closed`` (by full name, such
    as a key set, whose bytes are its identity) may carry no unknown field anywhere in
    the tree. Raises MalformedError as `decode_message`."""
    msg = _parsed(cls, data, max_size, what)
    if msg.SerializeToString(deterministic=True) != data:
        raise MalformedError(f"{what}: non-canonical encoding")
    if closed:
        _refuse_unknown_in(msg, closed, what)
    msg.DiscardUnknownFields()
    return msg


def _parsed(cls: type[M], data: bytes, max_size: int, what: str) -> M:
    """``data`` parsed as ``cls``, unknown fields kept: the checks both decoders share."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise MalformedError(f"{what}: {len(data)} bytes exceeds the {max_size}-byte cap")
    msg = cls()
    try:
        msg.ParseFromString(bytes(data))
    except (DecodeError, RecursionError, ValueError) as exc:
        raise MalformedError(f"{what}: not a valid protobuf encoding") from exc
    return msg


def _refuse_unknown_in(msg: Message, closed: frozenset[str], what: str) -> None:
    """MalformedError if a message of a ``closed`` type in ``msg``'s tree has unknown
    fields."""
    name = msg.DESCRIPTOR.full_name
    if name in closed and len(unknown_fields.UnknownFieldSet(msg)):
        raise MalformedError(f"{what}: a {name} with fields this version does not know")
    for descriptor, value in msg.ListFields():
        if descriptor.message_type is None:
            continue
        for child in value if descriptor.is_repeated else (value,):
            _refuse_unknown_in(child, closed, what)


def encode_message(msg: Message) -> bytes:
    """Serialize in the canonical form that ``decode_message`` accepts."""
    return msg.SerializeToString(deterministic=True)
