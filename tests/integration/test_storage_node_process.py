"""A real `dna-storage-node` process (SQLite): put with proof of work, owner-signed
fetch and delete, every refusal with its distinct status, durability across restart."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cluster import (
    GRPC_PORT,
    NodeProcess,
    free_ips,
    mailbox_call,
    sample_value,
    scrape,
    wait_ready,
)
from dna_core.crypto import Identity, ReplayGuard, open_envelope, pow, seal
from dna_core.mailbox import blob_id, mailbox_id, put_pow_hash, sign_delete, sign_fetch
from dna_core.ops.relay import TcpRelay
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc
from dna_storage.mailbox_service import MAX_PUT_BATCH
from process_mark import starts_processes
from support import SETTLE_S, seeded_identity, until

IP, FULL_IP = free_ips(2)
# each flood test's own source address: the node's rate bucket is per source, so a flood
# starts from a full bucket and leaves no spent one to the tests after it (in any order)
FLOODER, BATCHER = free_ips(2)
POW_BITS = 8
# a mailbox per test that reads or counts what it holds, so no test sees another's blobs
ALICE, BOB = seeded_identity("storage-alice"), seeded_identity("storage-bob")
CAROL = seeded_identity("storage-carol")
DAVE, ERIN = seeded_identity("storage-dave"), seeded_identity("storage-erin")
FRANK = seeded_identity("storage-frank")  # the metrics test's own mailbox
GRACE = seeded_identity("storage-grace")  # the bad puts'
HEIDI = seeded_identity("storage-heidi")  # the restart's
IVAN = seeded_identity("storage-ivan")  # the replayed put's
JUDY = seeded_identity("storage-judy")  # the wipe's
STORAGE_TOML = f"""
gc_interval_s = 0.2  # more of [storage]: the holdings gauges follow within a test
[admission]
pow_base_bits = {POW_BITS}
ip_rate_per_s = 5.0
ip_burst = 30.0
node_max_tombstones_unheld = 3  # reached within a test
"""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture(scope="module")
@starts_processes
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("storage")
    proc = NodeProcess(
        "storage", IP, root, [], command="dna-storage-node",
        extra_toml=STORAGE_TOML,
    )  # fmt: skip
    proc.start()
    try:
        wait_ready([proc])
        yield proc
    finally:
        proc.kill()


def put_request(blob: bytes, box: bytes, bits: int | None = POW_BITS) -> mailbox_pb2.PutRequest:
    req = mailbox_pb2.PutRequest(version=1, mailbox_id=box, blob=blob)
    if bits is not None:
        proof, _ = pow.solve(put_pow_hash(box, blob), bits, now_ms=now_ms())
        req.pow.CopyFrom(proof.to_proto())
    return req


def call(method: str, request: Any) -> Any:
    """One unary call; returns the response or the AioRpcError."""
    return mailbox_call(IP, method, request)


def refused(result: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    assert isinstance(result, grpc.aio.AioRpcError), f"expected {code}, got {result}"
    assert result.code() == code, (result.code(), result.details())
    assert result.details()
    return result


def fetch(owner: Identity) -> Any:
    req = mailbox_pb2.FetchRequest.FromString(
        sign_fetch(owner, cursor=b"", limit=100, now_ms=now_ms())
    )
    return call("Fetch", req)


def test_put_fetch_open_delete(node: NodeProcess) -> None:
    box = mailbox_id(BOB.fingerprint)
    env = seal(
        ALICE, BOB.public, b"stored and forwarded", now_ms=now_ms(), include_sender_keys=True
    )
    put = call("Put", put_request(env, box))
    assert put.blob_id == blob_id(env) and put.acknowledged_replicas == 1
    assert put.expires_ms > now_ms() + 29 * 86_400_000
    assert call("Put", put_request(env, box)).blob_id == put.blob_id  # idempotent

    page = fetch(BOB)
    assert [b.blob for b in page.blobs] == [env]
    opened = open_envelope(page.blobs[0].blob, BOB, now_ms=now_ms(), replay_guard=ReplayGuard())
    assert opened.payload == b"stored and forwarded"

    # node-wide: other tests' deletes are in it too, so the test counts what it adds
    before = sample_value(scrape(node), "dna_storage_signed_delete_bytes")
    delete = mailbox_pb2.DeleteRequest.FromString(sign_delete(BOB, [put.blob_id], now_ms=now_ms()))
    assert call("Delete", delete).deleted == 1
    assert list(fetch(BOB).blobs) == []
    refused(call("Put", put_request(env, box)), grpc.StatusCode.FAILED_PRECONDITION)
    stored = len(delete.SerializeToString(deterministic=True))  # the tombstone's authorization
    signed = wait_for_gauge(node, "dna_storage_signed_delete_bytes", before + stored)
    assert signed == before + stored, (before, stored)


def wait_for_gauge(node: NodeProcess, name: str, wanted: float, **labels: str) -> float:
    """The series' value once it reads ``wanted`` or after SETTLE_S (gauges of holdings are
    set by each GC pass)."""
    deadline = time.monotonic() + SETTLE_S
    while (value := sample_value(scrape(node), name, **labels)) != wanted:
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    return value


def test_each_bad_put_gets_its_own_status(node: NodeProcess) -> None:
    box = mailbox_id(GRACE.fingerprint)
    env = seal(ALICE, GRACE.public, b"x", now_ms=now_ms())
    err = refused(call("Put", put_request(env, box, bits=None)), grpc.StatusCode.PERMISSION_DENIED)
    assert ("dna-pow-required", str(POW_BITS)) in tuple(err.trailing_metadata() or ())
    refused(call("Put", put_request(env, box, bits=2)), grpc.StatusCode.PERMISSION_DENIED)
    other = mailbox_id(ALICE.fingerprint)
    refused(call("Put", put_request(env, other)), grpc.StatusCode.INVALID_ARGUMENT)
    refused(call("Put", put_request(b"not an envelope", box)), grpc.StatusCode.INVALID_ARGUMENT)
    stale = put_request(env, box)
    stale.pow.timestamp_ms -= 3_600_000
    refused(call("Put", stale), grpc.StatusCode.FAILED_PRECONDITION)  # stale proof: expired
    assert list(fetch(GRACE).blobs) == []  # nothing above was stored


def test_put_many_judges_each_put_alone_and_stores_only_the_admitted(
    node: NodeProcess,
) -> None:
    box = mailbox_id(CAROL.fingerprint)
    good = [seal(ALICE, CAROL.public, bytes([i]), now_ms=now_ms()) for i in range(3)]
    stale = put_request(good[2], box)
    stale.pow.timestamp_ms -= 3_600_000
    puts = [
        put_request(good[0], box),
        put_request(good[1], box, bits=None),  # no proof
        put_request(good[1], mailbox_id(ALICE.fingerprint)),  # addressed to another mailbox
        put_request(b"not an envelope", box),
        stale,
        put_request(good[1], box),
        put_request(good[0], box),  # the same blob again: idempotent
    ]
    response = call("PutMany", mailbox_pb2.PutManyRequest(puts=puts))
    codes = [grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED]
    codes += [grpc.StatusCode.INVALID_ARGUMENT] * 2
    codes += [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OK, grpc.StatusCode.OK]
    assert [o.code for o in response.outcomes] == [c.value[0] for c in codes]
    assert all(o.reason for o, c in zip(response.outcomes, codes, strict=True) if c.value[0])
    assert response.outcomes[1].pow_required == POW_BITS
    assert [o.blob_id for o in response.outcomes if not o.code] == [
        blob_id(good[0]),
        blob_id(good[1]),
        blob_id(good[0]),
    ]
    stored = [b.blob for b in fetch(CAROL).blobs]
    assert sorted(stored) == sorted(good[:2])  # the refused ones changed nothing

    for empty_or_too_many in ([], [put_request(good[2], box)] * 65):
        result = call("PutMany", mailbox_pb2.PutManyRequest(puts=empty_or_too_many))
        refused(result, grpc.StatusCode.INVALID_ARGUMENT)
    assert sorted(b.blob for b in fetch(CAROL).blobs) == sorted(good[:2])


def test_only_the_owner_reads_and_replays_are_refused(node: NodeProcess) -> None:
    req = mailbox_pb2.FetchRequest.FromString(
        sign_fetch(BOB, cursor=b"", limit=10, now_ms=now_ms())
    )
    assert not isinstance(call("Fetch", req), grpc.aio.AioRpcError)
    refused(call("Fetch", req), grpc.StatusCode.ALREADY_EXISTS)
    forged = mailbox_pb2.FetchRequest.FromString(
        sign_fetch(ALICE, cursor=b"", limit=10, now_ms=now_ms())
    )
    body = mailbox_pb2.FetchBody.FromString(forged.body)
    body.mailbox_id = mailbox_id(BOB.fingerprint)
    forged.body = body.SerializeToString()
    refused(call("Fetch", forged), grpc.StatusCode.PERMISSION_DENIED)
    old = mailbox_pb2.FetchRequest.FromString(
        sign_fetch(BOB, cursor=b"", limit=10, now_ms=now_ms() - 3_600_000)
    )
    refused(call("Fetch", old), grpc.StatusCode.FAILED_PRECONDITION)


def puts_at_once(requests: list[mailbox_pb2.PutRequest], source: str) -> list[Any]:
    """The answers (or `grpc.aio.AioRpcError`s) to ``requests``, sent together on one channel
    from ``source`` (through a relay bound to it: gRPC Python cannot bind a channel's source
    address). Together: sent one by one, each on a channel of its own, a loaded machine
    spaces them so that the bucket refills (5/s) between them and no flood is seen."""

    async def one(stub: mailbox_pb2_grpc.MailboxAsyncStub, request: mailbox_pb2.PutRequest) -> Any:
        try:
            return await stub.Put(request, timeout=SETTLE_S)
        except grpc.aio.AioRpcError as err:
            return err

    async def go() -> list[Any]:
        async with (
            TcpRelay((IP, GRPC_PORT), upstream_source=source) as via,
            grpc.aio.insecure_channel(via.address) as channel,
        ):
            stub = mailbox_pb2_grpc.MailboxStub(channel)
            return list(await asyncio.gather(*(one(stub, r) for r in requests)))

    return asyncio.run(go())


def test_flood_is_rate_limited_with_retry_after(node: NodeProcess) -> None:
    box = mailbox_id(ALICE.fingerprint)
    puts = [
        put_request(seal(BOB, ALICE.public, bytes([i]), now_ms=now_ms()), box) for i in range(40)
    ]
    results = puts_at_once(puts, FLOODER)
    limited = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert limited, "40 puts at once from one address must hit a 30-burst limit"
    err = refused(limited[0], grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert int(dict(err.trailing_metadata() or ())["retry-after-ms"]) > 0


def test_put_many_spends_a_rate_token_per_put(node: NodeProcess) -> None:
    """A PutMany of n puts spends n tokens of its source's bucket (burst 30, 5/s), as n
    Puts would. Each put goes to a mailbox of its own, so no mailbox's bucket (burst 50)
    can be what refuses: only the source's can, and the refusals must say so. A batch
    spending one token for all its puts would pass all 64."""
    owners = [seeded_identity(f"storage-batch-{i}") for i in range(MAX_PUT_BATCH)]
    puts = [
        put_request(
            seal(BOB, owner.public, b"batched", now_ms=now_ms()), mailbox_id(owner.fingerprint)
        )
        for owner in owners
    ]
    started = time.monotonic()
    outcomes = put_many_from(BATCHER, mailbox_pb2.PutManyRequest(puts=puts)).outcomes
    elapsed_s = time.monotonic() - started
    passed = [o for o in outcomes if o.code == 0]
    refusals = [o for o in outcomes if o.code != 0]
    # the token-bucket bound over the call: the burst plus what the rate refills meanwhile
    assert len(passed) <= 30 + 5.0 * elapsed_s, (len(passed), elapsed_s)
    assert len(passed) >= 30, "the burst's puts pass"
    assert refusals, "a batch must not pass more puts than the source's tokens"
    for o in refusals:
        assert o.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], (o.code, o.reason)
        assert o.kind == "rate" and o.retry_after_ms > 0, (o.kind, o.reason)
        assert o.reason.startswith("rate limit: source over 5 puts/s"), o.reason


def put_many_from(source: str, request: mailbox_pb2.PutManyRequest) -> Any:
    """One PutMany call from ``source`` (through a relay bound to it)."""

    async def go() -> Any:
        async with (
            TcpRelay((IP, GRPC_PORT), upstream_source=source) as via,
            grpc.aio.insecure_channel(via.address) as channel,
        ):
            return await mailbox_pb2_grpc.MailboxStub(channel).PutMany(request, timeout=SETTLE_S)

    return asyncio.run(go())


def test_data_survives_sigkill_and_holds_no_plaintext(node: NodeProcess, tmp_path: Path) -> None:
    box = mailbox_id(HEIDI.fingerprint)
    secret = b"a secret that must never be on a storage node's disk"
    env = seal(ALICE, HEIDI.public, secret, now_ms=now_ms())
    put_past_the_rate_limit(env, box)
    node.kill()
    node.start()
    wait_ready([node])
    assert [b.blob for b in fetch(HEIDI).blobs] == [env]
    files = [p for p in (node.root / f"{node.name}-data").rglob("*") if p.is_file()]
    assert files, "the data directory holds the mailbox database"
    for path in files:
        assert secret not in path.read_bytes(), path


def test_tombstones_for_ids_not_held_are_shown_and_bounded_node_wide(node: NodeProcess) -> None:
    """The node's count of tombstones for IDs it did not hold is a gauge, so an operator
    sees it approach ``node_max_tombstones_unheld`` (3 here); a delete past the bound is
    refused and counted as the per-mailbox bound's refusals are (outcome "tombstones")."""
    unheld = [blob_id(f"never put {i}".encode()) for i in range(3)]
    delete = mailbox_pb2.DeleteRequest.FromString(sign_delete(DAVE, unheld, now_ms=now_ms()))
    assert not isinstance(call("Delete", delete), grpc.aio.AioRpcError)
    assert wait_for_gauge(node, "dna_storage_tombstones_unheld", 3) == 3
    refusals = {"method": "delete", "outcome": "tombstones"}
    before = sample_value(scrape(node), "dna_storage_requests_total", **refusals)
    one_more = sign_delete(ERIN, [blob_id(b"never put either")], now_ms=now_ms())
    result = call("Delete", mailbox_pb2.DeleteRequest.FromString(one_more))
    why = refused(result, grpc.StatusCode.RESOURCE_EXHAUSTED).details() or ""
    assert "the node holds 3" in why, why  # the node's bound, not the mailbox's
    assert wait_for_gauge(node, "dna_storage_requests_total", before + 1, **refusals) == before + 1
    assert sample_value(scrape(node), "dna_storage_tombstones_unheld") == 3  # nothing stored


