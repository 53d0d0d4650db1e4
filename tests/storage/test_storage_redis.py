"""Redis-only behaviour: no key expires natively (an older layout's TTLs are removed);
a sync list page reads its page of the ID index, not the mailbox (an older layout gains
the index at connect, a newer one is refused);
reads survive keys that already vanished;
more calls at once than connections wait for one; a server not configured for durable
writes is reported at connect; a server killed, restarted or stopped under the backend
fails calls as ``StoreUnavailableError`` and is served again at once when it is back."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import signal
import time
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis
from dna_core.tasks import stop_tasks
from dna_storage.backends.base import StoredBlob, StoreUnavailableError, Tombstone, Usage
from dna_storage.backends.redis import (
    LAYOUT,
    RedisBackend,
    StoreLayoutError,
    durability_problems,
)
from storage.redis_layout2 import expire_as_layout_2, put_as_layout_2
from storage.redis_process import RedisProcess
from storage.storage_harness import listing

T0 = (int(time.time()) + 10 * 86_400) * 1000  # ahead of the wall clock
M = hashlib.sha256(b"redis mailbox").digest()


def blob(payload: bytes, ttl: int = 1000) -> StoredBlob:
    return StoredBlob(M, hashlib.sha256(payload).digest(), payload, T0, T0 + ttl)


async def keys_with_a_ttl(raw: aioredis.Redis, prefix: str) -> list[str]:
    keys = [key.decode() async for key in raw.scan_iter(match=prefix + "*")]
    assert keys  # the test wrote some
    return sorted([k for k in keys if await raw.pttl(k) != -1])


async def hold_blobs_and_tombstones(b: RedisBackend) -> tuple[StoredBlob, StoredBlob]:
    a, c = blob(b"a", ttl=1000), blob(b"c", ttl=5000)
    await b.put_many([a, c], T0)
    await b.delete([Tombstone(M, a.blob_id, T0, T0 + 2000, b"auth")], T0)
    await b.save_gc_time(T0)
    return a, c


def test_no_key_expires_natively(redis_url: str) -> None:
    """Every key the backend writes lives until GC (the node's clock) or a delete removes
    it: a native TTL is the Redis server's clock, and a step on the Redis host expired
    blobs and tombstones early, past the node's ExpiryClock. Checked to fail without the
    fix (blob, tombstone and signed delete keys had a PEXPIREAT)."""

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="native:")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            a, c = await hold_blobs_and_tombstones(b)
            assert await raw.exists(f"native:b:{M.hex()}:{c.blob_id.hex()}")
            assert await raw.exists(f"native:t:{M.hex()}:{a.blob_id.hex()}")
            assert await keys_with_a_ttl(raw, "native:") == []
            assert await b.expire(T0 + 5000, 100) == 2  # GC removes them, by the node's time
            assert await b.get_blobs(M, [c.blob_id], T0) == []
            assert await raw.keys("native:[bt]:*") == []
            assert await raw.keys("native:sd:*") == []
        finally:
            await raw.aclose()
            await b.close()

    asyncio.run(main())


def test_keys_an_older_node_gave_a_native_ttl_lose_it_at_connect(redis_url: str) -> None:
    """A store written by a node of key layout 1 (blob, tombstone and signed delete keys
    with a PEXPIREAT): the first connect removes every such TTL, once, and keeps the data."""

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="layout1:")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            a, c = await hold_blobs_and_tombstones(b)
            await b.close()
            old = [  # a blob, a tombstone and its signed delete, as layout 1 wrote them
                f"layout1:b:{M.hex()}:{c.blob_id.hex()}",
                f"layout1:t:{M.hex()}:{a.blob_id.hex()}",
                f"layout1:sd:{hashlib.sha256(b'auth').hexdigest()}",
            ]
            for key in old:
                assert await raw.exists(key)
                await raw.pexpireat(key, T0 + 60_000)
            await raw.delete("layout1:layout")
            b = await RedisBackend.connect(redis_url, prefix="layout1:")
            assert await keys_with_a_ttl(raw, "layout1:") == []
            assert await raw.get("layout1:layout") == str(LAYOUT).encode()
            assert [x.blob_id for x in (await b.fetch(M, 0, 10, T0)).blobs] == [c.blob_id]
            assert len(await b.get_tombstones(M, [a.blob_id], T0)) == 1
        finally:
            await raw.aclose()
            await b.close()

    asyncio.run(main())


def test_more_calls_at_once_than_connections_wait_for_one_instead_of_failing(
    redis_url: str,
) -> None:
    """300 fetches at once (a node serving 300 clients): each waits for one of the pool's
    connections and is answered; redis-py's default pool raised MaxConnectionsError past
    100, which a node answered INTERNAL."""

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="many:")
        try:
            blobs = [blob(b"many %d" % i) for i in range(20)]
            await b.put_many(blobs, T0)
            pages = await asyncio.gather(*(b.fetch(M, 0, 100, T0) for _ in range(300)))
            assert all(len(page.blobs) == 20 for page in pages)
        finally:
            await b.close()

    asyncio.run(main())


def test_fetch_skips_and_cleans_blobs_whose_key_vanished(redis_url: str) -> None:
    """What a server clock running ahead (or an eviction) looks like: index without payload."""

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="vanish:")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            blobs = [blob(b"blob %d" % i) for i in range(6)]
            await b.put_many(blobs, T0)
            for gone in (blobs[0], blobs[2], blobs[3]):
                await raw.delete(f"vanish:b:{M.hex()}:{gone.blob_id.hex()}")
            page = await b.fetch(M, 0, 2, T0)
            assert [x.seq for x in page.blobs] == [2, 5]
            assert page.more
            assert [x.seq for x in (await b.fetch(M, 5, 2, T0)).blobs] == [6]
            assert await raw.zcard(f"vanish:s:{M.hex()}") == 3  # index cleaned lazily
            assert await b.totals() == Usage(3, sum(len(blobs[i].blob) for i in (1, 4, 5)))
            assert await b.usage(M, T0) == Usage(3, sum(len(blobs[i].blob) for i in (1, 4, 5)))
            assert await raw.zcard("vanish:x") == 3
        finally:
            await raw.aclose()
            await b.close()

    asyncio.run(main())


def test_a_server_not_configured_for_durable_writes_is_reported(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The session's server runs AOF with fsync always; weaken it for a moment."""

    async def main() -> None:
        raw = aioredis.Redis.from_url(redis_url)
        try:
            assert await durability_problems(raw) == []
            await raw.config_set("appendfsync", "everysec")
            try:
                with caplog.at_level(logging.WARNING, logger="dna.storage.redis"):
                    await (await RedisBackend.connect(redis_url, prefix="durable:")).close()
            finally:
                await raw.config_set("appendfsync", "always")
        finally:
            await raw.aclose()

    asyncio.run(main())
    assert "appendfsync is 'everysec', not 'always'" in caplog.text


def tombstones(first: int, auth: bytes, expires: int) -> list[Tombstone]:
    ids = sorted(hashlib.sha256(b"%d" % n).digest() for n in range(first, first + 3))
    return [Tombstone(M, i, T0, expires, auth) for i in ids]


def test_signed_delete_counts_stay_exact_when_keys_vanish_before_gc(redis_url: str) -> None:
    """Keys vanished before GC reached them (a native TTL an older node gave them, or a
    delete by hand); GC still releases their signed delete once."""

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="sdgone:")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            auth = b"signed delete " * 100
            tombs = tombstones(0, auth, T0 + 2000)
            await b.delete(tombs, T0)
            assert await b.signed_deletes() == Usage(1, len(auth))
            await raw.delete(
                f"sdgone:sd:{hashlib.sha256(auth).hexdigest()}",
                *(f"sdgone:t:{M.hex()}:{t.blob_id.hex()}" for t in tombs),
            )
            assert await b.get_tombstones(M, [t.blob_id for t in tombs], T0) == []
            assert (await b.sync_index(M, T0)).tombstones == []
            assert await b.expire(T0 + 2000, 100) == 3
            assert await b.signed_deletes() == Usage(0, 0)
            assert await raw.keys("sdgone:s[drz]*") == []
        finally:
            await raw.aclose()
            await b.close()

    asyncio.run(main())


