"""The encrypted cache on a real SQLCipher file: encryption, dedupe, search, read state,
and the acknowledgement rule that decides what may be deleted from the network."""

from __future__ import annotations

import os
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from dna_core.crypto import Identity
from dna_core.errors import WrongPassphraseError
from dna_peer.cache import (
    OFFER_HOLD_MS,
    PAGE_BYTES,
    SCHEMA_VERSION,
    Cache,
    CacheDamagedError,
    CacheNewerError,
    Contact,
    Message,
    cache_key,
)
from dna_peer.peer import ACK_BATCH_IDS, HISTORY_CHUNK_BYTES, history_chunks

DEVICE_A, DEVICE_B = b"a" * 16, b"b" * 16


@pytest.fixture
def me() -> Identity:
    return Identity.generate()


@pytest.fixture
def cache(tmp_path: Path, me: Identity) -> Cache:
    return Cache.open(tmp_path / "cache.db", cache_key(me, DEVICE_A))


def incoming(sender: Identity, me: Identity, body: str, ts: int, mid: bytes) -> Message:
    return Message(mid, sender.fingerprint, sender.fingerprint, me.fingerprint, ts, body, False)


def test_nothing_readable_on_disk_and_a_wrong_key_changes_nothing(
    tmp_path: Path, me: Identity, cache: Cache, bob: Identity
) -> None:
    cache.pin(Contact(bob.fingerprint, bob.public, "bob", False, 1, bob.fingerprint))
    cache.add_message(incoming(bob, me, "attack at dawn", 5, b"m" * 16))
    cache.close()
    path = tmp_path / "cache.db"
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"attack at dawn" not in raw and b"bob" not in raw
    assert not path.read_bytes().startswith(b"SQLite format 3")
    before = path.read_bytes()
    with pytest.raises(WrongPassphraseError):
        Cache.open(path, cache_key(me, DEVICE_B))  # same identity, other device: other key
    assert path.read_bytes() == before
    reopened = Cache.open(path, cache_key(me, DEVICE_A))
    assert [m.body for m in reopened.messages()] == ["attack at dawn"]
    assert reopened.integrity_check() == "ok"


def test_a_cache_from_a_newer_dna_is_refused_and_left_as_it_is(
    tmp_path: Path, me: Identity, cache: Cache
) -> None:
    """A downgrade: a cache written by a later schema opened by this `dna`. It took it as
    its own (made its tables, wrote its own version over the newer one) and silently left
    what it could not read: schema 3's deferred blobs, under an older `dna`, were taken as
    handled (their outcome is `deferred`), acknowledged already, so deleted from the
    replicas, and never opened. Now a newer version is refused with one clear error and
    the file is untouched. Fails without the check (checked: it opened, version lowered)."""
    cache.defer_blob(me.fingerprint, b"d" * 32, b"sealed", b"s" * 32, 1, None)
    cache._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    cache.close()
    path = tmp_path / "cache.db"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CacheNewerError, match=f"newer dna .*version {SCHEMA_VERSION + 1}"):
        Cache.open(path, cache_key(me, DEVICE_A))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # deferred blob kept


def test_a_schema_3_cache_gets_blob_mailboxes_and_a_rotation_claims_its_blobs(
    tmp_path: Path, me: Identity, cache: Cache
) -> None:
    """Schema 4 records which mailbox each blob came from (`blobs.mailbox`). A cache from
    before gets the column, empty; the next rotation counts those blobs as the mailbox it
    rotated away from, so its grace period's end forgets them with the rest."""
    old, other = b"o" * 32, b"n" * 32
    cache.record_blob(b"x" * 32, "message", 1)  # as schema 3 recorded it: no mailbox
    cache.record_blob(b"y" * 32, "message", 1, other)
    cache._db.execute("ALTER TABLE blobs DROP COLUMN mailbox")  # (y's goes with it)
    cache._db.execute("PRAGMA user_version = 3")
    cache.close()
    reopened = Cache.open(tmp_path / "cache.db", cache_key(me, DEVICE_A))
    assert reopened._rows("PRAGMA user_version") == [(SCHEMA_VERSION,)]
    reopened.record_blob(b"z" * 32, "message", 2, other)
    reopened.claim_untagged_blobs(old)
    reopened.forget_mailbox(old)
    assert reopened.undeleted_blobs() == [b"z" * 32]


