"""freeze_startup_heap: what is alive is frozen, garbage cycles are collected first."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
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


# Run in an interpreter of its own: in a test run another test's thread may still be going
# (gRPC's aio poller stops once a collection drops the last channel, i.e. during the
# freeze), and a frozen object it frees lowers the freeze count between two reads.
FREEZE_IN_A_FRESH_PROCESS = """
import gc, json
from dna_core.ops.heap import freeze_startup_heap

class Node:
    pass

def in_a_generation(obj):
    return any(o is obj for o in gc.get_objects())

kept = Node()
frozen = freeze_startup_heap()
count_after = gc.get_freeze_count()
kept_in_a_generation = in_a_generation(kept)
later = Node()
print(json.dumps({"frozen": frozen, "count_after": count_after,
                  "kept_in_a_generation": kept_in_a_generation,
                  "later_in_a_generation": in_a_generation(later)}))
"""


@pytest.mark.process
def test_live_objects_are_frozen_and_later_ones_are_not() -> None:
    run = subprocess.run(
        [sys.executable, "-c", FREEZE_IN_A_FRESH_PROCESS],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    seen = json.loads(run.stdout)
    assert seen["frozen"] == seen["count_after"] > 0
    assert not seen["kept_in_a_generation"]  # the permanent one: no collection walks it
    assert seen["later_in_a_generation"]


def test_a_garbage_cycle_is_collected_not_frozen(unfrozen: None) -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    freeze_startup_heap()
    assert gone() is None
