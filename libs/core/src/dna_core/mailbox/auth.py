"""Owner-signed mailbox requests (fetch, delete) and their replay protection.

A request carries the exact signed body bytes (FetchBody / DeleteBody), the
owner's public key set and a hybrid signature over label-separated body bytes.
A storage node accepts it only if:

* the owner's key set hashes to the fingerprint whose mailbox ID the body names;
* the signature verifies (domain ``mailbox-fetch`` or ``mailbox-delete``, so a
  signed fetch can never pass as a delete);
* the timestamp is within ``window`` of the node's clock, and
* the nonce was not seen within that window (``NonceCache``).

So a captured request can be replayed neither later (timestamp) nor within the
window (nonce); storage nodes still never hold a key that decrypts anything.

Fetch sessions make polling cheap: a signed fetch may ask for one
(``open_session``), and the node answers with a session ID and a hybrid KEM
ciphertext to the owner's keys; the session key is that KEM secret expanded
with HKDF over the session ID, so only the owner and that node hold it. Later
fetches to that node carry the session ID and an HMAC-SHA256 of the body under
the key instead of a signature (~2 µs instead of ~0.8 ms to sign and ~0.27 ms
to verify); the body, its timestamp window and nonce are checked as before. A
session serves one mailbox at one node for ``SESSION_TTL_MS``; the node keeps
at most ``max_size`` sessions (least recently used go first) and forgets them
all on restart, and the client then signs again. Deletes are always signed.

A fetch is either for any node (version 1: one ``cursor``) or for named nodes
(version 2: ``node_cursors``, node ID -> cursor): the client signs once for all
the replicas it asks, each node reads from its own cursor and refuses a request
that does not name it. Nonce caches are per node, so the same request at each
named node is a first use at each; a replica that forwards it elsewhere reaches
only nodes the owner was asking anyway (and can at worst spend the nonce there
first: the client then asks another node, see ``MailboxClient.fetch``).
"""

from __future__ import annotations

import hmac
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dna_core.crypto import Identity, PublicKeySet, kem, signature
from dna_core.crypto import primitives as p
from dna_core.errors import ExpiredError, MalformedError, ReplayError, VerificationError
from dna_core.mailbox.ids import mailbox_id
from dna_core.wire import decode_message, encode_message
from dna_core.wire.gen.dna.v1 import mailbox_pb2

BODY_VERSION = 1
FETCH_NAMED_NODES_VERSION = 2
MAX_FETCH_NODES = 16
MAX_CURSOR_BYTES = 64
NONCE_SIZE = 16
MAX_BODY_BYTES = 64 * 1024
MAX_DELETE_IDS = 1000
MAX_FETCH_LIMIT = 1000
WINDOW_MS = 5 * 60_000
SESSION_ID_SIZE = 16
SESSION_TTL_MS = 30 * 60_000
MAX_SESSIONS = 100_000  # per node: ~200 bytes each
_FETCH, _DELETE = b"mailbox-fetch", b"mailbox-delete"
_SESSION_KEY, _SESSION_MAC = p.label("mailbox-fetch-session-key"), p.label("mailbox-fetch-session")
_VERSIONS = {_FETCH: (BODY_VERSION, FETCH_NAMED_NODES_VERSION), _DELETE: (BODY_VERSION,)}


@dataclass(frozen=True, slots=True)
class OwnerRequest:
    """A verified owner request: its mailbox, owner, and the decoded body."""

    mailbox_id: bytes
    owner: PublicKeySet
    timestamp_ms: int
    nonce: bytes