@pytest.mark.parametrize("keep", [0.5, 2 * PAGE_BYTES, 1000])
def test_a_cache_cut_short_is_a_damaged_cache_not_a_wrong_key(
    tmp_path: Path, me: Identity, cache: Cache, bob: Identity, keep: float
) -> None:
    """A crash or a disk fault that cut the file (at half, at a page boundary, inside the
    first page) says so, and how to recover, instead of blaming the key; nothing is
    written to the file."""
    cache.pin(Contact(bob.fingerprint, bob.public, "bob", False, 1, bob.fingerprint))
    with cache.transaction():
        for i in range(3_000):  # a file of many pages
            cache.add_message(incoming(bob, me, f"message {i} " + "x" * 200, i, i.to_bytes(16)))
    cache.close()
    path = tmp_path / "cache.db"
    os.truncate(path, int(keep * path.stat().st_size) if keep < 1 else int(keep))
    before = path.read_bytes()
    with pytest.raises(CacheDamagedError, match="the cache is damaged") as raised:
        Cache.open(path, cache_key(me, DEVICE_A))
    assert "rebuilds it from the mailbox" in str(raised.value)
    assert path.read_bytes() == before


def test_the_cache_and_its_wal_files_are_readable_by_their_owner_only(
    tmp_path: Path, me: Identity, bob: Identity
) -> None:
    path = tmp_path / "cache.db"
    cache = Cache.open(path, cache_key(me, DEVICE_A))
    cache.add_message(incoming(bob, me, "hi", 1, b"m" * 16))  # the WAL files now exist
    cache.close()
    files = [path, path.with_name("cache.db-wal"), path.with_name("cache.db-shm")]
    assert {f.name: f.stat().st_mode & 0o777 for f in files if f.exists()} == {
        f.name: 0o600 for f in files if f.exists()
    }
    assert path.with_name("cache.db-wal").exists() or path.stat().st_size > 0
    os.chmod(path, 0o644)  # an older cache, created before this: made private at its open
    Cache.open(path, cache_key(me, DEVICE_A)).close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_messages_are_kept_once_and_searchable(cache: Cache, me: Identity, bob: Identity) -> None:
    cache.pin(Contact(bob.fingerprint, bob.public, "bob", False, 1, bob.fingerprint))
    first = incoming(bob, me, "the quick brown fox", 10, b"1" * 16)
    assert cache.add_message(first) is True
    assert cache.add_message(first) is False  # same message ID: a duplicate
    cache.add_message(incoming(bob, me, "lazy dogs sleep", 20, b"2" * 16))
    assert [m.body for m in cache.search("brown fox")] == ["the quick brown fox"]
    # a stray quote is searched for literally, it cannot break the query syntax
    assert [m.body for m in cache.search('dogs "')] == ["lazy dogs sleep"]
    assert cache.message_count() == 2
    (conv,) = cache.conversations()
    assert conv.unread == 2 and conv.last_ms == 20


def test_read_state_only_moves_forward(cache: Cache, me: Identity, bob: Identity) -> None:
    cache.pin(Contact(bob.fingerprint, bob.public, "bob", False, 1, bob.fingerprint))
    for ts in (10, 20, 30):
        cache.add_message(incoming(bob, me, f"m{ts}", ts, bytes([ts]) * 16))
    assert cache.mark_read(bob.fingerprint, 20) is True
    assert cache.mark_read(bob.fingerprint, 10) is False  # an older marker from another device
    assert cache.conversations()[0].unread == 1
    assert cache.read_state() == {bob.fingerprint: 20}