def test_metrics_count_outcomes_and_holdings(node: NodeProcess) -> None:
    """Each put outcome is counted under its own label. The node is the module's: the test
    counts what it adds (other tests put too, and a restart zeroes the counters), so it
    passes alone and in any order; it puts to a mailbox of its own, as others fetch bob's."""
    box = mailbox_id(FRANK.fingerprint)
    env = seal(ALICE, FRANK.public, b"counted", now_ms=now_ms())
    before = put_outcomes(node)
    put_past_the_rate_limit(env, box)
    refused(call("Put", put_request(env, box, bits=None)), grpc.StatusCode.PERMISSION_DENIED)
    elsewhere = put_request(env, mailbox_id(ALICE.fingerprint))  # frank's envelope
    refused(call("Put", elsewhere), grpc.StatusCode.INVALID_ARGUMENT)
    future = put_request(env, box)
    future.version = 2
    refused(call("Put", future), grpc.StatusCode.INVALID_ARGUMENT)
    # each refusal under its own label (its error's kind), none of them under "size"
    # (a call is counted before it is answered)
    after = put_outcomes(node)
    added = {outcome: after[outcome] - before[outcome] for outcome in after}
    assert added == {"ok": 1.0, "pow": 1.0, "mailbox": 1.0, "version": 1.0, "size": 0.0}, added
    text = node.http("/metrics").text
    assert "dna_storage_blobs " in text and "dna_storage_repair_passes_total" in text
    assert "\ndna_ready 1.0\n" in text and "\ndna_storage_refusing_writes 0.0\n" in text
    used = sample_value(scrape(node), "dna_storage_disk_used_ratio")
    assert 0 < used < 1, used  # a real reading of the tmp file system, not the default 0
    # the limits it runs with, by configuration key: set ones and defaults
    samples = scrape(node)
    for limit, value in [
        ("node_max_tombstones_unheld", 3), ("ip_burst", 30), ("max_tombstones_unheld", 20_000),
        ("quota_max_bytes", 64 * 1024 * 1024), ("disk_high_water", 0.9), ("sessions_max", 4096),
    ]:  # fmt: skip
        assert sample_value(samples, "dna_storage_limit", limit=limit) == value, limit
    # each limit once: a gauge of the high-water mark alone said what this one does
    assert "dna_storage_disk_high_water_ratio" not in text


