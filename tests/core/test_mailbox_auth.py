"""Owner-signed mailbox requests: ownership, domain separation, time window, nonces."""

from __future__ import annotations

import dataclasses

import pytest
from dna_core.crypto import Identity, signature
from dna_core.errors import (
    ExpiredError,
    MalformedError,
    ProtocolError,
    ReplayError,
    VerificationError,
)
from dna_core.mailbox import (
    FetchSession,
    NonceCache,
    SessionStore,
    blob_id,
    fetch_body,
    fetch_cursor,
    mailbox_id,
    open_session,
    put_pow_hash,
    session_fetch,
    sign_delete,
    sign_fetch,
    verify_delete,
    verify_fetch,
)
from dna_core.mailbox.auth import MAX_FETCH_NODES
from dna_core.wire import decode_message, encode_message
from dna_core.wire.gen.dna.v1 import mailbox_pb2
from hypothesis import given
from hypothesis import strategies as st
from support import single_byte_tampers

NOW = 1_780_000_000_000
BOX, OTHER, THIRD = b"a" * 32, b"b" * 32, b"c" * 32
NONCE = b"n" * 16


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
        cache.check(bytes([i]) * 32, NONCE, NOW, NOW)
    assert len(cache) == 3
    cache.check(BOX, NONCE, NOW + 5000, NOW + 5000)
    assert len(cache) == 1  # everything older than the window is gone


def test_a_nonce_the_full_cache_forgot_is_still_refused_within_its_window() -> None:
    """Past its bound the cache forgets its oldest nonce, and that nonce's mailbox refuses
    what is timestamped at or before it (it may be the forgotten one, replayed); other
    mailboxes, and the owner's later requests, pass."""
    forgotten: list[None] = []
    cache = NonceCache(window_ms=1000, max_size=2, on_forgotten=lambda: forgotten.append(None))
    cache.check(BOX, NONCE, NOW, NOW)
    cache.check(OTHER, NONCE, NOW + 10, NOW + 10)
    cache.check(OTHER, b"m" * 16, NOW + 20, NOW + 20)  # BOX's nonce is forgotten
    assert len(forgotten) == 1
    with pytest.raises(ReplayError):
        cache.check(BOX, NONCE, NOW, NOW + 30)  # the replay
    with pytest.raises(ReplayError):
        cache.check(BOX, b"x" * 16, NOW - 5, NOW + 30)  # signed before the forgotten one
    cache.check(BOX, b"y" * 16, NOW + 1, NOW + 30)  # the owner's next request
    cache.check(THIRD, b"z" * 16, NOW - 500, NOW + 30)  # other mailboxes: as before


def test_past_max_size_the_oldest_floor_holds_for_its_bucket_only() -> None:
    cache = NonceCache(window_ms=1000, max_size=1)
    cache.check(BOX, NONCE, NOW, NOW)
    cache.check(OTHER, NONCE, NOW + 10, NOW + 10)  # BOX's floor: NOW
    cache.check(THIRD, NONCE, NOW + 20, NOW + 20)  # OTHER's floor; BOX's folds into "aa"
    with pytest.raises(ReplayError):
        cache.check(BOX, NONCE, NOW, NOW + 30)
    with pytest.raises(ReplayError):
        cache.check(b"aa" + bytes(30), NONCE, NOW, NOW + 30)  # BOX's bucket, at or before it
    cache.check(b"aa" + bytes(30), NONCE, NOW + 1, NOW + 30)
    cache.check(bytes(32), b"m" * 16, NOW, NOW + 30)  # another bucket: as before