def test_tombstones_stored_with_their_authorization_inline_still_read(redis_url: str) -> None:
    """Tombstones a node wrote before signed deletes were shared (each key holding its whole
    signed delete) read, sync and expire as before, until their lifetime ends."""

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="legacy:")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            old = tombstones(0, b"old inline delete", T0 + 2000)
            for t in old:  # the layout before: 'a' in the tombstone's hash
                key = f"legacy:t:{M.hex()}:{t.blob_id.hex()}"
                await raw.hset(
                    key, mapping={"d": t.deleted_ms, "e": t.expires_ms, "a": t.authorization}
                )
                await raw.zadd(f"legacy:ti:{M.hex()}", {t.blob_id.hex(): t.expires_ms})
                await raw.zadd("legacy:x", {f"t:{M.hex()}:{t.blob_id.hex()}": t.expires_ms})
                await raw.zadd("legacy:m", {M.hex(): 0})
            await b.close()  # written by a node of layout 2: the connect indexes them by ID
            await raw.set("legacy:layout", 2)
            b = await RedisBackend.connect(redis_url, prefix="legacy:")
            new = tombstones(10, b"new shared delete", T0 + 3000)
            await b.delete(new, T0)
            everything = sorted(old + new, key=lambda t: t.blob_id)
            assert await b.get_tombstones(M, [t.blob_id for t in everything], T0) == everything
            assert (await listing(b, M, T0))[1] == everything
            index = await b.sync_index(M, T0)
            assert index.tombstones == [(t.blob_id, len(t.authorization)) for t in everything]
            assert await b.signed_deletes() == Usage(1, len(b"new shared delete"))
            assert await b.expire(T0 + 2000, 100) == 3  # the old ones
            assert (await listing(b, M, T0 + 2000))[1] == new
            assert await b.expire(T0 + 3000, 100) == 3
            assert await b.signed_deletes() == Usage(0, 0)
            assert await b.mailboxes() == 0
        finally:
            await raw.aclose()
            await b.close()

    asyncio.run(main())


