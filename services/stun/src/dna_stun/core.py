"""The STUN/TURN server as a sans-I/O state machine (RFC 8489 Binding, RFC 8656 relay).

Datagrams go in with the time (``now``, seconds of a monotonic clock: lifetimes, permissions,
channels, nonces and the bandwidth bucket are durations, which a step of the wall clock must
not stretch, cut or stall); ``Send`` instructions come out: bytes to send to an address, from
the listening socket (``via=None``) or from an allocation's relay socket (``via=`` its relay
address). Unix time, from the injected ``unix_time``, judges only what is dated in it: a
time-limited username's expiry. Only relay ports are a side effect, asked of ``RelayPorts``
(the asyncio adapter binds sockets; tests hand out numbers). Nothing here raises on input: a
malformed, unauthenticated or forbidden datagram gets its RFC error response or is dropped, and
every refusal is counted by reason in ``stats``.
"""

from __future__ import annotations

import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from dna_stun import attributes as attr
from dna_stun.auth import Credentials, Nonces, time_limited
from dna_stun.errors import StunProtocolError
from dna_stun.message import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    Class,
    Message,
    Method,
    check_integrity,
    encode,
    error_response,
    parse,
)
from dna_stun.policy import RelayPolicy

__all__ = [
    "AUTH_FAILURE_REASONS",
    "DIRECTIONS",
    "REFUSAL_REASONS",
    "REQUEST_KINDS",
    "Addr",
    "Allocation",
    "Datagram",
    "Limits",
    "RelayPorts",
    "Send",
    "Stats",
    "TransactionIds",
    "TurnCore",
]

Addr = tuple[str, int]
Datagram = tuple[bytes, Addr]  # what a socket's recvfrom returns (IPv4; IPv6 cut to two)
PERMISSION_LIFETIME = 300.0  # RFC 8656 section 9: fixed
CHANNEL_LIFETIME = 600.0  # RFC 8656 section 12: fixed
CHANNEL_HEADER = struct.Struct("!HH")
# An answer to a request that proved no key (a 401 challenge, a 400 or 420) goes to an address
# nobody showed is the sender's: at most this many times the request's bytes, so the relay is
# no amplifier of reflected floods (docs/crypto.md, "Denial of service"). A Binding answer is
# under it by construction (40 or 52 bytes to at least 20).
MAX_UNPROVEN_GROWTH = 3
# The most a Data indication carries: its STUN length (16 bits) holds the DATA attribute and
# an IPv6 XOR-PEER-ADDRESS (4 + 65,504 + 4 + 20 = 65,532). A peer's IPv6 datagram may hold
# 65,527 bytes; no client could receive one that large in a Data indication anyway (over
# IPv4 a datagram is at most 65,507 bytes, over IPv6 65,527), so it is dropped, counted.
MAX_DATA_PAYLOAD = 65_504

KNOWN_ATTRIBUTES = frozenset(
    {
        attr.USERNAME, attr.MESSAGE_INTEGRITY, attr.MESSAGE_INTEGRITY_SHA256, attr.REALM,
        attr.NONCE, attr.USERHASH, attr.PASSWORD_ALGORITHM, attr.LIFETIME,
        attr.REQUESTED_TRANSPORT, attr.REQUESTED_ADDRESS_FAMILY, attr.EVEN_PORT,
        attr.RESERVATION_TOKEN, attr.XOR_PEER_ADDRESS, attr.CHANNEL_NUMBER, attr.DATA,
        attr.PRIORITY, attr.USE_CANDIDATE, attr.ADDITIONAL_ADDRESS_FAMILY,
    }
)  # fmt: skip
# The reason phrase of a 401 whose credentials can never work, so that the client's developer
# or operator sees why a retry is pointless (RFC 8489 section 14.8: the phrase is free text).
AUTH_FAILURE_PHRASES = {
    "expired_credential": "Credential Expired",
    "lifetime_too_long": "Credential Lifetime Too Long",
}
TURN_METHODS = {
    Method.ALLOCATE: "allocate",
    Method.REFRESH: "refresh",
    Method.CREATE_PERMISSION: "create_permission",
    Method.CHANNEL_BIND: "channel_bind",
}