class NonceCache:
    """Nonces seen within the time window, bounded by ``max_size``.

    A nonce whose request's timestamp left the window is dropped (a replay of it fails the
    timestamp check anyway). Past ``max_size`` the oldest go first, though still inside
    their window, and each one's mailbox keeps a *floor*: the latest timestamp among its
    forgotten requests. A request of that mailbox timestamped at or before its floor is
    refused as a replay, since its nonce may be one forgotten; the owner's next request,
    timestamped later, passes. Until 2026-12-05 the oldest were simply forgotten: anyone
    signing fetches of a mailbox of their own (an identity costs nothing) could push a
    captured request's nonce out and replay it within its window, a fetch or a subscription
    of someone else's mailbox. The floors are bounded by ``max_size`` too; past it the
    oldest floor is folded into its *bucket's* floor (mailboxes that share their first two
    bytes: 1/65,536 of them), which refuses requests of that bucket timestamped at or
    before it, honest ones too, until the floor's time has passed (a floor may lie up to a
    window ahead: requests are accepted stamped that far in the future). That takes more
    than ``max_size`` mailboxes' requests forgotten within two windows, a signature
    verified for each, and harms one bucket per folded floor; until 2026-12-05 one shared
    floor held for every mailbox, so a flooder's own future-stamped requests refused
    everyone's for up to a window at each overflow."""

    def __init__(
        self, *, window_ms: int = WINDOW_MS, max_size: int = 1_000_000,
        on_forgotten: Callable[[], None] = lambda: None,
    ) -> None:  # fmt: skip
        self.window_ms, self.max_size, self.on_forgotten = window_ms, max_size, on_forgotten
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # mailbox || nonce -> timestamp
        self._floors: OrderedDict[bytes, int] = OrderedDict()  # mailbox -> floor, last raised last
        self._bucket_floors = [-1] * FLOOR_BUCKETS  # folded floors, by `_bucket`

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def floors(self) -> int:
        """How many mailboxes keep a floor."""
        return len(self._floors)

    def check(self, mailbox: bytes, nonce: bytes, timestamp_ms: int, now_ms: int) -> None:
        """Raise ExpiredError/ReplayError, or remember the request's nonce."""
        if len(nonce) != NONCE_SIZE:
            raise MalformedError(f"request nonce must be {NONCE_SIZE} bytes")
        if abs(timestamp_ms - now_ms) > self.window_ms:
            raise ExpiredError("request timestamp outside the accepted window")
        self._forget(now_ms)
        key = mailbox + nonce
        if key in self._seen:
            raise ReplayError("request nonce already used (replay)")
        if timestamp_ms <= max(
            self._bucket_floors[_bucket(mailbox)], self._floors.get(mailbox, -1)
        ):
            raise ReplayError(
                "request older than a nonce this node had to forget (its cache was full):"
                " it may be a replay; sign a new one"
            )
        self._seen[key] = timestamp_ms
        while len(self._seen) > self.max_size:
            old, old_ms = self._seen.popitem(last=False)
            self._raise_floor(old[:-NONCE_SIZE], old_ms)

    def _raise_floor(self, mailbox: bytes, timestamp_ms: int) -> None:
        self.on_forgotten()
        self._floors[mailbox] = max(timestamp_ms, self._floors.pop(mailbox, -1))
        while len(self._floors) > self.max_size:
            folded, floor = self._floors.popitem(last=False)
            bucket = _bucket(folded)
            self._bucket_floors[bucket] = max(self._bucket_floors[bucket], floor)

    def _forget(self, now_ms: int) -> None:
        """Drop what no request inside the window can need: nonces and floors timestamped
        before it (in insertion order, so one stamped ahead holds back those after it, at
        most two windows from their arrival)."""
        cutoff = now_ms - self.window_ms
        for memory in (self._seen, self._floors):
            while memory:
                key, timestamp_ms = next(iter(memory.items()))
                if timestamp_ms >= cutoff:
                    break
                del memory[key]


FLOOR_BUCKETS = 1 << 16  # a folded floor holds for the mailboxes of its bucket only


def _bucket(mailbox: bytes) -> int:
    return int.from_bytes(mailbox[:2].ljust(2, b"\0"), "big")


@dataclass(frozen=True, slots=True)
class FetchSession:
    """One side's view of a fetch session: the node's (with the owner it serves) or the
    client's (``owner`` None)."""

    session_id: bytes
    key: bytes
    mailbox_id: bytes
    expires_ms: int
    owner: PublicKeySet | None = None

    def mac(self, body: bytes) -> bytes:
        return hmac.digest(self.key, _SESSION_MAC + body, "sha256")


def _session_key(secret: bytes, session_id: bytes) -> bytes:
    hkdf = HKDF(hashes.SHA256(), 32, salt=_SESSION_KEY, info=session_id)
    return hkdf.derive(secret)


class SessionStore:
    """A node's fetch sessions by ID: bounded, least recently used go first, expired
    ones are refused (and dropped) when asked for."""

    def __init__(self, *, ttl_ms: int = SESSION_TTL_MS, max_size: int = MAX_SESSIONS) -> None:
        self.ttl_ms, self.max_size = ttl_ms, max_size
        self._sessions: OrderedDict[bytes, FetchSession] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def grant(self, owner: PublicKeySet, now_ms: int) -> mailbox_pb2.FetchSession:
        """A new session for ``owner``'s mailbox (its signed request was verified)."""
        session_id = os.urandom(SESSION_ID_SIZE)
        secret, ciphertext, ephemeral = kem.encapsulate(owner)
        expires_ms = now_ms + self.ttl_ms
        self._sessions[session_id] = FetchSession(
            session_id, _session_key(secret, session_id), mailbox_id(owner.fingerprint),
            expires_ms, owner,
        )  # fmt: skip
        while len(self._sessions) > self.max_size:
            self._sessions.popitem(last=False)
        return mailbox_pb2.FetchSession(
            session_id=session_id, kem_ciphertext=ciphertext, kem_ephemeral=ephemeral,
            expires_ms=expires_ms,
        )  # fmt: skip

    def get(self, session_id: bytes, now_ms: int) -> FetchSession:
        session = self._sessions.get(session_id)
        if session is None or session.expires_ms <= now_ms:
            self._sessions.pop(session_id, None)
            raise VerificationError("fetch: unknown or expired session (sign again)")
        self._sessions.move_to_end(session_id)
        return session