def test_a_restarted_server_is_served_at_once_and_keeps_every_acknowledged_blob(
    own_redis: RedisProcess,
) -> None:
    """Killed (SIGKILL) under the backend: every call fails as ``StoreUnavailableError``
    (UNAVAILABLE at the node), not as a Redis exception (a traceback and INTERNAL per
    request). Restarted on its AOF: the 40 puts acknowledged before are there, and 40 puts
    at once succeed at once. Before, each pooled connection (closed by the restart) failed
    its next call: 40 of 40 failed with the server up."""

    async def main() -> None:
        b = await RedisBackend.connect(own_redis.url, prefix="restart:")
        try:
            before = [blob(b"before %d" % i) for i in range(40)]
            await asyncio.gather(*(b.put_many([x], T0) for x in before))  # 40 connections
            own_redis.kill()
            calls = (
                b.put_many([blob(b"while down")], T0), b.fetch(M, 0, 10, T0),
                b.expire(T0, 100), b.digests(bytes(32), b"\xff" * 32, T0), b.usage(M, T0),
            )  # fmt: skip
            for call in calls:
                with pytest.raises(StoreUnavailableError, match="store is unavailable: redis"):
                    await call
            own_redis.start()
            after = [blob(b"after %d" % i) for i in range(40)]
            outcomes = await asyncio.gather(
                *(b.put_many([x], T0) for x in after), return_exceptions=True
            )
            assert [o for o in outcomes if isinstance(o, BaseException)] == []
            page = await b.fetch(M, 0, 1000, T0)
            assert {x.blob_id for x in page.blobs} == {x.blob_id for x in before + after}
        finally:
            await b.close()

    asyncio.run(main())


def test_a_server_that_stops_answering_fails_calls_as_unavailable(
    own_redis: RedisProcess,
) -> None:
    """SIGSTOP (a server hung, or cut off without a reset): a call fails within the socket
    timeout as ``StoreUnavailableError`` instead of hanging, and the backend serves again
    once the server does."""

    async def main() -> None:
        b = await RedisBackend.connect(own_redis.url, prefix="stopped:")
        try:
            await b.put_many([blob(b"held")], T0)
            own_redis.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(StoreUnavailableError, match="store is unavailable: redis"):
                    await asyncio.wait_for(b.usage(M, T0), 30)
                assert time.monotonic() - started < 20
            finally:
                own_redis.proc.send_signal(signal.SIGCONT)
            assert (await b.usage(M, T0)).blobs == 1
        finally:
            await b.close()

    asyncio.run(main())