def test_receipts_count_only_from_the_recipient(
    cache: Cache, me: Identity, bob: Identity, carol: Identity
) -> None:
    sent = Message(b"s" * 16, bob.fingerprint, me.fingerprint, bob.fingerprint, 1, "hi", True)
    cache.add_message(sent)
    assert cache.mark_delivered([sent.message_id], recipient=carol.fingerprint) == 0
    assert cache.mark_delivered([sent.message_id], recipient=bob.fingerprint) == 1
    assert cache.messages()[0].delivered


def test_blobs_are_deletable_once_every_device_acknowledged(cache: Cache) -> None:
    cache.add_device(DEVICE_A, "phone", 1)
    cache.add_device(DEVICE_B, "laptop", 1)
    for blob in (b"x", b"y", b"ack1", b"ack2"):
        cache.record_blob(blob, "message", 1)
    cache.add_acks(DEVICE_A, [b"x", b"y"], None)
    assert cache.deletable_blobs(0) == []  # the laptop has not said it holds them
    cache.add_acks(DEVICE_B, [b"x"], b"ack1")
    # x is everywhere, so the acknowledgement that only covers x is not needed either
    assert sorted(cache.deletable_blobs(0)) == [b"ack1", b"x"]
    cache.mark_deleted([b"x", b"ack1"])
    cache.add_acks(DEVICE_B, [b"y", b"z"], b"ack2")  # z: a blob device A has not seen yet
    assert cache.deletable_blobs(0) == [b"y"]  # ack2 still tells A that B holds z
    cache.mark_deleted([b"y"])
    cache.add_acks(DEVICE_A, [b"z"], None)
    cache.record_blob(b"z", "message", 1)
    assert sorted(cache.deletable_blobs(0)) == [b"ack2", b"z"]


def test_a_link_offer_is_waited_for_never_listed_and_leaves_nothing(cache: Cache) -> None:
    """An offer's device holds up deletes while its code may be used (at most OFFER_HOLD_MS,
    whatever the offer asks), is never a device until its hello, and once expired goes."""
    cache.add_device(DEVICE_A, "phone", 1)
    cache.record_blob(b"x", "message", 1)
    cache.add_acks(DEVICE_A, [b"x"], None)
    cache.add_offered(DEVICE_B, 2**62, 1_000)  # asks for forever: capped
    assert cache.offered_devices() == {DEVICE_B: 1_000 + OFFER_HOLD_MS}
    assert list(cache.devices()) == [DEVICE_A] and cache.offers_pending(1_000)
    assert cache.deletable_blobs(1_000) == []  # the new device may still come
    assert cache.deletable_blobs(1_000 + OFFER_HOLD_MS) == [b"x"]  # its code is long gone
    cache.drop_expired_offers(1_000 + OFFER_HOLD_MS)
    assert cache.offered_devices() == {} and not cache.offers_pending(1_000)

    cache.add_offered(DEVICE_B, 5_000, 1_000)
    cache.add_device(DEVICE_B, "laptop", 2_000)  # its hello: a device, the offer done
    assert cache.offered_devices() == {} and set(cache.devices()) == {DEVICE_A, DEVICE_B}
    cache.add_offered(DEVICE_B, 5_000, 3_000)  # the offer's hello arriving after: ignored
    assert cache.offered_devices() == {}


def test_a_failed_transaction_leaves_nothing(cache: Cache, me: Identity, bob: Identity) -> None:
    with pytest.raises(RuntimeError), cache.transaction():
        cache.add_message(incoming(bob, me, "half done", 1, b"h" * 16))
        cache.record_blob(b"blob", "message", 1)
        raise RuntimeError("crash in the middle")
    assert cache.message_count() == 0 and cache.blob_outcome(b"blob") is None


