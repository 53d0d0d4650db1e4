"""The peer's one payload codec (issue 12 item 3): each kind becomes its typed value with
every field, nothing else decodes, and nesting cannot make it recurse; fields a newer dna
adds are ignored (forward compatibility, docs/protocol.md), but for a key set's."""

from __future__ import annotations

import pytest
from dna_core.crypto import Identity
from dna_core.errors import MalformedError
from dna_core.wire.gen.dna.v1 import envelope_pb2 as pb
from dna_peer.payloads import (
    ContactCard,
    DeviceAck,
    DeviceHello,
    DeviceLink,
    Empty,
    History,
    Payload,
    ReadMarker,
    Receipt,
    Rotation,
    Text,
    Transcript,
    decode_payload,
)
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message


def raw(**kind: object) -> bytes:
    return pb.Payload(**kind).SerializeToString()  # type: ignore[arg-type]


def text(body: str, conversation: bytes = b"") -> bytes:
    return raw(text=pb.Text(body=body, conversation_id=conversation))


HELLO = pb.DeviceHello(device_id=b"d" * 16, device_name="phone", wants_history=True)
SENT = pb.SyncTranscript(original_recipient=b"r" * 32, original_message_id=b"m" * 16,
                         original_timestamp_ms=7, payload=text("hi", b"c" * 32),
                         original_sender=b"s" * 32)  # fmt: skip
TYPED_HELLO = DeviceHello(b"d" * 16, "phone", True)
TYPED_SENT = Transcript(b"r" * 32, b"m" * 16, 7, Text("hi", b"c" * 32), b"s" * 32)


def cases(alice: Identity) -> dict[str, tuple[bytes, Payload]]:
    card = pb.ContactCard(keys=alice.public.to_proto(), name="alice", verified=True)
    marker = pb.ReadMarker(conversation_id=b"c" * 32, read_up_to_ms=9)
    return {
        "text": (text("hi", b"c" * 32), Text("hi", b"c" * 32)),
        "receipt": (raw(receipt=pb.DeliveryReceipt(message_ids=[b"1", b"2"])),
                    Receipt((b"1", b"2"))),
        "sync": (raw(sync=SENT), TYPED_SENT),
        "read": (raw(read=marker), ReadMarker(b"c" * 32, 9)),
        "link": (raw(link=pb.DeviceLink(encrypted_identity=b"e", device_name="new",
                                        device_id=b"i" * 16, devices=[HELLO])),
                 DeviceLink(b"e", "new", b"i" * 16, (TYPED_HELLO,))),
        "device": (raw(device=HELLO), TYPED_HELLO),
        "ack": (raw(ack=pb.DeviceAck(device_id=b"d" * 16, blob_ids=[b"b"])),
                DeviceAck(b"d" * 16, (b"b",))),
        "history": (raw(history=pb.History(messages=[SENT], read=[marker], contacts=[card],
                                           devices=[HELLO])),
                    History((TYPED_SENT,), (ReadMarker(b"c" * 32, 9),),
                            (ContactCard(alice.public, "alice", True),), (TYPED_HELLO,))),
        "rotation": (raw(rotation=pb.IdentityRotation(statement=b"s", new_seeds=b"n")),
                     Rotation(b"s", b"n")),
        "empty": (b"", Empty()),
    }  # fmt: skip


def test_every_kind_decodes_to_its_type_with_every_field(alice: Identity) -> None:
    all_cases = cases(alice)
    kinds = {f.name for f in pb.Payload.DESCRIPTOR.oneofs_by_name["kind"].fields} | {"empty"}
    assert set(all_cases) == kinds  # a kind added to envelope.proto needs a case here
    for kind, (data, typed) in all_cases.items():
        assert decode_payload(data) == typed, kind
        assert typed.kind == kind


def test_a_transcript_of_another_kind_stands_for_an_empty_text() -> None:
    inner = pb.SyncTranscript(original_recipient=b"r" * 32, original_message_id=b"m" * 16,
                              payload=raw(read=pb.ReadMarker()))  # fmt: skip
    decoded = decode_payload(raw(sync=inner))
    assert isinstance(decoded, Transcript) and decoded.text == Text("")