def test_a_loop_over_redis_calls_stops_every_time_it_is_stopped(redis_url: str) -> None:
    """A loop shaped like the node's GC and repair loops (each pass a store call, errors
    retried) ends every time it is stopped. redis-py sends each command under Python
    3.11's ``asyncio.wait_for``, which drops a cancel that lands as the send completes
    (redis-py #2028): one cancel and an await left about half of such loops running, and a
    storage node waited 90 minutes on SIGTERM. ``stop_tasks`` cancels again until done."""

    async def passes(b: RedisBackend) -> None:
        while True:
            with contextlib.suppress(StoreUnavailableError):
                await b.expire(T0, 100)
            await asyncio.sleep(0)

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="stopping:")
        try:
            for _ in range(40):
                loop = asyncio.create_task(passes(b))
                await asyncio.sleep(random.random() * 0.005)
                await asyncio.wait_for(stop_tasks([loop], recancel_s=0.2), 10)
                assert loop.cancelled()
        finally:
            await b.close()

    asyncio.run(main())


async def output_bytes(raw: aioredis.Redis) -> int:
    return int((await raw.info("stats"))["total_net_output_bytes"])


def test_a_sync_list_page_reads_its_page_not_the_whole_mailbox(redis_url: str) -> None:
    """A page of 1,002 IDs of a mailbox of 20,000 blobs and 2,000 tombstones: the server
    sends the node about a page of IDs, not every ID the mailbox holds (it read both expiry
    indexes whole for each page: 0.35 s a page at 100,000 blobs). Checked to fail without
    the ID index (1.9 MB sent for the page)."""

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="listpage:")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            held = [blob(i.to_bytes(4, "big"), ttl=10**9) for i in range(20_000)]
            for i in range(0, len(held), 1000):
                await b.put_many(held[i : i + 1000], T0)
            gone = [Tombstone(M, hashlib.sha256(b"t%d" % i).digest(), T0, T0 + 10**9, b"a")
                    for i in range(2000)]  # fmt: skip
            await b.delete(gone, T0)
            blob_ids = sorted(x.blob_id for x in held)
            tomb_ids = sorted(t.blob_id for t in gone)
            after = blob_ids[5000]
            before = await output_bytes(raw)
            page = await b.sync_index(M, T0, after=after, limit=1002)
            sent = await output_bytes(raw) - before
            assert page.blob_ids == [i for i in blob_ids if i > after][:1002]
            assert [t for t, _ in page.tombstones] == [i for i in tomb_ids if i > after][:1002]
            assert sent < 400_000, f"{sent} bytes sent for one page"
            whole = await b.sync_index(M, T0)  # the whole index (repair) reads it all
            assert whole.blob_ids == blob_ids
            assert [t for t, _ in whole.tombstones] == tomb_ids
        finally:
            await raw.aclose()
            await b.close()

    asyncio.run(main())


def test_expired_ids_are_skipped_and_a_page_still_fills(redis_url: str) -> None:
    """IDs that expired but GC has not reached are not listed, and a page reads past them
    until it holds ``limit`` live ones."""

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="listexpired:")
        try:
            held = [blob(i.to_bytes(4, "big"), ttl=10 if i % 3 else 10**9) for i in range(600)]
            await b.put_many(held, T0)
            live = sorted(x.blob_id for x in held if x.expires_ms > T0 + 10)
            page = await b.sync_index(M, T0 + 10, limit=100)
            assert page.blob_ids == live[:100]
            rest = await b.sync_index(M, T0 + 10, after=page.blob_ids[-1], limit=1000)
            assert rest.blob_ids == live[100:]
        finally:
            await b.close()

    asyncio.run(main())


def test_a_layout_2_store_gains_the_id_index_at_connect_and_a_newer_one_is_refused(
    redis_url: str,
) -> None:
    """A store a node of layout 2 wrote (no ID index): the first connect builds it from the
    expiry indexes, so every blob and tombstone is listed, and a connect after a node of
    layout 2 wrote to it again mends it; a store of a layout newer than the node's is
    refused at connect with the reason, not served half-understood."""

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="layout2:")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            a, c = await hold_blobs_and_tombstones(b)
            await b.close()
            await raw.delete(f"layout2:l:{M.hex()}", f"layout2:tl:{M.hex()}")
            await raw.set("layout2:layout", 2)
            b = await RedisBackend.connect(redis_url, prefix="layout2:")
            assert await raw.get("layout2:layout") == str(LAYOUT).encode()
            index = await b.sync_index(M, T0, limit=10)
            assert index.blob_ids == [c.blob_id]
            assert [t for t, _ in index.tombstones] == [a.blob_id]
            await b.close()
            # A node of layout 2 started on it again (a downgrade) stores a blob without the
            # ID index: the next connect finds the index short and rebuilds it.
            d = blob(b"d", ttl=9000)
            await put_as_layout_2(raw, "layout2:", d, T0)
            b = await RedisBackend.connect(redis_url, prefix="layout2:")
            assert (await b.sync_index(M, T0)).blob_ids == sorted([c.blob_id, d.blob_id])
            await b.close()
            await raw.set("layout2:layout", LAYOUT + 1)
            with pytest.raises(StoreLayoutError, match=f"key layout {LAYOUT + 1}, newer"):
                b = await RedisBackend.connect(redis_url, prefix="layout2:")
        finally:
            await raw.aclose()
            await b.close()

    asyncio.run(main())