def open_session(owner: Identity, grant: mailbox_pb2.FetchSession) -> FetchSession:
    """The client's side of a node's grant (a wrong ciphertext gives a wrong key, which
    the node then refuses: the client signs again)."""
    if len(grant.session_id) != SESSION_ID_SIZE:
        raise MalformedError("fetch session: the ID has the wrong size")
    secret = kem.decapsulate(owner, grant.kem_ciphertext, grant.kem_ephemeral)
    return FetchSession(
        grant.session_id, _session_key(secret, grant.session_id),
        mailbox_id(owner.fingerprint), grant.expires_ms,
    )  # fmt: skip


def _auth(owner: Identity, domain: bytes, body: bytes) -> mailbox_pb2.OwnerAuth:
    return mailbox_pb2.OwnerAuth(
        owner=owner.public.to_proto(), signature=signature.sign(owner, domain, body)
    )


def fetch_body(
    box: bytes,
    *,
    cursor: bytes = b"",
    limit: int,
    now_ms: int,
    node_cursors: Mapping[bytes, bytes] | None = None,
    open_session: bool = False,
) -> bytes:
    """The serialized FetchBody of a request for mailbox ``box`` (see `sign_fetch`)."""
    named = [mailbox_pb2.NodeCursor(node_id=n, cursor=c) for n, c in (node_cursors or {}).items()]
    return encode_message(
        mailbox_pb2.FetchBody(
            version=FETCH_NAMED_NODES_VERSION if named else BODY_VERSION,
            mailbox_id=box, cursor=cursor, limit=limit, timestamp_ms=now_ms,
            nonce=os.urandom(NONCE_SIZE), node_cursors=named, open_session=open_session,
        )
    )  # fmt: skip


def sign_fetch(
    owner: Identity,
    *,
    cursor: bytes = b"",
    limit: int,
    now_ms: int,
    node_cursors: Mapping[bytes, bytes] | None = None,
    open_session: bool = False,
) -> bytes:
    """A FetchRequest for the owner's mailbox: from ``cursor`` on whichever node receives
    it, or, with ``node_cursors`` (node ID -> cursor), one request for exactly those nodes,
    each reading from its own cursor (one signature instead of one per replica)."""
    body = fetch_body(
        mailbox_id(owner.fingerprint), cursor=cursor, limit=limit, now_ms=now_ms,
        node_cursors=node_cursors, open_session=open_session,
    )  # fmt: skip
    return encode_message(mailbox_pb2.FetchRequest(body=body, auth=_auth(owner, _FETCH, body)))


def session_fetch(session: FetchSession, body: bytes) -> mailbox_pb2.FetchRequest:
    """A FetchRequest authenticated within ``session`` (for the node that granted it)."""
    return mailbox_pb2.FetchRequest(body=body, session_id=session.session_id, mac=session.mac(body))


def sign_delete(owner: Identity, blob_ids: list[bytes], *, now_ms: int) -> bytes:
    """A DeleteRequest for blobs of the owner's mailbox."""
    body = encode_message(
        mailbox_pb2.DeleteBody(
            version=BODY_VERSION, mailbox_id=mailbox_id(owner.fingerprint), blob_ids=blob_ids,
            timestamp_ms=now_ms, nonce=os.urandom(NONCE_SIZE),
        )
    )  # fmt: skip
    return encode_message(mailbox_pb2.DeleteRequest(body=body, auth=_auth(owner, _DELETE, body)))


def verify_fetch(
    request: mailbox_pb2.FetchRequest,
    *,
    now_ms: int,
    nonces: NonceCache,
    node_id: bytes | None = None,
    sessions: SessionStore | None = None,
) -> tuple[OwnerRequest, mailbox_pb2.FetchBody]:
    """Verify a fetch received by the node ``node_id`` (``fetch_cursor`` then gives the
    cursor to read from); a request naming other nodes only is refused before any
    signature work and without spending its nonce here. A request carrying a session ID
    is checked against ``sessions`` (None: this node grants none) instead of a signature."""
    body = decode_message(
        mailbox_pb2.FetchBody, request.body, max_size=MAX_BODY_BYTES, what="fetch body"
    )
    if not 0 < body.limit <= MAX_FETCH_LIMIT or len(body.cursor) > MAX_CURSOR_BYTES:
        raise MalformedError(
            f"fetch: limit must be 1..{MAX_FETCH_LIMIT}, cursor <= {MAX_CURSOR_BYTES} bytes"
        )
    fetch_cursor(body, node_id)
    if request.session_id or request.mac:
        return _verify_session(request, body, now_ms, nonces, sessions), body
    owner = _verify(request.body, request.auth, _FETCH, body, now_ms, nonces)
    return owner, body


