"""Owner-signed mailbox requests: ownership, domain separation, time window, nonces."""

from __future__ import annotations

import pytest
from dna_core.crypto import Identity
from dna_core.errors import (
    ExpiredError,
    MalformedError,
    ProtocolError,
    ReplayError,
    VerificationError,
)
from dna_core.mailbox import (
    NonceCache,
    blob_id,
    mailbox_id,
    put_pow_hash,
    sign_delete,
    sign_fetch,
    verify_delete,
    verify_fetch,
)
from dna_core.wire import decode_message, encode_message
from dna_core.wire.gen.dna.v1 import mailbox_pb2
from hypothesis import given
from hypothesis import strategies as st
from support import single_byte_tampers

NOW = 1_780_000_000_000


def _fetch(data: bytes) -> mailbox_pb2.FetchRequest:
    return decode_message(mailbox_pb2.FetchRequest, data, max_size=1 << 16, what="fetch")


def _delete(data: bytes) -> mailbox_pb2.DeleteRequest:
    return decode_message(mailbox_pb2.DeleteRequest, data, max_size=1 << 16, what="delete")


def test_ids_are_bound_to_what_they_name(alice: Identity, bob: Identity) -> None:
    assert mailbox_id(alice.fingerprint) != mailbox_id(bob.fingerprint)
    assert blob_id(b"x") != blob_id(b"y")
    box = mailbox_id(alice.fingerprint)
    assert put_pow_hash(box, b"x") != put_pow_hash(box, b"y")
    assert put_pow_hash(box, b"x") != put_pow_hash(mailbox_id(bob.fingerprint), b"x")


def test_fetch_round_trip(alice: Identity) -> None:
    req = _fetch(sign_fetch(alice, cursor=b"\x05", limit=50, now_ms=NOW))
    owner, body = verify_fetch(req, now_ms=NOW + 1000, nonces=NonceCache())
    assert owner.mailbox_id == mailbox_id(alice.fingerprint) == body.mailbox_id
    assert owner.owner == alice.public
    assert (body.cursor, body.limit) == (b"\x05", 50)


def test_delete_round_trip(alice: Identity) -> None:
    ids = [blob_id(b"one"), blob_id(b"two")]
    owner, body = verify_delete(
        _delete(sign_delete(alice, ids, now_ms=NOW)), now_ms=NOW, nonces=NonceCache()
    )
    assert list(body.blob_ids) == ids and owner.owner == alice.public


def test_replay_within_the_window_is_refused(alice: Identity) -> None:
    req = _fetch(sign_fetch(alice, cursor=b"", limit=10, now_ms=NOW))
    nonces = NonceCache()
    verify_fetch(req, now_ms=NOW, nonces=nonces)
    with pytest.raises(ReplayError):
        verify_fetch(req, now_ms=NOW + 60_000, nonces=nonces)


def test_old_or_future_requests_are_refused(alice: Identity) -> None:
    req = _fetch(sign_fetch(alice, cursor=b"", limit=10, now_ms=NOW))
    for now in (NOW + 6 * 60_000, NOW - 6 * 60_000):
        with pytest.raises(ExpiredError):
            verify_fetch(req, now_ms=now, nonces=NonceCache())


def test_someone_else_cannot_read_or_delete_a_mailbox(alice: Identity, bob: Identity) -> None:
    """Bob signs a fetch naming alice's mailbox: his keys do not own it."""
    req = _fetch(sign_fetch(bob, cursor=b"", limit=10, now_ms=NOW))
    body = mailbox_pb2.FetchBody.FromString(req.body)
    body.mailbox_id = mailbox_id(alice.fingerprint)
    req.body = encode_message(body)
    with pytest.raises(VerificationError, match="does not own"):
        verify_fetch(req, now_ms=NOW, nonces=NonceCache())
    req.auth.owner.CopyFrom(alice.public.to_proto())  # claims alice's keys, bob's signature
    with pytest.raises(VerificationError, match="signature"):
        verify_fetch(req, now_ms=NOW, nonces=NonceCache())


def test_a_signed_fetch_never_passes_as_a_delete(alice: Identity) -> None:
    fetch = _fetch(sign_fetch(alice, cursor=b"", limit=1, now_ms=NOW))
    forged = mailbox_pb2.DeleteRequest(body=fetch.body, auth=fetch.auth)
    with pytest.raises(ProtocolError):
        verify_delete(forged, now_ms=NOW, nonces=NonceCache())


def test_every_single_byte_tamper_is_refused(alice: Identity) -> None:
    data = sign_delete(alice, [blob_id(b"x")], now_ms=NOW)
    for tampered in single_byte_tampers(data, limit=400, seed=3):
        with pytest.raises(ProtocolError):
            verify_delete(_delete(tampered), now_ms=NOW, nonces=NonceCache())


def test_limits_are_enforced(alice: Identity) -> None:
    with pytest.raises(MalformedError, match="limit"):
        verify_fetch(
            _fetch(sign_fetch(alice, cursor=b"", limit=0, now_ms=NOW)),
            now_ms=NOW,
            nonces=NonceCache(),
        )
    with pytest.raises(MalformedError, match="blob IDs"):
        verify_delete(
            _delete(sign_delete(alice, [b"short"], now_ms=NOW)), now_ms=NOW, nonces=NonceCache()
        )


def test_nonce_cache_forgets_outside_the_window_and_stays_bounded() -> None:
    cache = NonceCache(window_ms=1000, max_size=3)
    for i in range(5):
        cache.check(bytes([i]), NOW, NOW)
    assert len(cache) == 3
    cache.check(b"late", NOW + 5000, NOW + 5000)
    assert len(cache) == 1  # everything older than two windows is gone


@given(blob=st.binary(max_size=2048))
def test_random_bytes_raise_only_protocol_errors(blob: bytes) -> None:
    for check in (
        lambda: verify_fetch(_fetch(blob), now_ms=NOW, nonces=NonceCache()),
        lambda: verify_delete(_delete(blob), now_ms=NOW, nonces=NonceCache()),
    ):
        try:
            check()
        except ProtocolError as exc:
            assert exc.reason
