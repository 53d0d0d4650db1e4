"""Every list the mailbox client puts in one gRPC message is bounded in bytes as well as
items (issue 10, defect 1 and 3)."""

from __future__ import annotations

import asyncio
import os

from dna_core.crypto import Identity
from dna_core.mailbox import sign_delete
from dna_core.mailbox.auth import MAX_DELETE_IDS
from dna_core.mailbox.client import (
    DELETE_BATCH_IDS,
    DELETE_REQUEST_BYTES,
    MAX_PUT_BATCH,
    MAX_PUT_BATCH_BYTES,
    NodeBatcher,
)
from dna_core.wire.gen.dna.v1 import mailbox_pb2


def test_a_full_delete_batch_is_a_small_request() -> None:
    ids = [os.urandom(32) for _ in range(DELETE_BATCH_IDS)]
    assert DELETE_BATCH_IDS <= MAX_DELETE_IDS
    assert len(sign_delete(Identity.generate(), ids, now_ms=1)) <= DELETE_REQUEST_BYTES


def test_put_batches_count_whole_puts_against_their_byte_budget() -> None:
    batcher = NodeBatcher(lambda request: None)  # type: ignore[arg-type,return-value]
    loop = asyncio.new_event_loop()
    try:
        for i in range(MAX_PUT_BATCH):
            request = mailbox_pb2.PutRequest(mailbox_id=bytes(32), blob=bytes([i]) * 188_000)
            batcher._waiting.append((request, loop.create_future()))
        sizes = []
        while batcher._waiting:
            batch = batcher._take()
            sizes.append(sum(r.ByteSize() for r, _ in batch))
        assert max(sizes) <= MAX_PUT_BATCH_BYTES and len(sizes) > 1
    finally:
        loop.close()