def _verify_session(
    request: mailbox_pb2.FetchRequest,
    body: mailbox_pb2.FetchBody,
    now_ms: int,
    nonces: NonceCache,
    sessions: SessionStore | None,
) -> OwnerRequest:
    if request.HasField("auth") or body.open_session:
        raise MalformedError("fetch: a session request carries no signature, opens nothing")
    if sessions is None:
        raise VerificationError("fetch: this node grants no sessions")
    _check_shape(_FETCH, body)
    session = sessions.get(request.session_id, now_ms)
    if session.mailbox_id != body.mailbox_id:
        raise VerificationError("fetch: the session is for another mailbox")
    if not hmac.compare_digest(session.mac(request.body), request.mac):
        raise VerificationError("fetch: session MAC does not verify")
    nonces.check(body.mailbox_id, body.nonce, body.timestamp_ms, now_ms)
    assert session.owner is not None  # a node's sessions always know their owner
    return OwnerRequest(body.mailbox_id, session.owner, body.timestamp_ms, body.nonce)


def fetch_cursor(body: mailbox_pb2.FetchBody, node_id: bytes | None) -> bytes:
    """Where the node ``node_id`` reads from: ``cursor`` (version 1), or its own entry of
    ``node_cursors`` (version 2); a version 2 request that does not name it is refused."""
    if body.version != FETCH_NAMED_NODES_VERSION:
        if body.node_cursors:
            raise MalformedError("fetch: node cursors need version 2")
        return body.cursor
    _check_node_cursors(body)
    for entry in body.node_cursors:
        if entry.node_id == node_id:
            return entry.cursor
    raise VerificationError("fetch: the request is not addressed to this node")


def _check_node_cursors(body: mailbox_pb2.FetchBody) -> None:
    ids = [entry.node_id for entry in body.node_cursors]
    if (
        body.cursor
        or not 0 < len(ids) <= MAX_FETCH_NODES
        or len(set(ids)) != len(ids)
        or any(len(i) != 32 for i in ids)
        or any(len(entry.cursor) > MAX_CURSOR_BYTES for entry in body.node_cursors)
    ):
        raise MalformedError(
            f"fetch: version 2 names 1..{MAX_FETCH_NODES} distinct 32-byte node IDs, "
            f"each cursor <= {MAX_CURSOR_BYTES} bytes, and no shared cursor"
        )


def verify_delete(
    request: mailbox_pb2.DeleteRequest, *, now_ms: int, nonces: NonceCache | None
) -> tuple[OwnerRequest, mailbox_pb2.DeleteBody]:
    """Verify a delete; ``nonces=None`` when re-checking a tombstone's authorization
    received through repair (replaying an authorized delete is harmless)."""
    body = decode_message(
        mailbox_pb2.DeleteBody, request.body, max_size=MAX_BODY_BYTES, what="delete body"
    )
    if not 0 < len(body.blob_ids) <= MAX_DELETE_IDS or any(len(b) != 32 for b in body.blob_ids):
        raise MalformedError(f"delete: 1..{MAX_DELETE_IDS} blob IDs of 32 bytes")
    owner = _verify(request.body, request.auth, _DELETE, body, now_ms, nonces)
    return owner, body


def _check_shape(domain: bytes, body: mailbox_pb2.FetchBody | mailbox_pb2.DeleteBody) -> None:
    if body.version not in _VERSIONS[domain]:
        raise MalformedError(f"{domain.decode()}: unknown version {body.version}")
    if len(body.nonce) != NONCE_SIZE or len(body.mailbox_id) != 32:
        raise MalformedError(f"{domain.decode()}: nonce or mailbox ID has the wrong size")


def _verify(
    raw: bytes,
    auth: mailbox_pb2.OwnerAuth,
    domain: bytes,
    body: mailbox_pb2.FetchBody | mailbox_pb2.DeleteBody,
    now_ms: int,
    nonces: NonceCache | None,
) -> OwnerRequest:
    _check_shape(domain, body)
    owner = PublicKeySet.from_proto(auth.owner)
    if mailbox_id(owner.fingerprint) != body.mailbox_id:
        raise VerificationError(f"{domain.decode()}: signer does not own this mailbox")
    signature.verify(owner, domain, raw, auth.signature)
    if nonces is not None:
        nonces.check(body.mailbox_id, body.nonce, body.timestamp_ms, now_ms)
    return OwnerRequest(body.mailbox_id, owner, body.timestamp_ms, body.nonce)