def put_outcomes(node: NodeProcess) -> dict[str, float]:
    """The node's count of puts by outcome (those the metrics test makes, and "size")."""
    samples = scrape(node)
    return {
        outcome: sample_value(samples, "dna_storage_requests_total", method="put", outcome=outcome)
        for outcome in ("ok", "pow", "mailbox", "version", "size")
    }


def put_past_the_rate_limit(env: bytes, box: bytes) -> None:
    """Put ``env``, again while refused for the source's rate: the tests share the source's
    bucket (5/s, burst 30), which a test of something else must not fail on."""
    until(lambda: put_admitted(env, box), "a put past the source's rate limit")


def put_admitted(env: bytes, box: bytes) -> bool:
    """Whether a put of ``env`` was stored; False when refused for the source's rate."""
    result = call("Put", put_request(env, box))
    if isinstance(result, grpc.aio.AioRpcError):
        refused(result, grpc.StatusCode.RESOURCE_EXHAUSTED)
        return False
    assert result.blob_id == blob_id(env)
    return True


@pytest.mark.process  # starts a process itself
def test_over_the_disk_high_water_mark_the_node_is_unready_and_refuses_writes(
    tmp_path: Path,
) -> None:
    full = NodeProcess("full", FULL_IP, tmp_path, [], command="dna-storage-node")
    full.extra_toml = "[admission]\npow_base_bits = 8\ndisk_high_water = 0.000001\n"
    full.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # up, joined (a lone seed), disk checked
            with contextlib.suppress(httpx.HTTPError):
                if full.status()["ready"]:
                    break
            time.sleep(0.2)
        readyz = full.http("/readyz")
        assert readyz.status_code == 503 and "high-water" in readyz.json()["reason"]
        assert full.http("/healthz").status_code == 200  # alive, just not taking writes
        text = full.http("/metrics").text
        assert "\ndna_ready 0.0\n" in text and "\ndna_storage_refusing_writes 1.0\n" in text
        samples = scrape(full)
        high_water = sample_value(samples, "dna_storage_limit", limit="disk_high_water")
        assert high_water == 0.000001
        assert sample_value(samples, "dna_storage_disk_used_ratio") > 0.000001
    finally:
        full.kill()