# Every label value the counters in ``Stats`` take, so that the service exports each series
# from the start at 0: a series that appears only at its first event hides that event from
# Prometheus's rate() and leaves dashboards and alerts without data until then.
DIRECTIONS = ("client_to_peer", "peer_to_client")
REQUEST_KINDS = ("binding", "binding_indication", *TURN_METHODS.values())
AUTH_FAILURE_REASONS = (
    "unknown_user", "expired_credential", "lifetime_too_long", "bad_integrity", "wrong_realm",
    "missing_attribute", "password_algorithm",
)  # fmt: skip
REFUSAL_REASONS = (
    "malformed", "bad_fingerprint", "unauthenticated", "auth_failed", "stale_nonce",
    "bad_request", "unknown_attribute", "unknown_method", "forbidden_peer", "no_allocation",
    "allocation_exists", "wrong_credentials", "no_permission", "unknown_channel",
    "channel_in_use", "bad_channel", "transport", "family", "reservation", "quota_user",
    "quota_total", "quota_permissions", "quota_channels", "amplification", "no_relay_port",
    "bandwidth", "too_large", "unexpected_message", "internal_error",
)  # fmt: skip


class TransactionIds:
    """Cryptographically random transaction IDs (RFC 8489 section 6), cut from ``os.urandom``
    drawn 4 KiB at a time: one system call per 341 IDs rather than one per relayed Data
    indication, where it cost more than the rest of the indication."""

    def __init__(self, pool_bytes: int = 4092) -> None:
        self._size = pool_bytes - pool_bytes % 12
        self._pool, self._at = b"", 0

    def next(self) -> bytes:
        if self._at >= len(self._pool):
            self._pool, self._at = os.urandom(self._size), 0
        self._at += 12
        return self._pool[self._at - 12 : self._at]


_data_ids = TransactionIds()


def data_indication(peer: Addr, payload: bytes) -> bytes:
    """A Data indication carrying ``payload`` from ``peer`` (without FINGERPRINT, which
    RFC 8656 does not require of TURN over UDP: one CRC less per relayed datagram)."""
    tid = _data_ids.next()
    return encode(
        Method.DATA, Class.INDICATION, tid,
        [(attr.XOR_PEER_ADDRESS, attr.encode_xor_address(peer, tid)), (attr.DATA, payload)],
        fingerprint=False,
    )  # fmt: skip


def quota_key(username: str) -> str:
    """Whose quota an allocation counts against: a time-limited username
    ("<expiry>:<name>") counts against its name, so fresh credentials do not buy more."""
    parsed = time_limited(username)
    return username if parsed is None else parsed[1]


class Send(NamedTuple):
    via: Addr | None  # None: the listening socket; else the relay socket of this address
    data: bytes
    to: Addr


class RelayPorts(Protocol):
    def open(self, even: bool, family: int) -> Addr | None:
        """A new relay socket's address of ``family`` (`attr.FAMILY_IPV4` or ``_IPV6``; an
        even port if asked), or None if none is free."""

    def close(self, relay: Addr) -> None: ...


@dataclass(frozen=True)
class Limits:
    default_lifetime: int = 600
    max_lifetime: int = 3600
    max_allocations: int = 1000
    max_allocations_per_user: int = 10
    max_permissions: int = 64  # peer IPs per allocation
    max_channels: int = 64  # channel bindings per allocation (RFC 8656 allows 4096)
    bandwidth_bytes_per_s: int = 0  # per allocation, both directions; 0: no cap


@dataclass
class Stats:
    """What the service exports as metrics; plain numbers, cheap to bump per packet."""

    refusals: Counter[str] = field(default_factory=Counter)
    auth_failures: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    relayed_packets: Counter[str] = field(default_factory=Counter)  # by direction
    relayed_bytes: Counter[str] = field(default_factory=Counter)
    allocations_created: int = 0


@dataclass(eq=False)
class Allocation:
    client: Addr
    relay: Addr
    username: str
    key: bytes
    expires: float
    allocate_tid: bytes
    allocate_response: bytes
    permissions: dict[str, float] = field(default_factory=dict)  # peer IP -> expiry
    channels: dict[int, tuple[Addr, float]] = field(default_factory=dict)
    peer_channels: dict[Addr, int] = field(default_factory=dict)
    tokens: float = 0.0
    tokens_at: float = 0.0


class _RefusedError(Exception):
    """An error response to send (already encoded; None: none is sent) and the reason to
    count."""

    def __init__(self, reason: str, response: bytes | None) -> None:
        self.reason, self.response = reason, response


@dataclass
class _Auth:
    username: str
    key: bytes
    sha256: bool