def test_usage_reads_no_expired_blob_gc_has_not_reached(redis_url: str) -> None:
    """A mailbox with 20,000 expired blobs GC has not reached: the quota's usage script
    subtracts them by their hours of expiry, not by reading each one's size (the script held
    the whole server 205 ms a put at 100,000). Counted in the server's HGET calls; checked
    to fail without ``eh:`` (20,000 calls). A store without the hours (layout 2) gets them
    at connect, the same as the puts kept them."""
    hour = 3_600_000

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="usagehours:")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            expired = [blob(b"e%d" % n, ttl=1000) for n in range(20_000)]
            for i in range(0, len(expired), 1000):
                await b.put_many(expired[i : i + 1000], T0)
            await b.put_many([blob(b"live", ttl=10 * hour)], T0)
            before = (await raw.info("commandstats")).get("cmdstat_hget", {}).get("calls", 0)
            assert await b.usage(M, T0 + 2 * hour) == Usage(1, 4)
            after = (await raw.info("commandstats"))["cmdstat_hget"]["calls"]
            assert after - before < 100, after - before
            hours = await raw.hgetall(f"usagehours:eh:{M.hex()}")
            await b.close()
            await raw.delete(f"usagehours:eh:{M.hex()}")
            await raw.set("usagehours:layout", 2)
            b = await RedisBackend.connect(redis_url, prefix="usagehours:")
            assert await raw.hgetall(f"usagehours:eh:{M.hex()}") == hours
            assert await b.usage(M, T0 + 2 * hour) == Usage(1, 4)
        finally:
            await raw.aclose()
            await b.close()

    asyncio.run(main())


def test_a_connect_to_a_store_as_this_layout_left_it_checks_no_mailbox(redis_url: str) -> None:
    """The full index check (four ZCARD per mailbox: ~22 s a million) runs only when the
    store is not as a node of this layout left it (``P checked``): after an upgrade, a
    downgraded node's writes, or a check cut short. Fails without the marker (checked: every
    connect made 20,000 ZCARD calls for 5,000 mailboxes)."""

    def zcards(stats: dict[str, Any]) -> int:
        return int(stats.get("cmdstat_zcard", {}).get("calls", 0))

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="checked:")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            boxes = [hashlib.sha256(b"box %d" % n).digest() for n in range(5000)]
            many = [replace(blob(b"x"), mailbox_id=m) for m in boxes]
            for i in range(0, len(many), 500):
                await b.put_many(many[i : i + 500], T0)
            await b.delete([Tombstone(boxes[0], b"\x01" * 32, T0, T0 + 9000, b"auth")], T0)
            assert await b.expire(T0 + 5000, 10) == 10  # GC keeps the marker too
            await b.close()
            before = zcards(await raw.info("commandstats"))
            b = await RedisBackend.connect(redis_url, prefix="checked:")
            assert zcards(await raw.info("commandstats")) - before < 10
            await b.close()
            # a layout 2 node's write: the next connect checks, and mends, every mailbox
            late = replace(blob(b"late", ttl=9000), mailbox_id=boxes[1])
            await put_as_layout_2(raw, "checked:", late, T0)
            before = zcards(await raw.info("commandstats"))
            b = await RedisBackend.connect(redis_url, prefix="checked:")
            assert zcards(await raw.info("commandstats")) - before >= 4 * 4990
            assert late.blob_id in (await b.sync_index(boxes[1], T0)).blob_ids
            await b.close()
            # a check cut short leaves no marker (it is written at the check's end)
            await raw.delete("checked:checked")
            before = zcards(await raw.info("commandstats"))
            b = await RedisBackend.connect(redis_url, prefix="checked:")
            assert zcards(await raw.info("commandstats")) - before >= 4 * 4990
            await b.close()
            before = zcards(await raw.info("commandstats"))
            b = await RedisBackend.connect(redis_url, prefix="checked:")
            assert zcards(await raw.info("commandstats")) - before < 10
        finally:
            await raw.aclose()
            await b.close()

    asyncio.run(main())