def test_a_floor_stamped_ahead_holds_back_its_bucket_not_every_mailbox() -> None:
    """A flooder stamps its own requests a window ahead; folded, the floor refuses the
    requests of its bucket until that time (a shared floor refused everyone's)."""
    cache = NonceCache(window_ms=1000, max_size=1)
    cache.check(BOX, NONCE, NOW + 1000, NOW)  # stamped a window ahead
    cache.check(OTHER, NONCE, NOW, NOW)  # BOX's floor: NOW + 1000
    cache.check(THIRD, NONCE, NOW, NOW)  # OTHER's floor; BOX's folds into "aa"
    with pytest.raises(ReplayError):
        cache.check(b"aa" + bytes(30), b"m" * 16, NOW + 5, NOW + 5)
    for mailbox in (bytes(32), b"ab" + bytes(30), OTHER[:1] + b"x" * 31):
        cache.check(mailbox, b"m" * 16, NOW + 5, NOW + 5)


def test_floors_leave_with_the_window() -> None:
    cache = NonceCache(window_ms=1000, max_size=1)
    cache.check(BOX, NONCE, NOW, NOW)
    cache.check(OTHER, NONCE, NOW, NOW)  # BOX's floor: NOW
    assert cache.floors == 1
    cache.check(THIRD, NONCE, NOW + 1001, NOW + 1001)  # nothing in the window needs it
    assert cache.floors == 0


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


# --- one signed fetch for several named nodes (version 2) -----------------------------------

NODE_A, NODE_B, NODE_C = b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 32


def _fetch_for(owner: Identity, cursors: dict[bytes, bytes]) -> mailbox_pb2.FetchRequest:
    return _fetch(sign_fetch(owner, limit=10, now_ms=NOW, node_cursors=cursors))


def test_one_signed_fetch_serves_each_named_node_from_its_own_cursor(alice: Identity) -> None:
    req = _fetch_for(alice, {NODE_A: b"\x01", NODE_B: b""})
    for node, cursor in ((NODE_A, b"\x01"), (NODE_B, b"")):
        owner, body = verify_fetch(req, now_ms=NOW, nonces=NonceCache(), node_id=node)
        assert body.version == 2 and owner.owner == alice.public
        assert fetch_cursor(body, node) == cursor


def test_a_named_fetch_replays_at_no_node_and_reaches_no_other(alice: Identity) -> None:
    req = _fetch_for(alice, {NODE_A: b"", NODE_B: b""})
    at_a = NonceCache()
    verify_fetch(req, now_ms=NOW, nonces=at_a, node_id=NODE_A)
    with pytest.raises(ReplayError):
        verify_fetch(req, now_ms=NOW, nonces=at_a, node_id=NODE_A)
    for node in (NODE_C, None):  # unnamed, or a node without an ID
        with pytest.raises(VerificationError, match="not addressed to this node"):
            verify_fetch(req, now_ms=NOW, nonces=NonceCache(), node_id=node)


def test_an_unnamed_node_refuses_before_any_signature_work(alice: Identity) -> None:
    """A forged signature is not even looked at, and the nonce is not spent there."""
    req = _fetch_for(alice, {NODE_A: b""})
    req.auth.signature = b"\x00" * len(req.auth.signature)
    nonces = NonceCache()
    with pytest.raises(VerificationError, match="not addressed"):
        verify_fetch(req, now_ms=NOW, nonces=nonces, node_id=NODE_B)
    assert len(nonces) == 0
    with pytest.raises(VerificationError, match="signature"):
        verify_fetch(req, now_ms=NOW, nonces=nonces, node_id=NODE_A)


def test_version_one_fetches_still_serve_any_node(alice: Identity) -> None:
    req = _fetch(sign_fetch(alice, cursor=b"\x07", limit=10, now_ms=NOW))
    _, body = verify_fetch(req, now_ms=NOW, nonces=NonceCache(), node_id=NODE_C)
    assert body.version == 1 and fetch_cursor(body, NODE_C) == b"\x07"


def _resigned(owner: Identity, body: mailbox_pb2.FetchBody) -> mailbox_pb2.FetchRequest:
    raw = encode_message(body)
    return mailbox_pb2.FetchRequest(
        body=raw,
        auth=mailbox_pb2.OwnerAuth(
            owner=owner.public.to_proto(), signature=signature.sign(owner, b"mailbox-fetch", raw)
        ),
    )


