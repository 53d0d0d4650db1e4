"""What an opened envelope carries, as typed values: the one place the peer decodes a
`Payload` (envelope.proto) and the only one that sees its protobuf form.

`decode_payload` checks the size cap and the canonical encoding (`decode_extensible`),
then turns the one kind that is set into a frozen dataclass, the texts inside
transcripts and the contact cards' key sets included; code past it matches on the type.

Forward compatibility (docs/protocol.md): a payload's bytes are what its sender signed,
so fields a newer dna added, after the ones this version knows, are accepted and
ignored: an older device takes a newer device's hello, ack or history for what it knows
of it. A field whose meaning an older reader must not miss goes in a new kind instead. A
payload with no kind this version knows (none set, or a newer one) is `Empty`, always
refused. A key set (a contact card's) is closed: its bytes are its fingerprint's input,
so one with an unknown field is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from dna_core.crypto import PublicKeySet
from dna_core.crypto import primitives as p
from dna_core.crypto.envelope import MAX_PAYLOAD_BYTES, MESSAGE_ID_SIZE
from dna_core.errors import MalformedError
from dna_core.wire import common_pb2, decode_extensible, envelope_pb2

from dna_peer.profile import DEVICE_ID_SIZE


@dataclass(frozen=True, slots=True)
class Text:
    kind: ClassVar[str] = "text"
    body: str
    conversation_id: bytes = b""


@dataclass(frozen=True, slots=True)
class Receipt:
    """The recipient stored these messages."""

    kind: ClassVar[str] = "receipt"
    message_ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Transcript:
    """A message another device of this identity sent (or, in a history, received);
    ``original_sender`` empty means this identity sent it."""

    kind: ClassVar[str] = "sync"
    original_recipient: bytes
    original_message_id: bytes
    original_timestamp_ms: int
    text: Text
    original_sender: bytes = b""


@dataclass(frozen=True, slots=True)
class ReadMarker:
    kind: ClassVar[str] = "read"
    conversation_id: bytes
    read_up_to_ms: int


@dataclass(frozen=True, slots=True)
class DeviceHello:
    kind: ClassVar[str] = "device"
    device_id: bytes
    device_name: str
    wants_history: bool = False
    offered_until_ms: int = 0  # a link offer's device, not one yet (envelope.proto)


@dataclass(frozen=True, slots=True)
class DeviceLink:
    kind: ClassVar[str] = "link"
    encrypted_identity: bytes
    device_name: str
    device_id: bytes
    devices: tuple[DeviceHello, ...]


@dataclass(frozen=True, slots=True)
class DeviceAck:
    kind: ClassVar[str] = "ack"
    device_id: bytes
    blob_ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ContactCard:
    keys: PublicKeySet
    name: str
    verified: bool


@dataclass(frozen=True, slots=True)
class History:
    kind: ClassVar[str] = "history"
    messages: tuple[Transcript, ...]
    read: tuple[ReadMarker, ...]
    contacts: tuple[ContactCard, ...]
    devices: tuple[DeviceHello, ...]


@dataclass(frozen=True, slots=True)
class Rotation:
    """A rotation statement; ``new_seeds`` only in the one sent to the own mailbox."""

    kind: ClassVar[str] = "rotation"
    statement: bytes
    new_seeds: bytes = b""


@dataclass(frozen=True, slots=True)
class Empty:
    kind: ClassVar[str] = "empty"


Payload = (
    Text | Receipt | Transcript | ReadMarker | DeviceLink | DeviceHello | DeviceAck | History
    | Rotation | Empty
)  # fmt: skip


# Messages that may carry no field this version does not know, wherever they are in a
# payload: a key set's fields are the input of its fingerprint.
_CLOSED = frozenset({common_pb2.PublicKeySet.DESCRIPTOR.full_name})


def decode_payload(
    raw: bytes, *, max_size: int = MAX_PAYLOAD_BYTES, what: str = "payload"
) -> Payload:
    """The typed payload in ``raw``; raises MalformedError (as `decode_message`)."""
    msg = decode_extensible(envelope_pb2.Payload, raw, max_size=max_size, what=what,
                            closed=_CLOSED)  # fmt: skip
    kind = msg.WhichOneof("kind")
    return _DECODERS[kind](msg) if kind is not None else Empty()


def _text(text: envelope_pb2.Text) -> Text:
    return Text(text.body, text.conversation_id)


def _read(marker: envelope_pb2.ReadMarker) -> ReadMarker:
    return ReadMarker(marker.conversation_id, marker.read_up_to_ms)


def _device_id(raw: bytes) -> bytes:
    """Every device ID is DEVICE_ID_SIZE bytes: another (an empty one) would be one more
    device that deletes wait for and that never acknowledges anything."""
    if len(raw) != DEVICE_ID_SIZE:
        raise MalformedError(f"payload: a device ID has {DEVICE_ID_SIZE} bytes, not {len(raw)}")
    return raw


def _hello(hello: envelope_pb2.DeviceHello) -> DeviceHello:
    return DeviceHello(_device_id(hello.device_id), hello.device_name, hello.wants_history,
                       hello.offered_until_ms)  # fmt: skip


def _transcript(item: envelope_pb2.SyncTranscript) -> Transcript:
    # Only the text is read from the inner payload (another kind stands for an empty text):
    # decoding it whole could recurse, transcript in transcript, as deep as 192 KiB allows.
    inner = decode_extensible(envelope_pb2.Payload, item.payload, max_size=MAX_PAYLOAD_BYTES,
                              what="transcript payload", closed=_CLOSED)  # fmt: skip
    text = _text(inner.text)
    _sized("transcript: message ID", item.original_message_id, MESSAGE_ID_SIZE)
    _sized("transcript: recipient", item.original_recipient, p.FINGERPRINT_SIZE)
    if item.original_sender:  # empty: this identity sent it
        _sized("transcript: sender", item.original_sender, p.FINGERPRINT_SIZE)
    return Transcript(item.original_recipient, item.original_message_id,
                      item.original_timestamp_ms, text, item.original_sender)  # fmt: skip


def _sized(what: str, raw: bytes, size: int) -> None:
    """A transcript names an envelope's message ID and fingerprints, which have one size:
    another (an empty one) is a message in a conversation with nobody."""
    if len(raw) != size:
        raise MalformedError(f"payload: {what} has {size} bytes, not {len(raw)}")


def _history(history: envelope_pb2.History) -> History:
    cards = tuple(
        ContactCard(PublicKeySet.from_proto(c.keys), c.name, c.verified) for c in history.contacts
    )
    return History(tuple(_transcript(t) for t in history.messages),
                   tuple(_read(r) for r in history.read), cards,
                   tuple(_hello(h) for h in history.devices))  # fmt: skip


def _link(link: envelope_pb2.DeviceLink) -> DeviceLink:
    return DeviceLink(link.encrypted_identity, link.device_name, link.device_id,
                      tuple(_hello(h) for h in link.devices))  # fmt: skip


# One converter per `Payload.kind` field (envelope.proto): the table is the whole codec.
_DECODERS: dict[str, Callable[[envelope_pb2.Payload], Payload]] = {
    "text": lambda m: _text(m.text),
    "receipt": lambda m: Receipt(tuple(m.receipt.message_ids)),
    "sync": lambda m: _transcript(m.sync),
    "read": lambda m: _read(m.read),
    "link": lambda m: _link(m.link),
    "device": lambda m: _hello(m.device),
    "ack": lambda m: DeviceAck(_device_id(m.ack.device_id), tuple(m.ack.blob_ids)),
    "history": lambda m: _history(m.history),
    "rotation": lambda m: Rotation(m.rotation.statement, m.rotation.new_seeds),
}