def test_pruning_forgets_only_what_cannot_matter_any_more(cache: Cache) -> None:
    cache.add_device(DEVICE_A, "phone", 1)
    for blob, seen in ((b"old-deleted", 10), (b"old-kept", 10), (b"new-deleted", 500)):
        cache.record_blob(blob, "message", seen)
    cache.add_acks(DEVICE_A, [b"old-deleted", b"old-kept", b"new-deleted"], b"ack")
    cache.mark_deleted([b"old-deleted", b"new-deleted"])
    cache.remember_envelope(b"e-old", 10)
    cache.remember_envelope(b"e-new", 500)
    cache.prune(envelopes_before_ms=100, deleted_blobs_before_ms=100)
    assert cache.blob_outcome(b"old-deleted") is None
    assert cache.blob_outcome(b"old-kept") == "message"  # other devices may still need it
    assert cache.blob_outcome(b"new-deleted") == "message"
    assert not cache.seen_envelope(b"e-old") and cache.seen_envelope(b"e-new")
    assert cache.deletable_blobs(0) == [b"old-kept"]  # its acknowledgement survived


def test_pruning_counts_no_later_than_the_newest_envelope_seen(cache: Cache) -> None:
    """A wall clock stepped 31 days ahead made the daily prune forget every deleted blob
    and seen envelope: a blob still on a replica came back once the clock was right."""
    day = 86_400_000
    assert cache.pruning_now_ms(5_000, slack_ms=day) == 5_000  # nothing seen: the clock
    cache.record_blob(b"deleted", "message", 1_000_000)
    cache.mark_deleted([b"deleted"])
    cache.remember_envelope(b"e", 1_000_000)
    assert cache.pruning_now_ms(1_000_500, slack_ms=day) == 1_000_500  # a clock in step
    stepped = 1_000_000 + 31 * day
    now = cache.pruning_now_ms(stepped, slack_ms=day)
    assert now == 1_000_000 + day
    cache.prune(envelopes_before_ms=now - 8 * day, deleted_blobs_before_ms=now - 32 * day)
    assert cache.blob_outcome(b"deleted") == "message" and cache.seen_envelope(b"e")


def test_a_history_of_any_length_is_made_in_the_memory_of_one_chunk(
    cache: Cache, me: Identity, alice: Identity
) -> None:
    """A linked device (or one that lost its cache) gets the whole history: it was made as
    one list of every message and then every chunk, twice the history in memory (12,000
    messages of 4 KB: 100+ MB; a long-used device's: gigabytes). Now each chunk is made
    as it is posted, from messages read as they go: the peak is about one chunk."""
    with cache.transaction():
        for n in range(12_000):
            cache.add_message(incoming(alice, me, f"{n} " + "x" * 4000, n, n.to_bytes(16, "big")))
    tracemalloc.start()
    try:
        count, held = 0, 0
        for chunk in history_chunks(cache, me.fingerprint):
            count, held = count + 1, held + len(chunk.messages)
            assert chunk.ByteSize() <= HISTORY_CHUNK_BYTES + 1024
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held == 12_000 and count > 300
    print(f"history of {held} messages in {count} chunks: peak {peak / 2**20:.1f} MiB traced")
    assert peak < 4 * HISTORY_CHUNK_BYTES, peak


def test_only_the_waited_devices_acknowledgements_count(cache: Cache) -> None:
    """A blob is deleted once every device acknowledged it. Every acknowledgement was
    counted, also one from a device not known here (linked on another device, its hello
    not yet arrived): with the phone's ack that made two, the number of devices, and the
    blob was deleted while the laptop had not fetched it."""
    device_c = b"c" * 16
    cache.add_device(DEVICE_A, "phone", 1)
    cache.add_device(DEVICE_B, "laptop", 1)
    cache.record_blob(b"x", "message", 1)
    cache.add_acks(DEVICE_A, [b"x"], None)
    cache.add_acks(device_c, [b"x"], None)
    assert cache.deletable_blobs(0) == []  # the laptop has not said it holds it
    cache.add_device(device_c, "tablet", 2)
    cache.add_acks(DEVICE_B, [b"x"], None)
    assert cache.deletable_blobs(0) == [b"x"]


