"""A real `dna-storage-node` on a real `redis-server` that is killed (SIGKILL) under it and
started again on its AOF: while Redis is gone, requests answer UNAVAILABLE with the reason
(a client asks another replica) and `/readyz` is 503, without a traceback per request (they
answered INTERNAL, "Unexpected <class 'redis.exceptions.ConnectionError'>"); once Redis is
back, the node is ready again within a GC interval, without a restart, and the blob
acknowledged before the kill is still there. A Redis restarted without the settings
durability needs is said within a GC pass (it was checked only at the node's start)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
from cluster import NodeProcess, free_ips, mailbox_call, wait_ready
from dna_core.crypto import pow, seal
from dna_core.mailbox import mailbox_id, put_pow_hash, sign_fetch
from dna_core.wire.gen.dna.v1 import mailbox_pb2
from storage.redis_process import RedisProcess, own_redis
from support import seeded_identity

IP = free_ips(1)[0]
ALICE, BOB = seeded_identity("redis-alice"), seeded_identity("redis-bob")
__all__ = ["own_redis"]  # the fixture
GC_INTERVAL_S = 1.0  # the GC pass is what notices Redis is back when no request comes


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def put(text: bytes) -> Any:
    box = mailbox_id(BOB.fingerprint)
    blob = seal(ALICE, BOB.public, text, now_ms=now_ms())
    proof, _ = pow.solve(put_pow_hash(box, blob), 4, now_ms=now_ms())
    request = mailbox_pb2.PutRequest(version=1, mailbox_id=box, blob=blob, pow=proof.to_proto())
    return mailbox_call(IP, "Put", request)


def fetch() -> Any:
    request = mailbox_pb2.FetchRequest.FromString(
        sign_fetch(BOB, cursor=b"", limit=10, now_ms=now_ms())
    )
    return mailbox_call(IP, "Fetch", request)


def until_ready(node: NodeProcess, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if node.http("/readyz").status_code == 200:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"not ready {timeout_s} s after redis came back")


def test_redis_killed_and_restarted_under_a_node(tmp_path: Path, own_redis: RedisProcess) -> None:
    settings = (
        f'backend = "redis"\nredis_url = "{own_redis.url}"\ngc_interval_s = {GC_INTERVAL_S}\n'
        "[admission]\npow_base_bits = 4\n"
    )
    node = NodeProcess(
        "redis-storage", IP, tmp_path, [], command="dna-storage-node", extra_toml=settings
    )
    node.start()
    try:
        wait_ready([node], timeout=30)
        first = put(b"acknowledged before the kill")
        assert isinstance(first, mailbox_pb2.PutResponse), first

        own_redis.kill()
        for answer in (put(b"while redis is gone"), fetch()):
            assert isinstance(answer, grpc.aio.AioRpcError), answer
            assert answer.code() == grpc.StatusCode.UNAVAILABLE, answer
            assert "store is unavailable: redis" in (answer.details() or "")
        ready = node.http("/readyz")
        assert ready.status_code == 503, ready.text
        assert "store is unavailable" in ready.json()["reason"]
        assert node.http("/healthz").status_code == 200  # alive: no restart wanted

        own_redis.start()
        took = until_ready(node, timeout_s=10 * GC_INTERVAL_S)
        print(f"\nready again {took:.1f} s after redis restarted")
        second = put(b"after the restart")
        assert isinstance(second, mailbox_pb2.PutResponse), second
        page = fetch()
        assert isinstance(page, mailbox_pb2.FetchResponse), page
        assert {b.blob_id for b in page.blobs} == {first.blob_id, second.blob_id}
        log = node.log_path.read_text()
        assert "Traceback" not in log
        assert log.count("unready until it answers") == 1  # said once, not per request
        assert "answers again" in log
        assert "not configured for durable writes" not in log

        # Restarted from a configuration without `appendfsync always` (an operator had
        # set it with CONFIG SET, which a restart forgets): said within a GC pass, once.
        own_redis.kill()
        own_redis.start(appendfsync="everysec")
        said = "redis is not configured for durable writes: appendfsync is 'everysec'"
        deadline = time.monotonic() + 10 * GC_INTERVAL_S
        while said not in node.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3 * GC_INTERVAL_S)
        assert node.log_path.read_text().count(said) == 1
    finally:
        if node.alive():
            node.terminate()
