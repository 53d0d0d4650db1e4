"""Fetch pages are cut by bytes so a response never outgrows the gRPC message limit."""

from __future__ import annotations

from dna_storage.backends.base import Page, StoredBlob
from dna_storage.mailbox_service import _cut_by_bytes


def _page(sizes: list[int], *, more: bool = False) -> Page:
    blobs = [
        StoredBlob(b"m" * 32, bytes([i]) * 32, b"x" * n, 0, 1, seq=i + 1)
        for i, n in enumerate(sizes)
    ]
    return Page(blobs, next_cursor=len(sizes), more=more)


def test_a_page_within_budget_is_unchanged() -> None:
    blobs, cursor, more = _cut_by_bytes(_page([10, 10, 10]), 100)
    assert (len(blobs), cursor, more) == (3, 3, False)


def test_a_page_over_budget_is_cut_and_resumes_where_it_stopped() -> None:
    blobs, cursor, more = _cut_by_bytes(_page([40, 40, 40, 40]), 100)
    assert (len(blobs), cursor, more) == (2, 2, True)


def test_one_blob_larger_than_the_budget_still_goes_out_alone() -> None:
    blobs, cursor, more = _cut_by_bytes(_page([500, 10]), 100)
    assert (len(blobs), cursor, more) == (1, 1, True)


def test_more_from_the_backend_is_kept() -> None:
    assert _cut_by_bytes(_page([10], more=True), 100)[2] is True