def vm_steps(cache: Cache, work: Callable[[], object]) -> int:
    """SQLite virtual-machine steps (in thousands) ``work`` takes: a count, not a time."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    cache._db.set_progress_handler(count, 1_000)
    try:
        work()
    finally:
        cache._db.set_progress_handler(None, 1_000)
    return steps


def test_what_may_be_deleted_is_worked_out_in_steps_linear_in_the_cache(
    cache: Cache,
) -> None:
    """Every sync and every `watch` round asks which blobs may be deleted. For each row of
    an acknowledgement blob (one per blob it covers), every other row of that blob was
    checked against the blobs done: blobs x ACK_BATCH_IDS steps, 7.9 s for the 20,000
    blobs and two devices of a month's cache. Now the blobs done are worked out once and
    each row is looked at once or twice: a few hundred steps a blob."""
    cache.add_device(DEVICE_A, "phone", 1)
    cache.add_device(DEVICE_B, "laptop", 1)
    blobs = [os.urandom(32) for _ in range(4_000)]
    with cache.transaction():
        for blob in blobs:
            cache.record_blob(blob, "message", 1)
        cache.add_acks(DEVICE_A, blobs, None)
        for start in range(0, len(blobs), ACK_BATCH_IDS):  # the laptop's acks
            ack = os.urandom(32)
            cache.record_blob(ack, "ack", 1)
            cache.add_acks(DEVICE_B, blobs[start : start + ACK_BATCH_IDS], ack)
    thousands = vm_steps(cache, lambda: cache.deletable_blobs(0))
    assert len(cache.deletable_blobs(0)) == len(blobs) + 2
    assert thousands * 1_000 < 500 * len(blobs), thousands  # was 18,000 steps a blob


def full_scans(cache: Cache, work: Callable[[], object]) -> list[str]:
    """The statements ``work`` runs that read the whole messages table (no index)."""
    statements: list[str] = []
    cache._db.set_trace_callback(statements.append)
    try:
        work()
    finally:
        cache._db.set_trace_callback(None)
    return [
        sql
        for sql in statements
        for row in cache._db.execute(f"EXPLAIN QUERY PLAN {sql}")
        if str(row[3]).startswith("SCAN messages") and "INDEX" not in str(row[3])
    ]


def test_what_every_send_and_sync_asks_of_the_messages_reads_no_whole_table(
    cache: Cache, me: Identity, bob: Identity
) -> None:
    """Whether a contact has our keys (every send) and when this identity last wrote in
    each conversation (every sync owing receipts, every presence publish) read the whole
    messages table, bodies and all: 0.2-0.3 s and 1.4 s with 100,000 messages (78 MB).
    Now each reads an index of its own."""
    for n in range(20):
        msg = incoming(bob, me, f"m{n}", n, os.urandom(16))
        cache.add_message(msg)
        mine = Message(os.urandom(16), msg.conversation, me.fingerprint, bob.fingerprint, n,
                       "re", outgoing=True)  # fmt: skip
        cache.add_message(mine)
    assert cache.has_our_keys(bob.fingerprint) and cache.last_written()
    assert full_scans(cache, lambda: cache.has_our_keys(os.urandom(32))) == []
    assert full_scans(cache, cache.last_written) == []


def test_blobs_that_did_not_open_are_listed_with_the_nodes_that_returned_them(
    cache: Cache,
) -> None:
    """A rejected blob and a deferred one are unverified, each with its nodes (deleted there
    only); one that opened is not, nor a deferred one once it opened; deleting one forgets
    its nodes."""
    cache.record_blob(b"ok", "message", 1)
    cache.record_blob(b"bad", "rejected: malformed envelope", 1)
    cache.record_sources(b"bad", [b"n1", b"n2"])
    cache.record_blob(b"old", "rejected: from before the nodes were noted", 1)
    cache.defer_blob(b"m" * 32, b"wait", b"blob", b"s" * 32, 1, b"n3")
    cache.record_sources(b"wait", [b"n3"])
    wanted = [b"ok", b"bad", b"old", b"wait", b"unknown"]
    assert cache.unverified_blobs(wanted) == {
        b"bad": frozenset({b"n1", b"n2"}), b"old": frozenset(), b"wait": frozenset({b"n3"}),
    }  # fmt: skip
    cache.record_blob(b"wait", "message", 2)  # it opened: deleted everywhere
    cache.mark_deleted([b"bad"])
    assert cache.unverified_blobs(wanted) == {b"old": frozenset()}
    cache.record_blob(b"bad2", "rejected: x", 3)
    cache.record_sources(b"bad2", [b"n1"])
    assert cache.unverified_blobs([b"bad", b"bad2"]) == {b"bad2": frozenset({b"n1"})}


def unread_from_the_rows(cache: Cache) -> dict[bytes, int]:
    """Each conversation's unread messages counted from its rows (what the list showed)."""
    rows = cache._rows(
        "SELECT c.id, (SELECT count(*) FROM messages m WHERE m.conversation = c.id"
        " AND m.outgoing = 0 AND m.timestamp_ms > c.read_up_to_ms) FROM conversations c"
    )
    return {bytes(r[0]): r[1] for r in rows}


