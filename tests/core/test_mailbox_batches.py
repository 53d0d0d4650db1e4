"""Every list the mailbox client puts in one gRPC message is bounded in bytes as well as
items (issue 10, defect 1 and 3)."""

from __future__ import annotations

import os

from dna_core.crypto import Identity
from dna_core.mailbox import sign_delete
from dna_core.mailbox.auth import MAX_DELETE_IDS
from dna_core.mailbox.client import DELETE_BATCH_IDS, DELETE_REQUEST_BYTES


def test_a_full_delete_batch_is_a_small_request() -> None:
    ids = [os.urandom(32) for _ in range(DELETE_BATCH_IDS)]
    assert DELETE_BATCH_IDS <= MAX_DELETE_IDS
    assert len(sign_delete(Identity.generate(), ids, now_ms=1)) <= DELETE_REQUEST_BYTES
