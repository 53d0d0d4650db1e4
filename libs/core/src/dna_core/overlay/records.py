"""Record store policy for the signed records the overlay holds (sans-I/O).

What a node accepts, keeps and hands out for a key:

* the record verifies (`crypto.records.open_record`: signature, size cap,
  expiry) and is stored under the key its kind dictates, so nobody can squat
  another identity's keys: identity, presence and rotation records live at
  ``H(label(kind) || signer fingerprint)``, a name claim at
  ``H(label("name") || normalized name)`` and carries a valid proof of work;
* a lower sequence number than the one held is refused (no rollback); the same
  sequence with other bytes is refused (the first one stays); a record is held, for this,
  until the node's deletion clock (``expiry_ms``, its ExpiryClock) passes its expiry, not
  only until a wall clock stepped forward hides it from reads; a name claimed by
  an unexpired record of another identity is refused (first come, first served),
  unless the new claim carries the holder's signature moving the name to it (after
  the holder rotated its keys);
* a record the store no longer holds (expired and deleted, or evicted) is remembered by
  its signer and sequence number alone (`Gone`, at most ``max_gone`` keys; beyond that the
  oldest memory of the source holding the most is forgotten, `GoneMemory`, and counted in
  ``gone_evicted``) until the kind's longest lifetime after
  its creation has passed: an older version of its signer (a lower ``seq``, signed
  earlier, so expiring by then) is refused as against a held record. Before, once the
  held record was deleted, a replay of an older, still unexpired version was taken: a
  rollback;
* a key rotation must be cross-signed by the new key;
* identity, presence and rotation records carry a proof of work over the signer's
  fingerprint (``identity_pow_bits``): room in the overlay costs every fresh identity;
* presence records live at most an hour, rotations 30 days, identities and name claims
  7 days: their owners' devices sign them again well within that (`republish_due` only
  spreads the same bytes, it never extends a life);
* the store holds at most ``max_records`` records and ``max_bytes`` bytes. When a record
  does not fit, the oldest record of the source holding the most is evicted to make room
  (a source counted as the routing table counts contacts, `contact.source_groups`: an IPv4
  /24; an IPv6 /32 first, then the /48s within the newcomer's own /32), unless that is the
  newcomer's own source or one holding no more than it:
  then the newcomer is refused. So a flood from one place only ever displaces its own
  records, and a newcomer holding two fewer records than the biggest holder gets in
  (when bytes bind, a big record may need several evictions and is refused once the
  shares would even out);
* expired records disappear (`expire`) and held records are handed back for
  republishing on a timer (`republish_due`), longest waiting first and at most twice
  their even share of one tick, so a store that got everything at once (a restart
  loading its file) republishes over half an interval, not in one tick; a restart
  also spreads the first republish of what it loaded over an interval
  (`spread_republish`), so the holders of a record, restarted together, do not all
  republish it at once (the first one's store restarts the others' clocks, `repeat`,
  but only so far: `RepublishClock`, so that ground IDs near a key cannot stop them).

Readers apply the same per-record rules (`check_policy`) to every answer before
`select_best` picks one: otherwise a single dishonest node could answer with a
record no honest node would hold (a name claim without its proof of work, a
rotation without its cross-signature) and a higher sequence number, and win. Between
two identities' claims of a name a sequence number decides nothing (each signer picks
its own): `judge_answers` goes by the holders instead.
"""

from __future__ import annotations

import heapq
import math
import random
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dna_core.crypto import pow, signature
from dna_core.crypto import primitives as p
from dna_core.crypto.keys import PublicKeySet
from dna_core.crypto.records import VerifiedRecord, open_record
from dna_core.errors import (
    CapacityError,
    ConflictError,
    DnaError,
    MalformedError,
    VerificationError,
)
from dna_core.overlay.contact import source_groups
from dna_core.wire import decode_message
from dna_core.wire.gen.dna.v1 import common_pb2, records_pb2

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
MAX_TTL_MS = 7 * DAY_MS  # identities and name claims; their devices republish every 6 h
MAX_ROTATION_TTL_MS = 30 * DAY_MS  # contacts offline for weeks still find the rotation
MAX_PRESENCE_TTL_MS = HOUR_MS
NAME_MIN, NAME_MAX = 3, 32
DEFAULT_NAME_POW_BITS = 16  # a name claim's proof of work (overlay.name_pow_bits)
DEFAULT_IDENTITY_POW_BITS = 16  # identity, presence, rotation (records.identity_pow_bits)
DEFAULT_MAX_RECORDS = 20_000
DEFAULT_MAX_BYTES = 64 << 20
REPUBLISH_PACE = 2  # a tick hands back at most this many times its even share
MAX_SILENCE = 12  # intervals a held record goes at most without our own republish
REPUBLISH_JITTER = 0.1  # a republish comes up to this share of an interval early
MAX_EVICTIONS = 8  # per put: a 16 KiB record displaces at most a few ~5 KiB ones
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")
_KIND_LABEL: dict[int, str] = {
    common_pb2.RECORD_KIND_IDENTITY: "identity",
    common_pb2.RECORD_KIND_PRESENCE: "presence",
    common_pb2.RECORD_KIND_KEY_ROTATION: "rotation",
}


