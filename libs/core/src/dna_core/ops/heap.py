"""The heap of a long-running process, out of the garbage collector's way.

A node or a watching device keeps what it set up at start (imported modules, keys,
routing tables, gRPC channels and their protobuf classes) for its whole life, yet each
full collection walks all of it again: in ``bench.e2e --trace`` the recipient's full
collections paused it 60-220 ms on a loaded machine, the senders' 50-80 ms, each a
latency of every message in flight. `freeze_startup_heap`, called once the process is
up, moves those objects to the permanent generation, so later collections walk only what
was allocated since (Python's documented use of `gc.freeze`).
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect (garbage is not frozen with the rest), then freeze every object alive now.
    Returns how many objects are frozen. Call it once, when the process is up: in a
    process that starts and drops many things (a test run) cycles created before a freeze
    and dropped after it are never collected."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


# glibc's mallopt parameters (malloc.h).
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MALLOC_ARENAS = 2  # the event loop's and one for every other thread
MMAP_THRESHOLD = 128 * 1024  # glibc's starting value, kept from growing


def bound_malloc() -> dict[str, int]:
    """Keep glibc's allocator from holding memory that is no longer used; call it before
    any thread starts. Returns what was set (nothing off glibc, or where the operator set
    ``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_THRESHOLD_``, which win).

    * **Arenas**: glibc gives threads their own heaps (up to 8 per core), and a node's
      threads (grpc's, the SQLite reader and writer) allocate blobs: each heap keeps its
      high-water mark. A storage node serving 100 fetches of 2 MiB pages at once peaked at
      343 MiB with the default, 172 MiB with 2 (``bench.storage_size``).
    * **mmap threshold**: an allocation of 128 KiB or more (a blob, a page, a gRPC
      message) is mapped on its own and unmapped when freed; glibc raises that threshold
      after the first such free (up to 32 MiB), after which blobs land in the heaps and
      their space is kept. Fixed at 128 KiB, freed blobs go back to the system at once.
    """
    import ctypes
    import os

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl's mallopt does nothing)
    except (OSError, AttributeError):
        return {}
    wanted = {
        "MALLOC_ARENA_MAX": (M_ARENA_MAX, MALLOC_ARENAS),
        "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
    }
    applied: dict[str, int] = {}
    for env, (param, value) in wanted.items():
        if env not in os.environ and mallopt(param, value) == 1:
            applied[env] = value
    return applied
