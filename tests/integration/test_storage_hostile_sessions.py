"""Hostile clients against one real storage node (docs/storage.md, "Memory"): sessions
over the per-address and per-node caps are refused with a status before they hold anything,
counted, while another address is still served; a session that fills its page slots with
answers it never reads, then sends its window of 4 MiB batches, holds at most its slots' worth
of them (the rest wait in the client, by HTTP/2 flow control), not its window's; a request
over the message limit on any RPC, or over one of the node's bounds, is refused with a
clear status, stores nothing, and the node goes on serving."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cluster import GRPC_PORT, NodeProcess, free_ips, now_ms, sample_value, scrape, wait_ready
from dna_core.crypto import Identity, seal
from dna_core.crypto import pow as pow_
from dna_core.mailbox import mailbox_id, put_pow_hash, sign_delete, sign_fetch
from dna_core.mailbox.session import NodeSession
from dna_core.ops.relay import TcpRelay
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc, overlay_pb2
from dna_testnet.topology import TESTNET_CONNECTIONS
from stream_sessions import StallingProxy, raw_session, slow_reader, status_of

pytestmark = pytest.mark.process  # every test starts a storage node

SESSION = "/dna.v1.Mailbox/Session"
PER_SOURCE, TOTAL, WINDOW, STALL_S = 3, 5, 16, 8.0
ANSWER_STALL_S = 6.0  # a unary answer left unread that long is cut
SOURCE_PAGES = 4  # page slots one address's sessions hold together
TOML = (
    f"sessions_max_per_source = {PER_SOURCE}\nsessions_max = {TOTAL}\n"
    f"session_pages_per_source = {SOURCE_PAGES}\n"
    f"session_window = {WINDOW}\nsession_stall_s = {STALL_S}\n"
    "[admission]\npow_base_bits = 8\nip_rate_per_s = 1000.0\nip_burst = 1000.0\n"
    "mailbox_rate_per_s = 1000.0\nmailbox_burst = 1000.0\n"
)
CONNECTIONS = (
    f"{TESTNET_CONNECTIONS}grpc_answers_max_per_source = 4\n"
    f"grpc_answer_stall_s = {ANSWER_STALL_S}\n"
)
MIB = 1024 * 1024


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    storage = NodeProcess(
        "hostile", free_ips(1)[0], tmp_path, [], command="dna-storage-node", extra_toml=TOML,
        connections_toml=CONNECTIONS,
    )  # fmt: skip
    storage.start()
    try:
        wait_ready([storage])
        yield storage
    finally:
        storage.kill()


def target(node: NodeProcess) -> str:
    return f"{node.ip}:{GRPC_PORT}"


def refusals(node: NodeProcess, reason: str) -> float:
    return sample_value(scrape(node), "dna_storage_session_refusals_total", reason=reason)


async def opened(call: Any) -> mailbox_pb2.SessionResponse:
    """The session's hello: it was let in."""
    hello = mailbox_pb2.SessionResponse.FromString(await asyncio.wait_for(call.read(), 10))
    assert hello.HasField("hello")
    return hello


def test_sessions_over_the_address_and_node_caps_are_refused_and_counted(
    node: NodeProcess,
) -> None:
    async def work() -> None:
        first = grpc.aio.insecure_channel(target(node))
        mine = [raw_session(first, SESSION) for _ in range(PER_SOURCE)]
        for call in mine:
            await opened(call)
        code, details = await status_of(raw_session(first, SESSION))
        assert (code, details) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"session: {PER_SOURCE} open from this address (the limit)",
        )
        async with TcpRelay((node.ip, GRPC_PORT), upstream_source=free_ips(1)[0]) as via:
            other = grpc.aio.insecure_channel(via.address)
            theirs = [raw_session(other, SESSION) for _ in range(TOTAL - PER_SOURCE)]
            for call in theirs:  # another address is served while the first is at its cap
                await opened(call)
            code, details = await status_of(raw_session(other, SESSION))
            assert (code, details) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"session: {TOTAL} open on this node (the limit)",
            )
            mine[0].cancel()  # one ends: its place is free again
            for _ in range(50):
                if sample_value(scrape(node), "dna_storage_sessions_open") < TOTAL:
                    break
                await asyncio.sleep(0.1)
            await opened(raw_session(first, SESSION))
            await other.close()
        await first.close()

    asyncio.run(work())
    assert refusals(node, "source_limit") == 1
    assert refusals(node, "node_limit") == 1