def test_transcripts_nested_deep_decode_one_level_only() -> None:
    data = text("deep")
    for _ in range(3_000):  # far past Python's recursion limit, well under the size cap
        data = raw(sync=pb.SyncTranscript(payload=data))
    data = raw(sync=pb.SyncTranscript(original_recipient=b"r" * 32,
                                      original_message_id=b"m" * 16, payload=data))  # fmt: skip
    decoded = decode_payload(data)
    assert isinstance(decoded, Transcript) and decoded.text == Text("")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff", "payload: not a valid protobuf encoding"),
        (b"\x58\x01" + raw(text=pb.Text(body="x")), "payload: non-canonical encoding"),
        (raw(text=pb.Text(body="x")) * 2, "payload: non-canonical encoding"),
        (b"\x0a\x02\x0a\x00", "payload: non-canonical encoding"),  # text: body "" written
        (b"\x00" * (192 * 1024 + 1), "bytes exceeds the 196608-byte cap"),
        (raw(sync=pb.SyncTranscript(payload=b"\xff")), "transcript payload: not a valid"),
        (raw(sync=pb.SyncTranscript(original_recipient=b"r" * 32)), "message ID has 16 bytes"),
        (raw(sync=pb.SyncTranscript(original_message_id=b"m" * 16)), "recipient has 32 bytes"),
        (
            raw(
                history=pb.History(
                    messages=[
                        pb.SyncTranscript(
                            original_recipient=b"r" * 32,
                            original_message_id=b"m" * 16,
                            original_sender=b"s",
                        )
                    ]
                )
            ),
            "sender has 32 bytes, not 1",
        ),
        (raw(device=pb.DeviceHello(device_name="x")), "a device ID has 16 bytes, not 0"),
        (raw(ack=pb.DeviceAck(device_id=b"d" * 17)), "a device ID has 16 bytes, not 17"),
        (raw(history=pb.History(devices=[pb.DeviceHello(device_id=b"d")])), "16 bytes, not 1"),
    ],
)
def test_what_does_not_decode_is_malformed(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedError, match=reason):
        decode_payload(data)


def unknown_field(number: int) -> bytes:
    """Field ``number`` as a varint 1: a field this version does not know."""
    tag, out = number << 3, bytearray()
    while tag > 0x7F:
        out.append(tag & 0x7F | 0x80)
        tag >>= 7
    return bytes([*out, tag, 1])


def newer(msg: Message, extended: set[str]) -> None:
    """``msg`` as a newer dna writes it: one more field in each message of its tree (the
    transcripts' inner payloads too), numbered above every field this version knows. Key
    sets are left alone (closed: below). Names what it extended in ``extended``."""
    descriptor = msg.DESCRIPTOR
    if descriptor.full_name == "dna.v1.PublicKeySet":
        return
    for field, value in msg.ListFields():
        if field.message_type is not None:
            for child in value if field.is_repeated else (value,):
                newer(child, extended)
    if isinstance(msg, pb.SyncTranscript) and msg.payload:
        inner = pb.Payload.FromString(msg.payload)
        newer(inner, extended)
        msg.payload = inner.SerializeToString(deterministic=True)
    msg.MergeFromString(unknown_field(max(f.number for f in descriptor.fields) + 1))
    extended.add(descriptor.full_name)


def reachable(descriptor: Descriptor, seen: set[str]) -> set[str]:
    """Every message type a ``descriptor`` message can hold, itself included."""
    if descriptor.full_name not in seen:
        seen.add(descriptor.full_name)
        for field in descriptor.fields:
            if field.message_type is not None:
                reachable(field.message_type, seen)
    return seen


def test_a_newer_dna_s_fields_are_ignored_in_every_payload_message(alice: Identity) -> None:
    """An older dna refused a payload carrying any field it did not know (`decode_message`
    took it for a non-canonical encoding), so each field added to a message (the hello's
    `offered_until_ms`, last session) made the older devices drop that message whole:
    a newer device's hello, acknowledgements, history. A payload's bytes are what its
    sender signed, so nothing unauthenticated comes in with such a field: now every
    message of every kind decodes as before with one more field in each (the known part
    still canonical), and the field is dropped."""
    extended: set[str] = set()
    for kind, (data, typed) in cases(alice).items():
        if kind == "empty":
            continue
        msg = pb.Payload.FromString(data)
        newer(msg, extended)
        with_more = msg.SerializeToString(deterministic=True)
        assert len(with_more) > len(data)
        assert decode_payload(with_more) == typed, kind
    every_type = reachable(pb.Payload.DESCRIPTOR, set()) - {"dna.v1.PublicKeySet"}
    assert extended == every_type  # every message type the payload can carry was tried


def test_a_newer_kind_is_empty_and_a_key_set_is_closed(alice: Identity) -> None:
    """A kind a newer dna added is no kind this version knows (`Empty`, which the inbox
    refuses by name). A key set's fields are its fingerprint's input, so a contact card
    whose keys carry a field this version does not know is refused, not pinned as the
    keys it does know."""
    number = max(f.number for f in pb.Payload.DESCRIPTOR.fields) + 1
    newer_kind = bytes([number << 3 | 2, 2]) + unknown_field(1)
    assert decode_payload(newer_kind) == Empty()
    keys = alice.public.to_proto()
    keys.MergeFromString(unknown_field(max(f.number for f in keys.DESCRIPTOR.fields) + 1))
    card = pb.ContactCard(keys=keys, name="alice")
    data = pb.Payload(history=pb.History(contacts=[card])).SerializeToString(deterministic=True)
    with pytest.raises(MalformedError, match="PublicKeySet with fields this version does not"):
        decode_payload(data)