def listed_unread(cache: Cache) -> dict[bytes, int]:
    return {c.id: c.unread for c in cache.conversations()}


def test_unread_counts_stay_exact_through_adds_reads_moves_deletes_and_restarts(
    tmp_path: Path, me: Identity, bob: Identity, carol: Identity
) -> None:
    """The list shows a count kept with each write (`conversations.unread`): it must say
    what the rows say after every kind of write, and after the cache is opened again."""
    path, key = tmp_path / "cache.db", cache_key(me, DEVICE_A)
    cache = Cache.open(path, key)
    cache.pin(Contact(bob.fingerprint, bob.public, "bob", False, 1, bob.fingerprint))
    for ts in (10, 20, 30):
        cache.add_message(incoming(bob, me, f"m{ts}", ts, bytes([ts]) * 16))
    cache.add_message(Message(b"o" * 16, bob.fingerprint, me.fingerprint, bob.fingerprint, 40,
                              "mine", outgoing=True))  # fmt: skip
    assert listed_unread(cache) == {bob.fingerprint: 3}
    cache.mark_read(bob.fingerprint, 20)
    cache.add_message(incoming(bob, me, "late, already read", 15, b"l" * 16))
    cache.add_message(incoming(bob, me, "new", 50, b"n" * 16))
    assert listed_unread(cache) == unread_from_the_rows(cache) == {bob.fingerprint: 2}
    # a stranger (carol's keys, first) pinned when writing, then bob's rotation to them:
    # carol's messages move into bob's conversation
    cache.add_message(incoming(carol, me, "hi", 5, b"c" * 16))
    cache.add_message(incoming(carol, me, "there", 60, b"d" * 16))
    cache.pin(Contact(carol.fingerprint, carol.public, None, False, 1, carol.fingerprint))
    assert listed_unread(cache) == {bob.fingerprint: 2, carol.fingerprint: 2}
    bob_contact = cache.contact(bob.fingerprint)
    assert bob_contact is not None
    cache.replace_contact(bob_contact, carol.public, 70)
    assert listed_unread(cache) == unread_from_the_rows(cache) == {bob.fingerprint: 3}
    cache.close()
    cache = Cache.open(path, key)
    assert listed_unread(cache) == {bob.fingerprint: 3}
    cache.mark_read(bob.fingerprint, 60)
    assert listed_unread(cache) == {bob.fingerprint: 0}
    # a message request forgotten: its messages and its count go
    dave = Identity.generate()
    cache.add_message(incoming(dave, me, "buy now", 80, b"s" * 16))
    cache.pin(Contact(dave.fingerprint, dave.public, None, False, 80, dave.fingerprint))
    assert listed_unread(cache) == {bob.fingerprint: 0, dave.fingerprint: 1}
    assert cache.forget_strangers(keep=0, idle_before_ms=100) == 1
    assert listed_unread(cache) == unread_from_the_rows(cache) == {bob.fingerprint: 0}