def envelope(owner: Identity, sender: Identity, size: int) -> bytes:
    return seal(sender, owner.public, os.urandom(size), now_ms=now_ms())


def put(owner: Identity, blob: bytes) -> mailbox_pb2.PutRequest:
    box = mailbox_id(owner.fingerprint)
    proof, _ = pow_.solve(put_pow_hash(box, blob), 8, now_ms=now_ms())
    return mailbox_pb2.PutRequest(version=1, mailbox_id=box, blob=blob, pow=proof.to_proto())


async def fill(node: NodeProcess, owner: Identity) -> None:
    """About 2 MiB in ``owner``'s mailbox: every fetch of it answers with a full page."""
    sender = Identity.generate()
    async with grpc.aio.insecure_channel(target(node)) as channel:
        stub = mailbox_pb2_grpc.MailboxStub(channel)
        for _ in range(12):
            await stub.Put(put(owner, envelope(owner, sender, 180_000)), timeout=10)


def fetch_frame(owner: Identity, request_id: int) -> bytes:
    fetch = mailbox_pb2.FetchRequest.FromString(sign_fetch(owner, limit=100, now_ms=now_ms()))
    return mailbox_pb2.SessionRequest(id=request_id, fetch=fetch).SerializeToString()


def batch_frame(request_id: int, puts: list[mailbox_pb2.PutRequest]) -> bytes:
    many = mailbox_pb2.PutManyRequest(puts=puts)
    return mailbox_pb2.SessionRequest(id=request_id, put_many=many).SerializeToString()


async def honest_session(node: NodeProcess, sender: Identity) -> float:
    """A put and a fetch on a session from another address: how long they took."""
    owner = Identity.generate()
    request = put(owner, envelope(owner, sender, 1_000))
    async with TcpRelay((node.ip, GRPC_PORT), upstream_source=free_ips(1)[0]) as via:
        channel = grpc.aio.insecure_channel(via.address)
        started = time.monotonic()
        session = NodeSession(channel, timeout=STALL_S)
        await session.open()
        stored = (await session.request(put=request)).put
        page = (await session.request(fetch=fetch(owner))).fetch
        took = time.monotonic() - started
        await session.close()
        await channel.close()
    assert [b.blob_id for b in page.blobs] == [stored.blob_id]
    return took


