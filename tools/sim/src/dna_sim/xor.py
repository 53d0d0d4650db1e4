"""XOR-closest selection over a sorted list of IDs (the simulator's ground truth)."""

from __future__ import annotations

from bisect import bisect_left

from dna_core.overlay import ID_BITS


def xor_closest(keys: list[int], target: int, count: int) -> list[int]:
    """Indices into the sorted ``keys`` of the ``count`` keys XOR-closest to ``target``,
    closest first.

    Every key sharing the top ``ID_BITS - s`` bits with ``target`` is closer than every
    key that does not (it is below ``2^s``, they are not), and those keys form one
    contiguous run of the sorted list. So widen ``s`` until the run holds ``count`` keys,
    then sort only that run.
    """
    n = len(keys)
    if n <= count:
        return sorted(range(n), key=lambda i: keys[i] ^ target)
    # Start near the expected size of the smallest run that holds `count` keys.
    shift = max(0, ID_BITS - (n // count).bit_length())
    while True:
        start, end = prefix_range(keys, target, shift)
        if end - start >= count:
            break
        shift += 1
    return sorted(range(start, end), key=lambda i: keys[i] ^ target)[:count]


def prefix_range(keys: list[int], value: int, shift: int) -> tuple[int, int]:
    """The slice of the sorted ``keys`` that share all bits above bit ``shift - 1`` with
    ``value`` (XOR distance below ``2^shift``)."""
    lo = value >> shift << shift
    start = bisect_left(keys, lo)
    return start, bisect_left(keys, lo + (1 << shift), start)


def bucket_range(keys: list[int], local: int, index: int) -> tuple[int, int]:
    """The slice of the sorted ``keys`` at XOR distance ``[2^index, 2^(index+1))`` from
    ``local``, i.e. what bucket ``index`` of ``local``'s routing table may hold."""
    return prefix_range(keys, local ^ (1 << index), index)