def test_a_cache_from_before_the_unread_count_gets_it_from_its_rows(
    tmp_path: Path, me: Identity, cache: Cache, bob: Identity, carol: Identity
) -> None:
    """The cache keeps the count (`conversations.unread`); one from before has none:
    opened, it is counted once from the rows, and kept from then on. (The version stays
    4: the triggers are in the file, so an older `dna` writing to it keeps the count.)"""
    for ts in (10, 20, 30):
        cache.add_message(incoming(bob, me, f"m{ts}", ts, bytes([ts]) * 16))
        cache.add_message(incoming(carol, me, f"m{ts}", ts, bytes([ts + 1]) * 16))
    cache.mark_read(carol.fingerprint, 20)
    for name in ("add", "delete", "move", "conversation", "read"):  # as it was before
        cache._db.execute(f"DROP TRIGGER unread_on_{name}")
    cache._db.execute("ALTER TABLE conversations DROP COLUMN unread")
    cache.close()
    reopened = Cache.open(tmp_path / "cache.db", cache_key(me, DEVICE_A))
    assert reopened._rows("PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert listed_unread(reopened) == {bob.fingerprint: 3, carol.fingerprint: 1}
    reopened.add_message(incoming(carol, me, "more", 40, b"x" * 16))
    reopened.mark_read(bob.fingerprint, 30)
    assert listed_unread(reopened) == unread_from_the_rows(reopened)
    assert listed_unread(reopened) == {bob.fingerprint: 0, carol.fingerprint: 2}


def test_the_conversation_list_does_not_count_the_unread_messages(
    cache: Cache, me: Identity, bob: Identity
) -> None:
    """The list counted each conversation's unread messages from its rows: 80 ms at
    10,000 unread (`bench.peer_cache_size`), on every `dna inbox` and every sync that
    shows it. Now it reads a count kept with each write: the same few steps at any
    number unread."""
    with cache.transaction():
        for n in range(5_000):
            cache.add_message(incoming(bob, me, "unread", n + 1, os.urandom(16)))
    assert cache.conversations()[0].unread == 5_000
    assert vm_steps(cache, cache.conversations) == 0  # under 1,000 steps (was 30,000)


def test_an_old_cache_opened_by_several_dna_at_once_gets_each_column_once(
    tmp_path: Path, me: Identity, cache: Cache
) -> None:
    """Two `dna` (a `watch` and a `send`) opening a cache from before a column: each looked
    for it outside any transaction, both saw it missing, and the second failed on "duplicate
    column". Now the columns are looked for and added in one transaction. Fails without it
    (checked: "duplicate column name")."""
    cache._db.execute("ALTER TABLE deferred_blobs DROP COLUMN source")
    cache._db.execute("ALTER TABLE blobs DROP COLUMN mailbox")
    cache.close()
    start, errors = threading.Barrier(6), []

    def open_it() -> None:
        start.wait()
        try:
            Cache.open(tmp_path / "cache.db", cache_key(me, DEVICE_A)).close()
        except Exception as exc:  # each opener's failure is the finding
            errors.append(exc)

    openers = [threading.Thread(target=open_it) for _ in range(6)]
    for opener in openers:
        opener.start()
    for opener in openers:
        opener.join()
    assert errors == []
    reopened = Cache.open(tmp_path / "cache.db", cache_key(me, DEVICE_A))
    assert "mailbox" in {row[1] for row in reopened._rows("PRAGMA table_info(blobs)")}