def record_key(kind: int, fingerprint: bytes) -> bytes:
    """The overlay key of an identity-bound record (identity, presence, rotation)."""
    return p.sha256(p.label(_KIND_LABEL[kind]), fingerprint)


def normalize_name(name: str) -> str:
    """NFKC + casefold; 3-32 of a-z 0-9 . _ - (so look-alike names collide on purpose)."""
    norm = unicodedata.normalize("NFKC", name).casefold()
    if not NAME_MIN <= len(norm) <= NAME_MAX or not set(norm) <= _NAME_CHARS:
        raise MalformedError(f"name must be {NAME_MIN}-{NAME_MAX} of a-z 0-9 . _ -")
    return norm


def name_key(name: str) -> bytes:
    return p.sha256(p.label("name"), normalize_name(name).encode())


def name_pow_hash(name: str, fingerprint: bytes) -> bytes:
    return p.sha256(p.label("name-pow"), normalize_name(name).encode(), fingerprint)


def identity_pow_hash(fingerprint: bytes) -> bytes:
    return p.sha256(p.label("identity-pow"), fingerprint)


def identity_proof(
    fingerprint: bytes, *, pow_bits: int = DEFAULT_IDENTITY_POW_BITS, now_ms: int
) -> common_pb2.ProofOfWork:
    """The proof of work identity, presence and rotation records of ``fingerprint`` carry."""
    proof, _ = pow.solve(identity_pow_hash(fingerprint), pow_bits, now_ms=now_ms)
    return proof.to_proto()


def identity_payload(
    fingerprint: bytes, display_name: str, *, pow_bits: int = DEFAULT_IDENTITY_POW_BITS,
    now_ms: int,
) -> bytes:  # fmt: skip
    """An `IdentityRecord` payload with its proof of work (solving it takes ~2^pow_bits
    hashes: about 0.3 s at the default 16 bits)."""
    proof = identity_proof(fingerprint, pow_bits=pow_bits, now_ms=now_ms)
    return records_pb2.IdentityRecord(display_name=display_name, pow=proof).SerializeToString()


ROTATION_ACCEPT_DOMAIN = b"rotation-accept"  # the new key's cross-signature


def rotation_accept_message(old_fp: bytes, new_fp: bytes) -> bytes:
    return old_fp + new_fp


NAME_MOVE_DOMAIN = b"name-move"  # a name's holder hands it to its new keys
MAX_CLAIM_BYTES = 8192  # a claim with a move signature (3.4 KB) fits


def name_move_message(name: str, new_fp: bytes) -> bytes:
    return new_fp + name.encode()  # the fingerprint has a fixed length: unambiguous


DEFAULT_MAX_GONE = 20_000  # records remembered after deletion (IDs and numbers only)


@dataclass(frozen=True, slots=True)
class Gone:
    """What the store remembers of a record under a key it no longer holds: enough to
    refuse an older version of the same signer (a rollback), not the record itself.

    ``until_ms`` is the record's creation plus its kind's longest lifetime. An owner signs
    its versions in order (``seq`` is their creation time, `dna_peer.keyserver`), so a
    version with a lower ``seq`` was created no later than this one and has expired by
    ``until_ms``: after that no replay can roll the key back, and nothing need be kept. The
    record's own expiry would not do: a version signed an hour earlier with a longer life
    outlives it. ``source`` is the address the record was stored from: its memory counts
    in that source's share (`GoneMemory`)."""

    signer: bytes
    seq: int
    until_ms: int
    source: str = ""

    @classmethod
    def of(cls, rec: VerifiedRecord, source: str = "") -> Gone:
        body = rec.body
        until = body.created_ms + _MAX_LIFETIME[body.kind]
        return cls(body.signer_fingerprint, body.seq, until, source)

    def refuses(self, rec: VerifiedRecord, now_ms: int) -> bool:
        """Whether ``rec`` is an older version of this one's signer, judged at ``now_ms``."""
        body = rec.body
        return (
            self.until_ms > now_ms
            and body.signer_fingerprint == self.signer
            and body.seq < self.seq
        )