def test_a_layout_2_gc_leaves_no_count_of_tombstones_for_ids_not_held_too_high(
    redis_url: str,
) -> None:
    """A layout 2 node's GC removes tombstones for IDs not held without their marks
    (``tu:M``) or the node's count of them: the next connect, seeing the store not as it
    left it, counts them again from the marks of tombstones still held, and a later
    delete of such an ID counts its new tombstone. Fails without the recount (checked: the
    count stayed at 3, and the later delete left it there, where 1 is held)."""

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="recount:")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            other = hashlib.sha256(b"another mailbox").digest()
            ids = [hashlib.sha256(b"not held %d" % n).digest() for n in range(3)]
            await b.put_many([blob(b"kept", ttl=9000)], T0)
            tombs = [Tombstone(M, i, T0, T0 + 2000, b"auth") for i in ids[:2]]
            await b.delete([*tombs, Tombstone(other, ids[2], T0, T0 + 2000, b"auth")], T0)
            assert await b.unheld_tombstones() == 3
            await b.close()
            assert await expire_as_layout_2(raw, "recount:", T0 + 3000, 100) == 3
            b = await RedisBackend.connect(redis_url, prefix="recount:")
            assert await b.unheld_tombstones() == 0
            # the mailbox the old GC emptied kept its marks: a delete of one counts anew
            await b.delete([Tombstone(other, ids[2], T0 + 3000, T0 + 5000, b"auth")], T0 + 3000)
            assert await b.unheld_tombstones() == 1
            assert await b.expire(T0 + 6000, 100) == 1
            assert await b.unheld_tombstones() == 0
        finally:
            await raw.aclose()
            await b.close()

    asyncio.run(main())


def test_layout_2_writes_that_balance_the_counters_are_still_seen(redis_url: str) -> None:
    """A layout 2 node's put and GC pass that leave the node-wide counters as they were
    (one blob of the same size in, one out of another mailbox): the connect after still
    sees the store was written (the GC queue's first entry changed) and indexes the new
    blob by ID, so a sync list shows it. Fails with the counters alone in ``P checked``
    (checked: the blob put was missing from the sync list)."""

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="balanced:")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            other = hashlib.sha256(b"another mailbox").digest()
            gone = blob(b"gone 1", ttl=1000)
            late = replace(blob(b"late 2", ttl=9000), mailbox_id=other)
            await b.put_many([gone], T0)
            await b.close()
            await put_as_layout_2(raw, "balanced:", late, T0)
            assert await expire_as_layout_2(raw, "balanced:", T0 + 2000, 100) == 1
            b = await RedisBackend.connect(redis_url, prefix="balanced:")
            assert await b.totals() == Usage(1, len(late.blob))  # as before the two
            assert (await b.sync_index(other, T0 + 2000, limit=10)).blob_ids == [late.blob_id]
        finally:
            await raw.aclose()
            await b.close()

    asyncio.run(main())


def test_a_fetch_past_an_expired_backlog_reads_only_live_entries(redis_url: str) -> None:
    """20,000 expired blobs GC has not reached and 3 live ones: a fetch from cursor 0 reads
    the live blobs' entries, not the seq index through the backlog (100,000 expired took
    3.5 s a fetch, a round trip per 165 entries). Counted in the server's index reads; fails
    without the live path (checked: 122 ZRANGEBYSCORE and 122 ZMSCORE calls)."""

    def calls(stats: dict[str, Any], *names: str) -> int:
        return sum(int(stats.get(f"cmdstat_{n}", {}).get("calls", 0)) for n in names)

    async def main() -> None:
        b = await RedisBackend.connect(redis_url, prefix="backlog:")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            expired = [blob(b"expired %d" % n, ttl=1000) for n in range(20_000)]
            live = [blob(b"live %d" % n, ttl=86_400_000) for n in range(3)]
            for i in range(0, len(expired), 1000):
                await b.put_many(expired[i : i + 1000], T0)
            await b.put_many(live, T0)
            before = calls(await raw.info("commandstats"), "zrangebyscore", "zmscore")
            page = await b.fetch(M, 0, 100, T0 + 5000)
            after = calls(await raw.info("commandstats"), "zrangebyscore", "zmscore")
            assert [x.blob_id for x in page.blobs] == [x.blob_id for x in live]
            assert after - before <= 4, after - before
        finally:
            await raw.aclose()
            await b.close()

    asyncio.run(main())
