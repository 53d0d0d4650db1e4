"""freeze_startup_heap: what is alive is frozen, garbage cycles are collected first."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from dna_core.ops.heap import freeze_startup_heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # later tests collect as usual


def test_live_objects_are_frozen_and_later_ones_are_not(unfrozen: None) -> None:
    kept = Node()
    frozen = freeze_startup_heap()
    assert frozen == gc.get_freeze_count() > 0
    assert not in_a_generation(kept)  # the permanent one: no collection walks it
    later = Node()
    assert in_a_generation(later)


def in_a_generation(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_a_garbage_cycle_is_collected_not_frozen(unfrozen: None) -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    freeze_startup_heap()
    assert gone() is None