@pytest.mark.parametrize(
    "bend",
    ["shared cursor", "duplicate node", "short node ID", "long cursor", "too many", "v1 + nodes"],
)
def test_malformed_named_fetches_are_refused(alice: Identity, bend: str) -> None:
    body = mailbox_pb2.FetchBody.FromString(_fetch_for(alice, {NODE_A: b""}).body)
    if bend == "shared cursor":
        body.cursor = b"\x01"
    elif bend == "duplicate node":
        body.node_cursors.add(node_id=NODE_A)
    elif bend == "short node ID":
        body.node_cursors[0].node_id = b"\xaa" * 31
    elif bend == "long cursor":
        body.node_cursors[0].cursor = b"\x00" * 65
    elif bend == "too many":
        body.node_cursors.extend(
            mailbox_pb2.NodeCursor(node_id=bytes([i]) * 32) for i in range(MAX_FETCH_NODES)
        )
    else:
        body.version = 1
    with pytest.raises(MalformedError):
        verify_fetch(_resigned(alice, body), now_ms=NOW, nonces=NonceCache(), node_id=NODE_A)


NODE = bytes(range(32))


def _session_request(session: FetchSession, now: int = NOW) -> mailbox_pb2.FetchRequest:
    body = fetch_body(session.mailbox_id, limit=5, now_ms=now, node_cursors={NODE: b""})
    return session_fetch(session, body)


def test_a_granted_session_verifies_with_a_mac_and_only_its_owner_can_open_it(
    alice: Identity, bob: Identity
) -> None:
    store = SessionStore()
    grant = store.grant(alice.public, NOW)
    session = open_session(alice, grant)
    owner, _ = verify_fetch(
        _session_request(session), now_ms=NOW, nonces=NonceCache(), node_id=NODE, sessions=store
    )
    assert owner.mailbox_id == mailbox_id(alice.fingerprint) and owner.owner == alice.public
    wrong = open_session(bob, grant)  # ML-KEM implicit rejection: a different key
    assert wrong.key != session.key
    wrong = dataclasses.replace(wrong, mailbox_id=session.mailbox_id)  # Bob claims Alice's
    with pytest.raises(VerificationError, match="MAC"):
        verify_fetch(
            _session_request(wrong), now_ms=NOW, nonces=NonceCache(), node_id=NODE, sessions=store
        )


def test_sessions_expire_and_the_store_stays_bounded(alice: Identity) -> None:
    store = SessionStore(ttl_ms=1_000, max_size=3)
    sessions = [open_session(alice, store.grant(alice.public, NOW)) for _ in range(4)]
    assert len(store) == 3
    for session, now in [(sessions[0], NOW), (sessions[3], NOW + 1_000)]:  # evicted, expired
        with pytest.raises(VerificationError, match="unknown or expired"):
            verify_fetch(
                _session_request(session, now), now_ms=now, nonces=NonceCache(),
                node_id=NODE, sessions=store,
            )  # fmt: skip
    verify_fetch(
        _session_request(sessions[2]), now_ms=NOW, nonces=NonceCache(), node_id=NODE,
        sessions=store,
    )  # fmt: skip


def test_a_session_request_may_neither_carry_a_signature_nor_open_a_session(
    alice: Identity,
) -> None:
    store = SessionStore()
    session = open_session(alice, store.grant(alice.public, NOW))
    signed = _fetch(sign_fetch(alice, limit=5, now_ms=NOW, node_cursors={NODE: b""}))
    both = _session_request(session)
    both.auth.CopyFrom(signed.auth)
    opening = fetch_body(
        session.mailbox_id, limit=5, now_ms=NOW, node_cursors={NODE: b""}, open_session=True
    )
    for request in (both, session_fetch(session, opening)):
        with pytest.raises(MalformedError):
            verify_fetch(request, now_ms=NOW, nonces=NonceCache(), node_id=NODE, sessions=store)
    with pytest.raises(VerificationError, match="grants no sessions"):
        verify_fetch(_session_request(session), now_ms=NOW, nonces=NonceCache(), node_id=NODE)
