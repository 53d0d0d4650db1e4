"""Pure parts of the repairer: how a pass slices the ID space, how copies are counted."""

from __future__ import annotations

import itertools

import pytest
from dna_storage.backends.common import in_range
from dna_storage.replication import Holdings, copies, id_ranges
from hypothesis import given
from hypothesis import strategies as st


@given(mailbox=st.binary(min_size=32, max_size=32), count=st.integers(1, 256))
def test_every_mailbox_id_is_in_exactly_one_slice(mailbox: bytes, count: int) -> None:
    slices = id_ranges(count)
    assert len(slices) == count
    assert sum(in_range(mailbox, start, end) for start, end in slices) == 1


@pytest.mark.parametrize("count", [1, 2, 3, 256])
def test_slices_follow_id_order_and_leave_no_gap(count: int) -> None:
    slices = id_ranges(count)
    assert slices[0][0] == b"" and slices[-1][1] == b""
    for (_, end), (start, _) in itertools.pairwise(slices):
        assert end == start and start > b""


def test_copies_count_peers_holding_each_item_a_tombstone_settling_its_blob() -> None:
    ours = Holdings(frozenset({b"a", b"b"}), frozenset({b"t"}))
    peers = [
        Holdings(frozenset({b"a", b"b"}), frozenset({b"t"})),
        Holdings(frozenset({b"a"}), frozenset({b"b"})),  # b deleted there: nothing to send
        Holdings(frozenset(), frozenset()),
    ]
    assert copies(ours, peers) == ({b"a": 2, b"b": 2}, {b"t": 1})
    assert copies(ours, []) == ({b"a": 0, b"b": 0}, {b"t": 0})