class TurnCore:
    def __init__(
        self,
        *,
        credentials: Credentials,
        nonces: Nonces,
        policy: RelayPolicy,
        ports: RelayPorts,
        limits: Limits = Limits(),
        relay_families: frozenset[int] = frozenset({attr.FAMILY_IPV4}),
        unix_time: Callable[[], float] = time.time,
    ) -> None:
        self.credentials, self.nonces, self.policy = credentials, nonces, policy
        self.unix_time = unix_time
        self.ports, self.limits, self.relay_families = ports, limits, relay_families
        self.stats = Stats()
        self.by_client: dict[Addr, Allocation] = {}
        self.by_relay: dict[Addr, Allocation] = {}
        self.per_user: Counter[str] = Counter()
        self._requests: dict[int, Callable[[Message, Addr, _Auth, float], bytes]] = {
            Method.ALLOCATE: self._allocate,
            Method.REFRESH: self._refresh,
            Method.CREATE_PERMISSION: self._create_permission,
            Method.CHANNEL_BIND: self._channel_bind,
        }

    # --- datagrams in ------------------------------------------------------------------------

    def on_client_datagram(self, data: bytes, client: Addr, now: float) -> list[Send]:
        """A datagram on the listening port: STUN, or ChannelData from a client."""
        return self.on_client_datagrams([(data, client)], now)

    def on_client_datagrams(self, datagrams: Iterable[Datagram], now: float) -> list[Send]:
        """Datagrams on the listening port, in arrival order (what one wakeup read).

        ChannelData, the bulk of a relay's traffic, is relayed in this loop with its checks
        written out: per datagram no call, no ``Send.__new__`` (a Python-level constructor)
        and no counter update; the counters move once per batch. STUN messages take the
        general path (``_stun_datagram``)."""
        out: list[Send] = []
        append, extend, new = out.append, out.extend, tuple.__new__
        allocations, refusals = self.by_client, self.stats.refusals
        rate, within = self.limits.bandwidth_bytes_per_s, self._within_bandwidth
        packets = size = 0
        for data, client in datagrams:
            if len(data) < 4 or data[0] & 0xC0 != 0x40:
                extend(self._stun_datagram(data, client, now))
                continue
            alloc = allocations.get(client)
            if alloc is None or alloc.expires <= now:
                refusals["no_allocation"] += 1
                continue
            number, length = CHANNEL_HEADER.unpack_from(data)
            if 4 + length > len(data):
                refusals["malformed"] += 1
                continue
            bound = alloc.channels.get(number)
            if bound is None or bound[1] <= now:
                refusals["unknown_channel"] += 1
                continue
            peer = bound[0]
            if alloc.permissions.get(peer[0], 0.0) <= now:
                refusals["no_permission"] += 1
                continue
            if rate and not within(alloc, length, now):
                refusals["bandwidth"] += 1
                continue
            append(new(Send, (alloc.relay, data[4 : 4 + length], peer)))
            packets += 1
            size += length
        self._count("client_to_peer", packets, size)
        return out

    def on_peer_datagram(self, data: bytes, relay: Addr, peer: Addr, now: float) -> list[Send]:
        """A datagram a peer sent to an allocation's relay address."""
        return self.on_peer_datagrams(relay, [(data, peer)], now)

    def on_peer_datagrams(
        self, relay: Addr, datagrams: Sequence[Datagram], now: float
    ) -> list[Send]:
        """Datagrams peers sent to one relay address, in arrival order (what one wakeup read);
        written out like ``on_client_datagrams``, and the allocation is looked up once."""
        alloc = self.by_relay.get(relay)
        if alloc is None or alloc.expires <= now:
            return self._drop("no_allocation", len(datagrams))
        out: list[Send] = []
        append, new, refusals = out.append, tuple.__new__, self.stats.refusals
        rate, within = self.limits.bandwidth_bytes_per_s, self._within_bandwidth
        client, permissions = alloc.client, alloc.permissions
        channels, peer_channels = alloc.channels, alloc.peer_channels
        packets = size = 0
        for data, peer in datagrams:
            length = len(data)
            if permissions.get(peer[0], 0.0) <= now:
                refusals["no_permission"] += 1
                continue
            number = peer_channels.get(peer)
            if number is not None and channels[number][1] <= now:
                number = None  # expired, not swept yet
            if number is None and length > MAX_DATA_PAYLOAD:
                refusals["too_large"] += 1
                continue
            if rate and not within(alloc, length, now):
                refusals["bandwidth"] += 1
                continue
            if number is not None:
                relayed = CHANNEL_HEADER.pack(number, length) + data
            else:
                relayed = data_indication(peer, data)
            append(new(Send, (None, relayed, client)))
            packets += 1
            size += length
        self._count("peer_to_client", packets, size)
        return out

    def expire(self, now: float) -> None:
        """Drop expired allocations (closing their relay ports), permissions and channels."""
        self._delete_expired_allocations(now)
        for alloc in self.by_client.values():
            for ip in [ip for ip, until in alloc.permissions.items() if until <= now]:
                del alloc.permissions[ip]
            for number in [n for n, (_, until) in alloc.channels.items() if until <= now]:
                peer, _ = alloc.channels.pop(number)
                alloc.peer_channels.pop(peer, None)

    def close_all(self) -> None:
        for alloc in list(self.by_client.values()):
            self._delete(alloc)

    # --- relaying ----------------------------------------------------------------------------

    def _stun_datagram(self, data: bytes, client: Addr, now: float) -> list[Send]:
        try:
            message = parse(data)
        except StunProtocolError as exc:
            return self._drop(exc.reason)
        if message.cls == Class.REQUEST:
            answer = self._request(message, client, now)
            return [] if answer is None else [Send(None, answer, client)]
        if message.cls == Class.INDICATION and message.method == Method.SEND:
            return self._send_indication(message, client, now)
        if message.cls == Class.INDICATION and message.method == Method.BINDING:
            self.stats.requests["binding_indication"] += 1  # a NAT keepalive: no answer
            return []
        return self._drop("unexpected_message")  # responses, other indications: not for us

    def _send_indication(self, message: Message, client: Addr, now: float) -> list[Send]:
        alloc = self.by_client.get(client)
        if alloc is None or alloc.expires <= now:
            return self._drop("no_allocation")
        # RFC 8489 section 6.3.2: an indication with an unknown comprehension-required
        # attribute is discarded (DONT-FRAGMENT among them: this server does not support it).
        if message.unknown_required(KNOWN_ATTRIBUTES):
            return self._drop("unknown_attribute")
        peer_value, payload = message.get(attr.XOR_PEER_ADDRESS), message.get(attr.DATA)
        if peer_value is None or payload is None:
            return self._drop("bad_request")
        try:
            peer = attr.decode_xor_address(peer_value, message.transaction_id)
        except StunProtocolError:
            return self._drop("bad_request")
        refused = self._send_refusal(alloc, peer, len(payload), now)
        if refused is not None:
            return self._drop(refused)
        self._count("client_to_peer", 1, len(payload))
        return [Send(alloc.relay, payload, peer)]

    def _send_refusal(self, alloc: Allocation, peer: Addr, size: int, now: float) -> str | None:
        """Why a Send indication's payload may not go to ``peer``, or None."""
        if alloc.permissions.get(peer[0], 0.0) <= now:
            return "no_permission"
        # A permission is for an IP (RFC 8656 section 9), the policy also judges the port:
        # one for the server's own address (granted for another allocation's relay port) must
        # not carry datagrams to its listening port or any other service of its host.
        reason = self.policy.check(*peer)
        if reason is not None:
            return reason
        return None if self._within_bandwidth(alloc, size, now) else "bandwidth"

    def _within_bandwidth(self, alloc: Allocation, size: int, now: float) -> bool:
        rate = self.limits.bandwidth_bytes_per_s
        if not rate:
            return True
        # A token bucket holding one second of traffic: bursts up to the rate, then the rate.
        # Time that went backwards (a caller's clock stepped) refills nothing and takes nothing:
        # a negative refill would starve the allocation for as long as the step.
        elapsed = max(0.0, now - alloc.tokens_at)
        alloc.tokens = min(float(rate), alloc.tokens + elapsed * rate)
        alloc.tokens_at = max(now, alloc.tokens_at)
        if alloc.tokens < size:
            return False
        alloc.tokens -= size
        return True

    # --- requests ----------------------------------------------------------------------------

    def _request(self, message: Message, client: Addr, now: float) -> bytes | None:
        """The answer to a request, or None when none is sent (see ``_unproven_error``).

        Credentials are checked before the attributes are (RFC 8489 section 9: the mechanism
        runs right after the basic checks, section 6.3.1 then refuses unknown attributes;
        coturn does the same): a TURN request with an unknown comprehension-required attribute
        and no credentials is challenged (401), one that proved its key gets a 420 signed
        with that key, which a client checking integrity accepts."""
        if message.method == Method.BINDING:
            self.stats.requests["binding"] += 1
            return self._binding(message, client, now)
        handler = self._requests.get(message.method)
        if handler is None:
            self.stats.refusals["unknown_method"] += 1
            return self._unproven_error(message, 400, "Unknown Method")
        self.stats.requests[TURN_METHODS[message.method]] += 1
        auth: _Auth | None = None
        try:
            auth = self._authenticate(message, client, now)
            self._check_known_attributes(message, auth)
            return handler(message, client, auth, now)
        except _RefusedError as refused:
            self.stats.refusals[refused.reason] += 1
            return refused.response
        except StunProtocolError:  # an attribute that does not decode
            self.stats.refusals["bad_request"] += 1
            if auth is None:  # before the key was proved (PASSWORD-ALGORITHM, USERNAME)
                return self._unproven_error(message, 400, "Bad Request")
            # After it, signed like every other answer to the request (an unsigned one is
            # dropped by a client that checks integrity, RFC 8489 section 9.2.5).
            return self._refuse(message, auth, 400, "Bad Request", "bad_request").response

    def _unproven_error(
        self, message: Message, code: int, text: str, extra: Sequence[tuple[int, bytes]] = ()
    ) -> bytes | None:
        """An error answer to a request that proved no key, whose source may be anybody's: with
        FINGERPRINT if the request had one (as coturn does by default: a client that tells STUN
        from other protocols by FINGERPRINT sends it too), with its reason phrase if it is at
        most ``MAX_UNPROVEN_GROWTH`` times the request, else without (the phrase is for
        diagnostics only, RFC 8489 section 14.8), else none, counted as ``amplification``. A
        401 is 48 bytes and the padded realm, 56 with FINGERPRINT, 12 more with the phrase: the
        smallest request that must be challenged, a bare 20-byte Refresh, gets it with a realm
        of up to 16 bytes, the most the config accepts (``dna_stun.config.MAX_REALM_BYTES``)."""
        limit = MAX_UNPROVEN_GROWTH * len(message.raw)
        fingerprint = message.find(attr.FINGERPRINT) is not None
        for reason in (text, ""):
            answer = error_response(message, code, reason, extra, fingerprint=fingerprint)
            if len(answer) <= limit:
                return answer
        self.stats.refusals["amplification"] += 1
        return None

    def _binding(self, message: Message, client: Addr, now: float) -> bytes | None:
        """Binding: the client's reflexive address. Unauthenticated requests are answered as
        they are; one with credentials is checked and its answer signed with the same key."""
        mapped = [
            (attr.XOR_MAPPED_ADDRESS, attr.encode_xor_address(client, message.transaction_id))
        ]
        if message.find(attr.MESSAGE_INTEGRITY) is None and (
            message.find(attr.MESSAGE_INTEGRITY_SHA256) is None
        ):
            unknown = message.unknown_required(KNOWN_ATTRIBUTES)
            if unknown:
                self.stats.refusals["unknown_attribute"] += 1
                extra = [(attr.UNKNOWN_ATTRIBUTES, attr.unknown_attributes(unknown))]
                return self._unproven_error(message, 420, "Unknown Attribute", extra)
            return encode(Method.BINDING, Class.SUCCESS, message.transaction_id, mapped)
        try:
            auth = self._authenticate(message, client, now)
            self._check_known_attributes(message, auth)
        except _RefusedError as refused:
            self.stats.refusals[refused.reason] += 1
            return refused.response
        except StunProtocolError:
            self.stats.refusals["bad_request"] += 1
            return self._unproven_error(message, 400, "Bad Request")
        return encode(
            Method.BINDING, Class.SUCCESS, message.transaction_id, mapped,
            key=auth.key, sha256=auth.sha256,
        )  # fmt: skip

    def _challenge(
        self, message: Message, client: Addr, now: float, code: int, text: str
    ) -> bytes | None:
        nonce = self.nonces.issue(client[0], now).encode()
        extra = [(attr.REALM, self.credentials.realm.encode()), (attr.NONCE, nonce)]
        return self._unproven_error(message, code, text, extra)

    def _authenticate(self, message: Message, client: Addr, now: float) -> _Auth:
        """The long-term credential mechanism (RFC 8489 section 9.2.4), or ``_RefusedError``."""
        integrity = message.find(attr.MESSAGE_INTEGRITY_SHA256) or message.find(
            attr.MESSAGE_INTEGRITY
        )
        if integrity is None:
            raise _RefusedError(
                "unauthenticated", self._challenge(message, client, now, 401, "Unauthorized")
            )
        realm, nonce = message.get(attr.REALM), message.get(attr.NONCE)
        username = self._username(message)
        if realm is None or nonce is None or username is None:
            self.stats.auth_failures["missing_attribute"] += 1
            raise _RefusedError("bad_request", self._unproven_error(message, 400, "Bad Request"))
        if realm.decode(errors="replace") != self.credentials.realm:
            self.stats.auth_failures["wrong_realm"] += 1
            raise _RefusedError(
                "auth_failed", self._challenge(message, client, now, 401, "Unauthorized")
            )
        if not self.nonces.check(nonce.decode(errors="replace"), client[0], now):
            raise _RefusedError(
                "stale_nonce", self._challenge(message, client, now, 438, "Stale Nonce")
            )
        algorithm = message.get(attr.PASSWORD_ALGORITHM)
        if algorithm is not None and attr.decode_password_algorithm(algorithm) != attr.PASSWORD_MD5:
            self.stats.auth_failures["password_algorithm"] += 1
            raise _RefusedError("bad_request", self._unproven_error(message, 400, "Bad Request"))
        keys, why = self.credentials.keys_for(username, self.unix_time())
        for key in keys:
            if check_integrity(message, key):
                sha256 = integrity.type == attr.MESSAGE_INTEGRITY_SHA256
                return _Auth(username, key, sha256)
        self.stats.auth_failures[why or "bad_integrity"] += 1
        text = AUTH_FAILURE_PHRASES.get(why, "Unauthorized")
        raise _RefusedError("auth_failed", self._challenge(message, client, now, 401, text))

    def _username(self, message: Message) -> str | None:
        raw = message.get(attr.USERNAME)
        if raw is not None:
            return attr.decode_text(raw, attr.MAX_USERNAME_BYTES)
        hashed = message.get(attr.USERHASH)
        if hashed is not None:
            return self.credentials.user_for_hash(attr.decode_userhash(hashed)) or ""
        return None

    def _signed(self, message: Message, auth: _Auth, attributes: list[tuple[int, bytes]]) -> bytes:
        return encode(
            message.method, Class.SUCCESS, message.transaction_id, attributes,
            key=auth.key, sha256=auth.sha256,
        )  # fmt: skip

    def _refuse(
        self, message: Message, auth: _Auth, code: int, text: str, reason: str,
        extra: Sequence[tuple[int, bytes]] = (),
    ) -> _RefusedError:  # fmt: skip
        response = encode(
            message.method, Class.ERROR, message.transaction_id,
            [(attr.ERROR_CODE, attr.error_code(code, text)), *extra],
            key=auth.key, sha256=auth.sha256,
        )  # fmt: skip
        return _RefusedError(reason, response)

    def _check_known_attributes(self, message: Message, auth: _Auth) -> None:
        """420 with UNKNOWN-ATTRIBUTES, signed, for a comprehension-required attribute this
        server does not understand (RFC 8489 section 6.3.1)."""
        unknown = message.unknown_required(KNOWN_ATTRIBUTES)
        if unknown:
            extra = [(attr.UNKNOWN_ATTRIBUTES, attr.unknown_attributes(unknown))]
            raise self._refuse(message, auth, 420, "Unknown Attribute", "unknown_attribute", extra)

    def _owned(self, message: Message, client: Addr, auth: _Auth, now: float) -> Allocation:
        """The client's live allocation, made under the same username (RFC 8656 section 5)."""
        alloc = self.by_client.get(client)
        if alloc is None or alloc.expires <= now:
            raise self._refuse(message, auth, 437, "Allocation Mismatch", "no_allocation")
        if alloc.username != auth.username:
            raise self._refuse(message, auth, 441, "Wrong Credentials", "wrong_credentials")
        return alloc

    # --- TURN methods ------------------------------------------------------------------------

    def _allocate(self, message: Message, client: Addr, auth: _Auth, now: float) -> bytes:
        existing = self.by_client.get(client)
        if existing is not None and existing.expires > now:
            if existing.allocate_tid == message.transaction_id:  # a retransmission
                return existing.allocate_response
            raise self._refuse(message, auth, 437, "Allocation Mismatch", "allocation_exists")
        if existing is not None:  # expired, not swept yet: gone before its 5-tuple is reused
            self._delete(existing)
        even = self._check_allocate_attributes(message, auth)
        family, refused_family = self._relay_family(message, auth)
        if self._over_quota(auth.username):
            # Allocations that expired since the last sweep count no longer (they are gone,
            # RFC 8656 section 3.1): dropped now rather than refusing until the sweep.
            self._delete_expired_allocations(now)
        if self.per_user[quota_key(auth.username)] >= self.limits.max_allocations_per_user:
            raise self._refuse(message, auth, 486, "Allocation Quota Reached", "quota_user")
        if len(self.by_client) >= self.limits.max_allocations:
            raise self._refuse(message, auth, 508, "Insufficient Capacity", "quota_total")
        relay = self.ports.open(even, family)
        if relay is None:
            raise self._refuse(message, auth, 508, "Insufficient Capacity", "no_relay_port")
        lifetime = self._lifetime(message)
        parts = [
            (attr.XOR_RELAYED_ADDRESS, attr.encode_xor_address(relay, message.transaction_id)),
            (attr.LIFETIME, attr.uint32(lifetime)),
            (attr.XOR_MAPPED_ADDRESS, attr.encode_xor_address(client, message.transaction_id)),
        ]
        if refused_family is not None:  # RFC 8656 section 7.2: the half of a dual request
            parts.append((attr.ADDRESS_ERROR_CODE, attr.address_error_code(
                refused_family, 440, "Address Family not Supported")))  # fmt: skip
        response = self._signed(message, auth, parts)
        alloc = Allocation(
            client, relay, auth.username, auth.key, now + lifetime, message.transaction_id,
            response, tokens=float(self.limits.bandwidth_bytes_per_s), tokens_at=now,
        )  # fmt: skip
        self.by_client[client], self.by_relay[relay] = alloc, alloc
        self.per_user[quota_key(auth.username)] += 1
        self.stats.allocations_created += 1
        return response

    def _check_allocate_attributes(self, message: Message, auth: _Auth) -> bool:
        """Refuses what this server cannot give; returns whether an even port was asked."""
        transport = message.get(attr.REQUESTED_TRANSPORT)
        if transport is None:
            raise self._refuse(message, auth, 400, "Bad Request", "bad_request")
        if attr.decode_requested_transport(transport) != attr.UDP:
            raise self._refuse(message, auth, 442, "Unsupported Transport Protocol", "transport")
        even_port, token = message.get(attr.EVEN_PORT), message.get(attr.RESERVATION_TOKEN)
        if even_port is not None and token is not None:
            raise self._refuse(message, auth, 400, "Bad Request", "bad_request")
        if token is not None:  # this server never hands out reservations, so none is valid
            attr.decode_reservation_token(token)
            raise self._refuse(message, auth, 508, "Insufficient Capacity", "reservation")
        if even_port is not None and attr.decode_even_port(even_port):
            raise self._refuse(message, auth, 508, "Insufficient Capacity", "reservation")
        return even_port is not None

    def _relay_family(self, message: Message, auth: _Auth) -> tuple[int, int | None]:
        """The family of the relayed address to allocate (RFC 8656 section 7.2, steps 6, 7
        and 9), and the family of a dual allocation's second half, refused: this server
        gives one relayed address per allocation, IPv4 unless REQUESTED-ADDRESS-FAMILY asks
        for IPv6."""
        requested = message.get(attr.REQUESTED_ADDRESS_FAMILY)
        additional = message.get(attr.ADDITIONAL_ADDRESS_FAMILY)
        if requested is not None and additional is not None:
            raise self._refuse(message, auth, 400, "Bad Request", "bad_request")
        family = attr.FAMILY_IPV4 if requested is None else attr.decode_family(requested)
        if family not in self.relay_families:  # absent means IPv4 (step 7)
            raise self._refuse(message, auth, 440, "Address Family not Supported", "family")
        if additional is None:
            return family, None
        if attr.decode_family(additional) != attr.FAMILY_IPV6:
            raise self._refuse(message, auth, 400, "Bad Request", "bad_request")  # step 9
        return family, attr.FAMILY_IPV6

    def _lifetime(self, message: Message) -> int:
        """RFC 8656 section 7.2: the requested lifetime, at least the default, at most the max."""
        raw = message.get(attr.LIFETIME)
        asked = self.limits.default_lifetime if raw is None else attr.decode_uint32(raw)
        return max(self.limits.default_lifetime, min(asked, self.limits.max_lifetime))

    def _refresh(self, message: Message, client: Addr, auth: _Auth, now: float) -> bytes:
        alloc = self._owned(message, client, auth, now)
        # RFC 8656 section 7.3 (coturn too): a family other than the allocation's is 443,
        # and nothing changes, not even a deletion asked for with LIFETIME 0.
        requested = message.get(attr.REQUESTED_ADDRESS_FAMILY)
        if requested is not None:
            ipv6 = ":" in alloc.relay[0]
            own = attr.FAMILY_IPV6 if ipv6 else attr.FAMILY_IPV4
            if attr.decode_family(requested) != own:
                raise self._refuse(message, auth, 443, "Peer Address Family Mismatch", "family")
        raw = message.get(attr.LIFETIME)
        if raw is not None and attr.decode_uint32(raw) == 0:
            self._delete(alloc)
            return self._signed(message, auth, [(attr.LIFETIME, attr.uint32(0))])
        lifetime = self._lifetime(message)
        alloc.expires = now + lifetime
        return self._signed(message, auth, [(attr.LIFETIME, attr.uint32(lifetime))])

    def _peer(self, message: Message, auth: _Auth, alloc: Allocation, value: bytes) -> Addr:
        peer = attr.decode_xor_address(value, message.transaction_id)
        if (":" in peer[0]) != (":" in alloc.relay[0]):  # RFC 8656 section 9.1 (and 11.1)
            raise self._refuse(message, auth, 443, "Peer Address Family Mismatch", "family")
        reason = self.policy.check(*peer)
        if reason is not None:
            raise self._refuse(message, auth, 403, "Forbidden", reason)
        return peer

    def _create_permission(self, message: Message, client: Addr, auth: _Auth, now: float) -> bytes:
        alloc = self._owned(message, client, auth, now)
        values = message.get_all(attr.XOR_PEER_ADDRESS)
        if not values:
            raise self._refuse(message, auth, 400, "Bad Request", "bad_request")
        if len(values) > self.limits.max_permissions:  # before decoding and judging each
            raise self._refuse(message, auth, 508, "Insufficient Capacity", "quota_permissions")
        # All or nothing (RFC 8656 section 9.2): every peer is checked before any is installed.
        peers = [self._peer(message, auth, alloc, value) for value in values]
        self._permit(message, auth, alloc, [ip for ip, _ in peers], now)
        return self._signed(message, auth, [])

    def _permit(
        self, message: Message, auth: _Auth, alloc: Allocation, ips: list[str], now: float
    ) -> None:
        new = {ip for ip in ips if alloc.permissions.get(ip, 0.0) <= now}
        live = sum(1 for until in alloc.permissions.values() if until > now)
        if live + len(new) > self.limits.max_permissions:
            raise self._refuse(message, auth, 508, "Insufficient Capacity", "quota_permissions")
        for ip in ips:
            alloc.permissions[ip] = now + PERMISSION_LIFETIME

    def _channel_bind(self, message: Message, client: Addr, auth: _Auth, now: float) -> bytes:
        alloc = self._owned(message, client, auth, now)
        number_raw, peer_raw = message.get(attr.CHANNEL_NUMBER), message.get(attr.XOR_PEER_ADDRESS)
        if number_raw is None or peer_raw is None:
            raise self._refuse(message, auth, 400, "Bad Request", "bad_request")
        number = attr.decode_channel_number(number_raw)
        if not CHANNEL_MIN <= number <= CHANNEL_MAX:
            raise self._refuse(message, auth, 400, "Bad Request", "bad_channel")
        peer = self._peer(message, auth, alloc, peer_raw)
        self._unbind_expired(alloc, number, peer, now)
        bound = alloc.channels.get(number)
        other = alloc.peer_channels.get(peer)
        if (bound is not None and bound[0] != peer) or (other is not None and other != number):
            raise self._refuse(message, auth, 400, "Bad Request", "channel_in_use")
        if bound is None or bound[1] <= now:  # a new binding, not the refresh of a live one
            live = sum(1 for _, until in alloc.channels.values() if until > now)
            if live >= self.limits.max_channels:  # RFC 8656 section 11.2: a capacity limit
                raise self._refuse(message, auth, 508, "Insufficient Capacity", "quota_channels")
        self._permit(message, auth, alloc, [peer[0]], now)
        alloc.channels[number] = (peer, now + CHANNEL_LIFETIME)
        alloc.peer_channels[peer] = number
        return self._signed(message, auth, [])

    @staticmethod
    def _unbind_expired(alloc: Allocation, number: int, peer: Addr, now: float) -> None:
        """Forget an expired binding of ``number`` or of ``peer`` that the sweep has not
        reached yet: RFC 8656 section 12 lets either be bound anew once it has expired, and
        before, the leftover answered "channel in use" until the next sweep."""
        for stale in (number, alloc.peer_channels.get(peer)):
            bound = None if stale is None else alloc.channels.get(stale)
            if stale is not None and bound is not None and bound[1] <= now:
                del alloc.channels[stale]
                if alloc.peer_channels.get(bound[0]) == stale:
                    del alloc.peer_channels[bound[0]]

    # --- bookkeeping -------------------------------------------------------------------------

    def _over_quota(self, username: str) -> bool:
        return (
            self.per_user[quota_key(username)] >= self.limits.max_allocations_per_user
            or len(self.by_client) >= self.limits.max_allocations
        )

    def _delete_expired_allocations(self, now: float) -> None:
        # By relay address: every allocation has its own, so none can hide from the sweep.
        for alloc in [a for a in self.by_relay.values() if a.expires <= now]:
            self._delete(alloc)

    def _delete(self, alloc: Allocation) -> None:
        if self.by_client.get(alloc.client) is alloc:
            del self.by_client[alloc.client]
        self.by_relay.pop(alloc.relay, None)
        key = quota_key(alloc.username)
        self.per_user[key] -= 1
        if self.per_user[key] <= 0:
            del self.per_user[key]
        self.ports.close(alloc.relay)

    def _drop(self, reason: str, count: int = 1) -> list[Send]:
        if count:
            self.stats.refusals[reason] += count
        return []

    def _count(self, direction: str, packets: int, size: int) -> None:
        if packets:
            self.stats.relayed_packets[direction] += packets
            self.stats.relayed_bytes[direction] += size