def test_a_fetch_cursor_out_of_range_is_invalid_argument(node: NodeProcess) -> None:
    """Issue 10, defect 9: a cursor >= 2^63 reached SQLite and answered UNKNOWN
    (OverflowError). Every integer is range-checked where it is decoded."""
    for cursor in ((1 << 63).to_bytes(8, "big"), b"\xff" * 8):
        req = mailbox_pb2.FetchRequest.FromString(
            sign_fetch(BOB, cursor=cursor, limit=10, now_ms=now_ms())
        )
        refused(call("Fetch", req), grpc.StatusCode.INVALID_ARGUMENT)
    last = ((1 << 63) - 1).to_bytes(8, "big")  # the largest a node can issue: nothing after it
    req = mailbox_pb2.FetchRequest.FromString(
        sign_fetch(BOB, cursor=last, limit=10, now_ms=now_ms())
    )
    assert list(call("Fetch", req).blobs) == []


def test_a_replayed_put_does_not_restamp_its_blob(node: NodeProcess) -> None:
    """Issue 10, defect 10: replaying a put (same request, proof of work still fresh) must
    not give its blob a new stored time, expiry or seq, nor bring it back once expired."""
    box = mailbox_id(IVAN.fingerprint)
    env = seal(ALICE, IVAN.public, b"short-lived", now_ms=now_ms())
    request = put_request(env, box)
    request.ttl_s = 1
    first = call("Put", request)
    (held,) = fetch(IVAN).blobs
    time.sleep(1.2)  # past the 1 s the put asked for, well within the proof's window
    replay = call("Put", request)
    assert replay.expires_ms == first.expires_ms
    (again,) = fetch(IVAN).blobs
    assert (again.stored_ms, again.expires_ms) == (held.stored_ms, held.expires_ms)
    req = mailbox_pb2.FetchRequest.FromString(
        sign_fetch(IVAN, cursor=b"", limit=10, now_ms=now_ms())
    )
    page = call("Fetch", req)
    assert page.next_cursor[-8:] == (1).to_bytes(8, "big"), "the replay took a new seq"


def test_a_cursor_from_before_a_wipe_does_not_hide_new_blobs(node: NodeProcess) -> None:
    """A node wiped and restarted counts its seqs from 1 again: a cursor it issued before
    (seq 3 here) must not hide the blobs stored since. Found beside issue 10: with every
    replica wiped, a client's saved cursors hid new mail until the seqs caught up."""
    box = mailbox_id(JUDY.fingerprint)
    for i in range(3):
        env = seal(ALICE, JUDY.public, f"before {i}".encode(), now_ms=now_ms())
        put_past_the_rate_limit(env, box)
    before = fetch(JUDY)
    assert len(before.blobs) == 3
    node.kill()
    shutil.rmtree(node.root / f"{node.name}-data")
    node.start()
    wait_ready([node])
    after = seal(ALICE, JUDY.public, b"after the wipe", now_ms=now_ms())
    assert call("Put", put_request(after, box)).blob_id == blob_id(after)
    req = mailbox_pb2.FetchRequest.FromString(
        sign_fetch(JUDY, cursor=before.next_cursor, limit=10, now_ms=now_ms())
    )
    assert [b.blob for b in call("Fetch", req).blobs] == [after]