def test_a_session_holds_at_most_its_page_slots_of_big_batches_whatever_it_sends(
    node: NodeProcess,
) -> None:
    """Four fetches fill each session's page slots with 2 MiB answers it never reads; then
    its window of ~3.9 MiB PutMany frames (64 puts of ~60 KiB, each a valid one): the node
    reads one more and waits, and grpc holds at most the stream window (1 MiB) of the rest,
    instead of all 12 (47 MiB): read ahead waiting for a slot (186 MiB for the three
    sessions), or buffered by grpc in a window grown with the measured bandwidth (181 MiB).
    The three share their address's slots; a session from another address is served
    meanwhile."""
    owner, sender = Identity.generate(), Identity.generate()

    async def work() -> float:
        await fill(node, owner)
        blobs = [put(owner, envelope(owner, sender, 60_000)) for _ in range(64)]
        frames = [batch_frame(100 + i, blobs) for i in range(WINDOW - 4)]
        assert all(3.5 * MIB < len(f) < 4 * MIB for f in frames)
        rss_before = sample_value(scrape(node), "process_resident_memory_bytes")
        sessions = [slow_reader(target(node), SESSION) for _ in range(PER_SOURCE)]

        async def flood(call: Any) -> None:
            try:
                for i in range(4):
                    await call.write(fetch_frame(owner, i + 1))
                for frame in frames:
                    await call.write(frame)
            except Exception:  # cut (grpc fails a write on an ended call in several ways)
                pass  # cut: nothing more goes out on it

        writers = [asyncio.create_task(flood(call)) for _, call in sessions]
        await asyncio.sleep(4)  # what the node would read, it has read (before the cut)
        grown = sample_value(scrape(node), "process_resident_memory_bytes") - rss_before
        served_s = await honest_session(node, sender)
        assert served_s < STALL_S / 2  # served meanwhile, not once the attack was cut
        for _ in range(int(4 * STALL_S)):  # each cut once its first answer stuck STALL_S
            if refusals(node, "stalled") == PER_SOURCE:
                break
            await asyncio.sleep(0.5)
        for channel, _ in sessions:
            await channel.close()
        for task in writers:  # any still waiting for the node to take its frames
            task.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        return grown

    grown = asyncio.run(work())
    # The address's 4 shared slots (2 MiB pages or 4 MiB batches), a batch read and waiting
    # per session, 1 MiB window each: ~31 MiB at most; measured 14 MiB (54 MiB with 16
    # shared slots, the default).
    assert grown < 40 * MIB, f"grew {grown / MIB:.0f} MiB"
    assert refusals(node, "stalled") == PER_SOURCE
    assert sample_value(scrape(node), "dna_storage_sessions_open") == 0


SERVICES = [
    mailbox_pb2.DESCRIPTOR.services_by_name["Mailbox"],
    overlay_pb2.DESCRIPTOR.services_by_name["Overlay"],
]
OVERSIZED = 5 * MIB  # over the 4 MiB message limit