class _Tally:
    """How many each group holds, and one of the fullest, both in O(1) (counts move by one:
    an LFU's buckets)."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self._with: dict[int, dict[str, None]] = {}  # count -> the groups holding that many
        self._top = 0

    def add(self, group: str) -> None:
        n = self.count.get(group, 0)
        self._move(group, n, n + 1)
        self._top = max(self._top, n + 1)

    def remove(self, group: str) -> None:
        n = self.count[group]
        self._move(group, n, n - 1)
        while self._top and not self._with.get(self._top):
            self._top -= 1

    def fullest(self) -> str:
        return next(iter(self._with[self._top]))

    def _move(self, group: str, old: int, new: int) -> None:
        if old:
            groups = self._with[old]
            del groups[group]
            if not groups:
                del self._with[old]
        if new:
            self._with.setdefault(new, {})[group] = None
            self.count[group] = new
        else:
            del self.count[group]


class GoneMemory:
    """The store's memories of deleted records (`Gone`), at most ``most``. When one more
    comes, the oldest memory of the source holding the most goes: the fullest block, then
    its fullest subnet (`contact.source_groups`, as the store's records and the routing
    table count: an IPv4 /24; an IPv6 /32, then its /48s). A flood of short-lived records
    from one place, left to expire, then forgets only its own memories, not those of
    records stored from elsewhere. Oldest first by source, not overall: signing keys cost
    nothing and the per-source store rate is per address (or IPv6 /64), so only the
    source's subnet is scarce. Keys forgotten for room are kept for the record file
    (`take_forgotten`), which deletes their rows."""

    def __init__(self, most: int, groups: Callable[[str], tuple[str, str]]) -> None:
        self.most, self.groups = most, groups
        self._gone: dict[bytes, Gone] = {}  # key -> its memory, oldest remembered first
        self._blocks = _Tally()
        self._subnets: dict[str, _Tally] = {}  # block -> its subnets' counts
        self._by_subnet: dict[str, dict[bytes, None]] = {}  # subnet -> its keys, oldest first
        self._forgotten: dict[bytes, None] = {}  # dropped for room, not yet taken
        self.evicted = 0  # keys forgotten early for room

    def __len__(self) -> int:
        return len(self._gone)

    def get(self, key: bytes) -> Gone | None:
        return self._gone.get(key)

    def items(self) -> Iterable[tuple[bytes, Gone]]:
        return self._gone.items()

    def add(self, key: bytes, gone: Gone) -> None:
        self.drop(key)
        self._forgotten.pop(key, None)
        self._gone[key] = gone
        block, subnet = self.groups(gone.source)
        self._blocks.add(block)
        self._subnets.setdefault(block, _Tally()).add(subnet)
        self._by_subnet.setdefault(subnet, {})[key] = None
        while len(self._gone) > self.most:
            self._evict()

    def drop(self, key: bytes) -> None:
        gone = self._gone.pop(key, None)
        if gone is None:
            return
        block, subnet = self.groups(gone.source)
        keys = self._by_subnet[subnet]
        del keys[key]
        if not keys:
            del self._by_subnet[subnet]
        self._blocks.remove(block)
        subnets = self._subnets[block]
        subnets.remove(subnet)
        if not subnets.count:
            del self._subnets[block]

    def lapse(self, now_ms: int) -> None:
        """Forget what every older version must have expired by ``now_ms`` (`Gone`)."""
        for key in [k for k, g in self._gone.items() if g.until_ms <= now_ms]:
            self.drop(key)

    def take_forgotten(self) -> list[bytes]:
        """The keys forgotten for room since the last call."""
        keys, self._forgotten = list(self._forgotten), {}
        return keys

    def _evict(self) -> None:
        subnet = self._subnets[self._blocks.fullest()].fullest()
        key = next(iter(self._by_subnet[subnet]))
        self.drop(key)
        self._forgotten[key] = None
        self.evicted += 1


@dataclass(frozen=True, slots=True)
class StoreResult:
    seq: int
    changed: bool  # False when the same record was already held
    evicted: tuple[bytes, ...] = ()  # keys dropped to make room (the adapter counts them)
    record: VerifiedRecord | None = field(default=None, compare=False)  # held now, if changed


@dataclass(slots=True)
class RepublishClock:
    """When this node republishes a record it holds: Kademlia §2.5, bounded.

    A fellow holder's copy restarts the clock (`postpone`): the record was just stored on
    the key's closest, so ours can wait an interval, and a record is republished by about
    one holder an interval. But IDs ground near a key are fellow holders too, and the
    spread gives their /24 the bytes; one sending them every interval stopped every honest
    republish, so newcomers near the key never got the record (docs/overlay.md,
    durability). Three rules bound that and keep the honest case at about one:

    * a copy from the subnet whose copy restarted the clock last does not restart it:
      one subnet cannot postpone us twice in a row;
    * we republish at least every ``MAX_SILENCE`` intervals whatever copies come (times
      ``1 - hurry/2``, drawn at each of our republishes: holders that got the record
      from one put do not all fall due together);
    * the holder silent longest goes first: the clock is due an interval after its
      restart less up to ``REPUBLISH_JITTER`` of one, the more the longer our own
      silence (``lag`` breaks ties). So the holders take turns, each from another
      subnet than the last, and each turn comes round well within ``MAX_SILENCE``.
    """

    since_ms: float  # the last restart: our republish or a fellow holder's copy
    own_ms: float  # our own last republish (or when we got the record)
    lag: float  # a tie-breaker in [0, 1), drawn at each restart
    hurry: float  # in [0, 1), drawn at each of our republishes
    postponer: str = ""  # the subnet whose copy restarted the clock last

    @classmethod
    def start(cls, now_ms: float, rng: random.Random) -> RepublishClock:
        """The clock of a record we just got."""
        return cls(now_ms, now_ms, rng.random(), rng.random())

    def due(
        self, now_ms: float, interval_ms: int, *, max_silence: int = MAX_SILENCE,
        jitter: float = REPUBLISH_JITTER,
    ) -> bool:  # fmt: skip
        """Whether to republish now (the keywords are for dna-sim's comparisons)."""
        if now_ms - self.own_ms >= max_silence * (1 - self.hurry / 2) * interval_ms:
            return True
        silent = min(1.0, (self.since_ms - self.own_ms) / (max_silence * interval_ms))
        early = jitter * (0.9 * silent + 0.1 * self.lag)
        return now_ms - self.since_ms >= interval_ms * (1 - early)

    def postpone(self, now_ms: float, rng: random.Random, subnet: str) -> bool:
        """A fellow holder in ``subnet`` (`contact.source_groups`) stored the record on the
        key's closest: whether that restarts the clock (not from the last one's subnet;
        "" is no subnet, a local sender: always)."""
        if subnet and subnet == self.postponer:
            return False
        self.since_ms, self.lag, self.postponer = now_ms, rng.random(), subnet
        return True

    def republished(self, now_ms: float, rng: random.Random) -> None:
        self.since_ms, self.own_ms = now_ms, now_ms
        self.lag, self.hurry = rng.random(), rng.random()


@dataclass(slots=True)
class _Held:
    record: VerifiedRecord
    clock: RepublishClock
    source: str
    block: str  # the source's groups (`contact.source_groups`): what its share counts in
    subnet: str


class RecordStore:
    def __init__(
        self,
        *,
        name_pow_bits: int = DEFAULT_NAME_POW_BITS,
        identity_pow_bits: int = DEFAULT_IDENTITY_POW_BITS,
        max_records: int = DEFAULT_MAX_RECORDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        groups: Callable[[str], tuple[str, str]] = source_groups,
        rng: random.Random | None = None,
        max_gone: int = DEFAULT_MAX_GONE,
    ) -> None:
        self.name_pow_bits, self.identity_pow_bits = name_pow_bits, identity_pow_bits
        self.max_records, self.max_bytes = max_records, max_bytes
        self.groups = groups  # source -> (block, subnet) its records count in
        self.rng = rng or random.Random()  # the republish clocks' lags
        self._held: dict[bytes, _Held] = {}
        self._by_raw: dict[bytes, bytes] = {}  # raw record -> key: repeats cost no verifying
        self._by_subnet: dict[str, dict[bytes, None]] = {}  # subnet -> its keys, oldest first
        self._in_block: dict[str, dict[str, None]] = {}  # block -> its subnets holding any
        self._per_block: dict[str, int] = {}  # block -> records held
        self._bytes = 0
        self._gone = GoneMemory(max_gone, groups)  # what it remembers of deleted records

    def __len__(self) -> int:
        return len(self._held)

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def repeat(
        self, data: bytes, now_ms: int, by_holder: Callable[[bytes], bool] = lambda key: True,
        source: str = "",
    ) -> StoreResult | None:  # fmt: skip
        """The unchanged result if exactly these bytes are held and unexpired (a republish
        of what we have: a dictionary look-up, no signature to check, nothing to charge
        the sender), else None. It restarts the record's republish clock if
        ``by_holder(key)``: the sender (``source``, its address) is a fellow holder of the
        key; only so far, though (`RepublishClock.postpone`)."""
        key = self._by_raw.get(data)
        held = None if key is None else self._held.get(key)
        if held is None or held.record.body.expires_ms <= now_ms:
            return None
        if by_holder(held.record.body.key):
            # A fellow holder just stored it on the key's closest nodes, us among them:
            # our own republish can wait an interval (Kademlia §2.5), so each record is
            # republished by about one of its holders an interval instead of by every one.
            # Anyone else's copy says nothing of the others: it would stop ours for free.
            held.clock.postpone(now_ms, self.rng, self.groups(source)[1])
        return StoreResult(held.record.body.seq, changed=False)

    def put(
        self,
        data: bytes,
        now_ms: int,
        source: str = "",
        *,
        expiry_ms: int | None = None,
        held_before: bool = False,
    ) -> StoreResult:
        """Validate and store a SignedRecord sent by ``source`` (the sender's address, for
        fairness when full); raises a ProtocolError and changes nothing.

        ``expiry_ms`` (default ``now_ms``) is the time the node deletes expired records
        against (its `ExpiryClock`, never ahead of the wall clock ``now_ms``): a held record
        stands against replacement (sequence numbers, first come first served) until that
        time passes its expiry, as it stays held until then. A wall clock stepped forward
        hides it from reads meanwhile; judged by the wall clock here, any valid record
        replaced it then, an older one of its signer (a rollback) or another identity's
        claim of its name. The record put is judged unexpired at ``now_ms``, or at
        ``expiry_ms`` when it was ``held_before`` (reloaded from the node's file)."""
        result = self.judge(data, now_ms, source, expiry_ms=expiry_ms, held_before=held_before)
        self.commit(result, now_ms, source)
        return result

    def judge(
        self,
        data: bytes,
        now_ms: int,
        source: str = "",
        *,
        expiry_ms: int | None = None,
        held_before: bool = False,
    ) -> StoreResult:
        """`put` without the change: what it would do (the record to hold, the keys to
        evict), or a ProtocolError. The caller writes that down first (the record file) and
        then `commit`s it, so a failed write changes nothing held; nothing may change the
        store in between."""
        rec = open_record(data, now_ms=now_ms, expiry_ms=expiry_ms if held_before else None)
        check_policy(rec, name_pow_bits=self.name_pow_bits,
                     identity_pow_bits=self.identity_pow_bits)  # fmt: skip
        held = self._held.get(rec.body.key)
        expired_by = now_ms if expiry_ms is None else min(now_ms, expiry_ms)
        if held is not None and held.record.body.expires_ms > expired_by:
            if held.record.raw == rec.raw:
                return StoreResult(rec.body.seq, changed=False)
            _check_replaces(held.record, rec)
        else:
            self._check_not_rolled_back(rec, held, expired_by)
        victims = self._victims(rec, held, source)
        return StoreResult(rec.body.seq, changed=True, evicted=tuple(victims), record=rec)

    def commit(self, result: StoreResult, now_ms: int, source: str = "") -> None:
        """Apply what `judge` returned (nothing for a repeat)."""
        if result.record is None:
            return
        for key in result.evicted:
            self._forget(key)
        self._replace(result.record, now_ms, source)

    def _check_not_rolled_back(
        self, rec: VerifiedRecord, held: _Held | None, expired_by: int
    ) -> None:
        """An expired record (still held, or deleted and remembered) stands against an older
        version of its signer until that must have expired too (`Gone`): refused with the
        held record's reason."""
        memories = (None if held is None else Gone.of(held.record), self._gone.get(rec.body.key))
        for gone in memories:
            if gone is not None and gone.refuses(rec, expired_by):
                raise ConflictError(
                    f"record: sequence {rec.body.seq} is lower than held {gone.seq}"
                )

    def gone(self, key: bytes) -> Gone | None:
        """What is remembered of the record deleted under ``key``, if anything."""
        return self._gone.get(key)

    def goes(self, key: bytes) -> Gone:
        """What deleting the record held under ``key`` would remember (for the file)."""
        held = self._held[key]
        return Gone.of(held.record, held.source)

    def remember(self, key: bytes, gone: Gone) -> None:
        """Remember a deleted record (at deletion, or reloaded from the record file); with
        ``max_gone`` remembered, the oldest memory of the source holding the most goes
        (`GoneMemory`)."""
        self._gone.add(key, gone)

    @property
    def max_gone(self) -> int:
        return self._gone.most

    @property
    def gone_evicted(self) -> int:
        """Remembered keys forgotten early for room (``max_gone``)."""
        return self._gone.evicted

    @property
    def gone_count(self) -> int:
        """How many keys of deleted records are remembered (at most ``max_gone``)."""
        return len(self._gone)

    def gone_items(self) -> Iterable[tuple[bytes, Gone]]:
        """The remembered keys, oldest first (a live view)."""
        return self._gone.items()

    def take_forgotten(self) -> list[bytes]:
        """The remembered keys forgotten for room since the last call: the record file
        deletes their rows (`RecordFile.forget`), so a restart remembers what memory did."""
        return self._gone.take_forgotten()

    def get(self, key: bytes, now_ms: int) -> VerifiedRecord | None:
        held = self._held.get(key)
        if held is None or held.record.body.expires_ms <= now_ms:
            return None
        return held.record

    def keys(self) -> Iterable[bytes]:
        """The keys held (a live view: not to be iterated across a change)."""
        return self._held.keys()

    def source_of(self, key: bytes) -> str | None:
        held = self._held.get(key)
        return None if held is None else held.source

    def expire(self, now_ms: int) -> int:
        return len(self.expire_keys(now_ms))

    def expire_keys(self, now_ms: int) -> list[bytes]:
        """Drop every expired record; returns their keys."""
        gone = [k for k, h in self._held.items() if h.record.body.expires_ms <= now_ms]
        for key in gone:
            self._forget(key)
        self._gone.lapse(now_ms)
        return gone

    def _forget(self, key: bytes) -> None:
        """Delete the record held under ``key``, remembering its signer and sequence."""
        self.remember(key, self.goes(key))
        self._remove(key)

    def republish_due(
        self, now_ms: int, interval_ms: int, tick_ms: int = 60_000
    ) -> list[VerifiedRecord]:
        """Records not republished within ``interval_ms``, longest waiting first, at most
        ``REPUBLISH_PACE`` times the held records' share of one ``tick_ms`` (how often the
        caller asks); marks them as republished now. Each is a lookup and R stores: a
        node that loaded 20,000 records at start used to start all of them in one tick."""
        due = [
            held
            for held in self._held.values()
            if held.clock.due(now_ms, interval_ms) and held.record.body.expires_ms > now_ms
        ]
        most = math.ceil(REPUBLISH_PACE * len(self._held) * tick_ms / interval_ms)
        if len(due) > most:
            due = heapq.nsmallest(most, due, key=lambda held: held.clock.since_ms)
        for held in due:
            held.clock.republished(now_ms, self.rng)
        return [held.record for held in due]

    def spread_republish(self, now_ms: int, interval_ms: int, rng: random.Random) -> None:
        """Make each record's next republish due at a random time within ``interval_ms``
        from now (after loading at start: its holders, restarted together, would otherwise
        all republish it in the same tick, and none's store would spare the others')."""
        for held in self._held.values():
            held.clock.republished(now_ms - rng.random() * interval_ms, rng)

    def _victims(self, rec: VerifiedRecord, held: _Held | None, source: str) -> list[bytes]:
        """The keys to evict so that ``rec`` fits (module docstring), without changing
        anything; raises CapacityError when it may not displace anyone."""
        records = len(self._held) + (held is None)
        size = self._bytes - (len(held.record.raw) if held is not None else 0) + len(rec.raw)
        if len(rec.raw) > self.max_bytes:
            raise CapacityError("record store is full")
        if records <= self.max_records and size <= self.max_bytes:
            return []
        shares = _Shares(self, *self.groups(source))
        if held is not None:
            shares.take(held)  # replaced in place: no longer counted where it was
        victims: list[bytes] = []
        while records > self.max_records or size > self.max_bytes:
            subnet = shares.victim_subnet()
            if subnet is None:
                raise CapacityError("record store is full (this source holds its share)")
            if len(victims) >= MAX_EVICTIONS:
                raise CapacityError("record store is full")
            key = next(k for k in self._by_subnet[subnet] if k != rec.body.key and k not in victims)
            victims.append(key)
            shares.take(self._held[key])
            records -= 1
            size -= len(self._held[key].record.raw)
        return victims

    def _remove(self, key: bytes) -> None:
        held = self._held.pop(key)
        self._bytes -= len(held.record.raw)
        del self._by_raw[held.record.raw]
        keys = self._by_subnet[held.subnet]
        del keys[key]
        if not keys:
            del self._by_subnet[held.subnet]
            subnets = self._in_block[held.block]
            del subnets[held.subnet]
            if not subnets:
                del self._in_block[held.block]
        self._per_block[held.block] -= 1
        if not self._per_block[held.block]:
            del self._per_block[held.block]

    def _replace(self, rec: VerifiedRecord, now_ms: int, source: str) -> None:
        if rec.body.key in self._held:
            self._remove(rec.body.key)
        block, subnet = self.groups(source)
        clock = RepublishClock.start(now_ms, self.rng)
        self._held[rec.body.key] = _Held(rec, clock, source, block, subnet)
        self._by_raw[rec.raw] = rec.body.key
        self._by_subnet.setdefault(subnet, {})[rec.body.key] = None
        self._in_block.setdefault(block, {})[subnet] = None
        self._per_block[block] = self._per_block.get(block, 0) + 1
        self._bytes += len(rec.raw)


class _Shares:
    """How many records each block and subnet would hold with some taken away (a put's
    evictions, worked out before anything changes), and whose to take next. Only the
    ``MAX_EVICTIONS + 1`` fullest are candidates: after fewer evictions than that, one of
    them is still at least as full as any other."""

    def __init__(self, store: RecordStore, block: str, subnet: str) -> None:
        self.store, self.block, self.subnet = store, block, subnet
        self.taken_block: Counter[str] = Counter()
        self.taken_subnet: Counter[str] = Counter()
        others = (b for b in store._per_block if b != block)
        self.blocks = heapq.nlargest(MAX_EVICTIONS + 1, others, key=self.of_block)
        neighbours = (n for n in store._in_block.get(block, ()) if n != subnet)
        self.neighbours = heapq.nlargest(MAX_EVICTIONS + 1, neighbours, key=self.of_subnet)

    def of_block(self, block: str) -> int:
        return self.store._per_block.get(block, 0) - self.taken_block[block]

    def of_subnet(self, subnet: str) -> int:
        return len(self.store._by_subnet.get(subnet, ())) - self.taken_subnet[subnet]

    def take(self, held: _Held) -> None:
        self.taken_block[held.block] += 1
        self.taken_subnet[held.subnet] += 1

    def victim_subnet(self) -> str | None:
        """The fullest subnet of the fullest other block, if that block holds at least two
        more than the newcomer's (a /32 with 65,536 /48s has one share, as one /48 has);
        else the fullest other subnet of the newcomer's own block, if it holds at least two
        more than the newcomer's subnet (a flooder does not hold back its honest
        neighbours); else None: nobody holds more than the newcomer's share."""
        block = max(self.blocks, key=self.of_block, default=None)
        if block is not None and self.of_block(block) >= self.of_block(self.block) + 2:
            inside = self.store._in_block[block]
            return max((n for n in inside if self.of_subnet(n) > 0), key=self.of_subnet)
        subnet = max(self.neighbours, key=self.of_subnet, default=None)
        if subnet is not None and self.of_subnet(subnet) >= self.of_subnet(self.subnet) + 2:
            return subnet
        return None


_MAX_LIFETIME: dict[int, int] = {
    common_pb2.RECORD_KIND_IDENTITY: MAX_TTL_MS,
    common_pb2.RECORD_KIND_NAME_CLAIM: MAX_TTL_MS,
    common_pb2.RECORD_KIND_PRESENCE: MAX_PRESENCE_TTL_MS,
    common_pb2.RECORD_KIND_KEY_ROTATION: MAX_ROTATION_TTL_MS,
}
_IdentityBound = records_pb2.IdentityRecord | records_pb2.PresenceRecord | records_pb2.KeyRotation
_IDENTITY_BOUND: dict[int, type[_IdentityBound]] = {  # payloads that carry an identity proof
    common_pb2.RECORD_KIND_IDENTITY: records_pb2.IdentityRecord,
    common_pb2.RECORD_KIND_PRESENCE: records_pb2.PresenceRecord,
    common_pb2.RECORD_KIND_KEY_ROTATION: records_pb2.KeyRotation,
}


def max_lifetime_ms(kind: int) -> int:
    return _MAX_LIFETIME[kind]


def check_policy(
    rec: VerifiedRecord, *, name_pow_bits: int,
    identity_pow_bits: int = DEFAULT_IDENTITY_POW_BITS,
) -> None:  # fmt: skip
    """The rules of one record on its own (module docstring), for stores and readers
    alike; raises a ProtocolError. What depends on what is held (sequence numbers, first
    come first served) is the store's alone."""
    body = rec.body
    limit = _MAX_LIFETIME[body.kind]
    if body.expires_ms - body.created_ms > limit:
        raise MalformedError(f"record: lifetime over {limit // HOUR_MS} h for its kind")
    if body.kind == common_pb2.RECORD_KIND_NAME_CLAIM:
        _check_name_claim(rec, name_pow_bits)
        return
    if body.key != record_key(body.kind, body.signer_fingerprint):
        raise VerificationError("record: stored under a key its signer does not own")
    _check_identity_pow(rec, identity_pow_bits, limit)
    if body.kind == common_pb2.RECORD_KIND_KEY_ROTATION:
        rotation_target(rec)


def _check_identity_pow(rec: VerifiedRecord, bits: int, max_age_ms: int) -> None:
    payload = decode_message(
        _IDENTITY_BOUND[rec.body.kind], rec.body.payload, max_size=8192, what="record payload"
    )
    if not payload.HasField("pow"):
        raise VerificationError(f"record: proof of work missing ({bits} bits required)")
    pow.verify(
        pow.Proof.from_proto(payload.pow), identity_pow_hash(rec.body.signer_fingerprint),
        required=bits, now_ms=rec.body.created_ms, max_age_ms=max_age_ms,
    )  # fmt: skip


def _check_name_claim(rec: VerifiedRecord, name_pow_bits: int) -> None:
    claim = decode_message(
        records_pb2.NameClaim, rec.body.payload, max_size=MAX_CLAIM_BYTES, what="name claim"
    )
    if normalize_name(claim.name) != claim.name:
        raise MalformedError("name claim: name is not in normal form")
    if rec.body.key != name_key(claim.name) or claim.fingerprint != rec.body.signer_fingerprint:
        raise VerificationError("name claim: key or fingerprint does not match the claim")
    proof = pow.Proof.from_proto(claim.pow)
    pow.verify(
        proof, name_pow_hash(claim.name, claim.fingerprint), required=name_pow_bits,
        now_ms=rec.body.created_ms, max_age_ms=MAX_TTL_MS,
    )  # fmt: skip


def rotation_target(rec: VerifiedRecord) -> PublicKeySet:
    """The keys a rotation record moves to, after checking that the record is signed by the
    old key it names and cross-signed by the new one; raises a ProtocolError otherwise."""
    rot = decode_message(
        records_pb2.KeyRotation, rec.body.payload, max_size=8192, what="key rotation"
    )
    if rot.old_fingerprint != rec.body.signer_fingerprint:
        raise VerificationError("key rotation: not signed by the old key")
    new_keys = PublicKeySet.from_proto(rot.new_keys)
    signature.verify(
        new_keys,
        ROTATION_ACCEPT_DOMAIN,
        rotation_accept_message(rot.old_fingerprint, new_keys.fingerprint),
        rot.new_key_signature,
    )
    return new_keys


def _check_replaces(held: VerifiedRecord, new: VerifiedRecord) -> None:
    if new.body.signer_fingerprint != held.body.signer_fingerprint and not _moves_name(held, new):
        raise ConflictError("record: key already held by another identity (name taken)")
    if new.body.seq < held.body.seq:
        raise ConflictError(f"record: sequence {new.body.seq} is lower than held {held.body.seq}")
    if new.body.seq == held.body.seq:
        raise ConflictError(f"record: a different record with sequence {new.body.seq} is held")


def _moves_name(held: VerifiedRecord, new: VerifiedRecord) -> bool:
    """Whether ``new`` is a name claim the holder of ``held`` signed over to it; a move
    signature that does not verify is refused outright (VerificationError)."""
    move = _name_move(new)
    if move is None:
        return False
    signature.verify(held.signer, NAME_MOVE_DOMAIN, *move)
    return True


def _name_move(rec: VerifiedRecord) -> tuple[bytes, bytes] | None:
    """The message and signature (``moved_by``) by which ``rec``, a name claim, says its
    name's former holder moved it over; None: it is no name claim, or carries no move."""
    if rec.body.kind != common_pb2.RECORD_KIND_NAME_CLAIM:
        return None
    claim = decode_message(records_pb2.NameClaim, rec.body.payload, max_size=MAX_CLAIM_BYTES,
                           what="name claim")  # fmt: skip
    if not claim.moved_by:
        return None
    return name_move_message(claim.name, bytes(claim.fingerprint)), claim.moved_by


def signers_compete(kind: int) -> bool:
    """Whether records of ``kind`` by different signers can share a key: a name claim's
    key is its name's, every other kind's its signer's own (`record_key`). Only there do
    readers weigh holders against each other (`judge_answers`)."""
    return kind not in _KIND_LABEL


def select_best(records: Iterable[VerifiedRecord]) -> VerifiedRecord | None:
    """Of several verified answers for one key: highest seq, then latest, then lowest bytes
    (a total order, so every reader picks the same record whatever order answers came in)."""
    return min(records, key=lambda r: (-r.body.seq, -r.body.created_ms, r.raw), default=None)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a reader believes of the holders' answers for one key: ``best`` (None: none
    held a valid record, or ``tied``), whether holders disagreed on whose it is
    (``contested``: then ``best`` is the signer most of them answered with, so a reader
    that asked few asks more before believing it), whether the most were as many for
    two signers or more (``tied``: nobody's, since a sequence number, each signer's own
    choice, cannot settle it), and how many holders answered with ``best``'s signer
    (``backers``)."""

    best: VerifiedRecord | None
    contested: bool = False
    tied: bool = False
    backers: int = 0

    def believed(self, key: bytes) -> VerifiedRecord | None:
        """``best``, or `ContestedError` when tied."""
        if self.tied:
            raise ContestedError(
                f"records at {key.hex()[:16]}…: as many holders answered for each of several"
                " signers; none is believed"
            )
        return self.best


class ContestedError(DnaError):
    """The holders of a key (a name) answered as often with one signer's record as with
    another's: neither is believed (`Verdict.tied`). Asking again later, when more holders
    answer, may settle it; a sequence number never does."""


def judge_answers(answers: Iterable[Iterable[VerifiedRecord]]) -> Verdict:
    """Of the verified records each holder answered for one key, the one to believe.

    One signer: its highest seq (`select_best`). Several signers happen only at a name
    (every other kind lives at its signer's own key, `signers_compete`), and a sequence
    number does not choose between them: each signer numbers its own records, and a claim
    numbered 2^63 costs no more than one numbered now, so by seq alone one node holding
    another identity's claim (taken first there, as any node that never held the name's
    does) resolved the name to it for every reader that asked it. So a signer whose name
    another answer's claim moved (``moved_by``, signed by that signer) drops out, as
    holders replace it; of those left, the signer the most holders answered with wins,
    then `select_best` among its records, and the verdict is contested. Signers tied for
    the most: the verdict is ``tied``, with no ``best`` (before, the tie went to the
    higher seq, so one squatting holder against one honest won again)."""
    answers = [list(answer) for answer in answers]
    votes = Counter(fp for answer in answers for fp in {r.body.signer_fingerprint for r in answer})
    records = list({r.raw: r for answer in answers for r in answer}.values())  # decoded once
    signers = {r.body.signer_fingerprint: r.signer for r in records}
    if len(signers) <= 1:
        best = select_best(records)
        return Verdict(best, backers=votes[best.body.signer_fingerprint] if best else 0)
    moved = _moved_signers(signers, records)
    left = [r for r in records if r.body.signer_fingerprint not in moved] or records
    standing = {r.body.signer_fingerprint for r in left}
    most = max(votes[fp] for fp in standing)
    if sum(votes[fp] == most for fp in standing) > 1:
        return Verdict(None, contested=True, tied=True, backers=most)
    best = select_best(r for r in left if votes[r.body.signer_fingerprint] == most)
    return Verdict(best, contested=len(standing) > 1, backers=most)


def _moved_signers(signers: dict[bytes, PublicKeySet], records: list[VerifiedRecord]) -> set[bytes]:
    """The signers (by fingerprint) whose name one of ``records`` says they moved to it,
    with their valid signature: holders replace their claims with it."""
    moves = [(r.signer, move) for r in records if (move := _name_move(r)) is not None]
    return {
        fp
        for fp, keys in signers.items()
        if any(by != keys and _verifies(keys, move) for by, move in moves)
    }


def _verifies(keys: PublicKeySet, move: tuple[bytes, bytes]) -> bool:
    try:
        signature.verify(keys, NAME_MOVE_DOMAIN, *move)
    except VerificationError:
        return False
    return True
