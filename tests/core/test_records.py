"""Signed records: seq and expiry inside the signed bytes; tamper, expiry, signer checks."""

from __future__ import annotations

import pytest
from dna_core.crypto import Identity, open_record, sign_record
from dna_core.errors import ExpiredError, MalformedError, ProtocolError, VerificationError
from dna_core.wire import encode_message
from dna_core.wire.gen.dna.v1 import common_pb2
from support import single_byte_tampers

NOW = 1_780_000_000_000
KEY = b"\x42" * 32
IDENTITY = common_pb2.RECORD_KIND_IDENTITY


def _record(who: Identity, seq: int = 1, ttl_ms: int = 60_000, payload: bytes = b"p") -> bytes:
    return sign_record(
        who, kind=IDENTITY, key=KEY, seq=seq, now_ms=NOW, ttl_ms=ttl_ms, payload=payload
    )


def test_round_trip(alice: Identity) -> None:
    data = _record(alice, seq=7)
    rec = open_record(data, now_ms=NOW + 1)
    assert rec.body.seq == 7
    assert rec.body.expires_ms == NOW + 60_000
    assert rec.signer == alice.public
    assert rec.raw == data  # kept byte for byte, to store and forward unchanged


def test_expired_and_future_records_are_refused(alice: Identity) -> None:
    data = _record(alice)
    with pytest.raises(ExpiredError, match="expired"):
        open_record(data, now_ms=NOW + 60_000)
    with pytest.raises(ExpiredError, match="future"):
        open_record(data, now_ms=NOW - 10 * 60_000)


def test_every_single_byte_tamper_is_refused(alice: Identity) -> None:
    data = _record(alice)
    for tampered in single_byte_tampers(data, limit=600, seed=1):
        with pytest.raises(ProtocolError):
            open_record(tampered, now_ms=NOW)


def test_seq_and_expiry_cannot_be_changed_by_others(alice: Identity) -> None:
    signed = common_pb2.SignedRecord.FromString(_record(alice))
    body = common_pb2.RecordBody.FromString(signed.body)
    for field, value in (("seq", 99), ("expires_ms", NOW + 10**9)):
        changed = common_pb2.RecordBody()
        changed.CopyFrom(body)
        setattr(changed, field, value)
        signed.body = encode_message(changed)
        with pytest.raises(VerificationError, match="signature"):
            open_record(encode_message(signed), now_ms=NOW)


def test_signer_must_match_the_fingerprint(alice: Identity, bob: Identity) -> None:
    signed = common_pb2.SignedRecord.FromString(_record(alice))
    signed.signer.CopyFrom(bob.public.to_proto())
    with pytest.raises(VerificationError, match="do not match"):
        open_record(encode_message(signed), now_ms=NOW)


def test_invalid_bodies_are_refused_at_signing(alice: Identity) -> None:
    with pytest.raises(MalformedError, match="kind"):
        sign_record(alice, kind=99, key=KEY, seq=1, now_ms=NOW, ttl_ms=1, payload=b"")
    with pytest.raises(MalformedError, match="32 bytes"):
        sign_record(alice, kind=IDENTITY, key=b"short", seq=1, now_ms=NOW, ttl_ms=1, payload=b"")
    with pytest.raises(MalformedError, match="expires"):
        sign_record(alice, kind=IDENTITY, key=KEY, seq=1, now_ms=NOW, ttl_ms=0, payload=b"")
    with pytest.raises(MalformedError, match="payload"):
        _record(alice, payload=b"\0" * 9000)


def test_the_cheap_checks_come_before_the_signature(
    alice: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record for another key, expired or from the future is refused without checking its
    signature (~0.3 ms each): a reader asking for a key spends nothing on others' records."""
    from dna_core.crypto import signature

    def no_signature_check(*args: object) -> None:
        raise AssertionError("the signature was checked")

    data = _record(alice)
    monkeypatch.setattr(signature, "verify", no_signature_check)
    with pytest.raises(VerificationError, match="another key"):
        open_record(data, now_ms=NOW, key=b"\x43" * 32)
    with pytest.raises(ExpiredError, match="expired"):
        open_record(data, now_ms=NOW + 60_000, key=KEY)
    with pytest.raises(ExpiredError, match="future"):
        open_record(data, now_ms=NOW - 10 * 60_000)
    monkeypatch.undo()
    assert open_record(data, now_ms=NOW, key=KEY).body.key == KEY