async def oversized_call(channel: grpc.aio.Channel, method: Any) -> grpc.StatusCode:
    """One request of ``OVERSIZED`` bytes to ``method``, unary or stream: the status."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    body = os.urandom(OVERSIZED)
    try:
        if method.client_streaming:
            call: Any = channel.stream_stream(path)()
            await call.write(body)
            await call.done_writing()
            async for _ in call:
                pass
        else:
            unary: Any = channel.unary_unary(path)
            await unary(body, timeout=10)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def bounds_refusals(owner: Identity, sender: Identity) -> dict[str, tuple[str, Any]]:
    """Well-formed requests over a bound, by what they try: the method and the request."""
    big = put(owner, envelope(owner, sender, 1_000))
    big.blob = big.blob + os.urandom(256 * 1024)  # over max_blob_bytes
    many = mailbox_pb2.PutManyRequest(puts=[put(owner, envelope(owner, sender, 100))] * 65)
    fetch_over = mailbox_pb2.FetchRequest.FromString(sign_fetch(owner, limit=1001, now_ms=now_ms()))
    delete_over = mailbox_pb2.DeleteRequest.FromString(
        sign_delete(owner, [os.urandom(32) for _ in range(1001)], now_ms=now_ms())
    )
    push = mailbox_pb2.SyncPushRequest(mailbox_id=mailbox_id(owner.fingerprint))
    return {
        "blob over the size limit": ("Put", big),
        "65 puts in a batch": ("PutMany", many),
        "fetch limit 1001": ("Fetch", fetch_over),
        "delete of 1001 IDs": ("Delete", delete_over),
        "sync push from nobody": ("SyncPush", push),
    }


def test_oversized_and_out_of_bounds_requests_are_refused_store_nothing_and_the_node_serves(
    node: NodeProcess,
) -> None:
    owner, sender = Identity.generate(), Identity.generate()

    async def work() -> None:
        async with grpc.aio.insecure_channel(
            target(node), options=[("grpc.max_send_message_length", 2 * OVERSIZED)]
        ) as channel:
            for service in SERVICES:
                for method in service.methods:
                    code = await oversized_call(channel, method)
                    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, method.full_name
            stub = mailbox_pb2_grpc.MailboxStub(channel)
            for what, (name, request) in bounds_refusals(owner, sender).items():
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await getattr(stub, name)(request, timeout=10)
                assert refused.value.code() in (
                    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED
                ), what  # fmt: skip
                assert 0 < len(refused.value.details() or "") < 200, what
            page = await stub.Fetch(fetch(owner), timeout=10)
            assert list(page.blobs) == []  # nothing of it was stored
            stored = await stub.Put(put(owner, envelope(owner, sender, 1_000)), timeout=10)
            page = await stub.Fetch(fetch(owner), timeout=10)  # and the node still serves
            assert [b.blob_id for b in page.blobs] == [stored.blob_id]

    asyncio.run(work())
    log = node.log_path.read_text(errors="replace")
    assert "Traceback" not in log


def fetch(owner: Identity) -> mailbox_pb2.FetchRequest:
    return mailbox_pb2.FetchRequest.FromString(sign_fetch(owner, limit=100, now_ms=now_ms()))


def answers(node: NodeProcess, reason: str) -> float:
    return sample_value(scrape(node), "dna_grpc_answers_refused_total", reason=reason)


def test_unary_fetches_left_unread_hold_only_their_address_slots(node: NodeProcess) -> None:
    """40 unary fetches of a 2 MiB mailbox from a client that reads none of the answers
    (behind a proxy that stops reading): the node builds only its address's 4 pages, and
    once they are left unread for the stall time, drops the connection, which frees them;
    another address's fetch is answered meanwhile. Before, the node built all 40 and kept
    each until the connection closed (an hour, `grpc_max_age_s`)."""
    owner = Identity.generate()

    async def work() -> float:
        await fill(node, owner)
        rss_before = sample_value(scrape(node), "process_resident_memory_bytes")
        async with StallingProxy((node.ip, GRPC_PORT)) as proxy:
            channel = grpc.aio.insecure_channel(proxy.address)
            stub = mailbox_pb2_grpc.MailboxStub(channel)
            assert len((await stub.Fetch(fetch(owner), timeout=10)).blobs) > 0  # connected
            proxy.stall()
            calls = [stub.Fetch(fetch(owner)) for _ in range(40)]
            for _ in range(int(ANSWER_STALL_S * 5)):  # the address's 4 slots fill, and stay
                if held(node) == 4:
                    break
                await asyncio.sleep(0.1)
            assert held(node) == 4
            await asyncio.sleep(0.5)  # what else the node would take in, it has taken
            grown = sample_value(scrape(node), "process_resident_memory_bytes") - rss_before
            served_s = await honest_fetch(node)
            assert served_s < ANSWER_STALL_S / 2
            for _ in range(int(8 * ANSWER_STALL_S)):
                if answers(node, "stalled") > 0 and held(node) == 0:
                    break
                await asyncio.sleep(0.5)
            for call in calls:
                call.cancel()
            await channel.close()
        return grown

    grown = asyncio.run(work())
    # 4 pages of 2 MiB (each held as its blobs, its message and grpc's copy): ~20 MiB; all
    # 40 were ~160 MiB more.
    assert grown < 40 * MIB, f"grew {grown / MIB:.0f} MiB"
    assert answers(node, "stalled") >= 1
    assert held(node) == 0  # given back: the connection was dropped, and its answers
    assert sample_value(scrape(node), "dna_grpc_connections") <= 1  # the scrape's own, if any
    assert "Traceback" not in node.log_path.read_text(errors="replace")


def held(node: NodeProcess) -> float:
    return sample_value(scrape(node), "dna_grpc_answers_held")


async def honest_fetch(node: NodeProcess) -> float:
    """A unary fetch from another address: how long it took."""
    relay = TcpRelay((node.ip, GRPC_PORT), upstream_source=free_ips(1)[0])
    async with relay as via, grpc.aio.insecure_channel(via.address) as channel:
        started = time.monotonic()
        page = await mailbox_pb2_grpc.MailboxStub(channel).Fetch(
            fetch(Identity.generate()), timeout=10
        )
        took = time.monotonic() - started
    assert list(page.blobs) == []
    return took
